"""Every Python code block in README.md and docs/*.md runs as written.

Each page's blocks run in order in one namespace (a page is one example, read top to
bottom), in a temporary working directory so that examples which write files leave
nothing behind.
"""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Pages whose examples need an optional extra.
NEEDS = {"integrations.md": "transformers", "timm.md": "timm"}


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_readme_has_examples():
    assert len(python_blocks(ROOT / "README.md")) >= 3


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path, monkeypatch):
    if page.name in NEEDS:
        pytest.importorskip(NEEDS[page.name])
    monkeypatch.chdir(tmp_path)
    from hyperconn.variants import base
    registry = dict(base._REGISTRY)  # a page may define a variant of its own: undo it after
    namespace: dict = {"__name__": "__doc_example__"}
    try:
        for i, block in enumerate(python_blocks(page)):
            exec(compile(block, f"{page.name} block {i + 1}", "exec"), namespace)
    finally:
        base._REGISTRY.clear()
        base._REGISTRY.update(registry)
    assert os.getcwd() == str(tmp_path)
