"""The quality side of the init study (issue 17): held-out metric, stream similarity and the
mechanism diagnostics per named init (hyperconn.inits) and for the dynamic part (off, or
its initial scale α), on the quick preset's bytes setting, 3 seeds.

    python scripts/init_study.py bytes runs/init-bytes [--jobs 2]
    hyperconn report runs/init-bytes --out runs/init-bytes

Every run has the same budget and learning rate (the quick preset's bytes group: 2 blocks,
C = 64, n = 4, 400 steps of 1024 bytes, lr 3e-3); groups:

- ``bytes-<init>``: the constrained variants (mhc, isohc, mhc-lite) under each named init;
  residual and hc under the default;
- ``bytes-static`` / ``bytes-alpha0.1``: hc, mhc and isohc with dynamic coefficients off, or
  their initial α raised from 0.01 to 0.1 (default init).
"""

from __future__ import annotations

import argparse

from hyperconn.experiments.compare import run_compare
from hyperconn.experiments.preset_types import Preset, RunGroup
from hyperconn.inits import init_names

CONSTRAINED = ("mhc", "isohc", "mhc-lite")
DYNAMIC = ("hc", "mhc", "isohc")
# The quick preset's bytes setting as it was when this study was designed (quick itself may change).
BYTES = {"threads": 1, "model.n_layer": 2, "model.n_head": 4, "model.n_embd": 64, "model.connection.streams": 4,
         "lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.1, "eval_every": 100, "eval_batches": 4,
         "log_every": 10, "ckpt_every": 100, "task": "bytes", "model.seq_len": 64, "batch_size": 16, "steps": 400}


def preset() -> Preset:
    groups = [RunGroup(f"bytes-{init}", {**BYTES, "model.connection.init": init},
                       (("residual", "hc") if init == "hyperconn" else ()) + CONSTRAINED)
              for init in init_names()]
    groups += [RunGroup("bytes-static", {**BYTES, "model.connection.dynamic": False}, ("residual",) + DYNAMIC),
               RunGroup("bytes-alpha0.1", {**BYTES, "model.connection.alpha_init": 0.1}, ("residual",) + DYNAMIC)]
    return Preset(name="init-bytes", description="Init study on quick's bytes setting: named inits, "
                  "dynamic off, alpha 0.1; 3 seeds, one shared lr.", groups=tuple(groups), seeds=(0, 1, 2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=("bytes",))
    p.add_argument("out")
    p.add_argument("--jobs", type=int, default=1)
    a = p.parse_args()
    run_compare(preset(), a.out, quiet=True, jobs=a.jobs)
