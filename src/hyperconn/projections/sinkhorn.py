"""Sinkhorn-Knopp projection onto the Birkhoff polytope (doubly stochastic matrices).

The iterations run in the log domain, so logits of any magnitude (tested to ±1e4) give
finite results. Columns are normalised first and rows last, which makes row sums exact
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
    """Every half-step's output with the dimension it normalised (for the backward)."""
    trace = []
    for _ in range(iters):
        z = z - torch.logsumexp(z, dim=-2, keepdim=True)
        trace.append((z, -2))
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)
        trace.append((z, -1))
    return trace


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
        return torch.exp(_log_sinkhorn(logits, iters))

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor):
        (logits,) = ctx.saved_tensors
        trace = _log_sinkhorn_trace(logits, ctx.iters)
        g = grad_p * torch.exp(trace[-1][0])
        for y, dim in reversed(trace):
            g = g - torch.exp(y) * g.sum(dim, keepdim=True)
        return g, None


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
        p = torch.exp(_log_sinkhorn(logits, iters))
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
