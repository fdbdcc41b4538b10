"""Projection onto M_iso = {H ∈ R^{n×n} : HᵀH = I, H1 = 1} (IsoHC).

Every H in M_iso has the form ``H = e0 e0ᵀ + U Q Uᵀ`` with ``e0 = 1/√n``, ``U`` (n, n−1)
an orthonormal basis of 1^⊥ (Helmert) and ``Q`` orthogonal (n−1)×(n−1). We project the
raw matrix by taking ``A = Uᵀ H̃ U`` to its orthogonal polar factor:

* ``method="ns"`` (default): Newton-Schulz with per-step optimal quintic coefficients
  (``X ← a X + b X XᵀX + c X (XᵀX)²`` from ``X0 = A/‖AᵀA‖_F^{1/2}``, twelve steps whose
  coefficients are the minimax polynomials of ``scripts/polar_express_coefficients.py``).
  Only matrix products, so it runs well batched on a GPU; every block of condition
  number up to ~5e5 (n ≤ 16) reaches float32 rounding (‖HᵀH − I‖_F ≈ 1e-6), without a
  data-dependent number of steps. (The range matters: a layer's per-token blocks at a
  trained-like spread have condition numbers up to ~5e4 in a few tokens per thousand.)
  Iterated in float64 (the tiny blocks cost little), on the CPU with the matrices
  innermost for blocks up to 8×8 (see :mod:`hyperconn.ops.newton_schulz`).
* ``method="ns-cubic"``: the IsoHC source's plain cubic iteration
  ``X ← 1.5 X − 0.5 X XᵀX`` (5 steps by default, from a power-iteration scale). It
  converges only for well-conditioned blocks (≤ 1e-3 needs condition number ≤ ~2.7 at
  5 steps); kept to reproduce the source.
* ``method="polar"``: exact polar factor by SVD, with the closed-form backward
  ``∂L/∂A = Q Y``, ``S Y + Y S = M − Mᵀ``, ``M = QᵀG`` (``A = Q S``).
* ``method="cayley"``: ``Q = (I − K)(I + K)⁻¹`` of the skew part ``K = (A − Aᵀ)/2``: exactly
  orthogonal (one small solve, no iterations) with det Q = +1. It is not a projection
  (the symmetric part of A is ignored) and it covers SO(n−1) only — never the reflections
  that NS/polar reach, nor rotations with eigenvalue −1 (K → ∞) — so H stays in the
  identity's component of M_iso. At n = 2 it is always the identity.

Degenerate inputs (documented behaviour, tested):

* A zero 1^⊥ block (``‖A‖_F ≤ 1e-6·(1 + ‖H̃‖_F)``, e.g. ``H̃ = c·11ᵀ``) maps to the
  identity H = I with a zero gradient.
* A rank-deficient block: ``polar`` returns an orthogonal factor (the SVD's ``U Vᵀ``: an
  exact isometry); the Newton-Schulz methods cannot lift a zero singular value and return
  a partial isometry (‖H‖₂ ≤ 1, ``HᵀH ≠ I``); ask ``tol=`` to be told. Gradients stay
  finite and bounded: ``polar``'s Sylvester denominators ``σ_i + σ_j`` are floored at
  1e-3·σ_max (so ‖∂‖ ≤ ~1e3·‖G‖/σ_max); the ``ns`` composite has slope ~2e7 at zero
  (measured gradient entries up to 7.5e6 for a rank-deficient n = 5 block: the price of
  converging up to condition ~5e5, where the exact polar factor's derivative grows like
  1/σ_min too), ``ns-cubic`` ~14.
* n = 2: the block is 1×1 and O(1) = {±1}: the result is ``sign(a)`` with sign(0) = +1,
  i.e. either the identity or the swap of the two streams; its gradient is zero (the
  result keeps a graph). n = 1: the only member is [[1]].
* Non-finite entries give a NaN result for that matrix, never an error (its gradient is
  NaN for the Newton-Schulz methods, zero for ``polar``).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch

from .._checks import check_floating, check_square
from .._dtypes import compute_dtype
from ..ops.newton_schulz import layout, odd_polynomial_iteration, poly_step

__all__ = ["iso_project", "orthogonal_factor", "cayley", "helmert_basis", "ISO_METHODS", "NS_COEFFICIENTS"]

ISO_METHODS = ("ns", "ns-cubic", "polar", "cayley")

# Per-step (a, b, c) of the default Newton-Schulz iteration, printed by
# scripts/polar_express_coefficients.py: minimax-optimal odd quintics for singular values in
# [1e-6, 1], each step but the last normalised (and, while expansive, read with a 1.01
# safety margin); the composite maps [1e-6, 1] to within 1e-8 of 1.
NS_COEFFICIENTS = (
    (4.214997231469088, -12.269076825489435, 8.928263738012765),
    (4.214984711611393, -12.268973445171138, 8.928174426032314),
    (4.214931940337476, -12.268537702954776, 8.927797981816044),
    (4.214709508302915, -12.266701154611413, 8.926211373543696),
    (4.213771938542859, -12.258961979315284, 8.91952567668623),
    (4.209819772752505, -12.226374870294606, 8.89137861609433),
    (4.193157411778701, -12.08962733797473, 8.773337751783515),
    (4.122962453959225, -11.524816169977015, 8.287111569880764),
    (3.834392179234532, -9.388570927696124, 6.470269160320913),
    (2.9336454975276496, -4.439919096939834, 2.4847251772186283),
    (2.003911436783287, -1.5201156266350007, 0.5159095282057078),
    (1.8755197172955622, -1.251039650665217, 0.37551993338295864),
)
# Steps beyond the schedule (``steps=`` larger, or ``tol=``): the classical quintic
# Newton-Schulz polynomial (15x − 10x³ + 3x⁵)/8, third-order convergent at 1.
_NS_TAIL = (15 / 8, -10 / 8, 3 / 8)
_CUBIC = (1.5, -0.5, 0.0)
_DEFAULT_STEPS = {"ns": len(NS_COEFFICIENTS), "ns-cubic": 5}
_MAX_TOL_STEPS = 64  # cap of the ``tol`` loop: a rank-deficient block never converges
_ZERO_BLOCK = 1e-6   # ‖A‖_F ≤ this·(1 + ‖H̃‖_F): the block counts as zero → identity
_POLAR_FLOOR = 1e-3  # relative floor of the polar backward's σ_i + σ_j


def _helmert(n: int, dtype: torch.dtype) -> torch.Tensor:
    # device="cpu" explicitly: this is cached, so it must never be built on a default
    # device set by a `with torch.device(...)` block (a meta tensor here would poison the cache).
    u = torch.zeros(n, n - 1, dtype=torch.float64, device="cpu")
    for k in range(1, n):
        u[:k, k - 1] = 1.0
        u[k, k - 1] = -float(k)
        u[:, k - 1] /= math.sqrt(k * (k + 1))
    return u.to(dtype)


@functools.lru_cache(maxsize=64)
def _helmert_on(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Kept per device, so a step inside a CUDA graph capture finds it there (a host-to-
    # device copy cannot be captured). Callers only read it. A plain tensor even when the
    # first call is under inference_mode (an inference tensor could not be saved later).
    with torch.inference_mode(False), torch.no_grad():
        return _helmert(n, dtype).to(device)


def helmert_basis(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(n, n−1) orthonormal basis of the complement of the all-ones vector (shared, read-only)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling() or device.type not in ("cpu", "cuda") or _fake_mode_active():
        # Built fresh: in a graph being traced (a constant after tracing; Dynamo would trace
        # through the cache and warn), or on a device whose tensors must not be kept
        # (meta, fake tensors).
        return _helmert(n, dtype).to(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _helmert_on(n, dtype, device)


def _fake_mode_active() -> bool:
    from torch._guards import detect_fake_mode  # public since torch 2.1, under _guards
    return detect_fake_mode() is not None


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


def _orthogonality_error(x: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.linalg.matrix_norm(x.mT @ x - eye)


def _schedule(method: str, steps: int) -> tuple:
    if method == "ns-cubic":
        return (_CUBIC,) * steps
    return NS_COEFFICIENTS[:steps] + (_NS_TAIL,) * max(0, steps - len(NS_COEFFICIENTS))


def _newton_schulz(a: torch.Tensor, method: str, steps: int, tol, backend=None) -> torch.Tensor:
    """Orthogonal factor of A (…, m, m) by the chosen Newton-Schulz schedule."""
    if method == "ns-cubic":
        scale = _ns_scale(a)
    else:
        # σmax ≤ ‖AᵀA‖_F^{1/2} ≤ ‖A‖_F: a guaranteed bound (no σ above 1 after scaling)
        # that loses at most (m)^{1/4} on σmin. The 4th root of a sum of 4th powers is
        # smooth; the floor keeps a zero block finite (it is replaced by I anyway).
        scale = torch.linalg.matrix_norm(a.mT @ a).clamp_min(1e-30).sqrt()
    x0 = a / scale.clamp_min(1e-12)[..., None, None]
    # The scale stays under autograd (cheap); the iterations use the custom backward.
    schedule = _schedule(method, steps)
    q = odd_polynomial_iteration(x0, schedule, backend)
    if tol is None:
        return q
    tail = _CUBIC if method == "ns-cubic" else _NS_TAIL
    with torch.no_grad():
        L = layout(q)
        probe, extra = L.pack(q), 0
        err = _orthogonality_error(q)
        while bool((err > tol).any()) and steps + extra < _MAX_TOL_STEPS:
            probe, extra = poly_step(probe, tail, L), extra + 1
            err = _orthogonality_error(L.unpack(probe, q.shape))
    if extra:
        q = odd_polynomial_iteration(x0, schedule + (tail,) * extra, backend)
    if bool((err > tol).any()):
        bad = int((err > tol).sum())
        warnings.warn(f"iso_project: {bad} block(s) did not reach ‖QᵀQ − I‖_F ≤ {tol} in "
                      f"{steps + extra} steps (worst {float(err.max()):.2e}): rank-deficient or "
                      "ill-conditioned beyond the schedule's range; method='polar' is exact",
                      RuntimeWarning, stacklevel=4)
    return q


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
        # S = V diag(s) Vᵀ: in V's basis the Sylvester equation is diagonal. The floor
        # bounds the gradient of (nearly) rank-deficient blocks, where the exact polar
        # factor's derivative grows like 1/(σ_i + σ_j) without limit.
        v = vh.mT
        skew_v = vh @ skew @ v
        floor = (_POLAR_FLOOR * s[..., :1]).clamp_min(1e-30).unsqueeze(-1)
        denom = torch.maximum(s.unsqueeze(-1) + s.unsqueeze(-2), floor)
        y = v @ (skew_v / denom) @ vh
        return q @ y


def cayley(a: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """``(I − K)(I + K)⁻¹`` with ``K = (A − Aᵀ)/2``: (..., m, m) → (..., m, m), orthogonal with
    det +1 (computed in float64, returned in ``a.dtype``; I + K is always invertible).

    ``backend``: as :func:`hyperconn.ops.resolve_backend`; on CUDA (auto) blocks up to 8×8
    run the Triton kernel ``hyperconn::cayley`` (Gauss-Jordan in registers, same map and
    gradient), otherwise a batched solve."""
    from ..ops import dispatch

    if a.numel() and a.shape[-1] <= 8 and dispatch.resolve_backend(backend, a) == "triton":
        return dispatch._triton_ops().cayley(a.double()).to(a.dtype)
    k = (a - a.mT).double() / 2
    eye = torch.eye(a.shape[-1], dtype=k.dtype, device=a.device)
    q, _ = torch.linalg.solve_ex(eye + k, eye - k)  # (I+K) and (I−K) commute
    return q.to(a.dtype)


def orthogonal_factor(a: torch.Tensor, method: str = "polar", steps: Optional[int] = None,
                      tol: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """An orthogonal matrix from each (..., m, m) block: its polar factor (``"polar"``,
    ``"ns"``, ``"ns-cubic"``, as :func:`iso_project` on the 1^⊥ block) or the Cayley map of
    its skew part (``"cayley"``). ``backend``: where Newton-Schulz and Cayley run (see
    :func:`iso_project`).

    Raises:
        TypeError, ValueError: as :func:`iso_project`.
    """
    check_floating("a", a)
    check_square("a", a)
    if method not in ISO_METHODS:
        raise ValueError(f"method: expected one of {ISO_METHODS}, got {method!r}")
    steps = _DEFAULT_STEPS.get(method, 1) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer or None, got {steps!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0):
        raise ValueError(f"tol: expected a positive number or None, got {tol!r}")
    return _orthogonal_factor(a.to(compute_dtype(a)), method, steps, tol, backend).to(a.dtype)


def _orthogonal_factor(a: torch.Tensor, method: str, steps: int, tol, backend=None) -> torch.Tensor:
    if method == "cayley":
        return cayley(a, backend)  # 1×1: K = 0, Q = 1 (SO(1)); graph kept through the solve
    if a.shape[-1] == 1:
        # O(1) = {±1}: pick the sign of the 1×1 block (ties go to +1, the identity).
        # ``+ 0·a`` keeps a graph (gradient zero) so callers can always differentiate.
        return torch.where(a >= 0, 1.0, -1.0).to(a.dtype) + 0 * a
    if method == "polar":
        # The SVD of the tiny block runs in float64 so fp32 results are orthogonal to
        # rounding (≤ 1e-6), not to the SVD's fp32 accuracy. LAPACK refuses non-finite
        # input, so such blocks are decomposed as zeros and marked NaN afterwards.
        finite = torch.isfinite(a).all(-1, keepdim=True).all(-2, keepdim=True)
        q = _PolarFactor.apply(torch.where(finite, a, 0.0).double()).to(a.dtype)
        return torch.where(finite, q, float("nan"))
    # float64 for the tiny blocks: the early steps of the wide-range schedule push some
    # singular values down to ~1e-2 on their way to 1, where float32 rounding would move
    # the polar factor by ~1e-5; in float64 the result is the polar factor to ~1e-7.
    return _newton_schulz(a.double(), method, steps, tol, backend).to(a.dtype)


def iso_project(raw: torch.Tensor, method: str = "ns", steps: Optional[int] = None,
                tol: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Map raw (..., n, n) matrices into M_iso = {H : HᵀH = I, H1 = 1}.

    Args:
        raw: (..., n, n) floating-point tensor (float16, bfloat16, float32, float64).
        method: ``"ns"`` (default: Newton-Schulz with per-step optimal coefficients),
            ``"ns-cubic"`` (the IsoHC source's cubic iteration), ``"polar"`` (exact SVD) or
            ``"cayley"`` (exactly orthogonal, SO(n−1) only). See the module docstring.
        steps: Newton-Schulz steps, ≥ 1 (ignored by ``"polar"``). None: the method's
            default, 12 for ``"ns"`` (its whole schedule; fewer truncates it, more appends
            classical quintic steps) and 5 for ``"ns-cubic"``. With the default, ``"ns"``
            reaches ‖HᵀH − I‖_F ≤ 2e-6 in float32 for every block of condition number
            ≤ 1e5 at n ≤ 16 (table in docs/invariants.md).
        tol: ask for convergence: keep iterating past ``steps`` (one host sync per extra
            step, at most 64 steps in all) until every block has ‖QᵀQ − I‖_F ≤ ``tol``;
            a ``RuntimeWarning`` names the blocks that cannot get there (rank-deficient
            ones never do). Ignored by ``"polar"``.
        backend: where the Newton-Schulz steps run (``"torch"``, ``"triton"``, ``"auto"``;
            None: ``HYPERCONN_KERNELS``, else auto: Triton on CUDA); see
            :func:`hyperconn.ops.newton_schulz.odd_polynomial_iteration`.

    Returns:
        (..., n, n) tensor in the input dtype (fp16/bf16 are computed in fp32) with
        ``H 1 = 1`` and ``1ᵀ H = 1ᵀ`` exactly (to rounding) and ``HᵀH ≈ I``. Degenerate
        and non-finite blocks: see the module docstring.

    Raises:
        TypeError: for a non-floating-point ``raw`` (integer, bool, complex).
        ValueError: for a non-square input, an unknown method, ``steps < 1`` or a
            non-positive ``tol``.
    """
    check_floating("raw", raw)
    check_square("raw", raw)
    if method not in ISO_METHODS:
        raise ValueError(f"method: expected one of {ISO_METHODS}, got {method!r}")
    if steps is None:
        steps = _DEFAULT_STEPS.get(method, 1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer or None, got {steps!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0):
        raise ValueError(f"tol: expected a positive number or None, got {tol!r}")
    n = raw.shape[-1]
    dtype = compute_dtype(raw)
    h = raw.to(dtype)
    if n == 1:
        return (h * 0 + 1).to(raw.dtype)  # keeps the graph; the gradient is zero
    u = helmert_basis(n, dtype, h.device)
    a = u.mT @ h @ u
    eye = torch.eye(n - 1, dtype=dtype, device=h.device)
    # A zero block has no polar factor worth the name: map it to the identity (zero
    # gradient through the ``where``; the other branch sees a finite stand-in).
    zero = torch.linalg.matrix_norm(a) <= _ZERO_BLOCK * (1 + torch.linalg.matrix_norm(h))
    zero = zero[..., None, None]
    q = _orthogonal_factor(torch.where(zero, eye, a), method, steps, tol, backend)
    q = torch.where(zero, eye, q)
    mean_part = torch.full((n, n), 1.0 / n, dtype=dtype, device=h.device)
    return (mean_part + u @ q @ u.mT).to(raw.dtype)
