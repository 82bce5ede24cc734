"""Parameterized: the declaration, flatten/replace on every kind of field, paths, ties, errors."""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch

import diffprog as dp
from diffprog.nn import Linear, LinearSpec


def param(*shape: int, value: float = 0.0, dtype: torch.dtype = torch.float32) -> dp.Parameter:
    return dp.make_independent(torch.full(shape, value, dtype=dtype))


class Affine(dp.Parameterized):
    scale: dp.Parameter
    shift: dp.Parameter

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class Activation(enum.Enum):
    TANH = "tanh"
    RELU = "relu"


class Pair(NamedTuple):
    first: Any
    second: Any


@dataclasses.dataclass
class PlainRecord:
    weight: Any
    note: str = "plain"


class Everything(dp.Parameterized):
    weight: dp.Parameter
    buffer: torch.Tensor
    child: Affine
    layers: tuple[Linear, ...]
    table: dict[str, Any]
    pair: Pair
    record: PlainRecord
    maybe: dp.Parameter | None
    branch: Linear | Affine
    count: int = 3
    name: str = "everything"
    kind: Activation = Activation.TANH
    activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")


def everything() -> Everything:
    gen = torch.Generator().manual_seed(0)
    lin = functools.partial(dp.sample, generator=gen)
    return Everything(
        weight=param(2, value=1),
        buffer=torch.arange(3.0),
        child=Affine(param(3, value=2), param(3, value=3)),
        layers=(lin(LinearSpec(2, 3)), lin(LinearSpec(3, 1, bias=False))),
        table={"b": param(1, value=4), "a": [param(2, value=5), None]},
        pair=Pair(param(1, value=6), "static"),
        record=PlainRecord(param(4, value=7)),
        maybe=None,
        branch=Affine(param(1, value=8), param(1, value=9)),
    )


EXPECTED_NAMES = [
    "weight",
    "child.scale",
    "child.shift",
    "layers.0.weight",
    "layers.0.bias",
    "layers.1.weight",
    "table.b",
    "table.a.0",
    "pair.first",
    "record.weight",
    "branch.scale",
    "branch.shift",
]


# --- the declaration -------------------------------------------------------------------------


def test_subclassing_makes_a_frozen_dataclass_with_positional_and_keyword_construction() -> None:
    a = Affine(param(1), shift=param(1))
    assert dataclasses.is_dataclass(a)
    assert [f.name for f in dataclasses.fields(Affine)] == ["scale", "shift"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.scale = param(1)  # type: ignore[misc]


def test_models_compare_and_hash_by_identity() -> None:
    a = Affine(param(1), param(1))
    b = Affine(a.scale, a.shift)
    assert a == a and a != b
    assert len({a, b}) == 2


def test_dataclass_options_are_class_keywords() -> None:
    class Config(dp.Parameterized, kw_only=True):
        weight: dp.Parameter
        depth: int = 2

    with pytest.raises(TypeError):
        Config(param(1))  # type: ignore[misc]
    assert Config(weight=param(1)).depth == 2


def test_post_init_runs_on_construction_but_not_on_replace() -> None:
    calls: list[int] = []

    class Checked(dp.Parameterized):
        weight: dp.Parameter

        def __post_init__(self) -> None:
            calls.append(1)

    m = Checked(param(2))
    dp.replace_parameters(m, [param(2, value=1)])
    assert calls == [1]


def test_subclasses_of_models_extend_the_fields() -> None:
    class Scaled(Affine):
        gain: dp.Parameter

    m = Scaled(param(1, value=1), param(1, value=2), param(1, value=3))
    assert [n for n, _ in dp.named_parameters(m)] == ["scale", "shift", "gain"]


# --- flatten / replace over every kind of field ---------------------------------------------


def test_flatten_collects_only_parameters_depth_first_in_declaration_order() -> None:
    m = everything()
    names = [n for n, _ in dp.named_parameters(m)]
    assert names == EXPECTED_NAMES
    flat = dp.flatten_parameters(m)
    assert [id(p) for p in flat] == [id(p) for _, p in dp.named_parameters(m)]
    assert all(type(p) is dp.Parameter for p in flat)
    # the constant tensor is never a parameter
    assert all(p is not m.buffer for p in flat)


def test_dict_order_is_insertion_order_not_sorted() -> None:
    m = {"z": param(1), "a": param(1)}
    assert [n for n, _ in dp.named_parameters(m)] == ["z", "a"]


def test_replace_round_trip_and_purity() -> None:
    m = everything()
    before = [p.detach().clone() for p in dp.flatten_parameters(m)]
    new = [dp.make_independent(p.detach() + 1) for p in dp.flatten_parameters(m)]
    m2 = dp.replace_parameters(m, new)
    assert type(m2) is Everything
    assert [id(p) for p in dp.flatten_parameters(m2)] == [id(p) for p in new]
    # the old value is unchanged and still works
    for p, b in zip(dp.flatten_parameters(m), before, strict=True):
        assert torch.equal(p, b)
    assert torch.equal(m.child(torch.ones(3)), torch.full((3,), 5.0))
    assert torch.equal(m2.child(torch.ones(3)), torch.full((3,), 7.0))
    # static parts are kept as they are
    assert m2.buffer is m.buffer and m2.activation is torch.tanh and m2.kind is Activation.TANH
    assert type(m2.pair) is Pair and m2.pair.second == "static"
    assert type(m2.record) is PlainRecord and m2.record.note == "plain"
    assert m2.table["a"][1] is None and list(m2.table) == ["b", "a"]


def test_replace_with_the_same_parameters_returns_an_equal_structure() -> None:
    m = everything()
    m2 = dp.replace_parameters(m, dp.flatten_parameters(m))
    assert [id(p) for p in dp.flatten_parameters(m2)] == [id(p) for p in dp.flatten_parameters(m)]


def test_union_fields_pick_the_branch_at_run_time() -> None:
    m = everything()
    as_linear = dataclasses.replace(m, branch=dp.sample(LinearSpec(1, 1)))
    assert [n for n, _ in dp.named_parameters(as_linear)][-2:] == ["branch.weight", "branch.bias"]


def test_free_functions_work_on_bare_containers_of_layers() -> None:
    layers = (dp.sample(LinearSpec(3, 2)), dp.sample(LinearSpec(2, 1)))
    assert len(dp.flatten_parameters(layers)) == 4
    assert [n for n, _ in dp.named_parameters(layers)] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
    ]
    new = dp.replace_parameters(layers, [param(*p.shape) for p in dp.flatten_parameters(layers)])
    assert type(new) is tuple and new[1].weight.abs().sum() == 0


def test_containers_keep_their_types() -> None:
    value = {
        "ordered": OrderedDict(w=param(1)),
        "default": defaultdict(list, w=param(1)),
        "deque": deque([param(1)]),
        "list": [param(1)],
    }
    new = dp.replace_parameters(value, [param(1, value=1) for _ in range(4)])
    assert type(new["ordered"]) is OrderedDict
    assert type(new["default"]) is defaultdict and new["default"].default_factory is list
    assert type(new["deque"]) is deque and type(new["list"]) is list
    assert all(p.item() == 1 for p in dp.flatten_parameters(new))


def test_parameters_of_other_dtypes_and_devices_flatten() -> None:
    value = [param(2, dtype=torch.float64), dp.Parameter(torch.empty(3, device="meta"))]
    flat = dp.flatten_parameters(value)
    assert [p.dtype for p in flat] == [torch.float64, torch.float32]
    new = dp.replace_parameters(
        value, [param(2, dtype=torch.float64), torch.empty(3, device="meta")]
    )
    assert new[1].device.type == "meta"


def test_plain_tensors_may_fill_parameter_slots_for_functional_transforms() -> None:
    layer = dp.sample(LinearSpec(3, 1))
    params = dp.flatten_parameters(layer)

    def loss(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return dp.replace_parameters(layer, [weight, bias])(torch.ones(2, 3)).sum()

    gw, gb = torch.func.grad(loss, argnums=(0, 1))(*[p.detach() for p in params])
    assert torch.equal(gw, torch.full((1, 3), 2.0)) and torch.equal(gb, torch.tensor([2.0]))


# --- ties ------------------------------------------------------------------------------------


def test_tied_parameters_flatten_once_and_stay_tied_after_replace() -> None:
    shared = param(2, 2, value=1)
    m = {"encoder": Linear(shared, None), "decoder": Linear(shared, param(2))}
    flat = dp.flatten_parameters(m)
    assert len(flat) == 2
    assert [n for n, _ in dp.named_parameters(m)] == ["encoder.weight", "decoder.bias"]
    new_shared, new_bias = param(2, 2, value=5), param(2, value=6)
    m2 = dp.replace_parameters(m, [new_shared, new_bias])
    assert m2["encoder"].weight is new_shared and m2["decoder"].weight is new_shared


def test_a_shared_sub_model_stays_tied() -> None:
    block = Affine(param(1, value=1), param(1, value=2))
    m = [block, block]
    assert len(dp.flatten_parameters(m)) == 2
    m2 = dp.replace_parameters(m, [param(1, value=3), param(1, value=4)])
    assert m2[0].scale is m2[1].scale and m2[0].shift is m2[1].shift
    assert m2[0] is m2[1]  # still one object, so state it holds stays shared too


def test_ties_survive_training() -> None:
    from diffprog.optim import GD, run_step

    shared = param(3, value=1)
    m = (Affine(shared, param(3)), Affine(shared, param(3)))
    loss = (m[0](torch.ones(3)) + m[1](torch.ones(3))).sum()
    m2, _ = run_step(m, GD(), loss, 0.1)
    assert m2[0].scale is m2[1].scale
    assert torch.allclose(m2[0].scale, torch.full((3,), 0.8))  # gradient 2 from both uses


# --- hand-written instances and the registry -------------------------------------------------


class Cell(dp.Parameterized):
    """A Hasktorch-style hand-written instance (as its RNN examples write them)."""

    weight_ih: dp.Parameter
    weight_hh: dp.Parameter
    hidden: int = 2

    def flatten_parameters(self) -> list[Any]:
        return [self.weight_hh, self.weight_ih]  # a different order than the fields

    def replace_own_parameters(self, stream: dp.ParamStream) -> Cell:
        weight_hh = stream.next_parameter()
        weight_ih = stream.next_parameter()
        return Cell(weight_ih, weight_hh, self.hidden)


def test_hand_written_instance_decides_order_and_is_named_by_its_fields() -> None:
    c = Cell(param(2, 3, value=1), param(2, 2, value=2))
    flat = dp.flatten_parameters({"cell": c})
    assert [p.shape for p in flat] == [torch.Size([2, 2]), torch.Size([2, 3])]
    assert [n for n, _ in dp.named_parameters({"cell": c})] == ["cell.weight_hh", "cell.weight_ih"]
    new = dp.replace_parameters({"cell": c}, [param(2, 2, value=3), param(2, 3, value=4)])
    assert new["cell"].weight_hh.sum() == 12 and new["cell"].weight_ih.sum() == 24
    assert c.weight_ih.sum() == 6  # pure


def test_hand_written_instance_checks_shapes_and_names_the_place() -> None:
    c = Cell(param(2, 3), param(2, 2))
    with pytest.raises(dp.ParameterShapeError, match=r"at \['cell'\]\[0\]"):
        dp.replace_parameters({"cell": c}, [param(2, 3), param(2, 3)])


def test_hand_written_instance_that_reads_too_few_or_too_many_is_reported() -> None:
    class Greedy(Cell):
        def replace_own_parameters(self, stream: dp.ParamStream) -> Cell:
            for _ in range(3):
                stream.next_parameter()
            return self

    class Lazy(Cell):
        def replace_own_parameters(self, stream: dp.ParamStream) -> Cell:
            stream.next_parameter()
            return self

    for cls, message in [(Greedy, "asked for more"), (Lazy, "used 1 of the 2")]:
        m = cls(param(2, 3), param(2, 2))
        with pytest.raises(dp.InstanceError, match=message):
            dp.replace_parameters([m], dp.flatten_parameters([m]))


def test_a_hand_written_instance_needs_both_methods() -> None:
    with pytest.raises(dp.InstanceError, match="defines flatten_parameters but not"):

        class Half(dp.Parameterized):
            weight: dp.Parameter

            def flatten_parameters(self) -> list[Any]:
                return [self.weight]


def test_hand_written_instance_may_delegate_to_the_stream_for_sub_models() -> None:
    class Wrapper(dp.Parameterized):
        inner: Affine
        extra: dp.Parameter

        def flatten_parameters(self) -> list[Any]:
            return [self.extra, *dp.flatten_parameters(self.inner)]

        def replace_own_parameters(self, stream: dp.ParamStream) -> Wrapper:
            extra = stream.next_parameter()
            return Wrapper(stream.replace(self.inner), extra)

    w = Wrapper(Affine(param(1), param(2)), param(3))
    new = dp.replace_parameters(w, [param(3, value=1), param(1, value=2), param(2, value=3)])
    assert new.extra.sum() == 3 and new.inner.scale.sum() == 2 and new.inner.shift.sum() == 6


def test_register_parameterized_for_a_type_we_do_not_own() -> None:
    class Foreign:
        def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
            self.a, self.b = a, b

    dp.register_parameterized(
        Foreign,
        flatten=lambda f: [f.a, f.b],
        replace=lambda f, s: Foreign(s.next_parameter(), s.next_parameter()),
    )
    value = {"x": Foreign(param(1), param(2))}
    assert [n for n, _ in dp.named_parameters(value)] == ["x.0", "x.1"]
    new = dp.replace_parameters(value, [param(1, value=1), param(2, value=2)])
    assert isinstance(new["x"], Foreign) and new["x"].b.sum() == 4


def test_register_parameterized_refuses_tensor_types() -> None:
    with pytest.raises(dp.InstanceError):
        dp.register_parameterized(torch.Tensor, flatten=list, replace=lambda v, s: v)


def test_param_stream_reads_in_order() -> None:
    stream = dp.ParamStream([param(1), param(2)])
    assert stream.next_parameter().shape == (1,)
    assert stream.remaining == 1 and stream.consumed == 1
    stream.next_parameter()
    with pytest.raises(dp.ParameterCountError, match="ran out"):
        stream.next_parameter()


# --- inline fields ---------------------------------------------------------------------------


def test_inline_fields_leave_their_name_out_of_state_dict_paths() -> None:
    class Stack(dp.Parameterized):
        layers: tuple[Any, ...] = dp.field(inline=True, default=())
        head: Linear | None = None

    m = Stack((dp.sample(LinearSpec(2, 2)), torch.relu), dp.sample(LinearSpec(2, 1)))
    names = [n for n, _ in dp.named_parameters(m)]
    assert names == ["0.weight", "0.bias", "head.weight", "head.bias"]
    # error paths still show the Python accessor
    with pytest.raises(dp.ParameterShapeError, match=r"at layers\[0\]\.weight"):
        dp.replace_parameters(m, [param(9), param(2), param(1, 2), param(1)])


# --- errors ----------------------------------------------------------------------------------


class Block(dp.Parameterized):
    linear: Linear


class Net(dp.Parameterized):
    blocks: list[Block]


def net() -> Net:
    return Net([Block(dp.sample(LinearSpec(2, 2))) for _ in range(3)])


def test_too_few_parameters_names_the_first_empty_slot() -> None:
    m = net()
    with pytest.raises(dp.ParameterCountError) as info:
        dp.replace_parameters(m, dp.flatten_parameters(m)[:4])
    text = str(info.value)
    assert "too few parameters: the model has 6 but 4 were given" in text
    assert "blocks[2].linear.weight" in text and "of the Net" in text
    assert info.value.path == "blocks[2].linear.weight"


def test_too_many_parameters_says_how_many_are_left() -> None:
    m = net()
    with pytest.raises(dp.ParameterCountError, match="3 parameters left unconsumed"):
        dp.replace_parameters(m, [*dp.flatten_parameters(m), param(1), param(1), param(1)])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (param(3, 2), r"parameter #4 is float32\[3, 2\] but its slot holds float32\[2, 2\]"),
        (param(2, 2, dtype=torch.float64), r"is float64\[2, 2\] but its slot holds float32"),
    ],
)
def test_a_wrong_shape_or_dtype_names_the_slot(bad: dp.Parameter, message: str) -> None:
    m = net()
    params = dp.flatten_parameters(m)
    params[4] = bad
    with pytest.raises(dp.ParameterShapeError, match=message) as info:
        dp.replace_parameters(m, params)
    assert info.value.path == "blocks[2].linear.weight"


def test_a_non_tensor_where_a_parameter_goes() -> None:
    m = net()
    params: list[Any] = dp.flatten_parameters(m)
    params[1] = [0.0, 0.0]
    with pytest.raises(dp.ParameterTypeError, match="a list was given for parameter #1") as info:
        dp.replace_parameters(m, params)
    assert info.value.path == "blocks[0].linear.bias"


def test_nothing_is_half_applied_on_error() -> None:
    m = net()
    before = [p.detach().clone() for p in dp.flatten_parameters(m)]
    params = dp.flatten_parameters(m)
    params[5] = param(7)
    with pytest.raises(dp.ParameterShapeError):
        dp.replace_parameters(m, params)
    assert all(torch.equal(p, b) for p, b in zip(dp.flatten_parameters(m), before, strict=True))


def test_a_cycle_is_reported_with_its_path() -> None:
    loop: list[Any] = [param(1)]
    loop.append({"again": loop})
    for fn in (dp.flatten_parameters, dp.named_parameters):
        with pytest.raises(dp.CycleError, match=r"own ancestors.*at \[1\]\['again'\]"):
            fn({"x": 1, "model": loop}["model"])
    with pytest.raises(dp.CycleError):
        dp.replace_parameters(loop, [param(1)])


def test_a_deep_but_acyclic_model_is_not_called_a_cycle() -> None:
    value: Any = param(1)
    for _ in range(50):
        value = [value]
    assert len(dp.flatten_parameters(value)) == 1


def test_a_parameter_hidden_in_a_plain_object_is_an_error() -> None:
    class Opaque:
        def __init__(self) -> None:
            self.inner = {"w": param(1)}

    with pytest.raises(dp.HiddenParameterError, match=r"inside an instance of Opaque") as info:
        dp.flatten_parameters({"model": [Opaque()]})
    assert info.value.path == "['model'][0].inner['w']"
    assert "register_parameterized" in str(info.value)


def test_a_parameter_hidden_in_a_torch_module_is_an_error_but_parameter_free_modules_are_fine() -> (
    None
):
    with pytest.raises(dp.HiddenParameterError, match=r"torch.nn.Module \(Linear\)") as info:
        dp.flatten_parameters({"head": torch.nn.Linear(2, 2)})
    assert "diffprog.nn" in str(info.value)
    assert dp.flatten_parameters({"act": torch.nn.ReLU(), "f": torch.relu}) == []


def test_parameters_in_sets_and_partials_are_errors() -> None:
    p = param(1)
    with pytest.raises(dp.HiddenParameterError, match="unordered"):
        dp.flatten_parameters([frozenset([p])])
    with pytest.raises(dp.HiddenParameterError, match="partial"):
        dp.flatten_parameters([functools.partial(torch.add, other=p)])
    # sets and partials without parameters are static values
    assert dp.flatten_parameters([frozenset([1, 2]), functools.partial(torch.add, other=1)]) == []


def test_errors_are_diffprog_errors_and_builtin_kinds() -> None:
    assert issubclass(dp.ParameterCountError, (dp.DiffprogError, ValueError))
    assert issubclass(dp.ParameterShapeError, ValueError)
    assert issubclass(dp.ParameterTypeError, TypeError)
    assert issubclass(dp.HiddenParameterError, TypeError)
    assert issubclass(dp.CycleError, ValueError)


# --- repr ------------------------------------------------------------------------------------


def test_repr_shows_structure_shapes_and_dtypes_never_contents() -> None:
    layer = Linear(param(1, 3, value=123456), param(1))
    assert repr(layer) == "Linear(weight=f32[1,3], bias=f32[1])"
    text = repr(everything())
    assert "123456" not in text and "buffer=const f32[3]" in text
    assert "activation=<function tanh>" in text and "kind=<Activation.TANH: 'tanh'>" in text
    assert "\n" in text  # too long for one line: indented tree


def test_repr_of_nested_model_is_an_indented_tree() -> None:
    # every item shown (fold=False); repr itself folds the three identical blocks (issue 11)
    assert dp.tree_repr(net(), fold=False) == (
        "Net(\n"
        "  blocks=[\n"
        "    Block(linear=Linear(weight=f32[2,2], bias=f32[2])),\n"
        "    Block(linear=Linear(weight=f32[2,2], bias=f32[2])),\n"
        "    Block(linear=Linear(weight=f32[2,2], bias=f32[2])),\n"
        "  ],\n"
        ")"
    )
    assert (
        repr(net()) == "Net(blocks=[(0-2): 3 x Block(linear=Linear(weight=f32[2,2], bias=f32[2]))])"
    )


# --- plans are built once per class ----------------------------------------------------------


def test_the_plan_of_a_class_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffprog import _nodes

    class Fresh(dp.Parameterized):
        weight: dp.Parameter

    built: list[type] = []
    original = _nodes.fields_node

    def counting(cls: type) -> _nodes.FieldsNode:
        built.append(cls)
        return original(cls)

    monkeypatch.setattr(_nodes, "fields_node", counting)
    models = [Fresh(param(1)) for _ in range(5)]
    for m in models:
        dp.replace_parameters(m, dp.flatten_parameters(m))
    assert built == [Fresh]


def test_an_ensemble_runs_under_vmap_through_replace_parameters() -> None:
    template = dp.sample(LinearSpec(3, 2))
    members = [
        dp.sample(LinearSpec(3, 2), generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    stacked = [
        torch.stack(ps) for ps in zip(*[dp.flatten_parameters(m) for m in members], strict=True)
    ]
    x = torch.randn(5, 3)

    def member_output(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return dp.replace_parameters(template, params)(x)

    out = torch.func.vmap(member_output, in_dims=(0, None))(stacked, x)
    for k, member in enumerate(members):
        torch.testing.assert_close(out[k], member(x))


def test_a_class_without_fields_flattens_to_nothing() -> None:
    class Stateless(dp.Parameterized):
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return x

    s = Stateless()
    assert dp.flatten_parameters([s]) == []
    assert dp.replace_parameters([s], [])[0] is s
    assert repr(s) == "Stateless()"


def test_repr_of_a_hand_written_instance_shows_its_fields() -> None:
    assert repr(Cell(param(2, 3), param(2, 2))) == (
        "Cell(weight_ih=f32[2,3], weight_hh=f32[2,2], hidden=2)"
    )


def test_shared_containers_stay_one_object_after_replace() -> None:
    shared_list = [param(2)]
    value = {"x": shared_list, "y": shared_list, "z": (shared_list,)}
    new = dp.replace_parameters(value, [param(2, value=1)])
    assert new["x"] is new["y"] is new["z"][0]
    assert new["x"] is not shared_list


def test_cached_properties_are_not_carried_over_by_replace() -> None:
    class Doubled(dp.Parameterized):
        w: dp.Parameter

        @functools.cached_property
        def twice(self) -> torch.Tensor:
            return self.w.detach() * 2

    m = Doubled(param(2, value=1))
    assert torch.equal(m.twice, torch.full((2,), 2.0))
    new = dp.replace_parameters(m, [param(2, value=5)])
    assert torch.equal(new.twice, torch.full((2,), 10.0))
    assert torch.equal(m.twice, torch.full((2,), 2.0))
