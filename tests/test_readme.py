"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    for block in blocks:  # every block, the controller example included, runs as written
        exec(compile(block, str(README), "exec"), {})


def _run_page(path):
    """Execute a page's python blocks in order, in one namespace (a page is one example)."""
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    assert blocks
    namespace = {}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)


def test_integrations_page_runs():
    import pytest
    pytest.importorskip("transformers")
    _run_page(README.parent / "docs" / "integrations.md")
