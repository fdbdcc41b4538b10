"""Torch ops with hand-written backward for the CPU path of :class:`HyperConnection`.

Autograd through plain torch ops makes several full passes over the (..., n, C) stream
tensor in backward: a fresh tensor per partial derivative, often a *view* (from the
reshapes around a GEMM), which the autograd engine then cannot accumulate into in place,
so it allocates a third tensor for the sum. On the CPU each such pass costs about as much
as a small GEMM. These three functions take the streams in their own shape, flatten
inside (no view in the graph), and return each stream gradient as a fresh contiguous
tensor of the streams' shape, which the engine accumulates in place:

    stream_pre(x, h_pre)                 (..., n, C), (..., n)                    → (..., C)
    rms_projection(x, phi, eps)          (..., n, C), (n·C, N)                    → (..., N)
        = (vec(x) φ) · rsqrt(mean(x²) + ε)
    merge_streams(x, h_res, h_post, y)   (..., n, C), (..., n, n), (..., n), (..., C) → (..., n, C)

On fp32/fp64 CPU tensors the per-token contractions and the projection run the native kernels of
:mod:`.cpu_native` (one pass over a token's rows; see :func:`_native` for when), with the
torch ops below as fallback and reference; so do the per-token Sinkhorn
(:func:`sinkhorn_tokens`) and Iso-NS's Newton-Schulz steps (:func:`odd_polynomial_iteration`).

Every operand must already be in the streams' dtype (the caller casts); an ambient
autocast is switched off inside, so forward and backward agree. Only the inputs (and,
for the projection, its (…, N) output or product and the per-token scale) are kept for
backward.
Checked against autograd and with ``torch.autograd.gradcheck`` in float64
(tests/test_torch_fused.py).
"""

from __future__ import annotations

import torch

from . import cpu_native, grad_slot
from .grad_slot import StreamGradSlot

__all__ = ["stream_pre", "rms_projection", "merge_streams", "sinkhorn_tokens", "odd_polynomial_iteration",
           "StreamGradSlot"]


def _native(x: torch.Tensor) -> bool:
    """Whether this call runs the native kernels of :mod:`.cpu_native` (fp32/fp64 CPU
    tensors, outside a ``torch.compile`` trace, the library built on this machine);
    otherwise the torch ops below, which are also the reference the kernels are tested
    against (tests/test_cpu_native.py)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and cpu_native.available())


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(..., n, C) → (M, n, C) without recording a view in the autograd graph."""
    return x.reshape(-1, *x.shape[-2:])


class _StreamPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre, slot):
        ctx.slot = slot
        ctx.save_for_backward(x, h_pre)
        n = x.shape[-2]
        if _native(x):
            u = cpu_native.pre_fwd(_tokens(x).contiguous(), h_pre.reshape(-1, n).contiguous())
        else:
            with _no_autocast(x):
                u = torch.bmm(h_pre.reshape(-1, 1, n), _tokens(x))                # (M, 1, C)
        return u.view(*x.shape[:-2], x.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, h_pre = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_x = grad_h = None
        if _native(x) and not torch.is_grad_enabled():
            # One pass: h ⊗ g into the merge's ∂x (or a fresh one) and ⟨x[j], g⟩.
            n, C = x.shape[-2:]
            pending = grad_slot.pending(ctx.slot) if ctx.needs_input_grad[0] else None
            target = pending if pending is not None else (
                torch.empty_like(x, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None)
            grad_h = cpu_native.pre_bwd(_tokens(x).contiguous(), h_pre.reshape(-1, n).contiguous(),
                                        grad.reshape(-1, C).contiguous(),
                                        None if target is None else target.view(-1, n, C),
                                        pending is not None, ctx.needs_input_grad[1])
            if grad_h is not None:
                grad_h = grad_h.view(h_pre.shape)
            return (target if pending is None else None), grad_h, None
        if ctx.needs_input_grad[0]:
            pending = grad_slot.pending(ctx.slot)
            if pending is not None:
                pending.addcmul_(h_pre.unsqueeze(-1), grad.unsqueeze(-2))            # into the merge's ∂x
            else:
                grad_x = torch.mul(h_pre.unsqueeze(-1), grad.unsqueeze(-2))        # fresh (..., n, C)
        if ctx.needs_input_grad[1]:
            # bmm, not vecdot: vecdot materialises the (M, n, C) product first (in a whole
            # layer step that cost ~5 ms against ~3 ms; a micro-benchmark that reused the
            # freed buffer had shown the opposite).
            grad_h = torch.bmm(_tokens(x), grad.reshape(-1, x.shape[-1], 1)).view(h_pre.shape)
        return grad_x, grad_h, None


def stream_pre(x: torch.Tensor, h_pre: torch.Tensor, slot: StreamGradSlot | None = None) -> torch.Tensor:
    """``Σ_j h_pre[j] x[j]`` per token: x (..., n, C), h_pre (..., n) → (..., C)."""
    if h_pre.shape != x.shape[:-1]:
        raise ValueError(f"h_pre: expected shape {tuple(x.shape[:-1])}, got {tuple(h_pre.shape)}")
    return _StreamPre.apply(x, h_pre, slot)


class _RMSProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi, eps, slot):
        ctx.slot, ctx.eps = slot, eps
        flat = x.reshape(-1, phi.shape[0])                                          # (M, K)
        ctx.native = _native(x)
        if ctx.native:
            # GEMM and Σx² from one read of the streams; keeps out = proj·r and r.
            out, inv_rms = cpu_native.proj_fwd(flat.contiguous(), phi.contiguous(), eps)
            ctx.save_for_backward(x, phi, out, inv_rms)
            return out.view(*x.shape[:-2], phi.shape[-1])
        with _no_autocast(x):
            proj = flat @ phi                                                       # (M, N)
            # vector_norm: Σ x² in one pass with no (M, K) temporary (measured 2.5×
            # faster than linalg.vecdot(flat, flat) on CPU).
            mean_sq = torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square() / flat.shape[-1]
            inv_rms = torch.rsqrt(mean_sq + eps)                                    # (M, 1)
        ctx.save_for_backward(x, phi, proj, inv_rms)
        return (proj * inv_rms).view(*x.shape[:-2], phi.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, phi, proj, inv_rms = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _RMSProjection._differentiable_backward(ctx, x, phi, grad)
        if ctx.native:
            return _RMSProjection._native_backward(ctx, x, phi, proj, inv_rms, grad)
        K = phi.shape[0]
        flat = x.reshape(-1, K)
        grad = grad.reshape(proj.shape).to(proj.dtype)
        grad_proj = grad * inv_rms                                                   # (M, N)
        # A contiguous φᵀ (K·N values, negligible) makes the K-wide GEMMs below ~15 % faster
        # on CPU, and (gᵀ x)ᵀ beats xᵀ g for ∂φ by ~40 % (both measured here).
        phi_t = phi.t().contiguous()
        grad_x = grad_phi = None
        if ctx.needs_input_grad[0]:
            # out = proj·r, r = (mean(x²) + ε)^(-1/2): ∂r/∂x = −r³·x/K, so the RMS part of
            # ∂x is x · (−r³/K · Σ_j grad_j proj_j), one scale per token.
            row_scale = (grad * proj).sum(-1, keepdim=True) * inv_rms.pow(3) * (-1.0 / K)
            pending = grad_slot.pending(ctx.slot)
            if pending is not None:
                grad_x, ctx.slot.grad = pending, None                                # the layer's ∂x so far
                g2 = grad_x.view(-1, K)
                g2.addmm_(grad_proj, phi_t)
            else:
                grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
                g2 = grad_x.view(-1, K)
                torch.mm(grad_proj, phi_t, out=g2)
            g2.addcmul_(flat, row_scale)                                             # one in-place pass
        if ctx.needs_input_grad[1]:
            grad_phi = (grad_proj.t() @ flat).t()
        return grad_x, grad_phi, None, None

    @staticmethod
    def _differentiable_backward(ctx, x, phi, grad):
        """create_graph=True: the forward again in differentiable torch ops, and its
        gradient with a graph, so that double backward is exact (the saved product and
        scale are not connected to x)."""
        wanted = [t for t, need in zip((x, phi), ctx.needs_input_grad[:2]) if need]
        if not wanted:
            return None, None, None, None
        with _no_autocast(x):
            flat = x.reshape(-1, phi.shape[0])
            out = (flat @ phi) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + ctx.eps)
        grads = iter(torch.autograd.grad(out, wanted, grad.reshape(out.shape).to(out.dtype), create_graph=True))
        return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:2]) + (None, None)

    @staticmethod
    def _native_backward(ctx, x, phi, out, inv_rms, grad):
        """∂x (into the layer's pending ∂x when there is one) and ∂φ from one read of x;
        ``out`` and ``inv_rms`` are the forward's outputs (out = proj·r) and scale."""
        K = phi.shape[0]
        grad_x = None
        accumulate = False
        if ctx.needs_input_grad[0]:
            pending = grad_slot.pending(ctx.slot)
            if pending is not None:
                grad_x, ctx.slot.grad, accumulate = pending, None, True
            else:
                grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        grad_phi = cpu_native.proj_bwd(
            x.reshape(-1, K).contiguous(), phi.contiguous(), grad.reshape(out.shape).to(x.dtype).contiguous(),
            out, inv_rms, None if grad_x is None else grad_x.view(-1, K), accumulate, ctx.needs_input_grad[1])
        return grad_x, grad_phi, None, None


def rms_projection(x: torch.Tensor, phi: torch.Tensor, eps: float,
                   slot: StreamGradSlot | None = None) -> torch.Tensor:
    """``(vec(x) @ phi) * rsqrt(mean(x², over n·C) + eps)``: x (..., n, C), phi (n·C, N) → (..., N).

    The RMS scale is applied after the GEMM (a per-token scalar). With the native kernels
    the GEMM and the sum of squares come from one read of the streams, and backward writes
    ∂x (RMS term included, added into the layer's pending ∂x) and ∂φ from one more; on the
    torch path the streams are read twice forward and backward is a GEMM into ∂x, one
    in-place ``addcmul_`` and the ∂φ GEMM. Double backward (``create_graph=True``) is exact
    on both paths: it differentiates a recomputed forward.

    Raises:
        ValueError: if ``phi`` is not (n·C, N) for x's last two dimensions.
    """
    if x.dim() < 2 or phi.dim() != 2 or x.shape[-2] * x.shape[-1] != phi.shape[0]:
        raise ValueError(f"phi: expected shape ({x.shape[-2] * x.shape[-1] if x.dim() >= 2 else 'n·C'}, N), "
                         f"got {tuple(phi.shape)}")
    return _RMSProjection.apply(x, phi, float(eps), slot)


class _MergeStreams(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_res, h_post, y, slot):
        ctx.slot = slot
        ctx.save_for_backward(x, h_res, h_post, y)
        n, C = x.shape[-2:]
        if _native(x):
            out = cpu_native.merge_fwd(_tokens(x).contiguous(), h_res.reshape(-1, n, n).contiguous(),
                                       h_post.reshape(-1, n).contiguous(), y.reshape(-1, C).contiguous())
            return out.view(x.shape)
        # bmm then one in-place addcmul_: the output is written once and updated once,
        # with no materialised (M, n, C) copy of h_post ⊗ y.
        with _no_autocast(x):
            out = torch.bmm(h_res.reshape(-1, n, n), _tokens(x))
            out.addcmul_(h_post.reshape(-1, n, 1), y.reshape(-1, 1, C))
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, h_res, h_post, y = ctx.saved_tensors
        n, C = x.shape[-2:]
        g = _tokens(grad.to(x.dtype).contiguous())                                   # (M, n, C)
        needs = ctx.needs_input_grad
        grad_x = grad_res = grad_post = grad_y = None
        if _native(x) and not torch.is_grad_enabled():
            # All four gradients in one pass over the token's rows.
            if needs[0]:
                grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
            grad_res, grad_post, grad_y = cpu_native.merge_bwd(
                g, _tokens(x).contiguous(), h_res.reshape(-1, n, n).contiguous(), h_post.reshape(-1, n).contiguous(),
                y.reshape(-1, C).contiguous(), None if grad_x is None else grad_x.view(-1, n, C), needs[1:4])
            if grad_x is not None and grad_slot.deferring(ctx.slot):
                grad_slot.defer(ctx.slot, grad_x)
                grad_x = None
            return (grad_x, None if grad_res is None else grad_res.view(h_res.shape),
                    None if grad_post is None else grad_post.view(h_post.shape),
                    None if grad_y is None else grad_y.view(y.shape), None)
        if needs[0]:                                                                 # Σ_i h[i,j] g[i]
            h_t = h_res.reshape(-1, n, n).mT.contiguous()  # (M, n, n): tiny; bmm prefers it
            if torch.is_grad_enabled():  # create_graph=True: differentiable, no out=
                grad_x = torch.bmm(h_t, g).view(x.shape)
            else:
                grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
                torch.bmm(h_t, g, out=grad_x.view(-1, n, C))
            if grad_slot.deferring(ctx.slot):                     # stream_pre and rms_projection add theirs
                grad_slot.defer(ctx.slot, grad_x)
                grad_x = None
        if needs[1]:                                                                 # ⟨g[i], x[j]⟩
            grad_res = torch.bmm(g, _tokens(x).mT).view(h_res.shape)
        if needs[2]:                                                                 # ⟨g[i], y⟩
            grad_post = torch.bmm(g, y.reshape(-1, C, 1)).view(h_post.shape)
        if needs[3]:                                                                 # Σ_i h[i] g[i]
            grad_y = torch.bmm(h_post.reshape(-1, 1, n), g).view(y.shape)
        return grad_x, grad_res, grad_post, grad_y, None


def merge_streams(x: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor,
                  y: torch.Tensor, slot: StreamGradSlot | None = None) -> torch.Tensor:
    """``h_res @ x + h_post ⊗ y`` per token, all operands in one dtype:
    x (..., n, C), h_res (..., n, n), h_post (..., n), y (..., C) → (..., n, C)."""
    lead, (n, C) = tuple(x.shape[:-2]), tuple(x.shape[-2:])
    if tuple(h_res.shape) != lead + (n, n) or tuple(h_post.shape) != lead + (n,) \
            or tuple(y.shape) != lead + (C,):
        raise ValueError(f"merge_streams: expected h_res {lead + (n, n)}, h_post {lead + (n,)}, y {lead + (C,)}; "
                         f"got {tuple(h_res.shape)}, {tuple(h_post.shape)}, {tuple(y.shape)}")
    return _MergeStreams.apply(x, h_res, h_post, y, slot)


class _NativeSinkhorn(torch.autograd.Function):
    """Per-token Sinkhorn in the native kernels: only the logits are kept; backward
    recomputes the iterates per token. Double backward (``create_graph=True``) goes
    through the torch reference instead, which is differentiable."""

    @staticmethod
    def forward(ctx, logits, iters):
        ctx.iters = iters
        ctx.save_for_backward(logits)
        return cpu_native.sinkhorn_fwd(logits.reshape(-1, *logits.shape[-2:]).contiguous(), iters).view(logits.shape)

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            from ..projections import sinkhorn
            # The saved logits are the input itself here, so dz stays connected to it.
            (dz,) = torch.autograd.grad(sinkhorn(logits, ctx.iters, "unrolled"), logits, grad, create_graph=True)
            return dz, None
        n = logits.shape[-1]
        g = grad.to(logits.dtype).reshape(-1, n, n).contiguous()
        return cpu_native.sinkhorn_bwd(logits.reshape(-1, n, n).contiguous(), g, ctx.iters).view(logits.shape), None


def sinkhorn_tokens(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Per-token log-domain Sinkhorn (columns then rows, ``iters`` rounds) of (..., n, n)
    fp32/fp64 logits with the unrolled map's exact gradient: the native kernels when
    available (:func:`_native`), else :func:`hyperconn.projections.sinkhorn`."""
    if logits.numel() and _native(logits):
        return _NativeSinkhorn.apply(logits, int(iters))
    from ..projections import sinkhorn
    return sinkhorn(logits, iters, backward="unrolled")


class _NativeOddPolynomial(torch.autograd.Function):
    """Iso-NS's Newton-Schulz steps in the native kernels: only X0 is kept, backward
    recomputes the iterates per token. Double backward goes through the torch op."""

    @staticmethod
    def forward(ctx, x0, schedule):
        ctx.schedule = schedule
        ctx.save_for_backward(x0)
        m = x0.shape[-1]
        return cpu_native.poly_fwd(x0.reshape(-1, m, m).contiguous(), schedule).view(x0.shape)

    @staticmethod
    def backward(ctx, grad):
        (x0,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            from .newton_schulz import _OddPolynomialIteration
            (dx,) = torch.autograd.grad(_OddPolynomialIteration.apply(x0, ctx.schedule), x0, grad, create_graph=True)
            return dx, None
        m = x0.shape[-1]
        g = grad.to(x0.dtype).reshape(-1, m, m).contiguous()
        return cpu_native.poly_bwd(x0.reshape(-1, m, m).contiguous(), ctx.schedule, g).view(x0.shape), None


def odd_polynomial_iteration(x0: torch.Tensor, schedule: tuple):
    """The native Newton-Schulz steps for fp32/fp64 CPU blocks (..., m, m), or None when
    the native kernels do not apply (the caller then runs the torch op)."""
    if x0.numel() and _native(x0):
        return _NativeOddPolynomial.apply(x0, tuple(schedule))
    return None
