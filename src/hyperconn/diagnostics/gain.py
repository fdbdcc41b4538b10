"""Gain of a composite transport P = H_L ⋯ H_1 (docs/design.md §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .._dtypes import compute_dtype

__all__ = ["CompositeGain", "composite_gain", "composite_product", "gains_of"]


@dataclass
class CompositeGain:
    """Gains of a composite, each a tensor of the batch shape ``(...)``.

    forward_amax: max_i |Σ_j P_ij| (largest absolute row sum; mHC's forward Amax gain)
    backward_amax: max_j |Σ_i P_ij| (largest absolute column sum)
    inf_norm: max_i Σ_j |P_ij| (induced ∞-norm);  one_norm: max_j Σ_i |P_ij| (induced 1-norm)
    spectral: largest singular value
    """

    forward_amax: torch.Tensor
    backward_amax: torch.Tensor
    inf_norm: torch.Tensor
    one_norm: torch.Tensor
    spectral: torch.Tensor

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def composite_product(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """P = H_L ⋯ H_1 for layer matrices (..., n, n) given first layer first.

    Batch shapes broadcast, so static (n, n) and per-token (T, n, n) layers can mix.
    """
    if len(matrices) == 0:
        raise ValueError("matrices: expected at least one (..., n, n) matrix, got an empty list")
    prod = matrices[0]
    for h in matrices[1:]:
        if h.shape[-2:] != prod.shape[-2:]:
            raise ValueError(f"matrices: expected every matrix to be (..., n, n) with one n, got {tuple(h.shape)}")
        prod = h @ prod
    return prod


def gains_of(p: torch.Tensor) -> CompositeGain:
    """All gains of one composite P (..., n, n)."""
    p = p.to(compute_dtype(p))
    return CompositeGain(
        forward_amax=p.sum(-1).abs().amax(-1),
        backward_amax=p.sum(-2).abs().amax(-1),
        inf_norm=p.abs().sum(-1).amax(-1),
        one_norm=p.abs().sum(-2).amax(-1),
        spectral=torch.linalg.matrix_norm(p, ord=2),
    )


def composite_gain(matrices: Sequence[torch.Tensor]) -> CompositeGain:
    """Forward/backward Amax gains, induced ∞/1 norms and spectral norm of the composite
    of ``matrices`` (first layer first), per batch element."""
    if any(m.dim() < 2 or m.shape[-1] != m.shape[-2] for m in matrices):
        bad = next(tuple(m.shape) for m in matrices if m.dim() < 2 or m.shape[-1] != m.shape[-2])
        raise ValueError(f"matrices: expected square (..., n, n) tensors, got {bad}")
    return gains_of(composite_product(matrices))
