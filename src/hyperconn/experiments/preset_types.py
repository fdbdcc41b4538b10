"""What a comparison preset is: :class:`RunGroup`, :class:`Preset`, :class:`Job` and :func:`expand`.

A :class:`Preset` is a list of :class:`RunGroup`; a group is one setting (task, model
size, steps, ...) given as dotted :class:`~hyperconn.train.TrainConfig` overrides, run for
every listed variant and every seed. Run ``k`` of variant ``v`` in group ``g`` lives in
``<out>/<g>/<v>/seed<k>/``.

Rule applied to every group: variant ``"residual"`` runs with ``streams=1`` (the plain
Pre-Norm baseline); every other variant uses the group's ``model.connection.streams``.

A group with ``lrs`` is a learning-rate sweep: first every lr on the preset's first seed,
in ``<out>/<g>-sweep/<v>-lr<lr>/seed<k>/``; then each variant at its best lr (by the
held-out metric of that seed) on every seed, in ``<out>/<g>/<v>/seed<k>/`` (the first
seed's run is the sweep's, copied). :func:`expand` gives the first stage,
:func:`expand_best` the second.

A group defined without ``variants`` runs every variant registered when it is defined:
the built-ins, then any defined in the user's own code and imported first (``hyperconn
--import MODULE compare ...`` imports them before any preset is defined). The shipped
presets name theirs (:data:`PAPER_VARIANTS` or a subset), each checked against the
registry. A preset checks itself when it is defined: every run it describes must be a
valid configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..errors import ConfigError
from ..train.config import TrainConfig, with_overrides

__all__ = ["RunGroup", "Preset", "Job", "expand", "expand_best", "sweep_dir_name", "registered_variants",
           "PAPER_VARIANTS", "EXACT_VARIANTS"]

# The six variants the published claims (and the presets built on them) compare. Named
# explicitly so a variant added to the registry later (a built-in or the user's own)
# does not silently change what a shipped preset runs; each must be registered.
PAPER_VARIANTS = ("residual", "hc", "mhc", "isohc", "hybrid", "harmonized")
# The exact maps that followed (docs/variants.md), run beside the six by the laptop `gain` and `lm` presets.
EXACT_VARIANTS = ("mhc-lite", "kromhc", "orthostochastic", "circulant")


def registered_variants() -> tuple[str, ...]:
    """Every variant name hyperconn knows now: the registry's ``variant_names()`` where the
    variants package has one, else its ``VARIANTS``."""
    from .. import variants

    names = getattr(variants, "variant_names", None)
    return tuple(names()) if callable(names) else tuple(variants.VARIANTS)


@dataclass(frozen=True)
class RunGroup:
    """One setting, run for each variant × seed.

    Args:
        name: directory name under the compare dir (e.g. ``"kv"``).
        overrides: dotted TrainConfig overrides (``{"task": "kv", "model.n_embd": 64}``).
        variants: connection variants to run; None (the default) becomes every variant
            registered at definition (:func:`registered_variants`).
        variant_overrides: extra overrides for one variant (``{"hc": {"lr": 1e-3}}``).
        lrs: learning rates to sweep per variant (None: the ``lr`` override only); see the
            module docstring for the two stages.
        seeds: this group's seeds, replacing the preset's (None: the preset's); seeds
            given to :func:`expand` replace both.

    Raises:
        ConfigError: (field ``name``, ``variants`` or ``lrs``) for an empty or path-like
            name, an empty variant list, a repeated variant or one that is not
            registered, or ``lrs`` that are not distinct positive numbers.
    """

    name: str
    overrides: Mapping[str, Any]
    variants: Optional[tuple[str, ...]] = None
    variant_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    lrs: Optional[tuple[float, ...]] = None
    seeds: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        if self.seeds is not None:
            seeds = tuple(self.seeds)
            if not seeds or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in seeds):
                raise ConfigError("seeds", f"group {self.name!r}: expected non-negative integers, got {self.seeds!r}")
            object.__setattr__(self, "seeds", seeds)
        if self.lrs is not None:
            lrs = tuple(self.lrs)
            if not lrs or len(set(lrs)) != len(lrs) or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf") for v in lrs):
                raise ConfigError("lrs", f"group {self.name!r}: expected distinct positive learning rates, "
                                         f"got {self.lrs!r}")
            object.__setattr__(self, "lrs", tuple(float(v) for v in lrs))
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError("name", f"expected a directory name, got {self.name!r}")
        variants = registered_variants() if self.variants is None else tuple(self.variants)
        object.__setattr__(self, "variants", variants)
        if not variants or len(set(variants)) != len(variants):
            raise ConfigError("variants", f"group {self.name!r}: expected distinct variant names, got {variants!r}")
        known = registered_variants()
        unknown = [v for v in variants if v not in known]
        if unknown:
            raise ConfigError("variants", f"group {self.name!r}: {unknown[0]!r} is not a registered variant "
                                          f"(expected one of {known})")


@dataclass(frozen=True)
class Preset:
    """A named comparison: groups × variants × seeds.

    Raises:
        ConfigError: when it is defined, if it has no group, two groups share a name, a
            seed is negative, or any run it describes is not a valid ``TrainConfig``
            (the field is ``presets.<name>.<group>.<variant>.<setting>``).
    """

    name: str
    description: str
    groups: tuple[RunGroup, ...]
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        where = f"presets.{self.name}"
        if not self.groups:
            raise ConfigError(where, "expected at least one run group")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}.groups", f"expected distinct group names, got {names}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"{where}.seeds", f"expected non-negative integers, got {self.seeds!r}")
        for group in self.groups:
            for variant in group.variants:
                try:
                    _config(group, variant, self.seeds[0], Path("."), None)
                except ConfigError as e:
                    raise e.within(f"{where}.{group.name}.{variant}") from None


@dataclass(frozen=True)
class Job:
    """One training run of a comparison."""

    group: str
    variant: str
    seed: int
    config: TrainConfig
    lr: Optional[float] = None  # set for a run of a learning-rate sweep (stage 1)

    @property
    def label(self) -> str:
        if self.lr is not None:
            return f"{self.group}/{sweep_dir_name(self.variant, self.lr)}/seed{self.seed}"
        return f"{self.group}/{self.variant}/seed{self.seed}"


def sweep_dir_name(variant: str, lr: float) -> str:
    """``mhc-lr0.003``: the variant-level directory of one lr of a sweep."""
    return f"{variant}-lr{lr:g}"


def _config(group: RunGroup, variant: str, seed: int, out_dir: Path,
            extra: Optional[Mapping[str, Any]], lr: Optional[float] = None,
            sweep: bool = False) -> TrainConfig:
    run_dir = (out_dir / f"{group.name}-sweep" / sweep_dir_name(variant, lr) if sweep
               else out_dir / group.name / variant) / f"seed{seed}"
    over = {**group.overrides, "model.connection.variant": variant, "seed": int(seed),
            **group.variant_overrides.get(variant, {}), **(extra or {}),
            **({"lr": lr} if lr is not None else {}), "out_dir": str(run_dir)}
    if variant == "residual":
        over["model.connection.streams"] = 1
    return with_overrides(TrainConfig(), over)


def expand(preset: Preset, out_dir, seeds: Optional[Sequence[int]] = None,
           extra: Optional[Mapping[str, Any]] = None) -> list[Job]:
    """The runs of ``preset`` that need no earlier result (group-major, then variant,
    then seed), with ``out_dir`` set: every run of a group without ``lrs``, and every lr
    of a sweep on the first seed (group ``<g>-sweep``).

    ``seeds`` replaces the preset's seeds; ``extra`` are overrides applied to every run
    last (e.g. ``{"device": "cuda"}``), before a sweep's lr.

    Raises:
        ConfigError: if ``extra`` makes a run's configuration invalid.
    """
    out_dir = Path(out_dir)
    jobs = []
    for group in preset.groups:
        group_seeds = _seeds(preset, group, seeds)
        for variant in group.variants:
            if group.lrs is None:
                jobs += [Job(group.name, variant, int(s), _config(group, variant, s, out_dir, extra))
                         for s in group_seeds]
            else:
                jobs += [Job(f"{group.name}-sweep", variant, int(group_seeds[0]),
                             _config(group, variant, group_seeds[0], out_dir, extra, lr, sweep=True), lr=lr)
                         for lr in group.lrs]
    return jobs


def expand_best(preset: Preset, out_dir, best_lr: Mapping[tuple[str, str], float],
                seeds: Optional[Sequence[int]] = None, extra: Optional[Mapping[str, Any]] = None) -> list[Job]:
    """The second stage of every sweep: each (group, variant) of ``best_lr`` at its lr on
    every seed, in ``<out>/<g>/<v>/seed<k>/`` (the first seed is the sweep's run)."""
    out_dir = Path(out_dir)
    return [Job(group.name, variant, int(s), _config(group, variant, s, out_dir, extra, best_lr[group.name, variant]))
            for group in preset.groups if group.lrs is not None
            for variant in group.variants if (group.name, variant) in best_lr
            for s in _seeds(preset, group, seeds)]


def _seeds(preset: Preset, group: RunGroup, seeds: Optional[Sequence[int]]) -> list[int]:
    """The seeds a group runs: the caller's, else the group's, else the preset's."""
    return list(seeds if seeds is not None else group.seeds if group.seeds is not None else preset.seeds)
