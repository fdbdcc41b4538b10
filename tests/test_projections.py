"""Invariants and gradients of the manifold projections (issue 2)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hyperconn import hybrid_mix, iso_project, sinkhorn
from hyperconn.projections import helmert_basis

SETTINGS = settings(max_examples=60, deadline=None)

batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)
sizes = st.integers(1, 8)
dtypes = st.sampled_from([torch.float32, torch.float64])
scales = st.sampled_from([1e-3, 1e-1, 1.0, 10.0, 1e2, 1e4])
seeds = st.integers(0, 2**31 - 1)


def randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).mul(scale).to(dtype)


# ---------------------------------------------------------------- sinkhorn
@SETTINGS
@given(batch=batch_shapes, n=sizes, dtype=dtypes, scale=scales, seed=seeds)
def test_sinkhorn_rows_exact_entries_nonnegative_finite(batch, n, dtype, scale, seed):
    p = sinkhorn(randn(batch + (n, n), dtype, seed, scale))
    assert p.shape == batch + (n, n) and p.dtype == dtype
    assert torch.isfinite(p).all()
    assert (p >= 0).all()
    assert (p.sum(-1) - 1).abs().max().item() <= 1e-6


@SETTINGS
@given(batch=batch_shapes, n=sizes, dtype=dtypes, std=st.floats(1e-3, 0.5), seed=seeds)
def test_sinkhorn_columns_converge_for_moderate_logits(batch, n, dtype, std, seed):
    # std ≤ 0.5: worst column error over 1e5 draws per n was 1.5e-5 (std 1 reaches 1.5e-2
    # for a rare peaked 2×2 draw, e.g. seed 42320 — slow convergence, not a bug).
    p = sinkhorn(randn(batch + (n, n), dtype, seed, std), iters=20)
    assert (p.sum(-2) - 1).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinkhorn_half_inputs_computed_in_fp32(dtype):
    logits = randn((5, 4, 4), torch.float32, 0)
    p = sinkhorn(logits.to(dtype))
    assert p.dtype == dtype
    ref = sinkhorn(logits.to(dtype).float())
    torch.testing.assert_close(p.float(), ref, atol=1e-2, rtol=0)  # only the final rounding differs


def test_sinkhorn_matches_independent_scaling_iteration():
    # Classic (non-log) Sinkhorn on K = exp(Z): alternate column and row scaling.
    z = randn((3, 5, 5), torch.float64, 1)
    k = z.exp()
    for _ in range(20):
        k = k / k.sum(-2, keepdim=True)
        k = k / k.sum(-1, keepdim=True)
    torch.testing.assert_close(sinkhorn(z, iters=20), k, atol=1e-12, rtol=0)


def test_sinkhorn_extreme_logits_finite_and_gradients_finite():
    z = randn((4, 6, 6), torch.float32, 2, 1e4).requires_grad_()
    for backward in ("unrolled", "implicit"):
        p = sinkhorn(z, backward=backward)
        (g,) = torch.autograd.grad((p * torch.randn_like(p)).sum(), z)
        assert torch.isfinite(p).all() and torch.isfinite(g).all()


def test_sinkhorn_gradcheck_unrolled():
    z = randn((2, 4, 4), torch.float64, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, iters=7), (z,))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_sinkhorn_gradcheck_implicit_against_converged_map(n):
    # Finite differences of the forward with many iterations ≈ the exact fixed point map.
    z = randn((2, n, n), torch.float64, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, iters=400, backward="implicit"), (z,), atol=1e-6)


def test_sinkhorn_implicit_matches_unrolled_when_converged():
    z = randn((3, 4, 4), torch.float64, 5).requires_grad_()
    w = torch.randn(3, 4, 4, dtype=torch.float64)
    (g_unrolled,) = torch.autograd.grad((sinkhorn(z, 300) * w).sum(), z)
    (g_implicit,) = torch.autograd.grad((sinkhorn(z, 300, backward="implicit") * w).sum(), z)
    torch.testing.assert_close(g_implicit, g_unrolled, atol=1e-9, rtol=1e-7)


def _saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_sinkhorn_implicit_memory_independent_of_iters():
    z = randn((8, 4, 4), torch.float64, 6).requires_grad_()
    implicit = [_saved_bytes(lambda: sinkhorn(z, iters=k, backward="implicit")) for k in (5, 50)]
    unrolled = [_saved_bytes(lambda: sinkhorn(z, iters=k)) for k in (5, 50)]
    assert implicit[0] == implicit[1] == z.numel() * z.element_size()  # only P is kept
    assert unrolled[0] == unrolled[1] == z.numel() * z.element_size()  # only the logits


def test_sinkhorn_unrolled_backward_matches_autograd_through_the_iterations():
    z = randn((3, 5, 5), torch.float64, 10, 2.0).requires_grad_()
    w = torch.randn(3, 5, 5, dtype=torch.float64)
    (ours,) = torch.autograd.grad((sinkhorn(z, iters=9) * w).sum(), z)
    ref = z.detach().clone().requires_grad_()
    y = ref
    for _ in range(9):
        y = y - torch.logsumexp(y, -2, keepdim=True)
        y = y - torch.logsumexp(y, -1, keepdim=True)
    (expected,) = torch.autograd.grad((y.exp() * w).sum(), ref)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(iters=0), "iters"), (dict(iters=-3), "iters"), (dict(backward="magic"), "backward"),
])
def test_sinkhorn_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(torch.zeros(3, 3), **kwargs)
    with pytest.raises(ValueError, match="logits"):
        sinkhorn(torch.zeros(3, 4))


# ---------------------------------------------------------------- iso
@SETTINGS
@given(batch=batch_shapes, n=sizes, dtype=dtypes, scale=scales, seed=seeds,
       method=st.sampled_from(["ns", "polar"]))
def test_iso_preserves_mean_for_every_input(batch, n, dtype, scale, seed, method):
    h = iso_project(randn(batch + (n, n), dtype, seed, scale), method=method)
    assert h.shape == batch + (n, n) and h.dtype == dtype and torch.isfinite(h).all()
    assert (h.sum(-1) - 1).abs().max().item() <= 1e-6


@SETTINGS
@given(batch=batch_shapes, n=sizes, dtype=dtypes, scale=scales, seed=seeds)
def test_iso_polar_is_orthogonal(batch, n, dtype, scale, seed):
    raw = randn(batch + (n, n), dtype, seed, scale)
    h = iso_project(raw, method="polar")
    eye = torch.eye(n, dtype=dtype)
    assert (h.mT @ h - eye).abs().max().item() <= 1e-6


def _perp_block(raw):
    u = helmert_basis(raw.shape[-1], raw.dtype)
    return u.mT @ raw @ u


@SETTINGS
@given(batch=batch_shapes, n=sizes, dtype=dtypes, seed=seeds)
def test_iso_ns_orthogonal_near_identity(batch, n, dtype, seed):
    # Inputs I + N(0, 0.3²). Five cubic NS steps provably reach 1e-3 only when the 1^⊥
    # block is well conditioned (κ ≤ 2, see iso_project's docstring); at n = 8 most such
    # draws have κ > 2, where we assert the weaker, still useful, contraction property.
    raw = torch.eye(n, dtype=dtype) + randn(batch + (n, n), dtype, seed, 0.3)
    h = iso_project(raw, method="ns-cubic", steps=5)
    err = (h.mT @ h - torch.eye(n, dtype=dtype)).norm(dim=(-2, -1))
    if n <= 2:
        assert err.max().item() <= 1e-6
        return
    sv = torch.linalg.svdvals(_perp_block(raw.double()))
    well = sv[..., -1] * 2 >= sv[..., 0]
    assert (err[well] <= 1e-3).all()
    more = iso_project(raw, method="ns-cubic", steps=12)
    err_more = (more.mT @ more - torch.eye(n, dtype=dtype)).norm(dim=(-2, -1))
    assert (err_more <= err + 1e-5).all()


def test_iso_ns_converges_with_identity_like_inputs_for_all_n():
    for n in range(1, 9):
        raw = torch.eye(n, dtype=torch.float64) + randn((64, n, n), torch.float64, n, 0.05)
        h = iso_project(raw, method="ns-cubic", steps=5)
        assert (h.mT @ h - torch.eye(n, dtype=torch.float64)).norm(dim=(-2, -1)).max() <= 1e-3


@pytest.mark.parametrize("n", [3, 4, 7])
def test_iso_polar_equals_independent_svd_of_perp_block(n):
    raw = randn((5, n, n), torch.float64, 7)
    # Independent: polar factor via eigen-decomposition of AᵀA: Q = A (AᵀA)^{-1/2}.
    a = _perp_block(raw)
    evals, evecs = torch.linalg.eigh(a.mT @ a)
    q = a @ evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.mT
    u = helmert_basis(n, torch.float64)
    expected = torch.full((n, n), 1.0 / n, dtype=torch.float64) + u @ q @ u.mT
    torch.testing.assert_close(iso_project(raw, method="polar"), expected, atol=1e-10, rtol=0)


def test_iso_small_n():
    assert torch.equal(iso_project(torch.randn(3, 1, 1)), torch.ones(3, 1, 1))
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    for method in ("ns", "polar"):
        torch.testing.assert_close(iso_project(swap, method), swap, atol=1e-6, rtol=0)
        torch.testing.assert_close(iso_project(torch.eye(2) * 3, method), torch.eye(2))
        # a = 0 on the 1^⊥ block: the tie goes to +1, the identity
        torch.testing.assert_close(iso_project(torch.ones(2, 2), method), torch.eye(2))


def test_iso_gradcheck_ns_and_polar():
    raw = (torch.eye(4, dtype=torch.float64) + randn((2, 4, 4), torch.float64, 8, 0.3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: iso_project(t, "ns", 5), (raw,))
    assert torch.autograd.gradcheck(lambda t: iso_project(t, "polar"), (raw,))


def test_iso_polar_backward_matches_autograd_through_svd():
    raw = (torch.eye(5, dtype=torch.float64) + randn((3, 5, 5), torch.float64, 9, 0.4)).requires_grad_()
    w = torch.randn(3, 5, 5, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((iso_project(raw, "polar") * w).sum(), raw)
    u = helmert_basis(5, torch.float64)
    uu, _, vh = torch.linalg.svd(u.mT @ raw @ u)
    (g_ref,) = torch.autograd.grad(((1 / 5 + u @ (uu @ vh) @ u.mT) * w).sum(), raw)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="svd"), "method"), (dict(steps=0), "steps"),
])
def test_iso_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        iso_project(torch.eye(3), **kwargs)
    with pytest.raises(ValueError, match="raw"):
        iso_project(torch.zeros(2, 3))


# ---------------------------------------------------------------- hybrid
@SETTINGS
@given(n=st.integers(2, 8), lam=st.floats(0.0, 1.0), seed=seeds)
def test_hybrid_of_polar_and_converged_sinkhorn_is_doubly_stochastic_contraction(n, lam, seed):
    raw = randn((4, n, n), torch.float64, seed)
    h = hybrid_mix(iso_project(raw, "polar"), sinkhorn(raw, iters=200), lam)
    assert (h.sum(-1) - 1).abs().max() <= 1e-6
    assert (h.sum(-2) - 1).abs().max() <= 1e-6
    assert torch.linalg.matrix_norm(h, ord=2).max() <= 1 + 1e-5


def test_hybrid_endpoints_and_tensor_lambda():
    a, b = torch.eye(3), torch.full((3, 3), 1 / 3)
    assert torch.equal(hybrid_mix(a, b, 0.0), a) and torch.equal(hybrid_mix(a, b, 1.0), b)
    lam = torch.tensor([0.0, 1.0])
    out = hybrid_mix(a.expand(2, 3, 3), b.expand(2, 3, 3), lam)
    assert torch.equal(out[0], a) and torch.equal(out[1], b)
    with pytest.raises(ValueError, match="lam"):
        hybrid_mix(a, b, 1.5)
    with pytest.raises(ValueError, match="h_birk"):
        hybrid_mix(a, torch.eye(4), 0.5)
