"""Every ```python block of the README and of each page in docs/ runs, page by page."""

from __future__ import annotations

import pathlib
import re
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Every page but the map (index.md) is a capability page with runnable examples.
PAGES = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "index.md"),
]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_examples_run(
    page: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = BLOCK.findall(page.read_text())
    assert blocks, f"{page.name} has no runnable example"
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    # The blocks of a page run in order in one module, as a reader would paste them.
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for number, code in enumerate(blocks, 1):
        exec(compile(code, f"{page.name} block {number}", "exec"), module.__dict__)
