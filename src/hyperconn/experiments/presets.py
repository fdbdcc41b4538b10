"""The comparison presets behind ``hyperconn compare --preset NAME``.

``quick`` (every variant on both tasks, the README's main job) and ``smoke`` (a pipeline
check) are defined here; the claim presets (``gain``, ``depth``, ``kv``, ``lm``,
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
# Shared by both groups of `quick`: a 2-block model small enough for a laptop CPU; 1024
# tokens per step. Measured 2026-12-01 on 2 idle CPU cores (tokens/s on bytes, threads=1):
# residual 24,360, hc 13,641, mhc 11,327, isohc 7,054 (its Newton-Schulz now converges),
# hybrid 6,650, harmonized 11,718; the whole preset took 9.5 min (runs 17-75 s).
# One thread: at this size two threads gain
# little on an idle machine and lose 4-15x when another process holds a core.
_QUICK = {
    "threads": 1,
    "model.n_layer": 2, "model.n_head": 4, "model.n_embd": 64, "model.connection.streams": 4,
    "lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.1,
    "eval_every": 100, "eval_batches": 4, "log_every": 10, "ckpt_every": 100,
}

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        description="All six variants on key-value retrieval and byte-level LM, 2 blocks, "
                    "C=64, n=4 (residual n=1), 1 seed: about 10 minutes on a 2-core CPU.",
        groups=(
            RunGroup("kv", {**_QUICK, "task": "kv", "kv_pairs": 4, "model.seq_len": 32, "batch_size": 32,
                            "steps": 500}, PAPER_VARIANTS),
            RunGroup("bytes", {**_QUICK, "task": "bytes", "model.seq_len": 64, "batch_size": 16,
                               "steps": 400}, PAPER_VARIANTS),
        ),
        seeds=(0,),
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
