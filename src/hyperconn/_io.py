"""The lab's file helpers: atomic writes, strict JSON, JSON-lines reading.

Standard library only (no torch), so the report, the benchmarks and the training loop
share one implementation of each:

* :func:`atomic_write_text` / :func:`atomic_write_bytes`: the file appears complete or
  not at all (a temp file ``.<name>.<random>.tmp`` in the same directory, fsync,
  ``os.replace``); an interrupted write leaves at most that ``*.tmp`` file, which
  :func:`hyperconn.train.run_dir.remove_partial_writes` cleans up.
* :func:`write_json`: indented strict JSON (NaN and ±inf written as ``null``), atomically.
* :func:`read_json` / :func:`read_jsonl`: tolerant readers (a missing or unreadable
  file, or a line torn by a crash, is skipped rather than raised).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_write_stream", "write_json", "nan_to_none", "read_json", "read_jsonl"]

PathLike = Union[str, os.PathLike]


def atomic_write_stream(path: PathLike, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Call ``write(f)`` on a temp file opened for writing, then move it onto ``path``.

    For content too large to hold in memory at once (a corpus cache); ``binary`` opens
    the file in ``"wb"`` mode, else ``"w"``. Returns the path.

    Raises:
        OSError: as :func:`atomic_write_text`; anything ``write`` raises propagates, with
            ``path`` unchanged and the temp file removed.
    """
    path = Path(path)
    mode = "wb" if binary else "w"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
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


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (parent directories are created); the path.

    Raises:
        OSError: if the directory cannot be created or written; ``path`` is then unchanged
            and no temp file is left behind.
    """
    return atomic_write_stream(path, lambda f: f.write(text), binary=False)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent directories are created); the path.

    Raises:
        OSError: as :func:`atomic_write_text`.
    """
    return atomic_write_stream(path, lambda f: f.write(data))


def nan_to_none(value: Any) -> Any:
    """``value`` with every NaN/±inf float replaced by None, recursively.

    Dicts keep their keys, lists and tuples become lists; a zero-dimensional array or
    tensor (anything with ``.item()`` and ``ndim == 0``) becomes its Python number first.
    Never raises for plain JSON-like data.
    """
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: PathLike, obj: Any, indent: Optional[int] = 2) -> Path:
    """Write ``obj`` as strict JSON (NaN/±inf → ``null``, one trailing newline), atomically.

    Raises:
        TypeError: if ``obj`` holds something JSON cannot represent.
        OSError: as :func:`atomic_write_text`.
    """
    return atomic_write_text(path, json.dumps(nan_to_none(obj), indent=indent, allow_nan=False) + "\n")


def read_json(path: PathLike) -> Optional[Any]:
    """The parsed JSON in ``path``, or None if it is missing, unreadable or not JSON. Never raises."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_jsonl(path: PathLike) -> list[dict]:
    """The JSON objects of a JSON-lines file, one per line, in order.

    Blank lines, lines that are not valid JSON (the torn last line of a writer killed
    mid-line, or a line a concurrent writer has not finished) and lines that hold
    something other than an object are skipped. A missing file reads as ``[]``.

    Raises:
        OSError: if ``path`` exists but cannot be read (a directory, no permission).
    """
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except FileNotFoundError:
        pass
    return rows
