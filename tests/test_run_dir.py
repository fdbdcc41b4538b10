"""Run directories never lose or mix results: fresh starts, locks, checksums, resume rules.

Real processes where the failure is about processes (SIGKILL, two writers); tiny runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hyperconn.train import train
from hyperconn.train.checkpoint import CheckpointError
from hyperconn.train.config import ConfigError, with_overrides
from hyperconn.train.metrics import read_json, read_metrics
from hyperconn.train.run_dir import CHECKSUMS, RUN_FILE, write_checksum

from test_train import tiny

TINY_FLAGS = ["--task", "kv", "--kv-pairs", "2", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2",
              "--eval-every", "0", "--eval-batches", "1", "--quiet", "--no-diagnostics", "--threads", "1",
              "--model.n-layer", "2", "--model.n-head", "2", "--model.n-embd", "32", "--model.seq-len", "16",
              "--model.connection.variant", "hc", "--log-every", "1"]


def cli(out_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "hyperconn.cli", "train", "--out-dir", str(out_dir), *TINY_FLAGS, *extra]


def start(out_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(cli(out_dir, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120, old_id=None) -> None:
    """Until ``path`` has ≥ n lines written by ``proc`` (whose run id is not ``old_id``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = read_json(path.parent / RUN_FILE) or {}
        if info.get("run_id") != old_id and len(read_metrics(path)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for metrics")


def steps_of(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


# ------------------------------------------------------------------ 1. stale checkpoints
def test_fresh_restart_killed_before_its_first_checkpoint_never_resumes_the_old_run(tmp_path):
    # Before: the old checkpoint stayed until the new run wrote its own; --resume then
    # continued the *old* run (metrics [1, 2, 3, 26-50], two evaluations lost, rc 0).
    run = tmp_path / "run"
    assert subprocess.run(cli(run, "--steps", "30", "--seed", "0"), capture_output=True).returncode == 0
    assert (run / "summary.json").exists() and (run / "checkpoint.pt").exists()
    old_id = json.loads((run / RUN_FILE).read_text())["run_id"]
    proc = start(run, "--steps", "3000", "--seed", "1")      # fresh start, checkpoint only at the end
    try:
        wait_for_lines(run / "metrics.jsonl", 3, proc, old_id=old_id)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()
    done = subprocess.run(cli(run, "--steps", "40", "--seed", "1", "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert steps_of(run) == list(range(1, 41))               # a whole run of its own
    assert json.loads((run / "summary.json").read_text())["seed"] == 1


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    train(tiny(tmp_path, steps=4))
    info = json.loads((tmp_path / RUN_FILE).read_text())
    info["run_id"] = "someone-else"
    (tmp_path / RUN_FILE).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="belongs to another run"):
        train(tiny(tmp_path, steps=8, resume=True))


# ------------------------------------------------------------------ 2. one writer
def test_second_writer_exits_at_once_naming_the_holder_and_a_killed_holder_does_not_block(tmp_path):
    # Before: both exited 0 and the directory mixed one run's metrics with the other's.
    run = tmp_path / "run"
    first = start(run, "--steps", "100000")
    try:
        wait_for_lines(run / "metrics.jsonl", 2, first)
        t0 = time.time()
        second = subprocess.run(cli(run, "--steps", "5", "--seed", "3"), capture_output=True, text=True)
        assert second.returncode == 2 and time.time() - t0 < 60
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1 and str(run) in err and f"pid {first.pid}" in err
    finally:  # never leave the long run behind, whatever failed
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    third = subprocess.run(cli(run, "--steps", "5"), capture_output=True, text=True)
    assert third.returncode == 0, third.stderr
    assert steps_of(run) == [1, 2, 3, 4, 5]


def test_lock_is_released_after_a_run_and_in_process_runs_can_follow(tmp_path):
    train(tiny(tmp_path, steps=3))
    train(tiny(tmp_path, steps=3, seed=1))  # would raise if the first run kept the lock
    assert not (tmp_path / ".lock.json").exists()


# ------------------------------------------------------------------ 3. checksums
def test_flipped_bytes_in_a_checkpoint_are_refused_by_name(tmp_path):
    # Before: 64 flipped bytes loaded silently; the run went on from a wrong state.
    train(tiny(tmp_path, steps=4))
    ckpt = tmp_path / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 64):
        data[i] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint file .*checkpoint\.pt is damaged"):
        train(tiny(tmp_path, steps=8, resume=True))
    proc = subprocess.run(cli(tmp_path, "--steps", "8", "--resume"), capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "damaged" in proc.stderr and "weights_only" not in proc.stderr


def test_checksum_record_vouches_for_the_checkpoint_replaced_last(tmp_path):
    # A kill between recording the new digest and moving the new file into place leaves
    # the old file on disk: the record keeps the previous digest, so it still verifies.
    train(tiny(tmp_path, steps=6, ckpt_every=2, stop_after=4))
    record = json.loads((tmp_path / CHECKSUMS).read_text())
    assert record["current"] and record["previous"]
    other = tmp_path / "other.bin"
    other.write_bytes(b"a newer checkpoint that never made it into place")
    write_checksum(tmp_path, other, previous=record["current"])
    other.unlink()
    train(tiny(tmp_path, steps=6, ckpt_every=2, resume=True))  # verifies against "previous"
    assert steps_of(tmp_path)[-1] == 6


def test_unreadable_checkpoint_is_explained_in_our_words(tmp_path):
    train(tiny(tmp_path, steps=2))
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"garbage that is not a torch file")
    write_checksum(tmp_path, ckpt)  # intact by its checksum, but not a checkpoint
    with pytest.raises(CheckpointError) as e:
        train(tiny(tmp_path, steps=4, resume=True))
    assert "not a hyperconn checkpoint" in str(e.value) and "weights_only" not in str(e.value)


# ------------------------------------------------------------------ 4. trajectory settings
@pytest.mark.parametrize("change", [{"seed": 5}, {"lr": 1e-2}, {"batch_size": 8}, {"steps": 12}])
def test_resume_refuses_a_changed_trajectory_setting_naming_old_and_new(tmp_path, change):
    # Before: accepted, and config.json was rewritten to describe another run.
    train(tiny(tmp_path, steps=6, stop_after=3))
    key, new = next(iter(change.items()))
    before = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=f"{key}: .* -> {new!r}"):
        train(with_overrides(tiny(tmp_path, steps=6, resume=True), change))
    assert json.loads((tmp_path / "config.json").read_text()) == before  # nothing rewritten


def test_allow_config_change_continues_and_records_it(tmp_path):
    train(tiny(tmp_path, steps=6, stop_after=3))
    train(tiny(tmp_path, steps=6, resume=True, lr=1e-2, allow_config_change=True))
    history = json.loads((tmp_path / RUN_FILE).read_text())["history"]
    assert history[-1]["resumed_at_step"] == 3 and history[-1]["changed"]["lr"] == [3e-3, 1e-2]


def test_cosmetic_settings_may_change_on_resume(tmp_path):
    train(tiny(tmp_path, steps=6, stop_after=3))
    train(tiny(tmp_path, steps=6, resume=True, log_every=2, threads=2))
    assert steps_of(tmp_path)[-1] == 6


# ------------------------------------------------------------------ 5. partial writes
def test_partial_tmp_files_of_a_killed_write_are_removed_at_the_next_start(tmp_path):
    train(tiny(tmp_path, steps=4, stop_after=2))
    (tmp_path / "checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "shard").write_bytes(b"x")
    train(tiny(tmp_path, steps=4, resume=True))
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------ out_dir errors
def test_out_dir_that_is_a_file_is_a_config_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError) as e:
        train(tiny(target))
    assert e.value.field == "out_dir" and "not a directory" in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_unwritable_out_dir_is_a_config_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError) as e:
            train(tiny(ro / "run"))
        assert e.value.field == "out_dir"
    finally:
        ro.chmod(0o700)


def test_compare_after_a_settings_change_never_reports_the_old_result(tmp_path, monkeypatch):
    # Before: the old lr's checkpoint survived an interrupted fresh start and the next
    # compare resumed it, reporting the old result under the new config.
    import hyperconn.train.loop as loop
    from hyperconn.experiments.compare import run_compare

    out = tmp_path / "cmp"
    run_compare("smoke", out, quiet=True)
    real_write, calls = loop.MetricsWriter.write, {"n": 0}

    def interrupted(self, row):
        real_write(self, row)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.MetricsWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_compare("smoke", out, quiet=True, overrides={"lr": 1e-2})
    monkeypatch.setattr(loop.MetricsWriter, "write", real_write)
    summary = run_compare("smoke", out, quiet=True, overrides={"lr": 1e-2})
    assert summary["failed"] == 0
    for r in summary["runs"]:
        run_dir = out / r["run_dir"]
        assert json.loads((run_dir / "config.json").read_text())["lr"] == 1e-2
        assert steps_of(run_dir) == list(range(1, 7)) and r["status"] == "finished"


def test_tensorboard_mirrors_metrics_and_purges_on_resume(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hyperconn.train.metrics import TensorBoardMirror

    real = TensorBoardMirror.write

    def killed_after_step_5(self, row):
        real(self, row)
        if row["step"] == 5:
            raise KeyboardInterrupt  # events of step 5 exist; the last checkpoint is step 4

    monkeypatch.setattr(TensorBoardMirror, "write", killed_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, steps=8, ckpt_every=2, tensorboard=True, eval_every=2))
    monkeypatch.setattr(TensorBoardMirror, "write", real)
    train(tiny(tmp_path, steps=8, ckpt_every=2, resume=True, tensorboard=True, eval_every=2))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 9))  # step 5 once: purged
    loss = {e.step: e.value for e in acc.Scalars("loss")}
    rows = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert sorted(loss) == sorted(rows) == list(range(1, 9))
    assert all(abs(loss[k] - rows[k]) < 1e-6 for k in rows)
    assert "eval_accuracy" in acc.Tags()["scalars"]
