"""The report's computed opening summary: intervals, direction, and the baseline check."""

import json
import math

import pytest

from hyperconn.report import find_runs, write_report
from hyperconn.report.findings import findings_section, paired_interval

from test_report import make_run


def _final(run_dir, **values):
    s = json.loads((run_dir / "summary.json").read_text())
    s["final"].update(values)
    s.update({"train_time_s": values.pop("train_time_s", 10.0), "steps": 40})
    (run_dir / "summary.json").write_text(json.dumps(s))


def test_paired_interval_against_a_hand_computation():
    m, lo, hi = paired_interval([-0.040, -0.037, -0.036])
    h = 4.303 * 0.0020817 / math.sqrt(3)
    assert math.isclose(m, -0.037667, abs_tol=1e-6) and math.isclose(hi - m, h, rel_tol=1e-3)
    assert paired_interval([0.1]) is None and paired_interval([]) is None


def test_directions_ties_single_seeds_and_cost(tmp_path):
    for seed, (res, hc, mhc) in enumerate([(2.70, 2.66, 2.71), (2.66, 2.62, 2.64), (2.73, 2.69, 2.75)]):
        for variant, bpb, t in (("residual", res, 10.0), ("hc", hc, 20.0), ("mhc", mhc, 25.0)):
            _final(make_run(tmp_path, "bytes", variant, seed), eval_bpb=bpb, train_time_s=t)
    _final(make_run(tmp_path, "bytes", "isohc", 0), eval_bpb=2.80)
    lines = findings_section(find_runs([tmp_path]))
    text = "\n".join(lines)
    assert lines[0] == "## What this comparison shows"
    better = next(l for l in lines if l.startswith("- **Better"))
    assert "`hc` (-0.040" in better and "mhc" not in better          # hc: −0.04 on every seed
    assert "Not separable" in text and "`mhc` (+0.003" in text        # mhc: +0.01, −0.02, +0.02
    assert "One seed only" in text and "`isohc` (+0.100)" in text
    assert "`hc` 2.00" in text and "`mhc` 2.50" in text                 # ms/step × residual
    assert "did not learn" not in text


def _pairs(run_dir, p):
    c = json.loads((run_dir / "config.json").read_text())
    c["kv_pairs"] = p
    (run_dir / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("pairs,learned", [(8, True), (4, False)])
def test_worse_and_whether_the_baseline_learned(tmp_path, pairs, learned):
    for seed in range(3):
        for variant, acc in (("residual", 0.26), ("mhc", 0.20 + 0.001 * seed)):
            run = make_run(tmp_path, "kv", variant, seed)
            _final(run, eval_accuracy=acc)
            _pairs(run, pairs)
    text = "\n".join(findings_section(find_runs([tmp_path])))
    # 0.26 is above chance + 0.05 with 8 pairs (0.125), not with 4 (0.25).
    assert ("**The residual baseline did not learn this task" in text) is (not learned)
    assert "**Worse than the residual**" in text and "`mhc` (-0.059" in text


def test_no_residual_no_section_and_in_the_report(tmp_path):
    make_run(tmp_path / "a", "bytes", "mhc", 0)
    assert findings_section(find_runs([tmp_path / "a"])) == []
    for seed in range(2):
        _final(make_run(tmp_path / "b", "bytes", "residual", seed), eval_bpb=2.7)
        _final(make_run(tmp_path / "b", "bytes", "hc", seed), eval_bpb=2.6 + 0.01 * seed)
    md = write_report([tmp_path / "b"], tmp_path / "out").read_text()
    assert md.index("## What this comparison shows") < md.index("## Summary")
