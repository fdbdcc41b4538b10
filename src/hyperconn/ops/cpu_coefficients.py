"""A dynamic layer's whole coefficient path as one autograd node on the CPU.

The CPU twin of :mod:`.triton_coefficients`, for the variants whose maps it knows
(``Variant.fused_maps``): ``("sinkhorn", iters)`` (mhc: σ and 2σ gates, the unrolled
Sinkhorn) and ``("linear", 0)`` (hc: tanh activation, identity maps). Unfused, the layer
runs the projection, then about a dozen small ops on the (tokens, n² + 2n) coefficients
(slices, α scales, biases, gates, the Sinkhorn), each an autograd node: at the CPU
benchmark's model size (1024 tokens, n = 4, C = 128) their dispatch cost more than their
arithmetic. Here the native projection, the elementwise part (``cpu_native.gates_fwd``:
b + α·act and the gates; ``gates_bwd`` with the ∂b, ∂α sums), the native Sinkhorn and,
with ``read``, the branch input ``H_pre x`` are one node, and its backward writes ∂x once:
the merge's ∂x from the layer's :class:`~.grad_slot.StreamGradSlot`, ``H_pre x``'s part
added by the native pre backward, the projection's added by the native projection backward.

The same kernels as the unfused path and the same elementwise formulas (evaluated in
C++ rather than by torch's vectorised ops), so the two agree to rounding; under
``create_graph=True`` the backward
differentiates a plain-op recomputation, so double backward is exact.
tests/test_cpu_coefficients.py checks both against the unfused layer and by gradcheck.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from . import cpu_native, grad_slot
from .grad_slot import StreamGradSlot

__all__ = ["fused_coefficients", "FUSE_COEFFICIENTS", "KINDS"]

#: Off: the layer runs the projection and the variant's maps as separate ops (A/B runs:
#: ``benchmarks/bench_cpu_ops.py --unfused``).
FUSE_COEFFICIENTS = True
KINDS = ("sinkhorn", "linear")


def fused_coefficients(x: torch.Tensor, phi: torch.Tensor, eps: float, b_pre: torch.Tensor, b_post: torch.Tensor,
                       b_res: torch.Tensor, alpha: torch.Tensor, cdtype: torch.dtype, maps: tuple,
                       read: bool = False, slot: Optional[StreamGradSlot] = None):
    """(H_pre (..., n), H_post (..., n), H_res (..., n, n), H_pre x (..., C) or None) of a
    dynamic layer from its streams x (..., n, C), φ (n·C, n² + 2n), static logits
    b_pre (n,), b_post (n,), b_res (n, n) and α (3,); or None where this op does not apply
    (then the layer runs the separate ops): maps other than :data:`KINDS`, streams that
    are not float32/float64 CPU tensors in ``cdtype``, no native kernels, inside a
    ``torch.compile`` trace or a ``torch.func`` transform, or :data:`FUSE_COEFFICIENTS` off.

    ``slot``: the layer's slot (with ``read``: the op's backward adds the merge's ∂x)."""
    kind = maps[0]
    if (not FUSE_COEFFICIENTS or kind not in KINDS or x.device.type != "cpu" or x.dtype != cdtype
            or x.dtype not in (torch.float32, torch.float64) or x.numel() == 0 or x.dim() < 2
            or torch.compiler.is_compiling() or is_functorch_wrapped_tensor(x) or not cpu_native.available()):
        return None
    n, C = x.shape[-2:]
    if tuple(phi.shape) != (n * C, n * n + 2 * n) or tuple(b_res.shape) != (n, n):
        return None
    iters = int(maps[1]) if kind == "sinkhorn" else 0
    h_pre, h_post, h_res, u = _FusedCoefficients.apply(
        x, phi.to(cdtype), b_pre.to(cdtype), b_post.to(cdtype), b_res.to(cdtype), alpha.to(cdtype), float(eps),
        kind, iters, bool(read), slot)
    lead = x.shape[:-2]
    return (h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n),
            u.view(*lead, C) if read else None)


class _FusedCoefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi, b_pre, b_post, b_res, alpha, eps, kind, iters, read, slot):
        n, C = x.shape[-2:]
        xt = x.reshape(-1, n, C).contiguous()                                        # (M, n, C)
        M = xt.shape[0]
        out, inv = cpu_native.proj_fwd(xt.view(M, n * C), phi.contiguous(), eps)    # (M, N) = (x φ)·r
        alpha = alpha.contiguous()
        # act = out (mhc) or tanh(out) (hc); b + α·act per column; the gates (native, one call).
        act, h_pre, h_post, z = cpu_native.gates_fwd(out, alpha, torch.cat([b_pre, b_post, b_res.reshape(-1)]),
                                                     n, kind)
        if kind == "sinkhorn":
            act, h_res = out, cpu_native.sinkhorn_fwd(z, iters)
        else:
            h_res, z = z, None
        u = cpu_native.pre_fwd(xt, h_pre) if read else None
        ctx.kind, ctx.iters, ctx.read, ctx.slot, ctx.eps = kind, iters, read, slot, eps
        ctx.save_for_backward(x, phi, b_pre, b_post, b_res, alpha, out, inv, act, h_pre, h_post, z)
        return h_pre, h_post, h_res, u

    @staticmethod
    def backward(ctx, g_pre, g_post, g_res, g_u):
        x, phi, _, _, _, alpha, out, inv, act, h_pre, h_post, z = ctx.saved_tensors
        needs = ctx.needs_input_grad                     # x, φ, b_pre, b_post, b_res, α, …
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, (g_pre, g_post, g_res, g_u))
        n, C = x.shape[-2:]
        xt = x.reshape(-1, n, C).contiguous()
        M, dt = xt.shape[0], x.dtype
        # ∂x: the merge's (left in the slot) + H_pre x's + the projection's, in one buffer.
        pending = grad_slot.pending(ctx.slot) if needs[0] else None
        gx = pending if pending is not None else (torch.empty(M, n, C, dtype=dt) if needs[0] else None)
        accumulate = pending is not None
        g_pre = torch.zeros(M, n, dtype=dt) if g_pre is None else g_pre.reshape(M, n).to(dt).contiguous()
        if ctx.read and g_u is not None:
            # ⟨x[j], g_u⟩ joins ∂H_pre; H_pre ⊗ g_u goes into ∂x (written, or added).
            g_pre = g_pre + cpu_native.pre_bwd(xt, h_pre, g_u.reshape(M, C).to(dt).contiguous(),
                                               None if gx is None else gx.view(M, n, C), accumulate, True)
            accumulate = gx is not None
        g_post = torch.zeros(M, n, dtype=dt) if g_post is None else g_post.reshape(M, n).to(dt).contiguous()
        g_res = torch.zeros(M, n, n, dtype=dt) if g_res is None else g_res.reshape(M, n, n).to(dt).contiguous()
        d_res = cpu_native.sinkhorn_bwd(z, g_res, ctx.iters) if ctx.kind == "sinkhorn" else g_res
        # ∂(b + α·act) through the gates, and on to the projection's output; ∂b and ∂α summed.
        grad_out, grad_b, grad_alpha = cpu_native.gates_bwd(g_pre, g_post, d_res, h_pre, h_post, act, alpha,
                                                            ctx.kind)
        grad_phi = None
        if needs[0] or needs[1]:
            grad_phi = cpu_native.proj_bwd(xt.view(M, n * C), phi.contiguous(), grad_out, out, inv,
                                           None if gx is None else gx.view(M, n * C), accumulate, needs[1])
        if pending is not None:
            ctx.slot.grad = None                                                       # taken: returned below
        grad_x = None if gx is None else gx.view(x.shape)
        return (grad_x, grad_phi, grad_b[:n], grad_b[n:2 * n], grad_b[2 * n:].view(n, n), grad_alpha,
                None, None, None, None, None)


def reference(x, phi, b_pre, b_post, b_res, alpha, eps: float, kind: str, iters: int, read: bool):
    """The same four outputs in plain differentiable torch ops (what the fused op is
    checked against, and what its backward differentiates under ``create_graph=True``)."""
    from ..projections import sinkhorn
    n, C = x.shape[-2:]
    flat = x.reshape(*x.shape[:-2], n * C)
    out = (flat @ phi) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    act = torch.tanh(out) if kind == "linear" else out
    raw_pre = b_pre + alpha[0] * act[..., :n]
    raw_post = b_post + alpha[1] * act[..., n:2 * n]
    raw_res = b_res + alpha[2] * act[..., 2 * n:].unflatten(-1, (n, n))
    if kind == "sinkhorn":
        h_pre, h_post = torch.sigmoid(raw_pre), 2.0 * torch.sigmoid(raw_post)
        h_res = sinkhorn(raw_res, iters, "unrolled")
    else:
        h_pre, h_post, h_res = raw_pre, raw_post, raw_res
    u = (h_pre.unsqueeze(-1) * x).sum(-2) if read else None
    return h_pre, h_post, h_res, u


def _differentiable_backward(ctx, grads):
    """create_graph=True: the forward again in plain ops, and its gradient with a graph
    (the saved x and parameters are the inputs themselves, so it stays connected)."""
    inputs = ctx.saved_tensors[:6]                       # x, φ, b_pre, b_post, b_res, α
    needs = ctx.needs_input_grad[:6]
    wanted = [t for t, need in zip(inputs, needs) if need]
    result = [None] * 11
    if not wanted:
        return tuple(result)
    outs = reference(*inputs, ctx.eps, ctx.kind, ctx.iters, ctx.read)
    pairs = [(o, g.reshape(o.shape).to(o.dtype)) for o, g in zip(outs, grads) if o is not None and g is not None]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                   create_graph=True, allow_unused=True))
    for i, need in enumerate(needs):
        if need:
            result[i] = next(got)
    return tuple(result)
