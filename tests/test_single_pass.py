"""Single-pass reads (DeepSeek V4.1 style): layer l reads x_l with the H_pre that layer l−1
computed from x_{l−1}; the first layer reads with its static σ(b_pre)."""

import pytest
import torch
from torch import nn

import hyperconn
from hyperconn import HyperConnection
from hyperconn.models import GPT, GPTConfig


def stack(variant="mhc", depth=3, n=4, C=8, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    layers = [HyperConnection(C, n, nn.Linear(C, C), variant=variant, single_pass=True, layer_index=i,
                              alpha_init=0.5, **kw).to(dtype) for i in range(depth)]
    for layer in layers:
        with torch.no_grad():
            layer.b_pre.add_(torch.randn_like(layer.b_pre))
    return layers


def run(layers, x):
    state = x
    for layer in layers:
        state = layer(state)
    return state


@pytest.mark.parametrize("variant", ["hc", "mhc", "isohc", "mhc-lite", "harmonized"])
def test_matches_an_independent_computation(variant):
    layers = stack(variant)
    x = torch.randn(2, 5, 4, 8)
    out, next_read = run(layers, x)
    # Independently: the coefficients of each layer from its own input (HyperConnection.coefficients),
    # the read from the previous layer's H_pre, the first read stream 0.
    xs, read = x, None
    for i, layer in enumerate(layers):
        h_pre, h_post, h_res = layer.coefficients(xs)
        if i == 0:
            read = xs[..., 0, :]                                         # the first layer reads stream 0
        y = layer.branch(read)
        xs = torch.einsum("btij,btjc->btic", h_res, xs) + h_post.unsqueeze(-1) * y.unsqueeze(-2)
        read = torch.einsum("btj,btjc->btc", h_pre, xs)
    torch.testing.assert_close(out, xs)
    torch.testing.assert_close(next_read, read)


def test_gradcheck_float64_and_recompute():
    layers = stack("mhc", depth=2, n=3, C=4, dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [p for layer in layers for p in layer.parameters()]
    assert torch.autograd.gradcheck(lambda x, *ps: run(layers, x)[0], (x, *params), eps=1e-6, atol=1e-5)
    plain = stack("mhc")
    again = stack("mhc", recompute=True)
    xa = torch.randn(2, 5, 4, 8, requires_grad=True)
    xb = xa.detach().clone().requires_grad_()
    run(plain, xa)[0].square().sum().backward()
    run(again, xb)[0].square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_split_call_and_errors():
    layer = stack("mhc", depth=1)[0]
    x = torch.randn(2, 5, 4, 8)
    read, finish = layer.pre(x)
    out, next_read = finish(layer.branch(read))
    torch.testing.assert_close((out, next_read), layer(x))
    with pytest.raises(ValueError, match="single-pass"):
        layer((x, torch.randn(2, 5, 7)))
    with pytest.raises(hyperconn.ConfigError, match="^single_pass"):
        HyperConnection(8, 2, nn.Identity(), variant="mhc", single_pass=True, channel_first=True)
    assert not HyperConnection(8, 1, nn.Identity(), variant="residual", single_pass=True).single_pass


def test_gpt_single_pass_trains_and_differs_from_two_pass():
    base = dict(n_layer=2, n_embd=16, n_head=2, seq_len=16)
    torch.manual_seed(0)
    two = GPT(GPTConfig(**base, connection={"variant": "mhc", "streams": 4}))
    torch.manual_seed(0)
    one = GPT(GPTConfig(**base, connection={"variant": "mhc", "streams": 4, "single_pass": True}))
    assert "single-pass" in one.config.describe()
    idx = torch.randint(0, 256, (2, 16))
    out = one(idx)
    assert out.shape == (2, 16, 256) and torch.isfinite(out).all()
    assert not torch.allclose(out, two(idx))       # the reads differ (dynamic H_pre, shifted)
    out.logsumexp(-1).mean().backward()
    # every coefficient learns: the last prediction is the model's contraction
    assert all(p.grad is not None for n_, p in one.named_parameters() if n_.endswith(("phi", "b_res", "b_pre")))
