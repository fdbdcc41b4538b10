"""pre_init: the static H_pre at init, and the stream symmetry it keeps or breaks."""

import pytest
import torch
from torch import nn

from hyperconn import HyperConnection, expand_streams
from hyperconn.experiments.compare import _same_config
from hyperconn.models import ConnectionConfig
from hyperconn.train.config import TrainConfig


def _h_pre(variant, layer_index=0, n=4, **options):
    hc = HyperConnection(8, n, nn.Identity(), variant=variant, dynamic=False, layer_index=layer_index, **options)
    return hc.coefficients(torch.zeros(n, 8))[0]


def test_default_read_is_onehot_and_copies_keeps_the_variants_own():
    """The default init ("hyperconn") reads one stream per layer; init="copies" keeps
    each variant's own read (one-hot for hc, uniform for the constrained maps)."""
    assert torch.equal(_h_pre("hc", layer_index=5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(_h_pre("hc", layer_index=5, init="copies"), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    for v in ("mhc", "isohc", "hybrid", "harmonized"):
        torch.testing.assert_close(_h_pre(v, init="copies"), torch.full((4,), 0.25))
        h = _h_pre(v, layer_index=6)
        assert int(h.argmax()) == 2 and float(h[2]) == pytest.approx(float(torch.sigmoid(torch.tensor(4.0))))


@pytest.mark.parametrize("variant", ["mhc", "isohc", "hybrid", "harmonized"])
def test_onehot_reads_stream_layer_index_mod_n(variant):
    for layer in range(6):
        h = _h_pre(variant, layer_index=layer, pre_init="onehot")
        assert int(h.argmax()) == layer % 4
        torch.testing.assert_close(h[layer % 4], torch.sigmoid(torch.tensor(4.0)))
        torch.testing.assert_close(h.sum() - h[layer % 4], 3 * torch.sigmoid(torch.tensor(-4.0)))


def test_hc_uniform_and_errors():
    torch.testing.assert_close(_h_pre("hc", pre_init="uniform"), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="pre_init"):
        HyperConnection(8, 4, nn.Identity(), variant="mhc", pre_init="diagonal")
    with pytest.raises(ValueError, match="pre_init"):
        ConnectionConfig(variant="isohc", pre_init="x")
    assert "pre_init=onehot" in ConnectionConfig(variant="mhc", pre_init="onehot").describe()
    HyperConnection(8, 1, nn.Identity(), variant="residual", pre_init="onehot")  # accepted, ignored


@pytest.mark.parametrize("pre_init, separates", [("uniform", False), ("onehot", True)])
def test_symmetry_of_copied_streams(pre_init, separates):
    """Static isohc (exact polar: rows and columns of H_res sum to 1 exactly; mhc's columns
    are only as exact as Sinkhorn converged), streams that start as copies. Any H_pre and
    an H_res with unit row sums map
    equal streams to equal streams, so the forward keeps them equal whatever pre_init is.
    With a uniform read the loss is symmetric in the streams, every stream gets the same
    gradient, and after an optimizer step they are still copies. The one-hot read makes
    later layers depend on different streams: the H_post gradients differ per stream and
    one step separates the streams."""
    torch.manual_seed(0)
    layers = nn.ModuleList(HyperConnection(8, 4, nn.Sequential(nn.Linear(8, 8), nn.Tanh()), variant="isohc",
                                           iso_method="polar", dynamic=False, layer_index=i, pre_init=pre_init)
                           for i in range(3))
    with torch.no_grad():  # a non-identity static H_res, so equal rows are a real property
        for hc in layers:
            hc.b_res.add_(0.5 * torch.randn(4, 4))
    inp = expand_streams(torch.randn(5, 8), 4)

    def forward():
        x = inp
        for hc in layers:
            x = hc(x)
        return x, float((x - x.mean(-2, keepdim=True)).abs().max().detach())

    x, spread0 = forward()
    assert spread0 < 1e-6
    (x.sin().sum()).backward()
    post_spread = max(float(hc.b_post.grad.max() - hc.b_post.grad.min()) for hc in layers)
    with torch.no_grad():
        for p in layers.parameters():
            p -= 0.1 * p.grad
    _, spread1 = forward()
    if separates:
        assert post_spread > 1e-4 and spread1 > 1e-4
    else:
        assert post_spread < 1e-6 and spread1 < 1e-6


def test_compare_treats_missing_new_settings_as_defaults():
    cfg = TrainConfig()
    saved = cfg.to_dict()
    del saved["model"]["connection"]["pre_init"]  # a run saved before the setting existed
    assert _same_config(saved, cfg)
    saved["model"]["connection"]["pre_init"] = "onehot"
    assert not _same_config(saved, cfg)
    assert not _same_config({"model": {"nope": 1}}, cfg)
