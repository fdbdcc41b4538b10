"""The default Iso projection reaches the manifold; degenerate input is handled.

References are independent of the library's iterations: the exact polar factor from an
eigen-decomposition of AᵀA, and the coefficient table checked by evaluating the
composite polynomial on a dense grid.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hyperconn import iso_project
from hyperconn.projections import helmert_basis
from hyperconn.projections.iso import NS_COEFFICIENTS


def raw_with_condition(n, cond, batch, seed, dtype=torch.float32):
    """Raw matrices whose 1^⊥ block has condition number ``cond`` (random scale, bases)."""
    gen = torch.Generator().manual_seed(seed)
    m = n - 1
    u, _ = torch.linalg.qr(torch.randn(batch, m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(batch, m, m, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), m, dtype=torch.float64)
    s = s * torch.exp(torch.randn(batch, 1, generator=gen, dtype=torch.float64))
    block = (u * s.unsqueeze(-2)) @ v.mT
    h = helmert_basis(n, torch.float64)
    raw = torch.full((n, n), 1.0 / n, dtype=torch.float64) + h @ block @ h.mT
    raw = raw + torch.randn(batch, 1, 1, generator=gen, dtype=torch.float64) * torch.ones(n, n, dtype=torch.float64)
    return raw.to(dtype)


def orthogonality(h):
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    return torch.linalg.matrix_norm(h.mT @ h - eye)


def exact_polar(raw):
    """e0e0ᵀ + U A(AᵀA)^{-1/2} Uᵀ in float64 by eigh (independent of iso.py)."""
    n = raw.shape[-1]
    u = helmert_basis(n, torch.float64)
    a = u.mT @ raw.double() @ u
    evals, evecs = torch.linalg.eigh(a.mT @ a)
    q = a @ evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.mT
    return torch.full((n, n), 1.0 / n, dtype=torch.float64) + u @ q @ u.mT


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("cond", [1.0, 10.0, 100.0, 1e4])
def test_default_ns_reaches_isometry_float32(n, cond):
    # Before: 5 cubic steps left ‖HᵀH − I‖_F = 0.42 at κ = 10 (n = 4) and > 1 at κ = 100.
    raw = raw_with_condition(n, cond, 128, seed=n)
    h = iso_project(raw)
    assert orthogonality(h).max() <= 1e-3
    assert (h.sum(-1) - 1).abs().max() <= 1e-5 and (h.sum(-2) - 1).abs().max() <= 1e-5
    # and it is the polar factor, not just some isometry (to the problem's own float32
    # conditioning: the polar factor moves by ~κ·1e-7 under rounding of its input)
    assert (h.double() - exact_polar(raw)).abs().max() <= max(1e-5, cond * 3e-7)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 16), log_cond=st.floats(0, 5), seed=st.integers(0, 2**31 - 1))
def test_default_ns_reaches_isometry_any_condition_up_to_1e5(n, log_cond, seed):
    h = iso_project(raw_with_condition(n, 10 ** log_cond, 4, seed))
    assert orthogonality(h).max() <= 1e-3


def test_near_identity_close_to_exact_polar():
    # Before: 4.5e-2 from the exact polar factor at n = 8 for I + 0.3·N(0, 1).
    gen = torch.Generator().manual_seed(0)
    raw = torch.eye(8) + 0.3 * torch.randn(256, 8, 8, generator=gen)
    u = helmert_basis(8)
    sv = torch.linalg.svdvals((u.mT @ raw @ u).double())
    ok = sv[:, 0] / sv[:, -1] <= 100
    dist = (iso_project(raw).double() - exact_polar(raw)).abs().amax((-2, -1))
    assert ok.sum() > 200 and dist[ok].max() <= 1e-4


def test_coefficient_table_maps_the_design_interval_onto_one():
    x = np.geomspace(1e-6, 1.0, 100_001)
    for a, b, c in NS_COEFFICIENTS:
        x = a * x + b * x**3 + c * x**5
    assert np.abs(x - 1).max() <= 1e-8


def test_cubic_iteration_kept_under_its_own_name():
    raw = torch.eye(4, dtype=torch.float64) + 0.05 * torch.randn(8, 4, 4, dtype=torch.float64)
    u = helmert_basis(4, torch.float64)
    x = u.mT @ raw @ u
    fro = torch.linalg.matrix_norm(x)
    # Independent: the plain cubic from any safe scale converges to the same polar factor.
    x = x / fro[..., None, None]
    for _ in range(60):
        x = 1.5 * x - 0.5 * x @ x.mT @ x
    expected = torch.full((4, 4), 0.25, dtype=torch.float64) + u @ x @ u.mT
    torch.testing.assert_close(iso_project(raw, "ns-cubic", steps=40), expected, atol=1e-10, rtol=0)
    # and with its default 5 steps it is not converged on a κ = 10 block (the audit's case)
    assert orthogonality(iso_project(raw_with_condition(4, 10.0, 16, 3), "ns-cubic")).max() > 0.1


def test_tol_iterates_to_convergence_and_warns_when_it_cannot():
    raw = raw_with_condition(6, 300.0, 16, 4, torch.float64)
    loose = orthogonality(iso_project(raw, steps=3)).max()  # a truncated schedule
    tight = orthogonality(iso_project(raw, steps=3, tol=1e-9)).max()
    assert loose > 1e-2 and tight <= 1e-9
    u = helmert_basis(5, torch.float64)
    rank_deficient = 0.2 + u @ torch.diag(torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64)) @ u.mT
    with pytest.warns(RuntimeWarning, match="did not reach"):
        iso_project(rank_deficient, tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iso_project(torch.eye(5) + 0.1 * torch.randn(5, 5), tol=1e-4)


def test_ns_gradcheck_float64():
    raw = raw_with_condition(5, 20.0, 2, 5, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: iso_project(t), (raw,))
    assert torch.autograd.gradcheck(lambda t: iso_project(t, "ns-cubic"), (raw,))
    assert torch.autograd.gradcheck(lambda t: iso_project(t, steps=3, tol=1e-8), (raw,))


# ---------------------------------------------------------------- degenerate input
@pytest.mark.parametrize("method", ["ns", "ns-cubic", "polar"])
def test_zero_block_maps_to_identity_with_zero_gradient(method):
    # Before: 11ᵀ/n (not an isometry) with NaN gradients.
    raw = (0.7 * torch.ones(2, 4, 4)).requires_grad_()
    h = iso_project(raw, method)
    torch.testing.assert_close(h, torch.eye(4).expand(2, 4, 4), atol=1e-6, rtol=0)
    (g,) = torch.autograd.grad((h * torch.randn(2, 4, 4)).sum(), raw)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("method", ["ns", "ns-cubic", "polar"])
def test_rank_deficient_block_gradients_bounded(method):
    # Before: polar gave gradients ~1.7e12 with two zero singular values.
    u = helmert_basis(5)
    raw = (0.2 + u @ torch.diag(torch.tensor([1.0, 0.5, 0.0, 0.0])) @ u.mT).requires_grad_()
    h = iso_project(raw, method)
    (g,) = torch.autograd.grad((h * torch.randn(5, 5)).sum(), raw)
    assert torch.isfinite(g).all() and g.abs().max() <= (1e9 if method == "ns" else 1e5)
    assert torch.linalg.matrix_norm(h, ord=2) <= 1 + 1e-5  # never expands
    if method == "polar":
        assert orthogonality(h) <= 1e-5  # the SVD completes the isometry


@pytest.mark.parametrize("method", ["ns", "ns-cubic", "polar"])
def test_n2_keeps_a_graph(method):
    raw = torch.randn(3, 2, 2, requires_grad=True)
    (g,) = torch.autograd.grad(iso_project(raw, method).sum(), raw)  # raised before
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("method", ["ns", "polar"])
def test_non_finite_input_gives_nan_for_that_matrix_only(method):
    raw = torch.eye(4) + 0.1 * torch.randn(3, 4, 4)
    raw[1, 0, 0] = float("nan")
    raw[2, 1, 2] = float("inf")
    h = iso_project(raw.requires_grad_(), method)
    assert torch.isfinite(h[0]).all() and torch.isnan(h[1]).all() and torch.isnan(h[2]).all()
    (g,) = torch.autograd.grad(h[0].sum(), raw)
    assert torch.isfinite(g[0]).all()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_input_raises_type_error(dtype):
    # Before: silently returned zeros.
    with pytest.raises(TypeError, match="raw"):
        iso_project(torch.ones(3, 3, dtype=dtype))


@pytest.mark.parametrize("kwargs, field", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(tol=0.0), "tol"),
    (dict(tol=-1.0), "tol"), (dict(method="qr"), "method"),
])
def test_bad_arguments_name_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=field):
        iso_project(torch.eye(3), **kwargs)
