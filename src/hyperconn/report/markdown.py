"""The text of ``report.md``: summary tables, figures with captions, runs, notes."""

from __future__ import annotations

import math
import os
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from . import group_by_label
from .figures import DIAG, Figure
from .findings import findings_section
from .stability import mechanism_section, stability_section

if TYPE_CHECKING:  # pragma: no cover
    from . import Run

__all__ = ["render", "SECTIONS", "fmt_mean_std"]

SECTIONS = ("Summary", "Training curves", "Composite gain over training", "Gain layer profile",
            "Stream gradient norms", "Stream similarity", "Stability and cost", "Runs", "Notes")

_CAPTIONS = {
    "curves": "Training loss (mean since the previous log line) and held-out loss per variant. "
              "Line: mean over seeds; band: min–max over seeds; ✕: a run that diverged.",
    "quality": "Held-out accuracy (key-value retrieval; dotted: chance 1/P) or bits per byte "
               "(byte-level LM) per variant.",
    "gain_training": "Forward (max |row sum|) and backward (max |column sum|) Amax gain of the composite "
                     "transport of all hyper-connected layers, token mean, at every evaluation. "
                     "1 = neither amplifies nor damps; unconstrained HC is expected to grow.",
    "harmonized": "Harmonized HC: gain of the applied composite (solid) vs of the raw transports "
                  "H_raw = I + εΘ without the controller (dashed), and the controller scale s.",
    "gain_profile": "Left: forward composites H_l⋯H_0 (forward Amax gain of the signal reaching layer l+1). "
                    "Right: backward composites H_{L−1}⋯H_l (backward Amax gain of the gradient reaching "
                    "x_l from the top). From each run's last diagnostics file.",
    "grad_norms": "‖∂L/∂x_l‖_F of every stream state on one held-out batch: flat = gradients neither "
                  "vanish nor explode with depth.",
    "similarity": "Mean off-diagonal cosine similarity of the n streams of a token, averaged over tokens. "
                  "x_0 is n copies of the embedding (similarity 1); staying near 1 means the streams "
                  "collapsed into one. The y axis is zoomed to the data. Undefined for n = 1.",
}


def _f(v: Optional[float], digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.{digits}g}"


def fmt_mean_std(values: Sequence[Optional[float]], digits: int = 4) -> str:
    """``mean ± std`` (sample std) of the finite values; one value alone; ``–`` if none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return _f(vals[0], digits)
    return f"{_f(statistics.fmean(vals), digits)} ± {_f(statistics.stdev(vals), 2)}"


def _count(n: Optional[float]) -> str:
    if n is None or not math.isfinite(n):
        return "–"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def _rel(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:  # another drive (Windows)
        return str(path)


def _tasks(runs) -> dict[str, dict[str, list]]:
    """{group: {label: runs}} in the runs' (natural) order."""
    return group_by_label(runs)


def _quality_key(runs) -> Optional[str]:
    for key in ("eval_accuracy", "eval_bpb"):
        if any(r.final(key) is not None for r in runs):
            return key
    return None


def _diag_final(run, key: str) -> Optional[float]:
    """Last value of a stability scalar: metrics.jsonl (diag/…), else the diagnostics file."""
    steps, values = run.series(key)
    if values:
        return values[-1]
    short = key[len("diag/"):] if key.startswith("diag/") else key
    scalars = (run.diagnostics or {}).get("scalars") or {}
    v = scalars.get(short)
    return float(v) if isinstance(v, (int, float)) else None


def _tokens_per_s(run) -> Optional[float]:
    v = run.final("tokens_per_s")
    if v is None:
        _, values = run.series("tokens_per_s")
        values = [x for x in values if math.isfinite(x)]
        v = statistics.fmean(values) if values else None
    return v


def _summary_section(runs) -> list[str]:
    lines = ["## Summary", ""]
    lines.append("Final values, mean ± sample std over the seeds that did **not** diverge; "
                 "*diverged* counts runs whose status is diverged/failed or whose loss became "
                 "non-finite. Gain and gradient ratio are the last diagnostics of each run "
                 "(composite forward Amax gain, token mean; ‖∂L/∂x_0‖ / ‖∂L/∂x_L‖).")
    lines.append("")
    for name, groups in _tasks(runs).items():
        all_runs = [r for g in groups.values() for r in g]
        qkey = _quality_key(all_runs)
        qname = {"eval_accuracy": "eval accuracy ↑", "eval_bpb": "eval bpb ↓"}.get(qkey, "eval metric")
        tasks = sorted({r.task for r in all_runs})
        heading = f"Task `{name}`" if tasks == [name] else \
            f"`{name}` (task {', '.join(f'`{t}`' for t in tasks)})"
        lines += [f"### {heading}", ""]
        head = ["variant", "seeds", "diverged", "train loss", "eval loss", qname, "composite gain",
                "grad ratio", "tokens/s", "params"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for label, group in sorted(groups.items()):
            ok = [r for r in group if not r.diverged]
            div = len(group) - len(ok)
            params = {r.final("num_params") for r in group} - {None}
            row = [
                f"`{label}`", str(len(group)), f"**{div}**" if div else "0",
                fmt_mean_std([r.final("loss") for r in ok]),
                fmt_mean_std([r.final("eval_loss") for r in ok]),
                fmt_mean_std([r.final(qkey) for r in ok]) if qkey else "–",
                fmt_mean_std([_diag_final(r, DIAG["gain_fwd"]) for r in ok], 3),
                fmt_mean_std([_diag_final(r, "diag/grad_ratio") for r in ok], 3),
                _count(statistics.fmean(t)) if (t := [v for v in map(_tokens_per_s, group) if v]) else "–",
                " / ".join(_count(p) for p in sorted(params)) if params else "–",
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _figure_section(title: str, figs: Sequence[Figure], out: Path, notes: list[str]) -> list[str]:
    lines = [f"## {title}", ""]
    for fig in figs:
        if fig.path is not None:
            lines += [f"![{title}]({_rel(fig.path, out)})", "", _CAPTIONS.get(fig.key, ""), ""]
        elif fig.key != "harmonized":
            msg = f"*Figure skipped: {fig.note}.*"
            lines += [msg, ""]
            notes.append(f"{title}: figure skipped ({fig.note}).")
    return lines


def _runs_section(runs, out: Path) -> list[str]:
    lines = ["## Runs", "", "| group | task | variant | seed | status | last step | directory |",
             "|---|---|---|---:|---|---:|---|"]
    for r in runs:
        status = f"**{r.status} (diverged)**" if r.diverged and "diverg" not in r.status else \
            (f"**{r.status}**" if r.diverged else r.status)
        seed = "–" if r.seed is None else str(r.seed)
        last = _f(r.last_step, 8) if r.last_step is not None else "–"
        lines.append(f"| {r.group} | {r.task} | `{r.label}` | {seed} | {status} | {last} | `{_rel(r.path, out)}` |")
    lines.append("")
    return lines


def render(runs: Sequence["Run"], figures: dict[str, Figure], dirs: Sequence[Path], out: Path,
           depth_figure: Optional[Path] = None) -> str:
    """The markdown of the report; figure paths are written relative to ``out``."""
    out = Path(out)
    notes: list[str] = []
    tasks = sorted({r.task for r in runs})
    labels = sorted({r.label for r in runs})
    n_div = sum(r.diverged for r in runs)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# hyperconn report", "",
        f"{len(runs)} run(s) — task(s): {', '.join(f'`{t}`' for t in tasks)}; "
        f"variant(s): {', '.join(f'`{v}`' for v in labels)}; diverged: {n_div}. "
        f"Generated {when} from {', '.join(f'`{_rel(Path(d), out)}`' for d in dirs)}.", "",
        "Definitions follow docs/design.md §2 and `docs/diagnostics.md`: the composite transport of "
        "layers a..b is P = H_b⋯H_a; forward Amax gain = max_i |Σ_j P_ij|, backward = max_j |Σ_i P_ij|.",
        "",
    ]
    lines += findings_section(runs)
    lines += _summary_section(runs)
    lines += _figure_section("Training curves", [figures["curves"], figures["quality"]], out, notes)
    lines += _figure_section("Composite gain over training", [figures["gain_training"], figures["harmonized"]],
                             out, notes)
    lines += _figure_section("Gain layer profile", [figures["gain_profile"]], out, notes)
    lines += _figure_section("Stream gradient norms", [figures["grad_norms"]], out, notes)
    lines += _figure_section("Stream similarity", [figures["similarity"]], out, notes)
    lines += stability_section(runs, depth_figure, out)
    lines += mechanism_section(runs)
    lines += _runs_section(runs, out)

    no_diag = [r for r in runs if r.diagnostics is None]
    if no_diag and len(no_diag) < len(runs):
        notes.append(f"{len(no_diag)} run(s) have no diagnostics files and are missing from the per-layer "
                     "figures: " + ", ".join(f"`{_rel(r.path, out)}`" for r in no_diag) + ".")
    if n_div:
        notes.append(f"{n_div} run(s) diverged; they are excluded from the summary means and marked ✕ "
                     "in the figures: " + ", ".join(f"`{_rel(r.path, out)}`" for r in runs if r.diverged) + ".")
    unfinished = [r for r in runs if r.status in ("running", "no summary", "stopped")]
    if unfinished:
        notes.append(f"{len(unfinished)} run(s) have not finished (no summary, running or stopped); their "
                     "last logged values are used.")
    one_seed = sorted({r.label for r in runs} - {lab for g in _tasks(runs).values()
                                                 for lab, rs in g.items() if len(rs) > 1})
    if one_seed:
        notes.append("Single seed (no spread shown) for: " + ", ".join(f"`{v}`" for v in one_seed) + ".")
    lines += ["## Notes", ""]
    lines += [f"- {n}" for n in notes] if notes else ["- Nothing missing."]
    lines.append("")
    return "\n".join(lines)
