"""Lists in the docs that must follow the library: the tutorial names every optimizer with
differentiable steps."""

from __future__ import annotations

import pathlib
import re

import torch

import diffprog as dp
import diffprog.optim

CHAPTER_8 = pathlib.Path(__file__).resolve().parent.parent / "docs/tutorial/08-transformations.md"


def test_chapter_8_names_every_optimizer_with_differentiable_steps() -> None:
    pure = {
        name
        for name in diffprog.optim.__all__
        if isinstance(cls := getattr(diffprog.optim, name), type)
        and issubclass(cls, diffprog.optim.PureOptimizer)
        and cls is not diffprog.optim.PureOptimizer
    }
    model = {"w": dp.make_independent(torch.ones(3))}
    differentiable = {
        name
        for name in pure
        if getattr(diffprog.optim, name).init(model, differentiable=True).differentiable
    }
    text = " ".join(CHAPTER_8.read_text().split())
    found = re.search(r"Every pure optimizer \(([^)]*)\) has differentiable steps", text)
    assert found, "chapter 8 no longer says which optimizers have differentiable steps"
    listed = set(re.findall(r"`(\w+)`", found.group(1)))
    assert listed == differentiable == pure, (
        f"chapter 8 lists {sorted(listed)}; with differentiable steps: {sorted(differentiable)}"
        f"; pure optimizers: {sorted(pure)}"
    )
