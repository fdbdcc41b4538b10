"""Publish a finished comparison as ``docs/results/<preset>.md`` with its figures.

    hyperconn compare --preset gain --out runs/gain
    python scripts/publish_results.py runs/gain --verdict verdict.md

Regenerates the comparison's report, copies its figures to ``docs/results/<preset>/`` and
writes the page: the claim, the exact command, the machine, the commit the runs ran at
(from compare.json), the settings of every group, the report's computed findings, summary,
stability and mechanism tables, the figures, and the verdict (a markdown file written by a
person after reading the numbers: this script never decides a verdict).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from hyperconn.experiments.presets import get_preset
from hyperconn.report import write_report

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("curves", "quality", "gain_training", "depth", "harmonized", "gain_profile", "grad_norms", "similarity")


def _section(md: str, title: str) -> str:
    """The body of ``## title`` up to the next ``## `` heading."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", md, flags=re.S | re.M)
    return m.group(1).strip() if m else ""


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {dev}; Python {platform.python_version()}, "
            f"torch {torch.__version__}; other jobs shared the cores (load noise affects times only)")


def _settings(preset) -> list[str]:
    lines = ["| group | variants | settings |", "|---|---|---|"]
    for g in preset.groups:
        kv = ", ".join(f"`{k}={v}`" for k, v in g.overrides.items() if k not in ("threads", "device"))
        if g.lrs:
            kv += f"; lr sweep {', '.join(f'{v:g}' for v in g.lrs)} (each variant at its best)"
        if g.seeds:
            kv += f"; seeds {', '.join(map(str, g.seeds))}"
        lines.append(f"| `{g.name}` | {', '.join(g.variants)} | {kv} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compare_dir", type=Path)
    ap.add_argument("--verdict", type=Path, required=True, help="markdown file with the verdict")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args(argv)

    info = json.loads((args.compare_dir / "compare.json").read_text())
    preset = get_preset(info["preset"])
    summary = json.loads((args.compare_dir / "summary.json").read_text())
    report = write_report([args.compare_dir], args.compare_dir).read_text()

    fig_dir = args.docs / preset.name
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    fig_dir.mkdir(parents=True)
    figs = []
    for key in FIGURES:
        src = args.compare_dir / "figures" / f"{key}.png"
        if src.exists():
            shutil.copy2(src, fig_dir / src.name)
            figs.append(key)

    seeds = " ".join(map(str, info["seeds"]))
    default_seeds = " ".join(map(str, preset.seeds))
    cmd = f"hyperconn compare --preset {preset.name} --out runs/{preset.name}"
    if seeds != default_seeds:
        cmd += f" --seeds {seeds}"
    if info.get("jobs", 1) > 1:
        cmd += f" --jobs {info['jobs']}"
    code = info.get("code") or {}
    commit = code.get("commit") or "unknown"
    if code.get("dirty"):
        commit += " (with uncommitted changes)"
    when = datetime.fromtimestamp((args.compare_dir / "summary.json").stat().st_mtime, timezone.utc)
    stab = _section(report, "Stability and cost").replace("](figures/", f"]({preset.name}/")
    page = [
        f"# Results: `{preset.name}`", "",
        preset.description, "",
        "## How it was run", "",
        f"    {cmd}", "",
        f"- Machine: {_machine()}.",
        f"- Finished {when:%Y-%m-%d %H:%M} UTC; {len(summary['runs'])} runs, "
        f"{summary.get('wall_time_s', 0) / 60:.1f} min wall for the comparison, "
        f"{sum(r.get('wall_time_s') or 0 for r in summary['runs']) / 60:.1f} min summed over runs "
        f"(evaluations included).",
        f"- Code: hyperconn {code.get('version', '?')}, commit {commit}.",
        "- Seeds: " + ", ".join(map(str, info["seeds"])) + ".", "",
        *_settings(preset), "",
        "## Verdict", "", args.verdict.read_text().strip(), "",
        "## What this comparison shows (computed)", "", _section(report, "What this comparison shows"), "",
        "## Summary", "", _section(report, "Summary"), "",
        "## Stability and cost", "", stab, "",
        "## What the transport did", "", _section(report, "What the transport did"), "",
        "## Figures", "",
    ]
    for key in figs:
        if key == "depth":
            continue  # already shown in the stability section
        page += [f"![{key}]({preset.name}/{key}.png)", ""]
    page += ["The full report (all captions, every run) is regenerated with "
             f"`hyperconn report runs/{preset.name}`.", ""]
    out = args.docs / f"{preset.name}.md"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(page))
    tmp.replace(out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
