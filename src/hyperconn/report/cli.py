"""``hyperconn report DIR... [--out OUT]``: markdown + figures from run directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from . import write_report

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hyperconn report",
        description="Write report.md and PNG figures (loss/accuracy curves, composite gain, gain layer "
                    "profile, stream gradient norms, stream similarity, summary table) from training "
                    "run directories. Each DIR is a run directory (holding metrics.jsonl) or any tree "
                    "of them, e.g. a comparison directory <out>/<task>/<variant>/seed<k>/.")
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run or comparison directories")
    p.add_argument("--out", type=Path, default=None,
                   help="where report.md and figures/ go (default: the first DIR)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 nothing to report, 2 bad usage)."""
    from ..train.config import ConfigError
    from ..train.run_dir import prepare_out_dir

    args = build_parser().parse_args(argv)
    out = args.out if args.out is not None else args.dirs[0]
    missing = [d for d in args.dirs if not d.exists()]
    if missing:  # before --out is created (it defaults to the first DIR)
        print(f"hyperconn report: error: dirs: {missing[0]} does not exist", file=sys.stderr)
        return 1
    try:
        prepare_out_dir(out, field="--out" if args.out is not None else "DIR")
        path = write_report(args.dirs, out)
    except ConfigError as e:  # bad usage: one line naming the argument
        print(f"hyperconn report: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"hyperconn report: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":  # python -m hyperconn.report.cli DIR...
    raise SystemExit(main())
