"""Every ```python block of the README and of each page under docs/ runs, page by page, and
prints what its printed-output comments say; the API reference documents every public name."""

from __future__ import annotations
import __future__

import ast
import contextlib
import functools
import importlib
import io
import operator
import pathlib
import pkgutil
import re
import sys
import textwrap
import types

import pytest
import yaml

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
# A fence opens a block at any indent (in a list item, an admonition); its info string is a
# language, or a pymdownx attribute list, then attributes: ```py title="x.py"``` or
# ```{.python .annotate}```. It closes on a fence of the same character, at least as long, and
# nothing else on the line.
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
PYTHON = {"python", "py", "python3"}
# Blocks that are not run, and the only other languages a page may use: plain text (output,
# a signature), shell commands, Haskell (the guide from Hasktorch), configuration files. A
# block in another language (a typo such as ``pyhton``, a ``pycon`` session) fails the test:
# it would show as code on the site and never run.
NOT_RUN = {"", "text", "console", "bash", "shell", "sh", "haskell", "yaml", "toml", "json"}


def _name(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _language(info: str) -> str:
    """The language of a fence's info string: ``py title="x"`` -> py, ``{.python}`` -> python."""
    if info.startswith("{"):
        found = re.search(r"\.([\w+-]+)", info)
        return found.group(1).lower() if found else ""
    return info.split(maxsplit=1)[0].lower() if info else ""


def _fences(text: str) -> list[tuple[int, str, str]]:
    """Each fenced block of ``text``: (its first line's number, its language, its code, with the
    fence's indent removed)."""
    blocks: list[tuple[int, str, str]] = []
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        opened = FENCE.match(lines[number])
        number += 1
        if opened is None:
            continue
        start, indent, fence = number, len(opened["indent"]), opened["fence"]
        body = []
        while number < len(lines):
            closed = FENCE.match(lines[number])
            number += 1
            if (
                closed is not None
                and not closed["info"]
                and closed["fence"][0] == fence[0]
                and len(closed["fence"]) >= len(fence)
            ):
                break
            line = lines[number - 1]
            body.append(line[min(indent, len(line) - len(line.lstrip(" \t"))) :])
        blocks.append((start, _language(opened["info"]), "".join(f"{b}\n" for b in body)))
    return blocks


def _python_blocks(text: str, name: str) -> list[str]:
    """The Python blocks of a page, in order; fails on a block in a language not listed."""
    blocks = _fences(text)
    unknown = [
        f"{name}:{line}: ```{language}"
        for line, language, _ in blocks
        if language not in PYTHON | NOT_RUN
    ]
    assert not unknown, (
        f"fenced blocks in a language neither run (python, py) nor listed in NOT_RUN: {unknown}"
    )
    return [code for _, language, code in blocks if language in PYTHON]


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_page_examples_run(
    page: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = _python_blocks(page.read_text(), _name(page))
    assert blocks or _name(page) in NO_EXAMPLES, f"{_name(page)} has no runnable example"
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    # The blocks of a page run in order in one module, as a reader would paste them.
    stem = re.sub(r"\W", "_", page.relative_to(ROOT).with_suffix("").as_posix())
    module = types.ModuleType(f"docs_{stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    wrong = []
    for number, code in enumerate(blocks, 1):
        wrong += _run_block(code, f"{_name(page)} block {number}", module.__dict__)
    assert not wrong, "printed-output comments that differ from what the code prints:\n" + (
        "\n".join(wrong)
    )


# Printed-output comments: ``print(EXPR)  # what it prints`` on one line, at the top level of a
# block, and the indented comment lines right below it (``    # ...``) that continue it.
FUTURE_FLAGS = functools.reduce(
    operator.or_, (getattr(__future__, name).compiler_flag for name in __future__.all_feature_names)
)


def _printed_comment(statement: ast.stmt, lines: list[str]) -> str | None:
    """The comment that says what ``statement`` prints, if it is a one-line top-level
    ``print(...)`` followed by one (None otherwise)."""
    if not (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Call)
        and isinstance(statement.value.func, ast.Name)
        and statement.value.func.id == "print"
        and statement.col_offset == 0
        and statement.lineno == statement.end_lineno
        and statement.end_col_offset is not None
    ):
        return None
    rest = lines[statement.lineno - 1][statement.end_col_offset :].strip()
    if not rest.startswith("#"):
        return None
    comment = [rest[1:]]
    for line in lines[statement.lineno :]:
        if not re.match(r"^[ \t]+#", line):
            break
        comment.append(line.strip()[1:])
    return "\n".join(comment)


def _says(comment: str, printed: str) -> bool:
    """Whether ``printed`` is what ``comment`` says, whitespace normalised, ``...`` standing
    for any text; the comment may go on after the printed text with ``: `` and a remark
    (``# 499: every parameter``)."""
    shown = " ".join(printed.split())
    candidates = [comment] + [
        comment[:at] for at in range(len(comment)) if comment[at:].startswith(": ")
    ]
    return any(_matches(candidate, shown) for candidate in candidates)


def _matches(comment: str, shown: str) -> bool:
    parts = [re.escape(" ".join(part.split())) for part in comment.split("...")]
    return re.fullmatch(" ?(.*?) ?".join(parts), shown, re.DOTALL) is not None


def _run_block(code: str, filename: str, namespace: dict[str, object]) -> list[str]:
    """Run ``code`` in ``namespace`` statement by statement; the printed-output comments that
    differ from what their ``print`` printed."""
    flags = compile(code, filename, "exec", dont_inherit=True).co_flags & FUTURE_FLAGS
    lines = code.splitlines()
    wrong: list[str] = []
    pending: list[ast.stmt] = []

    def run(statements: list[ast.stmt]) -> None:
        module = ast.Module(body=statements, type_ignores=[])
        exec(compile(module, filename, "exec", flags=flags, dont_inherit=True), namespace)

    for statement in ast.parse(code, filename).body:
        comment = _printed_comment(statement, lines)
        if comment is None:
            pending.append(statement)
            continue
        run(pending)
        pending = []
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run([statement])
        if not _says(comment, out.getvalue()):
            wrong.append(
                f"{filename}, line {statement.lineno}: prints {out.getvalue().strip()!r}, "
                f"the comment says {comment.strip()!r}"
            )
    run(pending)
    return wrong


# --- the API reference: a page per public module, every name of its __all__ documented ---

API = DOCS / "api"
DIRECTIVE = re.compile(r"^::: ([\w.]+)$", re.MULTILINE)
# A module's entry with its options (the indented YAML lines below it).
MODULE_ENTRY = re.compile(r"^::: ([\w.]+)\n((?:[ \t]+.*\n)*)", re.MULTILINE)
# A re-exported name may be listed as a cross-reference to where it is documented:
# [`save_params`][diffprog.serialize.save_params] on the page of diffprog.
CROSS_REFERENCE = re.compile(r"\[`(\w+)`\]\[([\w.]+)\]")


def _public_modules(package: types.ModuleType = diffprog) -> list[str]:
    """The package and its public modules, plain modules as well as subpackages (not
    ``_private`` ones, nor the examples)."""
    found = pkgutil.iter_modules(package.__path__)
    names = [m.name for m in found if not m.name.startswith("_") and m.name != "examples"]
    return [package.__name__, *sorted(f"{package.__name__}.{name}" for name in names)]


def _page(module: str, api: pathlib.Path = API) -> pathlib.Path:
    return api / f"{module.rsplit('.', 1)[-1]}.md"


def _resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _rendered_members(options_block: str) -> bool | set[str]:
    """What a module's entry renders, from its mkdocstrings options: every name of its
    ``__all__`` (True: ``members`` absent, null or true, and no ``filters`` of its own that
    could hide some), or only the names its ``members`` list gives (false, [] or a list)."""
    loaded = yaml.safe_load(textwrap.dedent(options_block)) if options_block.strip() else None
    options = loaded.get("options") if isinstance(loaded, dict) else None
    options = options if isinstance(options, dict) else {}
    members = options.get("members")
    if isinstance(members, list):
        return {str(m) for m in members}
    if (members is None or members is True) and "filters" not in options:
        return True
    return set()


def _undocumented(api: pathlib.Path, modules: list[str]) -> list[str]:
    """The names of the ``__all__`` of ``modules`` that the pages in ``api`` do not document:
    neither an entry of their own, nor a module entry that renders them, nor a cross-reference
    to the entry of the same object elsewhere."""
    documented = {
        target: _resolve(target)
        for page in api.glob("*.md")
        for target in DIRECTIVE.findall(page.read_text())
        if "." in target and target not in modules
    }
    missing = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        page = _page(module_name, api)
        assert page.exists(), f"{module_name} has no page in {api}"
        text = page.read_text()
        assert f"::: {module_name}\n" in text, f"{page.name} lacks ::: {module_name}"
        linked = dict(CROSS_REFERENCE.findall(text))
        rendered = [
            _rendered_members(options)
            for target, options in MODULE_ENTRY.findall(text + "\n")
            if target == module_name
        ]
        for name in module.__all__:
            obj = getattr(module, name)
            here = f"{module_name}.{name}" in documented or any(
                r is True or name in r for r in rendered
            )
            # a cross-reference counts if it names this object's entry elsewhere
            there = name in linked and documented.get(linked[name]) is obj
            if not (here or there):
                missing.append(f"{module_name}.{name}")
    return missing


def test_api_reference_documents_every_public_name() -> None:
    missing = _undocumented(API, _public_modules())
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


# --- the checks' own holes (issue 14's review): each input below slipped through before ---

_HIDDEN_BLOCKS = """# A page

```python
x = 1
```

```python title="example.py"
x += 10
```

```py
x += 100
```

!!! tip
    ```python
    x += 1000
    ```

1. A step:

    ```{.python .annotate}
    def f() -> int:
        return 7

    x += 10000 * f()
    ```

~~~~python
s = '''
```
'''
~~~~

```text
x = "not run"
```
"""


def test_every_python_fence_is_found_and_dedented() -> None:
    blocks = _python_blocks(_HIDDEN_BLOCKS, "page.md")
    assert len(blocks) == 6
    namespace: dict[str, object] = {}
    for code in blocks:
        exec(code, namespace)
    assert namespace["x"] == 71111
    assert namespace["s"] == "\n```\n"


@pytest.mark.parametrize("fence", ["```pyhton", "```pycon", "```{.pycon}", "  ```Python3x"])
def test_a_fence_in_an_unlisted_language_fails(fence: str) -> None:
    with pytest.raises(AssertionError, match="language neither run"):
        _python_blocks(f"# A page\n\n{fence}\nx = 1\n```\n", "page.md")


def _api_copy(tmp_path: pathlib.Path, page: str, edit: dict[str, str]) -> pathlib.Path:
    """A docs/api folder holding only ``page``, with each ``edit`` (old -> new) made once."""
    text = (API / page).read_text()
    for old, new in edit.items():
        assert text.count(old) == 1, f"{page}: {old!r} is not there once"
        text = text.replace(old, new)
    api = tmp_path / "api"
    api.mkdir()
    (api / page).write_text(text)
    return api


def test_a_module_entry_listing_members_documents_only_those(tmp_path: pathlib.Path) -> None:
    import diffprog.serialize as serialize

    api = _api_copy(tmp_path, "serialize.md", {"members: false": "members: [state_dict]"})
    text = (api / "serialize.md").read_text()
    (api / "serialize.md").write_text(
        re.sub(r"^::: diffprog\.serialize\.\w+\n", "", text, flags=re.M)
    )
    missing = _undocumented(api, ["diffprog.serialize"])
    assert missing == [f"diffprog.serialize.{n}" for n in serialize.__all__ if n != "state_dict"]


@pytest.mark.parametrize(
    ("members", "hides"),
    [
        ("members: False", True),
        ("members: no", True),
        ("members: []", True),
        ("members: [Sequential]", True),
        ("filters: ['!^Linear$']", True),
        ("members: true", False),
        ("members: null", False),
        ("show_source: true", False),
    ],
)
def test_module_entry_options_are_read_as_yaml(
    tmp_path: pathlib.Path, members: str, hides: bool
) -> None:
    api = _api_copy(tmp_path, "nn.md", {"members: false": members, "::: diffprog.nn.Linear\n": ""})
    missing = _undocumented(api, ["diffprog.nn"])
    assert missing == (["diffprog.nn.Linear"] if hides else [])


def test_plain_modules_are_public_modules(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "fakepkg"
    for path in ["sub/__init__.py", "_private.py", "plain.py", "examples/__init__.py"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("__all__: list[str] = []\n")
    (root / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    package = importlib.import_module("fakepkg")
    try:
        assert _public_modules(package) == ["fakepkg", "fakepkg.plain", "fakepkg.sub"]
    finally:
        del sys.modules["fakepkg"]


_PRINTS = """x = 3
print(x)  # 3
print(x * 2)  # 6: a remark after the printed text
print(list(range(30)))  # [0, 1, ..., 29]
print("a\\n   b")  # a
                #  b
print("w = 2.0000")  # w = 2.0000
for i in range(2):
    print(i)  # indented: not compared
"""


def test_printed_output_comments_that_match_pass() -> None:
    assert _run_block(_PRINTS, "page.md block 1", {}) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("# 3\n", "# 4\n"),
        ("# 6: a remark", "# 7: a remark"),
        ("# [0, 1, ..., 29]", "# [0, 1, ..., 28]"),
        ("#  b\n", "#  c\n"),
        ("# w = 2.0000", "# w = 7.0000"),
    ],
)
def test_a_wrong_printed_output_comment_fails(old: str, new: str) -> None:
    assert _PRINTS.count(old) == 1
    wrong = _run_block(_PRINTS.replace(old, new), "page.md block 1", {})
    assert len(wrong) == 1
    assert wrong[0].startswith("page.md block 1, line ")


def test_a_tutorial_page_with_a_wrong_comment_fails() -> None:
    # The review's case: chapter 1 with two printed-output comments changed.
    text = (DOCS / "tutorial" / "01-tensors.md").read_text()
    edits = {
        "# tensor(27., grad_fn=<MeanBackward0>)": "# tensor(99., grad_fn=<MeanBackward0>)",
        "# w = 2.0000": "# w = 7.0000",
    }
    for old, new in edits.items():
        assert text.count(old) == 1
        text = text.replace(old, new)
    namespace: dict[str, object] = {"__name__": "docs_wrong_chapter"}
    wrong = [
        problem
        for number, code in enumerate(_python_blocks(text, "01-tensors.md"), 1)
        for problem in _run_block(code, f"01-tensors.md block {number}", namespace)
    ]
    assert len(wrong) == 2
    assert "tensor(99." in wrong[0]
    assert "w = 7.0000" in wrong[1]
