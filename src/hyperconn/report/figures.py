"""PNG figures of a report (matplotlib, Agg backend: no display needed).

Every figure has one column (or row) of panels per task (or compare group), one colour per variant (the
same colour in every figure), the mean over seeds as a line and the min–max range over
seeds as a band. Runs that diverged end with a ✕ at their last finite value.
:func:`make_figures` returns, per figure key, a :class:`Figure` whose ``path`` is None
(with ``note`` saying why) when the runs hold no data for it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from . import group_by_label

if TYPE_CHECKING:  # pragma: no cover
    from . import Run

__all__ = ["Figure", "FIGURE_KEYS", "make_figures", "variant_colors", "DIAG"]

FIGURE_KEYS = ("curves", "quality", "gain_training", "gain_profile", "grad_norms", "similarity", "harmonized")

# Colours for variants without a style of their own (Variant.style), in order.
_EXTRA = ["#7f7f7f", "#aec7e8", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d"]


def _styles(key: str) -> dict[str, str]:
    """{variant name: its style[key]} for every registered variant that sets one, so every
    report and figure agrees and a user's variant brings its own look."""
    from ..variants import get_variant, variant_names

    return {name: get_variant(name).style[key] for name in variant_names() if key in get_variant(name).style}

DIAG = {  # metric keys (metrics.jsonl, with the diag/ prefix) used by the figures
    "gain_fwd": "diag/gain_fwd_mean", "gain_bwd": "diag/gain_bwd_mean",
    "gain_fwd_max": "diag/gain_fwd_max", "scale": "diag/harm_scale",
    "raw_gain": "diag/harm_gain_raw_mean", "applied_gain": "diag/harm_gain_applied_mean",
}

@dataclass
class Figure:
    key: str
    path: Optional[Path]
    note: str = ""


def variant_colors(labels: Sequence[str]) -> dict[str, str]:
    """Colour per label: registered variants with a ``style`` (and labels starting with
    one) keep theirs; other labels take the next spare colour."""
    known = _styles("color")
    colors, extra = {}, iter(_EXTRA * 4)
    for label in sorted(set(labels)):
        base = next((v for v in sorted(known, key=len, reverse=True) if label.startswith(v)), None)
        colors[label] = known[base] if base and known[base] not in colors.values() else next(extra)
    return colors


def _task_title(panel: str) -> str:
    return panel


def _groups(runs: Sequence["Run"]) -> dict[str, dict[str, list["Run"]]]:
    """{panel title: {label: runs}}, panels in the runs' order (natural group order)."""
    return group_by_label(runs, key=lambda r: r.panel)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _aggregate(series: Sequence[tuple[Sequence[float], Sequence[float]]]):
    """Per x: (xs, mean, lo, hi, count) over the series' finite values."""
    by_x = defaultdict(list)
    for xs, ys in series:
        for x, y in zip(xs, ys):
            if _finite(y):
                by_x[x].append(y)
    xs = sorted(by_x)
    mean = [sum(by_x[x]) / len(by_x[x]) for x in xs]
    lo = [min(by_x[x]) for x in xs]
    hi = [max(by_x[x]) for x in xs]
    return xs, mean, lo, hi


def _log_if_wide(ax, values: Sequence[float], force: bool = False, ratio: float = 30.0) -> None:
    vals = [v for v in values if _finite(v)]
    if not vals:
        return
    if force or (min(vals) > 0 and max(vals) / min(vals) > ratio):
        if min(vals) > 0:
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=1e-3)


def _marker(label: str) -> str:
    markers = _styles("marker")
    base = next((v for v in sorted(markers, key=len, reverse=True) if label.startswith(v)), None)
    return markers.get(base, "o")


def _draw(ax, label: str, color: str, series, diverged_ends=(), linestyle="-", marker=None):
    """Mean line (+ min–max band) of several (xs, ys) series. Sparse lines get the
    variant's marker, so curves lying on top of each other stay distinguishable; the
    residual baseline is dashed and drawn underneath."""
    xs, mean, lo, hi = _aggregate(series)
    if not xs:
        return []
    baseline = label.startswith("residual")
    if marker is None and len(xs) <= 30:
        marker = _marker(label)
    elif marker is not None:
        marker = _marker(label)
    ls = "--" if baseline and linestyle == "-" else linestyle
    ax.plot(xs, mean, color=color, lw=1.8, ls=ls, marker=marker, ms=4.5, mfc="white" if baseline else color,
            label=label, zorder=1.5 if baseline else 2.5)
    if len(series) > 1 and any(a != b for a, b in zip(lo, hi)):
        ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0)
    for x, y in diverged_ends:
        ax.plot([x], [y], marker="X", ms=9, color=color, mec="black", mew=0.8, ls="none", zorder=5)
    return mean + lo + hi


def _diverged_end(run: "Run", key: str):
    steps, values = run.series(key)
    pts = [(s, v) for s, v in zip(steps, values) if _finite(v)]
    return pts[-1] if run.diverged and pts else None


def _legend(fig, colors: dict[str, str], used: Sequence[str], diverged: bool, extra=()):
    handles = [Line2D([], [], color=colors[lab], lw=2, marker=_marker(lab), ms=5,
                      ls="--" if lab.startswith("residual") else "-",
                      mfc="white" if lab.startswith("residual") else colors[lab], label=lab)
               for lab in sorted(set(used))]
    handles += list(extra)
    if diverged:
        handles.append(Line2D([], [], marker="X", ms=9, color="white", mec="black", ls="none",
                              label="diverged run (last finite value)"))
    if handles:
        # As many columns as the figure's width holds labels like "orthostochastic" (~1.6 in).
        ncols = min(len(handles), max(2, int(fig.get_figwidth() / 1.6)))
        fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False, fontsize=9)


def _new_figure(rows: int, cols: int, width: float = 5.0, height: float = 3.6):
    fig, axes = plt.subplots(rows, cols, figsize=(max(width * cols, 7.0), height * rows + 0.9), squeeze=False,
                             layout="constrained")
    return fig, axes


def _plain_log_ticks(ax) -> None:
    """Log axes labelled 0.5, 1, 2, 100, 1e+06 rather than 5×10⁻¹; minor ticks labelled
    too when the axis spans less than about two decades."""
    lo, hi = ax.get_ylim()
    if lo <= 0 or hi <= 0:
        return
    fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_formatter(fmt)
    small = hi / lo < 10 ** 1.5
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.2g}") if small else NullFormatter())
    if small:
        ax.tick_params(axis="y", which="minor", labelsize=7)


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_yscale() == "log":
            _plain_log_ticks(ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- curves
def _curve_figure(runs, colors, path: Path, rows: list[tuple[str, Callable[[str], Optional[str]], object, bool]],
                  title: str, annotate: Optional[Callable] = None) -> Optional[Path]:
    """rows: (row title, task → metric key or None, y label, force log)."""
    groups = _groups(runs)
    tasks = list(groups)
    present = [(name, key_of, ylabel, log) for name, key_of, ylabel, log in rows
               if any(key_of(t) and any(r.has(key_of(t)) for g in groups[t].values() for r in g) for t in tasks)]
    if not present:
        return None
    fig, axes = _new_figure(len(present), len(tasks))
    used, any_div = [], False
    for i, (name, key_of, ylabel, log) in enumerate(present):
        for j, task in enumerate(tasks):
            ax, key = axes[i][j], key_of(task)
            values = []
            for label, group in groups[task].items():
                if not key:
                    continue
                ends = [e for e in (_diverged_end(r, key) for r in group) if e]
                any_div |= bool(ends)
                vals = _draw(ax, label, colors[label], [r.series(key) for r in group], ends)
                if vals:
                    used.append(label)
                values += vals
            if not values:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
            _log_if_wide(ax, values, force=log)
            if annotate and key:
                annotate(ax, task, key)
            ax.set_title(f"{_task_title(task)} — {name}", fontsize=10)
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel(key) if callable(ylabel) else ylabel)
            ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(title, fontsize=12)
    _legend(fig, colors, used, any_div)
    return _save(fig, path)


def _quality_key(runs_of_task: list["Run"]) -> Optional[str]:
    for key in ("eval_accuracy", "eval_bpb"):
        if any(r.has(key) for r in runs_of_task):
            return key
    return None


_QUALITY_LABEL = {"eval_accuracy": "held-out accuracy", "eval_bpb": "held-out bits per byte"}


def plot_curves(runs, colors, path: Path) -> Optional[Path]:
    rows = [("training loss", lambda t: "loss", "loss", False),
            ("held-out loss", lambda t: "eval_loss", "eval loss", False)]
    return _curve_figure(runs, colors, path, rows, "Loss over training (mean over seeds, band: min–max)")


def plot_quality(runs, colors, path: Path) -> Optional[Path]:
    groups = _groups(runs)
    keys = {t: _quality_key([r for g in groups[t].values() for r in g]) for t in groups}

    def annotate(ax, task, key):
        if key != "eval_accuracy":
            return
        pairs = {r.config.get("kv_pairs") for g in groups[task].values() for r in g}
        pairs.discard(None)
        if len(pairs) == 1:
            chance = 1.0 / pairs.pop()
            ax.axhline(chance, color="gray", ls=":", lw=1.2)
            ax.annotate(f"chance 1/P = {chance:.3g}", (0.01, chance), xycoords=("axes fraction", "data"),
                        va="bottom", fontsize=8, color="gray")
        ax.set_ylim(-0.02, 1.02)

    rows = [("held-out task metric", lambda t: keys.get(t), lambda k: _QUALITY_LABEL.get(k, k or ""), False)]
    out = _curve_figure(runs, colors, path, rows, "Held-out task metric over training", annotate)
    if out is None:
        return None
    return out


def plot_gain_training(runs, colors, path: Path) -> Optional[Path]:
    rows = [("forward Amax gain", lambda t: DIAG["gain_fwd"], r"$\max_i |\sum_j P_{ij}|$  (token mean)", True),
            ("backward Amax gain", lambda t: DIAG["gain_bwd"], r"$\max_j |\sum_i P_{ij}|$  (token mean)", True)]
    return _curve_figure(runs, colors, path, rows,
                         r"Composite gain of the whole stack $P = H_{L-1} \cdots H_0$ over training (log scale)",
                         _unit_line)


def _unit_line(ax, task, key):
    ax.axhline(1.0, color="gray", ls=":", lw=1)


def plot_harmonized(runs, colors, path: Path) -> Optional[Path]:
    harm = [r for r in runs if r.has(DIAG["scale"]) or r.has(DIAG["raw_gain"]) or r.has("harmonized_scale")]

    def scale_of(r):  # the loop logs the scale every step; the hook only at evaluations
        return r.series("harmonized_scale") if r.has("harmonized_scale") else r.series(DIAG["scale"])

    if not harm:
        return None
    groups = _groups(harm)
    tasks = list(groups)
    fig, axes = _new_figure(2, len(tasks))
    used = []
    for j, task in enumerate(tasks):
        ax_gain, ax_scale = axes[0][j], axes[1][j]
        values = []
        for label, group in groups[task].items():
            c = colors[label]
            values += _draw(ax_gain, label, c, [r.series(DIAG["applied_gain"]) for r in group])
            values += _draw(ax_gain, label, c, [r.series(DIAG["raw_gain"]) for r in group], linestyle="--")
            _draw(ax_scale, label, c, [scale_of(r) for r in group])
            used.append(label)
            targets = {r.config.get("harmonized", {}).get("target_gain") for r in group}
            targets.discard(None)
            for tg in targets:
                ax_gain.axhline(tg, color=c, ls=":", lw=1)
        _log_if_wide(ax_gain, values, force=True)
        ax_gain.set_title(f"{_task_title(task)} — applied (solid) vs raw (dashed) gain", fontsize=10)
        ax_gain.set_ylabel("forward Amax gain (token mean)")
        ax_scale.set_title(f"{_task_title(task)} — controller scale s", fontsize=10)
        ax_scale.set_ylabel("s")
        _log_if_wide(ax_scale, [v for r in harm for v in scale_of(r)[1]], ratio=10)
        for ax in (ax_gain, ax_scale):
            ax.set_xlabel("training step")
            ax.grid(True, alpha=0.3)
    extra = [Line2D([], [], color="black", lw=1.5, label="applied $H_{res}$"),
             Line2D([], [], color="black", lw=1.5, ls="--", label=r"raw $H_{raw} = I + \varepsilon\Theta$ (no control)"),
             Line2D([], [], color="black", lw=1, ls=":", label="target gain")]
    fig.suptitle("Harmonized HC: feedback control of the composite gain", fontsize=12)
    _legend(fig, colors, used, False, extra)
    return _save(fig, path)


# ----------------------------------------------------------------------------- per layer
def _profile_values(run: "Run", getter) -> Optional[list[float]]:
    if not run.diagnostics:
        return None
    try:
        values = getter(run.diagnostics)
    except (KeyError, TypeError, IndexError):
        return None
    if not isinstance(values, list):
        return None
    values = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan for v in values]
    return values if any(_finite(v) for v in values) else None


def _layer_figure(runs, colors, path: Path, panels: list[tuple[str, Callable, str]], title: str,
                  xlabel: str, log: bool, ylim=None, hline: Optional[float] = None) -> Optional[Path]:
    groups = _groups(runs)
    tasks = [t for t in groups if any(_profile_values(r, p[1]) for g in groups[t].values() for r in g
                                      for p in panels)]
    if not tasks:
        return None
    fig, axes = _new_figure(len(tasks), len(panels), width=5.4)
    used, any_div = [], False
    for i, task in enumerate(tasks):
        steps = sorted({r.diagnostics.get("step") for g in groups[task].values() for r in g
                        if r.diagnostics and isinstance(r.diagnostics.get("step"), int)})
        when = (f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}") if steps else "last"
        for j, (name, getter, ylabel) in enumerate(panels):
            ax, values = axes[i][j], []
            for label, group in groups[task].items():
                series = []
                for r in group:
                    v = _profile_values(r, getter)
                    if v and r.diverged:  # its own thin dashed line, outside the seed mean
                        ax.plot(range(len(v)), v, color=colors[label], lw=1, ls="--", alpha=0.8)
                        values += [y for y in v if _finite(y)]
                        any_div = True
                        used.append(label)
                    elif v:
                        series.append((list(range(len(v))), v))
                vals = _draw(ax, label, colors[label], series, marker="o") if series else []
                if vals:
                    used.append(label)
                values += vals
            if not values:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
            if hline is not None:
                ax.axhline(hline, color="gray", ls=":", lw=1)
            if log:
                _log_if_wide(ax, values, force=True)
            if ylim == "similarity" and values:
                lo = min(v for v in values if _finite(v))
                pad = max(0.02, 0.1 * (1.0 - lo))
                ax.set_ylim(max(-1.05, min(lo, 0.9) - pad), 1.0 + pad / 2)
            elif ylim:
                ax.set_ylim(*ylim)
            ax.set_title(f"{_task_title(task)} — {name}\n(last diagnostics, {when})", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="major", alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize=12)
    extra = [Line2D([], [], color="black", lw=1, ls="--", label="diverged run (its last diagnostics)")]
    _legend(fig, colors, used, False, extra if any_div else ())
    return _save(fig, path)


_STATE_AXIS = r"stream state $x_l$ ($x_0$: input of the first layer, $x_L$: output of the last)"


def plot_gain_profile(runs, colors, path: Path) -> Optional[Path]:
    panels = [(r"forward composites $H_l \cdots H_0$", lambda d: d["profile"]["forward"]["forward_amax"]["mean"],
               "forward Amax gain (token mean)"),
              (r"backward composites $H_{L-1} \cdots H_l$",
               lambda d: d["profile"]["backward"]["backward_amax"]["mean"],
               "backward Amax gain (token mean)")]
    return _layer_figure(runs, colors, path, panels, "Gain layer profile (log scale)",
                         r"hyper-connected layer $l$", log=True, hline=1.0)


def plot_grad_norms(runs, colors, path: Path) -> Optional[Path]:
    panels = [(r"$\|\partial L / \partial x_l\|_F$ per stream state", lambda d: d["grad_norms"],
               r"$\|\partial L / \partial x_l\|_F$")]
    return _layer_figure(runs, colors, path, panels, "Stream gradient norms (log scale)",
                         _STATE_AXIS, log=True)


def plot_similarity(runs, colors, path: Path) -> Optional[Path]:
    panels = [("stream similarity", lambda d: d["similarity"], "mean off-diagonal cosine")]
    return _layer_figure(runs, colors, path, panels, "Stream similarity (→ 1: streams collapse)",
                         _STATE_AXIS, log=False,
                         ylim="similarity")


_PLOTS = {
    "curves": (plot_curves, "no run has loss values in metrics.jsonl"),
    "quality": (plot_quality, "no run has eval_accuracy or eval_bpb in metrics.jsonl"),
    "gain_training": (plot_gain_training, "no run has diag/gain_* metrics (diagnostics off?)"),
    "gain_profile": (plot_gain_profile, "no run has a diagnostics/step_*.json file"),
    "grad_norms": (plot_grad_norms, "no run has a diagnostics/step_*.json file"),
    "similarity": (plot_similarity, "no diagnostics file has stream similarities (n = 1 only?)"),
    "harmonized": (plot_harmonized, "no harmonized run"),
}


def make_figures(runs: Sequence["Run"], fig_dir: Path) -> dict[str, Figure]:
    """Draw every figure into ``fig_dir``; one :class:`Figure` per key of FIGURE_KEYS."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    colors = variant_colors([r.label for r in runs])
    out = {}
    for key in FIGURE_KEYS:
        fn, why = _PLOTS[key]
        target = fig_dir / f"{key}.png"
        try:
            path = fn(runs, colors, target)
        except Exception as e:  # one broken figure must not lose the whole report
            plt.close("all")
            out[key] = Figure(key, None, f"figure failed: {type(e).__name__}: {e}")
            continue
        if path is None and target.exists():
            target.unlink()  # a stale figure from an earlier report
        out[key] = Figure(key, path, "" if path else why)
    return out
