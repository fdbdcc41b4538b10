"""Convex mix of an isometric and a doubly stochastic transport (Iso-Birkhoff hybrid)."""

from __future__ import annotations

import torch

__all__ = ["hybrid_mix"]


def hybrid_mix(h_iso: torch.Tensor, h_birk: torch.Tensor, lam) -> torch.Tensor:
    """Return ``(1 − λ)·H_iso + λ·H_birk``.

    Both inputs are (..., n, n). Each has rows and columns summing to 1 and spectral norm
    ≤ 1, so the mix keeps all three (convexity). ``lam`` is a float in [0, 1] or a tensor
    broadcastable to the batch shape ``(...)`` (one λ per matrix).

    Raises:
        ValueError: for mismatched shapes or a float ``lam`` outside [0, 1].
    """
    if h_iso.shape != h_birk.shape:
        raise ValueError(
            f"h_birk: expected the shape of h_iso {tuple(h_iso.shape)}, got {tuple(h_birk.shape)}"
        )
    if isinstance(lam, (int, float)):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam: expected a value in [0, 1], got {lam}")
        return (1.0 - lam) * h_iso + lam * h_birk
    lam = lam.to(h_iso.dtype)[..., None, None]
    return (1.0 - lam) * h_iso + lam * h_birk
