"""The mechanism diagnostics against hand-computed values (issue 17, point 3)."""

import math

import pytest
import torch

from hyperconn.diagnostics import (energy_on_mean_zero, energy_profile, stream_effective_rank,
                                   stream_effective_rank_per_token, transport_grad_ratio)


def test_energy_retention_known_values():
    n = 4
    perm = torch.eye(n)[[2, 0, 3, 1]]
    mean_sq, smallest = energy_on_mean_zero(perm)
    torch.testing.assert_close(mean_sq, torch.tensor(1.0, dtype=torch.float64))   # permutation: isometry on 1^⊥
    torch.testing.assert_close(smallest, torch.tensor(1.0, dtype=torch.float64))
    avg = torch.full((n, n), 1.0 / n)
    mean_sq, smallest = energy_on_mean_zero(avg)
    assert float(mean_sq) < 1e-28 and float(smallest) < 1e-14                      # uniform averaging kills 1^⊥
    eye = torch.eye(n)
    torch.testing.assert_close(energy_on_mean_zero(eye)[0], torch.tensor(1.0, dtype=torch.float64))
    # A lazy walk H = (1 − t) I + t 11ᵀ/n keeps (1 − t)² of every mean-zero direction; L layers: (1 − t)^{2L}.
    t = 0.3
    lazy = (1 - t) * eye + t * avg
    prof = energy_profile([lazy] * 3)
    for depth, value in enumerate(prof["mean"], start=1):
        assert math.isclose(value, (1 - t) ** (2 * depth), rel_tol=1e-6)  # fp32 inputs
    assert math.isnan(float(energy_on_mean_zero(torch.ones(1, 1))[0]))


def test_energy_retention_per_token_shape():
    p = torch.eye(3).expand(2, 5, 3, 3)
    mean_sq, smallest = energy_on_mean_zero(p)
    assert mean_sq.shape == (2, 5) and smallest.shape == (2, 5)


def test_transport_grad_ratio_known_values():
    g = torch.randn(7, 4, 16)
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    assert math.isclose(transport_grad_ratio(q, g), 1.0, rel_tol=1e-6)            # orthogonal: 1 (fp32 Q)
    assert math.isclose(transport_grad_ratio(2 * torch.eye(4), g), 2.0, rel_tol=1e-12)
    mean_g = g - g.mean(-2, keepdim=True)                                          # mean-zero over streams
    assert transport_grad_ratio(torch.full((4, 4), 0.25), mean_g) < 1e-7          # averaging kills it
    assert math.isnan(transport_grad_ratio(torch.eye(4), torch.zeros(2, 4, 3)))


def test_stream_effective_rank_known_values():
    v = torch.randn(5, 1, 8)
    copies = v.expand(5, 4, 8)
    torch.testing.assert_close(stream_effective_rank_per_token(copies), torch.ones(5, dtype=torch.float64))
    orthogonal = torch.eye(4, 8).expand(3, 4, 8) * 2.5
    torch.testing.assert_close(stream_effective_rank_per_token(orthogonal), torch.full((3,), 4.0, dtype=torch.float64))
    two = torch.zeros(1, 4, 8)
    two[0, 0, 0] = two[0, 1, 1] = 1.0                                               # rank 2, equal norms
    assert math.isclose(stream_effective_rank(two), 2.0, rel_tol=1e-9)
    assert math.isnan(stream_effective_rank(torch.randn(3, 1, 8)))


@pytest.mark.parametrize("variant,ratio", [("isohc", 1.0), ("hc", None)])
def test_stability_hook_reports_the_mechanism(variant, ratio, tmp_path):
    import json
    from torch import nn
    from hyperconn import HyperConnection, expand_streams, reduce_streams
    from hyperconn.diagnostics import StabilityHook

    torch.manual_seed(0)
    layers = nn.ModuleList(HyperConnection(8, 4, nn.Linear(8, 8), variant=variant, iso_method="polar",
                                           layer_index=i) for i in range(3))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, inputs):
            x = expand_streams(inputs, 4) + torch.randn(4, 8) * 0.1
            for layer in self.layers:
                x = layer(x)
            return reduce_streams(x)

    scalars = StabilityHook(tmp_path)(Stack(), torch.randn(2, 5, 8), torch.zeros(2, 5, 8),
                                      lambda out, y: (out - y).square().mean(), step=3)
    for key in ("transport_grad_ratio", "energy_retention", "energy_retention_min", "stream_rank", "stream_rank_last"):
        assert math.isfinite(scalars[key]), key
    assert 1.0 <= scalars["stream_rank_last"] <= 4.0
    if ratio is not None:  # a composite of exact isometries: both are 1
        assert math.isclose(scalars["transport_grad_ratio"], ratio, rel_tol=1e-5)
        assert math.isclose(scalars["energy_retention"], 1.0, rel_tol=1e-5)
    payload = json.loads((tmp_path / "diagnostics" / "step_0000003.json").read_text())
    assert len(payload["energy"]["mean"]) == 3 and len(payload["stream_rank"]) == 4
