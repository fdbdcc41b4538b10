"""Odd-polynomial (Newton-Schulz) iterations on batches of small square matrices.

    odd_polynomial_iteration(x0, schedule)    (..., m, m) → (..., m, m)

Each step is ``X ← a X + b X (XᵀX) + c X (XᵀX)²`` with ``(a, b, c)`` from ``schedule`` (the
coefficient schedules themselves live in :mod:`hyperconn.projections.iso`). One
``torch.autograd.Function`` with a hand-written backward that stores only X0 and
recomputes the iterates; on a CPU, matrices up to 8×8 are iterated with the tokens
innermost (:class:`_TokensInner`). On CUDA (or with ``backend="triton"`` in Triton's
interpreter), matrices up to 8×8 run the Triton kernel of :mod:`.triton_kernels` instead
(the same map and gradient, one program per block of tokens, the matrices in registers),
and on a CPU fp32/fp64 blocks run the native kernel of :mod:`.cpu_native` when it is
built (:func:`hyperconn.ops.cpu.odd_polynomial_iteration`; this module's torch op is its
reference and fallback).
"""

from __future__ import annotations

import torch

__all__ = ["odd_polynomial_iteration", "poly_step", "layout"]


class _Batched:
    """Matrices as (M, m, m): batched matrix products (GPUs, and CPUs for m > 8)."""

    @staticmethod
    def mm(a, b):
        return torch.bmm(a, b)

    @staticmethod
    def addmm(c, a, b, beta=1.0, alpha=1.0):
        return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)

    @staticmethod
    def t(a):
        return a.mT

    @staticmethod
    def pack(x):
        return x.reshape(-1, *x.shape[-2:])

    @staticmethod
    def unpack(x, shape):
        return x.reshape(shape)


class _TokensInner:
    """Matrices as (m, m, M), the M matrices innermost: a product is one broadcast multiply
    and a sum, vectorised over the matrices. On a CPU, for m ≤ 8, that is 3-4× faster than
    ``bmm`` on (M, m, m), which runs a tiny GEMM per matrix (measured: 29 vs 91 µs for
    1024 3×3, 258 vs 964 µs for 7×7; bmm wins from m ≈ 15)."""

    @staticmethod
    def mm(a, b):
        return (a.unsqueeze(2) * b.unsqueeze(0)).sum(1)

    @classmethod
    def addmm(cls, c, a, b, beta=1.0, alpha=1.0):
        return beta * c + alpha * cls.mm(a, b)

    @staticmethod
    def t(a):
        return a.transpose(0, 1)

    @staticmethod
    def pack(x):
        return x.reshape(-1, *x.shape[-2:]).permute(1, 2, 0).contiguous()

    @staticmethod
    def unpack(x, shape):
        return x.permute(2, 0, 1).reshape(shape)


def layout(x: torch.Tensor):
    """The matrix layout for ``x`` (…, m, m): tokens innermost on a CPU for m ≤ 8, else batched."""
    return _TokensInner if x.device.type == "cpu" and x.shape[-1] <= 8 else _Batched


def poly_step(x, coeffs, L=_Batched):
    """``a X + b X (XᵀX) + c X (XᵀX)²`` in layout ``L`` (c = 0: two products, not three)."""
    a, b, c = coeffs
    gram = L.mm(L.t(x), x)
    m = b * gram if c == 0 else L.addmm(gram, gram, gram, beta=b, alpha=c)
    return L.addmm(x, x, m, beta=a)


def _iterates(x, schedule, L=_Batched) -> list[torch.Tensor]:
    xs = [x]
    for coeffs in schedule:
        x = poly_step(x, coeffs, L)
        xs.append(x)
    return xs


class _OddPolynomialIteration(torch.autograd.Function):
    """``X ← X (a I + b XᵀX + c (XᵀX)²)`` per step, storing only X0 between passes.

    With A = XᵀX, M = aI + bA + cA² and G = ∂L/∂Y, the vector-Jacobian product is
    ``∂X = G M + X (Z + Zᵀ)``, ``Z = b W + c (W A + A W)``, ``W = XᵀG``; the backward
    recomputes the iterates. Runs in the layout :func:`layout` picks for the device.
    """

    @staticmethod
    def forward(ctx, x0: torch.Tensor, schedule: tuple) -> torch.Tensor:
        ctx.schedule = schedule
        ctx.save_for_backward(x0)
        L = layout(x0)
        return L.unpack(_iterates(L.pack(x0), schedule, L)[-1], x0.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x0,) = ctx.saved_tensors
        L = layout(x0)
        xs = _iterates(L.pack(x0), ctx.schedule, L)
        g = L.pack(grad)
        for x, (a, b, c) in zip(reversed(xs[:-1]), reversed(ctx.schedule)):
            gram = L.mm(L.t(x), x)
            w = L.mm(L.t(x), g)
            # M − aI = bA + cA²; Z = bW + c(WA + AW); ∂X = aG + G(M − aI) + X(Z + Zᵀ)
            m = b * gram if c == 0 else L.addmm(gram, gram, gram, beta=b, alpha=c)
            z = b * w if c == 0 else L.addmm(L.addmm(w, w, gram, beta=b, alpha=c), gram, w, alpha=c)
            g = L.addmm(L.addmm(g, g, m, beta=a), x, z + L.t(z))
        return L.unpack(g, grad.shape), None


def odd_polynomial_iteration(x0: torch.Tensor, schedule: tuple, backend=None) -> torch.Tensor:
    """Apply the steps of ``schedule`` (a tuple of ``(a, b, c)`` floats) to ``x0`` (..., m, m).

    ``backend``: as :func:`hyperconn.ops.resolve_backend` (None: ``HYPERCONN_KERNELS``, else
    ``"auto"``: the Triton kernel for CUDA tensors with m ≤ 8 when Triton imports).
    Returns the last iterate in ``x0.dtype``; differentiable (memory: X0 only).

    Raises:
        ValueError, RuntimeError: as :func:`hyperconn.ops.resolve_backend`; ValueError for an
            explicit ``"triton"`` with m > 8.
    """
    from . import dispatch  # imported here: dispatch imports this package's torch backend

    if x0.numel() and x0.dtype in (torch.float32, torch.float64) \
            and dispatch.resolve_backend(backend, x0) == "triton":
        triton_ops = dispatch._triton_ops()
        if x0.shape[-1] <= triton_ops.MAX_POLY_M:
            return triton_ops.odd_polynomial_iteration(x0, tuple(schedule))
        if (backend or "").strip().lower() == "triton":
            raise ValueError(f"x0: the Triton Newton-Schulz kernel supports m ≤ {triton_ops.MAX_POLY_M}, "
                             f"got m = {x0.shape[-1]}")
    if x0.device.type == "cpu":
        from . import cpu  # the native CPU kernel (tokens innermost, in C++), when it applies
        out = cpu.odd_polynomial_iteration(x0, schedule)
        if out is not None:
            return out
    return _OddPolynomialIteration.apply(x0, tuple(schedule))
