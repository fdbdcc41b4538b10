"""Comparison presets, as data.

A :class:`Preset` is a list of :class:`RunGroup`; a group is one setting (task, model
size, steps, ...) given as dotted :class:`~hyperconn.train.TrainConfig` overrides, run for
every listed variant and every seed. Run ``k`` of variant ``v`` in group ``g`` lives in
``<out>/<g>/<v>/seed<k>/``.

Rule applied to every group: variant ``"residual"`` runs with ``streams=1`` (the plain
Pre-Norm baseline); every other variant uses the group's ``model.connection.streams``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..train.config import TrainConfig, with_overrides
from ..variants import VARIANTS

__all__ = ["RunGroup", "Preset", "Job", "PRESETS", "get_preset", "expand"]


@dataclass(frozen=True)
class RunGroup:
    """One setting, run for each variant × seed.

    Args:
        name: directory name under the compare dir (e.g. ``"kv"``).
        overrides: dotted TrainConfig overrides (``{"task": "kv", "model.n_embd": 64}``).
        variants: connection variants to run.
        variant_overrides: extra overrides for one variant (``{"hc": {"lr": 1e-3}}``).
    """

    name: str
    overrides: Mapping[str, Any]
    variants: tuple[str, ...] = VARIANTS
    variant_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    groups: tuple[RunGroup, ...]
    seeds: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Job:
    """One training run of a comparison."""

    group: str
    variant: str
    seed: int
    config: TrainConfig

    @property
    def label(self) -> str:
        return f"{self.group}/{self.variant}/seed{self.seed}"


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

from .claim_presets import CLAIM_PRESETS  # noqa: E402 - defined there, listed here

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        description="All six variants on key-value retrieval and byte-level LM, 2 blocks, "
                    "C=64, n=4 (residual n=1), 1 seed: about 10 minutes on a 2-core CPU.",
        groups=(
            RunGroup("kv", {**_QUICK, "task": "kv", "kv_pairs": 4, "model.seq_len": 32, "batch_size": 32,
                            "steps": 500}),
            RunGroup("bytes", {**_QUICK, "task": "bytes", "model.seq_len": 64, "batch_size": 16,
                               "steps": 400}),
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
    """The preset called ``name``; ``ValueError`` naming the known presets otherwise."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]


def expand(preset: Preset, out_dir, seeds: Optional[Sequence[int]] = None,
           extra: Optional[Mapping[str, Any]] = None) -> list[Job]:
    """All runs of ``preset`` (group-major, then variant, then seed), with ``out_dir`` set.

    ``seeds`` replaces the preset's seeds; ``extra`` are overrides applied to every run
    last (e.g. ``{"device": "cuda"}``).
    """
    out_dir = Path(out_dir)
    jobs = []
    for group in preset.groups:
        for variant in group.variants:
            for seed in (preset.seeds if seeds is None else seeds):
                over = {**group.overrides, "model.connection.variant": variant, "seed": int(seed),
                        **group.variant_overrides.get(variant, {}), **(extra or {}),
                        "out_dir": str(out_dir / group.name / variant / f"seed{seed}")}
                if variant == "residual":
                    over["model.connection.streams"] = 1
                jobs.append(Job(group.name, variant, int(seed), with_overrides(TrainConfig(), over)))
    return jobs
