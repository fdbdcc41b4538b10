"""The claim presets: each published claim has a laptop and a -paper preset that fit it."""

import pytest
import torch

from hyperconn.experiments import PRESETS, expand
from hyperconn.experiments.claim_presets import CLAIM_PRESETS
from hyperconn.models import GPT

CLAIMS = ("gain", "depth", "kv", "lm", "overhead")


def test_every_claim_has_a_laptop_and_a_paper_preset_with_the_same_variants():
    for name in CLAIMS:
        laptop, paper = PRESETS[name], PRESETS[f"{name}-paper"]
        assert set(CLAIM_PRESETS) >= {name, f"{name}-paper"}
        assert {g.variants for g in laptop.groups[:1]} == {g.variants for g in paper.groups[:1]}
        assert all(j.config.device == "cuda" for j in expand(paper, "/tmp/x"))
        assert all(j.config.device == "auto" and j.config.threads == 1 for j in expand(laptop, "/tmp/x"))


def test_every_claim_has_a_gpu_preset_and_the_script_runs_them_all():
    from pathlib import Path
    script = (Path(__file__).parents[1] / "benchmarks" / "gpu" / "presets.sh").read_text()
    for name in CLAIMS:
        gpu = PRESETS[f"{name}-gpu"]
        assert {g.variants for g in gpu.groups[:1]} == {g.variants for g in PRESETS[name].groups[:1]}
        assert all(j.config.device == "cuda" for j in expand(gpu, "/tmp/x"))
        assert f"{name}-gpu" in script


def test_claim_specific_settings():
    six = {"residual", "hc", "mhc", "isohc", "hybrid", "harmonized"}
    exact = {"mhc-lite", "kromhc", "orthostochastic", "circulant"}
    # The laptop gain and lm presets run the 2026 exact maps beside the six, same budget.
    assert set(PRESETS["gain"].groups[0].variants) == set(PRESETS["lm"].groups[0].variants) == six | exact
    assert set(PRESETS["overhead"].groups[0].variants) == six
    # gain, kv and lm are fair: every variant gets the same budget and the same sweep of >= 3
    # lrs over 10x on seed 0 (then its best lr on 3 seeds, compare's second stage).
    for name, variants in (("gain", six | exact), ("lm", six | exact), ("kv", {"residual", "hc", "mhc", "harmonized"})):
        sweep = [j for j in expand(PRESETS[name], "/tmp/x") if j.group == f"{name}-sweep"]
        assert {j.seed for j in sweep} == {0} and len({(j.config.steps, j.config.batch_size) for j in sweep}) == 1
        lrs = {v: sorted(j.config.lr for j in sweep if j.variant == v) for v in variants}
        assert len({tuple(v) for v in lrs.values()}) == 1, name
        one = next(iter(lrs.values()))
        assert len(one) >= 3 and one[-1] / one[0] >= 10 and len(PRESETS[name].seeds) >= 3, name
    # depth: every depth has its own sweep over the same lrs, each depth one model size.
    depth = expand(PRESETS["depth"], "/tmp/x")
    for d in (6, 12, 24):
        sweep = [j for j in depth if j.group == f"depth{d}-sweep"]
        assert {j.config.model.n_layer for j in sweep} == {d}
        assert sorted(j.config.lr for j in sweep if j.variant == "isohc") == [3e-3, 1e-2, 3e-2]
        assert {j.variant for j in sweep} == {"residual", "hc", "mhc", "isohc"}
    assert len(PRESETS["depth"].seeds) >= 3
    kv = expand(PRESETS["kv"], "/tmp/x")
    assert len(PRESETS["kv"].seeds) >= 3 and {j.variant for j in kv} >= {"hc", "mhc", "harmonized"}
    assert all(j.config.task == "kv" for j in kv)
    # Matched tokens in lm: every run sees the same bytes.
    lm = expand(PRESETS["lm"], "/tmp/x")
    assert len({j.config.steps * j.config.batch_size * j.config.model.seq_len for j in lm}) == 1
    # overhead times only the step: no diagnostics, a single evaluation at the end.
    assert all(not j.config.diagnostics and j.config.eval_every == 0 for j in expand(PRESETS["overhead"], "/tmp/x"))


def test_gain_deep_runs_at_the_depth_of_the_mhc_gain_figure():
    jobs = expand(PRESETS["gain-deep"], "/tmp/x")
    assert {j.config.model.n_layer for j in jobs} == {30}          # 60 hyper-connected layers
    assert {j.variant for j in jobs} == {"residual", "hc", "mhc"}
    sweep = [j for j in jobs if j.group == "gain60-sweep"]
    assert sorted({j.config.lr for j in sweep}) == [1e-3, 3e-3, 1e-2] and len(PRESETS["gain-deep"].seeds) == 3
    # everything but the depth (and the variants) as `gain`
    gain = next(j for j in expand(PRESETS["gain"], "/tmp/x") if j.variant == "mhc").config
    deep = next(j for j in jobs if j.variant == "mhc").config
    assert (deep.steps, deep.batch_size, deep.model.n_embd, deep.model.seq_len) == \
        (gain.steps, gain.batch_size, gain.model.n_embd, gain.model.seq_len)


def test_lm_matched_residual_has_the_parameters_of_the_hyper_connected_models():
    jobs = expand(PRESETS["lm"], "/tmp/x")
    wide = next(j for j in jobs if j.group == "lm-matched-sweep")
    narrow = next(j for j in jobs if j.group == "lm-sweep" and j.variant == "residual")
    mhc = next(j for j in jobs if j.group == "lm-sweep" and j.variant == "mhc")
    with torch.device("meta"):
        p_wide, p_narrow, p_mhc = (GPT(j.config.model).num_params() for j in (wide, narrow, mhc))
    assert p_narrow < 0.85 * p_mhc                       # the gap being corrected
    assert abs(p_wide - p_mhc) / p_mhc < 0.05            # within 5 %


@pytest.mark.parametrize("name", [f"{c}-paper" for c in CLAIMS])
def test_paper_presets_refuse_to_start_without_cuda(name, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from hyperconn.cli import main
    code = main(["compare", "--preset", name, "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "device" in err and "cuda" in err
