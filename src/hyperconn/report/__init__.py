"""Markdown + PNG reports from training run directories.

    >>> from pathlib import Path
    >>> from hyperconn.report import write_report
    >>> write_report([Path("runs/compare")], Path("runs/compare"))   # doctest: +SKIP
    PosixPath('runs/compare/report.md')

A *run directory* is any directory holding ``metrics.jsonl`` (one JSON object per line:
``step``, ``loss``, ``eval_loss``, ``eval_accuracy`` or ``eval_bpb``, …, and the
stability scalars as ``diag/<name>``), usually next to ``config.json`` (a
``TrainConfig``: ``task``, ``seed``, ``model.connection.variant``), ``summary.json``
(``status``, final metrics, ``num_params``, ``tokens_per_s``) and
``diagnostics/step_XXXXXXX.json`` files written by
:class:`hyperconn.diagnostics.StabilityHook`. Runs are found by searching the given
directories recursively, so a single run, a comparison directory
(``<out>/<task>/<variant>/seed<k>/``) or several of them can be reported together.

Command line: ``hyperconn report DIR... [--out OUT]`` (see :mod:`.cli`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .._io import atomic_write_text, read_json, read_jsonl

__all__ = ["Run", "find_runs", "load_run", "write_report", "group_by_label", "DIAG_PREFIX", "TASK_TITLES"]

DIAG_PREFIX = "diag/"
TASK_TITLES = {"kv": "key-value retrieval", "bytes": "byte-level LM"}
FAILED_STATUSES = ("diverged", "failed", "error", "nan")


def _read_json(path: Path) -> Optional[dict]:
    data = read_json(path)
    return data if isinstance(data, dict) else None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return read_jsonl(path)  # lines cut short by a crash or a concurrent writer are skipped
    except OSError:
        return []


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
            return float(v.replace("inity", ""))
        return None
    return float(v)


@dataclass
class Run:
    """Everything the report reads from one run directory."""

    path: Path
    task: str
    variant: str
    seed: Optional[int]
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    diagnostics: Optional[dict] = None      # the last diagnostics/step_*.json
    label: str = ""                          # the variant name shown in figures and tables
    group: str = ""                          # runs compared side by side (a panel, a table)

    def __post_init__(self):
        self.label = self.label or self.variant
        self.group = self.group or self.task

    @property
    def panel(self) -> str:
        """Title of this run's group: ``"kv: key-value retrieval"`` or, for a group
        named differently from its task, ``"depth24 (kv: key-value retrieval)"``."""
        task = f"{self.task}: {TASK_TITLES[self.task]}" if self.task in TASK_TITLES else self.task
        return task if self.group == self.task else f"{self.group} ({task})"

    @property
    def status(self) -> str:
        status = self.summary.get("status")
        if isinstance(status, str) and status:
            return status
        return "no summary" if not self.summary else "unknown"

    @property
    def diverged(self) -> bool:
        if self.status.lower() in FAILED_STATUSES:
            return True
        if any(r.get("diverged") is True for r in self.metrics):  # the loop's last line
            return True
        losses = [_number(r.get("loss")) for r in self.metrics if "loss" in r]
        return any(v is not None and not math.isfinite(v) for v in losses)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of ``key`` over metrics.jsonl; rows without it are skipped.
        ``key`` may be given with or without the ``diag/`` prefix for stability metrics."""
        keys = (key,) if not key.startswith(DIAG_PREFIX) else (key, key[len(DIAG_PREFIX):])
        steps, values = [], []
        for row in self.metrics:
            step = _number(row.get("step"))
            value = next((_number(row[k]) for k in keys if k in row), None)
            if step is None or value is None:
                continue
            steps.append(step)
            values.append(value)
        return steps, values

    def has(self, key: str) -> bool:
        return bool(self.series(key)[0])

    def final(self, key: str) -> Optional[float]:
        """Final value of ``key``: summary.json first (top level, then any nested dict such
        as ``final``), else the last value in metrics.jsonl."""
        value = _lookup(self.summary, key)
        if value is None:
            steps, values = self.series(key)
            value = values[-1] if values else None
        return value

    @property
    def last_step(self) -> Optional[float]:
        steps = [_number(r.get("step")) for r in self.metrics]
        steps = [s for s in steps if s is not None]
        return max(steps) if steps else None


def group_by_label(runs: Sequence[Run], key: Callable[[Run], str] = lambda r: r.group) -> dict[str, dict[str, list[Run]]]:
    """``{key(run): {run.label: [runs]}}``, both levels in the runs' order (``key``: the
    run's group by default; the figures use its panel title). Never raises."""
    out: dict[str, dict[str, list[Run]]] = {}
    for r in runs:
        out.setdefault(key(r), {}).setdefault(r.label, []).append(r)
    return out


def _lookup(data: dict, key: str) -> Optional[float]:
    if key in data:
        return _number(data[key])
    for v in data.values():
        if isinstance(v, dict) and key in v:
            return _number(v[key])
    return None


def _variant_of(config: dict, path: Path) -> str:
    conn = config.get("model", {}).get("connection", {}) if isinstance(config.get("model"), dict) else {}
    variant = conn.get("variant") if isinstance(conn, dict) else None
    if isinstance(variant, str) and variant:
        return variant
    if isinstance(config.get("variant"), str):
        return config["variant"]
    parent = path.parent.name if re.fullmatch(r"seed\d+", path.name) else path.name
    return parent or "run"


def _seed_of(config: dict, path: Path) -> Optional[int]:
    seed = config.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed
    m = re.fullmatch(r"seed(\d+)", path.name)
    return int(m.group(1)) if m else None


def _group_of(path: Path, variant: str, task: str) -> str:
    """``<group>/<variant>/seed<k>/`` (the compare layout) → group; otherwise the task."""
    if re.fullmatch(r"seed\d+", path.name) and path.parent.name.startswith(variant) \
            and path.parent.parent.name:
        return path.parent.parent.name
    return task


def natural_key(text: str):
    """Sort ``depth8`` before ``depth12``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _last_diagnostics(path: Path) -> Optional[dict]:
    files = sorted((path / "diagnostics").glob("step_*.json"))
    for f in reversed(files):  # the newest readable one
        data = _read_json(f)
        if data is not None:
            return data
    return None


def load_run(path: Path) -> Run:
    """Read one run directory (missing or unreadable files give empty fields)."""
    path = Path(path)
    config = _read_json(path / "config.json")
    if config is None and (path / "config.json").exists():
        # Never label a run by its directory name when its record is unreadable.
        raise ValueError(f"{path / 'config.json'} cannot be read as JSON: fix or remove that run directory")
    config = config if isinstance(config, dict) else {}
    task = config.get("task") if isinstance(config.get("task"), str) else "task"
    variant = _variant_of(config, path)
    return Run(path=path, task=task, variant=variant, seed=_seed_of(config, path),
               config=config, metrics=_read_jsonl(path / "metrics.jsonl"),
               summary=_read_json(path / "summary.json") or {}, diagnostics=_last_diagnostics(path),
               group=_group_of(path, variant, task))


def find_runs(dirs: Sequence[Path]) -> list[Run]:
    """Every run under ``dirs`` (each a run directory or a tree of them), sorted by
    task, label and seed; a directory reached twice is read once."""
    seen, runs = set(), []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise FileNotFoundError(f"dirs: {d} does not exist")
        candidates = [d] if (d / "metrics.jsonl").is_file() else []
        candidates += sorted(p.parent for p in d.rglob("metrics.jsonl") if p.parent != d)
        for c in candidates:
            key = c.resolve()
            if key not in seen:
                seen.add(key)
                runs.append(load_run(c))
    _assign_labels(runs)
    runs.sort(key=lambda r: (natural_key(r.group), r.task, natural_key(r.label),
                             r.seed if r.seed is not None else -1, str(r.path)))
    return runs


def _connection_key(run: Run) -> str:
    model = run.config.get("model") if isinstance(run.config.get("model"), dict) else {}
    conn = dict(model.get("connection") or {})
    return json.dumps(conn, sort_keys=True, default=str)


def _assign_labels(runs: list[Run]) -> None:
    """Label = variant, unless runs of one group share a variant but differ in their
    connection settings or learning rate (a sweep's ``<variant>-lr<lr>``): then the
    variant-level directory name tells them apart."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.group, r.task, r.variant), []).append(r)
    for group in groups.values():
        if len({(_connection_key(r), r.config.get("lr")) for r in group}) <= 1:
            continue
        for r in group:
            name = r.path.parent.name if re.fullmatch(r"seed\d+", r.path.name) else r.path.name
            r.label = name if name.startswith(r.variant) else f"{r.variant} ({name})"


def write_report(dirs: Sequence[Path], out: Path) -> Path:
    """Write ``out/report.md`` and its figures (``out/figures/*.png``) for every run
    found under ``dirs``; returns the path of ``report.md``.

    Raises:
        FileNotFoundError: if a directory does not exist.
        ValueError: if no run directory (one holding ``metrics.jsonl``) is found.
    """
    from .figures import make_figures
    from .markdown import render
    from .stability import plot_depth

    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise ValueError("dirs: expected at least one run or comparison directory")
    runs = find_runs(dirs)
    if not runs:
        raise ValueError(f"dirs: no run directory (with metrics.jsonl) under {', '.join(map(str, dirs))}")
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures = make_figures(runs, out / "figures")
    depth_png = out / "figures" / "depth.png"
    depth_figure = plot_depth(runs, depth_png)
    if depth_figure is None:
        depth_png.unlink(missing_ok=True)  # a stale figure from an earlier report
    path = out / "report.md"
    atomic_write_text(path, render(runs, figures, dirs, out, depth_figure))
    return path
