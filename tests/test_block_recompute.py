"""Block recompute (GPTConfig.recompute_blocks): same loss and gradients as storing every
layer, fewer saved activations, clear errors."""

import pytest
import torch

from hyperconn import ConfigError
from hyperconn.models import GPT, GPTConfig


def _cfg(recompute_blocks, variant="mhc", single_pass=False, n_layer=4):
    return GPTConfig(vocab_size=32, seq_len=8, n_layer=n_layer, n_head=2, n_embd=16, recompute_blocks=recompute_blocks,
                     connection={"variant": variant, "streams": 4, "single_pass": single_pass})


def _saved_bytes(model, idx):
    """Bytes of every tensor autograd saves for backward during one forward."""
    total = {"bytes": 0}

    def pack(t):
        total["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx).square().mean()
    return loss, total["bytes"]


@pytest.mark.parametrize("variant,single_pass", [("mhc", False), ("isohc", False), ("hc", True)])
def test_same_gradients_as_no_recompute_and_fewer_saved_bytes(variant, single_pass):
    torch.manual_seed(0)
    ref = GPT(_cfg(0, variant, single_pass)).double()
    block = GPT(_cfg(2, variant, single_pass)).double()
    block.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 32, (2, 8))
    loss_ref, bytes_ref = _saved_bytes(ref, idx)
    loss_blk, bytes_blk = _saved_bytes(block, idx)
    torch.testing.assert_close(loss_blk, loss_ref, atol=0, rtol=0)
    loss_ref.backward()
    loss_blk.backward()
    for (name, a), b in zip(ref.named_parameters(), block.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-12, rtol=1e-10, msg=name)
    assert bytes_blk < 0.5 * bytes_ref


def test_auto_interval_follows_the_paper_and_errors_name_the_field():
    # L = 2·12 = 24 layers, n = 4: L_r = sqrt(4·24/6) = 4 layers = 2 blocks
    assert _cfg("auto", n_layer=12).recompute_interval == 2
    assert _cfg(0).recompute_interval == 0 and _cfg(3).recompute_interval == 3
    assert "recompute_blocks=2" in _cfg(2).describe()
    for bad in (-1, 1.5, "yes", True):
        with pytest.raises(ConfigError, match="^recompute_blocks"):
            _cfg(bad)
    with pytest.raises(ConfigError, match="^recompute_blocks: not supported with variant 'harmonized'"):
        _cfg(1, "harmonized")


def test_eval_and_no_grad_do_not_recompute():
    torch.manual_seed(0)
    model = GPT(_cfg(1)).eval()
    idx = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        out = model(idx)
    model.train()
    torch.testing.assert_close(model(idx), out)
