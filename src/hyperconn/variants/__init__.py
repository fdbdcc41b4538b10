"""The variants: one file each, registered by name (see :mod:`.base`).

    residual, hc, mhc, isohc, hybrid, harmonized, circulant     built in, in this order
    anything a user defines by subclassing hyperconn.Variant with a ``name``
"""

from .base import (PRE_INITS, VARIANTS, Options, Variant, all_option_names, get_variant, make_variant,
                   register_variant, unregister_variant, variant_names)
from .options import IsoOptions, SinkhornOptions
# Built-ins, imported for their registration (the order is VARIANTS' order).
from .residual import Residual  # noqa: E402
from .hc import HC  # noqa: E402
from .mhc import MHC  # noqa: E402
from .isohc import IsoHC  # noqa: E402
from .hybrid import Hybrid, HybridOptions  # noqa: E402
from .harmonized import HARMONIZED_KEYS, Harmonized, HarmonizedController, HarmonizedOptions  # noqa: E402
from .circulant import Circulant  # noqa: E402

__all__ = ["Variant", "Options", "SinkhornOptions", "IsoOptions", "HybridOptions", "HarmonizedOptions",
           "register_variant", "unregister_variant", "get_variant", "variant_names", "all_option_names", "make_variant", "VARIANTS",
           "PRE_INITS", "Residual", "HC", "MHC", "IsoHC", "Hybrid", "Harmonized", "Circulant", "HarmonizedController",
           "HARMONIZED_KEYS"]
