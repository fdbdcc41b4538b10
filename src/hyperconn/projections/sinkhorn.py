"""Sinkhorn-Knopp projection onto the Birkhoff polytope (doubly stochastic matrices).

The iterations run in the log domain, so logits of any magnitude (tested to ±1e4) give
finite results. When every matrix's logit range is small enough that no iterate can
underflow (≤ 30 in fp32), the same map is iterated in the exp domain instead, which
takes a fraction of the ops (see :func:`_exp_domain_safe`). Columns are normalised first and rows last, which makes row sums exact
(to rounding) and leaves column sums converged only as far as ``iters`` allows.
"""

from __future__ import annotations

import torch

from .._checks import check_floating, check_square
from .._dtypes import compute_dtype

__all__ = ["sinkhorn", "SINKHORN_BACKWARDS"]

SINKHORN_BACKWARDS = ("unrolled", "implicit")


def _log_sinkhorn(z: torch.Tensor, iters: int) -> torch.Tensor:
    """Log-domain iterations on ``z`` (..., n, n); returns log P."""
    for _ in range(iters):
        z = z - torch.logsumexp(z, dim=-2, keepdim=True)  # columns sum to 1
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)  # rows sum to 1 (last: exact)
    return z


def _log_sinkhorn_trace(z: torch.Tensor, iters: int) -> list[tuple[torch.Tensor, int]]:
    """Every half-step's output P_t = exp(Z_t) with the dimension it normalised."""
    trace = []
    for _ in range(iters):
        z = z - torch.logsumexp(z, dim=-2, keepdim=True)
        trace.append((torch.exp(z), -2))
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)
        trace.append((torch.exp(z), -1))
    return trace


# Largest per-matrix logit range (max − min) for which the exp-domain iteration is used.
# Every Sinkhorn iterate is diag(a)·exp(Z)·diag(b) with the ratios of a (and of b)
# within e^{±range}, so after the max-shift no entry falls below ~e^{-2·range}/n:
# e^{-60} ≫ fp32's smallest normal (1e-38), e^{-600} ≫ fp64's (1e-308).
_EXP_RANGE = {torch.float32: 30.0, torch.float64: 300.0}


def _exp_domain_safe(z: torch.Tensor) -> bool:
    """Whether every matrix of z (..., n, n) may iterate in the exp domain.

    One decision for the whole batch (a host sync); under ``torch.compile`` the log
    domain is always used so the graph has no data-dependent branch.
    """
    if torch.compiler.is_compiling() or z.numel() == 0:
        return False
    spread = z.amax((-2, -1)) - z.amin((-2, -1))
    return bool(spread.max() <= _EXP_RANGE[z.dtype])


def _tokens_inner(z: torch.Tensor) -> torch.Tensor:
    """(..., n, n) → contiguous (n, n, M): the M matrices become the innermost axis, so
    every sum over a matrix axis adds whole rows of length M, which vectorises; summing
    over a 4-wide innermost axis does not."""
    n = z.shape[-1]
    # contiguous(): elementwise ops keep their input's strides, so a permuted view
    # would leave the matrices innermost in memory.
    return z.reshape(-1, n, n).permute(1, 2, 0).contiguous()


def _tokens_outer(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_tokens_inner`: (n, n, M) → contiguous ``shape`` (..., n, n).
    Contiguous because a strided H_res sends ``baddbmm`` down a per-matrix slow path."""
    return t.permute(2, 0, 1).reshape(shape).contiguous()


def _exp_sinkhorn_trace(z: torch.Tensor, iters: int) -> list[tuple[torch.Tensor, int]]:
    """Same iterates as :func:`_log_sinkhorn_trace`, computed as P ← P / Σ_d P, in the
    (n, n, M) layout of :func:`_tokens_inner` (dims 0 = columns' sum, 1 = rows' sum).

    Why: on CPU the (…, 4, 4) matrices make every op launch-bound; a division by a sum
    is 2 tiny ops per half-step against ~8 for a log-sum-exp, and the tokens-innermost
    layout makes each of them 2–3× faster (bit-identical results). Needs
    :func:`_exp_domain_safe`.
    """
    zt = _tokens_inner(z)
    p = torch.exp(zt - zt.amax((0, 1), keepdim=True))  # the map ignores a per-matrix shift
    trace = []
    for _ in range(iters):
        p = p / p.sum(0, keepdim=True)
        trace.append((p, 0))
        p = p / p.sum(1, keepdim=True)  # rows last: exact to rounding
        trace.append((p, 1))
    return trace


def _exp_sinkhorn(z: torch.Tensor, iters: int) -> torch.Tensor:
    """P (not log P) by the exp-domain iteration; keeps only the current iterate."""
    zt = _tokens_inner(z)
    p = torch.exp(zt - zt.amax((0, 1), keepdim=True))
    for _ in range(iters):
        p.div_(p.sum(0, keepdim=True))
        p.div_(p.sum(1, keepdim=True))
    return _tokens_outer(p, z.shape)


def _unrolled_backward(trace: list[tuple[torch.Tensor, int]], grad_p: torch.Tensor) -> torch.Tensor:
    """VJP of the half-steps ``z − LSE_d(z)`` in reverse: g ← g − P_t·Σ_d g, in the
    layout of ``trace`` (``grad_p`` already in it)."""
    g = grad_p * trace[-1][0]
    for p, dim in reversed(trace):
        g = g - p * g.sum(dim, keepdim=True)
    return g


def _sinkhorn_p(z: torch.Tensor, iters: int) -> torch.Tensor:
    """P = Sinkhorn(exp z): exp domain when safe (faster), log domain otherwise."""
    if _exp_domain_safe(z):
        return _exp_sinkhorn(z, iters)
    return torch.exp(_log_sinkhorn(z, iters))


class _UnrolledSinkhorn(torch.autograd.Function):
    """The truncated map's exact gradient, keeping only the logits between passes.

    Each half-step is ``y = z − LSE_d(z)``, whose vector-Jacobian product only needs its
    own output: ``∂z = g − exp(y) · Σ_d g``. The backward recomputes the iterates (a
    transient O(iters·n²) per matrix) instead of autograd holding them from forward to
    backward, so a model with many layers stores one (n, n) input per layer.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        ctx.iters = iters
        ctx.save_for_backward(logits)
        return _sinkhorn_p(logits, iters)

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor):
        (logits,) = ctx.saved_tensors
        if _exp_domain_safe(logits):
            trace = _exp_sinkhorn_trace(logits, ctx.iters)  # (n, n, M) layout
            g = _unrolled_backward(trace, _tokens_inner(grad_p))
            return _tokens_outer(g, logits.shape), None
        return _unrolled_backward(_log_sinkhorn_trace(logits, ctx.iters), grad_p), None


def _marginal_system(p: torch.Tensor) -> torch.Tensor:
    """The (…, 2n, 2n) Jacobian of P's marginals w.r.t. its log-scalings, deflated.

    With ``P(α, β) = P ⊙ exp(α 1ᵀ + 1 βᵀ)`` the marginals ``(P1, Pᵀ1)`` move by
    ``J [dα; dβ]``, ``J = [diag(P1) P; Pᵀ diag(Pᵀ1)]``. Built from P's *actual* marginals,
    J has the exact null vector ``v = (1, −1)`` (a shift of α against β leaves P alone)
    and every right-hand side we solve is orthogonal to it, so ``J + v vᵀ/(2n)`` is
    solved instead: the same solutions, minus the null direction. (Assuming the marginals
    are exactly 1, as a pseudo-inverse of ``[I P; Pᵀ I]`` does, leaves an eigenvalue of
    O(column error²) that a tolerance cannot tell from zero.) A tiny ridge keeps the
    solve defined when P is numerically a permutation (the graph of its positive entries
    disconnected, a larger null space); it moves no solution of a connected P measurably.
    """
    n = p.shape[-1]
    rows, cols = p.sum(-1), p.sum(-2)
    top = torch.cat([torch.diag_embed(rows), p], dim=-1)
    bottom = torch.cat([p.mT, torch.diag_embed(cols)], dim=-1)
    system = torch.cat([top, bottom], dim=-2)
    v = torch.cat([torch.ones(n, dtype=p.dtype, device=p.device),
                   -torch.ones(n, dtype=p.dtype, device=p.device)])
    ridge = 1e-13 * torch.eye(2 * n, dtype=p.dtype, device=p.device)
    return system + torch.outer(v, v) / (2 * n) + ridge


def _solve(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``system⁻¹ rhs`` for (…, m, m), (…, m); non-finite systems give NaN (no raise)."""
    finite = torch.isfinite(system).all((-2, -1), keepdim=True)
    safe = torch.where(finite, system, torch.eye(system.shape[-1], dtype=system.dtype, device=system.device))
    sol = torch.linalg.solve_ex(safe, rhs.unsqueeze(-1))[0].squeeze(-1)
    return torch.where(finite.squeeze(-1), sol, torch.full_like(sol, float("nan")))


# Newton steps that polish the saved iterate onto the exact fixed point in backward.
_NEWTON_STEPS = 6


def _polish_fixed_point(p: torch.Tensor) -> torch.Tensor:
    """Newton's method on the log-scalings: P ⊙ exp(α1ᵀ + 1βᵀ) → doubly stochastic.

    The forward's iterate has exact rows but columns converged only as far as its
    iterations allowed (~1e-2 for peaked logits at 20); the fixed point it converges to
    has the same logits up to the scalings, so a few Newton steps from it (quadratic
    convergence, same linear system as the adjoint) reach the fixed point to rounding.
    A step that does not reduce a matrix's marginal error is halved (twice), then skipped.
    """
    n = p.shape[-1]
    ones = torch.ones(n, dtype=p.dtype, device=p.device)

    def error(q):
        return torch.cat([q.sum(-1) - ones, q.sum(-2) - ones], dim=-1)

    res = error(p)
    for _ in range(_NEWTON_STEPS):
        step = _solve(_marginal_system(p), -res)
        log_scale = step[..., :n, None] + step[..., None, n:]
        base, worst = p, res.abs().amax(-1)
        taken = torch.zeros_like(worst, dtype=torch.bool)
        # Full step, else a halved or quartered one (backtracking), per matrix: the first
        # of them, from the same base, that reduces the marginal error.
        for t in (1.0, 0.5, 0.25):
            cand = base * torch.exp(t * log_scale)
            cand_res = error(cand)
            take = ~taken & (cand_res.abs().amax(-1) < worst) & torch.isfinite(cand_res).all(-1)
            p = torch.where(take[..., None, None], cand, p)
            res = torch.where(take[..., None], cand_res, res)
            taken |= take
    return p


class _ImplicitSinkhorn(torch.autograd.Function):
    """Forward without a graph; backward differentiates the exact fixed point.

    At the fixed point P (doubly stochastic) with G = dL/dP, the gradient w.r.t. the
    logits is ``P ⊙ (G − a 1ᵀ − 1 bᵀ)`` where ``J [a; b] = [(P⊙G)1; (P⊙G)ᵀ1]``, J the
    marginal Jacobian of :func:`_marginal_system` (null space (1, −1), deflated there).
    The backward first polishes the saved iterate onto the fixed point
    (:func:`_polish_fixed_point`), so the gradient is the fixed point's even when the
    forward's ``iters`` left the columns off by ~1e-2. Everything runs in float64; only
    P (O(n²) per matrix) is kept, independent of the number of iterations.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        p = _sinkhorn_p(logits, iters)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor):
        (p,) = ctx.saved_tensors
        n = p.shape[-1]
        p64 = _polish_fixed_point(p.double())
        g64 = grad_p.double()
        pg = p64 * g64
        ab = _solve(_marginal_system(p64), torch.cat([pg.sum(-1), pg.sum(-2)], dim=-1))
        a, b = ab[..., :n], ab[..., n:]
        grad_logits = p64 * (g64 - a.unsqueeze(-1) - b.unsqueeze(-2))
        return grad_logits.to(grad_p.dtype), None


def sinkhorn(logits: torch.Tensor, iters: int = 20, backward: str = "unrolled") -> torch.Tensor:
    """Project ``exp(logits)`` onto the doubly stochastic matrices by Sinkhorn-Knopp.

    Args:
        logits: (..., n, n) real tensor; any number of batch dimensions.
        iters: number of (column, row) normalisation rounds, ≥ 1.
        backward: ``"unrolled"`` gives the exact gradient of the truncated iteration
            (recomputed in backward, so only the logits are stored); ``"implicit"`` differentiates the exact fixed
            point (only P is stored; see below).

    Returns:
        (..., n, n) tensor P in the input dtype with ``P ≥ 0``, rows summing to 1
        exactly (to rounding) and columns to 1 up to the convergence of ``iters`` rounds.
        fp16/bf16 inputs are computed in fp32.

        Non-finite logits give NaN for that matrix (its gradient too), never an error.
        ``backward="implicit"``: the gradient is that of the exact (converged) fixed point
        whatever ``iters`` the forward ran: the backward first polishes the saved iterate
        by Newton steps on its scalings (quadratic convergence), then solves the adjoint
        system with its null space deflated; exact to ~1e-12 in float64 for logits of
        std ≤ 2, n ≤ 8 (tested against finite differences of the converged map).

    Raises:
        TypeError: if ``logits`` is not a floating-point tensor.
        ValueError: if ``logits`` is not (..., n, n), ``iters < 1`` or ``backward`` is unknown.
    """
    check_floating("logits", logits)
    check_square("logits", logits)
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected a positive integer, got {iters!r}")
    if backward not in SINKHORN_BACKWARDS:
        raise ValueError(f"backward: expected one of {SINKHORN_BACKWARDS}, got {backward!r}")
    z = logits.to(compute_dtype(logits))  # half-precision logits lose the iteration's accuracy
    if backward == "implicit":
        p = _ImplicitSinkhorn.apply(z, iters)
    else:
        p = _UnrolledSinkhorn.apply(z, iters)
    return p.to(logits.dtype)
