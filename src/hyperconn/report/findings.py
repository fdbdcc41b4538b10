"""The report's opening summary, computed from the runs (never hand-written).

Per compare group: whether the residual baseline learned the task at all (a comparison on
a task the baseline does not learn says nothing), which variants differ from the residual
beyond seed noise and in which direction (95 % t-interval of the per-seed paired
difference of the held-out metric; one seed cannot tell), whose composite gain grew, whose
streams stayed copies, and the cost per step relative to the residual.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Optional, Sequence

from . import group_by_label
from .stability import ms_per_step, peak_gain

if TYPE_CHECKING:  # pragma: no cover
    from . import Run

__all__ = ["findings_section", "paired_interval", "T95"]

# Two-sided 95 % Student-t quantiles by degrees of freedom (1..10), then the normal's.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
_QUALITY = {"eval_accuracy": (+1, "accuracy"), "eval_bpb": (-1, "bits per byte")}


def paired_interval(diffs: Sequence[float]) -> Optional[tuple[float, float, float]]:
    """(mean, low, high) of the 95 % t-interval of the mean of ``diffs``; None for < 2 values."""
    d = [v for v in diffs if v is not None and math.isfinite(v)]
    if len(d) < 2:
        return None
    m, s = statistics.fmean(d), statistics.stdev(d)
    t = T95[len(d) - 2] if len(d) - 1 <= len(T95) else 1.96
    h = t * s / math.sqrt(len(d))
    return m, m - h, m + h


def _first_last(run: "Run", key: str):
    vals = [v for v in run.series(key)[1] if v is not None and math.isfinite(v)]
    return (vals[0], vals[-1]) if vals else (None, None)


def _learned(baseline: Sequence["Run"], key: str) -> Optional[bool]:
    """Did the residual learn: accuracy ends more than 0.05 above chance (1/P for P
    key-value pairs), or bits per byte fell by more than 0.2 from the first evaluation
    (means over seeds)."""
    if key == "eval_accuracy":
        finals = [r.final(key) for r in baseline if r.final(key) is not None]
        pairs_p = {r.config.get("kv_pairs") for r in baseline} - {None}
        if not finals or len(pairs_p) != 1:
            return None
        return statistics.fmean(finals) > 1.0 / pairs_p.pop() + 0.05
    pairs = [_first_last(r, key) for r in baseline]
    pairs = [(a, b) for a, b in pairs if a is not None]
    if not pairs:
        return None
    gain = statistics.fmean(b - a for a, b in pairs) * _QUALITY[key][0]
    return gain > (0.05 if key == "eval_accuracy" else 0.2)


def _fmt(v: float) -> str:
    return f"{v:+.3f}"


def findings_section(runs: Sequence["Run"]) -> list[str]:
    """Markdown lines of "What this comparison shows" (empty without a residual baseline)."""
    lines: list[str] = []
    by_group = group_by_label(runs)
    for name, groups in by_group.items():
        base = [r for r in groups.get("residual", []) if not r.diverged]
        key = next((k for k in _QUALITY if any(r.final(k) is not None for g in groups.values() for r in g)), None)
        if not base or key is None or len(groups) < 2:
            continue
        sign, what = _QUALITY[key]
        learned = _learned(base, key)
        out = [f"### `{name}`", ""]
        if learned is False:
            out.append(f"- **The residual baseline did not learn this task at this budget** (its {what} "
                       f"stayed within 0.05 of chance, or fell by less than 0.2 bits per byte): the "
                       f"comparisons below say nothing about the variants.")
        sweep = by_group.get(f"{name}-sweep")
        if sweep:
            out.append(_sweep_line(name, groups, sweep, key))
        by_seed = {r.seed: r.final(key) for r in base}
        better, worse, tied, single = [], [], [], []
        for label, group in sorted(groups.items()):
            if label == "residual":
                continue
            diffs = [r.final(key) - by_seed[r.seed] for r in group if not r.diverged and r.seed in by_seed
                     and r.final(key) is not None and by_seed[r.seed] is not None]
            ci = paired_interval(diffs)
            if ci is None:
                if diffs:
                    single.append(f"`{label}` ({_fmt(diffs[0])})")
                continue
            m, lo, hi = ci
            text = f"`{label}` ({_fmt(m)}, 95 % interval {_fmt(lo)} … {_fmt(hi)}, {len(diffs)} seeds)"
            if (lo > 0) if sign > 0 else (hi < 0):      # the whole interval on the better side
                better.append(text)
            elif (hi < 0) if sign > 0 else (lo > 0):
                worse.append(text)
            else:
                tied.append(text)
        unit = f"held-out {what}, paired by seed, variant − residual"
        if better:
            out.append(f"- **Better than the residual** beyond seed noise ({unit}): " + "; ".join(better) + ".")
        if worse:
            out.append(f"- **Worse than the residual** beyond seed noise ({unit}): " + "; ".join(worse) + ".")
        if tied:
            out.append(f"- Not separable from the residual ({unit}): " + "; ".join(tied) + ".")
        if single:
            out.append(f"- One seed only, so not comparable to seed noise ({unit}): " + "; ".join(single) + ".")
        grew = sorted(((statistics.fmean(p), lab) for lab, g in groups.items()
                       if (p := [v for r in g if (v := peak_gain(r)) is not None]) and statistics.fmean(p) > 2.0),
                      reverse=True)
        if grew:
            out.append("- **Composite gain grew** (peak forward Amax gain, token max): "
                       + ", ".join(f"`{lab}` {v:.3g}" for v, lab in grew) + "; every other variant stayed ≤ 2.")
        usage = []
        for lab, g in sorted(groups.items()):
            sim = [v for r in g if (v := r.final("diag/stream_similarity_last")) is not None]
            if not sim:
                continue
            rank = [v for r in g if (v := r.final("diag/stream_rank_last")) is not None]
            usage.append((statistics.fmean(sim), lab, statistics.fmean(rank) if rank else None))
        copies = [lab for s_, lab, _ in usage if s_ >= 0.999]
        apart = [lab for s_, lab, _ in usage if s_ < 0.99]
        if copies:
            out.append("- Streams stayed near-copies (final similarity ≥ 0.999): " + ", ".join(f"`{v}`" for v in copies)
                       + ".")
        if apart:
            out.append("- Streams separated (final similarity < 0.99): " + ", ".join(f"`{v}`" for v in apart) + ".")
        if usage:
            out.append("- Stream usage at the end (similarity of the top stream state, 1 = copies; effective "
                       "rank, 1 = copies, n = independent): "
                       + ", ".join(f"`{lab}` {s_:.4f}" + (f" / {r:.2f}" if r is not None else "")
                                   for s_, lab, r in sorted(usage)) + ".")
        base_ms = [t for r in base if (t := ms_per_step(r)) is not None]
        if base_ms:
            ref = statistics.fmean(base_ms)
            costs = [(lab, statistics.fmean(t)) for lab, g in sorted(groups.items()) if lab != "residual"
                     and (t := [v for r in g if (v := ms_per_step(r)) is not None])]
            if costs:
                out.append("- Cost per training step (× residual, wall time per step as the runs ran): "
                           + ", ".join(f"`{lab}` {t / ref:.2f}" for lab, t in costs) + ".")
        lines += out + [""]
    if not lines:
        return []
    return ["## What this comparison shows", "",
            "Computed from the runs below: a variant is better or worse than the residual only when the 95 % "
            "interval of its per-seed difference excludes 0.", ""] + lines


def _sweep_line(name: str, groups: dict, sweep: dict, key: str) -> str:
    """Which lr each variant of ``name`` runs at, and the sweep's spread of the metric."""
    parts = []
    for label, group in sorted(groups.items()):
        lrs = sorted({r.config.get("lr") for r in group if isinstance(r.config.get("lr"), (int, float))})
        tried = sorted((r.config.get("lr"), r.final(key)) for lab, g in sweep.items()
                       if lab == label or lab.startswith(f"{label}-lr") for r in g
                       if isinstance(r.config.get("lr"), (int, float)))
        if len(lrs) == 1 and tried:
            shown = ", ".join(f"{lr:g}: {'diverged' if v is None else f'{v:.3f}'}" for lr, v in tried)
            parts.append(f"`{label}` at {lrs[0]:g} (sweep {shown})")
    return (f"- Each variant at its best learning rate of the sweep in `{name}-sweep` (one seed, "
            f"{_QUALITY[key][1]} per lr): " + "; ".join(parts) + ".")
