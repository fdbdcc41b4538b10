"""The "Stability and cost" section of a report, and the depth-sweep figure.

What the published claims are about, per compare group and variant, in one table:

* divergence (how many runs, at which step),
* the composite forward Amax gain: its **peak over training** (token max, the largest
  value any evaluation saw) and its final value's **range over seeds** (token mean) —
  the spread the Harmonized paper compares,
* the final stream-gradient ratio ‖∂L/∂x_0‖ / ‖∂L/∂x_L‖ and stream similarity,
* the training-step time (``train_time_s / steps``, evaluation excluded) and its ratio to
  ``hc`` and ``residual`` of the same group.

When several groups of one task differ only in depth (``model.n_layer``), a figure plots
the final gradient ratio, gain and held-out metric against the number of
hyper-connected layers, with diverged runs marked.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from . import group_by_label

if TYPE_CHECKING:  # pragma: no cover
    from . import Run

__all__ = ["stability_section", "mechanism_section", "plot_depth", "ms_per_step", "peak_gain", "depth_sweeps",
           "ORTH_FLAG"]

# An isometry variant whose orthogonality error passed this at any evaluation did not test an isometry.
ORTH_FLAG = 1e-2

GAIN_MAX = "diag/gain_fwd_max"
GAIN_MEAN = "diag/gain_fwd_mean"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def ms_per_step(run: "Run") -> Optional[float]:
    """Mean wall time of one training step in ms (``summary.json``: train_time_s / steps)."""
    t, steps = run.summary.get("train_time_s"), run.summary.get("steps")
    if _finite(t) and _finite(steps) and steps > 0:
        return 1000.0 * t / steps
    return None


def peak_gain(run: "Run", key: str = GAIN_MAX) -> Optional[float]:
    """Largest finite value of ``key`` over the run's evaluations (None without any)."""
    vals = [v for v in run.series(key)[1] if _finite(v)]
    return max(vals) if vals else None


def _last(run: "Run", key: str) -> Optional[float]:
    vals = [v for v in run.series(key)[1] if _finite(v)]
    return vals[-1] if vals else None


def _g(v: Optional[float], digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}g}"


def _mean(vals) -> Optional[float]:
    vals = [v for v in vals if _finite(v)]
    return statistics.fmean(vals) if vals else None


def _range(vals, digits: int = 3) -> str:
    vals = [v for v in vals if _finite(v)]
    if not vals:
        return "–"
    lo, hi = min(vals), max(vals)
    return _g(lo, digits) if len(vals) == 1 or lo == hi else f"{_g(lo, digits)}–{_g(hi, digits)}"


def _diverged_cell(group: list["Run"]) -> str:
    div = [r for r in group if r.diverged]
    if not div:
        return "0"
    steps = sorted(int(s) for r in div if _finite(s := r.summary.get("diverged_step") or r.last_step))
    at = f" (step {', '.join(map(str, steps))})" if steps else ""
    return f"**{len(div)}**{at}"


def stability_section(runs: Sequence["Run"], depth_figure: Optional[Path] = None, out: Optional[Path] = None
                      ) -> list[str]:
    """Markdown lines of the section (heading included)."""
    lines = ["## Stability and cost", "",
             "Per variant: runs that diverged (and at which step); the composite forward Amax gain at its "
             "**peak over training** (token max, mean over seeds) and at the end (token mean, min–max over "
             "seeds: the seed spread); the final ‖∂L/∂x_0‖/‖∂L/∂x_L‖ and stream similarity (mean over "
             "seeds); and the mean training-step time (evaluation excluded) with its ratio to `hc` and "
             "`residual` of the same group. Runs are timed one after another, so step-time ratios carry "
             "the machine's load noise (see `hyperconn bench model` for interleaved timing).", ""]
    head = ["variant", "runs", "diverged", "peak gain (max)", "final gain (mean), seed range", "grad ratio",
            "similarity", "ms/step", "× hc", "× residual"]
    for name, groups in group_by_label(runs).items():
        ms = {lab: _mean(ms_per_step(r) for r in g) for lab, g in groups.items()}
        lines += [f"### `{name}`", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for label, group in sorted(groups.items()):
            ok = [r for r in group if not r.diverged]
            t = ms[label]
            ratio = lambda base: "–" if t is None or not ms.get(base) else f"{t / ms[base]:.3f}"  # noqa: E731
            lines.append("| " + " | ".join([
                f"`{label}`", str(len(group)), _diverged_cell(group),
                _g(_mean(peak_gain(r) for r in group)),
                _range([_last(r, GAIN_MEAN) for r in ok]),
                _g(_mean(_last(r, "diag/grad_ratio") for r in ok)),
                _g(_mean(_last(r, "diag/stream_similarity") for r in ok), 4),
                _g(t, 4), ratio("hc"), ratio("residual"),
            ]) + " |")
        lines.append("")
    if depth_figure is not None:
        rel = depth_figure.relative_to(out) if out is not None and depth_figure.is_relative_to(out) else depth_figure
        lines += [f"![depth sweep]({rel})", "",
                  "Depth sweep: final stream-gradient ratio ‖∂L/∂x_0‖/‖∂L/∂x_L‖ (1 = flat), final "
                  "composite forward gain (token mean) and held-out metric against the number of "
                  "hyper-connected layers (2 per block). ✕ on the top edge: the run diverged at that depth.", ""]
    return lines


def mechanism_section(runs: Sequence["Run"]) -> list[str]:
    """Markdown lines of "What the transport did": per group and variant, the manifold
    errors at their worst over training and, at the last evaluation, what the composite
    keeps of a mean-zero signal, the transport-only gradient ratio and the streams'
    effective rank and similarity (means over seeds). Empty when no run logged them."""
    keys = ("diag/energy_retention", "diag/transport_grad_ratio", "diag/stream_rank")
    if not any(r.series(k)[1] for r in runs for k in keys):
        return []
    lines = ["## What the transport did", "",
             "Per variant (mean over seeds): the worst orthogonality error ‖HᵀH − I‖_F and Birkhoff error "
             "(row/column sums, negative entries) of any layer at any evaluation; at the last evaluation the "
             "energy the whole composite keeps on the mean-zero subspace (mean squared singular value on 1^⊥: "
             "1 for isometries, 0 for uniform averaging), the transport-only gradient ratio ‖Pᵀg‖/‖g‖ of the "
             "top stream gradient (1 for isometries), the streams' effective rank (1 = copies, n = "
             "independent) and similarity; and ‖∂b_res‖/‖∂b_post‖, the gradient the static H_res logits get "
             "relative to H_post's, at the first and last evaluation (≈ 0: H_res does not learn). ⚠ marks an isometry variant whose orthogonality error exceeded "
             f"{ORTH_FLAG:g}: it did not test an isometry (hybrid is not flagged: it mixes an isometry with a "
             f"doubly stochastic map, so its error is nonzero by design).", ""]
    head = ["variant", "orth err (max)", "row/col err (max)", "min entry", "energy on 1^⊥", "‖Pᵀg‖/‖g‖",
            "stream rank", "similarity", "‖∂b_res‖/‖∂b_post‖ first → last"]
    for name, groups in group_by_label(runs).items():
        lines += [f"### `{name}`", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for label, group in sorted(groups.items()):
            orth = _mean(peak_gain(r, "diag/orth_err") for r in group)
            birk = _mean(max((v for v in (peak_gain(r, "diag/row_sum_err"), peak_gain(r, "diag/col_sum_err"))
                              if v is not None), default=None) for r in group)
            low = [min((v for v in r.series("diag/min_entry")[1] if _finite(v)), default=None) for r in group]
            # isohc claims an isometry; hybrid mixes one with a doubly stochastic map (its
            # orthogonality error is λ-weighted by design), so it is not flagged.
            isometry = label.startswith("isohc") or "cayley" in label
            flag = " ⚠" if isometry and orth is not None and orth > ORTH_FLAG else ""
            lines.append("| " + " | ".join([
                f"`{label}`", _g(orth) + flag, _g(birk), _g(_mean(low)),
                _g(_mean(_last(r, "diag/energy_retention") for r in group), 4),
                _g(_mean(_last(r, "diag/transport_grad_ratio") for r in group), 4),
                _g(_mean(_last(r, "diag/stream_rank_last") for r in group), 3),
                _g(_mean(_last(r, "diag/stream_similarity_last") for r in group), 4),
                _first_to_last(group, "diag/coef_grad_ratio"),
            ]) + " |")
        lines.append("")
    return lines


def _first_to_last(group, key: str) -> str:
    firsts = [v[0] for r in group if (v := [x for x in r.series(key)[1] if _finite(x)])]
    lasts = [_last(r, key) for r in group]
    if not firsts:
        return "–"
    return f"{_g(_mean(firsts), 2)} → {_g(_mean(lasts), 2)}"


# ----------------------------------------------------------------------------- depth figure
def _n_layer(run: "Run") -> Optional[int]:
    model = run.config.get("model") if isinstance(run.config.get("model"), dict) else {}
    v = model.get("n_layer")
    return v if isinstance(v, int) else None


def _without_depth(run: "Run") -> str:
    cfg = json.loads(json.dumps(run.config, default=str))
    for k in ("out_dir", "seed", "resume", "quiet", "stop_after"):
        cfg.pop(k, None)
    model = cfg.get("model") or {}
    model.pop("n_layer", None)
    model.pop("connection", None)
    return json.dumps(cfg, sort_keys=True)


def depth_sweeps(runs: Sequence["Run"]) -> dict[str, list["Run"]]:
    """{title: runs} for every set of ≥ 2 groups that share all settings but depth.

    The title is the task, plus the settings that tell sweeps apart when there are
    several (``"bytes, lr=0.03"``)."""
    buckets: dict[str, dict[int, set]] = {}
    members: dict[str, list] = {}
    for r in runs:
        d = _n_layer(r)
        if d is None:
            continue
        key = _without_depth(r)
        buckets.setdefault(key, {}).setdefault(d, set()).add(r.group)
        members.setdefault(key, []).append(r)
    from ..train.config import flatten  # {"model": {"lr": 1}} -> {"model.lr": 1}

    keys = [k for k, depths in buckets.items() if len(depths) >= 2]
    flats = {k: flatten(json.loads(k)) for k in keys}
    differing = sorted({name for k in keys for name, v in flats[k].items()
                        if any(flats[o].get(name) != v for o in keys)})
    out = {}
    for k in keys:
        rs = members[k]
        title = ", ".join([rs[0].task] + [f"{name.split('.')[-1]}={flats[k].get(name)}" for name in differing])
        out[title if title not in out else f"{title} ({len(out)})"] = rs
    return out


_METRIC_TITLES = {"eval_bpb": "held-out bits per byte (lower is better)",
                  "eval_accuracy": "held-out accuracy (higher is better)"}


def _metric(run: "Run") -> str:
    return run.summary.get("metric") or ("eval_accuracy" if run.task == "kv" else "eval_bpb")


def plot_depth(runs: Sequence["Run"], path: Path) -> Optional[Path]:
    """Depth-sweep figure (None when the runs hold no sweep)."""
    sweeps = depth_sweeps(runs)
    if not sweeps:
        return None
    from .figures import _marker, _new_figure, _save, variant_colors

    colors = variant_colors([r.label for r in runs])
    panels = [("stream-gradient ratio first/last", lambda r: _last(r, "diag/grad_ratio"), True),
              ("composite forward gain (token mean)", lambda r: _last(r, GAIN_MEAN), True),
              (None, lambda r: r.final(_metric(r)), False)]
    fig, axes = _new_figure(len(sweeps), len(panels), width=4.6, height=3.4)
    for row, (task, rs) in enumerate(sweeps.items()):
        labels = sorted({r.label for r in rs})
        for col, (title, get, log) in enumerate(panels):
            ax = axes[row][col]
            for label in labels:
                pts: dict[int, list[float]] = {}
                div_depths = []
                for r in rs:
                    if r.label != label:
                        continue
                    layers = 2 * _n_layer(r)
                    if r.diverged:
                        div_depths.append(layers)
                        continue
                    v = get(r)
                    if _finite(v) and (not log or v > 0):
                        pts.setdefault(layers, []).append(v)
                xs = sorted(pts)
                ys = [statistics.fmean(pts[x]) for x in xs]
                base = label.startswith("residual")
                ax.plot(xs, ys, color=colors[label], marker=_marker(label), ls="--" if base else "-",
                        mfc="white" if base else colors[label], label=label)
                for x in div_depths:
                    ax.plot([x], [1.0], transform=ax.get_xaxis_transform(), marker="X", ms=10, ls="none",
                            color=colors[label], mec="black", clip_on=False)
            if log and any(line.get_ydata().size for line in ax.get_lines()):
                ax.set_yscale("log")
            if col == 0:
                ax.axhline(1.0, color="black", lw=0.8, ls=":")
            shown = title or _METRIC_TITLES.get(_metric(rs[0]), "held-out metric")
            ax.set_title(f"{task}: {shown}", fontsize=10)
            ax.set_xlabel("hyper-connected layers")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    return _save(fig, path)
