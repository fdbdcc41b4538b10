"""Tests for hyperconn.models: GPT with hyper-connected branches."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import hyperconn
from hyperconn import HyperConnection
from hyperconn.models import GPT, ConnectionConfig, GPTConfig


def tiny(variant="mhc", streams=None, dynamic=True, init="hyperconn", **kw):
    if streams is None:
        streams = 1 if variant == "residual" else 2
    base = dict(vocab_size=64, seq_len=12, n_layer=2, n_head=2, n_embd=16)
    base.update(kw)
    return GPTConfig(**base, connection=ConnectionConfig(variant, streams=streams, dynamic=dynamic, init=init))


def tokens(cfg, batch=2, T=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, T or cfg.seq_len), generator=g)


def copy_weights(src: GPT, dst: GPT) -> None:
    """Copy everything the two models share (embeddings, branches, norms, head)."""
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected
    assert all(any(s in k for s in ("b_pre", "b_post", "b_res", "phi", "alpha", "lambda_logit", "mixer.scale"))
               for k in missing), missing


# ------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("variant", hyperconn.VARIANTS)
def test_forward_shapes_every_variant(variant):
    cfg = tiny(variant)
    model = GPT(cfg)
    for T in (1, 5, cfg.seq_len):
        logits = model(tokens(cfg, batch=3, T=T))
        assert logits.shape == (3, T, cfg.vocab_size) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
    assert len(model.connections()) == 2 * cfg.n_layer
    assert all(isinstance(c, HyperConnection) and c.variant_name == variant for c in model.connections())


def test_connections_in_forward_order():
    model = GPT(tiny("hc", n_layer=3))
    conns = model.connections()
    assert len(conns) == 6
    expected = [m for b in model.blocks for m in (b.attn, b.mlp)]
    assert all(a is b for a, b in zip(conns, expected))
    # hc's one-hot H_pre sits at layer_index % n: 0, 1, 0, 1, ...
    assert [int(c.b_pre.argmax()) for c in conns] == [0, 1, 0, 1, 0, 1]

    order = []
    for i, c in enumerate(conns):
        c.register_observer(lambda layer, *a, i=i: order.append(i))
    model(tokens(model.config))
    assert order == list(range(6))


def test_repr_has_description_and_param_count():
    model = GPT(tiny("mhc"))
    text = repr(model).splitlines()
    header = text[0] + text[1]
    assert model.config.connection.describe() in header
    assert f"{model.num_params():,}" in header


# ------------------------------------------------------------------------- equivalences


def reference_prenorm_gpt(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """A plain Pre-Norm GPT forward written from scratch with the model's weights:
    x = x + attn(norm(x)); x = x + mlp(norm(x)); explicit RoPE, mask and softmax."""
    cfg = model.config
    B, T = idx.shape
    H, D = cfg.n_head, cfg.head_dim

    def rmsnorm(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    pos = torch.arange(T, dtype=torch.float64)[:, None]
    freq = cfg.rope_base ** (-torch.arange(D // 2, dtype=torch.float64) * 2 / D)
    ang = pos * freq  # (T, D/2): pair (i, i + D/2) rotated by ang[:, i]

    def rope(t):  # (B, H, T, D)
        a, b = t[..., : D // 2], t[..., D // 2:]
        return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1)

    mask = torch.ones(T, T, dtype=torch.bool).tril()
    x = model.wte.weight[idx]
    for block in model.blocks:
        att, mlp = block.attn.branch, block.mlp.branch
        h = rmsnorm(x, att.norm.weight)
        q, k, v = (h @ att.fn.qkv.weight.T).split(cfg.n_embd, -1)
        q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        s = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(D)
        p = s.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (p @ v).transpose(1, 2).reshape(B, T, cfg.n_embd)
        x = x + y @ att.fn.proj.weight.T
        h = rmsnorm(x, mlp.norm.weight)
        g, u = h @ mlp.fn.gate.weight.T, h @ mlp.fn.up.weight.T
        x = x + (g * torch.sigmoid(g) * u) @ mlp.fn.down.weight.T
    return rmsnorm(x, model.norm.weight) @ model.head.weight.T


@pytest.mark.parametrize("tie", [True, False])
def test_residual_equals_plain_prenorm_gpt(tie):
    torch.manual_seed(0)
    model = GPT(tiny("residual", tie_embeddings=tie)).double()
    with torch.no_grad():  # make the norms non-trivial so their weights are exercised
        for m in model.modules():
            if isinstance(m, torch.nn.RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    idx = tokens(model.config, batch=3)
    got = model(idx)
    want = reference_prenorm_gpt(model, idx)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_static_hc_n1_equals_residual():
    torch.manual_seed(0)
    res = GPT(tiny("residual")).double()
    hc = GPT(tiny("hc", streams=1, dynamic=False)).double()
    copy_weights(res, hc)
    idx = tokens(res.config)
    torch.testing.assert_close(hc(idx), res(idx), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", [v for v in hyperconn.VARIANTS if v != "residual"])
def test_static_init_equals_residual_twin(variant):
    """The documented init argument: with identical streams (init="copies") and rows of
    H_res summing to 1, every static variant with n = 4 starts as exactly the n = 1
    residual model."""
    torch.manual_seed(0)
    res = GPT(tiny("residual")).double()
    model = GPT(tiny(variant, streams=4, dynamic=False, init="copies")).double()
    copy_weights(res, model)
    idx = tokens(res.config)
    torch.testing.assert_close(model(idx), res(idx), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("variant", hyperconn.VARIANTS)
def test_causal(variant):
    torch.manual_seed(0)
    model = GPT(tiny(variant)).eval()
    idx = tokens(model.config)
    t = 6
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % model.config.vocab_size
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert not torch.allclose(a[:, t], b[:, t])


def test_mhc_gradients_reach_connection_parameters():
    torch.manual_seed(0)
    model = GPT(tiny("mhc")).double()
    idx = tokens(model.config, batch=4)
    loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    for i, c in enumerate(model.connections()):
        for name in ("b_pre", "b_post", "b_res", "phi", "alpha"):
            grad = getattr(c, name).grad
            assert grad is not None and torch.isfinite(grad).all(), (i, name)
        assert c.phi.grad.abs().max() > 1e-8 and c.alpha.grad.abs().max() > 1e-8, i
        if i > 0:
            # Layer 0 reads identical stream copies: a row-stochastic H_res cannot change
            # them, so ∂L/∂b_res is 0 there by symmetry. Later layers see streams that
            # the dynamic H_post has pulled apart.
            assert c.b_res.grad.abs().max() > 1e-12, i
    assert model.wte.weight.grad.abs().max() > 0


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is fastest, and it avoids oversubscribing a busy CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mhc_overfits_one_batch(one_thread):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, n_embd=32,
                    connection=ConnectionConfig("mhc", streams=2))
    model = GPT(cfg)
    batch = torch.randint(0, 256, (4, 17))
    x, y = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), abs=0.3)  # init near uniform
    assert losses[-1] < 0.1 * losses[0], losses[::20]


def test_harmonized_controller_drives_the_model():
    model = GPT(tiny("harmonized", streams=4))
    ctl = hyperconn.HarmonizedController(model, target_gain=0.5)
    model(tokens(model.config))
    s = ctl.update()
    assert s < 1.0
    assert all(float(c.mixer.scale) == pytest.approx(s) for c in model.connections())


# ------------------------------------------------------------------------- config


def test_num_params():
    cfg = tiny("mhc")
    model = GPT(cfg)
    C, V, L, Hd, n = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.mlp_hidden_dim, cfg.connection.streams
    branches = L * (4 * C * C + 3 * C * Hd + 2 * C)  # qkv + proj, gate/up/down, two norms
    conn = 2 * L * (n + n + n * n + n * C * (n * n + 2 * n) + 3)  # b_pre, b_post, b_res, phi, alpha
    assert model.num_params() == V * C + branches + C + conn
    assert model.num_params(non_embedding=True) == branches + C + conn
    assert model.num_params() == sum(p.numel() for p in model.parameters())

    untied = GPT(dataclasses.replace(cfg, tie_embeddings=False))
    assert untied.head.weight is not untied.wte.weight
    assert untied.num_params() == model.num_params() + V * C
    assert untied.num_params(non_embedding=True) == model.num_params(non_embedding=True)
    residual = GPT(tiny("residual"))
    assert residual.num_params() == V * C + branches + C  # no coefficients to learn


def test_mlp_hidden_default_and_override():
    assert GPTConfig(n_embd=128).mlp_hidden_dim == 352  # 8/3·128 = 341.3 → 352
    assert GPTConfig(n_embd=768, n_head=12).mlp_hidden_dim == 2048
    assert GPTConfig(n_embd=128, mlp_hidden=100).mlp_hidden_dim == 100
    model = GPT(tiny("residual", mlp_hidden=40))
    assert model.blocks[0].mlp.branch.fn.gate.out_features == 40


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(n_embd=12, n_head=4), "n_head"),      # head_dim 3 is odd: no RoPE
    (dict(vocab_size=0), "vocab_size"),
    (dict(seq_len=-1), "seq_len"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_head=0), "n_head"),
    (dict(n_embd=2.5), "n_embd"),
    (dict(mlp_hidden=0), "mlp_hidden"),
    (dict(rope_base=0.0), "rope_base"),
    (dict(norm_eps=-1e-6), "norm_eps"),
    (dict(connection="mhc"), "connection"),
])
def test_gpt_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(variant="nope"), "variant"),
    (dict(streams=0), "streams"),
    (dict(variant="residual", streams=4), "streams"),
    (dict(hybrid_lambda="half"), "hybrid_lambda"),
    (dict(hybrid_lambda="1.5"), "hybrid_lambda"),
    (dict(sinkhorn_iters=0), "sinkhorn_iters"),
    (dict(sinkhorn_backward="magic"), "sinkhorn_backward"),
    (dict(iso_method="qr"), "iso_method"),
    (dict(iso_steps=0), "iso_steps"),
    (dict(harmonized_eps=0.0), "harmonized_eps"),
    (dict(res_init=float("nan")), "res_init"),
])
def test_connection_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ConnectionConfig(**kwargs)


def test_connection_config_kwargs_and_describe():
    cfg = ConnectionConfig()
    assert cfg.describe() == "mhc n=4 dynamic sinkhorn(20, unrolled)"
    kw = cfg.layer_kwargs()
    assert kw["variant"] == "mhc" and kw["dynamic"] is True and kw["hybrid_lambda"] == "learned"
    assert "streams" not in kw and kw["recompute"] is False
    fixed = ConnectionConfig("hybrid", hybrid_lambda="0.25", dynamic=False)
    assert fixed.layer_kwargs()["hybrid_lambda"] == 0.25
    assert fixed.describe() == "hybrid n=4 static sinkhorn(20, unrolled) iso(ns) lambda=0.25"
    assert ConnectionConfig("residual", streams=1).describe() == "residual n=1"
    hc = HyperConnection(8, 4, torch.nn.Identity(), **fixed.layer_kwargs())
    assert hc.mixer.lam == 0.25
    # round trip through a dict (YAML / checkpoints)
    g = GPTConfig(connection=fixed)
    assert GPTConfig(**dataclasses.asdict(g)) == g


def test_forward_rejects_bad_idx():
    model = GPT(tiny("mhc"))
    T = model.config.seq_len
    for bad in (torch.zeros(2, T + 1, dtype=torch.long), torch.zeros(2, T), torch.zeros(T, dtype=torch.long),
                torch.zeros(2, 0, dtype=torch.long)):
        with pytest.raises(ValueError, match="idx"):
            model(bad)


@pytest.mark.parametrize("autocast", [False, True])
def test_stream_dtype_bfloat16_streams(autocast):
    """stream_dtype="bfloat16": the (B, T, n, C) state between blocks is bf16, the model
    trains with or without autocast, and the loss stays close to the fp32-stream model."""
    cfg = dict(n_layer=2, n_embd=32, n_head=2, seq_len=16, connection=ConnectionConfig("mhc", streams=4))
    torch.manual_seed(0)
    ref = GPT(GPTConfig(**cfg))
    fast = GPT(GPTConfig(**cfg, stream_dtype="bfloat16"))
    fast.load_state_dict(ref.state_dict())
    seen = []
    fast.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (ref, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(idx)
        loss = F.cross_entropy(logits.float().view(-1, 256), idx.view(-1))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses.append(loss.item())
    assert seen == [torch.bfloat16]
    assert logits.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[0])


def test_stream_dtype_is_validated():
    with pytest.raises(ValueError, match="stream_dtype"):
        GPTConfig(stream_dtype="int8")
