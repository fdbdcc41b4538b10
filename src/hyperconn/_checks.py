"""Argument checks shared by the public functions: one message style, naming the argument."""

from __future__ import annotations

import torch

__all__ = ["check_floating", "check_square", "is_offset"]


def check_floating(name: str, x) -> None:
    """``TypeError`` naming ``name`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {got}")


def is_offset(value) -> bool:
    """Whether ``value`` is a valid stream offset: a finite number ≥ 0 (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < float("inf")


def check_square(name: str, x: torch.Tensor) -> None:
    """``ValueError`` naming ``name`` unless ``x`` is (..., n, n) with n ≥ 1."""
    if x.dim() < 2 or x.shape[-1] != x.shape[-2] or x.shape[-1] < 1:
        raise ValueError(f"{name}: expected shape (..., n, n) with n ≥ 1, got {tuple(x.shape)}")
