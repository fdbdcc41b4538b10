"""Kernels: torch reference vs direct einsum (always), Triton vs reference (interpreter).

Triton's CPU interpreter must be switched on (``TRITON_INTERPRET=1``) before Triton is
first imported, which a pytest process that already imported it cannot undo. So the
``test_interp_*`` tests run only when the variable is set at start-up, and
``test_triton_interpreter_suite`` re-runs this file in a fresh subprocess with it set:

    pytest tests/test_kernels.py                        # everything, interpreter via subprocess
    TRITON_INTERPRET=1 pytest tests/test_kernels.py     # everything in-process
    TRITON_INTERPRET=1 pytest tests/test_kernels.py -k interp_   # only the Triton tests
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperconn import ops as kernels
from hyperconn.ops import dispatch, reference
from hyperconn.projections import hybrid_mix, iso_project, sinkhorn

INTERP = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
HAS_TRITON = importlib.util.find_spec("triton") is not None

# (n, leading dims, coefficients shared across tokens); C is odd throughout.
CASES = [(n, lead, shared) for n in (1, 2, 4, 8) for lead in ((), (3,), (2, 3))
         for shared in (False, True) if not (shared and lead == ())]
C_ODD = 13


def _ids(case):
    n, lead, shared = case
    return f"n{n}-lead{'x'.join(map(str, lead)) or '0'}-{'shared' if shared else 'tok'}"


def _inputs(n, lead, shared, C=C_ODD, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    coeff_lead = () if shared else lead
    x = torch.randn(*lead, n, C, generator=g).to(dtype)
    y = torch.randn(*lead, C, generator=g).to(dtype)
    h_pre = torch.randn(*coeff_lead, n, generator=g)
    h_post = torch.randn(*coeff_lead, n, generator=g)
    h_res = torch.randn(*coeff_lead, n, n, generator=g)
    return x, h_pre, h_res, h_post, y


def _grads(fn, inputs, seed=1):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    return out, torch.autograd.grad(out, inputs, g)


def _einsum_pre(x, h_pre):
    x64 = x.double()
    return torch.einsum("...n,...nc->...c", h_pre.double().expand(x.shape[:-1]), x64)


def _einsum_merge(x, h_res, h_post, y):
    lead, n = x.shape[:-2], x.shape[-2]
    hr = h_res.double().expand(*lead, n, n)
    hp = h_post.double().expand(*lead, n)
    return (torch.einsum("...ij,...jc->...ic", hr, x.double())
            + torch.einsum("...i,...c->...ic", hp, y.double()))


def _close(a, b, dtype):
    """Tolerances per stream dtype, relative to the larger magnitude in b."""
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = max(1.0, b.double().abs().max().item())
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale)


# =================================================================== reference (always)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_pre_matches_einsum(case):
    x, h_pre, *_ = _inputs(*case, dtype=torch.float64)
    out, grads = _grads(reference.stream_pre, [x, h_pre])
    want, want_grads = _grads(_einsum_pre, [x, h_pre])
    assert out.shape == case[1] + (C_ODD,)
    for a, b in zip((out, *grads), (want, *want_grads)):
        _close(a, b, torch.float64)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_merge_matches_einsum(case):
    x, _, h_res, h_post, y = _inputs(*case, dtype=torch.float64)
    out, grads = _grads(reference.stream_merge, [x, h_res, h_post, y])
    want, want_grads = _grads(_einsum_merge, [x, h_res, h_post, y])
    assert out.shape == x.shape
    for a, b in zip((out, *grads), (want, *want_grads)):
        assert a.shape == b.shape
        _close(a, b, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_low_precision_streams(dtype):
    x, h_pre, h_res, h_post, y = _inputs(4, (2, 3), False, dtype=dtype)
    pre = reference.stream_pre(x, h_pre)
    merged = reference.stream_merge(x, h_res, h_post, y)
    assert pre.dtype == merged.dtype == dtype
    # fp32 accumulation, one rounding to the stream dtype at the end
    _close(pre, _einsum_pre(x, h_pre), dtype)
    _close(merged, _einsum_merge(x, h_res, h_post, y), dtype)
    _, grads = _grads(reference.stream_merge, [x, h_res, h_post, y])
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32, dtype]


def test_reference_sinkhorn_is_projection_sinkhorn():
    z = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    p, (gp,) = _grads(lambda t: reference.sinkhorn_tokens(t, 7), [z])
    q, (gq,) = _grads(lambda t: sinkhorn(t, 7, backward="unrolled"), [z])
    assert torch.equal(p, q) and torch.equal(gp, gq)


def test_reference_compiles_fullgraph():
    x, h_pre, h_res, h_post, y = _inputs(4, (2, 3), False)
    z = torch.randn(2, 3, 4, 4)

    def step(x, h_pre, h_post, y, z):
        mixed = kernels.sinkhorn_tokens(z, 5, backend="torch")
        branch = kernels.stream_pre(x, h_pre) + y
        return kernels.stream_merge(x, mixed, h_post, branch).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    args = [x, h_pre, h_post, y, z]
    out, grads = _grads(compiled, args)
    want, want_grads = _grads(step, args)
    for a, b in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(a, b)


# =================================================================== dispatch (always)
def test_dispatch_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.zeros(2, 4, 8)
    assert kernels.resolve_backend(None, x) == "torch"
    assert kernels.resolve_backend("auto", x) == "torch"
    assert kernels.resolve_backend(" Torch ", x) == "torch"


def test_dispatch_env_var_and_precedence(monkeypatch):
    x = torch.zeros(2, 4, 8)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert kernels.resolve_backend(None, x) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="HYPERCONN_KERNELS"):
        kernels.resolve_backend(None, x)
    assert kernels.resolve_backend("torch", x) == "torch"  # argument beats environment
    with pytest.raises(ValueError, match="backend"):
        kernels.resolve_backend("cuda", x)


def test_dispatch_triton_missing_is_clear(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_state", {"available": False, "error": "ImportError: no"})
    x = torch.zeros(2, 4, 8)
    with pytest.raises(RuntimeError, match="not importable.*hyperconn\\[gpu\\]"):
        kernels.stream_pre(x, torch.zeros(4), backend="triton")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="not importable"):
        kernels.stream_pre(x, torch.zeros(4))
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert kernels.stream_pre(x, torch.zeros(4)).shape == (2, 8)


@pytest.mark.skipif(INTERP or not HAS_TRITON, reason="needs Triton, outside the interpreter")
def test_dispatch_triton_on_cpu_needs_interpreter():
    x = torch.zeros(2, 4, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.stream_merge(x, torch.eye(4), torch.ones(4), torch.zeros(2, 8), backend="triton")


def test_dispatch_validates_shapes():
    x = torch.zeros(2, 3, 4, 8)
    with pytest.raises(ValueError, match="x: expected"):
        kernels.stream_pre(torch.zeros(8), torch.zeros(1))
    with pytest.raises(ValueError, match="h_pre"):
        kernels.stream_pre(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="h_res"):
        kernels.stream_merge(x, torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="h_post"):
        kernels.stream_merge(x, torch.zeros(4, 4), torch.zeros(3), torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="y"):
        kernels.stream_merge(x, torch.zeros(4, 4), torch.zeros(4), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="logits"):
        kernels.sinkhorn_tokens(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="iters"):
        kernels.sinkhorn_tokens(torch.zeros(3, 4, 4), 0)


def test_dispatch_empty_tensors():
    assert kernels.stream_pre(torch.zeros(0, 4, 8), torch.zeros(4)).shape == (0, 8)
    assert kernels.stream_merge(torch.zeros(0, 4, 8), torch.eye(4), torch.ones(4),
                                torch.zeros(0, 8)).shape == (0, 4, 8)


# =================================================================== Triton, interpreter
@pytest.mark.skipif(INTERP, reason="this process is the interpreter run")
def test_triton_interpreter_suite():
    """Run the ``test_interp_*`` tests in a fresh process with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(dispatch.ENV_VAR, None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interp_",
           str(Path(__file__).resolve())]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]


needs_interp = pytest.mark.skipif(not INTERP, reason="set TRITON_INTERPRET=1 (see module doc)")


@pytest.fixture(scope="module")
def tops():
    pytest.importorskip("triton")
    from hyperconn.ops import triton_backend as triton_ops
    assert triton_ops.INTERPRETED, "triton was imported before TRITON_INTERPRET=1 was set"
    return triton_ops


def _block_sizes(case):
    # One C tile everywhere; on the one-batch-dim cases also C tiles of 4, which loops
    # over several blocks with a partial tail (the interpreter is slow: keep this small).
    return (None, 4) if len(case[1]) == 1 else (None,)


@needs_interp
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_interp_pre_fp32(tops, case):
    x, h_pre, *_ = _inputs(*case)
    for block_c in _block_sizes(case):
        out, grads = _grads(lambda a, b: tops.stream_pre(a, b, block_c=block_c), [x, h_pre])
        want, want_grads = _grads(reference.stream_pre, [x, h_pre])
        for a, b in zip((out, *grads), (want, *want_grads)):
            assert a.shape == b.shape and a.dtype == b.dtype
            _close(a, b, torch.float32)


@needs_interp
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_interp_merge_fp32(tops, case):
    x, _, h_res, h_post, y = _inputs(*case)
    for block_c in _block_sizes(case):
        out, grads = _grads(lambda *a: tops.stream_merge(*a, block_c=block_c), [x, h_res, h_post, y])
        want, want_grads = _grads(reference.stream_merge, [x, h_res, h_post, y])
        for a, b in zip((out, *grads), (want, *want_grads)):
            assert a.shape == b.shape and a.dtype == b.dtype
            _close(a, b, torch.float32)


# Triton's interpreter rounds fp32 → bf16 toward zero (the GPU rounds to nearest even),
# so bf16 results may sit one bf16 ulp from the reference: _close allows ~2 ulps.
@needs_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(2, (2, 3), False), (4, (5,), True), (8, (), False)], ids=_ids)
def test_interp_low_precision_streams(tops, case, dtype):
    x, h_pre, h_res, h_post, y = _inputs(*case, C=37, dtype=dtype)
    for fn, ref, args in ((tops.stream_pre, reference.stream_pre, [x, h_pre]),
                          (tops.stream_merge, reference.stream_merge, [x, h_res, h_post, y])):
        out, grads = _grads(lambda *a: fn(*a, block_c=16), args)
        want, want_grads = _grads(ref, args)
        for a, b in zip((out, *grads), (want, *want_grads)):
            assert a.dtype == b.dtype
            _close(a, b, a.dtype)


@needs_interp
def test_interp_noncontiguous_inputs(tops):
    base = torch.randn(3, 9, 4, generator=torch.Generator().manual_seed(3))
    x = base.transpose(-1, -2)                     # (3, 4, 9), not contiguous
    h_res = torch.randn(3, 4, 4).transpose(-1, -2)
    h_post, y = torch.randn(3, 4), torch.randn(9, 3).t()
    out, grads = _grads(tops.stream_merge, [x, h_res, h_post, y])
    want, want_grads = _grads(reference.stream_merge, [x, h_res, h_post, y])
    for a, b in zip((out, *grads), (want, *want_grads)):
        _close(a, b, torch.float32)


SINKHORN = [(n, 20, 4.0) for n in (1, 2, 3, 4, 5, 8)] + [(4, 1, 1.0), (8, 3, 1.0)]


@needs_interp
@pytest.mark.parametrize("n,iters,scale", SINKHORN)
def test_interp_sinkhorn_fp32(tops, n, iters, scale):
    # 37 tokens: not a multiple of the kernel's token block, with two leading dims.
    z = torch.randn(37, n, n, generator=torch.Generator().manual_seed(n)) * scale
    z = z.view(37, 1, n, n)
    p, (gp,) = _grads(lambda t: tops.sinkhorn_tokens(t, iters), [z])
    q, (gq,) = _grads(lambda t: sinkhorn(t, iters, backward="unrolled"), [z])
    torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    torch.testing.assert_close(gp, gq, rtol=0, atol=1e-4)


@needs_interp
def test_interp_sinkhorn_extreme_logits(tops):
    z = torch.randn(16, 4, 4, generator=torch.Generator().manual_seed(9)) * 1e3
    p, (gp,) = _grads(lambda t: tops.sinkhorn_tokens(t, 20), [z])
    q, (gq,) = _grads(lambda t: sinkhorn(t, 20, backward="unrolled"), [z])
    assert torch.isfinite(p).all() and torch.isfinite(gp).all()
    torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    torch.testing.assert_close(gp, gq, rtol=0, atol=1e-4)


@needs_interp
def test_interp_sinkhorn_half_logits(tops):
    z = (torch.randn(8, 4, 4, generator=torch.Generator().manual_seed(2)) * 2).bfloat16()
    p, (gp,) = _grads(lambda t: tops.sinkhorn_tokens(t, 10), [z])
    q, (gq,) = _grads(lambda t: sinkhorn(t, 10), [z])
    assert p.dtype == gp.dtype == torch.bfloat16
    torch.testing.assert_close(p, q, rtol=1.6e-2, atol=4e-3)
    torch.testing.assert_close(gp, gq, rtol=1.6e-2, atol=4e-3)


@needs_interp
def test_interp_gradcheck_float64(tops):
    """Finite differences on the Triton ops themselves (fp64 in the interpreter)."""
    g = torch.Generator().manual_seed(5)
    tight = dict(rtol=1e-6, atol=1e-9)  # fp64 central differences are good to ~1e-10 here
    z = (torch.randn(1, 3, 3, generator=g, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: tops.sinkhorn_tokens(t, 6), (z,), **tight)  # full
    z = (torch.randn(5, 5, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: tops.sinkhorn_tokens(t, 6), (z,), fast_mode=True, **tight)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    h_res = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h_post = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # fast_mode checks random projections vᵀJu: a few launches instead of one per element
    assert torch.autograd.gradcheck(lambda *a: tops.stream_merge(*a, block_c=2),
                                    (x, h_res, h_post, y), fast_mode=True, **tight)
    assert torch.autograd.gradcheck(lambda a, b: tops.stream_pre(a, b, block_c=2),
                                    (x, h_post), fast_mode=True, **tight)


# (M tokens, n, C, N coefficients): K = n·C below, at and above one BK tile; M across a
# partial token tile; N = n² + 2n (24 for n = 4), and a small N padded to 16.
RMS_CASES = [(5, 4, 13, 24), (37, 4, 16, 24), (70, 2, 40, 8), (3, 1, 7, 3)]


@needs_interp
@pytest.mark.parametrize("M,n,C,N", RMS_CASES)
def test_interp_rms_projection_fp32(tops, M, n, C, N):
    from hyperconn.ops.torch_backend import plain_rms_projection
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, n, C, generator=g) * 3
    phi = torch.randn(n * C, N, generator=g) / (n * C) ** 0.5
    out, grads = _grads(lambda a, b: tops.rms_projection(a, b, 1e-6, torch.float32), [x, phi])
    want, want_grads = _grads(lambda a, b: plain_rms_projection(a, b, 1e-6, torch.float32), [x, phi])
    for a, b in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # ∂φ summed from several token groups gives the same as from one.
    from hyperconn.ops import triton_kernels as tk
    o, r = tk.rms_projection_forward(x, phi, 1e-6)
    go = torch.randn(o.shape, generator=g)
    one = tk.rms_projection_backward(x, phi, o, r, go, groups=1)
    many = tk.rms_projection_backward(x, phi, o, r, go, groups=3)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_interp
def test_interp_rms_projection_half_streams_and_gradcheck(tops):
    from hyperconn.ops.torch_backend import plain_rms_projection
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 4, 16, generator=g).to(torch.bfloat16)
    phi = torch.randn(64, 24, generator=g) / 8
    out = tops.rms_projection(x, phi, 1e-6, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 24)
    torch.testing.assert_close(out, plain_rms_projection(x, phi, 1e-6, torch.float32), rtol=2e-2, atol=2e-2)
    x64 = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    phi64 = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: tops.rms_projection(a, b, 1e-6, torch.float64), (x64, phi64),
                                    fast_mode=True, rtol=1e-6, atol=1e-9)


def _poly_input(M, m, dtype, seed, well_conditioned=False):
    """Blocks scaled as Iso-NS scales them (‖XᵀX‖_F^½ = 1), so σ ≤ 1; random ones (some
    nearly singular) or near-identity ones (condition number ≲ 3)."""
    x = torch.randn(M, m, m, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    if well_conditioned:
        x = torch.eye(m, dtype=dtype) + 0.3 * x / m ** 0.5
    return x / torch.linalg.matrix_norm(x.mT @ x).sqrt()[:, None, None]


@needs_interp
@pytest.mark.parametrize("m", [1, 3, 5, 8])
@pytest.mark.parametrize("method", ["ns", "ns-cubic"])
def test_interp_newton_schulz_matches_torch(tops, m, method):
    """The Triton Newton-Schulz kernel = the torch op, values and gradient, on the whole
    default schedule of each method (fp64, as Iso-NS runs its blocks; fp32 too)."""
    from hyperconn.ops.newton_schulz import _OddPolynomialIteration
    from hyperconn.projections.iso import _DEFAULT_STEPS, _schedule
    schedule = _schedule(method, _DEFAULT_STEPS[method])
    x = _poly_input(37, m, torch.float64, seed=m)
    out, grads = _grads(lambda t: tops.odd_polynomial_iteration(t, schedule), [x])
    want, want_grads = _grads(lambda t: _OddPolynomialIteration.apply(t, schedule), [x])  # the torch op itself
    # Some random blocks are nearly singular; there the steps amplify rounding to ~1e-9.
    for a, b in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8 * max(1.0, b.abs().max().item()))
    # fp32 (Iso-NS itself runs its blocks in fp64): the steps amplify rounding, so two
    # correct fp32 implementations part ways; the kernel must be as close to the fp64
    # result as the torch op in fp32 is.
    x32 = _poly_input(37, m, torch.float32, seed=m, well_conditioned=True)
    truth = _grads(lambda t: _OddPolynomialIteration.apply(t, schedule), [x32.double()])
    kern = _grads(lambda t: tops.odd_polynomial_iteration(t, schedule), [x32])
    ref = _grads(lambda t: _OddPolynomialIteration.apply(t, schedule), [x32])
    for k, r, t in zip((kern[0], *kern[1]), (ref[0], *ref[1]), (truth[0], *truth[1])):
        scale = max(1.0, t.abs().max().item())
        assert (k.double() - t).abs().max() <= 10 * (r.double() - t).abs().max() + 1e-5 * scale
    # The result is orthogonal: the kernel ran the whole schedule.
    q = tops.odd_polynomial_iteration(_poly_input(5, m, torch.float64, seed=0, well_conditioned=True), schedule)
    assert (q.mT @ q - torch.eye(m, dtype=q.dtype)).abs().max() < (1e-6 if method == "ns" else 1e-2)


@needs_interp
def test_interp_newton_schulz_gradcheck_and_dispatch(tops):
    from hyperconn.ops.newton_schulz import odd_polynomial_iteration
    from hyperconn import iso_project
    x = _poly_input(3, 3, torch.float64, seed=4).requires_grad_()
    schedule = ((1.5, -0.5, 0.0), (3.4445, -4.775, 2.0315), (1.875, -1.25, 0.375))
    assert torch.autograd.gradcheck(lambda t: tops.odd_polynomial_iteration(t, schedule), (x,),
                                    rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="m ≤ 8"):
        odd_polynomial_iteration(torch.eye(9).expand(2, 9, 9), schedule, backend="triton")
    # iso_project threads its backend down to the kernel: same projection as torch.
    raw = torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(1)) + 2 * torch.eye(5)
    torch.testing.assert_close(iso_project(raw, backend="triton"), iso_project(raw, backend="torch"),
                               rtol=1e-6, atol=1e-6)


@needs_interp
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_interp_cayley_matches_the_solve(tops, m):
    """The Triton Cayley map = projections.cayley (a batched solve): Q and ∂A, fp64."""
    from hyperconn.projections import cayley
    a = torch.randn(37, m, m, generator=torch.Generator().manual_seed(m), dtype=torch.float64) * 2
    out, grads = _grads(lambda t: tops.cayley(t), [a])
    want, want_grads = _grads(lambda t: cayley(t, backend="torch"), [a])
    for x, y in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mT @ out, torch.eye(m, dtype=out.dtype).expand_as(out), rtol=0, atol=1e-12)
    if m == 3:  # finite differences, and the variant reaches the kernel
        assert torch.autograd.gradcheck(tops.cayley, (a[:4].clone().requires_grad_(),), rtol=1e-6, atol=1e-9)
        from hyperconn.projections import orthogonal_factor
        torch.testing.assert_close(orthogonal_factor(a, "cayley", backend="triton"),
                                   orthogonal_factor(a, "cayley", backend="torch"), rtol=1e-12, atol=1e-12)


def _mixture_reference(z, basis):
    """softmax then the combination, in float64 with plain ops."""
    w = torch.softmax(z.double(), dim=-1)
    return torch.einsum("...k,ke->...e", w, basis.double().flatten(1)).unflatten(-1, basis.shape[1:])


@needs_interp
@pytest.mark.parametrize("K,shape", [(24, (4, 4)), (4, (4, 4)), (6, (3, 3)), (120, (5, 5)), (2, (2, 2)), (3, (7,))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interp_basis_mixture_matches_softmax_combination(tops, K, shape, dtype):
    """The Triton mixture = softmax · basis (value and ∂logits) for mHC-lite's permutation
    sets (n = 4: 24, n = 5: 120), circulant shifts, kromhc's 3×3 factor, a 2×2 one and a
    non-square basis; 37 tokens (a partial last tile)."""
    from hyperconn.projections import basis_mixture
    g = torch.Generator().manual_seed(K)
    basis = torch.rand(K, *shape, generator=g, dtype=dtype)
    z = torch.randn(37, K, generator=g, dtype=dtype) * 3
    out, (dz,) = _grads(lambda t: basis_mixture(t, basis, backend="triton"), [z])
    want, (want_dz,) = _grads(lambda t: _mixture_reference(t, basis).to(dtype), [z])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, want, **tol)
    torch.testing.assert_close(dz, want_dz, **tol)
    assert out.dtype == dtype and out.shape == (37, *shape)


@needs_interp
def test_interp_basis_mixture_gradcheck_double_backward_and_errors(tops):
    from hyperconn.projections import basis_mixture, shift_basis
    from hyperconn.variants.mhc_lite import permutation_set
    z = torch.randn(5, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    perms = permutation_set(4)
    fn = lambda t: basis_mixture(t, perms, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z,))
    assert torch.autograd.gradgradcheck(fn, (z,))            # create_graph: differentiable plain ops
    h = fn(z)                                                # exactly doubly stochastic
    torch.testing.assert_close(h.sum(-1), torch.ones(5, 4, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(h.sum(-2), torch.ones(5, 4, dtype=torch.float64), rtol=0, atol=1e-14)
    c = torch.randn(3, 4, dtype=torch.float64)                # the circulant map, through the shifts
    from hyperconn.variants.circulant import circulant_from_logits
    torch.testing.assert_close(basis_mixture(c, shift_basis(4), backend="triton"), circulant_from_logits(c),
                               rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="basis: expected \\(24, \\*S\\)"):
        basis_mixture(z, shift_basis(4), backend="triton")
    with pytest.raises(ValueError, match="at least one dimension"):
        basis_mixture(torch.randn(2, 5), torch.rand(5))
    with pytest.raises(ValueError, match="at most 128"):
        basis_mixture(torch.randn(2, 130), torch.rand(130, 2, 2), backend="triton")
    assert basis_mixture(torch.randn(2, 130), torch.rand(130, 2, 2), backend="auto").shape == (2, 2, 2)


# ---------------------------------------------------------------- fused coefficients (mhc)
def _plain_coefficients(x, phi, bias, alpha, eps, iters):
    """mhc's coefficient path in plain ops (torch autograd, torch Sinkhorn): the reference."""
    n, K = x.shape[-2], phi.shape[0]
    flat = x.reshape(-1, K).to(phi.dtype)
    out = (flat @ phi) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    scale = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])
    raw = bias + scale * out
    return (torch.sigmoid(raw[:, :n]), 2 * torch.sigmoid(raw[:, n:2 * n]),
            sinkhorn(raw[:, 2 * n:].unflatten(-1, (n, n)), iters, backward="unrolled"))


def _coefficient_inputs(M, n, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = n * n + 2 * n
    return (torch.randn(M, n, C, generator=g, dtype=dtype), torch.randn(n * C, N, generator=g, dtype=dtype) / (n * C) ** 0.5,
            torch.randn(N, generator=g, dtype=dtype), torch.rand(3, generator=g, dtype=dtype) + 0.5)


@needs_interp
@pytest.mark.parametrize("M,n,C", [(37, 4, 13), (3, 1, 5), (40, 3, 7), (9, 8, 4), (70, 2, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interp_sinkhorn_coefficients_match_plain_ops(tops, M, n, C, dtype):
    """The fused kernel = projection, σ / 2σ gates and the unrolled Sinkhorn in plain ops:
    outputs and the gradients of x, φ, the biases and α (token tails, K and n tails)."""
    from hyperconn.ops import triton_coefficients as tc
    inputs = _coefficient_inputs(M, n, C, dtype)
    h_pre, h_post, h_res, out, rinv = tc.sinkhorn_coefficients_forward(*inputs, 1e-6, 7)
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = _plain_coefficients(*leaves, 1e-6, 7)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(w.shape, generator=gen, dtype=dtype) for w in want]
    want_grads = torch.autograd.grad(want, leaves, grads)
    got_grads = tc.sinkhorn_coefficients_backward(*inputs, out, rinv, *grads, 7, groups=3)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip((h_pre, h_post, h_res, *got_grads), (*want, *want_grads)):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
    torch.testing.assert_close(h_res.sum(-1), torch.ones(M, n, dtype=dtype), rtol=0, atol=tol)  # rows exact


@needs_interp
def test_interp_sinkhorn_coefficients_gradcheck_and_double_backward(tops):
    inputs = [t.requires_grad_() for t in _coefficient_inputs(4, 3, 2, torch.float64, seed=2)]
    x = inputs[0]

    def fused(x, phi, bias, alpha):
        return torch.ops.hyperconn.sinkhorn_coefficients(x, phi, bias, alpha, 1e-6, 4, 0, False)[:3]

    def linear(x, phi, bias, alpha):  # hc's
        return torch.ops.hyperconn.linear_coefficients(x, phi, bias, alpha, 1e-6, 0, 0, False)[:3]
    # fast_mode: the Jacobian checked along random directions (the interpreter is slow).
    for op in (fused, linear):
        assert torch.autograd.gradcheck(op, inputs, fast_mode=True)
        assert torch.autograd.gradgradcheck(op, inputs, fast_mode=True)
    # Half-precision streams are read as they are, computed in fp32.
    xb = x.detach().bfloat16()
    h = torch.ops.hyperconn.sinkhorn_coefficients(xb, *(t.detach().float() for t in inputs[1:]), 1e-6, 4, 0, False)
    want = _plain_coefficients(xb.float(), *(t.detach().float() for t in inputs[1:]), 1e-6, 4)
    for a, b in zip(h[:3], want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_interp
def test_interp_sinkhorn_coefficients_errors(tops):
    from hyperconn.ops import triton_coefficients as tc
    x, phi, bias, alpha = _coefficient_inputs(4, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="bias: expected .* n² \\+ 2n"):
        tc.sinkhorn_coefficients_forward(x, phi, bias[:7], alpha, 1e-6, 3)
    with pytest.raises(ValueError, match="x: expected"):
        tc.sinkhorn_coefficients_forward(x[..., :2], phi, bias, alpha, 1e-6, 3)
    with pytest.raises(ValueError, match="alpha: expected"):
        tc.sinkhorn_coefficients_forward(x, phi, bias, alpha[:2], 1e-6, 3)
    with pytest.raises(ValueError, match="phi: expected"):
        tc.sinkhorn_coefficients_forward(x, phi[:, :7], bias, alpha, 1e-6, 3)


def _plain_linear_coefficients(x, phi, bias, alpha, eps, _unused=0):
    """hc's coefficient path in plain ops: bias + α·tanh(projection), no maps."""
    n, K = x.shape[-2], phi.shape[0]
    flat = x.reshape(-1, K).to(phi.dtype)
    act = torch.tanh((flat @ phi) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps))
    raw = bias + torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)]) * act
    return raw[:, :n], raw[:, n:2 * n], raw[:, 2 * n:].unflatten(-1, (n, n))


@needs_interp
@pytest.mark.parametrize("M,n,C,scale", [(37, 4, 13, 1.0), (3, 1, 5, 1.0), (40, 3, 7, 30.0), (9, 8, 4, 1e-3),
                                         (70, 2, 33, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interp_linear_coefficients_match_plain_ops(tops, M, n, C, scale, dtype):
    """The fused hc kernel = bias + α·tanh(projection) in plain ops, outputs and gradients,
    with projections scaled into tanh's saturated (30), linear (1e-3) and middle ranges."""
    from hyperconn.ops import triton_coefficients as tc
    x, phi, bias, alpha = _coefficient_inputs(M, n, C, dtype)
    inputs = (x, phi * scale, bias, alpha)
    h_pre, h_post, h_res, out, rinv = tc.linear_coefficients_forward(*inputs, 1e-6)
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = _plain_linear_coefficients(*leaves, 1e-6)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(w.shape, generator=gen, dtype=dtype) for w in want]
    want_grads = torch.autograd.grad(want, leaves, grads)
    got_grads = tc.linear_coefficients_backward(*inputs, out, rinv, *grads, groups=3)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip((h_pre, h_post, h_res, *got_grads), (*want, *want_grads)):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


def _plain_iso_coefficients(x, phi, bias, alpha, eps, steps):
    """isohc's coefficient path in plain ops: the projection, the gates and
    ``iso_project(method="ns")`` on the torch backend."""
    pre, post, _ = _plain_coefficients(x, phi, bias, alpha, eps, 1)
    n, K = x.shape[-2], phi.shape[0]
    flat = x.reshape(-1, K).to(phi.dtype)
    out = (flat @ phi) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    raw_res = bias[2 * n:] + alpha[2] * out[:, 2 * n:]
    return pre, post, iso_project(raw_res.unflatten(-1, (n, n)), "ns", steps, backend="torch")


@needs_interp
@pytest.mark.parametrize("M,n,C", [(37, 4, 13), (40, 3, 7), (20, 5, 7), (9, 8, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interp_iso_coefficients_match_plain_ops(tops, M, n, C, dtype):
    """The fused isohc kernel = projection, gates and Iso-NS (iso_project, torch backend) in
    plain ops: outputs and every gradient; H_res orthogonal and mean-preserving."""
    from hyperconn.ops import triton_coefficients as tc
    inputs = _coefficient_inputs(M, n, C, dtype)
    h_pre, h_post, h_res, out, rinv = tc.iso_coefficients_forward(*inputs, 1e-6, 12)
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = _plain_iso_coefficients(*leaves, 1e-6, 12)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(w.shape, generator=gen, dtype=dtype) for w in want]
    want_grads = torch.autograd.grad(want, leaves, grads)
    got_grads = tc.iso_coefficients_backward(*inputs, out, rinv, *grads, 12, groups=3)
    # fp64: both run the same fp64 steps; 12 Newton-Schulz steps amplify rounding to ~1e-11.
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for a, b in zip((h_pre, h_post, h_res, *got_grads), (*want, *want_grads)):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
    eye = torch.eye(n, dtype=torch.float64)
    h = h_res.double()
    assert (h.mT @ h - eye).abs().max() < 1e-5
    torch.testing.assert_close(h.sum(-1), torch.ones(M, n, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(h.sum(-2), torch.ones(M, n, dtype=torch.float64), rtol=0, atol=1e-6)


@needs_interp
def test_interp_iso_coefficients_zero_block_and_double_backward(tops):
    """A res block with nothing on the complement of 1 (constant logits, α_res = 0) maps to
    I with no gradient into it, as iso_project does; gradcheck and gradgradcheck."""
    from hyperconn.ops import triton_coefficients as tc
    x, phi, bias, alpha = _coefficient_inputs(6, 4, 3, torch.float64, seed=4)
    bias[8:] = 0.3
    alpha[2] = 0.0
    h_pre, h_post, h_res, out, rinv = tc.iso_coefficients_forward(x, phi, bias, alpha, 1e-6, 12)
    torch.testing.assert_close(h_res, torch.eye(4, dtype=torch.float64).expand(6, 4, 4), rtol=0, atol=1e-14)
    g_res = torch.randn(6, 4, 4, dtype=torch.float64)
    dx, dphi, dbias, dalpha = tc.iso_coefficients_backward(x, phi, bias, alpha, out, rinv, torch.zeros_like(h_pre),
                                                           torch.zeros_like(h_post), g_res, 12)
    assert dbias[8:].abs().max() == 0 and dphi[:, 8:].abs().max() == 0 and dx.abs().max() == 0

    inputs = [t.requires_grad_() for t in _coefficient_inputs(4, 3, 2, torch.float64, seed=2)]

    def fused(x, phi, bias, alpha):
        return torch.ops.hyperconn.iso_coefficients(x, phi, bias, alpha, 1e-6, 0, 6, False)[:3]
    assert torch.autograd.gradcheck(fused, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fused, inputs, fast_mode=True)
    with pytest.raises(ValueError, match="n ≥ 3"):
        tc.iso_coefficients_forward(*_coefficient_inputs(4, 2, 3, torch.float32), 1e-6, 12)


def _plain_hybrid_coefficients(x, phi, bias, alpha, eps, iters, steps):
    """hybrid's coefficient path in plain ops: the gates and (1 − λ)·iso_project + λ·Sinkhorn
    of the res logits, λ = alpha[3]."""
    pre, post, h_sk = _plain_coefficients(x, phi, bias, alpha, eps, iters)
    *_, h_iso = _plain_iso_coefficients(x, phi, bias, alpha, eps, steps)
    return pre, post, hybrid_mix(h_iso, h_sk, alpha[3])


@needs_interp
@pytest.mark.parametrize("M,n,C", [(37, 4, 13), (9, 3, 5), (9, 8, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interp_hybrid_coefficients_match_plain_ops(tops, M, n, C, dtype):
    """The fused hybrid kernel = the gates and (1 − λ)·Iso-NS + λ·Sinkhorn in plain ops:
    outputs and every gradient, ∂λ included; then gradcheck and gradgradcheck of the op."""
    from hyperconn.ops import triton_coefficients as tc
    x, phi, bias, alpha = _coefficient_inputs(M, n, C, dtype)
    inputs = (x, phi, bias, torch.cat([alpha, torch.tensor([0.3], dtype=dtype)]))
    h_pre, h_post, h_res, out, rinv = tc.hybrid_coefficients_forward(*inputs, 1e-6, 7, 12)
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = _plain_hybrid_coefficients(*leaves, 1e-6, 7, 12)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(w.shape, generator=gen, dtype=dtype) for w in want]
    want_grads = torch.autograd.grad(want, leaves, grads)
    got_grads = tc.hybrid_coefficients_backward(*inputs, out, rinv, *grads, 7, 12, groups=3)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for a, b in zip((h_pre, h_post, h_res, *got_grads), (*want, *want_grads)):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
    if dtype == torch.float64 and n == 3:
        args = [t.detach().clone().requires_grad_() for t in _coefficient_inputs(4, 3, 2, dtype, seed=2)]
        args[3] = torch.tensor([0.7, 1.1, 0.9, 0.4], dtype=dtype, requires_grad=True)

        def fused(x, phi, bias, alpha):
            return torch.ops.hyperconn.hybrid_coefficients(x, phi, bias, alpha, 1e-6, 5, 6, False)[:3]
        assert torch.autograd.gradcheck(fused, args, fast_mode=True)
        assert torch.autograd.gradgradcheck(fused, args, fast_mode=True)
    with pytest.raises(ValueError, match="alpha: expected .* λ, shape \\(4,\\)"):
        tc.hybrid_coefficients_forward(*inputs[:3], alpha, 1e-6, 7, 12)


@needs_interp
@pytest.mark.parametrize("kind,ks,n,C", [("sinkhorn", (5, 0), 4, 13), ("iso", (0, 6), 3, 33), ("linear", (0, 0), 8, 5),
                                        ("hybrid", (5, 6), 4, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_interp_fused_coefficients_read_the_branch_input(tops, kind, ks, n, C, dtype):
    """With read=True the fused op also returns H_pre x (its own H_pre), and its backward
    writes one ∂x for the coefficients and the read: the same as the coefficients plus
    stream_pre (reference) differentiated by autograd; double backward and gradcheck too."""
    gen = torch.Generator().manual_seed(5)
    x, phi, bias, alpha = _coefficient_inputs(11, n, C, torch.float64 if dtype == torch.float64 else torch.float32)
    if kind == "hybrid":
        alpha = torch.cat([alpha, alpha.new_tensor([0.6])])
    x = x.to(dtype)
    op = getattr(torch.ops.hyperconn, f"{kind}_coefficients")
    leaves = [t.clone().requires_grad_() for t in (x, phi, bias, alpha)]
    got = op(*leaves, 1e-6, *ks, True)
    assert got[5].dtype == dtype and got[5].shape == (11, C)
    want_read = reference.stream_pre(leaves[0].detach().to(got[0].dtype), got[0].detach()).to(dtype)
    # bf16: ≈2 ulps (the interpreter rounds fp32 → bf16 by truncation)
    rtol = 1.6e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got[5], want_read, rtol=rtol, atol=rtol * want_read.abs().max().item())
    plain = [t.clone().requires_grad_() for t in (x, phi, bias, alpha)]
    h = op(*plain, 1e-6, *ks, False)
    u = reference.stream_pre(plain[0].to(h[0].dtype), h[0]).to(dtype)
    g = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (*h[:3], u)]
    want = torch.autograd.grad([*h[:3], u], plain, g)
    have = torch.autograd.grad([*got[:3], got[5]], leaves, g)
    for a, b in zip(have, want):
        tol = 1e-12 if dtype == torch.float64 else (2e-2 if dtype == torch.bfloat16 else 2e-5)
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
    if dtype == torch.float64 and kind == "sinkhorn":
        args = [t.detach().clone().requires_grad_() for t in _coefficient_inputs(4, 3, 2, dtype, seed=2)]

        def with_read(x, phi, bias, alpha):
            return op(x, phi, bias, alpha, 1e-6, 4, 0, True)[5]
        assert torch.autograd.gradcheck(with_read, args, fast_mode=True)
        assert torch.autograd.gradgradcheck(with_read, args, fast_mode=True)


@needs_interp
@pytest.mark.parametrize("variant,kernel", [("mhc", "sinkhorn"), ("isohc", "iso"), ("hc", "linear"),
                                            ("hybrid", "hybrid")])
def test_interp_layer_takes_the_fused_path(tops, monkeypatch, variant, kernel):
    """A dynamic mhc / isohc layer on the Triton backend computes its coefficients in the
    fused op (one call per forward), with the output and every gradient of the unfused
    ops; a variant that changes one of the maps, or another backward / method, is not fused."""
    from hyperconn import HyperConnection
    from hyperconn.ops import triton_coefficients as tc
    from hyperconn.variants import HC, MHC, Hybrid, IsoHC, Variant
    calls = []
    real = tc._forward  # (x, phi, bias, alpha, eps, res map, iters, steps)
    monkeypatch.setattr(tc, "_forward", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    torch.manual_seed(0)
    layer = HyperConnection(37, 4, torch.nn.Linear(37, 37), variant=variant, kernels="triton")
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(2, 5, 4, 37, generator=gen), torch.randn(2, 5, 4, 37, generator=gen)
    fused_out, fused_grads = _layer_grads(layer, x, g)
    want_calls = [{"sinkhorn": tc.SINKHORN, "iso": tc.ISO, "linear": tc.LINEAR, "hybrid": tc.HYBRID}[kernel]]
    assert calls == want_calls
    monkeypatch.setattr(tops, "FUSE_COEFFICIENTS", False)
    plain_out, plain_grads = _layer_grads(layer, x, g)
    assert calls == want_calls
    for a, b in zip((fused_out, *fused_grads), (plain_out, *plain_grads)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * max(1.0, b.abs().max().item()))

    class Sharper(MHC):  # a user's variant (unregistered: no name) that changes the gates
        def map_pre_post(self, raw_pre, raw_post):
            return torch.sigmoid(2 * raw_pre), 2 * torch.sigmoid(raw_post)
    assert MHC(4).fused_maps() == ("sinkhorn", 20)
    assert MHC(4, sinkhorn_iters=5).fused_maps() == ("sinkhorn", 5)
    assert MHC(4, sinkhorn_backward="implicit").fused_maps() is None
    assert Sharper(4).fused_maps() is None and Variant(4).fused_maps() is None

    class Rotated(IsoHC):  # changes the res map
        def map_res(self, raw_res, state):
            return super().map_res(raw_res.mT, state)
    assert IsoHC(4).fused_maps() == ("iso", 12) and IsoHC(4, iso_steps=7).fused_maps() == ("iso", 7)
    assert IsoHC(4, iso_method="polar").fused_maps() is None and IsoHC(4, iso_method="ns-cubic").fused_maps() is None
    assert Rotated(4).fused_maps() is None

    class Clipped(HC):  # changes the activation
        def dynamic_activation(self, raw):
            return raw.clamp(-1, 1)
    assert HC(4).fused_maps() == ("linear", 0) and Clipped(4).fused_maps() is None
    assert Hybrid(4, hybrid_lambda=0.25).fused_maps() == ("hybrid", 20, 12, 0.25)
    assert Hybrid(4, iso_method="cayley").fused_maps() is None
    assert Hybrid(4, sinkhorn_backward="implicit").fused_maps() is None


def _fold_probe(monkeypatch, tc):
    """Record, per fused-coefficient backward, whether it was handed the merge's ∂x."""
    seen = []
    real = tc._backward

    def probe(*a, **k):  # (x, phi, bias, alpha, out, rinv, g_pre, g_post, g_res, res, iters, steps, groups,
        #                    h_pre, g_read, pending)
        seen.append(k.get("pending", a[15] if len(a) > 15 else None) is not None)
        return real(*a, **k)
    monkeypatch.setattr(tc, "_backward", probe)
    return seen


FOLD_CASES = [("mhc", torch.float32), ("isohc", torch.float32), ("hc", torch.bfloat16), ("hybrid", torch.float64)]


@needs_interp
@pytest.mark.parametrize("variant,dtype", FOLD_CASES)
def test_interp_fused_backward_adds_the_merge_dx(tops, monkeypatch, variant, dtype):
    """In a plain backward the merge leaves its ∂x in the layer's slot and the fused
    coefficient op adds it in the projection backward's store (one ∂x per layer); every
    gradient equals the same layer's without a slot, also with finish called twice, a
    retained graph walked twice, a backward to the branch alone first, and create_graph
    (where nothing is deferred)."""
    _check_fold(tops, monkeypatch, variant, dtype, torch.device("cpu"), 1.0)


@pytest.mark.skipif(INTERP or not torch.cuda.is_available(), reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("variant,dtype", FOLD_CASES)
def test_cuda_fused_backward_adds_the_merge_dx(monkeypatch, variant, dtype):
    """The interpreter test above on the GPU (its approximate exp and division: 5× the tolerance)."""
    from hyperconn.ops import triton_backend
    _check_fold(triton_backend, monkeypatch, variant, dtype, torch.device("cuda"), 5.0)


def _check_fold(tops, monkeypatch, variant, dtype, device, loosen):
    from hyperconn import HyperConnection
    from hyperconn.ops import triton_coefficients as tc
    torch.manual_seed(0)
    layer = HyperConnection(37, 4, torch.nn.Linear(37, 37), variant=variant, kernels="triton").to(device, dtype)
    gen = torch.Generator().manual_seed(3)
    x0, g = (torch.randn(2, 5, 4, 37, generator=gen).to(device, dtype) for _ in range(2))
    tol = loosen * {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]

    def run(twice=False, create_graph=False, retain=False, branch_first=False):
        x = x0.clone().requires_grad_()
        if twice:
            u, finish = layer.pre(x)
            out = finish(layer.branch(u)) + 0.5 * finish(torch.sin(u))
        else:
            out = layer(x)
        wrt = [x, *layer.parameters()]
        if branch_first:
            torch.autograd.grad(out, list(layer.branch.parameters()), g, retain_graph=True)
        if retain:
            torch.autograd.grad(out, wrt, g, retain_graph=True)
        return torch.autograd.grad(out, wrt, g, create_graph=create_graph)

    cases = {"plain": {}, "twice": {"twice": True}, "retain": {"retain": True}, "branch_first": {"branch_first": True},
             "create_graph": {"create_graph": True}}
    seen = _fold_probe(monkeypatch, tc)
    got = {name: run(**kw) for name, kw in cases.items()}
    # one fused backward kernel per walk that reaches the coefficients (retain: two; the walk
    # to the branch alone: none; create_graph differentiates plain ops), each given the merge's ∂x
    assert seen == [True] * 5, seen
    monkeypatch.setattr(tops, "FOLD_MERGE_GRAD", False)  # the A/B switch: autograd adds the two ∂x
    seen.clear()
    for name, kw in cases.items():
        want = run(**kw)
        for a, b in zip(got[name], want):
            scale = max(1.0, b.double().abs().max().item())
            torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")
    assert not any(seen)


@needs_interp
def test_interp_fused_backward_folds_only_what_it_can(tops, monkeypatch):
    """The fold also for non-contiguous streams (both ∂x are contiguous in token order);
    none when the coefficients were taken without grad (a pre under no_grad, a finish
    under grad: the merge returns its ∂x), none on the unfused path (no fused op arms the
    slot); gradients equal the torch backend's throughout."""
    seen = _fold_probe(monkeypatch, __import__("hyperconn.ops.triton_coefficients", fromlist=["_"]))
    ref, fast = _layer_pair("mhc", 4, 37, torch.device("cpu"))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, 4, 37, generator=gen).transpose(0, 1)  # (2, 5, 4, 37), not contiguous
    g = torch.randn(2, 5, 4, 37, generator=gen)
    assert not x.is_contiguous()
    for a, b in zip(_layer_grads(fast, x, g)[1], _layer_grads(ref, x, g)[1]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * max(1.0, b.abs().max().item()))
    assert seen == [True]
    xs = x.contiguous().requires_grad_()
    dx = []
    for layer in (fast, ref):
        with torch.no_grad():
            u, finish = layer.pre(xs)
        dx.append(torch.autograd.grad(finish(layer.branch(u)), [xs], g)[0])
    torch.testing.assert_close(dx[0], dx[1], rtol=2e-5, atol=2e-5)
    assert seen == [True]  # the fused op's backward never ran (its outputs carry no graph)
    monkeypatch.setattr(tops, "FUSE_COEFFICIENTS", False)
    _check_layer_backends("mhc", torch.device("cpu"), torch.float32, 2e-5)
    assert seen == [True]  # the unfused path runs no fused backward at all


def test_mixture_kernel_limits_agree_without_importing_triton():
    """projections.mixture mirrors the kernel's limits (it must not import Triton); a
    basis beyond the tile is refused by the kernel with the numbers."""
    pytest.importorskip("triton")
    from hyperconn.ops import triton_kernels as tk
    from hyperconn.projections import mixture
    assert (mixture.MAX_KERNEL_K, mixture.MAX_KERNEL_TILE) == (tk.MAX_MIXTURE_K, tk.MAX_MIXTURE_TILE)
    assert mixture.kernel_takes(120, 25) and mixture.kernel_takes(16, 256) and not mixture.kernel_takes(36, 81)
    assert not mixture.kernel_takes(129, 4)
    with pytest.raises(ValueError, match=r"basis: expected K·E ≤ 4096 .* 36 matrices of 81 values \(64·128\)"):
        tk._mixture_layout(torch.zeros(2, 36), torch.zeros(36, 9, 9))


@needs_interp
@pytest.mark.parametrize("variant", ["hc", "mhc", "isohc", "hybrid", "mhc-lite"])
def test_interp_triton_layer_compiles_fullgraph(tops, variant):
    """A layer on the Triton backend traces whole under torch.compile (every kernel an
    opaque custom op, no graph break; hc, mhc, isohc and hybrid through their fused
    coefficient ops, mhc-lite through basis_mixture),
    and the compiled forward and backward equal eager's."""
    from hyperconn import HyperConnection
    torch.manual_seed(0)
    layer = HyperConnection(37, 4, torch.nn.Linear(37, 37), variant=variant, kernels="triton")
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(2, 5, 4, 37, generator=gen), torch.randn(2, 5, 4, 37, generator=gen)
    want_out, want_grads = _layer_grads(layer, x, g)
    traced = set()

    def recording_backend(gm, example_inputs):  # the ops Dynamo put in the graph, then aot_eager
        traced.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=recording_backend)
    got_out, got_grads = _layer_grads(compiled, x, g)
    for a, b in zip((got_out, *got_grads), (want_out, *want_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
    kernels = {"hc": ["linear_coefficients"], "mhc": ["sinkhorn_coefficients"], "isohc": ["iso_coefficients"],
               "hybrid": ["hybrid_coefficients"], "mhc-lite": ["basis_mixture"]}[variant]
    fused = variant != "mhc-lite"  # its coefficient op also reads H_pre x: no stream_pre
    want_ops = {f"hyperconn.{k}.default" for k in kernels + ["stream_merge"] + ([] if fused else ["stream_pre"])}
    assert want_ops <= traced, traced
    assert fused == ("hyperconn.stream_pre.default" not in traced), traced


@needs_interp
def test_interp_kernel_constants_are_made_once_per_device(tops):
    """Schedules and bases the kernels read are made once and reused, so a step captured
    in a CUDA graph never copies from the host."""
    from hyperconn.ops import triton_coefficients as tc
    from hyperconn.ops import triton_kernels as tk
    from hyperconn.projections.iso import helmert_basis
    x = torch.randn(5, 3, 3)
    first = tk._poly_layout(x, [(1.5, -0.5, 0.0)] * 3)[4]
    assert tk._poly_layout(x, [1.5, -0.5, 0.0] * 3)[4] is first           # nested or flat: one constant
    assert tk._poly_layout(x, [(1.5, -0.5, 0.0)] * 2)[4] is not first
    assert tc._iso_constants(4, 12, x.device)[0] is tc._iso_constants(4, 12, x.device)[0]
    assert helmert_basis(4, torch.float32, "cpu") is helmert_basis(4, torch.float32)
    torch.testing.assert_close(helmert_basis(4, torch.float64).T @ helmert_basis(4, torch.float64),
                               torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-15)


@needs_interp
def test_interp_constants_prepared_and_user_code_not_skipped(tops, monkeypatch):
    """prepare_constants makes an isohc / hybrid layer's kernel constants ahead of the first
    step (HyperConnection does it at construction and .to() on CUDA); a layer with a hook on
    its variant, or a subclass overriding raw_coefficients, keeps the unfused path, so that
    user code still runs."""
    from hyperconn import HyperConnection
    from hyperconn.ops import triton_coefficients as tc
    from hyperconn.ops import triton_kernels as tk
    from hyperconn.variants import Hybrid, IsoHC, MHC
    monkeypatch.setattr(tk, "_DEVICE_CONSTANTS", {})
    cpu = torch.device("cpu")
    tops.prepare_constants(MHC(4), 4, cpu)
    assert tk._DEVICE_CONSTANTS == {}
    tops.prepare_constants(IsoHC(5, iso_steps=7), 5, cpu)
    tops.prepare_constants(Hybrid(4), 4, cpu)
    keys = {k[:2] for k in tk._DEVICE_CONSTANTS}
    assert {("helmert", 5), ("ns", 7), ("helmert", 4), ("ns", 12)} <= keys, keys
    assert sum(k[0] == "poly" for k in tk._DEVICE_CONSTANTS) == 2

    calls = []
    real = tc._forward
    monkeypatch.setattr(tc, "_forward", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    x = torch.randn(3, 4, 16)
    layer = HyperConnection(16, 4, torch.nn.Linear(16, 16), variant="mhc", kernels="triton")
    layer(x)
    assert len(calls) == 1
    seen = []
    handle = layer.mixer.register_forward_hook(lambda mod, args, out: seen.append(1))
    layer(x)
    assert len(calls) == 1 and seen == [1]  # the hook ran: the unfused path
    handle.remove()

    class Scaled(HyperConnection):
        def raw_coefficients(self, x, grad_slot=None, backend=None):
            pre, post, res = super().raw_coefficients(x, grad_slot, backend)
            return 2 * pre, post, res
    Scaled(16, 4, torch.nn.Linear(16, 16), variant="mhc", kernels="triton")(x)
    assert len(calls) == 1


@needs_interp
def test_interp_custom_ops_pass_opcheck(tops):
    """Every registered Triton op: schema, autograd registration, fake (meta) implementation
    and AOT dispatch with dynamic shapes, which is what torch.compile and CUDA graphs rely on."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, generator=g, requires_grad=True)
    h = torch.randn(3, 4, generator=g, requires_grad=True)
    hr = torch.randn(3, 4, 4, generator=g, requires_grad=True)
    y = torch.randn(3, 8, generator=g, requires_grad=True)
    phi = torch.randn(32, 24, generator=g, requires_grad=True)
    z = _poly_input(5, 3, torch.float64, seed=1).requires_grad_()
    cases = [(torch.ops.hyperconn.stream_pre.default, (x, h, 0)),
             (torch.ops.hyperconn.stream_merge.default, (x, hr, h, y, 0)),
             (torch.ops.hyperconn.sinkhorn_tokens.default, (torch.randn(3, 4, 4, generator=g, requires_grad=True), 5)),
             (torch.ops.hyperconn.rms_projection.default, (x, phi, 1e-6)),
             (torch.ops.hyperconn.odd_polynomial.default, (z, [1.5, -0.5, 0.0, 1.875, -1.25, 0.375])),
             (torch.ops.hyperconn.cayley.default, (torch.randn(3, 4, 4, generator=g, dtype=torch.float64,
                                                               requires_grad=True),)),
             (torch.ops.hyperconn.basis_mixture.default, (torch.randn(5, 6, generator=g, requires_grad=True),
                                                          torch.rand(6, 3, 3, generator=g))),
             *[(getattr(torch.ops.hyperconn, f"{kind}_coefficients").default,
                (x, phi, torch.randn(24, generator=g, requires_grad=True),
                 torch.rand(4 if kind == "hybrid" else 3, generator=g).requires_grad_(), 1e-6, 5, 4, read))
               for kind in ("sinkhorn", "iso", "linear", "hybrid") for read in (False, True)]]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@needs_interp
def test_interp_dispatch_selects_triton(tops, monkeypatch):
    x, h_pre, h_res, h_post, y = _inputs(4, (2,), False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert kernels.resolve_backend(None, x) == "torch"           # auto: CPU → torch
    assert kernels.resolve_backend("triton", x) == "triton"      # interpreter allows CPU
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    _close(kernels.stream_merge(x, h_res, h_post, y),
           reference.stream_merge(x, h_res, h_post, y), torch.float32)
    _close(kernels.stream_pre(x, h_pre), reference.stream_pre(x, h_pre), torch.float32)
    z = torch.randn(2, 4, 4)
    torch.testing.assert_close(kernels.sinkhorn_tokens(z, 5), sinkhorn(z, 5), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="n ≤ 8"):
        kernels.sinkhorn_tokens(torch.randn(2, 9, 9), 5)
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert kernels.sinkhorn_tokens(torch.randn(2, 9, 9), 5).shape == (2, 9, 9)


# =================================================================== Triton, compiled (CUDA)
@pytest.mark.skipif(INTERP or not torch.cuda.is_available(), reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(1, (3,), False), (4, (2, 3), False), (4, (5,), True),
                                  (8, (2, 3), True)], ids=_ids)
def test_cuda_triton_matches_reference(case, dtype):
    pytest.importorskip("triton")
    from hyperconn.ops import triton_backend as triton_ops
    dev = torch.device("cuda")
    x, h_pre, h_res, h_post, y = (t.to(dev) for t in _inputs(*case, C=1031, dtype=dtype))
    if not os.environ.get(dispatch.ENV_VAR):
        assert kernels.resolve_backend(None, x) == "triton"  # auto picks Triton on CUDA
    for fn, ref, args in ((triton_ops.stream_pre, reference.stream_pre, [x, h_pre]),
                          (triton_ops.stream_merge, reference.stream_merge, [x, h_res, h_post, y])):
        out, grads = _grads(fn, args)
        want, want_grads = _grads(ref, args)
        for a, b in zip((out, *grads), (want, *want_grads)):
            _close(a, b, a.dtype)
    n = case[0]
    from hyperconn.ops.torch_backend import plain_rms_projection
    phi = torch.randn(n * x.shape[-1], n * n + 2 * n, device=dev) / (n * x.shape[-1]) ** 0.5
    out, grads = _grads(lambda a, b: triton_ops.rms_projection(a, b, 1e-6, torch.float32), [x, phi])
    want, want_grads = _grads(lambda a, b: plain_rms_projection(a.float(), b, 1e-6, torch.float32), [x, phi])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
    z = torch.randn(257, n, n, device=dev) * 4
    p, (gp,) = _grads(lambda t: triton_ops.sinkhorn_tokens(t, 20), [z])
    q, (gq,) = _grads(lambda t: sinkhorn(t, 20, backward="unrolled"), [z])
    torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    torch.testing.assert_close(gp, gq, rtol=0, atol=1e-4)


@pytest.mark.skipif(INTERP or not torch.cuda.is_available(), reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("kind,n", [("sinkhorn", 1), ("sinkhorn", 4), ("sinkhorn", 8), ("iso", 3), ("iso", 4),
                                    ("iso", 8), ("linear", 4), ("hybrid", 4)])
def test_cuda_fused_coefficients_match_plain_ops(kind, n):
    from hyperconn.ops import triton_coefficients as tc
    ks = {"sinkhorn": (20,), "iso": (12,), "linear": (), "hybrid": (20, 12)}[kind]
    plain = {"sinkhorn": _plain_coefficients, "iso": _plain_iso_coefficients, "linear": _plain_linear_coefficients,
             "hybrid": _plain_hybrid_coefficients}[kind]
    inputs = _coefficient_inputs(4099, n, 515, torch.float32)
    if kind == "hybrid":
        inputs = (*inputs[:3], torch.cat([inputs[3], torch.tensor([0.3])]))
    inputs = [t.cuda() for t in inputs]
    h_pre, h_post, h_res, out, rinv = getattr(tc, f"{kind}_coefficients_forward")(*inputs, 1e-6, *ks)
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = plain(*leaves, 1e-6, *ks)
    grads = [torch.randn_like(w) for w in want]
    want_grads = torch.autograd.grad(want, leaves, grads)
    got_grads = getattr(tc, f"{kind}_coefficients_backward")(*inputs, out, rinv, *grads, *ks)
    for a, b in zip((h_pre, h_post, h_res, *got_grads), (*want, *want_grads)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))


# =================================================================== the layer's dispatch
def _layer_pair(variant, n, C, device, **kw):
    """Two identical HyperConnection layers (Linear branch), torch and Triton backends."""
    from hyperconn import HyperConnection
    torch.manual_seed(0)
    ref = HyperConnection(C, n, torch.nn.Linear(C, C), variant=variant, kernels="torch", **kw)
    fast = HyperConnection(C, n, torch.nn.Linear(C, C), variant=variant, kernels="triton", **kw)
    fast.load_state_dict(ref.state_dict())
    return ref.to(device), fast.to(device)


def _layer_grads(layer, x, g):
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], g)
    return out, grads


def _check_layer_backends(variant, device, dtype, tol):
    n, C = 4, 37
    ref, fast = _layer_pair(variant, n, C, device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, n, C, generator=gen).to(device, dtype)
    g = torch.randn(2, 5, n, C, generator=gen).to(device, dtype)
    ref, fast = ref.to(dtype), fast.to(dtype)
    out_r, grads_r = _layer_grads(ref, x, g)
    out_f, grads_f = _layer_grads(fast, x, g)
    for a, b in zip((out_f, *grads_f), (out_r, *grads_r)):
        scale = max(1.0, b.double().abs().max().item())
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale)


@needs_interp
@pytest.mark.parametrize("variant", ["hc", "mhc", "isohc", "hybrid", "mhc-lite", "circulant", "kromhc",
                                     "orthostochastic"])
def test_interp_layer_triton_matches_torch(tops, variant):
    """HyperConnection(kernels="triton") = kernels="torch": output and every gradient."""
    _check_layer_backends(variant, torch.device("cpu"), torch.float32, 2e-5)


def test_layer_kernels_argument_is_validated():
    from hyperconn import HyperConnection
    with pytest.raises(ValueError, match="kernels"):
        HyperConnection(8, 2, torch.nn.Identity(), kernels="cuda")


@pytest.mark.skipif(INTERP or not HAS_TRITON, reason="needs Triton, outside the interpreter")
def test_layer_triton_on_cpu_needs_interpreter():
    from hyperconn import HyperConnection
    layer = HyperConnection(8, 2, torch.nn.Identity(), kernels="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        layer(torch.randn(3, 2, 8))


@pytest.mark.skipif(INTERP or not torch.cuda.is_available(), reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("variant", ["hc", "mhc", "isohc", "hybrid", "harmonized", "mhc-lite", "circulant",
                                     "kromhc", "orthostochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_triton_matches_torch(variant, dtype):
    _check_layer_backends(variant, torch.device("cuda"), dtype,
                          1e-4 if dtype == torch.float32 else 2e-2)
