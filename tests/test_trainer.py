"""The Trainer API driven step by step: train_step, evaluate, save / resume (also from a
checkpoint in the format before generic controllers), and that it reproduces train().

The model is a 2-layer Harmonized HC GPT with a target gain below the measured one, so the
controller's scale moves every step: a resume that lost the controller state would change
the losses.
"""

import json
import math

import pytest
import torch

from hyperconn.models import ConnectionConfig, GPTConfig
from hyperconn.train import CheckpointError, ConfigError, RunState, Trainer, TrainConfig, train
from hyperconn.train.checkpoint import save_checkpoint
from hyperconn.train.metrics import read_metrics
from hyperconn.train.run_dir import write_checksum

STEPS = 6


def tiny(out_dir, **kw) -> TrainConfig:
    base = dict(model=GPTConfig(n_layer=2, n_head=2, n_embd=32, seq_len=16,
                                connection=ConnectionConfig("harmonized", streams=4)),
                out_dir=str(out_dir), task="kv", kv_pairs=2, steps=STEPS, batch_size=4, lr=3e-3,
                warmup_steps=2, eval_every=3, eval_batches=1, log_every=1, quiet=True, diagnostics=False,
                threads=1, device="cpu", harmonized={"target_gain": 0.9})
    base.update(kw)
    return TrainConfig(**base)


def rows(run_dir) -> dict[int, dict]:
    """metrics.jsonl by step, without the (timing-dependent) throughput."""
    return {r["step"]: {k: v for k, v in r.items() if k != "tokens_per_s"}
            for r in read_metrics(run_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted train() run: (its metrics rows by step, its summary)."""
    out = tmp_path_factory.mktemp("reference")
    summary = train(tiny(out))
    return rows(out), summary


def test_trainer_is_exported_and_needs_a_train_config():
    import hyperconn.train

    assert "Trainer" in hyperconn.train.__all__
    with pytest.raises(TypeError, match="TrainConfig"):
        Trainer({"steps": 3})


def test_train_step_returns_the_loss_and_evaluate_the_metrics(tmp_path, reference):
    ref, _ = reference
    with Trainer(tiny(tmp_path)) as trainer:
        with pytest.raises(RuntimeError, match="resume"):
            trainer.train_step(0)
        assert trainer.resume() is False
        assert [c.name for c in trainer.controllers] == ["harmonized"]
        losses = [trainer.train_step(step) for step in range(3)]
        assert all(isinstance(v, float) and math.isfinite(v) for v in losses)
        assert losses == [ref[s]["loss"] for s in (1, 2, 3)]  # log_every=1: the step's own loss
        assert trainer.state.step == 3 and trainer.state.status == "finished"
        assert trainer.last.step == 3 and trainer.last.grad_norm == ref[3]["grad_norm"]
        assert trainer.controllers[0].metrics()["harmonized_scale"] == ref[3]["harmonized_scale"]
        metrics = trainer.evaluate(3)
        assert set(metrics) == {"eval_loss", "eval_accuracy"}
        assert metrics == {k: ref[3][k] for k in metrics}
        assert trainer.model.training  # evaluate leaves it training


def test_evaluate_runs_hooks(tmp_path):
    seen = []

    def hook(model, inputs, targets, loss_fn, step):
        seen.append((step, not model.training, torch.is_grad_enabled()))
        return {"custom": 2.0}

    with Trainer(tiny(tmp_path), hooks=[hook]) as trainer:
        trainer.resume()
        assert trainer.evaluate(0)["diag/custom"] == 2.0
    assert seen == [(0, True, True)]


def _old_format(run_dir) -> None:
    """Rewrite checkpoint.pt as hyperconn wrote it before generic controllers: one
    ``controller`` entry instead of ``controllers`` (checksum re-recorded)."""
    path = run_dir / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["controller"] = state.pop("controllers")["harmonized"]
    save_checkpoint(path, state)
    write_checksum(run_dir, path)


@pytest.mark.parametrize("fmt", ["current", "old"])
def test_save_and_resume_reproduce_an_uninterrupted_run(tmp_path, reference, fmt):
    ref, ref_summary = reference
    with Trainer(tiny(tmp_path)) as trainer:
        trainer.resume()
        for step in range(3):
            trainer.train_step(step)
        trainer.save(3)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 3 and set(saved["controllers"]) == {"harmonized"} and "controller" not in saved
    if fmt == "old":
        _old_format(tmp_path)
    with Trainer(tiny(tmp_path, resume=True)) as trainer:
        assert trainer.resume() is True
        assert isinstance(trainer.state, RunState) and trainer.state.step == 3 and trainer.state.resumed
        summary = trainer.fit()
    assert summary["status"] == "finished" and summary["steps"] == STEPS
    got = rows(tmp_path)
    assert sorted(got) == [4, 5, 6]  # the first session logged nothing: train_step does not log
    assert got == {s: ref[s] for s in (4, 5, 6)}
    assert summary["harmonized"] == ref_summary["harmonized"]
    assert summary["final"] == ref_summary["final"]


def test_checkpoint_without_controller_state_is_refused(tmp_path):
    with Trainer(tiny(tmp_path)) as trainer:
        trainer.resume()
        trainer.train_step(0)
        trainer.save()  # state.step by default
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1
    state["controllers"] = {}
    save_checkpoint(path, state)
    write_checksum(tmp_path, path)
    with Trainer(tiny(tmp_path, resume=True)) as trainer:
        with pytest.raises(CheckpointError, match="harmonized"):
            trainer.resume()


def test_the_run_directory_is_locked_until_close(tmp_path):
    trainer = Trainer(tiny(tmp_path))
    try:
        with pytest.raises(ConfigError) as e:
            Trainer(tiny(tmp_path))
        assert e.value.field == "out_dir"
    finally:
        trainer.close()
    trainer.close()  # idempotent
    with Trainer(tiny(tmp_path)) as again:
        assert again.fit()["steps"] == STEPS


def test_checkpoint_config_written_before_new_fields_is_compatible(tmp_path):
    """A config saved before ConnectionConfig had ``options``/``kernels`` still matches."""
    from hyperconn.train import TrainConfig
    from hyperconn.train.checkpoint import CheckpointError, check_compatible

    now = TrainConfig().to_dict()
    old = json.loads(json.dumps(now))
    for key in ("options", "kernels"):
        del old["model"]["connection"][key]
    check_compatible(old, now, tmp_path / "checkpoint.pt")
    old["model"]["n_embd"] = 64
    with pytest.raises(CheckpointError, match="n_embd"):
        check_compatible(old, now, tmp_path / "checkpoint.pt")
