"""``hyperconn bench layer|model``: options shared by both benchmarks, and the entry point."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .._device import resolve_device
from ..errors import ConfigError
from .machine import loadavg
from .output import write_report
from .render import print_report

__all__ = ["main", "UsageError", "common_args", "progress", "finish", "USAGE"]


class UsageError(ValueError):
    """A bad option value found by a benchmark before it runs (exit status 2)."""


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
    report["meta"]["machine"]["load_avg_end"] = loadavg()
    if not args.quiet:
        print_report(report)
    if args.out is not None:
        path = write_report(report, args.out)
        progress(args, f"wrote {path}")
    return 0


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
    except ConfigError as e:
        print(f"hyperconn bench {cmd}: error: --device {args.device}: {e.message}", file=sys.stderr)
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
