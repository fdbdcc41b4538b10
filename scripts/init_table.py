"""Tables of the init study from its comparison directory (scripts/init_study.py).

    python scripts/init_table.py runs/init-bytes [--figures DIR] [--ratios ratios.md]

Per (group, variant): held-out bits per byte per seed, the mean, the paired (same seed)
difference to the same variant with exact copies (``bytes-copies``; hc and the residual:
to the residual of the same group) with its 95 % t-interval, the final stream similarity
and effective rank, and ‖H_res − I‖_F of the static map at the end (mean over layers, from
the final checkpoint).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import torch

from hyperconn.models import GPT, GPTConfig
from hyperconn.report.findings import paired_interval


def final(run: Path, key: str):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return vals[-1] if vals else None


def static_distance(run: Path):
    ckpt = run / "checkpoint.pt"
    if not ckpt.exists():
        return None
    config = json.loads((run / "config.json").read_text())
    model = GPT(GPTConfig(**config["model"]))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    dists = []
    with torch.no_grad():
        for c in model.connections():
            if not c.mixer.has_coefficients:
                return None
            h_res = c.mixer(c.b_pre, c.b_post, c.b_res)[2]
            dists.append(float((h_res - torch.eye(h_res.shape[-1])).norm()))
    return statistics.fmean(dists)


def main(root: Path) -> None:
    summary = json.loads((root / "summary.json").read_text())
    by = {}
    for r in summary["runs"]:
        by.setdefault((r["group"], r["variant"]), {})[r["seed"]] = r
    print("| group | variant | bpb per seed | mean | paired Δ vs reference | 95 % interval | similarity | "
          "stream rank | ‖H_res − I‖ static, end |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (group, variant), seeds in by.items():
        vals = {s: r["metric_value"] for s, r in seeds.items() if r["status"] == "finished"}
        ref_key = ("bytes-copies", variant) if (group != "bytes-copies" and ("bytes-copies", variant) in by) \
            else (group, "residual")
        ref = {s: r["metric_value"] for s, r in by.get(ref_key, {}).items()} if ref_key != (group, variant) else {}
        diffs = [vals[s] - ref[s] for s in sorted(vals) if s in ref and ref[s] is not None]
        ci = paired_interval(diffs)
        runs = [root / seeds[s]["run_dir"] for s in sorted(seeds)]
        sim = [v for p in runs if (v := final(p, "diag/stream_similarity_last")) is not None]
        rank = [v for p in runs if (v := final(p, "diag/stream_rank_last")) is not None]
        dist = [v for p in runs if (v := static_distance(p)) is not None]
        per_seed = ", ".join(f"{vals[s]:.3f}" for s in sorted(vals))
        delta = ", ".join(f"{d:+.3f}" for d in diffs) + f" (vs {ref_key[0]}/{ref_key[1]})" if diffs else "—"
        interval = f"({ci[1]:+.3f}, {ci[2]:+.3f})" if ci else "—"
        mean = statistics.fmean(vals.values()) if vals else math.nan
        print(f"| {group} | `{variant}` | {per_seed} | {mean:.3f} | {delta} | {interval} | {_mean(sim, 4)} | "
              f"{_mean(rank, 2)} | {_mean(dist, 3)} |")


def _mean(values, digits: int) -> str:
    return f"{statistics.fmean(values):.{digits}f}" if values else "–"


def figures(root: Path, out: Path, ratios: Path | None) -> None:
    """init_bpb.png: bpb per seed and mean per (group, variant); init_grad_ratio.png: the
    median ‖∂b_res‖/‖∂b_post‖ at init / 20 / 100 steps per init (from res_gradient_ratio.py's
    table), log scale, with the 3e-3 line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    summary = json.loads((root / "summary.json").read_text())
    rows = {}
    for r in summary["runs"]:
        if r["status"] == "finished" and not (r["variant"] == "residual" and r["group"] != "bytes-hyperconn"):
            rows.setdefault(f"{r['group'].removeprefix('bytes-')} / {r['variant']}", []).append(r["metric_value"])
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(labels) + 1.2))
    for i, lab in enumerate(labels):
        ax.scatter(rows[lab], [i] * len(rows[lab]), s=14, color="0.55")
        ax.scatter([statistics.fmean(rows[lab])], [i], marker="|", s=200, color="C3")
    ref = statistics.fmean(rows["hyperconn / residual"])
    ax.axvline(ref, color="C0", lw=0.8, ls="--", label=f"residual mean {ref:.3f}")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("held-out bits per byte (lower is better): seeds (grey), mean (red)")
    ax.set_title("Init study, quick's bytes setting (2 blocks, C=64, n=4, 400 steps)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "init_bpb.png", dpi=120)
    plt.close(fig)
    if ratios is None:
        return
    table = [line.strip("|").split("|") for line in ratios.read_text().splitlines() if line.startswith("| ")][1:]
    table = [[c.strip() for c in row] for row in table if len(row) == 5]
    variants = list(dict.fromkeys(r[0] for r in table if r[0] != "hc"))
    inits = list(dict.fromkeys(r[1] for r in table))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, col, title in zip(axes, (2, 3), ("at init", "after 20 steps")):
        width = 0.8 / len(inits)
        for k, init in enumerate(inits):
            vals = [float(next(r[col] for r in table if r[0] == v and r[1] == init)) for v in variants]
            ax.bar([i + k * width for i in range(len(variants))], [max(v, 1e-9) for v in vals], width,
                   label=init.split(" (")[0])
        ax.axhline(3e-3, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(variants))], variants, rotation=30, fontsize=8)
        ax.set_title(f"‖∂b_res‖ / ‖∂b_post‖ {title} (median of 3 seeds; dashed: 3e-3)", fontsize=9)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(inits), fontsize=8)
    fig.text(0.99, 0.01, "exactly 0 is drawn at 1e-9", ha="right", fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out / "init_grad_ratio.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, nargs="?", default=Path("runs/init-bytes"))
    ap.add_argument("--figures", type=Path)
    ap.add_argument("--ratios", type=Path, help="the markdown table res_gradient_ratio.py printed")
    a = ap.parse_args()
    main(a.root)
    if a.figures:
        figures(a.root, a.figures, a.ratios)
