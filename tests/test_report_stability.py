"""Tests for the report's "Stability and cost" section and depth-sweep figure."""

import json
from pathlib import Path

import pytest

from hyperconn.report import find_runs, write_report
from hyperconn.report.stability import depth_sweeps, ms_per_step, peak_gain, stability_section

from test_report import PNG_MAGIC, make_run


def _set(run_dir: Path, summary: dict = None, n_layer: int = None, **config):
    if summary:
        s = json.loads((run_dir / "summary.json").read_text())
        s.update(summary)
        (run_dir / "summary.json").write_text(json.dumps(s))
    c = json.loads((run_dir / "config.json").read_text())
    c.update(config)
    if n_layer is not None:
        c["model"]["n_layer"] = n_layer
    (run_dir / "config.json").write_text(json.dumps(c))


def _row(md_lines, group, variant):
    start = md_lines.index(f"### `{group}`")
    return next(l for l in md_lines[start:] if l.startswith(f"| `{variant}` "))


def test_step_time_peak_gain_and_ratios(tmp_path):
    root = tmp_path / "cmp"
    for variant, ms, growth in (("residual", 10.0, 1.0), ("hc", 20.0, 1.5), ("mhc", 25.0, 1.01)):
        d = make_run(root, "bytes", variant, 0, growth=growth, streams=1 if variant == "residual" else 4)
        _set(d, {"train_time_s": ms * 40 / 1000, "steps": 40})
    runs = find_runs([root])
    by = {r.variant: r for r in runs}
    assert ms_per_step(by["mhc"]) == pytest.approx(25.0)
    # make_run's gain grows over training: the peak is the last evaluation's growth**LAYERS.
    _, gains = by["hc"].series("diag/gain_fwd_mean")
    assert peak_gain(by["hc"], "diag/gain_fwd_mean") == pytest.approx(max(gains)) == pytest.approx(1.5 ** 8)
    assert peak_gain(by["residual"], "diag/no_such_key") is None
    lines = stability_section(runs)
    cells = [c.strip() for c in _row(lines, "bytes", "mhc").strip("|").split("|")]
    # variant, runs, diverged, peak, final range, grad ratio, similarity, ms, × hc, × residual
    assert cells[7] == "25" and cells[8] == "1.250" and cells[9] == "2.500"
    assert [c.strip() for c in _row(lines, "bytes", "hc").strip("|").split("|")][8] == "1.000"


def test_seed_range_and_divergence_step(tmp_path):
    root = tmp_path / "cmp"
    make_run(root, "kv", "hc", 0, growth=1.2)
    make_run(root, "kv", "hc", 1, growth=1.4)
    make_run(root, "kv", "hc", 2, growth=1.3, diverge_at=25)
    lines = stability_section(find_runs([root]))
    cells = [c.strip() for c in _row(lines, "kv", "hc").strip("|").split("|")]
    assert cells[1] == "3" and cells[2].startswith("**1**")
    lo, hi = (float(v) for v in cells[4].split("–"))  # final gain of the two finished seeds
    assert lo == pytest.approx(1.2 ** 8, rel=1e-2) and hi == pytest.approx(1.4 ** 8, rel=1e-2)


def test_depth_sweep_figure_only_for_groups_differing_in_depth(tmp_path):
    root = tmp_path / "cmp"
    for depth in (2, 4, 8):
        for variant, growth in (("hc", 1.3), ("isohc", 1.0)):
            d = make_run(root, "bytes", variant, 0, growth=growth, group=f"depth{depth}")
            _set(d, n_layer=depth)
    d = make_run(root, "bytes", "hc", 0, growth=1.3, diverge_at=20, group="depth16")
    _set(d, n_layer=16)
    runs = find_runs([root])
    sweeps = depth_sweeps(runs)
    assert list(sweeps) == ["bytes"] and len(sweeps["bytes"]) == 7
    path = write_report([root], root)
    md = path.read_text()
    assert "## Stability and cost" in md and "![depth sweep](figures/depth.png)" in md
    assert (root / "figures" / "depth.png").read_bytes()[:8] == PNG_MAGIC

    other = tmp_path / "other"  # same depth, different task settings: no sweep
    make_run(other, "bytes", "hc", 0, group="a")
    _set(make_run(other, "bytes", "hc", 0, group="b"), kv_pairs=4)
    assert depth_sweeps(find_runs([other])) == {}
    md = write_report([other], other).read_text()
    assert "depth sweep" not in md and not (other / "figures" / "depth.png").exists()


def test_two_sweeps_are_titled_by_the_setting_that_differs(tmp_path):
    root = tmp_path / "cmp"
    for lr in (0.01, 0.03):
        for depth in (2, 4):
            d = make_run(root, "bytes", "isohc", 0, group=f"depth{depth}-lr{lr}")
            _set(d, n_layer=depth, lr=lr)
    assert sorted(depth_sweeps(find_runs([root]))) == ["bytes, lr=0.01", "bytes, lr=0.03"]


def _add_mechanism(run_dir: Path, orth: float, energy: float):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "eval_loss" in row:
            row.update({"diag/orth_err": orth, "diag/row_sum_err": 1e-7, "diag/col_sum_err": 2e-7,
                        "diag/min_entry": -0.1, "diag/energy_retention": energy,
                        "diag/transport_grad_ratio": 1.0, "diag/stream_rank_last": 1.5,
                        "diag/stream_similarity_last": 0.9})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_mechanism_section_and_the_orthogonality_flag(tmp_path):
    from hyperconn.report.stability import mechanism_section

    _add_mechanism(make_run(tmp_path, "kv", "isohc", 0), orth=0.5, energy=1.0)      # not an isometry: flagged
    _add_mechanism(make_run(tmp_path, "kv", "mhc", 0), orth=0.3, energy=0.25)       # not an isometry variant
    lines = mechanism_section(find_runs([tmp_path]))
    assert lines[0] == "## What the transport did"
    iso, mhc = _row(lines, "kv", "isohc"), _row(lines, "kv", "mhc")
    assert "0.5 ⚠" in iso and "| 1 |" in iso
    assert "⚠" not in mhc and "0.25" in mhc
    md = write_report([tmp_path], tmp_path / "report").read_text()
    assert "## What the transport did" in md and "0.5 ⚠" in md
    plain = tmp_path / "plain"
    make_run(plain, "kv", "mhc", 0)                       # runs without these diagnostics: no section
    assert mechanism_section(find_runs([plain])) == []
