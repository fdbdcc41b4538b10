"""Run-directory files: ``metrics.jsonl`` (one JSON object per line) and JSON summaries.

Non-finite floats are written as ``null`` so every line is strict JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional

from .._io import atomic_write_text, nan_to_none, read_json, read_jsonl, write_json

__all__ = ["MetricsWriter", "TensorBoardMirror", "read_metrics", "write_json", "read_json", "finite_or_none"]

# Kept under their historical names (tests and callers import them from here).
finite_or_none = nan_to_none


def read_metrics(path: Path) -> list[dict]:
    """All complete lines of a ``metrics.jsonl`` (a torn last line is skipped); ``[]`` if
    the file is missing.

    Raises:
        OSError: if the file exists but cannot be read.
    """
    return read_jsonl(path)


class MetricsWriter:
    """Append-only ``metrics.jsonl`` writer (flushed every line).

    Args:
        path: the file.
        keep_through: ``None`` starts a new file; an integer keeps only the existing
            lines with ``step <= keep_through`` (used when resuming from a checkpoint at
            that step, so the file ends up as an uninterrupted run's would).
    """

    def __init__(self, path: Path, keep_through: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: Iterable[dict] = []
        if keep_through is not None:
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= keep_through]
        atomic_write_text(self.path, "".join(self._line(r) for r in kept))
        self._f = open(self.path, "a")

    @staticmethod
    def _line(row: dict) -> str:
        return json.dumps(finite_or_none(row), allow_nan=False) + "\n"

    def write(self, row: dict) -> None:
        self._f.write(self._line(row))
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardMirror:
    """Mirror every metrics row into TensorBoard event files (``torch.utils.tensorboard``).

    Each numeric field of a row becomes a scalar at the row's ``step`` (``diag/<name>``
    diagnostics included, so TensorBoard groups them). On resume from step ``k`` events
    after ``k`` left by the interrupted run are purged, as ``metrics.jsonl`` drops them.

    Raises:
        ImportError: with an install hint, if the ``tensorboard`` package is missing.
    """

    def __init__(self, metrics: MetricsWriter, log_dir: Path, resume_step: Optional[int] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's module imports the tensorboard package
            raise ImportError("tensorboard logging needs the tensorboard package: "
                              "pip install 'hyperconn[tensorboard]'") from e
        self.metrics = metrics
        self.tb = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, row: dict) -> None:
        self.metrics.write(row)
        step = int(row.get("step", 0))
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.metrics.close()
        self.tb.close()
