"""The native CPU stream kernels (hyperconn.ops.cpu_native) against independent torch
computations, their gradients by gradcheck in float64 through the ops of
hyperconn.ops.cpu, threads, and the fallback when the library cannot be built."""

import warnings

import pytest
import torch

from hyperconn import HyperConnection
from hyperconn.ops import cpu, cpu_native

needs_native = pytest.mark.skipif(not cpu_native.available(), reason=cpu_native.status())
DTYPES = [torch.float32, torch.float64]


def _tol(dtype, C=1):
    # float32: a length-C dot product rounds by up to ~C·eps·|terms|; the references are
    # computed in float64 from the same inputs.
    return dict(rtol=1e-5, atol=1e-6 * C) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


def _ein(spec, *ts):
    """The reference: einsum in float64, cast to the inputs' dtype."""
    return torch.einsum(spec, *(t.double() for t in ts)).to(ts[0].dtype)


def _operands(M, n, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=r(M, n, C), h=r(M, n), hr=r(M, n, n), y=r(M, C), g=r(M, n, C), gu=r(M, C))


# n = 1..8 (the merge backward's per-n kernels), C tails of the 8/4-lane vectors
SHAPES = [(1, 1, 1), (3, 1, 40), (7, 4, 33), (64, 4, 512), (5, 3, 17), (6, 2, 9), (9, 8, 64), (3, 5, 24),
          (4, 6, 41), (2, 7, 16)]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,n,C", SHAPES)
def test_forward_kernels_match_einsum(M, n, C, dtype):
    o = _operands(M, n, C, dtype)
    torch.testing.assert_close(cpu_native.pre_fwd(o["x"], o["h"]), _ein("mj,mjc->mc", o["h"], o["x"]),
                               **_tol(dtype, C))
    want = _ein("mij,mjc->mic", o["hr"], o["x"]) + _ein("mi,mc->mic", o["h"], o["y"])
    torch.testing.assert_close(cpu_native.merge_fwd(o["x"], o["hr"], o["h"], o["y"]), want, **_tol(dtype, C))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,n,C", SHAPES)
def test_backward_kernels_match_einsum(M, n, C, dtype):
    o = _operands(M, n, C, dtype, seed=1)
    gx = torch.full_like(o["x"], float("nan"))  # every element must be written
    ghr, ghp, gy = cpu_native.merge_bwd(o["g"], o["x"], o["hr"], o["h"], o["y"], gx, (True, True, True))
    torch.testing.assert_close(gx, _ein("mij,mic->mjc", o["hr"], o["g"]), **_tol(dtype, C))
    torch.testing.assert_close(ghr, _ein("mic,mjc->mij", o["g"], o["x"]), **_tol(dtype, C))
    torch.testing.assert_close(ghp, _ein("mic,mc->mi", o["g"], o["y"]), **_tol(dtype, C))
    torch.testing.assert_close(gy, _ein("mi,mic->mc", o["h"], o["g"]), **_tol(dtype, C))
    # Only what is asked for is computed; a missing ∂x buffer is skipped.
    assert cpu_native.merge_bwd(o["g"], o["x"], o["hr"], o["h"], o["y"], None, (False, True, False))[0::2] == (None, None)
    # pre backward: writes, or adds into, ∂x.
    base = torch.randn_like(o["x"])
    acc = base.clone()
    gh = cpu_native.pre_bwd(o["x"], o["h"], o["gu"], acc, True, True)
    outer = o["h"][..., None] * o["gu"][:, None]
    torch.testing.assert_close(acc, base + outer, **_tol(dtype, C))
    torch.testing.assert_close(gh, _ein("mjc,mc->mj", o["x"], o["gu"]), **_tol(dtype, C))
    fresh = torch.full_like(o["x"], float("nan"))
    assert cpu_native.pre_bwd(o["x"], o["h"], o["gu"], fresh, False, False) is None
    torch.testing.assert_close(fresh, outer, **_tol(dtype, C))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_backward_past_the_caches_matches_einsum_on_any_threads(dtype):
    """An 8 MiB ∂x (at least kStreamBytes, C a multiple of the vector width): the merge
    backward stores it with non-temporal stores where the CPU has them; same values as the
    reference, bit for bit the same on 1 and 2 threads; a ∂x not 32-byte aligned (a view
    one element in) takes ordinary stores and agrees too."""
    M = 1024 if dtype == torch.float32 else 512
    o = _operands(M, 4, 512, dtype, seed=4)
    want = _ein("mij,mic->mjc", o["hr"], o["g"])
    threads = torch.get_num_threads()
    got = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            gx = torch.full_like(o["x"], float("nan"))
            out = cpu_native.merge_bwd(o["g"], o["x"], o["hr"], o["h"], o["y"], gx, (True, True, True))
            got.append((gx, *out))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got[0][0], want, **_tol(dtype, 512))
    torch.testing.assert_close(got[0][3], _ein("mi,mic->mc", o["h"], o["g"]), **_tol(dtype, 512))
    for a, b in zip(*got):
        assert torch.equal(a, b)
    shifted = torch.full((o["x"].numel() + 1,), float("nan"), dtype=dtype)[1:].view(o["x"].shape)
    cpu_native.merge_bwd(o["g"], o["x"], o["hr"], o["h"], o["y"], shifted, (True, True, True))
    assert torch.equal(shifted, got[0][0])


@needs_native
def test_threads_split_tokens_without_changing_results():
    o = _operands(1001, 4, 128, torch.float64, seed=2)   # enough work for 2 threads (≥ 2^16 values each)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_native.merge_bwd(o["g"], o["x"], o["hr"], o["h"], o["y"], None, (True, True, True))
        torch.set_num_threads(2)
        two = cpu_native.merge_bwd(o["g"], o["x"], o["hr"], o["h"], o["y"], None, (True, True, True))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@needs_native
def test_wrappers_refuse_bad_tensors():
    o = _operands(4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_native.pre_fwd(o["x"].transpose(0, 1).contiguous().transpose(0, 1), o["h"])
    with pytest.raises(ValueError, match="float32 or float64"):
        cpu_native.pre_fwd(o["x"].half(), o["h"].half())
    with pytest.raises(ValueError, match="float32"):
        cpu_native.merge_fwd(o["x"], o["hr"].double(), o["h"], o["y"])


# (M, K, N): tiles of 8 (AVX-512) or 4 tokens and 32-token chunks with remainders; K a
# multiple of 24, of 16 only (the two-vector ∂x tile), or of neither (a scalar tail); N
# below, at and above one 24-column block, and n = 8's 80.
# K = 96 and 80: the 4- and 2-vector ∂x blocks of proj_bwd (2W-lane on AVX-512), 2048: both.
PROJ_SHAPES = [(1, 1, 1), (37, 2048, 24), (70, 512, 24), (9, 100, 8), (33, 77, 15), (5, 48, 80), (64, 24, 25),
               (19, 96, 24), (11, 80, 30)]


def _proj_reference(x, phi, eps, grad):
    """out = (x φ)·r, r = rsqrt(mean x² + ε), and (∂x, ∂φ) by autograd, all in float64."""
    xd, pd = x.double().requires_grad_(), phi.double().requires_grad_()
    r = torch.rsqrt(xd.square().mean(-1) + eps)
    out = (xd @ pd) * r[:, None]
    gx, gphi = torch.autograd.grad(out, (xd, pd), grad.double())
    return out.detach(), r.detach(), gx, gphi


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", PROJ_SHAPES)
def test_projection_kernels_match_autograd(M, K, N, dtype):
    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=g, dtype=dtype) + 0.5
    phi = torch.randn(K, N, generator=g, dtype=dtype) / K ** 0.5
    grad = torch.randn(M, N, generator=g, dtype=dtype)
    want_out, want_r, want_gx, want_gphi = _proj_reference(x, phi, 1e-6, grad)
    out, r = cpu_native.proj_fwd(x, phi, 1e-6)
    tol = _tol(dtype, K ** 0.5)
    torch.testing.assert_close(out.double(), want_out, **tol)
    torch.testing.assert_close(r.double(), want_r, **tol)
    gx = torch.full_like(x, float("nan"))                 # every element must be written
    gphi = cpu_native.proj_bwd(x, phi, grad, out, r, gx, False, True)
    torch.testing.assert_close(gx.double(), want_gx, **tol)
    torch.testing.assert_close(gphi.double(), want_gphi, **_tol(dtype, M ** 0.5 * K ** 0.5))
    base = torch.randn(M, K, generator=g, dtype=dtype)    # accumulate: adds into an earlier ∂x
    acc = base.clone()
    assert cpu_native.proj_bwd(x, phi, grad, out, r, acc, True, False) is None
    torch.testing.assert_close(acc.double(), base.double() + want_gx, **tol)
    only_phi = cpu_native.proj_bwd(x, phi, grad, out, r, None, False, True)
    assert torch.equal(only_phi, gphi)                    # the same sums without ∂x


@needs_native
def test_projection_threads_agree_and_bad_phi_is_refused():
    g = torch.Generator().manual_seed(5)
    x, phi, grad = (torch.randn(300, 512, generator=g, dtype=torch.float64), torch.randn(512, 24, generator=g,
                    dtype=torch.float64), torch.randn(300, 24, generator=g, dtype=torch.float64))
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            out, r = cpu_native.proj_fwd(x, phi, 1e-6)
            gx = torch.empty_like(x)
            results.append((out, r, gx, cpu_native.proj_bwd(x, phi, grad, out, r, gx, False, True)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)   # ∂φ: per-thread partial sums
    with pytest.raises(ValueError, match="phi: expected shape \\(512, N\\)"):
        cpu_native.proj_fwd(x, phi[:100], 1e-6)
    out, r = cpu_native.proj_fwd(x, phi, 1e-6)
    with pytest.raises(ValueError, match="grad: expected shape \\(300, 24\\)"):
        cpu_native.proj_bwd(x, phi, grad[:10], out, r, None, False, True)
    with pytest.raises(ValueError, match="gx: expected shape"):
        cpu_native.proj_bwd(x, phi, grad, out, r, torch.empty(300, 10, dtype=x.dtype), False, True)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_projection_gradcheck_and_double_backward(native):
    """Both paths: exact first derivatives, and double backward (create_graph=True goes
    through a differentiable recomputation, not the saved product and scale)."""
    if native and not cpu_native.available():
        pytest.skip(cpu_native.status())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    phi = torch.randn(24, 24, dtype=torch.float64, generator=g, requires_grad=True)
    with cpu_native.force(native):
        assert torch.autograd.gradcheck(lambda a, b: cpu.rms_projection(a, b, 1e-6), (x, phi))
        assert torch.autograd.gradgradcheck(lambda a, b: cpu.rms_projection(a, b, 1e-6), (x, phi))


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_ops_gradcheck_float64_on_both_paths(native):
    if native and not cpu_native.available():
        pytest.skip(cpu_native.status())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    hr = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    hp = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    with cpu_native.force(native):
        assert torch.autograd.gradcheck(lambda *a: cpu.merge_streams(*a), (x, hr, hp, y))
        assert torch.autograd.gradcheck(lambda a, b: cpu.stream_pre(a, b), (x, hp))
        assert torch.autograd.gradgradcheck(lambda *a: cpu.merge_streams(*a), (x, hr, hp, y))


@needs_native
@pytest.mark.parametrize("C", [24, 20, 37])
def test_float32_layer_with_the_shared_grad_buffer_agrees_between_paths(C):
    """fp32 dynamic layers share one ∂x buffer (StreamGradSlot) across the merge, H_pre x
    and the projection; the native kernels give the torch path's gradients. C = 20: the
    projection's 16-value ∂x blocks; C = 37: a scalar tail."""
    torch.manual_seed(1)
    layer = HyperConnection(C, 4, torch.nn.Linear(C, C), variant="mhc")
    x = torch.randn(3, 7, 4, C)
    grads = []
    for native in (True, False):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        with cpu_native.force(native):
            layer(xi).square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_native
@pytest.mark.parametrize("variant", ["hc", "mhc", "isohc"])
def test_layer_gradients_agree_between_paths(variant):
    """A whole dynamic layer (shared ∂x slot, static and per-token coefficients): the
    native path gives the torch path's loss and gradients."""
    torch.manual_seed(0)
    layer = HyperConnection(32, 4, torch.nn.Linear(32, 32), variant=variant).double()
    x = torch.randn(3, 5, 4, 32, dtype=torch.float64)
    grads = []
    for native in (True, False):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        with cpu_native.force(native):
            layer(xi).square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_forced_off_never_calls_the_kernels(monkeypatch):
    def boom(*_):
        raise AssertionError("native kernel called")
    for name in ("pre_fwd", "pre_bwd", "merge_fwd", "merge_bwd", "proj_fwd", "proj_bwd"):
        monkeypatch.setattr(cpu_native, name, boom)
    x = torch.randn(2, 4, 8, requires_grad=True)
    with cpu_native.force(False):
        cpu.merge_streams(x, torch.eye(4).expand(2, 4, 4), torch.ones(2, 4), torch.randn(2, 8)).sum().backward()
        cpu.rms_projection(x, torch.randn(32, 24, requires_grad=True), 1e-6).sum().backward()


def test_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    """No usable compiler: one RuntimeWarning naming the reason, then the torch path; a
    forced-on run then raises instead of silently falling back."""
    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.setenv("CXX", "false")          # a 'compiler' that always fails
    monkeypatch.setenv("HYPERCONN_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_native, "_compiler", lambda: "/bin/false")
    with pytest.warns(RuntimeWarning, match="native CPU stream kernels unavailable"):
        assert not cpu_native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_native.available()        # decided once: no second warning
    assert "build failed" in cpu_native.status()
    x = torch.randn(2, 4, 8)
    out = cpu.merge_streams(x, torch.eye(4).expand(2, 4, 4).contiguous(), torch.ones(2, 4), torch.zeros(2, 8))
    torch.testing.assert_close(out, x)
    with cpu_native.force(True), pytest.raises(RuntimeError, match="forced on but unavailable"):
        cpu_native.library()
    assert not list(tmp_path.rglob("*.so"))      # nothing half-built left behind


def test_environment_variable_turns_the_kernels_off(monkeypatch):
    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.setenv(cpu_native.ENV_VAR, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # turning them off is not a failure: no warning
        assert not cpu_native.available()
    assert cpu_native.ENV_VAR in cpu_native.status()


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,scale", [(1, 1.0), (4, 1.0), (4, 25.0), (3, 400.0), (8, 2.0)])
def test_sinkhorn_matches_the_reference_map_and_gradient(n, scale, dtype):
    """Small and large logit ranges (exp and log domain), against
    projections.sinkhorn(backward="unrolled"): P and ∂logits."""
    from hyperconn.projections import sinkhorn
    z = torch.randn(33, n, n, generator=torch.Generator().manual_seed(n), dtype=dtype) * scale
    g = torch.randn(33, n, n, generator=torch.Generator().manual_seed(7), dtype=dtype)
    zr = z.clone().requires_grad_()
    want = sinkhorn(zr, 7, backward="unrolled")
    (want_grad,) = torch.autograd.grad(want, zr, g)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(cpu_native.sinkhorn_fwd(z, 7), want, **tol)
    torch.testing.assert_close(cpu_native.sinkhorn_bwd(z, g, 7), want_grad, **tol)


@needs_native
def test_sinkhorn_op_gradcheck_nonfinite_and_double_backward():
    z = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with cpu_native.force(True):
        assert torch.autograd.gradcheck(lambda t: cpu.sinkhorn_tokens(t, 5), (z,))
        assert torch.autograd.gradgradcheck(lambda t: cpu.sinkhorn_tokens(t, 5), (z,))
        bad = torch.zeros(2, 3, 3)
        bad[1, 0, 0] = float("inf")
        out = cpu.sinkhorn_tokens(bad, 5)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()   # NaN for that matrix only


@needs_native
@pytest.mark.parametrize("method", ["ns", "ns-cubic"])
@pytest.mark.parametrize("m", [1, 3, 5, 8])
def test_newton_schulz_matches_the_torch_op(method, m):
    """The native Newton-Schulz steps = the torch op (values and ∂X0) on the methods'
    whole schedules, in fp64 as Iso-NS runs its blocks."""
    from hyperconn.ops.newton_schulz import _OddPolynomialIteration
    from hyperconn.projections.iso import _DEFAULT_STEPS, _schedule
    schedule = _schedule(method, _DEFAULT_STEPS[method])
    x = torch.randn(37, m, m, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    x = x / torch.linalg.matrix_norm(x.mT @ x).sqrt()[:, None, None]
    g = torch.randn(37, m, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xr = x.clone().requires_grad_()
    want = _OddPolynomialIteration.apply(xr, schedule)
    (want_grad,) = torch.autograd.grad(want, xr, g)
    torch.testing.assert_close(cpu_native.poly_fwd(x, schedule), want, rtol=1e-10, atol=1e-12)
    scale = max(1.0, want_grad.abs().max().item())
    torch.testing.assert_close(cpu_native.poly_bwd(x, schedule, g), want_grad, rtol=1e-8, atol=1e-10 * scale)


@needs_native
def test_newton_schulz_op_gradcheck_and_isohc_layer():
    from hyperconn.ops.newton_schulz import odd_polynomial_iteration
    schedule = ((1.5, -0.5, 0.0), (3.4445, -4.775, 2.0315), (1.875, -1.25, 0.375))
    x = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) / 3
    x.requires_grad_()
    with cpu_native.force(True):
        assert torch.autograd.gradcheck(lambda t: odd_polynomial_iteration(t, schedule), (x,))
        assert torch.autograd.gradgradcheck(lambda t: odd_polynomial_iteration(t, schedule), (x,))


def test_a_compiler_without_openmp_still_builds_the_kernels(monkeypatch, tmp_path):
    """A compiler that rejects -fopenmp (as Apple's clang does) gets a second build
    without it; the kernels then run single-threaded and give the same results."""
    import shutil
    import stat
    real = shutil.which("c++") or shutil.which("g++")
    if real is None:
        pytest.skip("no C++ compiler")
    fake = tmp_path / "cxx-no-openmp"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && {{ echo "unsupported option -fopenmp" >&2; exit 1; }}; done\n'
                    f'exec {real} "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.setenv("HYPERCONN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_native, "_compiler", lambda: str(fake))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_native.available()
    o = _operands(9, 4, 16, torch.float64)
    torch.testing.assert_close(cpu_native.merge_fwd(o["x"], o["hr"], o["h"], o["y"]),
                               _ein("mij,mjc->mic", o["hr"], o["x"]) + _ein("mi,mc->mic", o["h"], o["y"]),
                               rtol=1e-12, atol=1e-12)
    assert len(list((tmp_path / "cache").rglob("*.so"))) == 1
