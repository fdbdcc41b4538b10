"""LearnedReduce (GPTConfig.reduce="learned"): starts exactly at the mean, learns gates."""

import pytest
import torch

import hyperconn
from hyperconn import LearnedReduce, reduce_streams
from hyperconn.models import GPT, GPTConfig


@pytest.mark.parametrize("n", [1, 2, 4])
def test_starts_exactly_at_the_mean_and_matches_an_independent_formula(n):
    torch.manual_seed(0)
    x = torch.randn(3, 5, n, 8)
    red = LearnedReduce(8, n)
    torch.testing.assert_close(red(x), reduce_streams(x))
    with torch.no_grad():
        red.phi.normal_()
        red.bias.normal_()
        red.alpha.fill_(0.7)
    flat = x.reshape(3, 5, n * 8)
    rms = flat.square().mean(-1, keepdim=True).add(1e-6).rsqrt()
    w = torch.sigmoid(red.bias + 0.7 * rms * (flat @ red.phi))
    torch.testing.assert_close(red(x), (w.unsqueeze(-1) * x).sum(-2))


def test_gradcheck_float64():
    torch.manual_seed(1)
    red = LearnedReduce(4, 3).double()
    with torch.no_grad():
        red.phi.normal_()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: red(x), (x, *red.parameters()))


def test_gpt_option_keeps_the_default_model_and_learns_the_gates():
    base = dict(n_layer=1, n_embd=16, n_head=2, seq_len=16, connection={"variant": "mhc", "streams": 4})
    torch.manual_seed(0)
    mean = GPT(GPTConfig(**base))
    torch.manual_seed(0)
    learned = GPT(GPTConfig(**base, reduce="learned"))
    assert mean.reduce is None and isinstance(learned.reduce, LearnedReduce)
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(learned(idx), mean(idx))          # the same model at init
    learned(idx).square().mean().backward()
    assert learned.reduce.alpha.grad is not None and learned.reduce.bias.grad.abs().sum() > 0
    assert "reduce=learned" in learned.config.describe()
    with pytest.raises(hyperconn.ConfigError, match="^reduce: expected one of"):
        GPTConfig(reduce="sum")


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="^x: expected shape"):
        LearnedReduce(8, 4)(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="^streams"):
        LearnedReduce(8, 0)
