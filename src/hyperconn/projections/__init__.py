"""Pure functions on (..., n, n) tensors: the manifold projections of every variant."""

from .hybrid import hybrid_mix
from .iso import ISO_METHODS, cayley, helmert_basis, iso_project, orthogonal_factor
from .mixture import basis_mixture, shift_basis
from .sinkhorn import SINKHORN_BACKWARDS, sinkhorn

__all__ = ["sinkhorn", "iso_project", "orthogonal_factor", "cayley", "hybrid_mix", "helmert_basis", "basis_mixture",
           "shift_basis", "ISO_METHODS",
           "SINKHORN_BACKWARDS"]
