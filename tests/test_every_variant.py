"""The contract every registered variant meets (built-in or added later): a new variant
file is covered here without editing this test.

For each name in ``hyperconn.VARIANTS``: a float64 gradcheck of the whole layer far from
init, dynamic on and off, bf16 streams, recompute, ``torch.compile(fullgraph=True)`` on
CPU, the probe and the stability hook, a one-line description, and the residual limit.
"""

import math

import pytest
import torch
from torch import nn

import hyperconn
from hyperconn import HyperConnection, expand_streams, reduce_streams
from hyperconn.diagnostics import Probe, StabilityHook
from hyperconn.models import ConnectionConfig

VARIANTS = tuple(hyperconn.VARIANTS)


def streams_for(variant, n=4):
    cls = hyperconn.get_variant(variant)
    return n if cls.streams_error(n) is None else 1


def far_from_init(layer, scale=1.0, seed=0):
    """Random static logits and dynamic weights (not the init), so every map is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name in ("b_pre", "b_post", "b_res", "phi") or name.startswith("mixer."):
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name == "alpha":
                p.fill_(0.5)
    return layer


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dynamic", [True, False])
def test_layer_gradcheck_float64_far_from_init(variant, dynamic):
    torch.manual_seed(0)
    n, C = streams_for(variant, 3), 4
    layer = far_from_init(HyperConnection(C, n, nn.Linear(C, C), variant=variant, dynamic=dynamic)).double()
    x = torch.randn(2, n, C, dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert torch.autograd.gradcheck(lambda x, *ps: layer(x), (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_streams_recompute_and_compile(variant):
    torch.manual_seed(1)
    n, C = streams_for(variant), 16
    layer = far_from_init(HyperConnection(C, n, nn.Linear(C, C), variant=variant), scale=0.5)
    x = torch.randn(3, 5, n, C)
    want = layer(x)
    assert want.shape == x.shape and torch.isfinite(want).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = layer(x.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), want, atol=0.1, rtol=0.05)
    recomputed = HyperConnection(C, n, nn.Linear(C, C), variant=variant, recompute=True)
    recomputed.load_state_dict(layer.state_dict())
    recomputed.branch.load_state_dict(layer.branch.state_dict())
    xr = x.clone().requires_grad_()
    xp = x.clone().requires_grad_()
    layer(xp).square().sum().backward()
    recomputed(xr).square().sum().backward()
    torch.testing.assert_close(xr.grad, xp.grad)
    torch._dynamo.reset()  # one fresh compile per variant (all share HyperConnection.forward)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_probe_stability_hook_and_description(variant, tmp_path):
    torch.manual_seed(2)
    n, C = streams_for(variant), 8
    layers = nn.ModuleList(HyperConnection(C, n, nn.Linear(C, C), variant=variant, layer_index=i)
                           for i in range(3))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, inputs):
            x = expand_streams(inputs, n)
            for layer in self.layers:
                x = layer(x)
            return reduce_streams(x)

    model = Stack()
    inputs = torch.randn(2, 5, C)
    with Probe(model) as probe:
        model(inputs)
    assert len(probe.records) == 3 and probe.records[0].h_res.shape == (2, 5, n, n)
    scalars = StabilityHook(tmp_path)(model, inputs, torch.zeros(2, 5, C),
                                      lambda out, y: (out - y).square().mean(), step=1)
    assert math.isfinite(scalars["gain_fwd_mean"])
    assert all(layer.observers == () for layer in layers)
    line = ConnectionConfig(variant=variant, streams=n).describe()
    assert line.startswith(f"{variant} n={n}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_stream_is_prenorm_residual(variant):
    """With n = 1 every map has H_res = 1 on the identity-like init… and at least keeps the
    stream finite; the residual and static hc are exactly x + F(x)."""
    torch.manual_seed(3)
    if hyperconn.get_variant(variant).streams_error(1) is not None:
        pytest.skip(f"{variant} does not support n = 1")
    layer = HyperConnection(8, 1, nn.Linear(8, 8), variant=variant, dynamic=False)
    x = torch.randn(4, 1, 8)
    h_pre, h_post, h_res = layer.coefficients(x)
    assert h_res.shape == (1, 1) and torch.isfinite(h_res).all()
