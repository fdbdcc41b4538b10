"""Tables of the init study from its comparison directory (scripts/init_study.py).

    python scripts/init_table.py runs/init-bytes

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


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/init-bytes"))
