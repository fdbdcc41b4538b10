"""The GPU session script (``benchmarks/gpu/session.sh``) checked where no GPU is.

A lent GPU gives a session minutes, so the script must fit them and must not fail on a
typo: its per-step limits must sum to at most 7.5 minutes (the issue's 8, less a margin),
it must parse, and every profile config it names runs end to end here — the eager ones
through the Triton kernels in the interpreter, with the fused coefficient op present or
absent as the config says; the compiled ones (slow) through Inductor on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "session.sh"
PROFILE = ROOT / "benchmarks" / "gpu" / "profile_step.py"
BUDGET_S = 450
TINY = ["--layers", "1", "--dim", "16", "--heads", "2", "--seq", "8", "--batch", "1",
        "--warmup", "0", "--steps", "1", "--top", "1000"]
# The coefficient op a config's layers must run (fused) or must not run (unfused).
FUSED_OP = {"hc": "hyperconn::linear_coefficients", "mhc": "hyperconn::sinkhorn_coefficients",
            "isohc": "hyperconn::iso_coefficients", "hybrid": "hyperconn::hybrid_coefficients"}


def _text() -> str:
    return SCRIPT.read_text()


def _limits() -> dict[str, int]:
    """Each step's time limit, as the case lines pass it (``step NAME S`` / ``prof S NAME``)."""
    limits = {}
    for m in re.finditer(r"^\s*(\w+)\) (?:step \w+ (\d+)|prof (\d+) \w+)", _text(), re.M):
        limits[m.group(1)] = int(m.group(2) or m.group(3))
    return limits


def _configs(step: str) -> list[str]:
    """The ``--configs`` a profile step passes (continuation lines joined)."""
    body = re.search(rf"^\s*{step}\) prof .*?;;", _text(), re.M | re.S).group(0).replace("\\\n", " ")
    return re.search(r"--configs ([^;]*)", body).group(1).split()


def test_script_parses_and_fits_its_budget():
    assert shutil.which("bash"), "bash is needed for the GPU script"
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    limits = _limits()
    default = re.search(r"steps=\$\{\*:-([^}]*)\}", _text()).group(1).split()
    assert set(default) == set(limits), (default, limits)
    assert sum(limits.values()) <= BUDGET_S, limits
    # The header's table states the same limits as the case lines.
    for name, s in limits.items():
        assert re.search(rf"^#   {name} [^\n]*(\n#   {{9,}}[^\n]*)?\s{s}$", _text(), re.M), name


def _run_profile(configs, env_extra, tmp_path, timeout):
    out = tmp_path / "profile.json"
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, str(PROFILE), "--device", "cpu", *TINY, "--out", str(out), "--configs", *configs]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())["results"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (the test extra)")
def test_every_eager_profile_config_runs_in_the_interpreter(tmp_path):
    configs = sorted({c for step in ("profile", "wide") for c in _configs(step)})
    assert "mhc:bf16:unfused" in configs and "mhc:bf16:nofold" in configs
    results = _run_profile(configs, {"TRITON_INTERPRET": "1", "HYPERCONN_KERNELS": "triton"}, tmp_path, 600)
    assert sorted(results) == configs
    for config, r in results.items():
        assert r["wall_ms"] > 0 and r["gpu_busy_ms"] > 0 and r["kernels_per_step"] > 0, config
        names = {k["name"] for k in r["top"]}
        variant, unfused = config.split(":")[0], "unfused" in config.split(":")
        if variant == "residual":
            assert not any(n.startswith("hyperconn::") for n in names), config
            continue
        assert "hyperconn::stream_merge" in names, config
        if variant in FUSED_OP:
            assert (FUSED_OP[variant] in names) != unfused, (config, sorted(names))
        if unfused:
            assert "hyperconn::rms_projection" in names, config


@pytest.mark.slow
def test_compiled_profile_configs_run_on_the_cpu(tmp_path):
    """``:compile`` / ``:graphs`` compile each block (Inductor's C++ backend here; on the CPU
    ``reduce-overhead`` records no CUDA graph, which is all this dry run can check)."""
    configs = _configs("compiled")
    results = _run_profile(configs, {"HYPERCONN_KERNELS": "torch"}, tmp_path, 1200)
    assert sorted(results) == sorted(configs)
