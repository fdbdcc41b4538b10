"""Data-parallel training (DDP, FSDP2) on CPU with gloo: 2 ranks match 1 process.

Every multi-rank run is a real process group: 2 processes started with
``torch.multiprocessing`` (spawn) and torchrun's environment variables, or ``torchrun``
itself running the ``hyperconn train`` command. The model is a 2-layer Harmonized HC GPT
with a target gain below the measured one, so the controller's scale moves every step
and a rank whose scale drifted would change the losses.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hyperconn.models import ConnectionConfig, GPTConfig
from hyperconn.train import ConfigError, TrainConfig, train
from hyperconn.train.metrics import read_json, read_metrics

TOL = 1e-5
STEPS = 4


def _config(out_dir, **overrides) -> TrainConfig:
    base = dict(model=GPTConfig(n_layer=2, n_embd=32, n_head=2, seq_len=16,
                                connection=ConnectionConfig("harmonized", streams=4)),
                kv_pairs=4, steps=STEPS, batch_size=4, warmup_steps=1, eval_every=2, eval_batches=1,
                log_every=1, threads=1, quiet=True, diagnostics=True, device="cpu",
                harmonized={"target_gain": 0.9}, out_dir=str(out_dir))
    base.update(overrides)
    return TrainConfig(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ScaleRecorder:
    """Hook: the Harmonized scale buffers this rank's model holds at each evaluation."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, model, inputs, targets, loss_fn, step):
        scales = [float(hc.mixer.scale) for hc in model.connections() if hc.variant_name == "harmonized"]
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "scales": scales}) + "\n")
        return {}


def _rank_main(rank: int, world: int, port: int, config_dict: dict) -> None:
    """One rank, with the environment torchrun would give it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    config = TrainConfig.from_dict(config_dict)
    out = Path(config.out_dir)
    summary = train(config, hooks=[_ScaleRecorder(str(out.parent / f"{out.name}.scales{rank}.jsonl"))])
    (out.parent / f"{out.name}.summary{rank}.json").write_text(json.dumps(summary.get("harmonized")))


def _spawn(config: TrainConfig, world: int = 2) -> None:
    mp.start_processes(_rank_main, args=(world, _free_port(), config.to_dict()), nprocs=world,
                       start_method="spawn")


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")}


def _max_diff(a: dict, b: dict, keys) -> float:
    return max(abs(a[k] - b[k]) for k in keys)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, same global batch, diagnostics on."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(_config(out))
    return out


def _check_rank_agreement(out: Path) -> None:
    # The controller's state and the scale buffers are identical (==, not close) on both ranks.
    s0, s1 = (json.loads((out.parent / f"{out.name}.summary{r}.json").read_text()) for r in (0, 1))
    assert s0 == s1 and s0["scale"] < 1.0  # the scale did move
    r0, r1 = (read_metrics(out.parent / f"{out.name}.scales{r}.jsonl") for r in (0, 1))
    assert r0 == r1 and len(r0) >= 1 and all(len(set(r["scales"])) == 1 for r in r0)


def test_ddp_two_ranks_match_one_process(single, tmp_path):
    out = tmp_path / "ddp"
    _spawn(_config(out, parallel="ddp", diagnostics=False))
    ref, got = _losses(single), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    diff = _max_diff(ref, got, got)
    print(f"DDP vs 1 process: max |loss diff| = {diff:.3g}")
    assert diff < TOL
    ref_rows = {r["step"]: r for r in read_metrics(single / "metrics.jsonl")}
    for row in read_metrics(out / "metrics.jsonl"):
        assert abs(row["harmonized_scale"] - ref_rows[row["step"]]["harmonized_scale"]) < TOL
        if "eval_loss" in row:  # held-out metrics are reduced over ranks too
            assert abs(row["eval_loss"] - ref_rows[row["step"]]["eval_loss"]) < TOL
    _check_rank_agreement(out)
    # rank 0 alone wrote the run directory; DDP saves a sharded checkpoint directory
    summary = read_json(out / "summary.json")
    assert summary["status"] == "finished" and summary["world_size"] == 2 and summary["parallel"] == "ddp"
    assert (out / "checkpoint" / "meta.pt").exists() and not (out / "checkpoint.pt").exists()
    assert not (out / "diagnostics").exists()


def test_fsdp_two_ranks_match_one_process_and_resume_on_one(single, tmp_path):
    out = tmp_path / "fsdp"
    _spawn(_config(out, parallel="fsdp", stop_after=2))
    ref, got = _losses(single), _losses(out)
    assert sorted(got) == [1, 2]
    diff = _max_diff(ref, got, got)
    print(f"FSDP vs 1 process: max |loss diff| = {diff:.3g}")
    assert diff < TOL
    assert read_json(out / "summary.json")["status"] == "stopped"
    _check_rank_agreement(out)
    # diagnostics ran on the gathered model: the same numbers as one process
    ref_row = next(r for r in read_metrics(single / "metrics.jsonl") if r["step"] == 2)
    got_row = next(r for r in read_metrics(out / "metrics.jsonl") if r["step"] == 2)
    diag = [k for k in ref_row if k.startswith("diag/") and ref_row[k] is not None]
    assert diag and all(abs(got_row[k] - ref_row[k]) <= TOL * max(1.0, abs(ref_row[k])) for k in diag)
    assert sorted(p.name for p in (out / "diagnostics").iterdir()) == ["step_0000002.json"]
    assert (out / "checkpoint" / "meta.pt").exists()

    # saved by 2 FSDP ranks, resumed by 1 process (DCP without a process group)
    before = read_metrics(out / "metrics.jsonl")
    summary = train(_config(out, parallel="fsdp", resume=True))
    assert read_metrics(out / "metrics.jsonl")[:2] == before  # continued, not restarted
    assert summary["status"] == "finished" and summary["world_size"] == 1
    got = _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    diff = _max_diff(ref, got, [3, 4])
    print(f"resume 2 -> 1 vs uninterrupted: max |loss diff| = {diff:.3g}")
    assert diff < TOL
    # one process writes checkpoint.pt and drops the sharded directory
    assert (out / "checkpoint.pt").exists() and not (out / "checkpoint").exists()


def test_torchrun_cli_resumes_a_single_process_checkpoint(single, tmp_path):
    """`hyperconn train` unchanged under torchrun; a 1-process checkpoint continues on 2 ranks."""
    out = tmp_path / "cli"
    train(_config(out, diagnostics=False, stop_after=2))
    assert (out / "checkpoint.pt").exists()
    before = read_metrics(out / "metrics.jsonl")
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(_config(out, diagnostics=False).to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
           "-m", "hyperconn.cli", "train", "--config", str(cfg), "--parallel", "fsdp", "--resume"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(out / "metrics.jsonl")[:2] == before  # continued, not restarted
    ref, got = _losses(single), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    diff = _max_diff(ref, got, [3, 4])
    print(f"resume 1 -> 2 (torchrun, FSDP) vs uninterrupted: max |loss diff| = {diff:.3g}")
    assert diff < TOL
    assert read_json(out / "summary.json")["world_size"] == 2
    assert (out / "checkpoint" / "meta.pt").exists() and not (out / "checkpoint.pt").exists()


def test_global_batch_must_split_evenly(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError) as e:
        train(_config(tmp_path / "bad"))
    assert e.value.field == "batch_size" and "world size 3" in str(e.value)


def test_parallel_setting_is_validated():
    with pytest.raises(ConfigError) as e:
        _config("x", parallel="zero3")
    assert e.value.field == "parallel"
