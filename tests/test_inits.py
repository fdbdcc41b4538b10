"""Named initialisations (hyperconn.inits): what each sets, precedence, errors, and the
property the default was chosen for (every constrained H_res gets a gradient)."""

import math

import pytest
import torch
from torch import nn

import hyperconn
from hyperconn import HyperConnection, expand_streams, get_init
from hyperconn.models import GPT, ConnectionConfig, GPTConfig

CONSTRAINED = ("mhc", "isohc", "hybrid", "mhc-lite", "kromhc", "orthostochastic", "circulant")


def _static(variant, init, layer_index=1, n=4, **kw):
    torch.manual_seed(0)
    layer = HyperConnection(8, n, nn.Identity(), variant=variant, layer_index=layer_index, init=init, **kw)
    h_pre, h_post, h_res = layer.mixer(layer.b_pre, layer.b_post, layer.b_res)
    return layer, h_pre.detach(), h_post.detach(), h_res.detach()


def test_every_scheme_is_listed_and_unknown_names_fail():
    assert hyperconn.DEFAULT_INIT == "hyperconn"
    assert set(hyperconn.init_names()) == {"hyperconn", "copies", "hc-paper", "hyper-connections", "megatron"}
    with pytest.raises(hyperconn.ConfigError, match="^init: expected one of"):
        get_init("lucidrains")
    with pytest.raises(hyperconn.ConfigError, match="^init"):
        HyperConnection(8, 4, nn.Identity(), init="nope")
    with pytest.raises(hyperconn.ConfigError, match="connection.init"):
        GPTConfig(connection={"init": "nope"})
    with pytest.raises(hyperconn.ConfigError, match="^alpha_init"):
        ConnectionConfig(alpha_init=float("nan"))


def test_hyper_connections_scheme_matches_the_peer_package():
    """mHCv2: H_pre = σ(e_l) (0.731 at l mod n, 0.5 elsewhere), H_post = 2σ(1), H_res =
    Sinkhorn(exp(I)), dynamic weights zero, α = 0.01."""
    layer, h_pre, h_post, h_res = _static("mhc", "hyper-connections", layer_index=6)
    s1 = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(h_pre, torch.tensor([0.5, 0.5, s1, 0.5]))
    torch.testing.assert_close(h_post, torch.full((4,), 2 * s1))
    e = math.e  # exp(I) is e on the diagonal, 1 elsewhere: already doubly stochastic after scaling
    want = (torch.ones(4, 4) + (e - 1) * torch.eye(4)) / (e + 3)
    torch.testing.assert_close(h_res, want, atol=1e-5, rtol=0)
    assert torch.count_nonzero(layer.phi) == 0 and torch.equal(layer.alpha.detach(), torch.full((3,), 0.01))


def test_megatron_scheme_is_all_zero_logits():
    layer, h_pre, h_post, h_res = _static("mhc", "megatron")
    torch.testing.assert_close(h_pre, torch.full((4,), 0.5))
    torch.testing.assert_close(h_post, torch.ones(4))
    torch.testing.assert_close(h_res, torch.full((4, 4), 0.25), atol=1e-6, rtol=0)
    bound = math.sqrt(6 / sum(layer.phi.shape))  # xavier-uniform's bound
    top = float(layer.phi.detach().abs().max())
    assert 0.5 * bound < top <= bound


def test_hc_and_harmonized_keep_their_own_logits():
    """A scheme's logits assume σ gates: hc (identity maps) keeps all of its own and
    harmonized (I + εΘ) its H_res, under every scheme."""
    for init in hyperconn.init_names():
        _, h_pre, h_post, h_res = _static("hc", init, layer_index=5)
        assert torch.equal(h_pre, torch.tensor([0.0, 1.0, 0.0, 0.0])) and torch.equal(h_res, torch.eye(4))
        _, _, _, h_res = _static("harmonized", init)
        torch.testing.assert_close(h_res, torch.eye(4))


def test_explicit_options_win_over_the_scheme():
    _, h_pre, _, _ = _static("mhc", "hyperconn", pre_init="uniform")
    torch.testing.assert_close(h_pre, torch.full((4,), 0.25))
    _, _, _, h_res = _static("mhc", "megatron", res_init=4.0)  # res_init wins over the zero logits
    assert float(h_res.diagonal().min()) > 0.9
    layer, *_ = _static("mhc", "hyper-connections", alpha_init=0.1)
    assert torch.equal(layer.alpha.detach(), torch.full((3,), 0.1))
    cfg = ConnectionConfig("mhc", init="copies", stream_offset=0.3, alpha_init=0.0)
    assert cfg.offset == 0.3 and "init=copies" in cfg.describe() and "alpha=0" in cfg.describe()


def test_default_gpt_is_not_the_residual_twin_but_copies_is():
    """The default (offset + one-hot read) breaks the copies' symmetry from the first layer."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=32, seq_len=8, n_layer=1, n_head=2, n_embd=16)
    default = GPT(GPTConfig(**cfg, connection={"variant": "mhc", "dynamic": False}))
    copies = GPT(GPTConfig(**cfg, connection={"variant": "mhc", "dynamic": False, "init": "copies"}))
    copies.load_state_dict(default.state_dict())
    idx = torch.randint(0, 32, (2, 8))
    assert not torch.allclose(default(idx), copies(idx), atol=1e-4)
    x = expand_streams(torch.randn(3, 16), 4, offset=default.config.connection.offset)
    assert float((x - x.mean(-2, keepdim=True)).abs().max()) > 0  # the streams differ


def _ratio_at_init(variant: str, init: str, seed: int) -> float:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=64, seq_len=32, n_layer=2, n_head=2, n_embd=32,
                          connection={"variant": variant, "streams": 4, "init": init}))
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, 64, (16, 16), generator=g)
    seq = torch.cat([first, first], 1)
    nn.functional.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten()).backward()
    res = sum(float(c.b_res.grad.norm()) ** 2 for c in model.connections()) ** 0.5
    post = sum(float(c.b_post.grad.norm()) ** 2 for c in model.connections()) ** 0.5
    return res / post


@pytest.mark.parametrize("variant", CONSTRAINED)
def test_default_init_gives_every_constrained_h_res_a_gradient(variant):
    """The required property of the default (issue 17): ‖∂b_res‖ / ‖∂b_post‖ ≥ 3e-3 at init
    in a 2-block GPT, where exact copies give ≤ 1e-4 (docs/results/init.md)."""
    assert _ratio_at_init(variant, "hyperconn", seed=0) >= 3e-3
    assert _ratio_at_init(variant, "copies", seed=0) < 3e-3


def test_stability_hook_reports_the_coefficient_gradient_ratio(tmp_path):
    """diag/coef_grad_ratio equals ‖∂b_res‖/‖∂b_post‖ computed by a plain backward, and
    tells copies (starved) from the default init."""
    from hyperconn.diagnostics import StabilityHook

    def lm_loss(logits, targets):
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    got = {}
    for init in ("copies", "hyperconn"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, seq_len=32, n_layer=2, n_head=2, n_embd=32,
                              connection={"variant": "mhc", "streams": 4, "init": init}))
        first = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
        seq = torch.cat([first, first], 1)
        x, y = seq[:, :-1], seq[:, 1:]
        got[init] = StabilityHook()(model, x, y, lm_loss, step=0)["coef_grad_ratio"]
        assert all(c.b_res.grad is None for c in model.connections())  # .grad left alone
        lm_loss(model(x), y).backward()
        res = sum(float(c.b_res.grad.norm()) ** 2 for c in model.connections()) ** 0.5
        post = sum(float(c.b_post.grad.norm()) ** 2 for c in model.connections()) ** 0.5
        assert got[init] == pytest.approx(res / post, rel=1e-4)
    assert got["copies"] < 1e-3 < 3e-3 < got["hyperconn"]
