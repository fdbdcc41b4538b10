"""Sinkhorn-Knopp projection onto the Birkhoff polytope (doubly stochastic matrices).

The iterations run in the log domain, so logits of any magnitude (tested to ±1e4) give
finite results. When every matrix's logit range is small enough that no iterate can
underflow (≤ 30 in fp32), the same map is iterated in the exp domain instead, which
takes a fraction of the ops (see :func:`_exp_domain_safe`). Columns are normalised first and rows last, which makes row sums exact
(to rounding) and leaves column sums converged only as far as ``iters`` allows.
"""

from __future__ import annotations

import torch

__all__ = ["sinkhorn", "SINKHORN_BACKWARDS"]

SINKHORN_BACKWARDS = ("unrolled", "implicit")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision logits lose the iteration's accuracy; compute in fp32 instead.
    return torch.float64 if dtype == torch.float64 else torch.float32


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


class _ImplicitSinkhorn(torch.autograd.Function):
    """Forward without a graph; backward differentiates the exact fixed point.

    With P doubly stochastic and G = dL/dP, the gradient w.r.t. the logits is
    ``P ⊙ (G − a 1ᵀ − 1 bᵀ)`` where ``[I P; Pᵀ I][a; b] = [(P⊙G)1; (P⊙G)ᵀ1]``.
    The system has the one-dimensional null space (1, −1) (larger when P is a
    permutation); every solution gives the same gradient, so the minimum-norm
    solution from a symmetric pseudo-inverse is used. Memory is O(n²) per matrix,
    independent of the number of iterations.
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
        # Solve in float64: the block system is tiny and can be ill-conditioned.
        p64, g64 = p.double(), grad_p.double()
        pg = p64 * g64
        rhs = torch.cat([pg.sum(-1), pg.sum(-2)], dim=-1).unsqueeze(-1)  # (..., 2n, 1)
        eye = torch.eye(n, dtype=torch.float64, device=p.device).expand_as(p64)
        system = torch.cat(
            [torch.cat([eye, p64], dim=-1), torch.cat([p64.mT, eye], dim=-1)], dim=-2
        )
        ab = torch.linalg.pinv(system, hermitian=True) @ rhs
        a, b = ab[..., :n, 0], ab[..., n:, 0]
        grad_logits = p64 * (g64 - a.unsqueeze(-1) - b.unsqueeze(-2))
        return grad_logits.to(grad_p.dtype), None


def sinkhorn(logits: torch.Tensor, iters: int = 20, backward: str = "unrolled") -> torch.Tensor:
    """Project ``exp(logits)`` onto the doubly stochastic matrices by Sinkhorn-Knopp.

    Args:
        logits: (..., n, n) real tensor; any number of batch dimensions.
        iters: number of (column, row) normalisation rounds, ≥ 1.
        backward: ``"unrolled"`` gives the exact gradient of the truncated iteration
            (recomputed in backward, so only the logits are stored); ``"implicit"`` differentiates the exact fixed
            point (memory independent of ``iters``; accurate when the forward converged).

    Returns:
        (..., n, n) tensor P in the input dtype with ``P ≥ 0``, rows summing to 1
        exactly (to rounding) and columns to 1 up to the convergence of ``iters`` rounds.
        fp16/bf16 inputs are computed in fp32.

    Raises:
        ValueError: if ``logits`` is not (..., n, n), ``iters < 1`` or ``backward`` is unknown.
    """
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits: expected shape (..., n, n), got {tuple(logits.shape)}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected a positive integer, got {iters!r}")
    if backward not in SINKHORN_BACKWARDS:
        raise ValueError(f"backward: expected one of {SINKHORN_BACKWARDS}, got {backward!r}")
    z = logits.to(_compute_dtype(logits.dtype))
    if backward == "implicit":
        p = _ImplicitSinkhorn.apply(z, iters)
    else:
        p = _UnrolledSinkhorn.apply(z, iters)
    return p.to(logits.dtype)
