"""hyperconnect() on tiny random-init Hugging Face models (no download): Llama, Qwen2,
Qwen3, Mistral, GPT-2."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hyperconn  # noqa: E402
from hyperconn.integrations.transformers import SUPPORTED, from_pretrained, hyperconnect  # noqa: E402

V, C, L = 96, 32, 3


def tiny(arch: str):
    common = dict(vocab_size=V, num_hidden_layers=L, num_attention_heads=4, max_position_embeddings=64,
                  hidden_size=C, intermediate_size=64)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
    if arch == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, **common))
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **common))
    if arch == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(num_key_value_heads=2, head_dim=8, **common))
    if arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=C, n_layer=L, n_head=4,
                                                                    n_positions=64, resid_pdrop=0.0,
                                                                    embd_pdrop=0.0, attn_pdrop=0.0))
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


def model_pair(arch, **options):
    torch.manual_seed(0)
    plain = tiny(arch).eval()
    hc = hyperconnect(copy.deepcopy(plain), **options).eval()
    return plain, hc


def ids(batch=2, T=12, seed=1):
    return torch.randint(3, V, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_one_stream_residual_equals_the_original_exactly(arch):
    plain, hc = model_pair(arch, streams=1, variant="residual")
    x = ids()
    assert torch.equal(hc(x).logits, plain(x).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_decoder_layer_is_hyper_connected_with_layer_indices(arch):
    _, model = model_pair(arch, streams=4, variant="mhc")
    conns = [m for m in model.modules() if isinstance(m, hyperconn.HyperConnection)]
    assert len(conns) == 2 * L
    assert [c.mixer.layer_index for c in conns] == list(range(2 * L))
    with pytest.raises(ValueError, match="already hyper-connected"):
        hyperconnect(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_mask_and_position_ids_keep_working(arch):
    _, model = model_pair(arch, streams=4, variant="mhc", alpha_init=0.3)
    x = ids(batch=2, T=10)
    # left padding of the second sequence by 3 tokens: its real tokens must score as alone
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x[1:, :7]], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        alone = model(x[1:, :7]).logits
        batched = model(padded, attention_mask=mask, position_ids=positions).logits
        default_pos = model(x).logits
        explicit_pos = model(x, position_ids=torch.arange(10).unsqueeze(0)).logits
    torch.testing.assert_close(batched[:, 3:], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(explicit_pos, default_pos)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_and_uncached_generation_give_the_same_tokens(arch):
    _, model = model_pair(arch, streams=4, variant="mhc", alpha_init=0.3)
    x = ids(batch=1, T=6)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(x, use_cache=True, attention_mask=torch.ones_like(x), **kw)
    uncached = model.generate(x, use_cache=False, attention_mask=torch.ones_like(x), **kw)
    assert torch.equal(cached, uncached) and cached.shape[1] == 14


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    _, model = model_pair(arch, streams=4, variant="isohc", alpha_init=0.3)
    x = ids()
    model.train()

    def grads():
        model.zero_grad()
        model(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any("hc_attn" in k for k in plain)
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_hidden_states_shapes(arch):
    _, model = model_pair(arch, streams=4, variant="mhc")
    out = model(ids(), output_hidden_states=True)
    shapes = [tuple(h.shape[-1:]) for h in out.hidden_states]
    assert shapes[0] == (C,) and shapes[-1] == (C,)
    assert all(s == (4 * C,) for s in shapes[1:-1]) and len(shapes) >= 3
    streams = out.hidden_states[1].unflatten(-1, (4, C))
    assert streams.shape == (2, 12, 4, C)


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_save_pretrained_and_from_pretrained_round_trip(arch, tmp_path):
    _, model = model_pair(arch, streams=4, variant="hybrid", alpha_init=0.3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # every weight differs from a fresh init
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.config.hyperconn["variant"] == "hybrid"
    x = ids()
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_torch_compile_and_bf16():
    _, model = model_pair("llama", streams=4, variant="mhc", alpha_init=0.3)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x).logits, want, atol=1e-4, rtol=1e-4)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        got = bf16(x).logits.float()
    conn = next(m for m in bf16.modules() if isinstance(m, hyperconn.HyperConnection))
    assert conn.coefficient_dtype == torch.float32
    assert torch.isfinite(got).all() and (got - want).abs().max() < 0.1 * want.abs().max()


def test_param_groups_keep_decay_off_the_connection_coefficients():
    _, model = model_pair("llama", streams=4, variant="mhc")
    groups = hyperconn.param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    decay = {names[id(p)] for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    for suffix in ("b_pre", "b_post", "b_res", "alpha"):
        assert any(n.endswith("hc_attn." + suffix) for n in no_decay)
        assert not any(n.endswith(suffix) for n in decay)
    assert any(n.endswith("hc_mlp.phi") for n in decay)
    assert any(n.endswith("q_proj.weight") for n in decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is
    with pytest.raises(ValueError, match="weight_decay"):
        hyperconn.param_groups(model, weight_decay=-1)


def test_unsupported_architecture_is_refused_by_name():
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=V, hidden_size=C, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="bert"):
        hyperconnect(bert)
    assert set(SUPPORTED) == {"llama", "mistral", "qwen2", "qwen3", "gpt2"}
