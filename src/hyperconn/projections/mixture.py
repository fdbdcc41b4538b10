"""Convex combinations of fixed matrices: the exact Birkhoff maps of mhc-lite, circulant
and kromhc (its whole Kronecker product, see variants/kromhc.py).

    basis_mixture(logits, basis)     (..., K), (K, *S) → (..., *S)     softmax(logits) · basis

With a basis of permutation matrices the result is doubly stochastic exactly (Birkhoff–von
Neumann), with no iterations.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["basis_mixture", "shift_basis", "kernel_takes", "full_precision_matmul"]

# The mixture kernel's limits, kept equal to triton_kernels.MAX_MIXTURE_K / MAX_MIXTURE_TILE
# without importing Triton (tests/test_kernels.py checks that they agree).
MAX_KERNEL_K = 128
MAX_KERNEL_TILE = 4096


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def kernel_takes(k: int, e: int) -> bool:
    """Whether the Triton kernel takes a basis of ``k`` matrices of ``e`` values each."""
    return k <= MAX_KERNEL_K and _pow2(k) * _pow2(e) <= MAX_KERNEL_TILE


def shift_basis(n: int) -> torch.Tensor:
    """The n cyclic shifts S^k as (n, n, n) 0/1 matrices: ``S^k[i, j] = 1`` iff ``(j − i) mod n = k``."""
    i = torch.arange(n)
    lag = (i[None, :] - i[:, None]) % n
    return (lag[None] == torch.arange(n)[:, None, None]).to(torch.float32)


def basis_mixture(logits: torch.Tensor, basis: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """``Σ_k softmax(logits)_k · basis[k]``: logits (..., K), a constant basis (K, *S) → (..., *S),
    in the logits' dtype; the basis gets no gradient.

    ``backend``: as :func:`hyperconn.ops.resolve_backend`. With Triton (auto: CUDA tensors),
    K ≤ 128 and a (K, E) tile of at most 4096 values padded to powers of two (E values per
    matrix), one kernel computes the softmax and the combination per token, and one its
    backward (``hyperconn::basis_mixture``); otherwise ``softmax`` and a GEMM, with autocast
    off and, for fp32 on CUDA with TF32 allowed, in fp64 (a bf16 or TF32 product would
    break the rows' sums by ~1e-3).

    Raises:
        ValueError: if ``basis`` does not have ``logits.shape[-1]`` matrices, or (explicit
            ``backend="triton"``) more than the kernel takes.
    """
    if basis.dim() < 2 or basis.shape[0] != logits.shape[-1]:
        raise ValueError(f"basis: expected ({logits.shape[-1]}, *S) with at least one dimension in S, to match "
                         f"the logits' last dimension, got {tuple(basis.shape)}")
    from ..ops import dispatch

    if logits.numel() and dispatch.resolve_backend(backend, logits, basis) == "triton" \
            and (kernel_takes(basis.shape[0], basis[0].numel()) or str(backend).strip().lower() == "triton"):
        return dispatch._triton_ops().basis_mixture(logits, basis)
    with torch.autocast(logits.device.type, enabled=False):
        w = torch.softmax(logits, dim=-1)
    return full_precision_matmul(w, basis.detach().flatten(1)).unflatten(-1, basis.shape[1:])


def full_precision_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in ``a``'s dtype with no lower-precision shortcut: autocast off, and for fp32
    on CUDA with TF32 allowed (``torch.get_float32_matmul_precision() != "highest"``) in
    fp64. For the tiny products of the exact maps, whose row sums must stay exact: a bf16
    or TF32 product breaks them by ~1e-3."""
    with torch.autocast(a.device.type, enabled=False):
        acc = a.dtype
        if a.is_cuda and acc == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            acc = torch.float64
        return (a.to(acc) @ b.to(acc)).to(a.dtype)
