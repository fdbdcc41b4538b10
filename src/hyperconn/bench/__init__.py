"""Speed and memory benchmarks: ``hyperconn bench layer`` and ``hyperconn bench model``.

    hyperconn bench layer [--quick] [--streams 2 4 8] [--dims 256 1024] [--out FILE.md|.json]
    hyperconn bench model [--quick] [--streams 4] [--out FILE.md|.json]

``layer`` times one hyper-connected layer (forward + backward, Linear(C, C) branch) for
every variant, ``recompute=True`` and the public implementation (lucidrains'
``hyper-connections``, see :mod:`.peers`); ``model`` times a whole GPT training step
(forward, loss, backward, AdamW). Everything compared in one table is measured in the
same process, interleaved round by round (the order alternates every round), so ratios
are medians of per-round ratios and survive a machine whose load drifts. Results go to
the terminal as rich tables and, with ``--out``, to markdown or JSON (written
atomically). Benchmarks never assert timings; ``tests/test_bench.py`` only smoke-tests
the code paths.

Memory, per case, in a separate untimed pass:

* **activation**: bytes allocated during the forward and still held when it ends, minus
  the output itself — what the layer keeps for its backward.
* **peak**: the largest amount allocated at any moment of forward + backward, relative
  to the start (includes the output, the gradients and the backward's temporaries).

On CUDA these come from ``torch.cuda.memory_allocated`` / ``max_memory_allocated``; on
CPU from the allocation events of ``torch.profiler`` (``profile_memory=True``), replayed
in time order.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["main", "Case", "UsageError", "time_interleaved", "measure_memory", "machine_info",
           "paired_ratio", "render_markdown", "write_report"]

MiB = 2.0 ** 20


class UsageError(ValueError):
    """A bad option value found by a benchmark before it runs (exit status 2)."""


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One thing to time. ``forward()`` returns what ``backward(out)`` consumes.

    ``step()`` (forward then backward) is what is timed; the memory pass calls the two
    halves separately. ``out_bytes(out)`` is subtracted from the memory held after the
    forward (the output is not an activation). ``reset()`` runs before each call (e.g.
    dropping gradients so every step allocates them the same way).
    """

    name: str
    forward: Callable[[], Any]
    backward: Callable[[Any], None]
    reset: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)

    def step(self) -> None:
        self.reset()
        self.backward(self.forward())


def tensor_bytes(obj) -> int:
    return obj.numel() * obj.element_size() if isinstance(obj, torch.Tensor) else 0


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(cases: Sequence[Case], *, repeats: int, warmup: int, device: torch.device,
                     inner: int = 1, on_round: Optional[Callable[[int], None]] = None) -> dict[str, list[float]]:
    """Seconds per step for every case, measured round-robin.

    Every round times each case once (``inner`` steps per sample, divided back), in an
    order that reverses every round, so slow drifts of the machine's load hit all cases
    alike. Returns ``{case.name: [seconds per step, one per round]}``.
    """
    for _ in range(warmup):
        for case in cases:
            case.step()
    _sync(device)
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    for r in range(repeats):
        order = cases if r % 2 == 0 else list(reversed(cases))
        for case in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                case.step()
            _sync(device)
            times[case.name].append((time.perf_counter() - t0) / inner)
        if on_round is not None:
            on_round(r)
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num][r] / times[den][r]`` (nan if either is missing)."""
    a, b = times.get(num), times.get(den)
    if not a or not b:
        return float("nan")
    return statistics.median(x / y for x, y in zip(a, b))


def summarize(samples: list[float]) -> dict:
    """median, quartiles and the relative spread (IQR / median) of a list of seconds."""
    s = sorted(samples)
    if len(s) >= 4:
        q = statistics.quantiles(s, n=4)
        p25, p75 = q[0], q[2]
    else:
        p25, p75 = s[0], s[-1]
    med = statistics.median(s)
    return {"median_s": med, "p25_s": p25, "p75_s": p75, "min_s": s[0],
            "spread": (p75 - p25) / med if med > 0 else float("nan"), "samples_s": list(samples)}


# ----------------------------------------------------------------------------- memory
_FWD_MARK = "hyperconn.bench.forward"


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 for a moment: the CPU profiler (kineto) prints two
    lines per session straight from C++, which no setting turns off."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_memory_timeline(prof) -> Optional[tuple[list[tuple[int, int]], Optional[int]]]:
    """(sorted (start_ns, ±bytes) CPU allocation events, end_ns of the forward marker)."""
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch whose profiler results look different
        return None
    allocs, fwd_end = [], None
    for e in events:
        name = e.name()
        if name == "[memory]" and str(e.device_type()).endswith("CPU"):
            allocs.append((e.start_ns(), e.nbytes()))
        elif name == _FWD_MARK:
            fwd_end = e.end_ns()
    return sorted(allocs), fwd_end


def measure_memory(case: Case, device: torch.device) -> dict:
    """``{"activation_bytes", "peak_bytes"}`` of one forward + backward of ``case``
    (definitions in the module docstring); values are None where they cannot be measured."""
    case.reset()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = case.forward()
        _sync(device)
        held = torch.cuda.memory_allocated(device) - base - tensor_bytes(out)
        case.backward(out)
        del out
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return {"activation_bytes": held, "peak_bytes": peak}
    from torch.profiler import ProfilerActivity, profile, record_function
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():
        prof.start()
    try:
        with record_function(_FWD_MARK):
            out = case.forward()
        out_bytes = tensor_bytes(out)
        case.backward(out)
        del out
    finally:
        with _quiet_native_stderr():
            prof.stop()
    timeline = _cpu_memory_timeline(prof)
    if timeline is None:
        return {"activation_bytes": None, "peak_bytes": None}
    allocs, fwd_end = timeline
    cur = peak = 0
    held_after_fwd = None
    for t, nbytes in allocs:
        if fwd_end is not None and held_after_fwd is None and t > fwd_end:
            held_after_fwd = cur
        cur += nbytes
        peak = max(peak, cur)
    if fwd_end is not None and held_after_fwd is None:
        held_after_fwd = cur
    act = None if held_after_fwd is None else held_after_fwd - out_bytes
    return {"activation_bytes": act, "peak_bytes": peak}


# ----------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on (recorded in every report)."""
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_avg_start": _loadavg(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        from importlib.metadata import version
        info["hyper_connections"] = version("hyper-connections")
    except Exception:
        info["hyper_connections"] = None
    return info


# ----------------------------------------------------------------------------- output
def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:{spec}}{suffix}"


def fmt_mib(nbytes) -> str:
    return "–" if nbytes is None else f"{nbytes / MiB:.1f}"


def render_markdown(report: dict) -> str:
    """The report as markdown: header with machine/date/command, then every table."""
    meta = report["meta"]
    m = meta["machine"]
    lines = [f"# hyperconn bench {report['kind']}", "",
             f"- command: `{meta['command']}`",
             f"- date: {meta['date']}",
             f"- machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads), python {m['python']}",
             f"- device: {m['device']}" + (f" ({m['device_name']}, CUDA {m['cuda']})" if m.get("device_name") else ""),
             f"- load average (1, 5, 15 min) at start / end: {m.get('load_avg_start')} / {m.get('load_avg_end')}",
             f"- peer: hyper-connections {m.get('hyper_connections') or 'not installed'}",
             f"- settings: {', '.join(f'{k}={v}' for k, v in meta['settings'].items())}", ""]
    for table in report["tables"]:
        lines += [f"## {table['title']}", ""]
        cols = table["columns"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
        for row in table["rows"]:
            lines.append("| " + " | ".join(str(c) for c in row) + " |")
        lines.append("")
        for note in table.get("notes", []):
            lines.append(f"{note}  ")
        if table.get("notes"):
            lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def print_report(report: dict, console=None) -> None:
    """Rich tables on the terminal (plain text when rich is missing)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but keep the benchmark usable without it
        print(render_markdown(report))
        return
    # Off a terminal rich would wrap at 80 columns; logs are easier to read unwrapped.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    meta, m = report["meta"], report["meta"]["machine"]
    console.print(f"[bold]hyperconn bench {report['kind']}[/bold]  {meta['date']}")
    console.print(f"command: {meta['command']}")
    dev = m["device"] + (f" ({m['device_name']})" if m.get("device_name") else "")
    console.print(f"machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']} "
                  f"({m['torch_threads']} threads), device {dev}, load {m.get('load_avg_start')} → {m.get('load_avg_end')}")
    for t in report["tables"]:
        table = Table(title=t["title"], title_justify="left")
        for i, c in enumerate(t["columns"]):
            table.add_column(c, justify="left" if i == 0 else "right")
        for row in t["rows"]:
            table.add_row(*(str(c) for c in row))
        console.print(table)
        for note in t.get("notes", []):
            console.print(f"  {note}", highlight=False)
    for note in report.get("notes", []):
        console.print(f"note: {note}", highlight=False)


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_report(report: dict, path: os.PathLike) -> Path:
    """Write the report as JSON (``.json``) or markdown (anything else), atomically."""
    path = Path(path)
    text = (json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n"
            if path.suffix.lower() == ".json" else render_markdown(report))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# ----------------------------------------------------------------------------- CLI
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    return dev


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small grid and few repeats (a fast sanity run)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per case first")
    p.add_argument("--inner", type=int, default=None, help="steps per timed sample (default: 1 on CPU, 10 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the report to FILE.md or FILE.json")
    p.add_argument("--quiet", action="store_true", help="no tables on the terminal (progress still on stderr unless also --quiet)")


def progress(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def finish(report: dict, args, argv: Sequence[str]) -> int:
    report["meta"]["machine"]["load_avg_end"] = _loadavg()
    if not args.quiet:
        print_report(report)
    if args.out is not None:
        path = write_report(report, args.out)
        progress(args, f"wrote {path}")
    return 0


def command_line(argv: Sequence[str]) -> str:
    return "hyperconn bench " + " ".join(shlex.quote(a) for a in argv)


def meta(argv: Sequence[str], device: torch.device, settings: dict) -> dict:
    return {"command": command_line(argv),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(device), "settings": settings}


USAGE = """\
usage: hyperconn bench {layer,model} [options]

  layer   one hyper-connected layer, forward + backward: every variant, recompute=True,
          and the public hyper-connections mHC / mHCv2, at n x C (hyperconn bench layer --help)
  model   a whole GPT training step per variant at n = 4 over residual (hyperconn bench model --help)
"""


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``hyperconn bench``; returns the exit status (2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        (sys.stdout if argv else sys.stderr).write(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "layer":
        from .layer import run as run_cmd, build_parser
    elif cmd == "model":
        from .model import run as run_cmd, build_parser
    else:
        print(f"hyperconn bench: error: unknown benchmark {cmd!r}; expected 'layer' or 'model'", file=sys.stderr)
        return 2
    parser = build_parser()
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        print(f"hyperconn bench {cmd}: error: {e}", file=sys.stderr)
        return 2
    for name in ("repeats", "warmup", "inner", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            print(f"hyperconn bench {cmd}: error: --{name}: expected a positive integer, got {value}", file=sys.stderr)
            return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        report = run_cmd(args, device, argv)
    except UsageError as e:
        print(f"hyperconn bench {cmd}: error: {e}", file=sys.stderr)
        return 2
    return finish(report, args, argv)
