"""The ``hyperconn`` command.

    hyperconn [--import MODULE ...] train   [--config FILE] [--<field> VALUE ...]   one training run
    hyperconn [--import MODULE ...] compare --preset NAME --out DIR [--seeds K ...] [--jobs N] [--quiet] [--device D]
    hyperconn [--import MODULE ...] report  ...                      (hyperconn.report.cli)
    hyperconn [--import MODULE ...] bench   ...                      (hyperconn.bench)

``--import MODULE`` (repeatable; also ``HYPERCONN_IMPORT=mod1,mod2``, imported first)
imports the user's own modules before the command is parsed, so a variant they define
(a subclass of ``hyperconn.Variant``) can be named like a built-in one:
``hyperconn --import myvariants train --model.connection.variant myvar``. The current
directory is searched first, and the full list is left in ``HYPERCONN_IMPORT`` for any
``hyperconn`` process started from this one.

Usage errors (unknown flag, bad value, invalid setting, a module that cannot be
imported) exit with status 2 and one line on stderr naming the flag. ``train`` exits 0
for a finished (or stopped) run, 3 for a diverged one, 1 for a checkpoint it cannot
resume from. Without the lab's packages (``pip install "hyperconn[lab]"``) every command
exits 2 with one line saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]

USAGE = """\
usage: hyperconn [--import MODULE ...] <command> [options]

Hyper-Connections lab: train and compare residual, hc, mhc, isohc, hybrid and harmonized.

commands:
  train     train one model (hyperconn train --help lists every setting)
  compare   run a preset's variants x seeds and summarise (hyperconn compare --help)
  report    markdown + plots from run or compare directories
  bench     speed benchmarks of the connection layers

options:
  --import MODULE  import a module of your own first (repeatable; env HYPERCONN_IMPORT=a,b),
                   e.g. one defining a variant by subclassing hyperconn.Variant

examples:
  hyperconn train --model.connection.variant isohc --steps 100 --out-dir runs/iso
  hyperconn train --config run.toml --lr 1e-3
  hyperconn compare --preset quick --out runs/quick
  hyperconn --import myvariants train --model.connection.variant myvar
"""

EXIT_USAGE = 2
# What the lab (this command) needs beyond the core library's torch and numpy: the
# ``lab`` extra of pyproject.toml (import names).
LAB_MODULES = ("rich", "matplotlib", "tyro", "yaml", "filelock")
# What a command needs when it is less than the whole lab: `bench` prints tables with rich
# and nothing else (so a GPU machine without network runs it with one extra wheel).
COMMAND_NEEDS = {"bench": ("rich",)}
LAB_HINT = 'hyperconn\'s lab needs: pip install "hyperconn[lab]"'
IMPORT_ENV = "HYPERCONN_IMPORT"


def _err(cmd: str, msg: str) -> int:
    print(f"hyperconn {cmd}: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


# ---------------------------------------------------------------------------- train
def _flag(path: str) -> str:
    """``model.n_embd`` → ``--model.n-embd`` (tyro's spelling of the flag)."""
    return "--" + path.replace("_", "-")


def _field_paths() -> set[str]:
    from .train.config import TrainConfig

    out = set()

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            else:
                out.add(prefix + f.name)

    walk(TrainConfig, "")
    return out


def _config_error_line(field: str, msg: str) -> str:
    return f"{_flag(field)}: {msg}" if field in _field_paths() else f"{field}: {msg}"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _tyro_one_line(text: str) -> str:
    """Condense tyro's error message into one line naming the flag.

    tyro draws either a UTF-8 box (title in the top border, ``│`` sides) or, when stdout
    is not UTF-8, a plain block (title line, a line of dashes, indented body), possibly
    with ANSI colours; sections of the body are separated by rules.
    """
    title, body = "", []
    for raw in _ANSI.sub("", text).splitlines():
        line = raw.strip()
        if not line:
            continue
        if line[0] in "╭╰":
            if line[0] == "╭" and not title:
                title = line.strip("╭╮─ ")
            continue
        if line[0] == "│":
            line = line[1:-1] if line.endswith("│") else line[1:]
        body.append(line.strip())
    if not title and len(body) >= 2 and body[1] and set(body[1]) <= {"-"}:
        title, body = body[0], body[2:]
    sections, cur = [], []
    for line in body:
        if line and set(line) <= {"─", "-"}:
            sections.append(cur)
            cur = []
        elif line:
            cur.append(line)
    sections.append(cur)
    first = " ".join(sections[0]) if sections and sections[0] else title or "invalid arguments"
    hint = ""
    for sec in sections[1:]:
        if sec and sec[0].startswith("Perhaps you meant") and len(sec) > 1:
            hint = f" (did you mean {sec[1].split()[0]}?)"
    m = re.match(r"^Error parsing (?P<ctx>[\w.-]+): (?P<field>[\w.]+): (?P<msg>.*)$", first)
    if m:
        ctx, field, msg = m["ctx"], m["field"], m["msg"]
        if ctx.startswith("--"):
            return f"{ctx}: {field}: {msg}"
        path = field if ctx == "TrainConfig" or field.startswith(ctx + ".") else f"{ctx}.{field}"
        return _config_error_line(path, msg)
    m = re.match(r"^Error parsing (?P<flag>--[\w.-]+): (?P<msg>.*)$", first)
    if m:
        return f"{m['flag']}: {m['msg']}"
    return first + hint


def _split_config_flag(args: list[str]) -> tuple[Optional[str], list[str]]:
    rest, path = [], None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config":
            if i + 1 >= len(args):
                raise ValueError("--config: expected a file name")
            path = args[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return path, rest


def load_config_file(path: str) -> dict:
    """Parse a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``) file into a dict."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"--config: cannot read {path}: {e.strerror or e}") from None
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"--config: expected a .toml, .yaml, .yml or .json file, got {path}")
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text) or {}
    except Exception as e:  # the parsers' own error types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--config: cannot parse {path}: {first}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a table of settings")
    return data


def _parse_train(args: list[str]):
    """Returns (TrainConfig, None) or (None, exit code)."""
    import tyro

    from .errors import ConfigError
    from .train.config import TrainConfig

    try:
        cfg_path, rest = _split_config_flag(args)
        default = TrainConfig()
        if cfg_path is not None:
            try:
                default = TrainConfig.from_dict(load_config_file(cfg_path))
            except ConfigError as e:
                return None, _err("train", f"--config {cfg_path}: {e.field}: {e.message}")
    except ValueError as e:
        return None, _err("train", str(e))
    kwargs = dict(default=default, prog="hyperconn train",
                  description="Train one model. Every setting is a flag; --config FILE (TOML/YAML/JSON) "
                              "gives defaults that flags override.")
    if "-h" in rest or "--help" in rest:
        try:
            tyro.cli(TrainConfig, args=rest, **kwargs)
        except SystemExit as e:
            return None, e.code if isinstance(e.code, int) else 0
    buf = io.StringIO()
    old_cols = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "1000"  # keep tyro's error box on one line per message
    try:
        with contextlib.redirect_stderr(buf):
            config = tyro.cli(TrainConfig, args=rest, **kwargs)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
        if code == 0:
            sys.stderr.write(buf.getvalue())
            return None, 0
        return None, _err("train", _tyro_one_line(buf.getvalue()))
    except ConfigError as e:
        return None, _err("train", _config_error_line(e.field, e.message))
    finally:
        if old_cols is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_cols
    sys.stderr.write(buf.getvalue())  # tyro warnings, if any
    return config, None


def _train(args: list[str]) -> int:
    from .errors import ConfigError
    from .train.checkpoint import CheckpointError
    from .train.loop import train

    config, code = _parse_train(args)
    if config is None:
        return code
    try:
        summary = train(config)
    except ConfigError as e:
        return _err("train", _config_error_line(e.field, e.message))
    except CheckpointError as e:
        print(f"hyperconn train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hyperconn train: interrupted; continue with --resume --out-dir {config.out_dir}", file=sys.stderr)
        return 130
    return 3 if summary["status"] == "diverged" else 0


# ---------------------------------------------------------------------------- compare
class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we want one line
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _compare(args: list[str]) -> int:
    from .experiments.presets import PRESETS

    parser = _OneLineParser(prog="hyperconn compare",
                            description="Run every variant x seed of a preset (--jobs N at once) into "
                                        "DIR/<task>/<variant>/seed<k>/ (a learning-rate sweep first into "
                                        "DIR/<task>-sweep/), then write DIR/summary.json, DIR/summary.md "
                                        "and the report. Re-running skips finished runs.")
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                        help="which preset (default: quick): " +
                             "; ".join(f"{k}: {p.description}" for k, p in PRESETS.items()).replace("%", "%%"))
    parser.add_argument("--out", required=True, metavar="DIR", help="comparison directory")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="K", help="replace the preset's seeds")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="replace the preset's variants (registered names; a variant of your own "
                             "needs --import MODULE before the command)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="device of every run")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="training runs at once, one process each (default 1; at most one per core)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:
        return int(e.code or 0)
    if ns.seeds is not None and any(s < 0 for s in ns.seeds):
        return _err("compare", f"--seeds: expected non-negative integers, got {ns.seeds}")
    from .errors import ConfigError
    from .experiments.compare import run_compare

    try:
        summary = run_compare(ns.preset, ns.out, seeds=ns.seeds, quiet=ns.quiet,
                              overrides={"device": ns.device} if ns.device else None, variants=ns.variants,
                              jobs=ns.jobs)
    except ConfigError as e:
        flag = {"device": "--device", "seed": "--seeds", "out": "--out", "variants": "--variants",
                "jobs": "--jobs"}.get(e.field, e.field)
        if e.field.endswith("model.connection.variant"):
            flag = "--variants"
        return _err("compare", f"{flag}: {e.message}")
    except KeyboardInterrupt:
        print("hyperconn compare: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    return 1 if summary["failed"] else 0


# ---------------------------------------------------------------------------- lazy commands
def _lazy(cmd: str, module: str):
    def run(args: list[str]) -> int:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and (module == e.name or module.startswith(e.name + ".")):
                return _err(cmd, f"not available: {module} is not installed in this checkout")
            raise
        fn = getattr(mod, "main", None)
        if fn is None:
            return _err(cmd, f"not available: {module} has no main(argv)")
        try:
            rc = fn(list(args))
        except SystemExit as e:
            rc = e.code
        return rc if isinstance(rc, int) else (0 if rc is None else 1)
    return run


COMMANDS = {
    "train": _train,
    "compare": _compare,
    "report": _lazy("report", "hyperconn.report.cli"),
    "bench": _lazy("bench", "hyperconn.bench"),
}


# ---------------------------------------------------------------------------- --import
def _split_imports(args: list[str]) -> tuple[list[str], list[str]]:
    """Leading ``--import MODULE`` / ``--import=MODULE`` options → (modules, the rest).

    Raises:
        ConfigError: (field ``--import``) for ``--import`` without a module name.
    """
    from .errors import ConfigError

    modules = []
    while args and (args[0] == "--import" or args[0].startswith("--import=")):
        if args[0] == "--import":
            if len(args) < 2 or args[1].startswith("-") or not args[1].strip():
                raise ConfigError("--import", "expected a module name, e.g. --import myvariants")
            modules.append(args[1])
            args = args[2:]
        else:
            name = args[0].split("=", 1)[1]
            if not name.strip():
                raise ConfigError("--import", "expected a module name, e.g. --import=myvariants")
            modules.append(name)
            args = args[1:]
    return modules, args


def import_user_modules(modules: Sequence[str]) -> None:
    """Import every module of ``modules`` (the current directory is searched first, as
    ``python -m`` does) and record the list in ``HYPERCONN_IMPORT`` for child processes.

    Raises:
        ConfigError: (field ``--import``) naming the first module that cannot be
            imported and why (its exception type and message).
    """
    from .errors import ConfigError

    if not modules:
        return
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for name in modules:
        try:
            importlib.import_module(name.strip())
        except Exception as e:  # noqa: BLE001 - any failure of the user's module is a usage error here
            raise ConfigError("--import", f"cannot import {name.strip()!r}: {type(e).__name__}: {e}") from None
    os.environ[IMPORT_ENV] = ",".join(dict.fromkeys(m.strip() for m in modules))


def _modules_to_import(args: list[str]) -> tuple[list[str], list[str]]:
    """(``HYPERCONN_IMPORT``'s modules then the ``--import`` ones, the remaining args)."""
    from_env = [m.strip() for m in os.environ.get(IMPORT_ENV, "").split(",") if m.strip()]
    from_flags, rest = _split_imports(args)
    return list(dict.fromkeys(from_env + from_flags)), rest


# ---------------------------------------------------------------------------- lab check
def _missing_lab_modules(needed: Sequence[str] = LAB_MODULES) -> list[str]:
    import importlib.util

    missing = []
    for name in needed:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # a broken or blocked package
            missing.append(name)
    return missing


def _lab_missing_line(missing: Sequence[str]) -> int:
    print(f"{LAB_HINT} (missing: {', '.join(missing)})", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hyperconn`` console script; returns the exit status.

    Never raises for bad usage: an unknown command, a bad ``--import`` or missing lab
    packages print one line on stderr and return 2.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    from .errors import ConfigError

    try:
        modules, args = _modules_to_import(args)
    except ConfigError as e:
        print(f"hyperconn: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not args or args[0] in ("-h", "--help", "help"):
        (sys.stdout if args else sys.stderr).write(USAGE)
        return 0 if args else EXIT_USAGE
    if args[0] in ("-V", "--version"):
        from . import __version__
        print(f"hyperconn {__version__}")
        return 0
    cmd = COMMANDS.get(args[0])
    if cmd is None:
        print(f"hyperconn: error: unknown command {args[0]!r}; expected one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return EXIT_USAGE
    missing = _missing_lab_modules(COMMAND_NEEDS.get(args[0], LAB_MODULES))
    if missing:
        return _lab_missing_line(missing)
    try:
        import_user_modules(modules)
    except ConfigError as e:
        print(f"hyperconn: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return cmd(args[1:])
    except ModuleNotFoundError as e:  # a lab package that find_spec saw but cannot load
        if e.name and e.name.split(".")[0] in LAB_MODULES:
            return _lab_missing_line([e.name.split(".")[0]])
        raise


if __name__ == "__main__":
    sys.exit(main())
