"""``kromhc``: H_res = D_1 ⊗ D_2 ⊗ … ⊗ D_m, a Kronecker product of small doubly
stochastic factors (KromHC, arXiv:2601.21579).

n must factor into 2s and 3s (n = 2^a·3^b); the factors are, in order, the 2×2
``[[p, 1−p], [1−p, p]]`` with p = σ(ℓ) (one logit each) and then the 3×3 convex
combinations of the six 3×3 permutations (mHC-lite's exact map, six logits each). A
Kronecker product of doubly stochastic matrices is doubly stochastic (its row sums are
products of the factors' row sums), so H_res is exactly doubly stochastic with no
iterations, from O(log n) logits: a + 6b per token instead of n².

Init: each factor's identity logit is ``res_init`` (default 4): p = σ(4) = 0.982 for a
2×2 factor, so for n = 4 the diagonal of H_res starts at 0.964.

Computed as one mixture: p = σ(ℓ) is the softmax of (ℓ, 0) over the factor's two
permutations, and a Kronecker product of softmax mixtures is the softmax mixture of the
Kronecker products of their permutations, with the sums of their logits:
⊗_f Σ_k w_f,k P_f,k = Σ_(k_1…k_m) softmax(Σ_f ℓ_f,k_f) ⊗_f P_f,k_f. So H_res is one
``basis_mixture`` of the summed logits (ℓ Sᵀ for a fixed 0/1 selection S, at full
precision) over the combinations' permutation matrices B: 4 at n = 4, 12 at n = 6,
8 at n = 8; one kernel on CUDA instead of a sigmoid, stacks, a mixture and Kronecker
products per factor. Where the mixture kernel would not take the (K, n²) basis (n = 9, 12
and from 18 on) the factors are computed and multiplied out.
"""

from __future__ import annotations

import itertools

import torch

from ..projections.mixture import basis_mixture, full_precision_matmul, kernel_takes
from .base import Variant
from .mhc_lite import permutation_set

__all__ = ["KromHC", "kron_factors", "kron_mixture"]


def kron_factors(n: int) -> list[int]:
    """Factor sizes of n (2s first, then 3s); empty for n = 1.

    Raises:
        ValueError: (via the variant's ``streams`` check) if n is not 2^a·3^b."""
    if n < 1:
        raise ValueError(f"{n} is not a positive integer")
    sizes, m = [], n
    for p in (2, 3):
        while m % p == 0:
            sizes.append(p)
            m //= p
    if m != 1:
        raise ValueError(f"{n} is not a product of 2s and 3s")
    return sizes


def _logits_per_factor(size: int) -> int:
    return 1 if size == 2 else 6


def kron_mixture(factors: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (K, R), B (K, n, n)) with ⊗_f D_f(ℓ) = Σ_k softmax(ℓ Sᵀ)_k B_k for logits ℓ (R,):
    one 0/1 row per combination of the factors' permutations, selecting each factor's
    chosen logit (the 2×2 identity's; the swap has a fixed 0 and selects none; the 3×3
    permutations, identity first, theirs), B_k their Kronecker product in ``torch.kron``'s
    order. ℓ Sᵀ adds a few logits (weights exactly 1): no rounding beyond fp32 addition as
    long as the product runs at full precision (``full_precision_matmul``: no autocast, no
    TF32)."""
    perms3 = permutation_set(3)
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    choices, start = [], 0  # per factor: [(logit index or None, permutation matrix)]
    for size in factors:
        if size == 2:
            choices.append([(start, torch.eye(2)), (None, swap)])
        else:
            choices.append([(start + k, perms3[k]) for k in range(6)])
        start += _logits_per_factor(size)
    rows, mats = [], []
    for combo in itertools.product(*choices):
        row, mat = torch.zeros(start), torch.ones(1, 1)
        for index, perm in combo:
            if index is not None:
                row[index] = 1.0
            mat = torch.kron(mat, perm)
        rows.append(row)
        mats.append(mat)
    return torch.stack(rows), torch.stack(mats)


class KromHC(Variant):
    """H_res = ⊗_f D_f: 2×2 factors [[p, 1−p], [1−p, p]], 3×3 factors over the 3! permutations."""

    name = "kromhc"
    res_init_default = 4.0
    style = {"color": "#e377c2", "marker": "h"}

    @classmethod
    def streams_error(cls, streams):
        try:
            kron_factors(streams)
        except ValueError:
            return (f"variant 'kromhc' needs n = 2^a·3^b (a Kronecker product of 2×2 and 3×3 factors), "
                    f"got {streams}")
        return None

    def __init__(self, streams, layer_index=0, res_init=None, **kwargs):
        super().__init__(streams, layer_index, res_init, **kwargs)
        self.factors = kron_factors(streams)
        self.register_buffer("permutations3", permutation_set(3), persistent=False)
        combos = 1
        for f in self.factors:
            combos *= 2 if f == 2 else 6
        # One mixture where the mixture kernel takes it (see the module doc): n = 2, 3, 4, 6,
        # 8, 16; beyond, the (K, n²) basis outgrows the kernel's tile and a GEMM over it
        # costs K·n² per token against ~n² for the factors.
        self.one_mixture = 1 <= len(self.factors) and kernel_takes(combos, streams * streams)
        select, basis = (kron_mixture(self.factors) if self.one_mixture
                         else (torch.zeros(0), torch.zeros(0)))
        self.register_buffer("kron_select", select, persistent=False)
        self.register_buffer("kron_basis", basis, persistent=False)

    @property
    def res_logit_shape(self):
        return (max(1, sum(_logits_per_factor(f) for f in self.factors)),)  # n = 1: one unused logit

    def static_init(self):
        b_pre, b_post = self.static_pre_post()
        b_res = torch.zeros(self.res_logit_shape)
        start = 0
        for f in self.factors:  # the identity's logit of each factor (first for both kinds)
            b_res[start] = self.res_init
            start += _logits_per_factor(f)
        return b_pre, b_post, b_res

    def _factor(self, logits, size):
        if size == 2:
            p = torch.sigmoid(logits[..., 0])
            q = 1 - p
            return torch.stack((torch.stack((p, q), -1), torch.stack((q, p), -1)), -2)
        return basis_mixture(logits, self.permutations3, self.kernels)   # over the 3! permutations

    def map_res(self, raw_res, state):
        if not self.factors:  # n = 1
            return torch.ones(*raw_res.shape[:-1], 1, 1, dtype=raw_res.dtype, device=raw_res.device)
        if self.one_mixture:
            logits = full_precision_matmul(raw_res, self.kron_select.mT.to(raw_res.dtype))
            return basis_mixture(logits, self.kron_basis, self.kernels)
        return self.map_res_factored(raw_res)

    def map_res_factored(self, raw_res):
        """The same map, factor by factor: each D_f, then their Kronecker products."""
        h, start = None, 0
        for size in self.factors:
            k = _logits_per_factor(size)
            d = self._factor(raw_res[..., start:start + k], size)
            start += k
            if h is None:
                h = d
            else:  # (h ⊗ d)[(i,k),(j,l)] = h[i,j]·d[k,l]
                m = h.shape[-1]
                h = (h[..., :, None, :, None] * d[..., None, :, None, :]).reshape(*h.shape[:-2], m * size, m * size)
        return h
