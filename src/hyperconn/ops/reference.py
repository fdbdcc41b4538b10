"""Torch reference implementations of the per-token hyper-connection ops.

These are the numerics every other backend is checked against, and the path used on CPU
and whenever Triton is not selected. Layout is ``(..., n, C)``: a token's n streams are
contiguous. Coefficients may be per token (``(..., n)``, ``(..., n, n)``) or shared by all
tokens (``(n,)``, ``(n, n)``; their gradients are then summed over tokens).

Precision rule (shared with the Triton kernels): arithmetic runs in fp32 (fp64 when any
input is fp64); outputs are stored in the stream dtype; gradients come back in each
input's own dtype. The stream ops are ``torch.autograd.Function`` s with hand-written
backward formulas so that only the inputs, in their own dtype, are kept for backward (an
autograd graph through ``x.float()`` would keep an fp32 copy of the streams). Both
functions contain only plain torch ops, so ``torch.compile`` traces them whole.
"""

from __future__ import annotations

import torch

from .._dtypes import compute_dtype
from ..projections.sinkhorn import sinkhorn

__all__ = [
    "stream_pre", "stream_merge", "sinkhorn_tokens", "rms_projection",
    "stream_pre_backward", "stream_merge_backward", "compute_dtype",
]




def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` that skips the call when the dtype already matches: under
    torch.compile, torch 2.11 computed wrong gradients for an autograd.Function whose
    forward returned ``out.to(out.dtype)`` (a no-op alias); 2.13 does not."""
    return t if t.dtype == dtype else t.to(dtype)


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reduce a per-token coefficient gradient to a shared coefficient's shape."""
    if grad.shape != like.shape:
        grad = grad.reshape(-1, *like.shape).sum(0)
    return grad.to(like.dtype)


# ---------------------------------------------------------------------- stream_pre
def stream_pre_backward(x, h_pre, grad_out):
    """(dx, dh_pre) of ``out = Σ_j h_pre[j] x[j]`` given ``grad_out`` (..., C)."""
    acc = compute_dtype(x, h_pre, grad_out)
    g = grad_out.to(acc)
    h = h_pre.to(acc)
    dx = h.unsqueeze(-1) * g.unsqueeze(-2)                             # (..., n, C)
    dh = (x.to(acc) @ g.unsqueeze(-1)).squeeze(-1)                     # (..., n)
    return dx.to(x.dtype), _sum_to(dh, h_pre)


class _StreamPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre):
        acc = compute_dtype(x, h_pre)
        out = (h_pre.to(acc).unsqueeze(-2) @ x.to(acc)).squeeze(-2)     # (..., C)
        ctx.save_for_backward(x, h_pre)
        return _cast(out, x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, h_pre = ctx.saved_tensors
        return stream_pre_backward(x, h_pre, grad_out)


def stream_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """``Σ_j h_pre[j] x[j]``: x (..., n, C), h_pre (..., n) or (n,) → (..., C) in x.dtype."""
    return _StreamPre.apply(x, h_pre)


# ---------------------------------------------------------------------- stream_merge
def stream_merge_backward(x, h_res, h_post, y, grad_out):
    """(dx, dh_res, dh_post, dy) of ``out = h_res @ x + h_post[:, None] * y[None, :]``."""
    acc = compute_dtype(x, h_res, h_post, y, grad_out)
    g = grad_out.to(acc)                                               # (..., n, C)
    hr, hp = h_res.to(acc), h_post.to(acc)
    dx = hr.mT @ g                                                     # Σ_i h_res[i,j] g[i]
    dy = (hp.unsqueeze(-2) @ g).squeeze(-2)                            # Σ_i h_post[i] g[i]
    dh_res = g @ x.to(acc).mT                                          # ⟨g[i], x[j]⟩
    dh_post = (g @ y.to(acc).unsqueeze(-1)).squeeze(-1)                # ⟨g[i], y⟩
    return dx.to(x.dtype), _sum_to(dh_res, h_res), _sum_to(dh_post, h_post), dy.to(y.dtype)


class _StreamMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_res, h_post, y):
        acc = compute_dtype(x, h_res, h_post, y)
        out = h_res.to(acc) @ x.to(acc) + h_post.to(acc).unsqueeze(-1) * y.to(acc).unsqueeze(-2)
        ctx.save_for_backward(x, h_res, h_post, y)
        return _cast(out, x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        return stream_merge_backward(*ctx.saved_tensors, grad_out)


def stream_merge(x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
    """``h_res @ x + h_post[:, None] * y[None, :]`` per token → (..., n, C) in x.dtype.

    x (..., n, C); h_res (..., n, n) or (n, n); h_post (..., n) or (n,); y (..., C).
    """
    return _StreamMerge.apply(x, h_res, h_post, y)


# ---------------------------------------------------------------------- sinkhorn
def sinkhorn_tokens(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Per-token log-domain Sinkhorn (columns then rows, rows last) on (..., n, n).

    Exactly :func:`hyperconn.projections.sinkhorn` with ``backward="unrolled"``: autograd
    through the iterations, so backward memory grows with ``iters`` (the Triton kernel
    recomputes instead).
    """
    return sinkhorn(logits, iters, backward="unrolled")


# ---------------------------------------------------------------------- rms projection
def rms_projection(x: torch.Tensor, phi: torch.Tensor, eps: float) -> torch.Tensor:
    """``(vec(x) φ) · rsqrt(mean(x²) + ε)`` by plain autograd: (..., n, C), (n·C, N) → (..., N),
    computed in :func:`compute_dtype` of the inputs."""
    acc = compute_dtype(x, phi)
    flat = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1]).to(acc)
    inv_rms = torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    return (flat @ phi.to(acc)) * inv_rms
