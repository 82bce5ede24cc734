"""Property tests over randomly generated nested models."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
from diffprog._errors import state_dict_path


class Two(dp.Parameterized):
    left: Any
    right: Any
    label: str = "two"


class One(dp.Parameterized):
    inner: Any


class Pair(NamedTuple):
    first: Any
    second: Any


@dataclasses.dataclass
class Record:
    value: Any


shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
parameters = shapes.map(lambda s: dp.make_independent(torch.randn(s)))
leaves = st.one_of(
    parameters,
    parameters,
    shapes.map(torch.zeros),  # a constant: never a parameter
    st.integers(-3, 3),
    st.text(max_size=3),
    st.none(),
    st.just(torch.tanh),
)


def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text("abc", min_size=1, max_size=2), children, max_size=3),
        st.builds(Two, children, children),
        st.builds(One, children),
        st.builds(Pair, children, children),
        st.builds(Record, children),
    )


models = st.recursive(leaves, extend, max_leaves=12)


def reference_flatten(value: Any) -> list[dp.Parameter]:
    """An independent statement of the order: depth first, declaration order, each once."""
    out: list[dp.Parameter] = []

    def visit(v: Any) -> None:
        if isinstance(v, dp.Parameter):
            if all(p is not v for p in out):
                out.append(v)
        elif isinstance(v, torch.Tensor):
            return
        elif dataclasses.is_dataclass(v):
            for f in dataclasses.fields(v):
                visit(getattr(v, f.name))
        elif isinstance(v, (list, tuple)):
            for item in v:
                visit(item)
        elif isinstance(v, dict):
            for item in v.values():
                visit(item)

    visit(value)
    return out


def fresh_like(params: list[dp.Parameter]) -> list[dp.Parameter]:
    return [dp.make_independent(torch.randn(p.shape)) for p in params]


@settings(max_examples=150, deadline=None)
@given(models)
def test_flatten_order_is_depth_first_declaration_order(model: Any) -> None:
    assert [id(p) for p in dp.flatten_parameters(model)] == [
        id(p) for p in reference_flatten(model)
    ]
    names = dp.named_parameters(model)
    assert [id(p) for _, p in names] == [id(p) for p in dp.flatten_parameters(model)]
    assert len({n for n, _ in names}) == len(names)


@settings(max_examples=150, deadline=None)
@given(models)
def test_round_trip_and_purity(model: Any) -> None:
    old = dp.flatten_parameters(model)
    old_values = [p.detach().clone() for p in old]
    names = [n for n, _ in dp.named_parameters(model)]

    same = dp.replace_parameters(model, old)
    assert [id(p) for p in dp.flatten_parameters(same)] == [id(p) for p in old]

    new = fresh_like(old)
    replaced = dp.replace_parameters(model, new)
    assert type(replaced) is type(model)
    assert [id(p) for p in dp.flatten_parameters(replaced)] == [id(p) for p in new]
    assert [n for n, _ in dp.named_parameters(replaced)] == names
    # the old model still holds its old parameters, unchanged
    assert [id(p) for p in dp.flatten_parameters(model)] == [id(p) for p in old]
    assert all(torch.equal(p, v) for p, v in zip(old, old_values, strict=True))


@settings(max_examples=100, deadline=None)
@given(models, st.data())
def test_ties_flatten_once_and_survive_replace(model: Any, data: st.DataObject) -> None:
    params = dp.flatten_parameters(model)
    if not params:
        return
    tied = data.draw(st.sampled_from(params))
    doubled = (model, [tied], model)
    assert [id(p) for p in dp.flatten_parameters(doubled)] == [id(p) for p in params]
    new = fresh_like(params)
    out = dp.replace_parameters(doubled, new)
    index = next(i for i, p in enumerate(params) if p is tied)
    assert out[1][0] is new[index]
    assert [id(p) for p in dp.flatten_parameters(out[0])] == [id(p) for p in new]
    assert [id(p) for p in dp.flatten_parameters(out[2])] == [id(p) for p in new]


@settings(max_examples=100, deadline=None)
@given(models, st.data())
def test_every_error_names_the_slot(model: Any, data: st.DataObject) -> None:
    params = dp.flatten_parameters(model)
    names = [n for n, _ in dp.named_parameters(model)]
    with pytest.raises(dp.ParameterCountError, match="left unconsumed"):
        dp.replace_parameters(model, [*params, dp.make_independent(torch.zeros(1))])
    if not params:
        return
    with pytest.raises(dp.ParameterCountError, match="too few") as few:
        dp.replace_parameters(model, params[:-1])
    assert state_dict_path(few.value.path_keys) == names[-1]

    k = data.draw(st.integers(0, len(params) - 1))
    wrong = list(params)
    wrong[k] = dp.make_independent(torch.zeros(*params[k].shape, 5))
    with pytest.raises(dp.ParameterShapeError) as shape:
        dp.replace_parameters(model, wrong)
    assert state_dict_path(shape.value.path_keys) == names[k]

    wrong[k] = "not a tensor"  # type: ignore[call-overload]
    with pytest.raises(dp.ParameterTypeError) as kind:
        dp.replace_parameters(model, wrong)
    assert state_dict_path(kind.value.path_keys) == names[k]
