"""Tests for hyperconn.diagnostics: metrics, Probe, StabilityHook."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperconn import HarmonizedController, HyperConnection, expand_streams, reduce_streams
from hyperconn.diagnostics import (HARMONIZED_KEYS, MULTI_STREAM_KEYS, SCALAR_KEYS, Probe, StabilityHook, composite_gain,
                                   layer_profile, manifold_errors, prefix_products, stream_similarity,
                                   suffix_products, token_stats)
from hyperconn.projections import iso_project, sinkhorn


class Toy(nn.Module):
    """Embedding → n streams → `depth` hyper-connected MLP layers → mean → head."""

    def __init__(self, variant="mhc", n=4, dim=16, depth=3, vocab=11, dynamic=True, manual=False):
        super().__init__()
        self.n, self.manual = n, manual
        self.emb = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            HyperConnection(dim, n, nn.Sequential(nn.Linear(dim, dim), nn.Tanh()), variant=variant,
                            dynamic=dynamic, layer_index=i)
            for i in range(depth))
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        x = expand_streams(self.emb(idx), self.n)
        for layer in self.layers:
            if self.manual:
                u, finish = layer.pre(x)
                x = finish(layer.branch(u))
            else:
                x = layer(x)
        return self.head(reduce_streams(x))


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def batch(seed=0, b=2, t=5, vocab=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


# ---------------------------------------------------------------- pure metrics


def test_chain_of_identities_has_gain_one():
    eye = torch.eye(4)
    g = composite_gain([eye] * 7)
    for v in g.as_dict().values():
        assert torch.allclose(v, torch.tensor(1.0))
    prof = layer_profile([eye] * 7)
    for direction in ("forward", "backward"):
        for gain in prof[direction].values():
            assert gain["mean"] == pytest.approx([1.0] * 7) and gain["max"] == pytest.approx([1.0] * 7)


def test_hand_computed_product_and_gains():
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # P = b @ a = [[0, 1], [-1, -2]]: row sums 1, -3; column sums -1, -1;
    # abs row sums 1, 3; abs column sums 1, 3.
    g = composite_gain([a, b])
    assert float(g.forward_amax) == pytest.approx(3.0)
    assert float(g.backward_amax) == pytest.approx(1.0)
    assert float(g.inf_norm) == pytest.approx(3.0)
    assert float(g.one_norm) == pytest.approx(3.0)
    p = torch.tensor([[0.0, 1.0], [-1.0, -2.0]])
    assert float(g.spectral) == pytest.approx(float(torch.linalg.svdvals(p)[0]), rel=1e-6)


def test_prefix_and_suffix_products():
    torch.manual_seed(0)
    hs = [torch.randn(3, 3) for _ in range(4)]
    pre, suf = prefix_products(hs), suffix_products(hs)
    assert torch.allclose(pre[2], hs[2] @ hs[1] @ hs[0])
    assert torch.allclose(suf[1], hs[3] @ hs[2] @ hs[1])
    assert torch.allclose(suf[3], hs[3]) and torch.allclose(pre[0], hs[0])
    assert torch.allclose(pre[-1], suf[0])


def test_layer_profile_known_values():
    # Static diagonal layers 2I, I, 3I: forward composites 2, 2, 6; backward 6, 3, 3.
    hs = [2 * torch.eye(2), torch.eye(2), 3 * torch.eye(2)]
    prof = layer_profile(hs)
    assert prof["forward"]["forward_amax"]["mean"] == pytest.approx([2, 2, 6])
    assert prof["backward"]["backward_amax"]["mean"] == pytest.approx([6, 3, 3])
    assert prof["forward"]["spectral"]["max"] == pytest.approx([2, 2, 6])


def test_gain_token_mean_vs_max_on_known_batch():
    # Token 0 uses I, token 1 uses 2I, token 2 uses [[1, 3], [0, 1]] (row sums 4, 1).
    h = torch.stack([torch.eye(2), 2 * torch.eye(2), torch.tensor([[1.0, 3.0], [0.0, 1.0]])])
    g = composite_gain([h, torch.eye(2)])  # static layer broadcasts
    mean, mx = token_stats(g.forward_amax)
    assert mean == pytest.approx((1 + 2 + 4) / 3) and mx == pytest.approx(4.0)
    mean, mx = token_stats(g.backward_amax)  # column sums: (1,1), (2,2), (1,4)
    assert mean == pytest.approx((1 + 2 + 4) / 3) and mx == pytest.approx(4.0)
    prof = layer_profile([h, torch.eye(2)])
    assert prof["forward"]["forward_amax"]["max"] == pytest.approx([4.0, 4.0])
    assert prof["forward"]["forward_amax"]["mean"][0] == pytest.approx(7 / 3)


def test_stream_similarity():
    v = torch.randn(6, 1, 8)
    assert stream_similarity(v.expand(6, 4, 8)) == pytest.approx(1.0, abs=1e-6)
    ortho = torch.eye(4).expand(6, 4, 4) * torch.arange(1.0, 7.0).view(6, 1, 1)
    assert stream_similarity(ortho) == pytest.approx(0.0, abs=1e-7)
    # Two streams, opposite: −1; mixed token batch averages over tokens.
    opp = torch.stack([torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])])
    assert stream_similarity(opp) == pytest.approx(0.0)
    assert stream_similarity(opp[:1]) == pytest.approx(-1.0)
    assert math.isnan(stream_similarity(torch.randn(3, 1, 8)))


def test_manifold_errors():
    eye = manifold_errors(torch.eye(4))
    assert all(v == pytest.approx(0.0) for k, v in eye.items() if k != "min_entry")
    torch.manual_seed(0)
    raw = torch.randn(5, 4, 4)
    ds = manifold_errors(sinkhorn(raw, 50))
    assert ds["row_sum_err"] < 1e-5 and ds["col_sum_err"] < 1e-4 and ds["min_entry"] >= 0
    assert ds["orth_err"] > 0.1  # doubly stochastic but not orthogonal
    iso = manifold_errors(iso_project(raw, "polar"))
    assert iso["orth_err"] < 1e-4 and iso["mean_err"] < 1e-4 and iso["row_sum_err"] < 1e-4
    h = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    e = manifold_errors(h)
    assert e["row_sum_err"] == pytest.approx(0.5)       # row sums 1, 0.5
    assert e["col_sum_err"] == pytest.approx(2.0)       # col sums 2.5, -1
    assert e["min_entry"] == pytest.approx(-1.0)
    assert e["mean_err"] == pytest.approx(0.5)
    gram = h.T @ h - torch.eye(2)
    assert e["orth_err"] == pytest.approx(float(gram.norm()))


# ---------------------------------------------------------------- Probe


@pytest.mark.parametrize("manual", [False, True])
def test_probe_records_and_cleans_up(manual):
    torch.manual_seed(0)
    model = Toy("mhc", manual=manual)
    idx, _ = batch()
    with Probe(model) as probe:
        for layer in model.layers:
            assert len(layer.observers) == 1
        model(idx)
    assert len(probe.records) == 3
    assert [r.layer for r in probe.records] == list(model.layers)
    assert all(r.h_res.shape == (2, 5, 4, 4) and r.h_pre.shape == (2, 5, 4) for r in probe.records)
    states = probe.stream_states
    assert len(states) == 4 and all(s.shape == (2, 5, 4, 16) for s in states)
    # x_{l+1} of layer l is the input of layer l+1.
    assert probe.records[0].out is probe.records[1].x
    for layer in model.layers:  # nothing left behind
        assert layer.observers == () and "_post" not in layer.__dict__


def test_probe_static_coefficients_broadcast():
    model = Toy("hc", dynamic=False)
    with Probe(model) as probe:
        model(batch()[0])
    assert probe.records[0].h_res.shape == (2, 5, 4, 4)
    assert torch.equal(probe.records[0].h_res[1, 3], torch.eye(4))


def test_probe_chains_with_controller():
    model = Toy("harmonized")
    ctl = HarmonizedController(model, target_gain=2.0)
    before = [layer.observers for layer in model.layers]
    assert all(len(obs) == 1 for obs in before)
    with Probe(model) as probe:
        model(batch()[0])
    assert len(probe.records) == 3
    ctl.update()  # the controller saw the forward through the chain
    assert ctl.steps == 1
    assert [layer.observers for layer in model.layers] == before


# ---------------------------------------------------------------- StabilityHook


@pytest.mark.parametrize("variant", ["residual", "hc", "mhc", "isohc", "harmonized"])
def test_stability_hook(tmp_path, variant):
    torch.manual_seed(0)
    n = 1 if variant == "residual" else 4
    model = Toy(variant, n=n)
    idx, tgt = batch()
    with torch.no_grad():
        ref = model(idx)
    hook = StabilityHook(tmp_path)
    out = hook(model, idx, tgt, lm_loss, step=7)
    with torch.no_grad():
        assert torch.equal(model(idx), ref)  # nothing changed
    assert all(p.grad is None for p in model.parameters())
    assert all(layer.observers == () and "_post" not in layer.__dict__ for layer in model.layers)
    expected = set(SCALAR_KEYS) | (set(HARMONIZED_KEYS) if variant == "harmonized" else set())
    if n == 1:
        expected -= set(MULTI_STREAM_KEYS)
    assert set(out) == expected
    assert all(isinstance(v, float) for v in out.values())
    assert out["gain_fwd_max"] >= out["gain_fwd_mean"] > 0
    assert out["grad_norm_first"] > 0 and out["grad_norm_last"] > 0
    assert out["grad_ratio"] == pytest.approx(out["grad_norm_first"] / out["grad_norm_last"])

    path = tmp_path / "diagnostics" / "step_0000007.json"
    data = json.loads(path.read_text())
    assert data["step"] == 7 and data["num_layers"] == 3
    assert len(data["grad_norms"]) == 4 and len(data["similarity"]) == 4
    assert len(data["profile"]["forward"]["forward_amax"]["mean"]) == 3
    assert len(data["manifold"]["orth_err"]) == 3
    assert data["profile"]["forward"]["forward_amax"]["mean"][-1] == pytest.approx(out["gain_fwd_mean"])
    assert not list((tmp_path / "diagnostics").glob("*.tmp"))

    # Grad norms match autograd with retained grads.
    with Probe(model) as probe:
        loss = lm_loss(model(idx), tgt)
    for s in probe.stream_states:
        s.retain_grad()
    loss.backward()
    expect = [float(s.grad.norm()) for s in probe.stream_states]
    assert data["grad_norms"] == pytest.approx(expect, rel=1e-5)
    whole = composite_gain([h.detach().double() for h in probe.h_res])
    assert (out["gain_fwd_mean"], out["gain_fwd_max"]) == pytest.approx(token_stats(whole.forward_amax))
    assert (out["gain_bwd_mean"], out["gain_bwd_max"]) == pytest.approx(token_stats(whole.backward_amax))
    assert out["spectral_mean"] == pytest.approx(token_stats(whole.spectral)[0])
    if variant == "mhc":
        assert out["row_sum_err"] < 1e-5 and out["min_entry"] >= 0
    if variant == "residual":
        assert out["gain_fwd_mean"] == pytest.approx(1.0)


def test_stability_hook_harmonized_raw_vs_applied(tmp_path):
    torch.manual_seed(0)
    model = Toy("harmonized", depth=4)
    with torch.no_grad():
        for layer in model.layers:
            layer.b_res.add_(0.3 * torch.ones(4, 4))  # H_raw = I + 0.3·11ᵀ: gain grows
            layer.mixer.scale.fill_(0.5)
    out = StabilityHook(None)(model, *batch(), lm_loss, step=0)
    assert out["harm_scale"] == pytest.approx(0.5)
    # Each raw layer multiplies the all-ones direction by ≈ 1 + 0.3·4 = 2.2, applied ≈ 1.6.
    assert out["harm_gain_raw_mean"] == pytest.approx(2.2 ** 4, rel=0.05)
    assert out["harm_gain_applied_mean"] == pytest.approx(1.6 ** 4, rel=0.05)
    assert out["harm_gain_applied_mean"] == pytest.approx(out["gain_fwd_mean"])


def test_stability_hook_keeps_existing_grads_and_mode():
    model = Toy("isohc")
    model.eval()
    idx, tgt = batch()
    lm_loss(model(idx), tgt).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():  # the hook enables grad itself
        StabilityHook()(model, idx, tgt, lm_loss, step=1)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert not model.training


def test_stability_hook_on_gpt(tmp_path):
    models = pytest.importorskip("hyperconn.models")
    torch.manual_seed(0)
    cfg = models.GPTConfig(vocab_size=32, seq_len=8, n_layer=2, n_head=2, n_embd=16,
                           connection=models.ConnectionConfig("mhc", streams=4, init="copies"))
    model = models.GPT(cfg)
    idx, tgt = batch(b=2, t=8, vocab=32)
    with torch.no_grad():
        ref = model(idx)
    out = StabilityHook(tmp_path)(model, idx, tgt, lm_loss, step=3)
    with torch.no_grad():
        assert torch.equal(model(idx), ref)
    data = json.loads((tmp_path / "diagnostics" / "step_0000003.json").read_text())
    assert data["num_layers"] == 4 == len(model.connections())
    assert [entry["name"] for entry in data["layers"]] == ["blocks.0.attn", "blocks.0.mlp",
                                                            "blocks.1.attn", "blocks.1.mlp"]
    assert data["similarity"][0] == pytest.approx(1.0)  # expand_streams copies the embedding
    assert math.isfinite(out["grad_ratio"]) and out["row_sum_err"] < 1e-4


def test_docs_examples_run(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "diagnostics.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)
    assert (tmp_path / "runs" / "demo" / "diagnostics" / "step_0000100.json").is_file()
