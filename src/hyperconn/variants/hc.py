"""``hc``: unconstrained Hyper-Connections (arXiv:2409.19606)."""

import torch

from .base import Variant


class HC(Variant):
    """Unconstrained Hyper-Connections (arXiv:2409.19606).

    No activation on the static part, tanh on the dynamic part. Init exactly Pre-Norm, as
    the HC paper (and the public ``hyper-connections`` package) start: H_res = I, H_pre
    one-hot at ``layer_index % n`` (``pre_init="uniform"``: 1/n each instead), H_post all
    ones, and the dynamic projection φ = 0, so with ``dynamic=True`` the coefficients
    start exactly at the static map (α = 0.01 only scales what φ learns).
    """

    name = "hc"
    pre_init = "onehot"
    phi_init = "zero"
    res_init_default = 1.0
    scheme_logits = ()  # its maps are the identity: logits 0 would be H = 0
    style = {"color": "#d62728", "marker": "o"}

    def dynamic_activation(self, raw):
        return torch.tanh(raw)

    def static_init(self):
        n = self.streams
        if self.pre_init == "uniform":
            b_pre = torch.full((n,), 1.0 / n)
        else:
            b_pre = torch.zeros(n)
            b_pre[self.layer_index % n] = 1.0
        return b_pre, torch.ones(n), self.res_init * torch.eye(n)

    def map_pre_post(self, raw_pre, raw_post):
        return raw_pre, raw_post

    def map_res(self, raw_res, state):
        return raw_res

    def fused_maps(self):
        return ("linear", 0) if self._keeps_maps_of(HC) else None
