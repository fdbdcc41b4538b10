"""``circulant``: H_res = Σ_k softmax(ℓ)_k S^k, exactly doubly stochastic and normal."""

import pytest
import torch
from torch import nn

import hyperconn
from hyperconn import HyperConnection, expand_streams
from hyperconn.variants.circulant import circulant_from_logits


def shifts_sum(w):
    """Independent construction: Σ_k w_k S^k with S the cyclic shift (S e_j = e_{j+1})."""
    n = w.shape[-1]
    eye = torch.eye(n, dtype=w.dtype)
    return sum(w[..., k, None, None] * torch.roll(eye, shifts=k, dims=1) for k in range(n))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_matches_sum_of_cyclic_shifts(n):
    logits = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(circulant_from_logits(logits), shifts_sum(torch.softmax(logits, -1)))


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_far_from_init_is_exactly_doubly_stochastic_and_normal(n):
    torch.manual_seed(n)
    layer = HyperConnection(16, n, nn.Linear(16, 16), variant="circulant", alpha_init=2.0)
    with torch.no_grad():
        layer.b_res.copy_(3 * torch.randn(n))
        layer.phi.mul_(10)
    h = layer.coefficients(torch.randn(64, n, 16) * 5)[2]                    # fp32
    assert h.shape == (64, n, n)
    assert (h.sum(-1) - 1).abs().max() < 1e-5 and (h.sum(-2) - 1).abs().max() < 1e-5
    assert (h >= 0).all()
    torch.testing.assert_close(h @ h.transpose(-1, -2), h.transpose(-1, -2) @ h, atol=1e-6, rtol=0)
    assert (torch.linalg.matrix_norm(h.double(), ord=2) <= 1 + 1e-6).all()


def test_static_init_equals_mhc_initial_map():
    x = expand_streams(torch.randn(2, 3, 8), 4)
    circ = HyperConnection(8, 4, nn.Identity(), variant="circulant", dynamic=False).coefficients(x)[2]
    mhc = HyperConnection(8, 4, nn.Identity(), variant="mhc", dynamic=False).coefficients(x)[2]
    torch.testing.assert_close(circ, mhc, atol=1e-6, rtol=0)


def test_maps_n_logits_with_the_identity_first():
    layer = HyperConnection(4, 3, nn.Linear(4, 4), variant="circulant")
    assert layer.b_res.shape == (3,) and layer.phi.shape == (12, 3 + 2 * 3)
    torch.testing.assert_close(layer.b_res, torch.tensor([4.0, 0.0, 0.0]))
    raw = torch.tensor([0.0, 1.0, 2.0])
    torch.testing.assert_close(layer.mixer.map_res(raw, {}), shifts_sum(torch.softmax(raw, -1)))


def test_bad_streams_and_options_name_the_argument():
    with pytest.raises(ValueError, match="^streams"):
        HyperConnection(8, 0, nn.Identity(), variant="circulant")
    with pytest.raises(hyperconn.ConfigError, match="^bogus"):
        HyperConnection(8, 4, nn.Identity(), variant="circulant", bogus=1)
