"""Presets are typed values, checked when defined, in modules without an import cycle."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hyperconn.errors import ConfigError
from hyperconn.experiments import PRESETS, Preset, RunGroup, expand, get_preset
from hyperconn.experiments.preset_types import PAPER_VARIANTS, registered_variants
from hyperconn.train.config import TrainConfig


def test_every_preset_builds_valid_configs():
    for name, preset in PRESETS.items():
        assert preset.name == name
        jobs = expand(preset, "/tmp/x")
        # a group runs every variant on its seeds; a sweep group every lr on the first seed
        # only (the best lr on the other seeds comes from expand_best, after the sweep)
        want = sum(len(g.variants) * (len(g.lrs) if g.lrs else len(g.seeds or preset.seeds)) for g in preset.groups)
        assert len(jobs) == want, name
        for job in jobs:
            assert isinstance(job.config, TrainConfig)
            assert job.config.model.connection.variant == job.variant


def test_variants_come_from_the_registry():
    assert registered_variants()[:6] == PAPER_VARIANTS == ("residual", "hc", "mhc", "isohc", "hybrid", "harmonized")
    assert RunGroup("g", {}).variants == registered_variants()  # the default: every registered variant
    # The shipped presets name theirs: a variant added to the registry does not change them.
    assert PRESETS["quick"].groups[0].variants == PAPER_VARIANTS


def test_registry_fallback_to_VARIANTS(monkeypatch):
    import hyperconn.variants as variants

    monkeypatch.delattr(variants, "variant_names", raising=False)
    assert registered_variants() == tuple(variants.VARIANTS)


@pytest.mark.parametrize("make, field", [
    (lambda: Preset("p", "", (RunGroup("g", {"model.n_embdd": 3}),)), "presets.p.g.residual.model.n_embdd"),
    (lambda: Preset("p", "", (RunGroup("g", {"lr": -1.0}, ("mhc",)),)), "presets.p.g.mhc.lr"),
    (lambda: RunGroup("g", {}, ("nope",)), "variants"),
    (lambda: Preset("p", "", (RunGroup("g", {}), RunGroup("g", {}))), "presets.p.groups"),
    (lambda: Preset("p", "", ()), "presets.p"),
    (lambda: Preset("p", "", (RunGroup("g", {}),), seeds=(-1,)), "presets.p.seeds"),
    (lambda: RunGroup("a/b", {}), "name"),
    (lambda: RunGroup("g", {}, ("mhc", "mhc")), "variants"),
])
def test_a_bad_preset_fails_when_defined(make, field):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.field == field


def test_get_preset_names_the_known_ones():
    assert get_preset("quick") is PRESETS["quick"]
    with pytest.raises(ConfigError, match="quick") as info:
        get_preset("nope")
    assert info.value.field == "preset"


@pytest.mark.parametrize("first", ["claim_presets", "presets", "preset_types"])
def test_preset_modules_import_in_any_order(first):
    code = (f"import hyperconn.experiments.{first}; "
            "from hyperconn.experiments.presets import PRESETS; "
            "from hyperconn.experiments.claim_presets import CLAIM_PRESETS; "
            "assert set(CLAIM_PRESETS) < set(PRESETS)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
