"""The checks of ``replace_parameters`` along chains of replaces, edits and copies.

(Once the tests of the slot signatures a replace remembered; issue 9 deleted that memory, and
these tests keep pinning the behaviour: a wrong replacement is always refused, a right one
always accepted, and nothing is kept alive or carried by copies.)
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp


class Block(dp.Parameterized):
    weight: dp.Parameter
    bias: dp.Parameter


class Net(dp.Parameterized):
    blocks: list[Block]
    scale: float = 1.0


def param(*shape: int, dtype: torch.dtype = torch.float32) -> dp.Parameter:
    return dp.make_independent(torch.randn(*shape).to(dtype))


def net(*sizes: int) -> Net:
    return Net([Block(param(n, n), param(n)) for n in sizes])


def fresh(model: Any) -> list[dp.Parameter]:
    return [dp.make_independent(p.detach() + 1) for p in dp.flatten_parameters(model)]


def test_a_chain_of_replaces_still_rejects_a_wrong_shape_at_every_step() -> None:
    model = net(2, 3)
    for _ in range(3):
        model = dp.replace_parameters(model, fresh(model))
        wrong = fresh(model)
        wrong[2] = param(4, 4)
        with pytest.raises(dp.ParameterShapeError) as info:
            dp.replace_parameters(model, wrong)
        assert info.value.path == "blocks[1].weight"


def test_the_same_model_replaced_again_still_rejects_a_wrong_dtype() -> None:
    model = net(2)
    dp.replace_parameters(model, fresh(model))
    wrong = fresh(model)
    wrong[1] = param(2, dtype=torch.float64)
    with pytest.raises(dp.ParameterShapeError, match="float64"):
        dp.replace_parameters(model, wrong)
    with pytest.raises(dp.ParameterTypeError):
        dp.replace_parameters(model, [wrong[0], 3.0])


def test_a_slot_swapped_in_a_list_inside_the_model_is_read_afresh() -> None:
    model = net(2, 2)
    dp.replace_parameters(model, fresh(model))
    # Lists inside a frozen model can still be edited: the next replace checks the new slots.
    model.blocks[1] = Block(param(5, 5), param(5))
    grown = fresh(model)
    assert [tuple(p.shape) for p in grown][2:] == [(5, 5), (5,)]
    rebuilt = dp.replace_parameters(model, grown)
    assert rebuilt.blocks[1].weight is grown[2]
    stale = [*grown[:2], param(2, 2), param(2)]
    with pytest.raises(dp.ParameterShapeError):
        dp.replace_parameters(model, stale)


def test_a_freed_slot_whose_id_is_reused_cannot_fool_the_check() -> None:
    model = net(3)
    dp.replace_parameters(model, fresh(model))
    for _ in range(20):  # freed tensors' ids are typically reused by the next tensor made
        model.blocks[0] = Block(param(4, 4), param(4))
        gc.collect()
        with pytest.raises(dp.ParameterShapeError):
            dp.replace_parameters(model, [param(3, 3), param(3)])
        assert dp.replace_parameters(model, [param(4, 4), param(4)]).blocks[0].weight.shape == (
            4,
            4,
        )


def test_a_tie_introduced_by_the_new_parameters_is_handled_at_the_next_replace() -> None:
    model = Net([Block(param(2, 2), param(2)), Block(param(2, 2), param(2))])
    shared = param(2)
    tied = dp.replace_parameters(model, [param(2, 2), shared, param(2, 2), shared])
    assert tied.blocks[0].bias is tied.blocks[1].bias
    assert len(dp.flatten_parameters(tied)) == 3
    again = dp.replace_parameters(tied, fresh(tied))
    assert again.blocks[0].bias is again.blocks[1].bias
    with pytest.raises(dp.ParameterCountError, match="1 parameters left unconsumed"):
        dp.replace_parameters(tied, [param(2, 2), param(2), param(2, 2), param(2)])


def test_copies_and_pickles_replace_and_check() -> None:
    model = dp.replace_parameters(net(2), fresh(net(2)))
    dp.replace_parameters(model, fresh(model))
    for clone in (copy.copy(model), copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone) is Net
        rebuilt = dp.replace_parameters(clone, fresh(clone))
        torch.testing.assert_close(rebuilt.blocks[0].bias, clone.blocks[0].bias + 1)
        with pytest.raises(dp.ParameterShapeError):
            dp.replace_parameters(clone, [param(2, 2), param(3)])


def test_a_replace_keeps_nothing_alive_beyond_its_model() -> None:
    model = dp.replace_parameters(net(2), fresh(net(2)))
    dp.replace_parameters(model, fresh(model))
    watched = weakref.ref(model.blocks[0].weight)
    del model
    gc.collect()
    assert watched() is None


def test_every_kind_of_root_is_checked() -> None:
    for root in ((Block(param(2), param(2)),), [Block(param(2), param(2))], {"a": param(2)}):
        assert dp.replace_parameters(root, fresh(root)) is not root
        with pytest.raises(dp.ParameterShapeError):
            dp.replace_parameters(root, [param(3)] * len(dp.flatten_parameters(root)))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    steps=st.integers(0, 3),
    corrupt=st.one_of(st.none(), st.tuples(st.integers(0, 7), st.sampled_from(["shape", "dtype"]))),
)
def test_after_any_chain_of_replaces_a_replacement_is_accepted_exactly_when_it_fits(
    sizes: list[int], steps: int, corrupt: tuple[int, str] | None
) -> None:
    model = net(*sizes)
    for _ in range(steps):
        model = dp.replace_parameters(model, fresh(model))
    new = fresh(model)
    if corrupt is None:
        rebuilt = dp.replace_parameters(model, new)
        assert dp.flatten_parameters(rebuilt) == new
        return
    index, how = corrupt
    index %= len(new)
    old = new[index]
    new[index] = param(*[s + 1 for s in old.shape]) if how == "shape" else old.detach().double()
    with pytest.raises(dp.ParameterShapeError):
        dp.replace_parameters(model, new)


class Hidden:
    """A plain object hiding a parameter, for the error paths of the generated functions."""

    def __init__(self) -> None:
        self.w = param(1)


class Wide(dp.Parameterized):
    first: dp.Parameter
    second: float
    third: Any
    fourth: dp.Parameter


def test_errors_from_generated_code_name_the_field_they_came_from() -> None:
    model = Wide(param(1), 1.0, Hidden(), param(1))
    with pytest.raises(dp.HiddenParameterError) as info:
        dp.flatten_parameters(model)
    assert info.value.path == "third.w"
    with pytest.raises(dp.HiddenParameterError) as info:
        dp.replace_parameters(model, [param(1), param(1)])
    assert info.value.path == "third.w"
    good = Wide(param(1), 1.0, None, param(1))
    with pytest.raises(dp.ParameterShapeError) as info:
        dp.replace_parameters(good, [param(1), param(2)])
    assert info.value.path == "fourth"


# --- found in review: each a regression test ---


class Copying(dp.Parameterized):
    """A hand-written instance that keeps copies, not the tensors it is given."""

    w: dp.Parameter

    def flatten_parameters(self) -> list[Any]:
        return [self.w]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Copying:
        return Copying(dp.make_independent(stream.next_parameter().detach().clone()))


def test_a_model_rebuilt_by_a_hand_written_instance_keeps_nothing_it_was_given() -> None:
    model = Net([Block(param(2, 2), param(2))]), Copying(param(3))
    holder = [Block(param(2, 2), param(2)), Copying(param(3))]
    for root in (model, Wrapper(holder)):
        given = fresh(root)
        watched = weakref.ref(given[-1])
        rebuilt = dp.replace_parameters(root, given)
        del given
        gc.collect()
        assert watched() is None and rebuilt is not None


class Wrapper(dp.Parameterized):
    parts: list[Any]


def test_a_class_with_its_own_getattr_replaces() -> None:
    class Config(dp.Parameterized):
        w: dp.Parameter
        options: dict[str, Any]

        def __getattr__(self, name: str) -> Any:
            return self.options[name]

    model = Config(param(2), {})
    for _ in range(2):
        model = dp.replace_parameters(model, [param(2)])
    with pytest.raises(dp.ParameterShapeError):
        dp.replace_parameters(model, [param(3)])


def test_containers_shared_at_two_paths_stay_shared() -> None:
    class Pair(dp.Parameterized):
        enc: Any
        dec: Any

    class Holder(dp.Parameterized):
        d: dict[str, Any]

    class Fresh(dp.Parameterized):
        """A parameter-free hand-written instance that rebuilds itself."""

        tag: str = "x"

        def flatten_parameters(self) -> list[Any]:
            return []

        def replace_own_parameters(self, stream: dp.ParamStream) -> Fresh:
            return Fresh(self.tag)

    w = param(2)
    for shared in ([{"w": w}], ({"w": w},), Holder({"w": w}), [Fresh(), {"w": w}]):
        model = Pair(shared, shared)
        new = dp.replace_parameters(model, [param(2)])
        assert new.enc is new.dec
        assert len(dp.flatten_parameters(new)) == 1
    cell = Copying(param(3))
    model = Pair(cell, cell)
    new = dp.replace_parameters(model, [param(3)])
    assert new.enc is new.dec


def test_a_tie_into_a_hand_written_instance_is_resolved() -> None:
    class Plain(dp.Parameterized):
        w: dp.Parameter

    class Taking(dp.Parameterized):
        w: dp.Parameter

        def flatten_parameters(self) -> list[Any]:
            return [self.w]

        def replace_own_parameters(self, stream: dp.ParamStream) -> Taking:
            return Taking(stream.take(self.w))  # take() checks the shape against the slot

    p = param(2)
    model = [Plain(p), Taking(p), Plain(param(3))]
    new = dp.replace_parameters(model, [param(2), param(3)])
    assert new[0].w is new[1].w and new[2].w.shape == (3,)


def test_a_slot_changed_in_place_never_makes_a_right_replacement_fail() -> None:
    model = dp.replace_parameters(Block(param(3), param(3)), [param(3), param(3)])
    with torch.no_grad():
        model.weight.data = torch.zeros(5)
    # The replacement that fits the slot as it is now is accepted...
    rebuilt = dp.replace_parameters(model, [param(5), param(3)])
    assert rebuilt.weight.shape == (5,)
    # ...and the rebuilt model checks against its own slots from then on.
    with pytest.raises(dp.ParameterShapeError):
        dp.replace_parameters(rebuilt, [param(3), param(3)])


def test_every_kind_of_node_rebuilds_again_and_again() -> None:
    import collections
    import dataclasses
    from typing import NamedTuple

    class Pair(NamedTuple):
        a: Any
        b: Any

    @dataclasses.dataclass(frozen=True)
    class Plain:
        w: Any

    class Slotted(dp.Parameterized):
        __slots__ = ("extra",)
        w: dp.Parameter

    def model() -> Any:
        return Wide(
            param(1),
            2.0,
            [
                Pair(param(2), {"k": param(3)}),
                collections.OrderedDict(x=param(4)),
                collections.defaultdict(list, {"y": param(5)}),
                collections.deque([param(6)]),
                Plain(param(7)),
                Slotted(param(8)),
                Copying(param(9)),
                (torch.zeros(1), "static", torch.relu),
            ],
            param(10),
        )

    value = model()
    for step in range(3):
        new = fresh(value)
        value = dp.replace_parameters(value, new)
        got = dp.flatten_parameters(value)
        assert all(a is b for a, b in zip(got[:8], new[:8], strict=True)), (
            step
        )  # Copying keeps copies
        assert got[9] is new[9] and got[8] is not new[8]
        assert [p.shape[0] for p in dp.flatten_parameters(value)] == list(range(1, 11))
    with pytest.raises(dp.ParameterShapeError) as info:
        dp.replace_parameters(value, [*fresh(value)[:7], param(9), *fresh(value)[8:]])
    assert info.value.path == "third[5].w"


# --- found in the second review ---


def test_a_hand_written_instance_may_rebuild_temporaries_one_after_another() -> None:
    class TwoLists(dp.Parameterized):
        a: dp.Parameter
        b: dp.Parameter

        def flatten_parameters(self) -> list[Any]:
            return [self.a, self.b]

        def replace_own_parameters(self, stream: dp.ParamStream) -> TwoLists:
            (a,) = stream.replace([self.a])  # each list dies at once: its id may come again
            (b,) = stream.replace([self.b])
            return TwoLists(a, b)

    p = param(2)
    model = (TwoLists(param(2), param(3)), p, p)
    new = dp.replace_parameters(model, [param(2), param(3), param(2)])
    assert new[0].b.shape == (3,) and new[1] is new[2]


class Packed:
    """A pytree-registered type whose flatten builds a new container at every call."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        self.w, self.b = w, b


torch.utils._pytree.register_pytree_node(
    Packed, lambda v: ([(v.w, v.b)], None), lambda children, _: Packed(*children[0])
)


def test_a_pytree_type_flattening_into_temporaries_is_rebuilt_right() -> None:
    p = param(4)
    model = [Packed(param(2), param(3)), Packed(param(2), param(3)), p, p]
    new = dp.replace_parameters(model, fresh(model))
    assert [tuple(x.shape) for x in dp.flatten_parameters(new)] == [(2,), (3,), (2,), (3,), (4,)]
    assert new[2] is new[3]


class Viewing:
    def __init__(self, w: torch.Tensor) -> None:
        self.w = w


dp.register_parameterized(
    Viewing,
    flatten=lambda v: [v.w],
    replace=lambda v, stream: Viewing(stream.next_parameter().view(2)),
)


def test_a_tie_reaching_a_registered_instance_never_hands_it_the_wrong_tensor() -> None:
    class Holder(dp.Parameterized):
        a: Any
        r: Any
        c: Any

    w = param(2)
    model = Holder(w, Viewing(w), param(3))
    new = dp.replace_parameters(model, [param(2), param(3)])
    assert torch.equal(new.a, new.r.w) and new.c.shape == (3,)


class Packing:
    def __getstate__(self) -> dict[str, Any]:
        return {"packed": dict(self.__dict__)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state["packed"])


class Mixed(dp.Parameterized, Packing):
    w: dp.Parameter


def test_a_mixins_own_getstate_is_kept() -> None:
    model = dp.replace_parameters(Mixed(param(2)), [param(2)])
    dp.replace_parameters(model, [param(2)])
    for clone in (copy.copy(model), copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone.w, model.w)


def test_a_generic_model_keeps_what_post_init_set() -> None:
    from typing import Generic, TypeVar

    X = TypeVar("X")

    class Tagged(dp.Parameterized, Generic[X]):
        w: dp.Parameter

        def __post_init__(self) -> None:
            object.__setattr__(self, "tag", "set in __post_init__")

    new = dp.replace_parameters(Tagged[int](param(2)), [param(2)])
    assert new.tag == "set in __post_init__"  # type: ignore[attr-defined]
