"""Tests for hyperconn.train: loop, resume, divergence, optimizer groups, checkpoints, config."""

import json
import math
import shutil

import pytest
import torch

from hyperconn.models import GPT, ConnectionConfig, GPTConfig
from hyperconn.train import CheckpointError, ConfigError, TrainConfig, decay_split, lr_at, train, with_overrides
from hyperconn.train import tasks as tasks_mod
from hyperconn.train.metrics import read_metrics


def tiny(out_dir, variant="hc", streams=4, **kw) -> TrainConfig:
    """A 2-block, C=32, T=16 run on kv with 2 pairs: a few ms per step on a CPU."""
    model = GPTConfig(n_layer=2, n_head=2, n_embd=32, seq_len=16,
                      connection=ConnectionConfig(variant, streams=1 if variant == "residual" else streams))
    base = dict(model=model, out_dir=str(out_dir), task="kv", kv_pairs=2, steps=20, batch_size=4,
                lr=3e-3, warmup_steps=2, eval_every=5, eval_batches=1, quiet=True, diagnostics=False,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir, key="loss"):
    return [(r["step"], r.get(key)) for r in read_metrics(run_dir / "metrics.jsonl")]


# ---------------------------------------------------------------------------- loop


def test_overfits_one_batch(tmp_path, monkeypatch):
    fixed = {}

    def one_batch(self, step):
        if "b" not in fixed:
            fixed["b"] = self.train_data.batch(0, self.batch_size, "train")
        return fixed["b"]

    monkeypatch.setattr(tasks_mod.KVTask, "train_batch", one_batch)
    cfg = tiny(tmp_path, steps=100, lr=1e-2, warmup_steps=5, schedule="constant", weight_decay=0.0,
               eval_every=0)
    summary = train(cfg)
    ls = [v for _, v in losses(tmp_path)]
    assert summary["status"] == "finished" and len(ls) == 100
    assert ls[-1] < 0.1 * ls[0], (ls[0], ls[-1])


def test_run_dir_files_and_summary(tmp_path):
    summary = train(tiny(tmp_path, variant="harmonized", steps=6, eval_every=3, diagnostics=True))
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"):
        assert (tmp_path / name).exists(), name
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == summary["status"] == "finished"
    assert on_disk["steps"] == 6 and on_disk["diverged_step"] is None
    assert on_disk["num_params"] > 0 and on_disk["tokens_per_s"] > 0 and on_disk["wall_time_s"] > 0
    assert on_disk["metric"] == "eval_accuracy" and 0.0 <= on_disk["metric_value"] <= 1.0
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert cfg.model.connection.variant == "harmonized"
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
        assert {"harmonized_scale", "harmonized_floor_hits", "harmonized_gain"} <= set(r)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all("eval_accuracy" in r for r in evals)
    # the stability probe's scalars are merged (when hyperconn.diagnostics is installed)
    pytest.importorskip("hyperconn.diagnostics.probe")
    assert any(k.startswith("diag/") for k in evals[-1])
    assert (tmp_path / "diagnostics").is_dir()


def test_extra_hooks_and_broken_hook(tmp_path, capsys):
    calls = []

    def good(model, inputs, targets, loss_fn, step):
        assert not model.training and torch.is_grad_enabled()
        calls.append(step)
        return {"custom": 1.5}

    def broken(model, inputs, targets, loss_fn, step):
        raise RuntimeError("boom")

    summary = train(tiny(tmp_path, steps=6, eval_every=3), hooks=[good, broken])
    assert calls == [3, 6]
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_loss" in r]
    assert all(r["diag/custom"] == 1.5 for r in rows)
    assert summary["status"] == "finished" and len(summary["hook_errors"]) == 1
    assert "boom" in capsys.readouterr().err


def test_bytes_task_on_given_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"f{i}.txt").write_text(("hello hyperconn %d " % i) * 40)
    cfg = tiny(tmp_path / "run", task="bytes", data_paths=[str(data)], steps=4, eval_every=2)
    summary = train(cfg)
    assert summary["metric"] == "eval_bpb" and summary["metric_value"] > 0
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_bpb" in r]
    assert math.isclose(rows[-1]["eval_bpb"], rows[-1]["eval_loss"] / math.log(2), rel_tol=1e-9)


def test_bytes_val_split_independent_of_seed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        (data / f"f{i}.txt").write_text(f"file {i} " * 50)
    t0 = tasks_mod.build_task(tiny(tmp_path, task="bytes", data_paths=[str(data)], seed=0))
    t1 = tasks_mod.build_task(tiny(tmp_path, task="bytes", data_paths=[str(data)], seed=5))
    assert t0.val_data.files == t1.val_data.files
    for (a, _), (b, _) in zip(t0.eval_batches(), t1.eval_batches()):
        assert torch.equal(a, b)
    assert not torch.equal(t0.train_batch(0)[0], t1.train_batch(0)[0])


# ---------------------------------------------------------------------------- resume


@pytest.mark.parametrize("variant", ["hc", "harmonized"])
def test_resume_is_exact(tmp_path, variant):
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny(full, variant, steps=20, ckpt_every=10))
    first = train(tiny(part, variant, steps=20, ckpt_every=10, stop_after=10))
    assert first["status"] == "stopped" and first["steps"] == 10
    saved = tmp_path / "ckpt10.pt"
    shutil.copy(part / "checkpoint.pt", saved)
    # run on past the checkpoint, then "crash": the checkpoint on disk is still step 10
    train(tiny(part, variant, steps=20, ckpt_every=10, stop_after=15, resume=True))
    assert max(s for s, _ in losses(part)) == 15
    shutil.copy(saved, part / "checkpoint.pt")
    done = train(tiny(part, variant, steps=20, ckpt_every=10, resume=True))
    assert done["status"] == "finished" and done["steps"] == 20
    for key in ("loss", "grad_norm", "lr", "eval_loss", "eval_accuracy", "harmonized_scale"):
        assert losses(full, key) == losses(part, key), key
    assert [s for s, _ in losses(part)] == list(range(1, 21))


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    summary = train(tiny(tmp_path, steps=3, resume=True))
    assert summary["status"] == "finished" and summary["steps"] == 3


# ---------------------------------------------------------------------------- divergence


def test_divergence_is_reported(tmp_path, monkeypatch):
    real = tasks_mod.Task.loss
    calls = {"n": 0}

    def nan_on_third(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(tasks_mod.Task, "loss", staticmethod(nan_on_third))
    summary = train(tiny(tmp_path, steps=10, eval_every=0))
    assert summary["status"] == "diverged" and summary["diverged_step"] == 3 and summary["steps"] == 2
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "diverged" and on_disk["diverged_step"] == 3
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert last["step"] == 3 and last["loss"] is None and last["diverged"] is True


def test_huge_lr_diverges_without_raising(tmp_path):
    summary = train(tiny(tmp_path, variant="hc", steps=30, lr=1e6, warmup_steps=0, eval_every=0))
    assert summary["status"] == "diverged", summary
    assert 1 <= summary["diverged_step"] <= 30


# ---------------------------------------------------------------------------- optimizer


def test_weight_decay_groups():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, seq_len=16,
                          connection=ConnectionConfig("hybrid", streams=2)))
    decay, no_decay = decay_split(model)
    params = dict(model.named_parameters())
    assert set(decay) | set(no_decay) == set(params) and not set(decay) & set(no_decay)
    for name in decay:
        assert params[name].dim() >= 2, name
    assert any(n.endswith(".phi") for n in decay)
    assert "wte.weight" in decay and any("qkv" in n for n in decay)
    for suffix in (".b_pre", ".b_post", ".b_res", ".alpha", ".lambda_logit"):
        hits = [n for n in no_decay if n.endswith(suffix)]
        assert hits, suffix
    assert all(not n.endswith(".phi") for n in no_decay)
    assert any("norm" in n for n in no_decay)


def test_lr_schedule():
    kw = dict(lr=1.0, steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(109, **kw) == pytest.approx(0.1)
    vals = [lr_at(s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert lr_at(50, schedule="constant", **kw) == 1.0


# ---------------------------------------------------------------------------- checkpoints


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train(tiny(tmp_path, steps=2))
    ckpt = tmp_path / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        train(tiny(tmp_path, steps=4, resume=True))
    ckpt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="damaged"):
        train(tiny(tmp_path, steps=4, resume=True))


def test_incompatible_checkpoint_is_a_clear_error(tmp_path):
    train(tiny(tmp_path, steps=2))
    other = with_overrides(tiny(tmp_path, steps=4, resume=True), {"model.n_embd": 64})
    with pytest.raises(CheckpointError, match="model.n_embd"):
        train(other)
    with pytest.raises(CheckpointError, match="variant"):
        train(tiny(tmp_path, variant="mhc", steps=4, resume=True))


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, field", [
    (dict(lr=-1.0), "lr"), (dict(steps=0), "steps"), (dict(task="images"), "task"),
    (dict(kv_pairs=20), "kv_pairs"), (dict(schedule="linear"), "schedule"), (dict(beta2=1.0), "beta2"),
    (dict(grad_clip=-1.0), "grad_clip"), (dict(device="tpu"), "device"), (dict(min_lr_ratio=2.0), "min_lr_ratio"),
])
def test_config_validation(tmp_path, kwargs, field):
    with pytest.raises(ConfigError) as e:
        tiny(tmp_path, **kwargs)
    assert e.value.field == field and str(e.value).startswith(field + ":")


def test_config_from_dict_and_overrides(tmp_path):
    cfg = tiny(tmp_path)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="model.n_embdd"):
        TrainConfig.from_dict({"model": {"n_embdd": 3}})
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"model": {"n_embd": 30}})
    assert e.value.field == "model.n_embd"
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"model": {"connection": {"variant": "residual"}}})
    assert e.value.field == "model.connection.streams"
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"harmonized": {"beta": 1.5}})
    assert e.value.field == "harmonized.beta"
    c2 = with_overrides(cfg, {"model.connection.variant": "isohc", "lr": 1})
    assert c2.model.connection.variant == "isohc" and c2.lr == 1.0 and isinstance(c2.lr, float)
    with pytest.raises(ConfigError, match="nope"):
        with_overrides(cfg, {"nope": 1})


def test_nested_config_errors_name_the_dotted_field(tmp_path):
    # A dict for a nested config is built like from_dict builds it: errors carry the path.
    for model, field in [({"n_embd": 30}, "model.n_embd"), ({"nope": 1}, "model.nope"),
                         ({"connection": {"variant": "residual"}}, "model.connection.streams"),
                         ({"connection": {"variant": "bogus"}}, "model.connection.variant")]:
        with pytest.raises(ConfigError) as e:
            TrainConfig(model=model)
        assert e.value.field == field and str(e.value).startswith(field + ": "), (model, str(e.value))
    with pytest.raises(ConfigError) as e:
        TrainConfig(harmonized={"beta": 1.5})
    assert e.value.field == "harmonized.beta"
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"model": {"connection": {"streams": 0}}})
    assert e.value.field == "model.connection.streams"


def test_controller_settings(tmp_path):
    cfg = tiny(tmp_path, harmonized={"target_gain": 3.0})
    assert cfg.controller_settings() == {"harmonized": {"target_gain": 3.0, "beta": 0.95, "exponent": 0.5,
                                                       "min_scale": 0.02, "gain": "forward"}}
    with pytest.raises(ConfigError) as e:
        tiny(tmp_path, harmonized={"gain": "spectral"})
    assert e.value.field == "harmonized.gain"
