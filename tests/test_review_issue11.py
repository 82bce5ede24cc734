"""Regression tests for the confirmed review findings on the issue-11 code (traversals,
surgery, freezing, inspect, optimizer state checks): one test per finding."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import diffprog as dp
from diffprog import nn


class Wrapper(dp.Parameterized):
    """The delegating hand-written instance of docs/core.md."""

    inner: Any
    extra: torch.nn.Parameter

    def flatten_parameters(self) -> list[torch.nn.Parameter]:
        return [self.extra, *dp.flatten_parameters(self.inner)]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Wrapper:
        extra = stream.next_parameter()
        return Wrapper(stream.replace(self.inner), extra)


def _wrapper() -> Wrapper:
    return Wrapper(dp.sample(nn.LinearSpec(2, 2)), torch.nn.Parameter(torch.randn(3)))


class Listing(dp.Parameterized):
    """A hand-written instance listing its sub-model's tensors itself."""

    inner: Any
    extra: torch.nn.Parameter

    def flatten_parameters(self) -> list[torch.Tensor]:
        return [self.extra, self.inner.weight, self.inner.bias]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Listing:
        extra, weight, bias = (
            stream.next_parameter(),
            stream.next_parameter(),
            stream.next_parameter(),
        )
        return Listing(dataclasses.replace(self.inner, weight=weight, bias=bias), extra)


def test_freeze_inside_delegating_instance_is_refused_naming_the_place() -> None:
    w = _wrapper()
    with pytest.raises(dp.SurgeryError, match=r"inner\.weight.*Wrapper.*list that tensor itself"):
        dp.freeze(w, "inner.*")
    # an instance listing the tensors itself freezes and unfreezes them (round trip)
    listing = Listing(w.inner, w.extra)
    f = dp.freeze(listing, "inner.*")
    assert isinstance(f.inner.weight, dp.Frozen)
    assert dp.count_parameters(f) == dp.count_parameters(listing) == 9
    u = dp.unfreeze(f)
    assert type(u.inner.weight) is torch.nn.Parameter
    assert len(dp.flatten_parameters(u)) == 3


class Tied(dp.Parameterized):
    """A hand-written instance listing one tied Parameter twice."""

    enc: torch.nn.Parameter
    dec: torch.nn.Parameter

    def flatten_parameters(self) -> list[torch.nn.Parameter]:
        return [self.enc, self.dec]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Tied:
        return Tied(stream.next_parameter(), stream.next_parameter())


def test_tie_listed_twice_by_hand_written_instance_is_kept_by_at_and_freeze() -> None:
    w = torch.nn.Parameter(torch.randn(2))
    t = Tied(w, w)
    for name in ("enc", "dec"):
        r = dp.at(t, name).set(torch.zeros(2))
        assert r.enc is r.dec and r.enc.sum() == 0, name
    r = dp.at(t, lambda q: q.dec).set(torch.ones(2))
    assert r.enc is r.dec and r.enc.sum() == 2
    for filter in (None, "enc", "dec"):
        f = dp.freeze(t, filter)
        assert f.enc is f.dec and isinstance(f.enc, dp.Frozen), filter
        u = dp.unfreeze(f)
        assert u.enc is u.dec and type(u.enc) is torch.nn.Parameter
    assert dp.at(t, "dec").paths == ["dec"]
    # untie=True changes the one entry named
    r = dp.at(t, "dec").set(torch.zeros(2), untie=True)
    assert r.enc is w and r.dec.sum() == 0

