"""Convex combinations of fixed matrices: the exact Birkhoff maps of mhc-lite, circulant
and kromhc's 3×3 factors.

    basis_mixture(logits, basis)     (..., K), (K, *S) → (..., *S)     softmax(logits) · basis

With a basis of permutation matrices the result is doubly stochastic exactly (Birkhoff–von
Neumann), with no iterations.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["basis_mixture", "shift_basis"]

MAX_KERNEL_K = 128  # kept equal to triton_kernels.MAX_MIXTURE_K without importing Triton


def shift_basis(n: int) -> torch.Tensor:
    """The n cyclic shifts S^k as (n, n, n) 0/1 matrices: ``S^k[i, j] = 1`` iff ``(j − i) mod n = k``."""
    i = torch.arange(n)
    lag = (i[None, :] - i[:, None]) % n
    return (lag[None] == torch.arange(n)[:, None, None]).to(torch.float32)


def basis_mixture(logits: torch.Tensor, basis: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """``Σ_k softmax(logits)_k · basis[k]``: logits (..., K), a constant basis (K, *S) → (..., *S),
    in the logits' dtype; the basis gets no gradient.

    ``backend``: as :func:`hyperconn.ops.resolve_backend`. With Triton (auto: CUDA tensors)
    and K ≤ 128 one kernel computes the softmax and the combination per token, and one its
    backward (``hyperconn::basis_mixture``); otherwise ``softmax`` and a GEMM.

    Raises:
        ValueError: if ``basis`` does not have ``logits.shape[-1]`` matrices, or (explicit
            ``backend="triton"``) more than 128.
    """
    if basis.dim() < 2 or basis.shape[0] != logits.shape[-1]:
        raise ValueError(f"basis: expected ({logits.shape[-1]}, *S) with at least one dimension in S, to match "
                         f"the logits' last dimension, got {tuple(basis.shape)}")
    from ..ops import dispatch

    if logits.numel() and dispatch.resolve_backend(backend, logits, basis) == "triton" \
            and (basis.shape[0] <= MAX_KERNEL_K or str(backend).strip().lower() == "triton"):
        return dispatch._triton_ops().basis_mixture(logits, basis)
    w = torch.softmax(logits, dim=-1)
    return (w @ basis.detach().to(w.dtype).flatten(1)).unflatten(-1, basis.shape[1:])
