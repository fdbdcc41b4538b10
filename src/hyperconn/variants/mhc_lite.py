"""``mhc-lite``: H_res = Σ_k w_k P_k, a convex combination of permutation matrices
(mHC-lite, arXiv:2601.05732).

w = softmax of K logits (static + per-token), P_k fixed permutation matrices. Every
convex combination of permutations is doubly stochastic (Birkhoff–von Neumann), exactly
and with no iterations, and for n ≤ 5 the set of all n! permutations reaches the whole
Birkhoff polytope. For n > 5 (n! logits would be 720 and up) the subset is the dihedral
group of the n-cycle: the n cyclic shifts and their n reflections (2n permutations,
the identity first). That subset spans only a 2n-vertex face of the polytope: a variant
with n > 5 streams mixes along the cycle's symmetries, not arbitrarily.

Init: the identity's logit is ``res_init`` (default 6) and the others 0, so for n = 4
H_res = (e⁶ I + Σ_{P≠I} P) / (e⁶ + 23), diagonal (e⁶ + 5)/(e⁶ + 23) = 0.957 — about
mHC's initial map (0.948).
"""

from __future__ import annotations

import itertools
import math

import torch

from ..projections.mixture import basis_mixture
from .base import Variant

__all__ = ["MHCLite", "permutation_set", "MAX_ALL_PERMUTATIONS"]

MAX_ALL_PERMUTATIONS = 5


def permutation_set(n: int) -> torch.Tensor:
    """The permutation matrices mHC-lite combines, (K, n, n), identity first: all n! for
    n ≤ 5, else the 2n permutations of the dihedral group (shifts, then reflections)."""
    if n <= MAX_ALL_PERMUTATIONS:
        perms = list(itertools.permutations(range(n)))          # lexicographic: identity first
    else:
        shifts = [tuple((i + k) % n for i in range(n)) for k in range(n)]
        perms = shifts + [tuple((k - i) % n for i in range(n)) for k in range(n)]
    index = torch.tensor(perms)                                  # (K, n): row i → column perm[i]
    return torch.nn.functional.one_hot(index, n).to(torch.float32)


class MHCLite(Variant):
    """H_res = Σ_k softmax(ℓ)_k P_k over a fixed set of permutation matrices."""

    name = "mhc-lite"
    res_init_default = 6.0
    style = {"color": "#8c564b", "marker": "*"}

    def __init__(self, streams, layer_index=0, res_init=None, **kwargs):
        super().__init__(streams, layer_index, res_init, **kwargs)
        self.register_buffer("permutations", permutation_set(streams), persistent=False)

    @property
    def res_logit_shape(self):
        return (math.factorial(self.streams) if self.streams <= MAX_ALL_PERMUTATIONS else 2 * self.streams,)

    def static_init(self):
        b_pre, b_post = self.static_pre_post()
        b_res = torch.zeros(self.res_logit_shape)
        b_res[0] = self.res_init                                 # the identity
        return b_pre, b_post, b_res

    def map_res(self, raw_res, state):
        # softmax(ℓ) · P over the K permutations: one Triton kernel on CUDA, else a GEMM.
        return basis_mixture(raw_res, self.permutations, self.kernels)
