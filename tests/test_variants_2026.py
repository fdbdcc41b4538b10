"""The exact 2026 maps: mhc-lite, kromhc, orthostochastic and IsoHC's Cayley method.

Far from init (random static logits, large dynamic part): every Birkhoff map has rows and
columns summing to 1 within 1e-5 in fp32 and no negative entry; Cayley gives HᵀH = I and
H1 = 1; each map equals an independent construction; bad n names the argument.
"""

import itertools
import math

import pytest
import torch
from torch import nn

import hyperconn
from hyperconn import HyperConnection
from hyperconn.variants.kromhc import kron_factors
from hyperconn.variants.mhc_lite import permutation_set

BIRKHOFF = [("mhc-lite", {}), ("kromhc", {}), ("orthostochastic", {}),
            ("orthostochastic", {"ortho_method": "polar"}), ("orthostochastic", {"ortho_method": "ns"})]


def far_layer(variant, n, seed=0, **kw):
    torch.manual_seed(seed)
    layer = HyperConnection(16, n, nn.Linear(16, 16), variant=variant, alpha_init=2.0, **kw)
    with torch.no_grad():
        layer.b_res.copy_(3 * torch.randn_like(layer.b_res))
        layer.phi.mul_(5)
    return layer


@pytest.mark.parametrize("variant,kw", BIRKHOFF, ids=lambda v: str(v))
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_birkhoff_maps_are_exactly_doubly_stochastic_far_from_init(variant, kw, n, seed):
    layer = far_layer(variant, n, seed, **kw)
    h = layer.coefficients(torch.randn(128, n, 16) * 4)[2]
    assert h.dtype == torch.float32 and h.shape == (128, n, n)
    assert (h.sum(-1) - 1).abs().max() < 1e-5
    assert (h.sum(-2) - 1).abs().max() < 1e-5
    assert h.min() >= 0


@pytest.mark.parametrize("variant", ["isohc", "hybrid"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_cayley_is_an_exact_mean_preserving_rotation(variant, n):
    layer = far_layer(variant, n, iso_method="cayley", **({"hybrid_lambda": 0.0} if variant == "hybrid" else {}))
    h = layer.coefficients(torch.randn(64, n, 16) * 4)[2]
    eye = torch.eye(n)
    assert (h.mT @ h - eye).abs().max() < 1e-5
    assert (h.sum(-1) - 1).abs().max() < 1e-5 and (h.sum(-2) - 1).abs().max() < 1e-5
    if n > 1:
        u = hyperconn.projections.helmert_basis(n)
        det = torch.linalg.det(u.double().mT @ h.double() @ u.double())
        torch.testing.assert_close(det, torch.ones_like(det), atol=1e-5, rtol=0)  # SO(n−1): never a reflection


def test_cayley_equals_closed_form_and_ignores_the_symmetric_part():
    a = torch.randn(5, 3, 3, dtype=torch.float64)
    k = (a - a.mT) / 2
    eye = torch.eye(3, dtype=torch.float64)
    want = (eye - k) @ torch.linalg.inv(eye + k)
    torch.testing.assert_close(hyperconn.projections.cayley(a), want)
    torch.testing.assert_close(hyperconn.projections.cayley(a + a.mT), eye.expand(5, 3, 3))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_mhc_lite_permutation_set(n):
    p = permutation_set(n)
    k = math.factorial(n) if n <= 5 else 2 * n
    assert p.shape == (k, n, n)
    torch.testing.assert_close(p[0], torch.eye(n))
    assert (p.sum(-1) == 1).all() and (p.sum(-2) == 1).all() and ((p == 0) | (p == 1)).all()
    assert len({tuple(m.flatten().tolist()) for m in p}) == k  # distinct
    if n <= 5:
        assert {tuple(m.argmax(-1).tolist()) for m in p} == set(itertools.permutations(range(n)))


def test_mhc_lite_equals_an_independent_convex_combination():
    layer = far_layer("mhc-lite", 3)
    raw = torch.randn(4, 6)
    w = torch.softmax(raw, -1)
    want = torch.stack([sum(w[t, i] * torch.eye(3)[list(perm)] for i, perm in
                            enumerate(itertools.permutations(range(3)))) for t in range(4)])
    torch.testing.assert_close(layer.mixer.map_res(raw, {}), want)


@pytest.mark.parametrize("n", [2, 3, 4, 6, 8, 12])
def test_kromhc_equals_torch_kron_of_its_factors(n):
    layer = far_layer("kromhc", n)
    raw = torch.randn(layer.mixer.res_logit_shape)
    h = layer.mixer.map_res(raw, {})
    want, start = torch.ones(1, 1), 0
    for size in kron_factors(n):
        if size == 2:
            p = torch.sigmoid(raw[start])
            d = torch.tensor([[p, 1 - p], [1 - p, p]])
            start += 1
        else:
            w = torch.softmax(raw[start:start + 6], -1)
            d = sum(w[i] * torch.eye(3)[list(perm)] for i, perm in enumerate(itertools.permutations(range(3))))
            start += 6
        want = torch.kron(want, d)
    torch.testing.assert_close(h, want)
    assert layer.mixer.res_logit_shape == (sum(1 if f == 2 else 6 for f in kron_factors(n)),)


@pytest.mark.parametrize("n", [2, 3, 4, 6, 8, 16])
def test_kromhc_one_mixture_equals_its_factors_with_gradients(n):
    """The single softmax mixture over the Kronecker products of the factors' permutations
    (what map_res runs) equals the factor-by-factor product, values and gradients, in
    float64; gradcheck on the mixture path."""
    mixer = far_layer("kromhc", n).mixer.double()
    assert mixer.one_mixture
    raw = (3 * torch.randn(5, *mixer.res_logit_shape, dtype=torch.float64)).requires_grad_()
    h, want = mixer.map_res(raw, {}), mixer.map_res_factored(raw)
    torch.testing.assert_close(h, want, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(h)
    torch.testing.assert_close(torch.autograd.grad(h, raw, g)[0], torch.autograd.grad(want, raw, g)[0],
                               rtol=1e-10, atol=1e-12)
    if n <= 6:
        assert torch.autograd.gradcheck(lambda r: mixer.map_res(r, {}), (raw[:2].detach().requires_grad_(),))


@pytest.mark.parametrize("n", [9, 12, 18, 36])
def test_kromhc_beyond_the_mixture_kernel_multiplies_factors_out(n):
    """Where the (combinations, n²) basis outgrows the mixture kernel's tile (n = 9: 36 × 81;
    n = 36: 144 combinations) the factors are multiplied out, still exactly doubly stochastic."""
    layer = far_layer("kromhc", n)
    assert not layer.mixer.one_mixture and layer.mixer.kron_basis.numel() == 0
    h = layer.coefficients(torch.randn(8, n, 16))[2]
    assert (h.sum(-1) - 1).abs().max() < 1e-5 and (h.sum(-2) - 1).abs().max() < 1e-5 and h.min() >= 0


@pytest.mark.parametrize("variant,n", [("kromhc", 4), ("kromhc", 6), ("mhc-lite", 4), ("circulant", 4)])
def test_mixture_maps_stay_exact_under_autocast(variant, n):
    """Under bf16 autocast the exact maps keep H_res in fp32 with exact row and column
    sums: the logit selection is a gather and a sum, the mixture's GEMM runs with autocast
    off (a bf16 product broke the sums by ~1e-3)."""
    layer = far_layer(variant, n)
    x = torch.randn(64, n, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = layer.coefficients(x)[2]
    assert h.dtype == torch.float32
    assert (h.sum(-1) - 1).abs().max() < 1e-5 and (h.sum(-2) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("n", [5, 7, 10])
def test_kromhc_refuses_other_n_naming_streams(n):
    with pytest.raises(ValueError, match="^streams: variant 'kromhc' needs n = 2\\^a·3\\^b"):
        HyperConnection(16, n, nn.Identity(), variant="kromhc")


def test_orthostochastic_is_the_square_of_the_polar_factor():
    layer = far_layer("orthostochastic", 4, ortho_method="polar")
    raw = torch.randn(6, 4, 4, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(raw)
    q = u @ vh
    torch.testing.assert_close(layer.mixer.map_res(raw, {}), q * q)


@pytest.mark.parametrize("variant,kw", [("orthostochastic", {"ortho_method": "polar"}),
                                        ("orthostochastic", {"ortho_method": "ns"}),
                                        ("isohc", {"iso_method": "cayley"}), ("mhc-lite", {}), ("kromhc", {})])
def test_layer_gradcheck_float64_with_options(variant, kw):
    torch.manual_seed(0)
    layer = HyperConnection(4, 4, nn.Linear(4, 4), variant=variant, alpha_init=0.5, **kw).double()
    with torch.no_grad():
        layer.b_res.add_(torch.randn_like(layer.b_res))
    x = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert torch.autograd.gradcheck(lambda x, *ps: layer(x), (x, *params), eps=1e-6, atol=1e-5)


def test_option_errors_name_the_option():
    with pytest.raises(ValueError, match="^ortho_method: expected one of"):
        HyperConnection(16, 4, nn.Identity(), variant="orthostochastic", ortho_method="qr")
    with pytest.raises(ValueError, match="^iso_method: expected one of"):
        HyperConnection(16, 4, nn.Identity(), variant="isohc", iso_method="qr")
