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
