"""``hybrid``: (1−λ)·Iso(H̃) + λ·Sinkhorn(H̃) from one raw matrix."""

import dataclasses
from typing import Union

import torch
from torch import nn

from ..errors import ConfigError
from ..projections import hybrid_mix, iso_project
from ..projections.iso import NS_COEFFICIENTS
from .base import Variant
from .isohc import describe_iso
from .mhc import describe_sinkhorn, sinkhorn_map
from .options import IsoOptions, SinkhornOptions


@dataclasses.dataclass(frozen=True)
class HybridOptions(SinkhornOptions, IsoOptions):
    """The Sinkhorn and Iso options, and ``hybrid_lambda``: "learned" (λ = σ(a learned
    logit), 0.5 at init) or a fixed number in [0, 1]."""

    hybrid_lambda: Union[str, float] = "learned"

    def check_hybrid_lambda(self, value):
        if value == "learned":
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError("hybrid_lambda", f"expected 'learned' or a number in [0, 1], got {value!r}")


class Hybrid(Variant):
    """(1−λ)·Iso(H̃) + λ·Sinkhorn(H̃) from one raw matrix; λ = σ(learned) or fixed."""

    name = "hybrid"
    Options = HybridOptions
    res_init_default = 4.0
    style = {"color": "#9467bd", "marker": "v"}

    def __init__(self, streams, layer_index=0, res_init=None, **kwargs):
        super().__init__(streams, layer_index, res_init, **kwargs)
        if self.options.hybrid_lambda == "learned":
            self.lambda_logit = nn.Parameter(torch.zeros(()))  # λ = 0.5 at init
            self.fixed_lambda = None
        else:
            self.lambda_logit = None
            self.fixed_lambda = float(self.options.hybrid_lambda)

    @property
    def lam(self):
        return torch.sigmoid(self.lambda_logit) if self.lambda_logit is not None else self.fixed_lambda

    def map_res(self, raw_res, state):
        h_iso = iso_project(raw_res, self.options.iso_method, self.options.iso_steps, backend=self.kernels)
        h_birk = sinkhorn_map(raw_res, self.options, self.kernels)
        return hybrid_mix(h_iso, h_birk, self.lam)

    def fused_maps(self):
        o = self.options
        if self._keeps_maps_of(Hybrid) and o.iso_method == "ns" and o.sinkhorn_backward == "unrolled":
            return ("hybrid", o.sinkhorn_iters, o.iso_steps or len(NS_COEFFICIENTS), self.lam)
        return None

    @classmethod
    def describe_options(cls, options):
        return [describe_sinkhorn(options), describe_iso(options), f"lambda={options.hybrid_lambda}"]
