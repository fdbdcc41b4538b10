"""hyperconn: Hyper-Connections and their stabilised variants.

    >>> import torch, hyperconn
    >>> hc = hyperconn.HyperConnection(64, 4, torch.nn.Linear(64, 64), variant="mhc")
    >>> x = hyperconn.expand_streams(torch.randn(2, 10, 64), 4, offset=0.1)   # (B, T, n, C)
    >>> hyperconn.reduce_streams(hc(x)).shape
    torch.Size([2, 10, 64])
"""

from .connection import ExpandStreams, HyperConnection, ReduceStreams, expand_streams, reduce_streams, stream_offsets
from .control import Controller, build_controllers
from .errors import ConfigError
from .inits import DEFAULT_INIT, INITS, InitScheme, get_init, init_names
from .diagnostics.gain import CompositeGain, composite_gain
from .param_groups import param_groups
from .reduction import LearnedReduce
from .projections import hybrid_mix, iso_project, sinkhorn
from .variants import VARIANTS, HarmonizedController, Variant, get_variant, register_variant, variant_names

__version__ = "0.1.0"

__all__ = [
    "HyperConnection", "expand_streams", "reduce_streams", "stream_offsets", "ExpandStreams", "ReduceStreams", "HarmonizedController",
    "CompositeGain", "composite_gain", "sinkhorn", "iso_project", "hybrid_mix", "VARIANTS", "param_groups",
    "LearnedReduce", "InitScheme", "INITS", "DEFAULT_INIT", "get_init", "init_names", "Variant", "register_variant", "get_variant", "variant_names", "ConfigError", "Controller", "build_controllers",
]
