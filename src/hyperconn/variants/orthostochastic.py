"""``orthostochastic``: H_res = Q ∘ Q, the entrywise square of an orthogonal Q.

Rows and columns of an orthogonal matrix are unit vectors, so the squares of their
entries sum to 1: Q ∘ Q is doubly stochastic with entries ≥ 0 whenever Q is orthogonal —
exactly as exact as the orthogonalisation. Q comes from the raw logits by
``ortho_method``: ``"cayley"`` (default; exactly orthogonal by one small solve, det +1,
SO(n) minus rotations with eigenvalue −1), ``"polar"`` (exact polar factor by SVD) or
``"ns"`` (converged Newton-Schulz, ‖QᵀQ − I‖ ≈ 1e-6 in the schedule's range). The
diagnostics report the Birkhoff error actually reached (``row_sum_err``, ``col_sum_err``).

Init: b_res = res_init·I (default 1) gives Q = I, H_res = I. Note that at Q = I the map
has zero derivative (d(Q∘Q) = 2 Q∘dQ and dQ is skew, zero on the diagonal), so the
static logits start without gradient, as mHC's do near I (docs/variants.md).
"""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from ..projections import orthogonal_factor
from .base import Options, Variant

__all__ = ["Orthostochastic", "OrthostochasticOptions", "ORTHO_METHODS"]

ORTHO_METHODS = ("cayley", "polar", "ns")


@dataclasses.dataclass(frozen=True)
class OrthostochasticOptions(Options):
    """``ortho_method``: how Q is made orthogonal ("cayley" | "polar" | "ns")."""

    ortho_method: str = "cayley"

    def check_ortho_method(self, value):
        if value not in ORTHO_METHODS:
            raise ConfigError("ortho_method", f"expected one of {ORTHO_METHODS}, got {value!r}")


class Orthostochastic(Variant):
    """H_res = Q ∘ Q with Q orthogonal (Cayley, polar or Newton-Schulz) from the raw logits."""

    name = "orthostochastic"
    Options = OrthostochasticOptions
    res_init_default = 1.0
    style = {"color": "#bcbd22", "marker": "p"}

    def map_res(self, raw_res, state):
        if self.streams == 1:
            return raw_res * 0 + 1  # O(1) = {±1}: (±1)² = 1; keeps a graph
        q = orthogonal_factor(raw_res, self.options.ortho_method, backend=self.kernels)
        return q * q

    @classmethod
    def describe_options(cls, options):
        return [f"ortho({options.ortho_method})"]
