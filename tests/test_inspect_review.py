"""Regressions from the review of issue 11's inspecting code (each failed before its fix)."""

from __future__ import annotations

from collections.abc import Callable

import torch

import diffprog as dp


class Block(dp.Parameterized):
    weight: dp.Parameter
    name: str = "block"
    act: Callable[[torch.Tensor], torch.Tensor] = torch.tanh


def _p(*shape: int) -> dp.Parameter:
    return dp.make_independent(torch.ones(*shape))


def test_repr_never_folds_items_whose_shortened_text_hides_a_difference() -> None:
    # Folding compared the displayed text, which is shortened: these printed "2 x ...".
    deep = [{"a": {"b": {"c": _p(2)}}}, {"a": {"b": {"c": _p(7)}}}]
    assert " x " not in dp.tree_repr(deep, width=26)
    long_names = [Block(_p(2), "x" * 70 + "1"), Block(_p(2), "x" * 70 + "2")]
    assert " x Block" not in dp.tree_repr(long_names * 3, width=40)
    lambdas = [Block(_p(2), act=lambda x: 2 * x), Block(_p(2), act=lambda x: -x)]
    assert " x Block" not in dp.tree_repr(lambdas * 3, width=40)
    # what is truly identical still folds
    same = [Block(_p(2)) for _ in range(6)]
    assert "(0-5): 6 x Block" in dp.tree_repr(same, width=40)
