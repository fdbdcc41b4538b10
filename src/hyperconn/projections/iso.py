"""Projection onto M_iso = {H ∈ R^{n×n} : HᵀH = I, H1 = 1} (IsoHC).

Every H in M_iso has the form ``H = e0 e0ᵀ + U Q Uᵀ`` with ``e0 = 1/√n``, ``U`` (n, n−1)
an orthonormal basis of 1^⊥ (Helmert) and ``Q`` orthogonal (n−1)×(n−1). We project the
raw matrix by taking ``A = Uᵀ H̃ U`` to its orthogonal polar factor:

* ``method="ns"``: Newton-Schulz, ``X ← 1.5 X − 0.5 X Xᵀ X`` from ``X0 = A/γ``. Only
  matrix products, so it runs well batched on a GPU. Mean preservation (H1 = 1) is exact
  by construction; orthogonality is as exact as the iteration converged, which depends on
  the conditioning of A (see :func:`iso_project`).
* ``method="polar"``: exact polar factor by SVD, with the closed-form backward
  ``∂L/∂A = Q Y``, ``S Y + Y S = M − Mᵀ``, ``M = QᵀG`` (``A = Q S``).

For n = 2 the block is 1×1 and O(1) = {±1}: the result is ``sign(a)`` with sign(0) = +1,
i.e. either the identity or the swap of the two streams; its gradient is zero.
For n = 1 the only member is [[1]].
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["iso_project", "helmert_basis", "ISO_METHODS"]

ISO_METHODS = ("ns", "polar")


@functools.lru_cache(maxsize=64)
def _helmert_cpu(n: int, dtype: torch.dtype) -> torch.Tensor:
    u = torch.zeros(n, n - 1, dtype=torch.float64)
    for k in range(1, n):
        u[:k, k - 1] = 1.0
        u[k, k - 1] = -float(k)
        u[:, k - 1] /= math.sqrt(k * (k + 1))
    return u.to(dtype)


def helmert_basis(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(n, n−1) orthonormal basis of the complement of the all-ones vector."""
    return _helmert_cpu(n, dtype).to(device)


def _ns_scale(a: torch.Tensor) -> torch.Tensor:
    """γ with σmax(A)/γ < √3 (NS's convergence region), close to σmax when possible.

    A few power iterations estimate σmax from below; ‖A‖_F/1.7 is a guaranteed safe
    floor (σmax ≤ ‖A‖_F). Both are smooth in A, so the NS map stays differentiable.
    """
    fro = torch.linalg.matrix_norm(a)
    gram = a.mT @ a
    v = torch.ones(a.shape[:-1] + (1,), dtype=a.dtype, device=a.device)
    v = v + 0.1 * torch.arange(a.shape[-1], dtype=a.dtype, device=a.device).unsqueeze(-1)
    for _ in range(8):
        v = gram @ v
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    sigma_est = (gram @ v).norm(dim=-2).squeeze(-1).clamp_min(0).sqrt()
    return torch.maximum(1.02 * sigma_est, fro / 1.7).clamp_min(1e-12)


def _ns_iterates(x: torch.Tensor, steps: int) -> list[torch.Tensor]:
    xs = [x]
    for _ in range(steps):
        x = 1.5 * x - 0.5 * (x @ x.mT) @ x
        xs.append(x)
    return xs


class _NewtonSchulz(torch.autograd.Function):
    """K cubic Newton-Schulz steps from X0, storing only X0 between passes.

    For ``Y = 1.5 X − 0.5 X Xᵀ X`` the vector-Jacobian product is
    ``∂X = 1.5 G − 0.5 (G XᵀX + X Gᵀ X + X Xᵀ G)``; the backward recomputes the iterates.
    """

    @staticmethod
    def forward(ctx, x0: torch.Tensor, steps: int) -> torch.Tensor:
        ctx.steps = steps
        ctx.save_for_backward(x0)
        return _ns_iterates(x0, steps)[-1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x0,) = ctx.saved_tensors
        xs = _ns_iterates(x0, ctx.steps)
        g = grad
        for x in reversed(xs[:-1]):
            xtx = x.mT @ x
            g = 1.5 * g - 0.5 * (g @ xtx + x @ g.mT @ x + x @ (x.mT @ g))
        return g, None


def _newton_schulz(a: torch.Tensor, steps: int) -> torch.Tensor:
    # The scale γ(A) stays under autograd (cheap); the iterations use the custom backward.
    return _NewtonSchulz.apply(a / _ns_scale(a)[..., None, None], steps)


class _PolarFactor(torch.autograd.Function):
    """Orthogonal polar factor Q of A = Q S by SVD, with the closed-form backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(a)
        q = u @ vh
        ctx.save_for_backward(q, s, vh)
        return q

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor) -> torch.Tensor:
        q, s, vh = ctx.saved_tensors
        m = q.mT @ grad_q
        skew = m - m.mT
        # S = V diag(s) Vᵀ: in V's basis the Sylvester equation is diagonal.
        v = vh.mT
        skew_v = vh @ skew @ v
        denom = (s.unsqueeze(-1) + s.unsqueeze(-2)).clamp_min(1e-12)
        y = v @ (skew_v / denom) @ vh
        return q @ y


def _orthogonal_factor(a: torch.Tensor, method: str, steps: int) -> torch.Tensor:
    if a.shape[-1] == 1:
        # O(1) = {±1}: pick the sign of the 1×1 block (ties go to +1, the identity).
        return torch.where(a >= 0, torch.ones_like(a), -torch.ones_like(a))
    if method == "polar":
        # The SVD of the tiny block runs in float64 so fp32 results are orthogonal to
        # rounding (≤ 1e-6), not to the SVD's fp32 accuracy.
        return _PolarFactor.apply(a.double()).to(a.dtype)
    return _newton_schulz(a, steps)


def iso_project(raw: torch.Tensor, method: str = "ns", steps: int = 5) -> torch.Tensor:
    """Map raw (..., n, n) matrices into M_iso = {H : HᵀH = I, H1 = 1}.

    Args:
        raw: (..., n, n) real tensor.
        method: ``"ns"`` (Newton-Schulz, ``steps`` iterations) or ``"polar"`` (exact SVD).
        steps: Newton-Schulz iterations, ≥ 1 (ignored by ``"polar"``). The cubic
            iteration converges quadratically near 1 but only grows small singular values
            by 1.5× per step: five steps reach ‖HᵀH − I‖ ≤ 1e-3 when the condition number
            of the 1^⊥ block is ≤ 2 (measured: ≤ ~2.7); badly conditioned blocks need more
            steps or ``method="polar"``. Near-identity raw matrices (the layer's init) are
            well inside that region.

    Returns:
        (..., n, n) tensor in the input dtype (fp16/bf16 are computed in fp32) with
        ``H 1 = 1`` exactly (to rounding) and ``HᵀH ≈ I``.

    Raises:
        ValueError: for a non-square input, an unknown method or ``steps < 1``.
    """
    if raw.dim() < 2 or raw.shape[-1] != raw.shape[-2]:
        raise ValueError(f"raw: expected shape (..., n, n), got {tuple(raw.shape)}")
    if method not in ISO_METHODS:
        raise ValueError(f"method: expected one of {ISO_METHODS}, got {method!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    n = raw.shape[-1]
    dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
    h = raw.to(dtype)
    if n == 1:
        return (h * 0 + 1).to(raw.dtype)  # keeps the graph; the gradient is zero
    u = helmert_basis(n, dtype, h.device)
    a = u.mT @ h @ u
    q = _orthogonal_factor(a, method, steps)
    mean_part = torch.full((n, n), 1.0 / n, dtype=dtype, device=h.device)
    return (mean_part + u @ q @ u.mT).to(raw.dtype)
