"""The variants: one file each, registered by name (see :mod:`.base`).

    residual, hc, mhc, isohc, hybrid, harmonized     built in, in this order, then every
                                                     other file of this package (sorted)
    anything a user defines by subclassing hyperconn.Variant with a ``name``
"""

from .base import (PRE_INITS, VARIANTS, Options, Variant, all_option_names, get_variant, make_variant,
                   register_variant, unregister_variant, variant_names)
from .options import IsoOptions, SinkhornOptions
# The original built-ins first, imported for their registration (VARIANTS' order); the
# rest of the package's files are found below.
from .residual import Residual  # noqa: E402
from .hc import HC  # noqa: E402
from .mhc import MHC  # noqa: E402
from .isohc import IsoHC  # noqa: E402
from .hybrid import Hybrid, HybridOptions  # noqa: E402
from .harmonized import HARMONIZED_KEYS, Harmonized, HarmonizedController, HarmonizedOptions  # noqa: E402


def _import_every_variant_file() -> None:
    # Every other module of this package is a variant file: importing it registers it, so
    # a new built-in variant is one new file and nothing else (docs/design.md).
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in ("base", "options") and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_every_variant_file()

__all__ = ["Variant", "Options", "SinkhornOptions", "IsoOptions", "HybridOptions", "HarmonizedOptions",
           "register_variant", "unregister_variant", "get_variant", "variant_names", "all_option_names", "make_variant", "VARIANTS",
           "PRE_INITS", "Residual", "HC", "MHC", "IsoHC", "Hybrid", "Harmonized", "HarmonizedController",
           "HARMONIZED_KEYS"]
