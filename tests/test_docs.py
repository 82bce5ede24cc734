"""Every ```python block of the README and of each page under docs/ runs, page by page; the
API reference documents every public name."""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import re
import sys
import types

import pytest

import diffprog

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Pages with no runnable example, by design (every other page must have one): the API
# reference is generated from the docstrings (whose examples run as doctests), the benchmarks
# page includes benchmarks/README.md (figures, no code), the tutorial's index is its table of
# contents. A listed page's blocks still run if it has any.
NO_EXAMPLES = {
    "docs/api/index.md",
    "docs/api/diffprog.md",
    "docs/api/nn.md",
    "docs/api/optim.md",
    "docs/api/func.md",
    "docs/api/serialize.md",
    "docs/api/distributed.md",
    "docs/benchmarks.md",
    "docs/tutorial/index.md",
}
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("**/*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _name(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_page_examples_run(
    page: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = BLOCK.findall(page.read_text())
    assert blocks or _name(page) in NO_EXAMPLES, f"{_name(page)} has no runnable example"
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    # The blocks of a page run in order in one module, as a reader would paste them.
    stem = re.sub(r"\W", "_", page.relative_to(ROOT).with_suffix("").as_posix())
    module = types.ModuleType(f"docs_{stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for number, code in enumerate(blocks, 1):
        exec(compile(code, f"{_name(page)} block {number}", "exec"), module.__dict__)


# --- the API reference: a page per public module, every name of its __all__ documented ---

API = DOCS / "api"
DIRECTIVE = re.compile(r"^::: ([\w.]+)$", re.MULTILINE)
# A module's entry with its options (indented lines below it); without ``members: false`` it
# renders every name of the module's __all__.
MODULE_ENTRY = re.compile(r"^::: ([\w.]+)\n((?:[ \t]+.*\n)*)", re.MULTILINE)
# A re-exported name may be listed as a cross-reference to where it is documented:
# [`save_params`][diffprog.serialize.save_params] on the page of diffprog.
CROSS_REFERENCE = re.compile(r"\[`(\w+)`\]\[([\w.]+)\]")


def _public_modules() -> list[str]:
    subpackages = pkgutil.iter_modules(diffprog.__path__)
    names = [f"diffprog.{m.name}" for m in subpackages if m.ispkg and m.name != "examples"]
    return ["diffprog", *sorted(n for n in names if not n.split(".")[-1].startswith("_"))]


def _page(module: str) -> pathlib.Path:
    return API / f"{module.rsplit('.', 1)[-1]}.md"


def _resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_api_reference_documents_every_public_name() -> None:
    documented = {
        target: _resolve(target)
        for page in API.glob("*.md")
        for target in DIRECTIVE.findall(page.read_text())
        if "." in target and target not in _public_modules()
    }
    missing = []
    for module_name in _public_modules():
        module = importlib.import_module(module_name)
        assert _page(module_name).exists(), f"{module_name} has no page in docs/api/"
        text = _page(module_name).read_text()
        assert f"::: {module_name}\n" in text, f"{_page(module_name).name} lacks ::: {module_name}"
        linked = dict(CROSS_REFERENCE.findall(text))
        whole = any(
            target == module_name and "members: false" not in options
            for target, options in MODULE_ENTRY.findall(text + "\n")
        )
        for name in module.__all__:
            obj = getattr(module, name)
            here = whole or f"{module_name}.{name}" in documented
            # a cross-reference counts if it names this object's entry elsewhere
            there = name in linked and documented.get(linked[name]) is obj
            if not (here or there):
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public names missing from docs/api/: {missing}"


def test_api_reference_documents_only_public_names() -> None:
    # An entry for a name its module does not export (renamed, removed, private) is stale.
    public = {f"{m}.{n}" for m in _public_modules() for n in importlib.import_module(m).__all__}
    stale = [
        f"{page.name}: {target}"
        for page in sorted(API.glob("*.md"))
        for target in DIRECTIVE.findall(page.read_text())
        if target not in public and target not in _public_modules()
    ]
    assert not stale, f"entries in docs/api/ for names no module exports: {stale}"
