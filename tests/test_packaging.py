"""The core library needs only torch and numpy: importing it never loads the lab's packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hyperconn.cli import LAB_MODULES

# Packages of the lab (the ``lab`` extra's users); everything else under hyperconn is core.
LAB_PACKAGES = ("hyperconn.train", "hyperconn.experiments", "hyperconn.report", "hyperconn.bench",
                "hyperconn.cli", "hyperconn.data")


def test_core_imports_no_lab_package():
    code = textwrap.dedent(f"""\
        import importlib, pkgutil, sys
        import hyperconn
        lab = {LAB_MODULES!r}
        assert not [m for m in lab if m in sys.modules], "import hyperconn loaded " + str([m for m in lab if m in sys.modules])
        skipped = []
        for info in pkgutil.walk_packages(hyperconn.__path__, "hyperconn."):
            if info.name.startswith({LAB_PACKAGES!r}):
                continue
            try:
                importlib.import_module(info.name)
            except ImportError as e:  # an optional extra (triton, transformers) not installed
                if e.name and e.name.split(".")[0] in lab:
                    raise
                skipped.append(info.name)
        loaded = [m for m in lab if m in sys.modules]
        assert not loaded, f"core modules loaded {{loaded}}"
        print("skipped", skipped)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_pyproject_core_dependencies_are_torch_and_numpy():
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["torch", "numpy"]
    extras = project["optional-dependencies"]
    lab = {d.split(">")[0].split("[")[0] for d in extras["lab"]}
    assert lab == {"rich", "matplotlib", "tyro", "pyyaml", "filelock"}
    assert lab <= {d.split(">")[0].split("[")[0] for d in extras["test"]}


def test_import_hyperconn_does_not_load_dynamo():
    """``torch._dynamo`` costs ~1.5 s to import; the library loads it only when compiling
    or when it first probes for Triton on CUDA, never at ``import hyperconn``."""
    code = "import sys, hyperconn; assert 'torch._dynamo' not in sys.modules, 'dynamo imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_wheel_ships_the_native_kernel_source(tmp_path):
    """The CPU kernels are compiled from ops/cpu_native.cpp on the user's machine: the
    built wheel must carry it."""
    import zipfile
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(root)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip()[-300:]}")
    (wheel,) = tmp_path.glob("hyperconn-*.whl")
    assert "hyperconn/ops/cpu_native.cpp" in zipfile.ZipFile(wheel).namelist()
