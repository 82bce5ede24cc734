"""Training mode and the stateful-layer pattern: record, current, training."""

from __future__ import annotations

import contextvars
import dataclasses
import threading
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
from diffprog import nn


class Counter(dp.Parameterized):
    """A minimal stateful layer: counts its training-mode calls, adds its count."""

    count: int = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not nn.is_training():
            return x + self.count
        layer = nn.current(self)
        nn.record(self, dataclasses.replace(layer, count=layer.count + 1))
        return x + layer.count


class Pair(NamedTuple):
    first: Any
    second: Any


class Hidden(dp.Parameterized):
    """A hand-written instance: substitute cannot see inside it."""

    inner: Any

    def flatten_parameters(self) -> list[Any]:
        return []

    def replace_own_parameters(self, stream: dp.ParamStream) -> Hidden:
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)  # type: ignore[no-any-return]


def run(model: Any) -> Any:
    return nn.training(lambda m: m(torch.zeros(())), model)


def test_mode_outside_and_inside_a_pass() -> None:
    assert not nn.is_training()
    assert nn.training_generator() is None
    g = torch.Generator()
    inside, _ = nn.training(
        lambda m: (nn.is_training(), nn.training_generator()), None, generator=g
    )
    assert inside == (True, g)
    assert not nn.is_training()
    counter = Counter()
    assert nn.current(counter) is counter
    nn.record(counter, Counter(5))  # outside a pass: nothing happens
    assert nn.current(counter) is counter


def test_mode_is_reset_after_an_error() -> None:
    def fail(m: Any) -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        nn.training(fail, Counter())
    assert not nn.is_training()


def test_generator_must_be_a_generator() -> None:
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        nn.training(lambda m: None, None, generator=0)  # type: ignore[arg-type]


def test_fn_gets_args_and_kwargs_but_not_the_generator() -> None:
    def fn(m: Any, a: int, *, b: int) -> tuple[Any, int, int]:
        return m, a, b

    result, model = nn.training(fn, "model", 1, b=2, generator=torch.Generator())
    assert result == ("model", 1, 2)
    assert model == "model"


def test_unchanged_model_is_returned_as_is() -> None:
    model = {"a": [Counter()]}
    _, same = nn.training(lambda m: None, model)
    assert same is model


def test_eval_and_training_behaviour() -> None:
    c = Counter(3)
    assert c(torch.zeros(())).item() == 3
    out, new = run(c)
    assert out.item() == 3
    assert new.count == 4
    assert c.count == 3  # the layer given is unchanged


def test_shared_layer_updates_twice_and_stays_shared() -> None:
    c = Counter()

    class Twice(dp.Parameterized):
        a: Counter
        b: Counter

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    out, new = run(Twice(c, c))
    assert out.item() == 1  # the second call saw the first call's update
    assert new.a is new.b
    assert new.a.count == 2


def test_containers_are_rebuilt_with_their_types() -> None:
    model = Pair([Counter(), {"k": (Counter(1),)}], Counter(2))

    def fn(m: Pair) -> torch.Tensor:
        x = torch.zeros(())
        return m.first[0](x) + m.first[1]["k"][0](x) + m.second(x)

    _, new = nn.training(fn, model)
    assert isinstance(new, Pair)
    assert isinstance(new.first, list)
    assert isinstance(new.first[1]["k"], tuple)
    assert [new.first[0].count, new.first[1]["k"][0].count, new.second.count] == [1, 2, 3]
    assert [model.first[0].count, model.first[1]["k"][0].count, model.second.count] == [0, 1, 2]


def test_lost_updates_are_an_error() -> None:
    outside = Counter()
    with pytest.raises(nn.StateUpdateError, match=r"1 stateful layer\(s\) \(Counter\)"):
        nn.training(lambda m: outside(torch.zeros(())), {"other": Counter()})
    with pytest.raises(dp.DiffprogError, match="not part of the model"):
        run(Hidden(Counter()))
    # A copy made inside fn (new parameters, so a new layer) is not the model given.
    bn = dp.sample(nn.BatchNorm1dSpec(2))

    def copy_then_call(m: list[Any]) -> torch.Tensor:
        fresh = [dp.make_independent(p.detach()) for p in dp.flatten_parameters(m)]
        return dp.replace_parameters(m, fresh)[0](torch.randn(4, 2))  # type: ignore[no-any-return]

    with pytest.raises(nn.StateUpdateError, match="BatchNorm1d"):
        nn.training(copy_then_call, [bn])


def test_nested_passes_hand_updates_outwards() -> None:
    inner_model = [Counter()]
    model = {"inner": inner_model, "other": Counter()}
    g = torch.Generator()

    def outer(m: Any) -> Any:
        m["other"](torch.zeros(()))
        m["inner"][0](torch.zeros(()))  # count 0 -> 1 in the outer pass
        (seen, gen), new_inner = nn.training(
            lambda inner: (inner[0](torch.zeros(())), nn.training_generator()), m["inner"]
        )
        assert gen is g  # inherited from the enclosing pass
        assert new_inner[0].count == 2  # started from the outer pass's version
        return seen

    seen, new = nn.training(outer, model, generator=g)
    assert seen.item() == 1
    assert new["inner"][0].count == 2
    assert new["other"].count == 1


def test_passes_are_private_to_threads_and_contexts() -> None:
    results: list[bool] = []

    def fn(m: Any) -> None:
        worker = threading.Thread(target=lambda: results.append(nn.is_training()))
        worker.start()
        worker.join()
        results.append(contextvars.copy_context().run(nn.is_training))

    nn.training(fn, None)
    assert results == [False, True]


@settings(max_examples=25, deadline=None)
@given(calls=st.lists(st.integers(0, 3), max_size=12))
def test_counts_equal_calls(calls: list[int]) -> None:
    """Whatever order layers are called in, each ends up counting its own calls."""
    layers = [Counter() for _ in range(4)]

    def fn(m: list[Counter]) -> list[int]:
        return [int(m[i](torch.zeros(())).item()) for i in calls]

    seen, new = nn.training(fn, layers)
    assert seen == [calls[:k].count(i) for k, i in enumerate(calls)]
    assert [layer.count for layer in new] == [calls.count(i) for i in range(4)]
    if not calls:
        assert new is layers


def test_a_stateful_layer_also_held_inside_a_hand_written_instance_is_refused() -> None:
    # Found by review: the pass updated the layer at its plain place only, silently leaving
    # the copy inside the hand-written instance behind.
    class Holder(dp.Parameterized):
        bn: Any

        def flatten_parameters(self) -> list[torch.Tensor]:
            return dp.flatten_parameters(self.bn)

        def replace_own_parameters(self, stream: dp.ParamStream) -> Holder:
            return Holder(stream.replace(self.bn))

    bn = dp.sample(nn.BatchNorm1dSpec(3), generator=torch.Generator().manual_seed(0))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(nn.StateUpdateError, match="held inside a hand-written instance"):
        nn.training(lambda m, x: m[0](x).sum(), (bn, Holder(bn)), x)
    # a hand-written instance holding only layers the pass does not update is fine
    lin = dp.sample(nn.LinearSpec(3, 3), generator=torch.Generator().manual_seed(2))
    _, new = nn.training(lambda m, x: m[0](x).sum(), (bn, Holder(lin)), x)
    assert not torch.equal(new[0].running_mean, bn.running_mean)
