"""Run a preset's variants × seeds one after another and summarise them.

Layout of a comparison directory::

    DIR/compare.json                 preset name, seeds, list of runs (written first)
    DIR/<group>/<variant>/seed<k>/   one training run directory each (see hyperconn.train)
    DIR/summary.json                 per-run results and the per-(group, variant) table
    DIR/summary.md                   the same table in Markdown

Restarting the same command continues: runs whose ``summary.json`` says "finished" or
"diverged" with the same configuration are skipped, an interrupted run resumes from
its checkpoint, and a run whose configuration changed starts over.

A group with a learning-rate sweep (``RunGroup.lrs``) runs in two stages: every lr on
the first seed (``DIR/<group>-sweep/<variant>-lr<lr>/seed<k>/``), then each variant at
its best lr on every seed (``DIR/<group>/<variant>/seed<k>/``; the first seed's run is
copied from the sweep). ``DIR/sweep.json`` records every lr's result and the choice.

``jobs`` > 1 runs that many training runs at once, each in its own process (give each
run ``threads=1``, as the shipped presets do, and no more jobs than cores).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .._device import resolve_device
from .._io import atomic_write_text, read_json, write_json
from ..train.checkpoint import CheckpointError
from ..train.config import TrainConfig, with_overrides
from ..train.loop import train
from ..train.run_dir import RunLock, prepare_out_dir
from .preset_types import expand_best
from .presets import Job, Preset, expand, get_preset

__all__ = ["run_compare", "summarize", "DONE"]

DONE = ("finished", "diverged")
# Settings that do not change what a run computes.
_COSMETIC = ("out_dir", "quiet", "resume", "stop_after", "tensorboard", "allow_config_change")


def _same_config(saved: Optional[dict], config: TrainConfig) -> bool:
    if not isinstance(saved, dict):
        return False
    try:  # settings added since the run was saved take their defaults
        saved = TrainConfig.from_dict(saved).to_dict()
    except ValueError:
        return False
    now = config.to_dict()
    return all(saved.get(k) == now.get(k) for k in set(saved) | set(now) if k not in _COSMETIC)


def _mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(jobs: Sequence[Job], out_dir: Path, failures: Optional[Mapping[str, str]] = None) -> dict:
    """Collect every job's ``summary.json`` into per-run rows and a per-(group, variant) table."""
    failures = failures or {}
    runs, table = [], []
    for job in jobs:
        run_dir = Path(job.config.out_dir)
        s = read_json(run_dir / "summary.json") or {}
        status = "failed" if job.label in failures else s.get("status", "missing")
        final = s.get("final") or {}
        runs.append({
            "group": job.group, "task": job.config.task, "variant": job.variant, "seed": job.seed,
            "lr": job.config.lr,
            "run_dir": str(run_dir.relative_to(out_dir)) if run_dir.is_relative_to(out_dir) else str(run_dir),
            "status": status, "error": failures.get(job.label),
            "metric": job.config.metric, "metric_value": s.get("metric_value"),
            "steps": s.get("steps"), "diverged_step": s.get("diverged_step"),
            "tokens_per_s": s.get("tokens_per_s"), "num_params": s.get("num_params"),
            "wall_time_s": s.get("wall_time_s"), "gain_fwd_max": final.get("diag/gain_fwd_max"),
            "connection": s.get("connection") or job.config.model.connection.describe(),
        })
    keys = list(dict.fromkeys((r["group"], r["variant"], r["lr"]) for r in runs))
    for group, variant, lr in keys:
        rs = [r for r in runs if r["group"] == group and r["variant"] == variant and r["lr"] == lr]
        finished = [r for r in rs if r["status"] == "finished"]
        mean, std = _mean_std([r["metric_value"] for r in finished])
        tps, _ = _mean_std([r["tokens_per_s"] for r in rs])
        gain, _ = _mean_std([r["gain_fwd_max"] for r in finished])
        table.append({
            "group": group, "task": rs[0]["task"], "variant": variant, "lr": lr, "connection": rs[0]["connection"],
            "metric": rs[0]["metric"], "mean": mean, "std": std, "runs": len(rs),
            "finished": len(finished), "diverged": sum(r["status"] == "diverged" for r in rs),
            "failed": sum(r["status"] in ("failed", "missing", "stopped") for r in rs),
            "tokens_per_s": tps, "num_params": rs[0]["num_params"], "gain_fwd_max": gain,
        })
    return {"runs": runs, "table": table}


_SHORT = {"eval_accuracy": "acc (higher better)", "eval_bpb": "bpb (lower better)"}


def _fmt_metric(row: dict) -> str:
    if row["mean"] is None:
        return "-"
    return f"{row['mean']:.4f} ± {row['std']:.4f}"


def _fmt_num(v, spec) -> str:
    return "-" if v is None else format(v, spec)


_HEADERS = ("task", "variant", "lr", "metric", "mean ± std", "ok", "diverged", "failed", "gain", "tokens/s", "params")


def _table_cells(row: dict) -> tuple[str, ...]:
    return (row["group"], row["variant"], _fmt_num(row.get("lr"), "g"), _SHORT.get(row["metric"], row["metric"]),
            _fmt_metric(row),
            f"{row['finished']}/{row['runs']}", str(row["diverged"]), str(row["failed"]),
            _fmt_num(row["gain_fwd_max"], ".3g"), _fmt_num(row["tokens_per_s"], ",.0f"),
            _fmt_num(row["num_params"], ","))


def to_markdown(summary: dict) -> str:
    lines = [f"# Comparison `{summary['preset']}`", "", summary.get("description", ""), "",
             f"Seeds: {summary['seeds']}. Metric: held-out accuracy on kv, bits per byte on bytes; "
             f"mean ± sample std over the seeds that finished (ok = finished/runs). `gain`: "
             f"forward Amax gain of the composite transport (token max) at the last evaluation. "
             f"tokens/s: training steps only. `<group>-sweep` rows: one lr each on the first seed; "
             f"`<group>` rows: each variant at its best lr of that sweep (see sweep.json).", "",
             "| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
    lines += ["| " + " | ".join(_table_cells(r)) + " |" for r in summary["table"]]
    failed = [r for r in summary["runs"] if r["status"] not in DONE]
    if failed:
        lines += ["", "Runs not finished:", ""]
        lines += [f"- `{r['run_dir']}`: {r['status']}" + (f" ({r['error']})" if r.get("error") else "")
                  for r in failed]
    return "\n".join(lines) + "\n"


def _print_table(summary: dict, console) -> None:
    from rich.table import Table
    t = Table(title=f"hyperconn compare: {summary['preset']}")
    for h in _HEADERS:
        t.add_column(h, justify="left" if h in ("task", "variant", "metric") else "right")
    for r in summary["table"]:
        t.add_row(*_table_cells(r))
    console.print(t)


def _write_report(out_dir: Path, console) -> None:
    try:
        from ..report import write_report  # written by the report module; optional here
    except ImportError:
        return
    try:
        path = write_report([out_dir], out_dir)
        console.print(f"report: {path if path else out_dir}")
    except Exception as e:  # noqa: BLE001 - the comparison itself is already saved
        print(f"warning: report failed: {type(e).__name__}: {e}", file=sys.stderr)


def run_compare(preset: Union[str, Preset], out_dir, seeds: Optional[Sequence[int]] = None,
                quiet: bool = False, overrides: Optional[Mapping[str, Any]] = None,
                variants: Optional[Sequence[str]] = None, jobs: int = 1) -> dict:
    """Run every job of ``preset`` into ``out_dir`` (skipping finished ones) and summarise.

    Args:
        preset: a preset name (see :data:`~hyperconn.experiments.presets.PRESETS`) or object.
        out_dir: the comparison directory.
        seeds: replaces the preset's seeds.
        quiet: no progress bars or tables (the one-line-per-run progress is still printed).
        overrides: dotted TrainConfig overrides applied to every run (e.g. ``{"device": "cpu"}``).
        variants: replaces every group's variants (registered names, e.g. a user's own
            variant imported with ``hyperconn --import``); checked like the preset's.
        jobs: training runs at once, each in its own process (1: one after another in
            this process).

    Returns the summary dict (also written to ``out_dir/summary.json``). A run that raises
    is recorded as "failed" and the comparison goes on; ``summary["failed"]`` counts them.

    Raises:
        ConfigError: (field ``jobs``) for jobs < 1; for an invalid preset, seed, variant
            or override, before anything runs.
    """
    from rich.console import Console

    from ..errors import ConfigError

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError("jobs", f"expected a positive integer, got {jobs!r}")
    console = Console(quiet=quiet)
    if not console.is_terminal:
        console = Console(quiet=quiet, width=140)  # a log file: don't squeeze the table into 80 columns
    p = get_preset(preset) if isinstance(preset, str) else preset
    if variants is not None:
        p = dataclasses.replace(p, groups=tuple(dataclasses.replace(g, variants=tuple(variants))
                                                for g in p.groups))
    out_dir = Path(out_dir)
    first = expand(p, out_dir, seeds, overrides)
    for device in {j.config.device for j in first}:
        resolve_device(device)  # ConfigError now rather than N failed runs
    prepare_out_dir(out_dir, field="out")
    # One comparison per directory at a time (each run also locks its own directory).
    with RunLock(out_dir, field="out"):
        return _run_stages(p, first, out_dir, seeds, overrides, quiet, console, jobs)


def _higher_is_better(metric: str) -> bool:
    return metric == "eval_accuracy"


def choose_lrs(jobs: Sequence[Job]) -> tuple[dict, list[dict]]:
    """The best lr per (group, variant) of a sweep's runs, by held-out metric (a run
    that diverged or failed ranks last; ties go to the smaller lr), and one row per run.
    A (group, variant) none of whose lrs finished gets no entry."""
    rows, best = [], {}
    for job in jobs:
        s = read_json(Path(job.config.out_dir) / "summary.json") or {}
        value = s.get("metric_value") if s.get("status") == "finished" else None
        group = job.group[: -len("-sweep")]
        rows.append({"group": group, "variant": job.variant, "lr": job.lr, "seed": job.seed,
                     "status": s.get("status", "missing"), "metric": job.config.metric, "metric_value": value})
    for (group, variant) in dict.fromkeys((r["group"], r["variant"]) for r in rows):
        ok = [r for r in rows if r["group"] == group and r["variant"] == variant
              and r["metric_value"] is not None and math.isfinite(r["metric_value"])]
        if ok:
            sign = -1.0 if _higher_is_better(ok[0]["metric"]) else 1.0
            best[group, variant] = min(ok, key=lambda r: (sign * r["metric_value"], r["lr"]))["lr"]
    for r in rows:
        r["best"] = best.get((r["group"], r["variant"])) == r["lr"]
    return best, rows


def _copy_sweep_run(first: Sequence[Job], job: Job) -> None:
    """The best lr's run of the first seed is the sweep's own run: copy its directory
    (same configuration and seed, so the same run) instead of training it again."""
    src = next((j for j in first if j.lr is not None and j.group == f"{job.group}-sweep" and j.variant == job.variant
                and j.seed == job.seed and j.lr == job.config.lr), None)
    dst = Path(job.config.out_dir)
    if src is None or (dst / "summary.json").exists():
        return
    done = read_json(Path(src.config.out_dir) / "summary.json") or {}
    if done.get("status") not in DONE:
        return
    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src.config.out_dir, tmp, ignore=shutil.ignore_patterns("*.lock", "lock"))
    config = read_json(tmp / "config.json")
    if isinstance(config, dict):  # the run's own record names its new directory
        config["out_dir"] = str(dst)
        write_json(tmp / "config.json", config)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def code_version() -> dict:
    """``{"version": hyperconn.__version__, "commit": short hash or None, "dirty": bool or None}``
    of the library that runs (git, when it is a checkout), recorded in compare.json."""
    import subprocess

    from .. import __version__
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"version": __version__, "commit": commit, "dirty": dirty}


def _run_stages(p: Preset, first: list, out_dir: Path, seeds, overrides, quiet: bool, console, jobs: int) -> dict:
    used_seeds = list(p.seeds if seeds is None else seeds)
    start = time.perf_counter()
    code = code_version()

    def record(runs: Sequence[Job]) -> None:  # compare.json: written first, again once the sweep has chosen
        write_json(out_dir / "compare.json", {"preset": p.name, "description": p.description, "seeds": used_seeds,
                                              "code": code, "jobs": jobs,
                                              "runs": [{"label": j.label, "config": j.config.to_dict()} for j in runs]})

    record(first)
    failures = _execute(first, quiet, jobs, start)
    all_jobs = list(first)
    swept = [j for j in first if j.lr is not None]
    if swept:
        best, rows = choose_lrs(swept)
        write_json(out_dir / "sweep.json", {"best_lr": [{"group": g, "variant": v, "lr": lr}
                                                        for (g, v), lr in best.items()], "runs": rows})
        second = expand_best(p, out_dir, best, seeds, overrides)
        for job in second:
            _copy_sweep_run(first, job)
        if best:
            print("best lr: " + ", ".join(f"{g}/{v} {lr:g}" for (g, v), lr in best.items()), flush=True)
        failures.update(_execute(second, quiet, jobs, start))
        all_jobs += second
        record(all_jobs)
    summary = {"preset": p.name, "description": p.description, "seeds": used_seeds,
               "out_dir": str(out_dir), **summarize(all_jobs, out_dir, failures),
               "failed": len(failures), "wall_time_s": time.perf_counter() - start}
    write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "summary.md", to_markdown(summary))
    if not quiet:
        _print_table(summary, console)
    print(f"compare {p.name}: {len(all_jobs)} runs in {summary['wall_time_s']:.0f}s -> {out_dir / 'summary.md'}",
          flush=True)
    _write_report(out_dir, console)
    return summary


def _pending(jobs: Sequence[Job]) -> list[tuple[Job, bool]]:
    """(job, resume) for every job not already done with the same configuration."""
    todo = []
    for job in jobs:
        run_dir = Path(job.config.out_dir)
        same = _same_config(read_json(run_dir / "config.json"), job.config)
        done = read_json(run_dir / "summary.json") or {}
        if same and done.get("status") in DONE:
            print(f"{job.label}: {done['status']} already, skipped", flush=True)
            continue
        todo.append((job, same))
    return todo


def _train_one(config: dict, label: str, quiet: bool) -> tuple[str, Optional[str]]:
    """Train one run (in this process or a worker); (label, error or None)."""
    cfg = TrainConfig.from_dict(config)
    try:
        s = train(cfg)
    except (CheckpointError, RuntimeError, ValueError, OSError) as e:
        print(f"{label}: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return label, f"{type(e).__name__}: {e}"
    if quiet:
        value = s.get("metric_value")
        shown = f"{s['metric']} {value:.4f}" if value is not None else ""
        print(f"{label}: {s['status']} {shown} ({s['wall_time_s']:.1f}s)".rstrip(), flush=True)
    return label, None


def _execute(jobs: Sequence[Job], quiet: bool, workers: int, start: float) -> dict[str, str]:
    todo = _pending(jobs)
    failures: dict[str, str] = {}
    n = len(todo)
    if workers == 1 or n <= 1:
        for i, (job, same) in enumerate(todo, 1):
            run_dir = Path(job.config.out_dir)
            note = "" if same or not (run_dir / "config.json").exists() else " (config changed: starting over)"
            print(f"[{i}/{n}] {job.label}{note}  (compare elapsed {time.perf_counter() - start:.0f}s)", flush=True)
            cfg = with_overrides(job.config, {"quiet": quiet, "resume": same})
            label, error = _train_one(cfg.to_dict(), job.label, quiet)
            if error:
                failures[label] = error
        return failures
    import concurrent.futures as cf
    import subprocess

    def run(item):
        i, (job, same) = item
        cfg = with_overrides(job.config, {"quiet": True, "resume": same})
        label = f"[{i}/{n}] {job.label}"
        print(f"{label}: started  (compare elapsed {time.perf_counter() - start:.0f}s)", flush=True)
        # A fresh interpreter per run (hyperconn.experiments.worker): nothing of this
        # process (its __main__, its torch threads) is shared or re-imported.
        proc = subprocess.run([sys.executable, "-m", "hyperconn.experiments.worker", label,
                               json.dumps(cfg.to_dict())], stderr=subprocess.PIPE, text=True)
        if proc.stderr:
            sys.stderr.write(proc.stderr)
        if proc.returncode == 0:
            return job, None
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        return job, last or f"worker exited with status {proc.returncode}"

    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        for job, error in pool.map(run, enumerate(todo, 1)):
            if error:
                failures[job.label] = error
    return failures
