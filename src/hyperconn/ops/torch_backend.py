"""The ``"torch"`` backend: what the layer runs whenever Triton is not selected.

Rules (one place, so the public ops and the layer run the same arithmetic):

- fp32 / fp64 streams: the hand-written ops of :mod:`.cpu` (∂x written once, optionally
  into a layer's shared :class:`~.grad_slot.StreamGradSlot`);
- fp16 / bf16 streams: the :mod:`.reference` ops (fp32 coefficients, fp32 accumulation,
  output in the stream dtype: rounding H_res to bf16 would break its row sums by ~1e-3);
- the RMS-scaled coefficient projection: on CUDA, plain ops (autocast and
  ``torch.compile`` see them whole); elsewhere :func:`.cpu.rms_projection`;
- hc's and mhc's whole coefficient path (projection, gates, Sinkhorn, ``H_pre x``) on
  fp32/fp64 CPU streams: one node, :func:`.cpu_coefficients.fused_coefficients`.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import cpu, reference
from .cpu_coefficients import fused_coefficients
from .grad_slot import StreamGradSlot

__all__ = ["stream_pre", "stream_merge", "rms_projection", "sinkhorn_tokens", "grad_slot", "fused_coefficients",
           "NAME"]

NAME = "torch"
_HALF = (torch.float16, torch.bfloat16)


def plain_rms_projection(x: torch.Tensor, phi: torch.Tensor, eps: float, cdtype: torch.dtype) -> torch.Tensor:
    """The projection in plain ops (autocast and ``torch.compile`` see them whole): the GPU
    path of this backend and of the Triton one. Half-precision streams go into the GEMM as
    they are (fp32 accumulation, no fp32 copy of x); anything else is computed in ``cdtype``."""
    flat = (x if x.dtype in _HALF else x.to(cdtype)).reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
    proj = (flat @ phi.to(flat.dtype)).to(cdtype)
    mean_sq = torch.linalg.vector_norm(flat, dim=-1, keepdim=True, dtype=cdtype).square() / flat.shape[-1]
    return proj * torch.rsqrt(mean_sq + eps)


def grad_slot(x: torch.Tensor, cdtype: torch.dtype) -> Optional[StreamGradSlot]:
    """A slot for one dynamic layer call (see :mod:`.grad_slot`): fp32 streams and fp32
    coefficients, the dtypes of the hand-written ops that share it; else None."""
    return StreamGradSlot() if x.dtype == torch.float32 and cdtype == torch.float32 else None


def rms_projection(x: torch.Tensor, phi: torch.Tensor, eps: float, cdtype: torch.dtype,
                   slot: Optional[StreamGradSlot] = None) -> torch.Tensor:
    """``(vec(x) φ) · rsqrt(mean(x²) + ε)``: (..., n, C), (n·C, N) → (..., N) in ``cdtype``:
    :func:`plain_rms_projection` on CUDA, the hand-written CPU op (∂x written once) elsewhere."""
    if x.is_cuda:
        return plain_rms_projection(x, phi, eps, cdtype)
    xc = x if x.dtype in _HALF else x.to(cdtype)
    return cpu.rms_projection(xc, phi.to(xc.dtype), eps, slot).to(cdtype)


def stream_pre(x: torch.Tensor, h_pre: torch.Tensor, slot: Optional[StreamGradSlot] = None) -> torch.Tensor:
    """``Σ_j h_pre[j] x[j]``: (..., n, C), (..., n) | (n,) → (..., C) in ``x.dtype``."""
    if x.dtype in _HALF:
        return reference.stream_pre(x, h_pre)
    return cpu.stream_pre(x, h_pre.to(x.dtype).expand(x.shape[:-1]), slot)


def stream_merge(x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor, y: torch.Tensor,
                 slot: Optional[StreamGradSlot] = None) -> torch.Tensor:
    """``H_res x + H_postᵀ y``: (..., n, C), (..., n, n) | (n, n), (..., n) | (n,), (..., C)
    → (..., n, C) in ``x.dtype``."""
    if x.dtype in _HALF:
        return reference.stream_merge(x, h_res, h_post, y)
    n = x.shape[-2]
    lead = x.shape[:-2]
    # Tokens flattened, one bmm + in-place addcmul_ forward and four bmm backward: no
    # (..., n, C) temporaries beyond the output and ∂x.
    return cpu.merge_streams(x, h_res.to(x.dtype).expand(*lead, n, n), h_post.to(x.dtype).expand(*lead, n),
                             y.to(x.dtype), slot)


def sinkhorn_tokens(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Per-token log-domain Sinkhorn with the unrolled map's gradient: the native CPU
    kernel for fp32/fp64 CPU logits (:func:`.cpu.sinkhorn_tokens`), else the reference."""
    if logits.dtype in (torch.float32, torch.float64) and logits.device.type == "cpu":
        return cpu.sinkhorn_tokens(logits, iters)
    return reference.sinkhorn_tokens(logits, iters)
