"""Pure stability metrics on recorded tensors (docs/design.md §2).

Everything here is a function of tensors only: no modules, no hooks, no side effects.

- :func:`stream_similarity` — mean off-diagonal cosine similarity between the n streams
  of a token (over C), averaged over tokens. 1 for identical streams, 0 for orthogonal.
- :func:`prefix_products` / :func:`suffix_products` — the forward composites
  ``H_l ⋯ H_0`` and backward composites ``H_{L−1} ⋯ H_l`` of a layer stack.
- :func:`layer_profile` — token mean and token max of every gain of those composites.
- :func:`manifold_errors` — how far one layer's ``H_res`` is from each manifold.
- :func:`token_stats` — (mean, max) of a per-token quantity, as Python floats.
- :func:`energy_on_mean_zero` / :func:`energy_profile` — what a transport keeps of a
  mean-zero signal (its singular values on 1^⊥), per composite depth.
- :func:`transport_grad_ratio` — ``‖Pᵀg‖/‖g‖`` of the top stream gradient through the
  whole-stack transport.
- :func:`stream_effective_rank` — effective rank of each token's (n, C) stream matrix.

Matrices are ``(..., n, n)``; a static ``(n, n)`` matrix broadcasts against per-token
ones. Layer ``l`` maps ``x_l → x_{l+1}``, so a list of matrices is given first layer first.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .._dtypes import compute_dtype
from .gain import CompositeGain, gains_of

__all__ = [
    "GAIN_NAMES", "MANIFOLD_ERROR_NAMES", "token_stats", "stream_similarity",
    "stream_similarity_per_token", "prefix_products", "suffix_products", "layer_profile",
    "manifold_errors", "energy_on_mean_zero", "energy_profile", "transport_grad_ratio",
    "stream_effective_rank", "stream_effective_rank_per_token",
]

GAIN_NAMES = tuple(CompositeGain.__dataclass_fields__)  # forward_amax, backward_amax, inf_norm, one_norm, spectral
MANIFOLD_ERROR_NAMES = ("row_sum_err", "col_sum_err", "min_entry", "orth_err", "mean_err")


def _check_square(matrices: Sequence[torch.Tensor]) -> None:
    if len(matrices) == 0:
        raise ValueError("matrices: expected at least one (..., n, n) matrix, got an empty list")
    for m in matrices:
        if m.dim() < 2 or m.shape[-1] != m.shape[-2] or m.shape[-1] != matrices[0].shape[-1]:
            raise ValueError(f"matrices: expected square (..., n, n) tensors with one n, got {tuple(m.shape)}")


def token_stats(values: torch.Tensor) -> tuple[float, float]:
    """(mean, max) over every element of a per-token tensor, as floats.

    NaN propagates; an infinite element makes both infinite.
    """
    v = values.detach().double()
    if v.numel() == 0:
        raise ValueError("values: expected a non-empty tensor")
    return float(v.mean()), float(v.max())


def stream_similarity_per_token(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean off-diagonal cosine similarity between the streams of each token.

    Args:
        x: stream state ``(..., n, C)`` with n ≥ 2.
        eps: floor of each stream's norm (an all-zero stream counts as orthogonal).

    Returns:
        ``(...)`` tensor in [−1/(n−1), 1], fp32 or fp64.

    Raises:
        ValueError: if x is not at least 2-D or has fewer than 2 streams.
    """
    if x.dim() < 2:
        raise ValueError(f"x: expected shape (..., n, C), got {tuple(x.shape)}")
    n = x.shape[-2]
    if n < 2:
        raise ValueError(f"x: stream similarity needs n ≥ 2 streams, got n = {n}")
    x = x.detach()
    x = x.to(compute_dtype(x))
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    gram = u @ u.transpose(-1, -2)                         # (..., n, n) cosines
    off = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off / (n * (n - 1))


def stream_similarity(x: torch.Tensor, eps: float = 1e-12) -> float:
    """Token-averaged mean off-diagonal cosine similarity of a stream state ``(..., n, C)``.

    1 when all streams of every token are parallel (collapse), 0 when orthogonal.
    Returns NaN for a single stream (n = 1), where the quantity is undefined.
    """
    if x.dim() >= 2 and x.shape[-2] == 1:
        return math.nan
    return float(stream_similarity_per_token(x, eps).mean())


def prefix_products(matrices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Forward composites ``[H_0, H_1 H_0, …, H_{L−1} ⋯ H_0]`` (entry l = ``H_l ⋯ H_0``)."""
    _check_square(matrices)
    out = [matrices[0]]
    for h in matrices[1:]:
        out.append(h @ out[-1])
    return out


def suffix_products(matrices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Backward composites ``[H_{L−1} ⋯ H_0, H_{L−1} ⋯ H_1, …, H_{L−1}]``
    (entry l = ``H_{L−1} ⋯ H_l``: the transport a gradient at the top crosses down to x_l)."""
    _check_square(matrices)
    out = [matrices[-1]]
    for h in reversed(matrices[:-1]):
        out.append(out[-1] @ h)
    return out[::-1]


def _profile_of(matrices: Sequence[torch.Tensor], order: Sequence[int], left: bool) -> dict:
    """Gains of the running products over ``order``, reduced as they are formed so only
    one product is alive at a time (per-token products of a deep stack add up)."""
    prof = {name: {"mean": [], "max": []} for name in GAIN_NAMES}
    prod = None
    for i in order:
        h = matrices[i].detach().double()
        prod = h if prod is None else (h @ prod if left else prod @ h)
        g = gains_of(prod)
        for name in GAIN_NAMES:
            mean, mx = token_stats(getattr(g, name))
            prof[name]["mean"].append(mean)
            prof[name]["max"].append(mx)
    return prof


def layer_profile(matrices: Sequence[torch.Tensor]) -> dict:
    """Gains of every forward and backward composite, reduced over tokens.

    Args:
        matrices: ``H_res`` of each layer, first layer first, ``(..., n, n)``.

    Returns:
        ``{"forward": {gain: {"mean": [L floats], "max": [L floats]}}, "backward": {…}}``
        where ``gain`` ranges over :data:`GAIN_NAMES`; ``forward[·][l]`` is the gain of
        ``H_l ⋯ H_0`` and ``backward[·][l]`` the gain of ``H_{L−1} ⋯ H_l``. So
        ``forward[·][L−1] == backward[·][0]`` is the whole-stack composite.

    Products are taken in float64 so long unstable chains overflow late; one product is
    kept at a time.
    """
    _check_square(matrices)
    L = len(matrices)
    backward = _profile_of(matrices, range(L - 1, -1, -1), left=False)
    for gain in backward.values():  # built top-down; entry l must be H_{L−1}⋯H_l
        gain["mean"].reverse()
        gain["max"].reverse()
    return {"forward": _profile_of(matrices, range(L), left=True), "backward": backward}


def manifold_errors(h: torch.Tensor) -> dict[str, float]:
    """Distance of one layer's ``H_res`` ``(..., n, n)`` from the manifolds, worst token.

    Returns floats:
        row_sum_err: max |Σ_j H_ij − 1|  (‖H1 − 1‖_∞; 0 on Birkhoff and M_iso)
        col_sum_err: max |Σ_i H_ij − 1|  (‖1ᵀH − 1ᵀ‖_∞; 0 on Birkhoff and M_iso)
        min_entry:   min H_ij            (negativity: < 0 leaves the Birkhoff polytope)
        orth_err:    max ‖HᵀH − I‖_F     (0 on the orthogonal group)
        mean_err:    max ‖H1 − 1‖_2      (identical streams stay identical iff 0; the
                                          ℓ2 companion of row_sum_err)
    """
    if h.dim() < 2 or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"h: expected a square (..., n, n) tensor, got {tuple(h.shape)}")
    h = h.detach().double()
    n = h.shape[-1]
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    row_dev = h.sum(-1) - 1.0
    col_dev = h.sum(-2) - 1.0
    gram_dev = h.transpose(-1, -2) @ h - eye
    return {
        "row_sum_err": float(row_dev.abs().max()),
        "col_sum_err": float(col_dev.abs().max()),
        "min_entry": float(h.min()),
        "orth_err": float(torch.linalg.matrix_norm(gram_dev).max()),
        "mean_err": float(row_dev.norm(dim=-1).max()),
    }


# ---------------------------------------------------------------------- mechanism metrics
def energy_on_mean_zero(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of a mean-zero signal a transport ``p`` (..., n, n) keeps, per token.

    Every map with ``1ᵀP = 1ᵀ`` sends the mean-zero subspace 1^⊥ into itself; its action
    there is ``B = Uᵀ P U`` (U: an orthonormal basis of 1^⊥). Returns, per token, the mean
    of B's squared singular values (the fraction of a random mean-zero signal's energy that
    survives: 1 for an isometry such as a permutation, 0 for uniform averaging 11ᵀ/n, < 1
    and shrinking with depth for a non-permutation doubly stochastic chain) and B's smallest
    singular value (the worst direction). In float64. n = 1 (no 1^⊥): NaN.

    Raises:
        ValueError: for a non-square input.
    """
    from ..projections.iso import helmert_basis

    _check_square([p])
    n = p.shape[-1]
    if n == 1:
        nan = torch.full(p.shape[:-2], math.nan, dtype=torch.float64, device=p.device)
        return nan, nan
    u = helmert_basis(n, torch.float64, p.device)
    s = torch.linalg.svdvals(u.mT @ p.detach().double() @ u)
    return s.square().mean(-1), s.min(-1).values


def energy_profile(matrices: Sequence[torch.Tensor]) -> dict:
    """:func:`energy_on_mean_zero` of every forward composite ``H_l ⋯ H_0``:
    ``{"mean": [L], "min": [L]}`` (token mean of the mean σ², token min of σ_min)."""
    _check_square(matrices)
    out = {"mean": [], "min": []}
    prod = None
    for h in matrices:
        h = h.detach().double()
        prod = h if prod is None else h @ prod
        mean_sq, smallest = energy_on_mean_zero(prod)
        out["mean"].append(float(mean_sq.mean()))
        out["min"].append(float(smallest.min()))
    return out


def transport_grad_ratio(p: torch.Tensor, grad: torch.Tensor) -> float:
    """``‖Pᵀ g‖ / ‖g‖`` over all tokens: how the transport alone carries the stream gradient
    ``g`` (..., n, C) of the top layer down to the input (IsoHC's theorem: exactly 1 for a
    composite of isometries). ``p``: the whole-stack composite (..., n, n) or (n, n). NaN
    for a zero gradient."""
    g = grad.detach().double()
    pt = p.detach().double().transpose(-1, -2)
    den = float(g.norm())
    return float((pt @ g).norm()) / den if den > 0 else math.nan


def stream_effective_rank_per_token(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Effective rank of each token's (n, C) stream matrix: ``exp(H(σ/Σσ))`` of its singular
    values (Roy & Vetterli), in [1, n]: 1 when the streams are parallel, n when they are
    orthogonal with equal norms. ``x``: (..., n, C) → (...) in float64."""
    s = torch.linalg.svdvals(x.detach().double())
    q = s / s.sum(-1, keepdim=True).clamp_min(eps)
    entropy = -(q * torch.log(q.clamp_min(eps))).sum(-1)
    return entropy.exp()


def stream_effective_rank(x: torch.Tensor) -> float:
    """Token mean of :func:`stream_effective_rank_per_token`; NaN for n = 1."""
    if x.dim() >= 2 and x.shape[-2] == 1:
        return math.nan
    return float(stream_effective_rank_per_token(x).mean())
