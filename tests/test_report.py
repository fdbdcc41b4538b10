"""Tests for hyperconn.report: run discovery, report.md sections, figures, CLI."""

import json
import math
import re
from pathlib import Path

import pytest

from hyperconn.report import find_runs, write_report
from hyperconn.report.cli import main
from hyperconn.report.markdown import SECTIONS, fmt_mean_std

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = 8


def _profile(growth: float) -> dict:
    fwd = [growth ** (l + 1) for l in range(LAYERS)]
    bwd = [growth ** (LAYERS - l) for l in range(LAYERS)]
    gains = {"forward_amax": {"mean": fwd, "max": [1.5 * v for v in fwd]},
             "backward_amax": {"mean": bwd, "max": [1.5 * v for v in bwd]}}
    return {"forward": dict(gains), "backward": dict(gains)}


def make_run(root: Path, task: str, variant: str, seed: int, *, steps=40, growth=1.0, diverge_at=None,
             diagnostics=True, harmonized=False, summary=True, streams=4, group=None) -> Path:
    d = root / (group or task) / variant / f"seed{seed}"
    d.mkdir(parents=True)
    config = {"task": task, "seed": seed, "kv_pairs": 8, "steps": steps,
              "model": {"n_layer": LAYERS // 2, "connection": {"variant": variant, "streams": streams}},
              "harmonized": {"target_gain": 4.0}}
    (d / "config.json").write_text(json.dumps(config))
    lines = []
    for step in range(1, steps + 1):
        loss = 5.0 * math.exp(-step / (10 + seed)) + 0.1
        if diverge_at is not None and step >= diverge_at:
            loss = float("nan")
        row = {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0 + seed}
        if step % 10 == 0:
            row["eval_loss"] = loss + 0.05
            row["eval_accuracy" if task == "kv" else "eval_bpb"] = (
                min(1.0, step / steps + 0.05 * seed) if task == "kv" else 2.0 * loss)
            if diagnostics:
                row["diag/gain_fwd_mean"] = growth ** (LAYERS * step / steps)
                row["diag/gain_bwd_mean"] = growth ** (LAYERS * step / steps) * 1.1
                row["diag/grad_ratio"] = growth
                if harmonized:
                    row["diag/harm_scale"] = max(0.1, 1.0 - step / steps)
                    row["diag/harm_gain_raw_mean"] = 2.0 ** (step / 5)
                    row["diag/harm_gain_applied_mean"] = min(4.0, 2.0 ** (step / 5))
        lines.append(json.dumps(row))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary:
        status = "diverged" if diverge_at is not None else "completed"
        final = {"loss": None if diverge_at else 0.2, "eval_loss": 0.25,
                 "eval_accuracy" if task == "kv" else "eval_bpb": 0.9}
        (d / "summary.json").write_text(json.dumps({"status": status, "final": final,
                                                    "num_params": 123456, "tokens_per_s": 1000.0}))
    if diagnostics:
        diag = {"step": steps, "num_layers": LAYERS, "streams": streams,
                "scalars": {"gain_fwd_mean": growth ** LAYERS},
                "profile": _profile(growth),
                "grad_norms": [growth ** (LAYERS - l) * 0.01 for l in range(LAYERS + 1)],
                "similarity": [1.0] + [0.9 - 0.05 * l for l in range(LAYERS)] if streams > 1 else [None] * 9,
                "manifold": {"row_sum_err": [0.0] * LAYERS}}
        (d / "diagnostics").mkdir()
        (d / "diagnostics" / f"step_{steps:07d}.json").write_text(json.dumps(diag))
    return d


@pytest.fixture
def compare(tmp_path):
    root = tmp_path / "compare"
    for seed in (0, 1):
        make_run(root, "kv", "mhc", seed, growth=1.02)
        make_run(root, "kv", "hc", seed, growth=1.6, diverge_at=25 if seed == 1 else None)
        make_run(root, "kv", "harmonized", seed, growth=1.2, harmonized=True)
        make_run(root, "bytes", "isohc", seed, growth=1.0)
    make_run(root, "kv", "residual", 0, diagnostics=False, streams=1)
    return root


def _images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_find_runs(compare):
    runs = find_runs([compare])
    assert len(runs) == 9
    hc = [r for r in runs if r.variant == "hc"]
    assert [r.seed for r in hc] == [0, 1] and [r.diverged for r in hc] == [False, True]
    assert {r.task for r in runs} == {"kv", "bytes"}
    res = next(r for r in runs if r.variant == "residual")
    assert res.diagnostics is None and res.final("eval_accuracy") == 0.9
    # A run directory given directly is found too, and not twice.
    assert len(find_runs([compare / "kv" / "mhc" / "seed0", compare / "kv" / "mhc"])) == 2


def test_report_sections_and_figures(compare):
    path = write_report([compare], compare)
    assert path == compare / "report.md"
    md = path.read_text()
    for section in SECTIONS:
        assert f"## {section}" in md, section
    images = _images(md)
    expected = {"curves", "quality", "gain_training", "harmonized", "gain_profile", "grad_norms", "similarity"}
    assert {Path(p).stem for p in images} == expected
    for rel in images:
        f = compare / rel
        assert f.is_file() and f.read_bytes()[:8] == PNG_MAGIC and f.stat().st_size > 5000
    # Summary rows per task, diverged marked, residual without diagnostics noted.
    assert "### Task `kv`" in md and "### Task `bytes`" in md
    hc_row = next(line for line in md.splitlines() if line.startswith("| `hc` |"))
    assert "**1**" in hc_row
    assert "diverged" in md and "no diagnostics files" in md
    assert "residual" in md


def test_report_without_any_diagnostics(tmp_path):
    make_run(tmp_path / "runs", "kv", "mhc", 0, diagnostics=False)
    make_run(tmp_path / "runs", "kv", "mhc", 1, diagnostics=False, summary=False)
    out = tmp_path / "out"
    path = write_report([tmp_path / "runs"], out)
    md = path.read_text()
    for section in SECTIONS:
        assert f"## {section}" in md
    assert md.count("Figure skipped") == 4  # gain over training, profile, grad norms, similarity
    for rel in _images(md):
        assert (out / rel).read_bytes()[:8] == PNG_MAGIC
    assert not (out / "figures" / "gain_profile.png").exists()
    assert "not finished" in md


def test_cli(compare, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main([str(compare / "kv"), str(compare / "bytes"), "--out", str(out)]) == 0
    assert (out / "report.md").is_file()
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    assert main([str(tmp_path / "missing")]) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 1
    assert "no run directory" in capsys.readouterr().err


def test_fmt_mean_std():
    assert fmt_mean_std([1.0, 3.0]) == "2 ± 1.4"
    assert fmt_mean_std([float("nan"), 2.0]) == "2"
    assert fmt_mean_std([None]) == "–"


def test_truncated_metrics_line_is_skipped(tmp_path):
    d = make_run(tmp_path, "kv", "mhc", 0, steps=10)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 0.')  # a writer killed mid-line
    (run,) = find_runs([tmp_path])
    assert run.last_step == 10 and not run.diverged


def test_diverged_line_without_summary(tmp_path):
    d = make_run(tmp_path, "kv", "hc", 0, steps=10, summary=False)
    with open(d / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 11, "loss": None, "lr": 1e-3, "grad_norm": None, "diverged": True}) + "\n")
    (run,) = find_runs([tmp_path])
    assert run.diverged and run.status == "no summary"


def test_report_of_real_training_runs(tmp_path):
    train_mod = pytest.importorskip("hyperconn.train")
    from hyperconn.models import ConnectionConfig, GPTConfig

    root = tmp_path / "cmp"
    for variant in ("mhc", "harmonized"):
        cfg = train_mod.TrainConfig(
            model=GPTConfig(vocab_size=16, seq_len=12, n_layer=1, n_head=2, n_embd=16,
                            connection=ConnectionConfig(variant, streams=2)),
            task="kv", kv_pairs=2, steps=4, batch_size=4, warmup_steps=1, eval_every=2, eval_batches=1,
            quiet=True, device="cpu", out_dir=str(root / "kv" / variant / "seed0"))
        summary = train_mod.train(cfg)
        assert summary["status"] == "finished"
    path = write_report([root], tmp_path / "out")
    md = path.read_text()
    for section in SECTIONS:
        assert f"## {section}" in md
    images = _images(md)
    assert {"curves", "quality", "gain_training", "gain_profile", "grad_norms", "similarity",
            "harmonized"} <= {Path(p).stem for p in images}
    for rel in images:
        assert (tmp_path / "out" / rel).read_bytes()[:8] == PNG_MAGIC
    runs = find_runs([root])
    assert sorted(r.variant for r in runs) == ["harmonized", "mhc"]
    assert all(r.diagnostics is not None and r.diagnostics["step"] == 4 for r in runs)
    assert all(r.has("diag/gain_fwd_mean") and r.has("diag/grad_ratio") for r in runs)
    assert "Figure skipped" not in md


def test_compare_groups_of_one_task_get_their_own_panels(tmp_path):
    root = tmp_path / "sweep"
    for group, growth in (("depth12", 1.1), ("depth4", 1.02)):
        for variant in ("hc", "mhc"):
            make_run(root, "kv", variant, 0, group=group, growth=growth)
    runs = find_runs([root])
    assert [r.group for r in runs] == ["depth4", "depth4", "depth12", "depth12"]  # natural order
    assert runs[0].panel == "depth4 (kv: key-value retrieval)"
    md = write_report([root], root).read_text()
    assert "### `depth4` (task `kv`)" in md and "### `depth12` (task `kv`)" in md
    assert md.index("### `depth4`") < md.index("### `depth12`")
