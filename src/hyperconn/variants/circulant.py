"""``circulant``: H_res = Σ_k w_k S^k, a convex combination of the cyclic shifts.

S is the cyclic shift of the n streams and w = softmax of n logits, so
``H_res[i, j] = w[(j − i) mod n]``: every row and every column holds each w_k once, hence
sums to 1 exactly, all entries are ≥ 0 (exactly doubly stochastic, no iterations), and
the matrix is normal (diagonalised by the discrete Fourier basis, eigenvalues the DFT of
w), so ``‖H_res‖₂ = 1``. It mixes only along the cycle's structure: n parameters per
token instead of n², and the static init ``b_res = res_init·I`` gives w₀ = e^δ/(e^δ+n−1)
and the other weights equal, which is exactly mHC's initial map.

The variant maps n raw logits (``res_logit_shape = (n,)``: the static ``b_res`` and n
dynamic outputs per token), not an n × n matrix.
"""

from __future__ import annotations

import torch

from ..ops import dispatch
from ..projections.mixture import basis_mixture, shift_basis
from .base import Variant

__all__ = ["Circulant", "circulant_from_logits"]


def circulant_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``H[..., i, j] = softmax(logits)[..., (j − i) mod n]``: (..., n) → (..., n, n)."""
    n = logits.shape[-1]
    i = torch.arange(n, device=logits.device)
    lag = (i[None, :] - i[:, None]) % n           # [i, j] = (j − i) mod n
    return torch.softmax(logits, dim=-1)[..., lag]


class Circulant(Variant):
    """H_res = Σ_k softmax(ℓ)_k S^k: exactly doubly stochastic and normal, no iterations."""

    name = "circulant"
    res_init_default = 4.0
    style = {"color": "#17becf", "marker": "d"}  # "X" marks diverged runs in figures

    def __init__(self, streams, layer_index=0, res_init=None, **kwargs):
        super().__init__(streams, layer_index, res_init, **kwargs)
        self.register_buffer("shifts", shift_basis(streams), persistent=False)

    @property
    def res_logit_shape(self):
        return (self.streams,)

    def static_init(self):
        b_pre, b_post = self.static_pre_post()
        b_res = torch.zeros(self.streams)
        b_res[0] = self.res_init                      # the identity S⁰
        return b_pre, b_post, b_res

    def map_res(self, raw_res, state):
        # Triton (auto: CUDA): softmax and the combination of the n shifts in one kernel;
        # else a softmax and a gather (the same numbers: each entry is one weight).
        if raw_res.numel() and dispatch.resolve_backend(self.kernels, raw_res) == "triton":
            return basis_mixture(raw_res, self.shifts, self.kernels)
        return circulant_from_logits(raw_res)
