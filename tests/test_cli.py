"""Tests for the `hyperconn` command (hyperconn.cli) and `hyperconn compare`."""

import json
import subprocess
import sys

import pytest

from hyperconn import cli
from hyperconn.experiments import PRESETS, expand
from hyperconn.train.metrics import read_metrics

TINY = ["--model.n-layer", "2", "--model.n-head", "2", "--model.n-embd", "32", "--model.seq-len", "16",
        "--model.connection.variant", "hc", "--kv-pairs", "2", "--batch-size", "4", "--eval-batches", "1",
        "--no-diagnostics", "--quiet", "--threads", "1"]


def run_main(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, flag", [
    (["--stepz", "3"], "--stepz"),
    (["--steps", "abc"], "--steps"),
    (["--task", "images"], "--task"),
    (["--lr", "-1"], "--lr"),
    (["--model.n-embd", "30"], "--model.n-embd"),
    (["--model.connection.variant", "residual"], "--model.connection.streams"),
    (["--model.connection.variant", "nope"], "--model.connection.variant"),
    (["--harmonized.beta", "2"], "--harmonized.beta"),
    (["--kv-pairs", "500"], "--kv-pairs"),
])
def test_train_bad_flag_exits_2_with_one_line(tmp_path, capsys, argv, flag):
    code, out, err = run_main(["train", "--out-dir", str(tmp_path), *argv], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hyperconn train: error:") and flag in lines[0], lines[0]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_console_script_bad_flag_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hyperconn.cli", "train", "--lr", "oops"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--lr" in r.stderr


def test_help_lists_subcommands(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for cmd in ("train", "compare", "report", "bench"):
        assert cmd in out
    code, _, err = run_main([], capsys)
    assert code == 2 and "train" in err
    code, _, err = run_main(["frobnicate"], capsys)
    assert code == 2 and "frobnicate" in err and len(err.strip().splitlines()) == 1


def test_train_help_lists_flags(capsys):
    code, out, _ = run_main(["train", "--help"], capsys)
    assert code == 0
    for flag in ("--model.connection.variant", "--steps", "--lr", "--resume", "--harmonized.target-gain"):
        assert flag in out


def test_train_runs_and_config_file_defaults(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 5\nlr = 0.002\n[model]\nn_layer = 1\n[model.connection]\nstreams = 2\n')
    out_dir = tmp_path / "run"
    code, _, err = run_main(["train", "--config", str(toml), *TINY, "--steps", "3", "--out-dir", str(out_dir)],
                            capsys)
    assert code == 0, err
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["steps"] == 3  # the flag wins over the file
    assert cfg["lr"] == 0.002 and cfg["model"]["connection"]["streams"] == 2
    assert cfg["model"]["n_layer"] == 2  # TINY's flag again
    assert json.loads((out_dir / "summary.json").read_text())["status"] == "finished"

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("steps: 2\nmodel:\n  connection:\n    variant: isohc\n")
    out2 = tmp_path / "run2"
    code, _, err = run_main(["train", f"--config={yaml_file}", "--out-dir", str(out2), "--quiet",
                             "--no-diagnostics", "--model.n-embd", "32", "--model.n-layer", "1",
                             "--model.seq-len", "16", "--kv-pairs", "2", "--batch-size", "2", "--threads", "1"],
                            capsys)
    assert code == 0, err
    assert json.loads((out2 / "config.json").read_text())["model"]["connection"]["variant"] == "isohc"


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_embdd = 3\n")
    code, _, err = run_main(["train", "--config", str(bad)], capsys)
    assert code == 2 and "model.n_embdd" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(["train", "--config", str(tmp_path / "missing.toml")], capsys)
    assert code == 2 and "--config" in err
    broken = tmp_path / "broken.toml"
    broken.write_text("steps = = 3\n")
    code, _, err = run_main(["train", "--config", str(broken)], capsys)
    assert code == 2 and "cannot parse" in err


def test_train_diverged_exit_status(tmp_path, capsys):
    code, _, _ = run_main(["train", *TINY, "--steps", "30", "--lr", "1e6", "--warmup-steps", "0",
                           "--out-dir", str(tmp_path)], capsys)
    assert code == 3
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_corrupt_checkpoint_exit_1_one_line(tmp_path, capsys):
    assert run_main(["train", *TINY, "--steps", "2", "--out-dir", str(tmp_path)], capsys)[0] == 0
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    code, _, err = run_main(["train", *TINY, "--steps", "4", "--resume", "--out-dir", str(tmp_path)], capsys)
    assert code == 1 and "corrupt" in err and len(err.strip().splitlines()) == 1


def test_missing_lazy_command_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hyperconn.bench", None)
    code, _, err = run_main(["bench"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bench" in err


def test_compare_bad_arguments(tmp_path, capsys):
    code, _, err = run_main(["compare", "--preset", "nope", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--preset" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(["compare", "--preset", "smoke"], capsys)
    assert code == 2 and "--out" in err


def test_presets_expand():
    for name, preset in PRESETS.items():
        jobs = expand(preset, "/tmp/x")
        assert jobs, name
        for job in jobs:
            if job.variant == "residual":
                assert job.config.model.connection.streams == 1
            want = f"{job.group}/{job.variant}-lr{job.lr:g}" if job.lr is not None else f"{job.group}/{job.variant}"
            assert job.config.out_dir.endswith(f"{want}/seed{job.seed}")
    quick = expand(PRESETS["quick"], "/tmp/x")
    assert {j.variant for j in quick} == {"residual", "hc", "mhc", "isohc", "hybrid", "harmonized"}
    # the main job: quality on 3 seeds at 2 blocks, gain at depth on one seed
    assert {j.config.task for j in quick} == {"bytes"}
    assert {j.seed for j in quick if j.group == "bytes"} == {0, 1, 2}
    assert {j.config.model.n_layer for j in quick if j.group == "deep"} == {12}


def test_compare_smoke_end_to_end_and_restart(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = run_main(["compare", "--preset", "smoke", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    jobs = expand(PRESETS["smoke"], out)
    assert "[1/2]" in stdout and "[2/2]" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "smoke" and summary["failed"] == 0
    assert {r["variant"] for r in summary["table"]} == {j.variant for j in jobs}
    assert all(r["finished"] == r["runs"] == 1 for r in summary["table"])
    assert "| kv |" in (out / "summary.md").read_text()
    before = {}
    for job in jobs:
        run_dir = out / job.group / job.variant / f"seed{job.seed}"
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
        before[job.label] = (run_dir / "metrics.jsonl").stat().st_mtime_ns
    # second invocation: every run is skipped, results unchanged
    code, stdout, err = run_main(["compare", "--preset", "smoke", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert stdout.count("skipped") == len(jobs)
    for job in jobs:
        run_dir = out / job.group / job.variant / f"seed{job.seed}"
        assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == before[job.label]
    # an interrupted run (no summary.json) is resumed from its checkpoint, not redone
    victim = out / jobs[-1].group / jobs[-1].variant / "seed0"
    (victim / "summary.json").unlink()
    rows_before = read_metrics(victim / "metrics.jsonl")
    code, stdout, err = run_main(["compare", "--preset", "smoke", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert stdout.count("skipped") == len(jobs) - 1
    assert read_metrics(victim / "metrics.jsonl") == rows_before
