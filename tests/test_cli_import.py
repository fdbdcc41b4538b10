"""``hyperconn --import MODULE`` / ``HYPERCONN_IMPORT``, and the CLI without the lab extra."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from hyperconn import cli
from test_cli import run_main


@pytest.fixture(autouse=True)
def _restore_import_env():
    """The CLI records --import in os.environ for child processes; undo it after each test
    so later subprocess tests (torchrun) do not inherit a temporary module name."""
    before = os.environ.get(cli.IMPORT_ENV)
    yield
    if before is None:
        os.environ.pop(cli.IMPORT_ENV, None)
    else:
        os.environ[cli.IMPORT_ENV] = before


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's own in tmp_path that records that it was imported."""
    name = "hc_user_mod_for_tests"
    (tmp_path / f"{name}.py").write_text("import hyperconn\nIMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(cli.IMPORT_ENV, "")  # recorded, so the CLI's own setting is undone after the test
    monkeypatch.delenv(cli.IMPORT_ENV)
    yield name
    sys.modules.pop(name, None)


def test_import_option_imports_before_the_command(user_module, capsys):
    code, out, _ = run_main(["--import", user_module, "train", "--help"], capsys)
    assert code == 0 and "--model.connection.variant" in out
    assert sys.modules[user_module].IMPORTED
    assert os.environ[cli.IMPORT_ENV] == user_module  # passed on to child processes


def test_import_option_equals_form_and_env_var(user_module, monkeypatch, capsys):
    monkeypatch.setenv(cli.IMPORT_ENV, f" {user_module} ,")
    code, _, _ = run_main(["--import=json", "train", "--help"], capsys)
    assert code == 0 and user_module in sys.modules
    assert os.environ[cli.IMPORT_ENV] == f"{user_module},json"


@pytest.mark.parametrize("argv, words", [
    (["--import", "no_such_module_xyz", "train"], "No module named 'no_such_module_xyz'"),
    (["--import"], "expected a module name"),
    (["--import", "--help"], "expected a module name"),
    (["--import=", "train"], "expected a module name"),
])
def test_bad_import_is_one_line_exit_2(argv, words, capsys, monkeypatch):
    monkeypatch.setenv(cli.IMPORT_ENV, "")  # recorded, so the CLI's own setting is undone after the test
    monkeypatch.delenv(cli.IMPORT_ENV)
    code, _, err = run_main(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--import" in lines[0] and words in lines[0], err


def test_a_failing_user_module_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "hc_broken_mod.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(cli.IMPORT_ENV, "")  # recorded, so the CLI's own setting is undone after the test
    monkeypatch.delenv(cli.IMPORT_ENV)
    code, _, err = run_main(["--import", "hc_broken_mod", "train", "--help"], capsys)
    assert code == 2 and err.strip() == ("hyperconn: error: --import: cannot import 'hc_broken_mod': "
                                         "RuntimeError: boom")


def test_console_script_imports_from_the_current_directory(tmp_path):
    (tmp_path / "hc_cwd_mod.py").write_text("import sys\nimport hyperconn\nprint('imported', file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != cli.IMPORT_ENV}
    r = subprocess.run([sys.executable, "-c", "import sys; from hyperconn.cli import main; "
                        "sys.exit(main(['--import', 'hc_cwd_mod', 'train', '--help']))"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and "imported" in r.stderr


# ---------------------------------------------------------------------------- no lab extra
_BLOCKER = textwrap.dedent("""\
    import importlib.abc, sys

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _Block())
    """)


@pytest.mark.parametrize("blocked, argv", [
    ({"rich", "matplotlib", "tyro", "yaml", "filelock"}, ["train", "--steps", "1"]),
    ({"tyro"}, ["train"]),
    ({"rich"}, ["compare", "--preset", "smoke", "--out", "x"]),
    ({"matplotlib"}, ["report", "."]),
])
def test_cli_without_the_lab_extra_is_one_line_exit_2(tmp_path, blocked, argv):
    (tmp_path / "sitecustomize.py").write_text(_BLOCKER.format(blocked=sorted(blocked)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "hyperconn.cli", *argv], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith('hyperconn\'s lab needs: pip install "hyperconn[lab]"')
    assert all(name in lines[0] for name in blocked)
    assert not (tmp_path / "x").exists()


def test_bench_needs_only_rich(tmp_path):
    """`hyperconn bench` runs without matplotlib, tyro, yaml and filelock (a GPU machine
    without network gets it with one wheel); without rich it is the one-line exit 2."""
    def run(blocked):
        (tmp_path / "sitecustomize.py").write_text(_BLOCKER.format(blocked=sorted(blocked)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
        return subprocess.run([sys.executable, "-m", "hyperconn.cli", "bench", "layer", "--help"],
                              capture_output=True, text=True, cwd=tmp_path, env=env)
    r = run({"matplotlib", "tyro", "yaml", "filelock"})
    assert r.returncode == 0 and "--streams" in r.stdout, r.stderr
    r = run({"rich"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        'hyperconn\'s lab needs: pip install "hyperconn[lab]" (missing: rich)']


def test_help_and_version_need_no_lab_packages(monkeypatch, capsys):
    for name in cli.LAB_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    assert run_main(["--help"], capsys)[0] == 0
    assert run_main(["--version"], capsys)[0] == 0
    code, _, err = run_main(["bench"], capsys)
    assert code == 2 and err.startswith("hyperconn's lab needs")
