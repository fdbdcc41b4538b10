"""``residual``: the plain Pre-Norm residual x + F(x) (n = 1, no coefficients)."""

import torch

from .base import Variant


class Residual(Variant):
    """Plain Pre-Norm residual: n = 1, H_pre = H_post = H_res = 1, no coefficients."""

    name = "residual"
    has_coefficients = False
    style = {"color": "#555555", "marker": "s"}

    @classmethod
    def streams_error(cls, streams):
        return None if streams == 1 else f"variant 'residual' expects streams=1, got {streams}"

    def forward(self, raw_pre, raw_post, raw_res, state=None):
        one = torch.ones_like(raw_pre)
        return one, one, torch.ones_like(raw_res)
