"""``circulant``: H_res = Σ_k w_k S^k, a convex combination of the cyclic shifts.

S is the cyclic shift of the n streams and w = softmax of n logits, so
``H_res[i, j] = w[(j − i) mod n]``: every row and every column holds each w_k once, hence
sums to 1 exactly, all entries are ≥ 0 (exactly doubly stochastic, no iterations), and
the matrix is normal (diagonalised by the discrete Fourier basis, eigenvalues the DFT of
w), so ``‖H_res‖₂ = 1``. It mixes only along the cycle's structure: n parameters per
token instead of n², and the static init ``b_res = res_init·I`` gives w₀ = e^δ/(e^δ+n−1)
and the other weights equal, which is exactly mHC's initial map.

The layer's raw H̃_res (n × n, static + dynamic) is projected onto the circulant logits by
averaging its wrapped diagonals, ``ℓ_k = mean_i H̃[i, (i + k) mod n]``.
"""

from __future__ import annotations

import torch

from .base import Variant

__all__ = ["Circulant", "circulant_from_logits"]


def _indices(n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(n, device=device)
    diagonal = (i[None, :] + i[:, None]) % n      # [k, i] = (i + k) mod n: column of diagonal k in row i
    lag = (i[None, :] - i[:, None]) % n           # [i, j] = (j − i) mod n
    return diagonal, lag


def circulant_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``H[..., i, j] = softmax(logits)[..., (j − i) mod n]``: (..., n) → (..., n, n)."""
    n = logits.shape[-1]
    _, lag = _indices(n, logits.device)
    return torch.softmax(logits, dim=-1)[..., lag]


class Circulant(Variant):
    """H_res = Σ_k softmax(ℓ)_k S^k: exactly doubly stochastic and normal, no iterations."""

    name = "circulant"
    res_init_default = 4.0
    style = {"color": "#17becf", "marker": "X"}

    def map_res(self, raw_res, state):
        n = self.streams
        diagonal, _ = _indices(n, raw_res.device)
        rows = torch.arange(n, device=raw_res.device)
        logits = raw_res[..., rows, diagonal].mean(-1)                      # (..., n): ℓ_k
        return circulant_from_logits(logits)
