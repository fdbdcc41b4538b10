"""The layer computes in the precision it promises, starts where its source starts, and
trains correctly whichever order the Harmonized controller is updated in."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from hyperconn import HarmonizedController, HyperConnection, expand_streams, reduce_streams

VARIANTS = ("hc", "mhc", "isohc", "hybrid", "harmonized")


# ---------------------------------------------------------------- float64 layers
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dynamic", [True, False])
def test_float64_layer_computes_float64_coefficients_and_passes_gradcheck(variant, dynamic):
    torch.manual_seed(0)
    layer = HyperConnection(6, 3, nn.Linear(6, 6), variant=variant, dynamic=dynamic, alpha_init=0.3).double()
    x = torch.randn(3, 3, 6, dtype=torch.float64, requires_grad=True)   # 3 tokens
    assert all(h.dtype == torch.float64 for h in layer.coefficients(x))  # was float32
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in layer.named_parameters())

    def run(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params))


def test_float64_streams_into_float32_layer_fail_clearly():
    layer = HyperConnection(8, 2, nn.Identity(), variant="mhc")
    with pytest.raises(TypeError, match="x: float64 streams into a float32"):
        layer(torch.randn(3, 2, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="x: expected floating-point"):
        layer(torch.ones(3, 2, 8, dtype=torch.int64))


# ---------------------------------------------------------------- bf16 streams
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["mhc", "isohc", "harmonized"])
def test_half_streams_mix_with_fp32_coefficients(dtype, variant):
    # Before: H_res was rounded to bf16 before the merge (row sums off by ~1e-3).
    torch.manual_seed(1)
    branch = nn.Linear(32, 32).to(dtype)
    layer = HyperConnection(32, 4, branch, variant=variant, alpha_init=0.3, kernels="torch")
    x = torch.randn(64, 4, 32).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    h_pre, h_post, h_res = layer.coefficients(x)
    assert h_res.dtype == torch.float32
    # Independent: fp32 coefficients on the fp32 values of the half inputs, rounded once.
    xf = x.float()
    u = torch.einsum("tn,tnc->tc", h_pre, xf).to(dtype)
    y = branch(u).to(dtype).float()
    want = (torch.einsum("tij,tjc->tic", h_res, xf) + h_post[..., None] * y[:, None, :]).to(dtype)
    diff = (out.float() - want.float()).abs()
    ulp = want.float().abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10)
    assert (diff <= ulp + 1e-6).all()
    assert (diff > 0).float().mean() <= 0.01  # bit-identical but for summation-order flips


def test_half_streams_applied_row_sums_exact():
    # Streams that are identical copies v: H_res x = (H_res 1) v, so the applied row-sum
    # error is visible as out/v − 1 with a zero branch; in fp32 accumulation it is ~1e-7
    # before the single rounding of the output.
    torch.manual_seed(2)
    layer = HyperConnection(16, 4, None, variant="mhc", alpha_init=0.5, kernels="torch")
    v = torch.full((128, 1, 16), 1.0 + 2.0 ** -7).bfloat16()   # exactly representable
    x = v.expand(128, 4, 16).contiguous()
    _, finish = layer.pre(x)
    out = finish(torch.zeros(128, 16, dtype=torch.bfloat16))
    assert torch.equal(out, x)


# ---------------------------------------------------------------- hc starts as Pre-Norm
@pytest.mark.parametrize("layer_index", [0, 1, 2, 5])
def test_hc_dynamic_starts_exactly_at_pre_norm(layer_index):
    # Before: the random φ moved H_pre and H_res by ~1e-2 at init.
    layer = HyperConnection(16, 4, nn.Identity(), variant="hc", dynamic=True, layer_index=layer_index)
    h_pre, h_post, h_res = layer.coefficients(torch.randn(10, 4, 16))
    onehot = torch.zeros(4)
    onehot[layer_index % 4] = 1.0
    assert torch.equal(h_pre, onehot.expand(10, 4))
    assert torch.equal(h_post, torch.ones(10, 4))
    assert torch.equal(h_res, torch.eye(4).expand(10, 4, 4))


def test_hc_dynamic_part_learns_from_zero():
    layer = HyperConnection(16, 4, nn.Linear(16, 16), variant="hc", dynamic=True)
    layer(torch.randn(10, 4, 16)).square().sum().backward()
    assert layer.phi.grad.abs().sum() > 0


# ---------------------------------------------------------------- Harmonized update order
def _harmonized_model(recompute):
    torch.manual_seed(3)
    layers = nn.ModuleList(
        HyperConnection(8, 4, nn.Sequential(nn.RMSNorm(8), nn.Linear(8, 8)), variant="harmonized",
                        layer_index=i, recompute=recompute, alpha_init=0.2)
        for i in range(3))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            s = expand_streams(x, 4)
            for layer in self.layers:
                s = layer(s)
            return reduce_streams(s)

    return Model()


def _grads_with_update(recompute, order, compile_model=False):
    model = _harmonized_model(recompute)
    model.train()
    ctrl = HarmonizedController(model, target_gain=1.01, beta=0.0, exponent=1.0, min_scale=0.02)
    run = torch.compile(model, backend="eager", fullgraph=False) if compile_model else model
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    # A first step moves the scale away from 1, so the second forward sees s < 1.
    run(x).square().mean().backward()
    ctrl.update()
    model.zero_grad()
    scale_at_forward = ctrl.scale
    loss = run(x).square().mean()
    if order == "update-first":
        ctrl.update()          # changes s between this forward and its backward
        assert ctrl.scale != scale_at_forward
    loss.backward()
    if order == "update-after":
        ctrl.update()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("compile_model", [False, True])
def test_controller_update_before_backward_gives_the_same_gradients(recompute, compile_model):
    # Before: "modified by an inplace operation" without recompute; with recompute no
    # error but gradients wrong by ~42 %.
    after = _grads_with_update(recompute, "update-after", compile_model)
    first = _grads_with_update(recompute, "update-first", compile_model)
    for a, b in zip(after, first):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_recompute_and_plain_agree_under_controller():
    for a, b in zip(_grads_with_update(True, "update-first"), _grads_with_update(False, "update-first")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pre_post_by_hand_with_update_in_between():
    model = _harmonized_model(False)
    ctrl = HarmonizedController(model, target_gain=1.01, beta=0.0, exponent=1.0)
    layer = model.layers[0]
    s = expand_streams(torch.randn(5, 8), 4)
    u, finish = layer.pre(s)
    out = finish(layer.branch(u))
    ctrl.update(gain=5.0)          # an explicit gain: only one layer ran
    assert ctrl.scale < 1.0
    out.square().sum().backward()  # raised "modified by an inplace operation" before
    assert layer.b_res.grad is not None
