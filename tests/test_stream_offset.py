"""Symmetry-breaking stream expansion: zero-mean per-stream offsets (issue 17)."""

import pytest
import torch
from torch import nn

import hyperconn
from hyperconn import HyperConnection, expand_streams, reduce_streams, stream_offsets
from hyperconn.models import GPT, GPTConfig


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_offsets_are_zero_mean_unit_rms_and_deterministic(n):
    e = stream_offsets(n, 32, torch.float64)
    assert e.shape == (n, 32)
    torch.testing.assert_close(e.sum(0), torch.zeros(32, dtype=torch.float64), atol=1e-12, rtol=0)
    if n > 1:
        torch.testing.assert_close(e.square().mean(), torch.tensor(1.0, dtype=torch.float64))
    state = torch.random.get_rng_state()
    assert torch.equal(stream_offsets(n, 32, torch.float64), e)
    assert torch.equal(torch.random.get_rng_state(), state)           # the global RNG is untouched


def test_expand_with_offset_keeps_the_mean_and_scales_with_the_token():
    x = torch.randn(3, 5, 16)
    s = expand_streams(x, 4, offset=0.1)
    torch.testing.assert_close(reduce_streams(s), x, atol=1e-6, rtol=0)
    rms = x.square().mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(s - x.unsqueeze(-2), 0.1 * rms.unsqueeze(-2) * stream_offsets(4, 16))
    assert torch.equal(expand_streams(x, 4, offset=0.0), expand_streams(x, 4))
    with pytest.raises(ValueError, match="^offset"):
        expand_streams(x, 4, offset=-1.0)
    with pytest.raises(ValueError, match="^offset"):
        expand_streams(torch.randn(2, 16, 3, 3), 4, channel_first=True, offset=0.1)


@pytest.mark.parametrize("variant", ["isohc", "mhc-lite", "kromhc", "circulant"])  # exact maps (not Sinkhorn)
def test_offset_keeps_the_residual_equivalence_at_init_and_feeds_h_res(variant):
    """Uniform read + doubly stochastic H_res + H_post = 1: the mean output equals the
    residual model's exactly, yet ∂L/∂b_res is no longer zero."""
    torch.manual_seed(0)
    C, n = 16, 4
    branch = nn.Linear(C, C)
    # float64: with copies ∂L/∂b_res is rounding only, which in fp32 came within 5 % of the
    # offset's (small) gradient on some machines; in fp64 it is ~1e-15.
    branch = branch.double()
    layer = HyperConnection(C, n, branch, variant=variant, dynamic=False, init="copies").double()  # uniform read
    with torch.no_grad():  # an exactly doubly stochastic, non-identity static map, uniform read
        layer.b_res.normal_()
    x = torch.randn(6, C, dtype=torch.float64)
    out = layer(expand_streams(x, n, offset=0.2))
    h_post = layer.coefficients(expand_streams(x, n))[1]
    torch.testing.assert_close(h_post, torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(reduce_streams(out), x + branch(x), atol=1e-5, rtol=0)
    out.square().sum().backward()
    assert layer.b_res.grad.abs().max() > 1e-6
    copies = HyperConnection(C, n, branch, variant=variant, dynamic=False, init="copies").double()
    copies.load_state_dict(layer.state_dict())
    copies(expand_streams(x, n)).square().sum().backward()
    assert copies.b_res.grad.abs().max() < 1e-3 * layer.b_res.grad.abs().max()  # copies: rounding only


def test_gpt_option():
    cfg = GPTConfig(n_layer=1, n_embd=16, n_head=2, seq_len=8, connection={"variant": "mhc", "stream_offset": 0.2})
    assert "offset=0.2" in cfg.connection.describe() and cfg.connection.offset == 0.2
    assert GPTConfig(connection={"variant": "mhc"}).connection.offset == 0.1  # the default scheme's
    assert GPTConfig(connection={"variant": "mhc", "init": "copies"}).connection.offset == 0.0
    assert GPTConfig(connection={"variant": "residual", "streams": 1}).connection.offset == 0.0
    assert torch.isfinite(GPT(cfg)(torch.zeros(1, 8, dtype=torch.long))).all()
    with pytest.raises(hyperconn.ConfigError, match="stream_offset"):
        GPTConfig(connection={"variant": "mhc", "stream_offset": -0.1})


def test_gpt_with_offset_compiles_fullgraph():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_embd=16, n_head=2, seq_len=8, connection={"variant": "mhc", "stream_offset": 0.1})
    model = GPT(cfg)
    idx = torch.randint(0, 256, (2, 8))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_building_a_model_on_the_meta_device_leaves_later_models_alone():
    """The pattern and its cached basis are built on the CPU: a GPT made under
    ``torch.device("meta")`` (to count parameters) must not poison them for the next."""
    with torch.device("meta"):
        meta = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, seq_len=8, connection={"variant": "mhc", "streams": 3}))
    assert meta.stream_pattern.is_meta
    model = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, seq_len=8, connection={"variant": "mhc", "streams": 3}))
    assert model.stream_pattern.device.type == "cpu"
    assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long))).all()


def test_expand_streams_module_takes_the_offset():
    x = torch.randn(2, 5, 16)
    m = hyperconn.ExpandStreams(4, offset=0.1)
    torch.testing.assert_close(m(x), expand_streams(x, 4, offset=0.1))
    assert "offset=0.1" in repr(m)
    with pytest.raises(ValueError, match="^offset"):
        hyperconn.ExpandStreams(4, offset=-1)
    with pytest.raises(ValueError, match="^offset"):
        hyperconn.ExpandStreams(4, channel_first=True, offset=0.1)
