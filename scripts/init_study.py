"""The quality side of the init study (issue 17, first cut): held-out metric, stream
similarity and the mechanism diagnostics for exact copies vs a zero-mean stream offset
with a one-hot read, on the quick preset's kv and bytes settings, 3 seeds.

    python scripts/init_study.py kv runs/init-kv
    python scripts/init_study.py bytes runs/init-bytes
    hyperconn report runs/init-kv runs/init-bytes --out runs/init-report

Every run of a task has the same budget and learning rate (the quick preset's).
"""

from __future__ import annotations

import sys

from hyperconn.experiments.compare import run_compare
from hyperconn.experiments.presets import PRESETS
from hyperconn.experiments.preset_types import Preset, RunGroup

CONSTRAINED = ("mhc", "isohc", "mhc-lite")
BROKEN = {"model.connection.stream_offset": 0.1, "model.connection.pre_init": "onehot"}


def preset(task: str) -> Preset:
    base = next(g for g in PRESETS["quick"].groups if g.name == task).overrides
    return Preset(
        name=f"init-{task}",
        description=f"Init study on quick's {task} setting: copies vs offset 0.1 + one-hot read, 3 seeds.",
        groups=(RunGroup(f"{task}-copies", dict(base), ("residual", "hc") + CONSTRAINED),
                RunGroup(f"{task}-offset-onehot", {**base, **BROKEN}, CONSTRAINED)),
        seeds=(0, 1, 2),
    )


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("kv", "bytes"):
        sys.exit("usage: python scripts/init_study.py kv|bytes OUT_DIR")
    run_compare(preset(sys.argv[1]), sys.argv[2], quiet=True)
