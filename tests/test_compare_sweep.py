"""Learning-rate sweeps in a preset (two stages) and parallel runs (``jobs``)."""

import json

import pytest

from hyperconn import ConfigError
from hyperconn.experiments.compare import choose_lrs, run_compare
from hyperconn.experiments.preset_types import Preset, RunGroup, expand, expand_best

_TINY = {"threads": 1, "task": "kv", "kv_pairs": 2, "steps": 6, "eval_every": 3, "eval_batches": 1,
         "batch_size": 4, "warmup_steps": 2, "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16,
         "model.seq_len": 16, "model.connection.streams": 2, "diagnostics": False, "ckpt_every": 0}


def _preset(lrs=(1e-3, 1e-2)):
    return Preset("t", "tiny sweep", (RunGroup("kv", _TINY, ("residual", "mhc"), lrs=lrs),), seeds=(0, 1))


def test_expand_gives_the_sweep_on_the_first_seed_then_expand_best_every_seed(tmp_path):
    first = expand(_preset(), tmp_path)
    assert [j.label for j in first] == ["kv-sweep/residual-lr0.001/seed0", "kv-sweep/residual-lr0.01/seed0",
                                        "kv-sweep/mhc-lr0.001/seed0", "kv-sweep/mhc-lr0.01/seed0"]
    assert [j.config.lr for j in first] == [1e-3, 1e-2, 1e-3, 1e-2]
    second = expand_best(_preset(), tmp_path, {("kv", "mhc"): 1e-2})
    assert [(j.label, j.config.lr) for j in second] == [("kv/mhc/seed0", 1e-2), ("kv/mhc/seed1", 1e-2)]


@pytest.mark.parametrize("lrs", [(), (1e-3, 1e-3), (0.0,), (True,)])
def test_bad_lrs_name_the_field(lrs):
    with pytest.raises(ConfigError, match="^lrs"):
        RunGroup("kv", _TINY, ("mhc",), lrs=lrs)


def _fake_run(path, status, value):
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"status": status, "metric_value": value}))


def test_choose_lrs_by_metric_direction_divergence_last(tmp_path):
    jobs = expand(_preset(lrs=(1e-3, 3e-3, 1e-2)), tmp_path)
    values = {("residual", 1e-3): ("finished", 0.5), ("residual", 3e-3): ("finished", 0.9),
              ("residual", 1e-2): ("diverged", None), ("mhc", 1e-3): ("finished", 0.7),
              ("mhc", 3e-3): ("finished", 0.7), ("mhc", 1e-2): ("finished", 0.2)}
    for j in jobs:
        _fake_run(tmp_path / j.label, *values[j.variant, j.lr])
    best, rows = choose_lrs(jobs)
    # kv: accuracy, higher is better; a tie goes to the smaller lr
    assert best == {("kv", "residual"): 3e-3, ("kv", "mhc"): 1e-3}
    assert sum(r["best"] for r in rows) == 2


def test_sweep_end_to_end_in_two_worker_processes(tmp_path):
    out = tmp_path / "cmp"
    summary = run_compare(_preset(), out, quiet=True, jobs=2)
    assert summary["failed"] == 0
    sweep = json.loads((out / "sweep.json").read_text())
    best = {(b["group"], b["variant"]): b["lr"] for b in sweep["best_lr"]}
    assert set(best) == {("kv", "residual"), ("kv", "mhc")}
    for (group, variant), lr in best.items():
        for seed in (0, 1):
            run = out / group / variant / f"seed{seed}"
            config = json.loads((run / "config.json").read_text())
            assert config["lr"] == lr and config["seed"] == seed and config["out_dir"] == str(run)
        # seed 0 is the sweep's own run, copied: the same metrics line for line
        swept = out / f"{group}-sweep" / f"{variant}-lr{lr:g}" / "seed0"
        assert (out / group / variant / "seed0" / "metrics.jsonl").read_text() == \
            (swept / "metrics.jsonl").read_text()
    rows = {(r["group"], r["variant"], r["lr"]): r for r in summary["table"]}
    assert all(rows[("kv", v, lr)]["finished"] == 2 for (_, v), lr in best.items())
    assert len([k for k in rows if k[0] == "kv-sweep"]) == 4
    # a second call finds everything done
    again = run_compare(_preset(), out, quiet=True, jobs=2)
    assert again["failed"] == 0 and again["table"] == summary["table"]


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="^jobs"):
        run_compare("smoke", tmp_path / "x", jobs=0)
