"""A dynamic layer's whole coefficient path as one autograd node on the CPU.

The CPU twin of :mod:`.triton_coefficients`, for the variants whose maps it knows
(``Variant.fused_maps``): ``("sinkhorn", iters)`` (mhc: σ and 2σ gates, the unrolled
Sinkhorn) and ``("linear", 0)`` (hc: tanh activation, identity maps). Unfused, the layer
runs the projection, then about a dozen small ops on the (tokens, n² + 2n) coefficients
(slices, α scales, biases, gates, the Sinkhorn), each an autograd node: at the CPU
benchmark's model size (1024 tokens, n = 4, C = 128) their dispatch cost more than their
arithmetic. Here the native projection, the elementwise part in a few ungraphed ops, the
native Sinkhorn and, with ``read``, the branch input ``H_pre x`` are one node, and its
backward writes ∂x once: the merge's ∂x from the layer's
:class:`~.grad_slot.StreamGradSlot`, ``H_pre x``'s part added by the native pre backward,
the projection's added by the native projection backward.

Same arithmetic as the unfused path (the same kernels, the same order of the elementwise
operations), so the two agree to rounding; under ``create_graph=True`` the backward
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


def _alpha_per_column(alpha: torch.Tensor, n: int) -> torch.Tensor:
    """α (3,) → (n² + 2n,): α_pre on the n pre columns, α_post on the post ones, α_res on the rest."""
    return torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])


class _FusedCoefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi, b_pre, b_post, b_res, alpha, eps, kind, iters, read, slot):
        n, C = x.shape[-2:]
        xt = x.reshape(-1, n, C).contiguous()                                        # (M, n, C)
        M = xt.shape[0]
        out, inv = cpu_native.proj_fwd(xt.view(M, n * C), phi.contiguous(), eps)    # (M, N) = (x φ)·r
        act = torch.tanh(out) if kind == "linear" else out
        # b + α·act per column, as the unfused path's three `b + a * p[...]`.
        scale = _alpha_per_column(alpha, n)
        raw = act * scale + torch.cat([b_pre, b_post, b_res.reshape(-1)])
        if kind == "sinkhorn":
            gates = torch.sigmoid(raw[:, :2 * n])
            h_pre = gates[:, :n].contiguous()
            h_post = 2.0 * gates[:, n:]
            z = raw[:, 2 * n:].reshape(M, n, n).contiguous()
            h_res = cpu_native.sinkhorn_fwd(z, iters)
        else:
            h_pre, h_post = raw[:, :n].contiguous(), raw[:, n:2 * n].contiguous()
            z = None
            h_res = raw[:, 2 * n:].reshape(M, n, n).contiguous()
        u = cpu_native.pre_fwd(xt, h_pre) if read else None
        ctx.kind, ctx.iters, ctx.read, ctx.slot, ctx.eps = kind, iters, read, slot, eps
        ctx.save_for_backward(x, phi, b_pre, b_post, b_res, alpha, out, inv, act, h_pre, h_post, z, scale)
        return h_pre, h_post, h_res, u

    @staticmethod
    def backward(ctx, g_pre, g_post, g_res, g_u):
        x, phi, _, _, _, _, out, inv, act, h_pre, h_post, z, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad                     # x, φ, b_pre, b_post, b_res, α, …
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, (g_pre, g_post, g_res, g_u))
        n, C = x.shape[-2:]
        xt = x.reshape(-1, n, C).contiguous()
        M, N, dt = xt.shape[0], out.shape[1], x.dtype
        # ∂x: the merge's (left in the slot) + H_pre x's + the projection's, in one buffer.
        pending = grad_slot.pending(ctx.slot) if needs[0] else None
        gx = pending if pending is not None else (torch.empty(M, n, C, dtype=dt) if needs[0] else None)
        accumulate = pending is not None
        g_pre = torch.zeros(M, n, dtype=dt) if g_pre is None else g_pre.reshape(M, n).to(dt)
        if ctx.read and g_u is not None:
            # ⟨x[j], g_u⟩ joins ∂H_pre; H_pre ⊗ g_u goes into ∂x (written, or added).
            g_pre = g_pre + cpu_native.pre_bwd(xt, h_pre, g_u.reshape(M, C).to(dt).contiguous(),
                                               None if gx is None else gx.view(M, n, C), accumulate, True)
            accumulate = gx is not None
        g_post = torch.zeros(M, n, dtype=dt) if g_post is None else g_post.reshape(M, n).to(dt)
        g_res = torch.zeros(M, n, n, dtype=dt) if g_res is None else g_res.reshape(M, n, n).to(dt)
        d_raw = torch.empty(M, N, dtype=dt)                                           # ∂(b + α·act)
        if ctx.kind == "sinkhorn":
            d_raw[:, :n] = g_pre * ((1.0 - h_pre) * h_pre)                                  # σ′
            s_post = 0.5 * h_post
            d_raw[:, n:2 * n] = (2.0 * g_post) * ((1.0 - s_post) * s_post)                   # (2σ)′
            d_raw[:, 2 * n:] = cpu_native.sinkhorn_bwd(z, g_res.contiguous(), ctx.iters).view(M, n * n)
        else:
            d_raw[:, :n], d_raw[:, n:2 * n], d_raw[:, 2 * n:] = g_pre, g_post, g_res.view(M, n * n)
        grad_b = d_raw.sum(0) if any(needs[2:5]) else None
        grad_alpha = None
        if needs[5]:
            per_col = (d_raw * act).sum(0)
            grad_alpha = torch.stack([per_col[:n].sum(), per_col[n:2 * n].sum(), per_col[2 * n:].sum()])
        grad_act = d_raw * scale
        grad_out = grad_act * (1.0 - act * act) if ctx.kind == "linear" else grad_act  # tanh′
        grad_phi = None
        if needs[0] or needs[1]:
            grad_phi = cpu_native.proj_bwd(xt.view(M, n * C), phi.contiguous(), grad_out.contiguous(), out, inv,
                                           None if gx is None else gx.view(M, n * C), accumulate, needs[1])
        if pending is not None:
            ctx.slot.grad = None                                                       # taken: returned below
        grad_x = None if gx is None else gx.view(x.shape)
        if grad_b is None:
            gb_pre = gb_post = gb_res = None
        else:
            gb_pre, gb_post, gb_res = grad_b[:n], grad_b[n:2 * n], grad_b[2 * n:].view(n, n)
        return grad_x, grad_phi, gb_pre, gb_post, gb_res, grad_alpha, None, None, None, None, None


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
