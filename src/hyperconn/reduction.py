"""LearnedReduce: the final n → 1 contraction of the streams with learned, per-token
gates, as DeepSeek V4's output head reads its hyper-connected streams.

    y = Σ_j w_j x_j,   w = σ(b + α · rms(x) · (vec(x) φ))          x: (..., n, C) → (..., C)

with ``b = −log(n − 1)`` (σ(b) = 1/n), ``φ = 0`` and α = 0.01 at init, so the module starts
*exactly* as the mean over streams (the residual equivalence of ``reduce_streams`` holds at
init) and learns which streams the head reads. ``rms(x)`` is the RMS of the flattened
streams, applied after the GEMM as in the layer's coefficient projection.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_floating
from .errors import ConfigError
from .ops import reference

__all__ = ["LearnedReduce", "REDUCTIONS"]

REDUCTIONS = ("mean", "learned")


class LearnedReduce(nn.Module):
    """Sigmoid-gated weighted sum over the n streams: (..., n, C) → (..., C).

    Args:
        dim: channel width C.
        streams: n ≥ 1.
        alpha_init: initial scale of the dynamic part (0.01).
        norm_eps: ε of the RMS scaling.

    Raises:
        ConfigError: for a non-positive ``dim`` or ``streams``.
        ValueError: (in forward) for an input whose last two dimensions are not (n, C).
        TypeError: (in forward) for non-floating-point streams.
    """

    def __init__(self, dim: int, streams: int, alpha_init: float = 0.01, norm_eps: float = 1e-6):
        super().__init__()
        for name, value in (("dim", dim), ("streams", streams)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"expected a positive integer, got {value!r}")
        self.dim, self.streams, self.norm_eps = dim, streams, norm_eps
        self.bias = nn.Parameter(torch.full((streams,), -math.log(streams - 1) if streams > 1 else 20.0))
        self.phi = nn.Parameter(torch.zeros(streams * dim, streams))
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token gates w (..., n), in fp32 (fp64 for float64 streams)."""
        check_floating("x", x)
        if x.dim() < 2 or x.shape[-2:] != (self.streams, self.dim):
            raise ValueError(f"x: expected shape (..., streams={self.streams}, dim={self.dim}), got {tuple(x.shape)}")
        proj = reference.rms_projection(x, self.phi, self.norm_eps)  # (..., n), in compute_dtype(x, φ)
        return torch.sigmoid(self.bias.to(proj.dtype) + self.alpha.to(proj.dtype) * proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights(x)
        return (w.unsqueeze(-2) @ x.to(w.dtype)).squeeze(-2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, streams={self.streams}"
