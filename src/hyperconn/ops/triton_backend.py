"""The ``"triton"`` backend: the fused Triton kernels (:mod:`.triton_kernels`) registered
as ``torch.library`` custom ops, so the dispatcher, autograd and ``torch.compile`` (which
sees an opaque op with a fake implementation instead of tracing into Triton's launcher)
handle them. Imported only when Triton is selected.

    hyperconn::stream_pre(x, h, block_c)                     → out       (+ _backward)
    hyperconn::stream_merge(x, h_res, h_post, y, block_c)    → out       (+ _backward)
    hyperconn::sinkhorn_tokens(logits, iters)                → P         (+ _backward)
    hyperconn::rms_projection(x, phi, eps)                   → out, r    (+ _backward)
    hyperconn::odd_polynomial(x0, schedule)                  → X_S       (+ _backward)
    hyperconn::cayley(a)                                     → Q         (backward: closed form)
    hyperconn::basis_mixture(logits, basis)                  → H         (+ _backward)
    hyperconn::{sinkhorn,iso,linear,hybrid}_coefficients(x, φ, bias, α, eps, iters, steps, read)
                                → H_pre, H_post, H_res, out, r, H_pre x   (+ _backward)

The last are mhc's, isohc's, hc's and hybrid's whole coefficient paths (projection, then
the gates and the Sinkhorn, Iso-NS or their mix, or hc's tanh; with ``read`` also the
branch input H_pre x) in one kernel forward and three backward
(:mod:`.triton_coefficients`); the layer takes them through :func:`fused_coefficients`
when its variant declares maps this backend fuses (``Variant.fused_maps``). ``HYPERCONN_FUSED_COEFFICIENTS=0`` in the environment at import
(or :data:`FUSE_COEFFICIENTS` = False) runs the unfused ops instead, for A/B measurements.

In eager mode a layer also hands the merge's ∂x to its fused coefficient op through a
:class:`~.grad_slot.StreamGradSlot`: the merge's backward leaves it there and the
projection backward adds it in its own store, so autograd gets one ∂x per layer instead
of two to add (``HYPERCONN_FOLD_MERGE_GRAD=0`` or :data:`FOLD_MERGE_GRAD` = False: not).

The RMS projection kernel reads the streams once forward (the GEMM and the sum of squares
together) and once backward (∂x and ∂φ together); the plain ops it replaces read them
twice forward and three times backward (the GEMM, the norm, then the two backward GEMMs
and the RMS term).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .._dtypes import compute_dtype
from . import triton_coefficients as tc
from . import triton_kernels as tk
from .grad_slot import StreamGradSlot, defer, deferring, take

__all__ = ["stream_pre", "stream_merge", "rms_projection", "sinkhorn_tokens", "odd_polynomial_iteration", "cayley",
           "basis_mixture", "fused_coefficients", "grad_slot", "prepare_constants", "FUSE_COEFFICIENTS",
           "FOLD_MERGE_GRAD", "NAME", "INTERPRETED", "MAX_POLY_M", "MAX_MIXTURE_K"]

NAME = "triton"
INTERPRETED = tk.INTERPRETED
MAX_POLY_M = tk.MAX_POLY_M
MAX_MIXTURE_K = tk.MAX_MIXTURE_K
# Decided once, at import; tests and A/B benchmarks may set the attributes.
_OFF = ("0", "false", "off", "no")
FUSE_COEFFICIENTS = os.environ.get("HYPERCONN_FUSED_COEFFICIENTS", "1").strip().lower() not in _OFF
FOLD_MERGE_GRAD = os.environ.get("HYPERCONN_FOLD_MERGE_GRAD", "1").strip().lower() not in _OFF


# ---------------------------------------------------------------------- stream_pre
@torch.library.custom_op("hyperconn::stream_pre", mutates_args=())
def _stream_pre(x: Tensor, h: Tensor, block_c: int) -> Tensor:
    return tk.stream_pre_forward(x, h, block_c or None)


@_stream_pre.register_fake
def _(x, h, block_c):
    return x.new_empty(x.shape[:-2] + x.shape[-1:])


@torch.library.custom_op("hyperconn::stream_pre_backward", mutates_args=())
def _stream_pre_backward(x: Tensor, h: Tensor, grad: Tensor, block_c: int) -> tuple[Tensor, Tensor]:
    return tk.stream_pre_backward(x, h, grad, block_c or None)


@_stream_pre_backward.register_fake
def _(x, h, grad, block_c):
    return x.new_empty(x.shape), h.new_empty(h.shape)


def _stream_pre_setup(ctx, inputs, output):
    x, h, block_c = inputs
    ctx.save_for_backward(x, h)
    ctx.block_c = block_c


def _stream_pre_grad(ctx, grad):
    x, h = ctx.saved_tensors
    dx, dh = _stream_pre_backward(x, h, grad, ctx.block_c)
    return dx, dh, None


_stream_pre.register_autograd(_stream_pre_grad, setup_context=_stream_pre_setup)


# ---------------------------------------------------------------------- stream_merge
@torch.library.custom_op("hyperconn::stream_merge", mutates_args=())
def _stream_merge(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, block_c: int) -> Tensor:
    return tk.stream_merge_forward(x, h_res, h_post, y, block_c or None)


@_stream_merge.register_fake
def _(x, h_res, h_post, y, block_c):
    return x.new_empty(x.shape)  # contiguous, as the kernel's output


@torch.library.custom_op("hyperconn::stream_merge_backward", mutates_args=())
def _stream_merge_backward(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, grad: Tensor,
                           block_c: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tk.stream_merge_backward(x, h_res, h_post, y, grad, block_c or None)


@_stream_merge_backward.register_fake
def _(x, h_res, h_post, y, grad, block_c):
    return x.new_empty(x.shape), h_res.new_empty(h_res.shape), h_post.new_empty(h_post.shape), y.new_empty(y.shape)


def _stream_merge_setup(ctx, inputs, output):
    x, h_res, h_post, y, block_c = inputs
    ctx.save_for_backward(x, h_res, h_post, y)
    ctx.block_c = block_c


def _stream_merge_grad(ctx, grad):
    dx, dhr, dhp, dy = _stream_merge_backward(*ctx.saved_tensors, grad, ctx.block_c)
    return dx, dhr, dhp, dy, None


_stream_merge.register_autograd(_stream_merge_grad, setup_context=_stream_merge_setup)


# ---------------------------------------------------------------------- sinkhorn
@torch.library.custom_op("hyperconn::sinkhorn_tokens", mutates_args=())
def _sinkhorn(logits: Tensor, iters: int) -> Tensor:
    return tk.sinkhorn_forward(logits, iters)


@_sinkhorn.register_fake
def _(logits, iters):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("hyperconn::sinkhorn_tokens_backward", mutates_args=())
def _sinkhorn_backward(logits: Tensor, grad: Tensor, iters: int) -> Tensor:
    return tk.sinkhorn_backward(logits, grad, iters)


@_sinkhorn_backward.register_fake
def _(logits, grad, iters):
    return logits.new_empty(logits.shape)


def _sinkhorn_setup(ctx, inputs, output):
    logits, iters = inputs
    ctx.save_for_backward(logits)  # only the input: backward recomputes the iterations
    ctx.iters = iters


def _sinkhorn_grad(ctx, grad):
    (logits,) = ctx.saved_tensors
    return _sinkhorn_backward(logits, grad, ctx.iters), None


_sinkhorn.register_autograd(_sinkhorn_grad, setup_context=_sinkhorn_setup)


# ---------------------------------------------------------------------- rms projection
@torch.library.custom_op("hyperconn::rms_projection", mutates_args=())
def _rms_projection(x: Tensor, phi: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return tk.rms_projection_forward(x, phi, eps)


@_rms_projection.register_fake
def _(x, phi, eps):
    acc = compute_dtype(x, phi)
    m = x.numel() // (x.shape[-2] * x.shape[-1]) if x.dim() >= 2 else 0
    return x.new_empty(x.shape[:-2] + phi.shape[-1:], dtype=acc), x.new_empty((m,), dtype=acc)


@torch.library.custom_op("hyperconn::rms_projection_backward", mutates_args=())
def _rms_projection_backward(x: Tensor, phi: Tensor, out: Tensor, rinv: Tensor,
                             grad: Tensor) -> tuple[Tensor, Tensor]:
    return tk.rms_projection_backward(x, phi, out, rinv, grad)


@_rms_projection_backward.register_fake
def _(x, phi, out, rinv, grad):
    return x.new_empty(x.shape), phi.new_empty(phi.shape)


def _rms_projection_setup(ctx, inputs, output):
    x, phi, _ = inputs
    ctx.save_for_backward(x, phi, *output)


def _rms_projection_grad(ctx, grad_out, _grad_rinv):
    x, phi, out, rinv = ctx.saved_tensors
    dx, dphi = _rms_projection_backward(x, phi, out, rinv, grad_out)
    return dx, dphi, None


_rms_projection.register_autograd(_rms_projection_grad, setup_context=_rms_projection_setup)


# ---------------------------------------------------------------------- odd polynomial (Iso-NS)
@torch.library.custom_op("hyperconn::odd_polynomial", mutates_args=())
def _odd_polynomial(x0: Tensor, schedule: list[float]) -> Tensor:
    return tk.odd_polynomial_forward(x0, schedule)


@_odd_polynomial.register_fake
def _(x0, schedule):
    return x0.new_empty(x0.shape)


@torch.library.custom_op("hyperconn::odd_polynomial_backward", mutates_args=())
def _odd_polynomial_backward(x0: Tensor, schedule: list[float], grad: Tensor) -> Tensor:
    return tk.odd_polynomial_backward(x0, schedule, grad)


@_odd_polynomial_backward.register_fake
def _(x0, schedule, grad):
    return x0.new_empty(x0.shape)


def _odd_polynomial_setup(ctx, inputs, output):
    x0, schedule = inputs
    ctx.save_for_backward(x0)  # only X0: backward recomputes the iterates
    ctx.schedule = schedule


def _odd_polynomial_grad(ctx, grad):
    (x0,) = ctx.saved_tensors
    return _odd_polynomial_backward(x0, ctx.schedule, grad), None


_odd_polynomial.register_autograd(_odd_polynomial_grad, setup_context=_odd_polynomial_setup)


def odd_polynomial_iteration(x0: Tensor, schedule: tuple) -> Tensor:
    """Triton Newton-Schulz steps on (..., m, m), m ≤ ``MAX_POLY_M``: the same map and
    gradient as :func:`hyperconn.ops.newton_schulz.odd_polynomial_iteration`."""
    flat = [float(v) for step in schedule for v in step]
    return _odd_polynomial(x0.contiguous(), flat)


# ---------------------------------------------------------------------- Cayley
@torch.library.custom_op("hyperconn::cayley", mutates_args=())
def _cayley(a: Tensor) -> Tensor:
    return tk.cayley_forward(a)


@_cayley.register_fake
def _(a):
    return a.new_empty(a.shape)


def _cayley_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _cayley_grad(ctx, grad):
    # Q = (I − K)(I + K)⁻¹: dQ = −(I + Q) dK (I + Q) / 2, so ∂K = −(I + Q)ᵀ G (I + Q)ᵀ / 2,
    # and K = (A − Aᵀ)/2 gives ∂A = (∂K − ∂Kᵀ)/2. Plain ops: autograd can differentiate them.
    (q,) = ctx.saved_tensors
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    p = (eye + q).mT
    dk = -(p @ grad.to(q.dtype) @ p) / 2
    return (dk - dk.mT) / 2


_cayley.register_autograd(_cayley_grad, setup_context=_cayley_setup)


def cayley(a: Tensor) -> Tensor:
    """Triton Cayley map of the skew part of each (..., m, m) block, m ≤ ``MAX_POLY_M``:
    the same map and gradient as :func:`hyperconn.projections.cayley` (which computes in fp64;
    pass fp64 for the same precision)."""
    return _cayley(a.contiguous())


# ---------------------------------------------------------------------- basis mixture
@torch.library.custom_op("hyperconn::basis_mixture", mutates_args=())
def _basis_mixture(logits: Tensor, basis: Tensor) -> Tensor:
    return tk.basis_mixture_forward(logits, basis)


@_basis_mixture.register_fake
def _(logits, basis):
    return logits.new_empty(logits.shape[:-1] + basis.shape[1:])


@torch.library.custom_op("hyperconn::basis_mixture_backward", mutates_args=())
def _basis_mixture_backward(logits: Tensor, basis: Tensor, grad: Tensor) -> Tensor:
    return tk.basis_mixture_backward(logits, basis, grad)


@_basis_mixture_backward.register_fake
def _(logits, basis, grad):
    return logits.new_empty(logits.shape)


def _basis_mixture_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _basis_mixture_grad(ctx, grad):
    logits, basis = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the same Jacobian-vector product in plain (differentiable) ops.
        w = torch.softmax(logits, dim=-1)
        dw = grad.flatten(logits.dim() - 1).to(w.dtype) @ basis.flatten(1).to(w.dtype).T
        return w * (dw - (w * dw).sum(-1, keepdim=True)), None
    return _basis_mixture_backward(logits, basis, grad), None


_basis_mixture.register_autograd(_basis_mixture_grad, setup_context=_basis_mixture_setup)


def basis_mixture(logits: Tensor, basis: Tensor) -> Tensor:
    """Triton ``softmax(logits) · B``: logits (..., K), a constant basis B (K, *S) → (..., *S),
    K ≤ ``MAX_MIXTURE_K``; computed in fp32 (fp64 for fp64 logits), returned in the
    logits' dtype. The basis gets no gradient."""
    acc = compute_dtype(logits)
    return _basis_mixture(logits.to(acc).contiguous(), basis.detach().to(acc).contiguous()).to(logits.dtype)


# ---------------------------------------------------------------------- fused coefficients
def _plain_coefficients(x, phi, bias, alpha, eps, res, iters, steps):
    """A fused coefficient op's map (``res``: a ``triton_coefficients`` map) in plain
    differentiable ops, its double-backward path: the projection, then σ, 2σ and the res
    map, or (hc) tanh and no maps."""
    from ..projections import hybrid_mix
    from ..projections.iso import iso_project
    from .reference import sinkhorn_tokens
    from .torch_backend import plain_rms_projection

    n, acc = x.shape[-2], compute_dtype(x, phi)
    out = plain_rms_projection(x, phi, eps, acc).reshape(-1, phi.shape[-1])
    scale = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)]).to(acc)
    if res == tc.LINEAR:
        raw = bias.to(acc) + scale * torch.tanh(out)
        return raw[:, :n], raw[:, n:2 * n], raw[:, 2 * n:].unflatten(-1, (n, n))
    raw = bias.to(acc) + scale * out
    z = raw[:, 2 * n:].unflatten(-1, (n, n))
    if res == tc.SINKHORN:
        h_res = sinkhorn_tokens(z, iters)
    elif res == tc.ISO:
        h_res = iso_project(z, "ns", steps, backend="torch")
    else:
        h_res = hybrid_mix(iso_project(z, "ns", steps, backend="torch"), sinkhorn_tokens(z, iters), alpha[3])
    return torch.sigmoid(raw[:, :n]), 2.0 * torch.sigmoid(raw[:, n:2 * n]), h_res


def _coefficients_op(name: str, res: int):
    """Registers ``hyperconn::<name>(x, phi, bias, alpha, eps, iters, steps, read)`` →
    (H_pre, H_post, H_res, out, r, read) for the map ``res`` (``iters``: Sinkhorn rounds,
    ``steps``: Newton-Schulz steps; a map ignores what it does not use; ``read``: also the
    branch input H_pre x (M, C) in x.dtype, else an empty tensor) with its backward op,
    fake implementations and autograd (exact double backward through the plain ops)."""

    @torch.library.custom_op(f"hyperconn::{name}", mutates_args=())
    def op(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, eps: float, iters: int, steps: int,
           read: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        *h, u = tc._forward(x, phi, bias, alpha, eps, res, iters, steps, read)
        return (*h, x.new_empty((0,)) if u is None else u)

    @op.register_fake
    def _(x, phi, bias, alpha, eps, iters, steps, read):
        acc = compute_dtype(x, phi)
        n, N = x.shape[-2], phi.shape[-1]
        m = x.numel() // (x.shape[-2] * x.shape[-1]) if x.dim() >= 2 else 0
        return (x.new_empty((m, n), dtype=acc), x.new_empty((m, n), dtype=acc), x.new_empty((m, n, n), dtype=acc),
                x.new_empty((m, N), dtype=acc), x.new_empty((m,), dtype=acc),
                x.new_empty((m, x.shape[-1]) if read else (0,)))

    @torch.library.custom_op(f"hyperconn::{name}_backward", mutates_args=())
    def op_backward(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, out: Tensor, rinv: Tensor,
                    g_pre: Tensor, g_post: Tensor, g_res: Tensor, h_pre: Tensor, g_read: Tensor, g_x: Tensor,
                    iters: int, steps: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # g_read, g_x: empty when absent; g_x is a ∂x so far (the merge's), added to ∂x.
        return tc._backward(x, phi, bias, alpha, out, rinv, g_pre, g_post, g_res, res, iters, steps, None,
                            h_pre, g_read if g_read.numel() else None, g_x if g_x.numel() else None)

    @op_backward.register_fake
    def _(x, phi, bias, alpha, out, rinv, g_pre, g_post, g_res, h_pre, g_read, g_x, iters, steps):
        return x.new_empty(x.shape), phi.new_empty(phi.shape), bias.new_empty(bias.shape), alpha.new_empty(alpha.shape)

    def setup(ctx, inputs, output):
        x, phi, bias, alpha, eps, iters, steps, read = inputs
        ctx.save_for_backward(x, phi, bias, alpha, output[3], output[4], output[0])
        ctx.mark_non_differentiable(output[3], output[4])  # the saved projection and scale
        ctx.eps, ctx.iters, ctx.steps, ctx.read = eps, iters, steps, read

    def grad(ctx, g_pre, g_post, g_res, _g_out, _g_rinv, g_read, pending=None):
        """(∂x, ∂φ, ∂bias, ∂alpha, None × 4); ``pending``: the merge's ∂x, from a slot."""
        x, phi, bias, alpha, out, rinv, h_pre = ctx.saved_tensors
        n, m = x.shape[-2], out.shape[0]
        grads = [out.new_zeros(shape) if g is None else g
                 for g, shape in zip((g_pre, g_post, g_res), ((m, n), (m, n), (m, n, n)))]
        if not ctx.read or g_read is None:
            g_read = x.new_empty((0,))
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the forward recomputed in plain ops, so double
            # backward is exact (the kernels' outputs are not connected to the inputs).
            need = ctx.needs_input_grad[:4]
            wanted = [t for t, w in zip((x, phi, bias, alpha), need) if w]
            if not wanted:
                return (None,) * 8
            h = _plain_coefficients(x, phi, bias, alpha, ctx.eps, res, ctx.iters, ctx.steps)
            outs, gs = list(h), list(grads)
            if g_read.numel():
                outs.append(torch.einsum("mj,mjc->mc", h[0], x.reshape(m, n, -1).to(h[0].dtype)))
                gs.append(g_read.to(outs[-1].dtype))
            got = iter(torch.autograd.grad(outs, wanted, gs, create_graph=True, allow_unused=True))
            return tuple(next(got) if w else None for w in need) + (None,) * 4
        dx, dphi, dbias, dalpha = op_backward(x, phi, bias, alpha, out, rinv, *grads, h_pre, g_read,
                                              x.new_empty((0,)) if pending is None else pending, ctx.iters,
                                              ctx.steps)
        return dx, dphi, dbias, dalpha, None, None, None, None

    op.register_autograd(grad, setup_context=setup)
    op.slot_grad, op.slot_setup = grad, setup  # for _SlotCoefficients (eager, one ∂x per layer)
    return op


class _SlotCoefficients(torch.autograd.Function):
    """A fused coefficient op with the read, in eager mode with a layer's
    :class:`~.grad_slot.StreamGradSlot`: the same forward and backward as the op's own
    autograd, but the backward takes the merge's ∂x out of the slot and adds it in the
    projection backward's store, so autograd has one ∂x to accumulate, not two (one pass
    over the streams fewer, and no read of the second). ``torch.compile`` never sees it:
    the layer passes no slot while tracing."""

    @staticmethod
    def forward(ctx, x, phi, bias, alpha, eps, iters, steps, op, slot):
        output = op(x, phi, bias, alpha, eps, iters, steps, True)
        op.slot_setup(ctx, (x, phi, bias, alpha, eps, iters, steps, True), output)
        ctx.op, ctx.slot = op, slot
        slot.armed = x  # the merge of these streams may now leave its ∂x here
        return output

    @staticmethod
    def backward(ctx, g_pre, g_post, g_res, g_out, g_rinv, g_read):
        return (*ctx.op.slot_grad(ctx, g_pre, g_post, g_res, g_out, g_rinv, g_read, take(ctx.slot)), None)


class _SlotMerge(torch.autograd.Function):
    """``hyperconn::stream_merge`` in eager mode with a layer's slot: backward leaves ∂x in
    the slot when a fused coefficient op armed it (that op adds and returns it), else
    returns it as the op's own autograd does."""

    @staticmethod
    def forward(ctx, x, h_res, h_post, y, block_c, slot):
        _stream_merge_setup(ctx, (x, h_res, h_post, y, block_c), None)
        ctx.slot = slot
        return _stream_merge(x, h_res, h_post, y, block_c)

    @staticmethod
    def backward(ctx, grad):
        dx, dhr, dhp, dy, _ = _stream_merge_grad(ctx, grad)
        if ctx.needs_input_grad[0] and deferring(ctx.slot):
            defer(ctx.slot, dx)
            dx = None
        return dx, dhr, dhp, dy, None, None


_FUSED_OPS = {"sinkhorn": _coefficients_op("sinkhorn_coefficients", tc.SINKHORN),
              "iso": _coefficients_op("iso_coefficients", tc.ISO),
              "linear": _coefficients_op("linear_coefficients", tc.LINEAR),
              "hybrid": _coefficients_op("hybrid_coefficients", tc.HYBRID)}


def prepare_constants(variant, streams: int, device: torch.device) -> None:
    """Make the device constants ``variant``'s kernels read (the fused Iso-NS op's Helmert
    basis and schedule; the Newton-Schulz kernel's schedule) on ``device`` now; see
    ``HyperConnection._prepare_kernel_constants``."""
    from ..projections.iso import _DEFAULT_STEPS, _schedule

    options = getattr(variant, "options", None)
    method = getattr(options, "iso_method", None)
    if method not in ("ns", "ns-cubic"):
        return
    steps = options.iso_steps or _DEFAULT_STEPS[method]
    maps = variant.fused_maps()
    if maps is not None and maps[0] in ("iso", "hybrid") and 3 <= streams <= tk.MAX_SINKHORN_N:
        tc._iso_constants(streams, steps, device)
    if 2 <= streams <= tk.MAX_POLY_M + 1:  # the unfused path's odd_polynomial kernel, in fp64
        tk._poly_layout(torch.empty((1, streams - 1, streams - 1), dtype=torch.float64, device=device),
                        _schedule(method, steps))


def fused_coefficients(x: Tensor, phi: Tensor, eps: float, b_pre: Tensor, b_post: Tensor, b_res: Tensor,
                       alpha: Tensor, cdtype: torch.dtype, maps: tuple, read: bool = False,
                       slot: Optional[StreamGradSlot] = None) -> Optional[tuple[Tensor, Tensor, Tensor,
                                                                                Optional[Tensor]]]:
    """A dynamic layer's (H_pre (..., n), H_post (..., n), H_res (..., n, n)) in ``cdtype``
    from its streams x (..., n, C), projection φ (n·C, n² + 2n), static logits and the α
    scales (3,), by one fused op, and with ``read`` its branch input H_pre x (..., C) in
    x's dtype (else None), whose backward then writes one ∂x for both; or None where this
    backend does not fuse ``maps`` (the layer then runs the projection and the variant's
    maps as separate ops).

    ``maps``: the variant's :meth:`~hyperconn.variants.Variant.fused_maps`; fused here, for
    n ≤ 8: ``("sinkhorn", iters)`` (σ, 2σ and the unrolled Sinkhorn of mhc), ``("iso",
    steps)`` (σ, 2σ and Iso-NS, ``iso_project(method="ns")``, of isohc; n ≥ 3),
    ``("linear", 0)`` (hc's tanh activation and identity maps) and ``("hybrid", iters, steps,
    λ)`` ((1 − λ) Iso-NS + λ Sinkhorn; λ a float or a 0-dim tensor, differentiated; n ≥ 3).

    ``slot``: the layer's :class:`~.grad_slot.StreamGradSlot` (from :func:`grad_slot`);
    with ``read``, streams the op reads as they are (no cast) and a plain backward pass,
    the op's backward also adds the ∂x that :func:`stream_merge` left in it (one ∂x per
    layer)."""
    n = x.shape[-2]
    kind = maps[0]
    op = _FUSED_OPS.get(kind)
    if (not FUSE_COEFFICIENTS or op is None or n > tk.MAX_SINKHORN_N or x.numel() == 0
            or (kind in ("iso", "hybrid") and n < 3)):
        return None
    xc = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(cdtype)
    bias = torch.cat([b_pre.to(cdtype), b_post.to(cdtype), b_res.to(cdtype).flatten()])
    alpha = alpha.to(cdtype)
    iters = steps = 0
    if kind == "sinkhorn":
        iters = maps[1]
    elif kind == "iso":
        steps = maps[1]
    elif kind == "hybrid":
        iters, steps, lam = maps[1], maps[2], maps[3]
        # A float λ becomes a device tensor by a fill, not a host-to-device copy (which would
        # sync every step and break CUDA-graph capture).
        lam = lam.to(cdtype) if isinstance(lam, Tensor) else alpha.new_full((1,), float(lam))
        alpha = torch.cat([alpha, lam.reshape(1)])
    args = (xc, phi.to(cdtype), bias, alpha, float(eps), int(iters), int(steps))
    if slot is not None and read and xc is x and not torch.compiler.is_compiling():
        # x itself goes in (no cast node between the merge's ∂x and this op's). Both ∂x
        # are contiguous in token order, whatever x's strides.
        h_pre, h_post, h_res, _, _, u = _SlotCoefficients.apply(*args, op, slot)
    else:
        h_pre, h_post, h_res, _, _, u = op(*args, bool(read))
    lead = x.shape[:-2]
    return (h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n),
            u.view(*lead, x.shape[-1]).to(x.dtype) if read else None)


# ---------------------------------------------------------------------- backend API
def grad_slot(x: Tensor, cdtype: torch.dtype) -> Optional[StreamGradSlot]:
    """A slot for one dynamic layer call, through which :func:`stream_merge` hands its ∂x
    to the fused coefficient op's backward (any stream dtype: the op checks that it reads
    x as it is); None with :data:`FOLD_MERGE_GRAD` off (``HYPERCONN_FOLD_MERGE_GRAD=0``:
    autograd adds the two ∂x, for A/B measurements). The layer asks only outside
    ``torch.compile`` traces, where the ops stay opaque custom ops with their own autograd."""
    return StreamGradSlot() if FOLD_MERGE_GRAD else None


def stream_pre(x: Tensor, h_pre: Tensor, slot=None, *, block_c: Optional[int] = None) -> Tensor:
    """Triton ``Σ_j h_pre[j] x[j]``; shapes as :func:`hyperconn.ops.stream_pre`. ``slot``
    is ignored (its ∂x is returned; a layer whose coefficients are fused reads H_pre x in
    the fused op instead); ``block_c`` overrides the C tile (tests use it to exercise
    multi-block loops)."""
    return _stream_pre(x, h_pre, int(block_c or 0))


def stream_merge(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, slot: Optional[StreamGradSlot] = None, *,
                 block_c: Optional[int] = None) -> Tensor:
    """Triton ``h_res @ x + h_post ⊗ y``; reads the streams once, writes the result once.
    ``slot``: the layer's slot; when the layer's fused coefficient op armed it for these
    streams, a plain backward leaves ∂x there for that op to add (see :mod:`.grad_slot`)."""
    if slot is not None and slot.armed is x and not torch.compiler.is_compiling():
        return _SlotMerge.apply(x, h_res, h_post, y, int(block_c or 0), slot)
    return _stream_merge(x, h_res, h_post, y, int(block_c or 0))


def sinkhorn_tokens(logits: Tensor, iters: int = 20) -> Tensor:
    """Triton per-token Sinkhorn on (..., n, n), n ≤ MAX_SINKHORN_N; computed in fp32
    (fp64 for fp64 logits), returned in the logits dtype."""
    acc = compute_dtype(logits)
    return _sinkhorn(logits.to(acc).contiguous(), int(iters)).to(logits.dtype)


def rms_projection(x: Tensor, phi: Tensor, eps: float, cdtype: torch.dtype, slot=None) -> Tensor:
    """Triton ``(vec(x) φ) · rsqrt(mean(x²) + ε)``: x (..., n, C), φ (n·C, N) → (..., N) in
    ``cdtype``. Half-precision streams are read as they are (no fp32 copy) and multiplied
    in fp32; fp32/fp64 streams are computed in ``cdtype``."""
    xc = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(cdtype)
    out, _ = _rms_projection(xc, phi.to(cdtype), float(eps))
    return out.to(cdtype)

