"""ops.cpu: hand-written backward of the CPU projection and merge."""

from __future__ import annotations

import pytest
import torch

from hyperconn.ops.cpu import merge_streams, rms_projection, stream_pre


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_rms_projection_gradcheck_float64():
    x = _rand(2, 3, 4, 3, seed=1).requires_grad_()          # (..., n=4, C=3)
    phi = _rand(12, 7, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, p: rms_projection(f, p, 1e-6), (x, phi))


def test_stream_pre_gradcheck_float64():
    x = _rand(2, 3, 4, 5, seed=1).requires_grad_()
    h = _rand(2, 3, 4, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(stream_pre, (x, h))


def test_stream_pre_matches_einsum():
    x, h = _rand(7, 4, 9, seed=3), _rand(7, 4, seed=4)
    torch.testing.assert_close(stream_pre(x, h), torch.einsum("mn,mnc->mc", h, x), rtol=1e-12, atol=1e-12)


def test_merge_streams_gradcheck_float64():
    x = _rand(6, 3, 5, seed=1).requires_grad_()
    h_res = _rand(6, 3, 3, seed=2).requires_grad_()
    h_post = _rand(6, 3, seed=3).requires_grad_()
    y = _rand(6, 5, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(merge_streams, (x, h_res, h_post, y))


def test_rms_projection_matches_plain_autograd():
    """Against the formula written naively (pow/mean/rsqrt), value and both gradients."""
    x, phi, g = _rand(64, 4, 24, seed=5, dtype=torch.float32), _rand(96, 24, seed=6, dtype=torch.float32), \
        _rand(64, 24, seed=7, dtype=torch.float32)
    a = [x.clone().requires_grad_(), phi.clone().requires_grad_()]
    b = [x.clone().requires_grad_(), phi.clone().requires_grad_()]
    out_a = rms_projection(*a, 1e-6)
    flat = b[0].flatten(-2)
    out_b = (flat @ b[1]) * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6)
    ga = torch.autograd.grad(out_a, a, g)
    gb = torch.autograd.grad(out_b, b, g)
    torch.testing.assert_close(out_a, out_b)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_merge_streams_matches_einsum():
    x, h_res, h_post, y = (_rand(*s, seed=i) for i, s in enumerate([(50, 4, 33), (50, 4, 4), (50, 4), (50, 33)]))
    out = merge_streams(x, h_res, h_post, y)
    want = torch.einsum("mij,mjc->mic", h_res, x) + h_post[..., None] * y[:, None, :]
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_merge_streams_under_autocast_keeps_operand_dtype():
    """Under CPU autocast the merge still computes and differentiates in fp32 (the
    operands' dtype), so forward and backward agree with the no-autocast result."""
    args = [t.float().requires_grad_() for t in (_rand(8, 2, 16), _rand(8, 2, 2, seed=1),
                                                 _rand(8, 2, seed=2), _rand(8, 16, seed=3))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = merge_streams(*args)
    assert out.dtype == torch.float32
    grads = torch.autograd.grad(out.square().sum(), args)
    plain = [t.detach().clone().requires_grad_() for t in args]
    want = torch.autograd.grad(merge_streams(*plain).square().sum(), plain)
    for u, v in zip(grads, want):
        torch.testing.assert_close(u, v)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="phi"):
        rms_projection(torch.randn(3, 2, 4), torch.randn(7, 2), 1e-6)
    with pytest.raises(ValueError, match="h_pre"):
        stream_pre(torch.randn(3, 2, 4), torch.randn(3, 3))
    with pytest.raises(ValueError, match="h_res"):
        merge_streams(torch.randn(3, 2, 8), torch.randn(3, 3, 3), torch.randn(3, 2), torch.randn(3, 8))


def test_stream_gradients_are_fresh_contiguous_tensors():
    """Each op returns ∂x as its own contiguous tensor of x's shape (not a view), so the
    autograd engine can add the three contributions of a layer in place."""
    x = torch.randn(2, 5, 4, 8, requires_grad=True)
    seen = []
    for op in (lambda t: stream_pre(t, torch.rand(2, 5, 4)),
               lambda t: rms_projection(t, torch.randn(32, 6), 1e-6),
               lambda t: merge_streams(t, torch.rand(2, 5, 4, 4), torch.rand(2, 5, 4), torch.randn(2, 5, 8))):
        out = op(x)
        (g,) = torch.autograd.grad(out, x, torch.randn_like(out))
        assert g.shape == x.shape and g.is_contiguous() and g._base is None
        seen.append(g)


# ------------------------------------------------------------- the layer's shared ∂x buffer
def _plain_layer(layer, x):
    """The same layer written with plain autograd ops (no hand-written backward)."""
    n, C = layer.streams, layer.dim
    flat = x.reshape(*x.shape[:-2], n * C)
    proj = (flat @ layer.phi) * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + layer.norm_eps)
    proj = layer.mixer.dynamic_activation(proj)
    a_pre, a_post, a_res = layer.alpha.unbind()
    raw_pre = layer.b_pre + a_pre * proj[..., :n]
    raw_post = layer.b_post + a_post * proj[..., n:2 * n]
    raw_res = layer.b_res + a_res * proj[..., 2 * n:].unflatten(-1, (n, n))
    h_pre, h_post, h_res = layer.mixer(raw_pre, raw_post, raw_res)
    y = layer.branch(torch.einsum("...n,...nc->...c", h_pre, x))
    return torch.einsum("...ij,...jc->...ic", h_res, x) + h_post[..., None] * y[..., None, :]


@pytest.mark.parametrize("variant", ["hc", "mhc", "isohc", "hybrid", "harmonized"])
def test_layer_gradients_match_plain_autograd(variant):
    """The CPU layer (one shared ∂x buffer across its three stream ops) gives the output
    and every gradient of the same layer written with plain autograd."""
    from hyperconn import HyperConnection
    torch.manual_seed(0)
    layer = HyperConnection(16, 4, torch.nn.Linear(16, 16), variant=variant, alpha_init=0.3)
    x = torch.randn(3, 5, 4, 16, requires_grad=True)
    g = torch.randn(3, 5, 4, 16)
    params = [p for p in layer.parameters()]
    out = layer(x)
    got = torch.autograd.grad(out, [x, *params], g)
    want_out = _plain_layer(layer, x)
    want = torch.autograd.grad(want_out, [x, *params], g)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        # Seven Newton-Schulz steps with coefficients up to ~12 amplify fp32 rounding of
        # the (differently summed) inputs in backward: isohc's gradients agree to ~5e-6 of
        # their largest entry, not elementwise to 1e-5 (polar: 1e-6; see iso.py).
        atol = 1e-5 * max(1.0, float(b.abs().max())) if variant == "isohc" else 1e-5
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


def test_layer_partial_and_repeated_backward():
    """Asking for ∂x alone, for parameters alone, twice with retain_graph, or with
    create_graph=True (each op then returns its own ∂x) gives the same numbers."""
    from hyperconn import HyperConnection
    torch.manual_seed(1)
    layer = HyperConnection(8, 3, torch.nn.Linear(8, 8), variant="mhc", alpha_init=0.3)
    x = torch.randn(2, 4, 3, 8, requires_grad=True)
    g = torch.randn(2, 4, 3, 8)
    out = layer(x)
    (dx,) = torch.autograd.grad(out, [x], g, retain_graph=True)
    (dx_again,) = torch.autograd.grad(out, [x], g, retain_graph=True)
    dphi, dw = torch.autograd.grad(out, [layer.phi, layer.branch.weight], g, retain_graph=True)
    dx_cg, dphi_cg = torch.autograd.grad(out, [x, layer.phi], g, create_graph=True)
    torch.testing.assert_close(dx, dx_again, rtol=0, atol=0)
    # create_graph=True differentiates a plain-op recomputation of the whole coefficient
    # path (log-domain Sinkhorn included) instead of the native kernels: fp32 rounding apart.
    torch.testing.assert_close(dx, dx_cg.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dphi, dphi_cg.detach(), rtol=1e-5, atol=1e-6)
    want = torch.autograd.grad(_plain_layer(layer, x), [x, layer.phi, layer.branch.weight], g)
    for a, b in zip((dx, dphi, dw), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_layer_stale_buffer_from_partial_backward_is_ignored():
    """A partial backward (retain_graph) in which the merge left its ∂x but the projection
    never ran must not leak that ∂x into a later backward that skips the merge."""
    from hyperconn import HyperConnection
    torch.manual_seed(2)
    layer = HyperConnection(8, 3, torch.nn.Linear(8, 8), variant="hc", alpha_init=0.3)
    x = torch.randn(2, 4, 3, 8, requires_grad=True)
    u, finish = layer.pre(x)
    out = finish(layer.branch(u))
    torch.autograd.grad(out, [layer.branch.weight], torch.randn_like(out), retain_graph=True)
    (dx,) = torch.autograd.grad(u.square().sum(), [x])            # the merge is not in this graph
    plain = x.detach().clone().requires_grad_()
    n, C = 3, 8
    flat = plain.reshape(2, 4, n * C)
    proj = layer.mixer.dynamic_activation(
        (flat @ layer.phi) * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + layer.norm_eps))
    h_pre = layer.mixer.map_pre_post(layer.b_pre + layer.alpha[0] * proj[..., :n], proj[..., n:2 * n])[0]
    (want,) = torch.autograd.grad(torch.einsum("...n,...nc->...c", h_pre, plain).square().sum(), [plain])
    torch.testing.assert_close(dx, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["mhc", "hc"])
def test_layer_finish_called_twice_sums_both_merges(variant):
    """Two merges of one ``pre`` (finish called twice) both leave ∂x in the layer's slot:
    the second adds to the first's (it overwrote it before: ∂x was off by the first
    merge's whole contribution). Checked against the same layer written with plain autograd."""
    from hyperconn import HyperConnection
    torch.manual_seed(3)
    layer = HyperConnection(8, 3, torch.nn.Linear(8, 8), variant=variant, alpha_init=0.3)
    x = torch.randn(2, 4, 3, 8, requires_grad=True)
    g1, g2 = torch.randn(2, 2, 4, 3, 8).unbind()
    u, finish = layer.pre(x)
    out1, out2 = finish(layer.branch(u)), finish(torch.sin(u))
    got = torch.autograd.grad([out1, out2], [x, layer.phi], [g1, g2])
    # plain: the same coefficients, the two merges written out
    plain = x.detach().clone().requires_grad_()
    n, C = 3, 8
    flat = plain.reshape(2, 4, n * C)
    proj = layer.mixer.dynamic_activation(
        (flat @ layer.phi) * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + layer.norm_eps))
    a_pre, a_post, a_res = layer.alpha.unbind()
    h_pre, h_post, h_res = layer.mixer(layer.b_pre + a_pre * proj[..., :n], layer.b_post + a_post * proj[..., n:2 * n],
                                       layer.b_res + a_res * proj[..., 2 * n:].unflatten(-1, (n, n)))
    v = torch.einsum("...n,...nc->...c", h_pre, plain)

    def merge(y):
        return torch.einsum("...ij,...jc->...ic", h_res, plain) + h_post[..., None] * y[..., None, :]
    want = torch.autograd.grad([merge(layer.branch(v)), merge(torch.sin(v))], [plain, layer.phi], [g1, g2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pre_without_grad_then_finish_with_grad_keeps_the_merge_dx():
    """Coefficients taken under no_grad, the merge under grad: no slot (the op that would
    return the sum is not in the graph), so x still gets H_resᵀ g from the merge."""
    from hyperconn import HyperConnection
    torch.manual_seed(4)
    layer = HyperConnection(8, 3, torch.nn.Linear(8, 8), variant="mhc", alpha_init=0.3)
    x = torch.randn(2, 4, 3, 8, requires_grad=True)
    g = torch.randn(2, 4, 3, 8)
    with torch.no_grad():
        u, finish = layer.pre(x)
        h_res = layer.coefficients(x)[2]
    (dx,) = torch.autograd.grad(finish(layer.branch(u)), [x], g)
    torch.testing.assert_close(dx, torch.einsum("...ij,...ic->...jc", h_res, g), rtol=1e-5, atol=1e-6)


def test_a_deferred_dx_no_op_takes_is_dropped_when_the_backward_ends():
    """A backward to the branch alone runs the merge (which defers its ∂x) but never the
    projection: the slot lets the buffer go when that backward pass ends."""
    from hyperconn.ops import StreamGradSlot
    slot = StreamGradSlot()
    x = torch.randn(5, 3, 8, requires_grad=True)
    y = torch.randn(5, 8, requires_grad=True)
    hr, hp = torch.rand(5, 3, 3), torch.rand(5, 3)
    out = merge_streams(x, hr, hp, y, slot)
    (dy,) = torch.autograd.grad(out, [y], torch.ones_like(out))
    assert slot.task is not None and slot.grad is None  # deferred (a task was recorded), then dropped
    torch.testing.assert_close(dy, hp.sum(-1, keepdim=True).expand(5, 8), rtol=1e-6, atol=1e-6)
