"""docs/transformations.md has issue 12's five sections, each with a runnable example (run by
tests/test_docs.py), and says what its tests pin."""

from __future__ import annotations

import pathlib
import re

import pytest

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "transformations.md"

# issue 12's section -> (the page's heading, a call its examples make)
SECTIONS = {
    "vmap / ensembles": ("## Ensembles and per-example gradients", "torch.func.vmap"),
    "per-example gradients": ("## Ensembles and per-example gradients", "per_example_grads("),
    "meta-learning": ("## Differentiable optimisation", "differentiable=True"),
    "compiling a step": ("## Compiled training steps and export", "compile_step("),
    "exporting": ("### Modules for tools that want them: `as_module`", "torch.export.export("),
}


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of its level or above (a line in a
    code block that starts with ``#`` is a comment, not a heading)."""
    level = len(heading.split(" ")[0])
    lines = text.splitlines(keepends=True)
    start = lines.index(heading + "\n") + 1
    fenced = False
    for end in range(start, len(lines)):
        line = lines[end]
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            return "".join(lines[start:end])
    return "".join(lines[start:])


@pytest.mark.parametrize("name", list(SECTIONS))
def test_each_section_of_the_issue_has_a_runnable_example(name: str) -> None:
    heading, call = SECTIONS[name]
    section = _section(PAGE.read_text(), heading)
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.DOTALL | re.MULTILINE)
    assert any(call in block for block in blocks), (name, call)


def test_the_dp_sgd_example_clips_and_adds_noise() -> None:
    section = _section(PAGE.read_text(), "## Ensembles and per-example gradients")
    assert "DP-SGD" in section
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", section, re.DOTALL) if "sigma" in b]
    assert "clamp(max=1.0)" in block and "torch.randn" in block and "apply_gradients" in block


def test_the_graph_breaks_and_the_reverse_of_as_module_are_documented() -> None:
    text = PAGE.read_text()
    assert "**Graph breaks.**" in text and "trace_autograd_ops" in text
    assert "`requires_grad_` there is rejected" in text
    assert "diffprog.nn.from_torch" in _section(
        text, "### Modules for tools that want them: `as_module`"
    )
