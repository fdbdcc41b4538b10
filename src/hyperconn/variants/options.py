"""Options shared by several variants (each a small frozen dataclass; see
:class:`hyperconn.variants.Options`). A variant's own ``Options`` combines them by
inheritance."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..errors import ConfigError
from ..projections import ISO_METHODS, SINKHORN_BACKWARDS
from .base import Options

__all__ = ["SinkhornOptions", "IsoOptions"]


@dataclasses.dataclass(frozen=True)
class SinkhornOptions(Options):
    """``sinkhorn_iters`` (20): Sinkhorn-Knopp iterations; ``sinkhorn_backward``
    ("unrolled" | "implicit"): autograd through the iterations or the implicit-function
    gradient at the fixed point (see :func:`hyperconn.sinkhorn`)."""

    sinkhorn_iters: int = 20
    sinkhorn_backward: str = "unrolled"

    def check_sinkhorn_iters(self, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError("sinkhorn_iters", f"expected a positive integer, got {value!r}")

    def check_sinkhorn_backward(self, value):
        if value not in SINKHORN_BACKWARDS:
            raise ConfigError("sinkhorn_backward", f"expected one of {SINKHORN_BACKWARDS}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class IsoOptions(Options):
    """``iso_method`` ("ns" | "ns-cubic" | "polar" | "cayley") and ``iso_steps`` (None: the method's
    default) of the mean-preserving isometry (see :func:`hyperconn.iso_project`)."""

    iso_method: str = "ns"
    iso_steps: Optional[int] = None

    def check_iso_method(self, value):
        if value not in ISO_METHODS:
            raise ConfigError("iso_method", f"expected one of {ISO_METHODS}, got {value!r}")

    def check_iso_steps(self, value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError("iso_steps", f"expected None (the method's default) or a positive integer, "
                                           f"got {value!r}")


