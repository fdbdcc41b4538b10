"""The one compute-dtype rule of hyperconn.

Coefficients, projections and diagnostics are computed in fp32, or in fp64 when any input
is fp64: half-precision inputs are upcast (Sinkhorn, Newton-Schulz and gain products lose
their accuracy in bf16/fp16), and a float64 layer stays float64 end to end (gradchecks).
"""

from __future__ import annotations

import torch

__all__ = ["compute_dtype"]


def compute_dtype(*items) -> torch.dtype:
    """``torch.float64`` if any item (a tensor or a dtype) is fp64, else ``torch.float32``."""
    for item in items:
        if (item if isinstance(item, torch.dtype) else item.dtype) == torch.float64:
            return torch.float64
    return torch.float32
