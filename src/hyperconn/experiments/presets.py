"""The comparison presets behind ``hyperconn compare --preset NAME``.

``quick`` (the six variants, the README's main job) and ``smoke`` (a pipeline check) are
defined here; the claim presets (``gain``, ``depth``, ``kv``, ``lm``,
``overhead`` and their ``-paper`` scale) in :mod:`.claim_presets`. What a preset is —
:class:`RunGroup`, :class:`Preset`, :class:`Job`, :func:`expand` — is in
:mod:`.preset_types` (re-exported here). Every preset checks its runs when defined.
"""

from __future__ import annotations

from ..errors import ConfigError
from .claim_presets import CLAIM_PRESETS
from .preset_types import PAPER_VARIANTS, Job, Preset, RunGroup, expand, registered_variants

__all__ = ["RunGroup", "Preset", "Job", "PRESETS", "get_preset", "expand", "registered_variants", "PAPER_VARIANTS"]


# ---------------------------------------------------------------------------- presets
# `quick` is the README's main job: at most ~10 minutes on 2 CPU cores with --jobs 2
# (measured in docs/results/quick.md). Two groups, one question each:
# - "bytes": held-out quality with a seed spread. A 2-block model small enough to run
#   every variant on 3 seeds (kv is not here: at any budget this size allows, the residual
#   itself stays at chance on kv, and a task the baseline does not learn says nothing).
# - "deep": what the sources are about, composite gain and stream usage at depth: the
#   `gain` preset's 12-block model (24 hyper-connected layers) for 240 steps, one seed.
# One thread per run: at this size two threads gain little and lose 4-15x when another
# process holds a core.
_QUICK = {
    "threads": 1, "task": "bytes", "model.n_head": 4, "model.connection.streams": 4,
    "lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.1, "log_every": 10, "ckpt_every": 0,
}

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        description="The six variants on byte-level LM of the Python stdlib: 2 blocks, C=64, n=4 "
                    "(residual n=1), 400 steps, 3 seeds (quality with seed spread); and 12 blocks "
                    "(24 layers), C=64, 240 steps, 1 seed (composite gain and stream usage at depth). "
                    "About 10 minutes on 2 CPU cores with --jobs 2.",
        groups=(
            RunGroup("bytes", {**_QUICK, "model.n_layer": 2, "model.n_embd": 64, "model.seq_len": 64,
                               "batch_size": 16, "steps": 400, "eval_every": 100, "eval_batches": 4},
                     PAPER_VARIANTS),
            RunGroup("deep", {**_QUICK, "model.n_layer": 12, "model.n_embd": 64, "model.seq_len": 64,
                              "batch_size": 8, "steps": 240, "eval_every": 40, "eval_batches": 2},
                     PAPER_VARIANTS, seeds=(0,)),
        ),
        seeds=(0, 1, 2),
    ),
    "smoke": Preset(
        name="smoke",
        description="Two variants, a few steps on a tiny model: checks the pipeline end to end.",
        groups=(
            RunGroup("kv", {"threads": 1, "task": "kv", "kv_pairs": 2, "steps": 6, "eval_every": 3, "eval_batches": 1,
                            "batch_size": 4, "warmup_steps": 2, "lr": 3e-3, "model.n_layer": 2,
                            "model.n_head": 2, "model.n_embd": 32, "model.seq_len": 16,
                            "model.connection.streams": 2},
                     variants=("residual", "mhc")),
        ),
        seeds=(0,),
    ),
    **CLAIM_PRESETS,
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        ConfigError: (field ``preset``, a ``ValueError``) naming the known presets otherwise.
    """
    if name not in PRESETS:
        raise ConfigError("preset", f"expected one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]
