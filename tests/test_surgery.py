"""Surgery: ``at(model, where).set/apply`` over every kind of structure, ties, errors, and
custom initialisation by surgery against torch.nn."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
from diffprog.nn import BatchNorm1dSpec, Embedding, EmbeddingSpec, Linear, LinearSpec, Sequential


class Pair(NamedTuple):
    left: Any
    right: Any


@dataclasses.dataclass(frozen=True)
class PlainData:
    value: Any
    note: str = "plain"


class Record(dp.Parameterized):
    first: Any
    second: Any
    label: str = "record"


class Written(dp.Parameterized):
    """A hand-written instance listing two parameters; ``scale`` is not listed."""

    a: dp.Parameter
    b: dp.Parameter
    scale: float = 1.0

    def flatten_parameters(self) -> list[Any]:
        return [self.a, self.b]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Written:
        return Written(stream.next_parameter(), stream.next_parameter(), self.scale)


class Opaque:
    """A hand-written instance that is not a dataclass: its parameters are named by index."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def flatten_parameters(self) -> list[torch.Tensor]:
        return [self.w]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Opaque:
        return Opaque(stream.next_parameter())


def p(*shape: int) -> dp.Parameter:
    return dp.make_independent(torch.randn(*shape))


def linear(i: int = 3, o: int = 2, seed: int = 0) -> Linear:
    return dp.sample(LinearSpec(i, o), generator=torch.Generator().manual_seed(seed))


# --- paths and selectors over every structure ----------------------------------------------


def test_at_path_sets_a_parameter_and_shares_everything_else() -> None:
    model = Record(linear(seed=0), {"head": linear(2, 1, seed=1), "k": 3})
    new = dp.at(model, "second.head.bias").set(torch.zeros(1))
    assert torch.equal(new.second["head"].bias, torch.zeros(1))
    assert new.first is model.first
    assert new.second["head"].weight is model.second["head"].weight
    assert new.second["k"] == 3 and new.label == "record"
    assert model.second["head"].bias.abs().sum() > 0  # the old model is unchanged


def test_at_selector_and_path_agree_through_tuples_lists_dicts_namedtuples_dataclasses() -> None:
    model = (
        [Pair(linear(), {"x": PlainData(p(2))})],
        {"r": Record(p(3), (p(4), None))},
    )
    cases = [
        ("0.0.left.weight", lambda m: m[0][0].left.weight),
        ("0.0.right.x.value", lambda m: m[0][0].right["x"].value),
        ("1.r.first", lambda m: m[1]["r"].first),
        ("1.r.second.0", lambda m: m[1]["r"].second[0]),
    ]
    for path, selector in cases:
        by_path = dp.at(model, path)
        by_selector = dp.at(model, selector)
        assert by_path.paths == by_selector.paths == [path]
        old = selector(model)
        value = torch.full_like(old, 7.0)
        new_a, new_b = by_path.set(value), by_selector.set(value)
        assert torch.equal(selector(new_a), value) and torch.equal(selector(new_b), value)
        assert isinstance(selector(new_a), dp.Parameter)  # a plain tensor became a Parameter


def test_at_sets_a_non_tensor_leaf_chosen_by_selector_even_when_python_shares_it() -> None:
    # 3 and "record" are interned objects held at several places: the selector still names
    # exactly the one it navigates to.
    model = Record(3, Record(3, (3, None)))
    new = dp.at(model, lambda m: m.second.first).set(4)
    assert (new.first, new.second.first, new.second.second) == (3, 4, (3, None))
    new = dp.at(model, lambda m: m.second.second[1]).set("x")
    assert new.second.second == (3, "x") and new.first == 3


def test_at_replaces_whole_sub_models_and_several_places_at_once() -> None:
    model = Record(linear(seed=0), linear(seed=1))
    replacement = linear(seed=2)
    new = dp.at(model, lambda m: m.second).set(replacement)
    assert new.second is replacement and new.first is model.first
    a, b = torch.zeros(2), torch.ones(2)
    new = dp.at(model, lambda m: (m.first.bias, m.second.bias)).set((a, b))
    assert torch.equal(new.first.bias, a) and torch.equal(new.second.bias, b)
    assert new.first.weight is model.first.weight
    same = dp.at(model, ["first.bias", "second.bias"]).set((a, b))
    assert torch.equal(same.second.bias, b)


def test_at_overlapping_places_are_refused() -> None:
    model = Record(linear(seed=0), linear(seed=1))
    for where in [lambda m: (m.first, m.first.bias), lambda m: (m.first.bias, m.first)]:
        with pytest.raises(dp.SurgeryError, match=r"first and first\.bias overlap"):
            dp.at(model, where).set((linear(seed=2), torch.zeros(2)))


def test_at_selector_may_return_a_generator_of_places() -> None:
    seq = Sequential(linear(3, 4), linear(4, 2))
    target = dp.at(seq, lambda m: (layer.bias for layer in m.layers))
    assert target.paths == ["0.bias", "1.bias"]


def test_at_an_integer_tensor_where_a_parameter_was_is_refused_naming_the_place() -> None:
    with pytest.raises(dp.SurgeryError, match="Parameter is at 'bias'.*torch.int64"):
        dp.at(linear(), "bias").set(torch.zeros(2, dtype=torch.long))


def test_at_several_places_needs_one_value_per_place() -> None:
    model = Record(p(2), p(2))
    with pytest.raises(dp.SurgeryError, match="names 2 places"):
        dp.at(model, lambda m: (m.first, m.second)).set(torch.zeros(2))


def test_at_inlined_fields_by_state_dict_path_or_full_path() -> None:
    seq = Sequential(linear(3, 4), linear(4, 2))
    by_state_dict = dp.at(seq, "1.weight")
    by_full = dp.at(seq, "layers.1.weight")
    assert by_state_dict.paths == by_full.paths == ["1.weight"]
    new = by_state_dict.apply(torch.zeros_like)
    assert new.layers[1].weight.abs().sum() == 0 and new.layers[0] is seq.layers[0]


def test_at_apply_calls_fn_on_the_old_value() -> None:
    model = {"w": p(2, 2)}
    new = dp.at(model, "w").apply(lambda w: w * 2)
    torch.testing.assert_close(new["w"], model["w"].detach() * 2)
    assert isinstance(new["w"], dp.Parameter) and new["w"].is_leaf


def test_at_keeps_buffers_plain_and_frozen_parameters_frozen() -> None:
    bn = dp.sample(BatchNorm1dSpec(3))
    new = dp.at(bn, "running_mean").set(torch.ones(3))
    assert type(new.running_mean) is torch.Tensor
    frozen = dp.freeze(bn, "weight")
    new = dp.at(frozen, "weight").set(torch.ones(3))
    assert type(new.weight) is dp.Frozen and dp.count_parameters(new, dp.Frozen) == 3
    given = dp.make_independent(torch.ones(3))
    assert dp.at(frozen, "weight").set(given).weight is given  # a Parameter goes in as it is


# --- ties ----------------------------------------------------------------------------------


def tied_model() -> dict[str, Any]:
    emb = dp.sample(EmbeddingSpec(5, 3), generator=torch.Generator().manual_seed(0))
    out = Linear(emb.weight, None)
    return {"embed": emb, "out": out, "other": linear(3, 3)}


def test_at_one_path_of_a_tie_changes_the_tied_value_at_all_its_paths() -> None:
    model = tied_model()
    assert model["embed"].weight is model["out"].weight
    new = dp.at(model, "out.weight").set(torch.zeros(5, 3))
    assert new["embed"].weight is new["out"].weight  # still tied
    assert new["embed"].weight.abs().sum() == 0
    assert len(dp.flatten_parameters(new)) == len(dp.flatten_parameters(model))
    assert new["other"] is model["other"]


def test_at_untie_changes_only_the_path_named() -> None:
    model = tied_model()
    new = dp.at(model, "out.weight").set(torch.zeros(5, 3), untie=True)
    assert new["embed"].weight is model["embed"].weight
    assert new["out"].weight.abs().sum() == 0
    assert len(dp.flatten_parameters(new)) == len(dp.flatten_parameters(model)) + 1
    # a selector returns the tied tensor itself: which path it went through is unknown
    with pytest.raises(dp.SurgeryError, match="'embed.weight', 'out.weight'"):
        dp.at(model, lambda m: m["out"].weight).set(torch.zeros(5, 3), untie=True)


def test_at_apply_over_a_tie_calls_fn_once_and_keeps_the_tie() -> None:
    model = tied_model()
    calls: list[torch.Tensor] = []

    def fn(w: torch.Tensor) -> torch.Tensor:
        calls.append(w)
        return torch.zeros_like(w)

    new = dp.at(model, lambda m: (m["embed"].weight, m["out"].weight)).apply(fn)
    assert len(calls) == 1 and new["embed"].weight is new["out"].weight


def test_at_tied_places_given_different_values_is_refused_unless_each_is_named() -> None:
    w = p(2)
    model = [w, w, w]
    with pytest.raises(dp.SurgeryError, match="different values"):
        dp.at(model, ["0", "1"]).set((torch.zeros(2), torch.ones(2)))
    new = dp.at(model, ["0", "1", "2"]).set((torch.zeros(2), torch.ones(2), torch.ones(2)))
    assert new[1] is not new[0]


def test_at_a_shared_block_stays_one_object() -> None:
    block = linear(2, 2)
    model = {"a": block, "b": block}
    new = dp.at(model, "a.bias").set(torch.zeros(2))
    assert new["a"] is new["b"] and new["a"].weight is block.weight


# --- hand-written instances ------------------------------------------------------------------


def test_at_replaces_a_listed_parameter_through_replace_own_parameters() -> None:
    model = {"w": Written(p(2), p(3), 2.0), "o": Opaque(p(4))}
    new = dp.at(model, "w.b").set(torch.zeros(3))
    assert type(new["w"]) is Written and new["w"].scale == 2.0
    assert new["w"].a is model["w"].a and torch.equal(new["w"].b, torch.zeros(3))
    new = dp.at(model, lambda m: m["o"].w).set(torch.ones(4))
    assert type(new["o"]) is Opaque and torch.equal(new["o"].w, torch.ones(4))
    assert dp.at(model, "o.0").paths == ["o.0"]  # named by its position in the list


def test_at_refuses_what_a_hand_written_instance_does_not_list() -> None:
    model = {"w": Written(p(2), p(3), 2.0)}
    with pytest.raises(dp.SurgeryError, match="hand-written instance at 'w'"):
        dp.at(model, "w.scale")
    with pytest.raises(dp.SurgeryError, match="hand-written instance at 'w'"):
        dp.at(model, lambda m: m["w"].scale)
    with pytest.raises(dp.SurgeryError, match="takes only tensors"):
        dp.at(model, "w.a").set(3.0)
    # the whole instance may be replaced
    other = Written(p(2), p(3))
    assert dp.at(model, "w").set(other)["w"] is other


# --- errors --------------------------------------------------------------------------------


def test_at_a_path_that_does_not_exist_names_the_nearest() -> None:
    model = Record(linear(), {"head": linear(2, 1)})
    with pytest.raises(dp.SurgeryError, match="nearest existing paths are 'second.head.bias'"):
        dp.at(model, "second.head.bais")
    with pytest.raises(dp.SurgeryError, match="nearest existing paths are 'first.weight'"):
        dp.at(model, lambda m: m.first.wieght)


def test_at_a_selector_returning_a_new_object_is_refused() -> None:
    model = Record(linear(), linear())
    with pytest.raises(dp.SurgeryError, match="computed from the one at 'first.weight'"):
        dp.at(model, lambda m: m.first.weight.T)
    with pytest.raises(dp.SurgeryError, match="not part of the model.*'first', 'second'"):
        dp.at(model, lambda m: linear())
    with pytest.raises(dp.SurgeryError, match="went past the leaf 'label'"):
        dp.at(model, lambda m: m.label.upper())
    with pytest.raises(dp.SurgeryError, match="selects no leaf"):
        dp.at(model, dp.select("*.nothing"))
    with pytest.raises(dp.SurgeryError, match="empty path"):
        dp.at(model, "")


def test_at_a_selector_returning_a_value_it_cannot_tell_apart_is_refused() -> None:
    # Two places hold the same parameter-free empty tuple (Python shares ()).
    model = Record((), ())
    with pytest.raises(dp.SurgeryError, match="cannot tell apart"):
        dp.at(model, lambda m: m.first)
    assert dp.at(model, "second").set((1,)).second == (1,)


# --- meta tensors -------------------------------------------------------------------------


def test_at_on_a_meta_model() -> None:
    model = dp.sample(LinearSpec(3, 2), device="meta")
    new = dp.at(model, "weight").set(torch.empty(2, 3, device="meta"))
    assert new.weight.device.type == "meta" and isinstance(new.weight, dp.Parameter)
    assert new.bias is model.bias


# --- property: set then read back ----------------------------------------------------------


def _pool() -> list[dp.Parameter]:
    return [dp.make_independent(torch.zeros(k)) for k in range(1, 6)]


def models(pool: list[dp.Parameter]) -> st.SearchStrategy[Any]:
    parameters = st.sampled_from(pool)
    leaves = st.one_of(
        parameters,
        st.just(torch.zeros(1)),
        st.integers(-2, 2),
        st.none(),
        st.builds(Written, parameters, parameters),
    )

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(st.sampled_from("xyz"), children, max_size=3),
            st.builds(Record, children, children),
            st.builds(Pair, children, children),
        )

    return st.recursive(leaves, extend, max_leaves=8)


def read(model: Any, keys: tuple[Any, ...]) -> Any:
    """The value at path ``keys`` (as places gives them), read directly."""
    v = model
    for kind, key in keys:
        v = getattr(v, key) if kind in ("attr", "inline") else v[key]
    return v


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_property_at_set_then_reading_back_gives_the_value_set(data: st.DataObject) -> None:
    from diffprog._filter import places

    model = data.draw(models(_pool()))
    candidates = [pl for pl in places(model) if pl.keys]
    if not candidates:
        return
    place = data.draw(st.sampled_from(candidates))
    old = place.value
    new_value: Any = (
        dp.make_independent(torch.ones_like(old))
        if isinstance(old, torch.Tensor)
        else data.draw(st.sampled_from(["new", 17, (1, 2)]))
    )
    if not _unique(model, place):  # dict keys may make two paths read alike: not this test
        return
    untie = data.draw(st.booleans())
    if data.draw(st.booleans()):
        new = dp.at(model, place.path).set(new_value, untie=untie)
    else:  # the same place by a selector navigating to it
        try:
            target = dp.at(model, lambda m: read(m, place.keys))
        except dp.SurgeryError as e:  # a parameter-free value Python shares, e.g. ()
            message = str(e)
            assert "cannot tell apart" in message
            return
        held_at = [pl.path for pl in places(model) if pl.value is old]
        if len(held_at) > 1 and isinstance(old, torch.Tensor):
            # a tie: the selector cannot say which path it went through
            assert target.paths[0] in held_at
            if untie:
                with pytest.raises(dp.SurgeryError, match="untie=True changes only that one"):
                    target.set(new_value, untie=True)
                return
        else:
            assert target.paths == [place.path]
        new = target.set(new_value, untie=untie)
    assert read(new, place.keys) is new_value
    reached[0] += 1
    tied = isinstance(old, torch.Tensor) and not untie
    for other in places(model):
        if not other.leaf or _prefix(place.keys, other.keys) or _prefix(other.keys, place.keys):
            continue
        if tied and other.value is old:  # the other places of the tie got the value too
            assert read(new, other.keys) is new_value
        elif not any(a is old for a in other.ancestors):
            assert read(new, other.keys) is other.value  # shared, not copied


reached = [0]


def _unique(model: Any, place: Any) -> bool:
    from diffprog._filter import places

    return sum(1 for pl in places(model) if place.path in (pl.path, pl.full_path)) == 1


def _prefix(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return b[: len(a)] == a


# --- custom initialisation by surgery ----------------------------------------------------


class Net(dp.Parameterized):
    encoder: Linear
    hidden: Sequential
    head: Linear


def test_init_by_surgery_equals_torch_init_weights_with_the_same_generator() -> None:
    """pytorch/examples' ``init_weights``: xavier_uniform_ on every Linear weight, zero bias."""
    gen = torch.Generator().manual_seed(0)
    model = Net(
        dp.sample(LinearSpec(4, 8), generator=gen),
        Sequential(dp.sample(LinearSpec(8, 8), generator=gen)),
        dp.sample(LinearSpec(8, 2), generator=gen),
    )
    torch_model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Sequential(torch.nn.Linear(8, 8)), torch.nn.Linear(8, 2)
    )

    init_gen = torch.Generator().manual_seed(42)
    new = dp.at(model, dp.select(Linear) & "*.weight").apply(
        lambda w: torch.nn.init.xavier_uniform_(torch.empty_like(w), generator=init_gen)
    )
    new = dp.at(new, dp.select(Linear) & "*.bias").apply(torch.zeros_like)

    torch_gen = torch.Generator().manual_seed(42)

    def init_weights(m: torch.nn.Module) -> None:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight, generator=torch_gen)
            torch.nn.init.zeros_(m.bias)

    for m in torch_model.modules():  # module order = diffprog's flatten order here
        init_weights(m)
    ours = [t.detach() for t in dp.flatten_parameters(new)]
    theirs = [t.detach() for t in torch_model.parameters()]
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert all(isinstance(t, dp.Parameter) for t in dp.flatten_parameters(new))


def test_init_by_surgery_with_a_type_filter_keeps_embedding_untouched() -> None:
    model = {"emb": dp.sample(EmbeddingSpec(4, 3)), "out": linear(3, 4)}
    new = dp.at(model, Linear).apply(torch.zeros_like)
    assert new["emb"] is model["emb"]
    assert all(t.abs().sum() == 0 for t in dp.flatten_parameters(new["out"]))
    assert isinstance(new["emb"], Embedding)


# --- sum types ---------------------------------------------------------------------------


class Block(dp.Parameterized):
    """A sum type: ``mixer`` is a Linear or an Identity, ``norm`` a tensor or None."""

    mixer: Linear | dp.nn.Identity
    scale: dp.Parameter | None = None


def test_at_across_the_branches_of_a_sum_type() -> None:
    model = (Block(linear(2, 2)), Block(dp.nn.Identity(), p(2)))
    # replace a branch by the other one, and fill an empty optional
    swapped = dp.at(model, lambda m: (m[0].mixer, m[1].mixer)).set(
        (dp.nn.Identity(), linear(2, 2, seed=3))
    )
    assert isinstance(swapped[0].mixer, dp.nn.Identity) and isinstance(swapped[1].mixer, Linear)
    filled = dp.at(model, lambda m: m[0].scale).set(torch.ones(2))
    assert isinstance(filled[0].scale, torch.Tensor) and type(filled[0].scale) is torch.Tensor
    # (None held no Parameter: the tensor set there goes in as it is, a constant)
    assert [n for n, _ in dp.named_parameters(filled)] == [
        "0.mixer.weight",
        "0.mixer.bias",
        "1.scale",
    ]
    assert dp.at(model, "1.scale").set(None)[1].scale is None


class Wrapper(dp.Parameterized):
    """A hand-written instance holding a sub-model, replaced through ``stream.replace``."""

    inner: Linear
    gain: float = 1.0

    def flatten_parameters(self) -> list[Any]:
        return dp.flatten_parameters(self.inner)

    def replace_own_parameters(self, stream: dp.ParamStream) -> Wrapper:
        return Wrapper(stream.replace(self.inner), self.gain)


def test_at_inside_a_hand_written_sub_model_and_across_its_boundary() -> None:
    inner = linear(2, 2)
    model = {"wrap": Wrapper(inner, 2.0), "outside": inner.weight}  # tied across the boundary
    assert dp.at(model, lambda m: m["wrap"].inner.weight).paths == ["wrap.inner.weight"]
    new = dp.at(model, "wrap.inner.bias").set(torch.zeros(2))
    assert type(new["wrap"]) is Wrapper and new["wrap"].gain == 2.0
    assert new["wrap"].inner.weight is inner.weight and new["wrap"].inner.bias.sum() == 0
    tied = dp.at(model, "outside").set(torch.ones(2, 2))
    assert tied["outside"] is tied["wrap"].inner.weight  # the tie kept inside the instance too
    with pytest.raises(dp.SurgeryError, match="hand-written instance at 'wrap'"):
        dp.at(model, "wrap.inner")  # a sub-value it does not list: replace the whole instance
    with pytest.raises(dp.SurgeryError, match="hand-written instance at 'wrap'"):
        dp.at(model, lambda m: m["wrap"].inner)
    with pytest.raises(dp.ParameterShapeError):  # its replace checks what it reads back
        dp.at(model, "wrap.inner.bias").set(torch.zeros(5))
    # a type filter sees the Linear inside the instance; freezing there is refused, as the
    # instance lists its sub-model through dp.flatten_parameters (Frozen would drop out)
    with pytest.raises(dp.SurgeryError, match="drop out of its flatten_parameters"):
        dp.freeze(model, Linear)
