"""The CPU fused coefficient op (hyperconn.ops.cpu_coefficients) against the unfused
layer, an independent plain-op computation, and gradcheck in float64."""

from __future__ import annotations

import pytest
import torch

from hyperconn import HyperConnection
from hyperconn.ops import cpu_coefficients, cpu_native

needs_native = pytest.mark.skipif(not cpu_native.available(), reason="native CPU kernels unavailable")
KIND_OF = {"mhc": ("sinkhorn", 20), "hc": ("linear", 0)}


def _inputs(n, C, lead, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = n * n + 2 * n
    x = torch.randn(*lead, n, C, generator=g, dtype=dtype)
    phi = 0.2 * torch.randn(n * C, N, generator=g, dtype=dtype)
    b_pre, b_post = torch.randn(n, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype)
    b_res = 2.0 * torch.randn(n, n, generator=g, dtype=dtype)
    alpha = torch.tensor([0.7, -0.4, 0.9], dtype=dtype)
    return [t.requires_grad_() for t in (x, phi, b_pre, b_post, b_res, alpha)]


@needs_native
@pytest.mark.parametrize("read", [False, True])
@pytest.mark.parametrize("kind", ["sinkhorn", "linear"])
def test_forward_matches_plain_ops_and_gradcheck(kind, read):
    maps = (kind, 6) if kind == "sinkhorn" else (kind, 0)
    args = _inputs(3, 5, (2, 3), torch.float64)

    def fused(*a):
        out = cpu_coefficients.fused_coefficients(*a[:2], 1e-6, *a[2:], torch.float64, maps, read)
        return tuple(t for t in out if t is not None)

    def plain(*a):
        out = cpu_coefficients.reference(*a[:2], *a[2:], 1e-6, kind, maps[1], read)
        return tuple(t for t in out if t is not None)

    for got, want in zip(fused(*args), plain(*args), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fused, args)
    assert torch.autograd.gradgradcheck(fused, args)  # create_graph=True: the plain-op recomputation


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["mhc", "hc"])
@pytest.mark.parametrize("n,lead", [(4, (3, 5)), (2, (7,)), (5, (2, 2))])
def test_layer_fused_equals_unfused(variant, n, lead, dtype, monkeypatch):
    """The whole layer (merge's ∂x through the slot, H_pre x read by the fused op) gives
    the unfused layer's output and every gradient."""
    torch.manual_seed(0)
    C = 12
    layer = HyperConnection(C, n, torch.nn.Linear(C, C), variant=variant, alpha_init=0.3).to(dtype)
    with torch.no_grad():
        layer.phi.normal_(0.0, 0.3)
    x = torch.randn(*lead, n, C, dtype=dtype, requires_grad=True)
    g = torch.randn(*lead, n, C, dtype=dtype)
    params = list(layer.parameters())
    calls = []
    real = cpu_coefficients._FusedCoefficients.apply
    monkeypatch.setattr(cpu_coefficients._FusedCoefficients, "apply", lambda *a: calls.append(1) or real(*a))
    out = layer(x)
    got = torch.autograd.grad(out, [x, *params], g)
    assert calls, "the fused op did not run"
    monkeypatch.setattr(cpu_coefficients, "FUSE_COEFFICIENTS", False)
    calls.clear()
    want_out = layer(x)
    want = torch.autograd.grad(want_out, [x, *params], g)
    assert not calls
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, want_out, **tol)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


@needs_native
def test_unfused_cases_return_none():
    x, phi, b_pre, b_post, b_res, alpha = _inputs(4, 8, (3,), torch.float32)
    args = (x, phi, 1e-6, b_pre, b_post, b_res, alpha)
    assert cpu_coefficients.fused_coefficients(*args, torch.float32, ("iso", 7)) is None       # not fused here
    assert cpu_coefficients.fused_coefficients(*args, torch.float64, ("sinkhorn", 20)) is None  # x not in cdtype
    xb = x.detach().bfloat16()
    assert cpu_coefficients.fused_coefficients(xb, *args[1:], torch.bfloat16, ("sinkhorn", 20)) is None
    with cpu_native.force(False):
        assert cpu_coefficients.fused_coefficients(*args, torch.float32, ("sinkhorn", 20)) is None
    assert cpu_coefficients.fused_coefficients(*args, torch.float32, ("sinkhorn", 20)) is not None


@needs_native
def test_partial_outputs_and_no_input_grad():
    """Gradients through some outputs only (the others get none), and a layer whose
    streams need no gradient, agree with the plain ops."""
    args = _inputs(4, 6, (5,), torch.float64, seed=3)
    out = cpu_coefficients.fused_coefficients(*args[:2], 1e-6, *args[2:], torch.float64, ("sinkhorn", 8), True)
    ref = cpu_coefficients.reference(*args[:2], *args[2:], 1e-6, "sinkhorn", 8, True)
    for pick in ((0,), (2,), (3,), (1, 2)):
        got = torch.autograd.grad([out[i].sum() for i in pick], args, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad([ref[i].sum() for i in pick], args, retain_graph=True, allow_unused=True)
        for a, b in zip(got, want):
            if b is None:
                assert a is None or not a.abs().max() > 0
            else:
                torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    x = args[0].detach()
    h = cpu_coefficients.fused_coefficients(x, *args[1:2], 1e-6, *args[2:], torch.float64, ("sinkhorn", 8), True)
    (g_phi,) = torch.autograd.grad(h[2].sum() + h[3].sum(), [args[1]])
    r = cpu_coefficients.reference(x, *args[1:2], *args[2:], 1e-6, "sinkhorn", 8, True)
    (want_phi,) = torch.autograd.grad(r[2].sum() + r[3].sum(), [args[1]])
    torch.testing.assert_close(g_phi, want_phi, rtol=1e-11, atol=1e-11)


@needs_native
def test_gates_kernels_refuse_bad_shapes():
    out, alpha, bias = torch.randn(5, 24), torch.randn(3), torch.randn(24)
    with pytest.raises(ValueError, match="gates_fwd"):
        cpu_native.gates_fwd(out, alpha, bias[:20], 4, "sinkhorn")
    with pytest.raises(ValueError, match="gates_fwd"):
        cpu_native.gates_fwd(out, alpha, bias, 4, "iso")
    _, h_pre, h_post, z = cpu_native.gates_fwd(out, alpha, bias, 4, "sinkhorn")
    with pytest.raises(ValueError, match="^d_res"):
        cpu_native.gates_bwd(h_pre, h_post, z[:, :2], h_pre, h_post, out, alpha, "sinkhorn")
