"""composite_gain and HarmonizedController (issue 2)."""

import pytest
import torch
from torch import nn

from hyperconn import HarmonizedController, HyperConnection, composite_gain, expand_streams
from hyperconn import errors as hyperconn_errors


def test_gain_of_identity_chain_is_one():
    g = composite_gain([torch.eye(4)] * 10)
    for value in g.as_dict().values():
        assert value.item() == pytest.approx(1.0)


def test_gain_of_hand_computed_product():
    h1 = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    h2 = torch.tensor([[1.0, 0.0], [-3.0, 1.0]])
    # P = h2 @ h1 = [[1, 2], [-3, -5]]: row sums 3, -8; column sums -2, -3
    g = composite_gain([h1, h2])
    assert g.forward_amax.item() == 8.0
    assert g.backward_amax.item() == 3.0
    assert g.inf_norm.item() == 8.0      # max(|1|+|2|, |-3|+|-5|)
    assert g.one_norm.item() == 7.0      # max(1+3, 2+5)
    p = torch.tensor([[1.0, 2.0], [-3.0, -5.0]])
    assert g.spectral.item() == pytest.approx(torch.linalg.svdvals(p)[0].item(), rel=1e-6)


def test_gain_is_per_batch_element_and_broadcasts_static_layers():
    per_token = torch.stack([torch.eye(3), 2 * torch.eye(3)])  # (2, 3, 3)
    g = composite_gain([per_token, 3 * torch.eye(3)])
    assert g.forward_amax.tolist() == [3.0, 6.0]
    assert g.forward_amax.mean().item() == 4.5 and g.forward_amax.max().item() == 6.0


def test_gain_errors():
    with pytest.raises(ValueError, match="matrices"):
        composite_gain([])
    with pytest.raises(ValueError, match="matrices"):
        composite_gain([torch.eye(3), torch.eye(4)])


class Stack(nn.Module):
    def __init__(self, layers=3, n=4, dim=8, eps=1.0):
        super().__init__()
        self.layers = nn.ModuleList(
            HyperConnection(dim, n, nn.Linear(dim, dim), variant="harmonized", layer_index=i, harmonized_eps=eps)
            for i in range(layers))
        self.n = n

    def forward(self, x):
        x = expand_streams(x, self.n)
        for layer in self.layers:
            x = layer(x)
        return x


def grown_stack(scale=0.6):
    torch.manual_seed(0)
    model = Stack()
    with torch.no_grad():
        for layer in model.layers:
            layer.b_res.copy_(scale * torch.ones(4, 4))  # H_raw = I + 0.6·11ᵀ: row sums 3.4
    return model


def test_controller_follows_the_published_update_rule():
    model = grown_stack()
    ctrl = HarmonizedController(model, target_gain=2.0, beta=0.5, exponent=0.5, min_scale=0.02)
    x = torch.randn(5, 8)
    ema, scale = 1.0, 1.0
    for _ in range(6):
        model(x)
        gain = ctrl.measured_gain()  # checked against an independent product below
        ema = 0.5 * ema + 0.5 * gain
        scale = min(max(scale * (2.0 / max(1e-6, ema)) ** 0.5, 0.02), 1.0)
        assert ctrl.update() == pytest.approx(scale, rel=1e-6)
    assert ctrl.scale < 1.0
    # every harmonized layer holds the same scale
    assert all(layer.mixer.scale.item() == pytest.approx(ctrl.scale) for layer in model.layers)
    assert len({layer.mixer.scale.item() for layer in model.layers}) == 1


def test_controller_measured_gain_matches_composite_of_applied_transport():
    model = grown_stack()
    ctrl = HarmonizedController(model, target_gain=2.0)
    x = torch.randn(5, 8)
    model(x)
    with torch.no_grad():
        states, mats, h = expand_streams(x, 4), [], expand_streams(x, 4)
        for layer in model.layers:
            mats.append(layer.coefficients(h)[2])
            h = layer(h)
    expected = composite_gain(mats).forward_amax.mean().item()
    assert ctrl.measured_gain() == pytest.approx(expected, rel=1e-5)
    assert expected > 20  # (1 + 0.6·4)^3 ≈ 39 before control


def test_controller_brings_gain_towards_target_and_counts_floor_hits():
    model = grown_stack()
    ctrl = HarmonizedController(model, target_gain=2.0, beta=0.0, exponent=1.0, min_scale=0.02)
    x = torch.randn(5, 8)
    for _ in range(40):
        model(x)
        ctrl.update()
    model(x)
    assert ctrl.measured_gain() == pytest.approx(2.0, rel=0.05)
    m2 = grown_stack()
    ctrl2 = HarmonizedController(m2, target_gain=1e-3, beta=0.0, min_scale=0.1)
    for _ in range(5):
        m2(x)
        ctrl2.update()
    assert ctrl2.scale == 0.1 and ctrl2.floor_hits >= 4


def test_controller_state_dict_round_trip():
    model = grown_stack()
    ctrl = HarmonizedController(model, target_gain=2.0)
    x = torch.randn(5, 8)
    for _ in range(3):
        model(x)
        ctrl.update()
    state = ctrl.state_dict()
    fresh_model = grown_stack()
    fresh = HarmonizedController(fresh_model, target_gain=2.0)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert all(layer.mixer.scale.item() == pytest.approx(ctrl.scale) for layer in fresh_model.layers)


def test_controller_scale_has_no_gradient_and_errors():
    model = grown_stack()
    assert all(not layer.mixer.scale.requires_grad for layer in model.layers)
    with pytest.raises(ValueError, match="harmonized"):
        HarmonizedController(nn.Sequential(HyperConnection(8, 2, nn.Identity(), variant="mhc")))
    with pytest.raises(ValueError, match="target_gain"):
        HarmonizedController(model, target_gain=0)
    with pytest.raises(ValueError, match="min_scale"):
        HarmonizedController(model, min_scale=0)
    with pytest.raises(RuntimeError, match="forward"):
        HarmonizedController(grown_stack()).update()


def test_controller_max_gain_feeds_back_the_larger_of_row_and_column_amax():
    """gain="max" (the Harmonized HC source): a transport whose column sums exceed its row
    sums feeds back the column (backward) gain; "forward" the row one."""
    model = grown_stack(scale=0.0)
    with torch.no_grad():
        for layer in model.layers:  # H_raw = I + Θ with one heavy column: column sums > row sums
            layer.b_res.zero_()
            layer.b_res[:, 0] = 0.5
    x = torch.randn(5, 8)
    by_kind = {}
    for kind in ("forward", "max"):
        ctrl = HarmonizedController(model, target_gain=2.0, gain=kind)
        model(x)
        by_kind[kind] = ctrl.measured_gain()
        ctrl.close()
    with torch.no_grad():
        mats, h = [], expand_streams(x, 4)
        for layer in model.layers:
            mats.append(layer.coefficients(h)[2])
            h = layer(h)
    g = composite_gain(mats)
    assert by_kind["forward"] == pytest.approx(g.forward_amax.mean().item(), rel=1e-5)
    assert by_kind["max"] == pytest.approx(torch.maximum(g.forward_amax, g.backward_amax).mean().item(), rel=1e-5)
    assert by_kind["max"] > 1.2 * by_kind["forward"]
    with pytest.raises(hyperconn_errors.ConfigError, match="^gain"):
        HarmonizedController(model, gain="spectral")
