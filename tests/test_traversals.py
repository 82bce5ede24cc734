"""Whole-model traversals (issue 11): map_parameters, map_tensors, to, tensors, named_tensors,
collect, replace_values, walk; and replace_parameters' device check.

Parity with torch is tested against torch itself (torch.nn.Module.to, state_dict, BatchNorm).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
import diffprog.optim as optim
from diffprog import nn
from diffprog._frozen import Frozen
from diffprog._traverse import walk_keys

# --- odd structures -------------------------------------------------------------------------


class Two(dp.Parameterized):
    left: Any
    right: Any
    label: str = "two"


class Pair(NamedTuple):
    first: Any
    second: Any


class Cat(dp.Parameterized):  # a sum type: a field holds a Cat or a Dog
    whiskers: dp.Parameter


class Dog(dp.Parameterized):
    tail: dp.Parameter
    wag: float = 0.5


class Pet(dp.Parameterized):
    animal: Cat | Dog | None


class Scaled(dp.Parameterized):
    """A hand-written instance listing its buffer (a constant) after its parameter."""

    weight: dp.Parameter
    scale: torch.Tensor

    def flatten_parameters(self) -> list[Any]:
        return [self.weight, self.scale]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Scaled:
        return Scaled(stream.next_parameter(), stream.next_parameter())


class Masked(dp.Parameterized):
    """A hand-written instance holding a buffer it does not list."""

    weight: dp.Parameter
    mask: torch.Tensor

    def flatten_parameters(self) -> list[Any]:
        return [self.weight]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Masked:
        return Masked(stream.next_parameter(), self.mask)


def param(*shape: int, requires_grad: bool = True) -> dp.Parameter:
    return torch.nn.Parameter(torch.randn(*shape), requires_grad=requires_grad)


def kinds(model: Any) -> list[tuple[str, str]]:
    return [(name, type(t).__name__) for name, t in dp.named_tensors(model)]


def trained_batchnorm_model(seed: int = 0) -> tuple[Any, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = dp.sample(
        nn.SequentialSpec(nn.LinearSpec(4, 6), nn.BatchNorm1dSpec(6), torch.tanh), generator=gen
    )
    x = torch.randn(16, 4, generator=gen)
    for _ in range(3):  # non-trivial running statistics
        _, model = nn.training(lambda m, x: m(x), model, x)
    return model, x


# --- map_parameters / map_tensors -----------------------------------------------------------


def test_map_parameters_makes_independent_parameters_and_shares_the_rest() -> None:
    model = {"pet": Pet(Dog(param(2))), "bn": dp.sample(nn.BatchNorm1dSpec(3)), "n": 3}
    doubled = dp.map_parameters(lambda p: p * 2, model)
    for old, new in zip(dp.flatten_parameters(model), dp.flatten_parameters(doubled), strict=True):
        assert type(new) is dp.Parameter and new.is_leaf and new.requires_grad
        torch.testing.assert_close(new, old * 2)
    # buffers are not parameters: left as they are (the very tensors)
    assert doubled["bn"].running_mean is model["bn"].running_mean
    same = dp.map_parameters(lambda p: p, model)  # returning the parameter keeps it
    assert same is model


def test_map_parameters_with_path_sees_the_named_parameters_paths_in_order() -> None:
    model = {"pets": [Pet(Cat(param(1))), Pet(Dog(param(2)))], "pair": Pair(param(3), None)}
    seen: list[str] = []

    def f(path: str, p: torch.Tensor) -> torch.Tensor:
        seen.append(path)
        return p

    dp.map_parameters(f, model, with_path=True)
    assert seen == [name for name, _ in dp.named_parameters(model)]
    assert seen == ["pets.0.animal.whiskers", "pets.1.animal.tail", "pair.first"]


def test_map_parameters_maps_a_tie_once_and_it_stays_tied() -> None:
    shared = param(2)
    model = Two(Dog(shared), [shared, Cat(param(1))])
    calls: list[int] = []

    def f(p: torch.Tensor) -> torch.Tensor:
        calls.append(id(p))
        return p + 1

    new = dp.map_parameters(f, model)
    assert len(calls) == 2
    assert new.left.tail is new.right[0]
    assert len(dp.flatten_parameters(new)) == 2


def test_map_parameters_keeps_requires_grad_as_torch_module_conversions_do() -> None:
    frozen_in_torch = torch.nn.Linear(2, 2)
    frozen_in_torch.weight.requires_grad_(False)
    frozen_in_torch.double()
    model = Two(param(2, requires_grad=False), param(2))
    new = dp.map_parameters(lambda p: p.double(), model)
    assert new.left.requires_grad is frozen_in_torch.weight.requires_grad is False
    assert new.right.requires_grad and new.left.is_leaf and new.right.is_leaf


def test_map_tensors_maps_buffers_and_each_tensor_keeps_its_kind() -> None:
    bn = dp.sample(nn.BatchNorm1dSpec(3))
    model = {"bn": bn, "frozen": Frozen(torch.ones(2)), "const": torch.zeros(2)}
    new = dp.map_tensors(lambda t: t + 1 if t.is_floating_point() else t, model)
    assert kinds(new) == kinds(model)
    assert type(new["frozen"]) is Frozen and not new["frozen"].requires_grad
    torch.testing.assert_close(new["bn"].running_var, bn.running_var + 1)
    assert new["bn"].num_batches_tracked is bn.num_batches_tracked
    paths: list[str] = []
    dp.map_tensors(lambda path, t: paths.append(path) or t, model, with_path=True)
    assert paths == [name for name, _ in dp.named_tensors(model)]


def test_map_tensors_keeps_a_shared_block_one_object() -> None:
    bn = dp.sample(nn.BatchNorm1dSpec(3))
    model = Two(bn, [bn])
    calls = []
    new = dp.map_tensors(lambda t: calls.append(t) or t.double(), model)
    assert new.left is new.right[0]
    assert len(calls) == 5


@pytest.mark.parametrize(
    ("f", "message"),
    [
        (lambda t: 3.0, r"returned a float for this parameter.*at \['pets'\]\[1\]\.animal\.tail"),
        (lambda t: t.long(), r"int64 tensor for this parameter.*at \['pets'\]\[1\]\.animal\.tail"),
    ],
)
def test_map_parameters_errors_name_the_path(f: Any, message: str) -> None:
    model = {"pets": [Pet(None), Pet(Dog(param(2)))]}
    with pytest.raises(dp.ParameterTypeError, match=message):
        dp.map_parameters(f, model)


def test_an_integer_parameter_without_grad_may_stay_integer_as_in_torch() -> None:
    counts = torch.nn.Parameter(torch.arange(3), requires_grad=False)  # torch allows it
    module = torch.nn.Module()
    module.counts = counts
    module.to(torch.float64)
    new = dp.to({"counts": counts}, dtype=torch.float64)
    assert new["counts"] is counts and module.counts.dtype == torch.int64
    doubled = dp.map_parameters(lambda p: p * 2, {"counts": counts})
    assert doubled["counts"].dtype == torch.int64 and type(doubled["counts"]) is dp.Parameter


def test_map_tensors_refuses_to_make_a_buffer_trainable_naming_the_path() -> None:
    model = {"bn": dp.sample(nn.BatchNorm1dSpec(3))}
    with pytest.raises(dp.ParameterTypeError, match=r"Parameter for this constant.*running_mean"):
        dp.map_tensors(lambda t: dp.make_independent(t.float()), model)


def test_an_exception_of_the_function_carries_a_note_naming_the_path() -> None:
    model = {"a": [param(2), param(3)]}

    def f(p: torch.Tensor) -> torch.Tensor:
        if p.shape == (3,):
            raise RuntimeError("boom")
        return p

    with pytest.raises(RuntimeError, match="boom") as info:
        dp.map_parameters(f, model)
    assert any("['a'][1]" in note for note in info.value.__notes__)


def test_hand_written_instances_get_their_listed_tensors_through_their_own_replace() -> None:
    model = [Scaled(param(2), torch.full((2,), 3.0)), Masked(param(2), torch.ones(2))]
    new = dp.map_parameters(lambda p: p * 0, model)  # parameters: both instances
    assert type(new[0]) is Scaled and type(new[1]) is Masked
    assert new[0].weight.abs().sum() == 0 and new[1].weight.abs().sum() == 0
    assert new[0].scale is model[0].scale and new[1].mask is model[1].mask
    # every tensor: a listed buffer is mapped, with the path of the field that holds it
    scaled = dp.map_tensors(lambda t: t.double(), model[0])
    assert scaled.scale.dtype == torch.float64 and type(scaled.weight) is dp.Parameter
    assert dp.named_tensors(model[0])[1][0] == "scale"
    # a buffer the instance holds without listing it cannot be reached: refused, not left behind
    for fn in (
        lambda: dp.map_tensors(lambda t: t, model),
        lambda: dp.to(model, dtype=torch.float64),
        lambda: dp.tensors(model),
    ):
        with pytest.raises(dp.InstanceError, match=r"without listing it.*at \[1\]\.mask"):
            fn()


class Wrapper(dp.Parameterized):
    """A hand-written instance delegating to a derived sub-model through the stream."""

    inner: Dog
    extra: dp.Parameter

    def flatten_parameters(self) -> list[Any]:
        return [self.extra, *dp.flatten_parameters(self.inner)]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Wrapper:
        extra = stream.next_parameter()
        return Wrapper(stream.replace(self.inner), extra)


def test_a_hand_written_instance_delegating_to_a_sub_model_is_converted_whole() -> None:
    model = {"w": Wrapper(Dog(param(2)), param(3))}
    wide = dp.to(model, dtype=torch.float64)
    assert type(wide["w"]) is Wrapper and type(wide["w"].inner) is Dog
    assert [t.dtype for t in dp.tensors(wide)] == [torch.float64, torch.float64]
    assert [name for name, _ in dp.named_tensors(model)] == ["w.extra", "w.inner.tail"]
    assert_same_structure(model, dp.to(wide, dtype=torch.float32), values=True)


def test_parts_without_tensors_are_shared_not_copied() -> None:
    model = {
        "drop": dp.sample(nn.DropoutSpec(0.1)),
        "names": ["a", 1],
        "fc": dp.sample(nn.LinearSpec(2, 2)),
        "pair": Pair(None, {"s": "t"}),
    }
    for new in (
        dp.to(model, dtype=torch.float64),
        dp.map_tensors(lambda t: t + 0, model),
        dp.map_parameters(lambda p: p + 0, model),
        dp.replace_values(model, torch.Tensor, lambda t: t + 0),
    ):
        assert new is not model and new["fc"] is not model["fc"]
        assert new["drop"] is model["drop"] and new["names"] is model["names"]
        assert new["pair"] is model["pair"]


def test_a_cycle_is_refused() -> None:
    loop: list[Any] = [param(1)]
    loop.append(loop)
    with pytest.raises(dp.CycleError):
        dp.map_tensors(lambda t: t, loop)


# --- to -------------------------------------------------------------------------------------


def torch_batchnorm_like(model: Any) -> torch.nn.BatchNorm1d:
    module = torch.nn.BatchNorm1d(model.weight.shape[0])
    module.load_state_dict({name: t.detach().clone() for name, t in dp.named_tensors(model)})
    return module


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        (None, torch.float64),
        (None, torch.bfloat16),
        (None, torch.float16),
        (None, torch.complex64),
        ("meta", None),
        ("meta", torch.float64),
        ("cpu", torch.float32),
        (None, None),
    ],
)
def test_to_matches_torch_module_to(device: Any, dtype: Any) -> None:
    bn, _ = trained_batchnorm_model()
    layer = bn[1]
    module = torch_batchnorm_like(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's complex-module warning (see the test below)
        module.to(device=device, dtype=dtype)
    ours = dp.to(layer, device=device, dtype=dtype)
    expected = module.state_dict(keep_vars=True)
    assert [name for name, _ in dp.named_tensors(ours)] == list(expected)
    for name, t in dp.named_tensors(ours):
        ref = expected[name]
        assert (t.dtype, t.device, t.shape) == (ref.dtype, ref.device, ref.shape), name
        assert type(t) is type(ref) and t.requires_grad == ref.requires_grad and t.is_leaf
        if t.device.type != "meta":
            assert torch.equal(t, ref), name


def test_to_refuses_an_integer_dtype_as_torch_does() -> None:
    with pytest.raises(TypeError, match="floating point or complex"):
        torch.nn.Linear(2, 2).to(torch.int32)
    with pytest.raises(TypeError, match="floating point or complex"):
        dp.to(dp.sample(nn.LinearSpec(2, 2)), dtype=torch.int32)


def test_to_takes_a_dtype_in_the_device_position_as_torch_does() -> None:
    layer = dp.sample(nn.LinearSpec(2, 2))
    module = torch.nn.Linear(2, 2).to(torch.float64)
    assert dp.to(layer, torch.float64).weight.dtype == module.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="torch.dtype"):
        dp.to(layer, dtype="float64")  # type: ignore[arg-type]


def test_to_complex_gives_no_complex_module_warning_unlike_torch() -> None:
    """The documented difference: torch warns about its own modules and complex tensors."""
    with pytest.warns(UserWarning, match="Complex modules"):
        torch.nn.Linear(2, 2).to(torch.complex64)
    layer = dp.to(dp.sample(nn.LinearSpec(2, 2)), dtype=torch.complex64)  # warnings are errors
    assert layer.weight.dtype == torch.complex64 and type(layer.weight) is dp.Parameter


def test_to_real_from_complex_discards_the_imaginary_part_as_torch_does() -> None:
    layer = dp.to(dp.sample(nn.LinearSpec(2, 2)), dtype=torch.complex64)
    layer = dp.map_parameters(lambda p: p * (1 + 2j), layer)
    module = torch.nn.Linear(2, 2)
    with warnings.catch_warnings():
        # torch's "Complex modules" warning, and its cast warning (given once per process)
        warnings.simplefilter("ignore")
        module.to(torch.complex64)
        module.load_state_dict(dict(dp.named_tensors(layer)))
        module.to(torch.float32)
        back = dp.to(layer, dtype=torch.float32)
    for name, t in dp.named_tensors(back):
        ref = module.state_dict()[name]
        assert t.dtype == ref.dtype == torch.float32 and torch.equal(t, ref)


def test_to_keeps_ties_frozen_parameters_and_shares_what_needs_no_change() -> None:
    shared = param(2)
    ints = torch.arange(3)
    model = {"a": Dog(shared), "b": [shared, Frozen(torch.ones(2))], "mask": ints, "s": "x"}
    new = dp.to(model, dtype=torch.float64)
    assert new["a"].tail is new["b"][0] and new["a"].tail.dtype == torch.float64
    assert type(new["b"][1]) is Frozen and new["b"][1].dtype == torch.float64
    assert new["mask"] is ints
    assert dp.to(new, dtype=torch.float64) is new  # already there: the model itself
    assert dp.to(model) is model


def test_to_meta_gives_a_shape_only_model_and_moving_it_back_names_the_path() -> None:
    model, _ = trained_batchnorm_model()
    meta = dp.to(model, "meta")
    assert {t.device.type for t in dp.tensors(meta)} == {"meta"}
    assert [(n, t.shape) for n, t in dp.named_tensors(meta)] == [
        (n, t.shape) for n, t in dp.named_tensors(model)
    ]
    with pytest.raises(NotImplementedError, match="meta model has shapes only") as info:
        dp.to(meta, "cpu")
    assert any("[0].weight" in note for note in info.value.__notes__)


PURE_OPTIMIZERS = [
    getattr(optim, name)
    for name in optim.__all__
    if isinstance(getattr(optim, name), type)
    and issubclass(getattr(optim, name), optim.PureOptimizer)
    and getattr(optim, name) is not optim.PureOptimizer
]


def test_the_optimizer_grid_holds_every_pure_optimizer() -> None:
    assert len(PURE_OPTIMIZERS) >= 15
    assert {"GD", "Adam", "Adafactor", "Rprop", "ASGD", "Lion"} <= {
        c.__name__ for c in PURE_OPTIMIZERS
    }


@pytest.mark.parametrize("make", [*PURE_OPTIMIZERS, "TorchOptimizer"], ids=str)
def test_bfloat16_model_trains_with_every_optimizer(make: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    model = dp.sample(nn.MLPSpec((3, 8, 1), activation=torch.tanh), generator=gen)
    model = dp.to(model, dtype=torch.bfloat16)
    x = torch.randn(32, 3, generator=gen).bfloat16()
    y = x.float().sum(dim=1, keepdim=True).sin().bfloat16()
    if make == "TorchOptimizer":
        opt: Any = optim.TorchOptimizer.init(model, torch.optim.Adam, lr=1e-2)
    else:
        opt = make.init(model)
    lr = 1.0 if make is optim.Adadelta else 1e-2

    def loss_of(m: Any) -> torch.Tensor:
        return F.mse_loss(m(x).float(), y.float())

    start = loss_of(model).item()
    for _ in range(20):
        model, opt = optim.run_step(model, opt, loss_of(model), lr)
    for p in dp.flatten_parameters(model):
        assert p.dtype == torch.bfloat16 and p.is_leaf and p.requires_grad
    assert loss_of(model).item() < start


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_model_to_float64_and_back_preserves_outputs_and_buffers(mode: str) -> None:
    model, x = trained_batchnorm_model()
    m64 = dp.to(model, dtype=torch.float64)
    assert {t.dtype for t in dp.tensors(m64)} == {torch.float64, torch.int64}
    back = dp.to(m64, dtype=torch.float32)
    for (name, a), (_, b) in zip(dp.named_tensors(model), dp.named_tensors(back), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    if mode == "eval":
        with nn.evaluating():
            out32, out64 = model(x), m64(x.double())
        torch.testing.assert_close(out64.float(), out32)
    else:
        out32, new32 = nn.training(lambda m, x: m(x), model, x)
        out64, new64 = nn.training(lambda m, x: m(x), m64, x.double())
        torch.testing.assert_close(out64.float(), out32)
        for (name, a), (_, b) in zip(dp.named_tensors(new32), dp.named_tensors(new64), strict=True):
            assert b.dtype == (torch.float64 if a.is_floating_point() else a.dtype), name
            torch.testing.assert_close(b.to(a.dtype), a)
        # torch itself, moved the same way, agrees on the running statistics
        module = torch_batchnorm_like(model[1]).double()
        module.train()
        module(model[0](x).double().detach())
        torch.testing.assert_close(new64[1].running_var, module.running_var)


# --- the round trip over odd structures (hypothesis) ---------------------------------------

shapes = st.lists(st.integers(1, 3), max_size=2).map(tuple)
tensor_leaves = st.one_of(
    shapes.map(lambda s: dp.make_independent(torch.randn(s))),
    shapes.map(lambda s: torch.nn.Parameter(torch.randn(s), requires_grad=False)),
    shapes.map(lambda s: Frozen(torch.randn(s))),
    shapes.map(torch.randn),  # a constant (buffer)
    shapes.map(lambda s: torch.randint(0, 5, s)),  # an integer buffer
    shapes.map(lambda s: torch.zeros(s, dtype=torch.bool)),
    shapes.map(lambda s: torch.empty(s, device="meta")),
    shapes.map(lambda s: dp.make_independent(torch.empty(s, device="meta"))),
)
leaves = st.one_of(
    tensor_leaves,
    st.integers(-3, 3),
    st.floats(-1, 1),
    st.text(max_size=2),
    st.none(),
    st.just(torch.tanh),
    shapes.map(lambda s: Scaled(dp.make_independent(torch.randn(s)), torch.randn(s))),
    shapes.map(lambda s: Pet(Dog(dp.make_independent(torch.randn(s))))),
    shapes.map(lambda s: Pet(Cat(dp.make_independent(torch.randn(s))))),
)


def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text("ab", min_size=1, max_size=2), children, max_size=3),
        st.builds(Two, children, children),
        st.builds(Pair, children, children),
        children.map(lambda c: Two(c, [c])),  # shared: ties and shared blocks
    )


models = st.recursive(leaves, extend, max_leaves=10)


def assert_same_structure(a: Any, b: Any, *, values: bool) -> None:
    """Same paths, same leaf types and kinds, same tensor shapes/dtypes/devices (and values),
    and the same pattern of sharing between tensors."""
    left, right = list(walk_keys(a)), list(walk_keys(b))
    assert [k for k, _ in left] == [k for k, _ in right]
    pairs: dict[int, int] = {}
    for (keys, x), (_, y) in zip(left, right, strict=True):
        assert type(x) is type(y), keys
        if isinstance(x, torch.Tensor):
            assert (x.shape, x.dtype, x.device) == (y.shape, y.dtype, y.device), keys
            assert x.requires_grad == y.requires_grad and y.is_leaf, keys
            assert pairs.setdefault(id(x), id(y)) == id(y), keys  # a tie stays a tie
            if values and x.device.type != "meta":
                assert torch.equal(x, y), keys
        elif not callable(x):
            assert x == y or x != x, keys  # (nan)
    assert len(set(pairs.values())) == len(pairs)  # and no new tie


@settings(max_examples=60, deadline=None)
@given(models)
def test_to_round_trips_float32_float64_float32(model: Any) -> None:
    wide = dp.to(model, dtype=torch.float64)
    for t in dp.tensors(wide):
        assert t.dtype == torch.float64 or not t.is_floating_point()
    back = dp.to(wide, dtype=torch.float32)
    assert_same_structure(model, back, values=True)
    meta = dp.to(model, "meta")
    assert [k for k, _ in walk_keys(meta)] == [k for k, _ in walk_keys(model)]
    assert all(t.device.type == "meta" for t in dp.tensors(meta))


# --- replace_parameters: the device check -----------------------------------------------------


class Block(dp.Parameterized):
    weight: dp.Parameter
    bias: dp.Parameter


def test_replace_parameters_refuses_another_device_naming_the_slot_and_to() -> None:
    model = {"blocks": [Block(param(2, 2), param(2)), Block(param(2, 2), param(2))]}
    new = [dp.make_independent(p.detach() + 1) for p in dp.flatten_parameters(model)]
    new[3] = dp.make_independent(torch.empty(2, device="meta"))
    with pytest.raises(dp.ParameterShapeError, match=r"on device meta.*diffprog\.to") as info:
        dp.replace_parameters(model, new)
    assert info.value.path == "['blocks'][1].bias"


def test_replace_parameters_device_check_covers_ties_and_hand_written_instances() -> None:
    shared = param(2)
    tied = Two(Dog(shared), [shared])
    with pytest.raises(dp.ParameterShapeError, match="on device meta"):
        dp.replace_parameters(tied, [dp.make_independent(torch.empty(2, device="meta"))])
    scaled = [Scaled(param(2), torch.ones(2))]
    with pytest.raises(dp.ParameterShapeError, match=r"on device meta.*at \[0\]"):
        dp.replace_parameters(scaled, [dp.make_independent(torch.empty(2, device="meta"))])


def test_replace_parameters_fills_a_meta_skeleton_the_documented_exception() -> None:
    model, x = trained_batchnorm_model()
    skeleton = dp.to(model, "meta")
    loaded = dp.replace_parameters(skeleton, dp.flatten_parameters(model))
    assert all(p.device.type == "cpu" for p in dp.flatten_parameters(loaded))
    # its buffers are still meta: filled with map_tensors from named tensors (as loading does)
    state = dict(dp.named_tensors(model))
    full = dp.map_tensors(lambda path, t: state[path], skeleton, with_path=True)
    with nn.evaluating():
        torch.testing.assert_close(full(x), model(x))
    # the exception is one way: a real slot does not take a meta parameter
    with pytest.raises(dp.ParameterShapeError, match="on device meta"):
        dp.replace_parameters(model, dp.flatten_parameters(skeleton))


@pytest.mark.cuda
def test_replace_parameters_refuses_cuda_parameters_for_cpu_slots_and_to_moves_all() -> None:
    model, x = trained_batchnorm_model()
    on_gpu = [dp.make_independent(p.detach().cuda()) for p in dp.flatten_parameters(model)]
    with pytest.raises(dp.ParameterShapeError, match="on device cuda:0"):
        dp.replace_parameters(model, on_gpu)
    moved = dp.to(model, "cuda")
    assert {t.device.type for t in dp.tensors(moved)} == {"cuda"}
    with nn.evaluating():
        torch.testing.assert_close(moved(x.cuda()).cpu(), model(x))
    back = dp.to(moved, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(dp.tensors(back), dp.tensors(model), strict=True))


# --- tensors, named_tensors, collect, replace_values, walk -----------------------------------


def test_named_tensors_are_torchs_state_dict_keys_in_its_order() -> None:
    model, _ = trained_batchnorm_model()
    module = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh())
    assert [name for name, _ in dp.named_tensors(model)] == list(module.state_dict())
    assert [t for t in dp.tensors(model)] == [t for _, t in dp.named_tensors(model)]


def test_a_tied_tensor_is_named_once_at_its_first_path_like_named_parameters() -> None:
    shared, buffer = param(2), torch.ones(2)
    model = {"a": [shared, buffer], "b": Two(shared, buffer)}
    assert [n for n, _ in dp.named_tensors(model)] == ["a.0", "a.1"]
    assert [n for n, _ in dp.named_parameters(model)] == ["a.0"]
    assert len(dp.tensors(model)) == 2


def test_named_tensors_refuse_a_name_clash() -> None:
    with pytest.raises(dp.NameClashError, match="both named '1'"):
        dp.named_tensors({1: torch.ones(1), "1": torch.zeros(1)})


def test_collect_finds_layers_floats_and_dropouts_anywhere() -> None:
    gen = torch.Generator().manual_seed(0)
    model = dp.sample(
        nn.SequentialSpec(
            nn.LinearSpec(3, 4), nn.DropoutSpec(0.1), torch.relu, nn.LinearSpec(4, 1)
        ),
        generator=gen,
    )
    holder = {"net": model, "extra": Pet(Dog(param(1), wag=0.25))}
    assert [type(v).__name__ for v in dp.collect(holder, nn.Linear)] == ["Linear", "Linear"]
    assert dp.collect(holder, nn.Dropout, with_path=True) == [("net.1", model[1])]
    assert dp.collect(holder, float, with_path=True) == [
        ("net.1.p", 0.1),
        ("extra.animal.wag", 0.25),
    ]
    assert dp.collect(holder, dict, with_path=True) == [("", holder)]  # the root matches
    assert dp.collect(holder, (Dog, Cat)) == [holder["extra"].animal]
    assert [id(p) for p in dp.collect(holder, dp.Parameter)] == [
        id(p) for p in dp.flatten_parameters(holder)
    ]


def test_replace_values_changes_every_dropout_p_and_shares_the_rest() -> None:
    model = dp.sample(
        nn.SequentialSpec(nn.LinearSpec(3, 4), nn.DropoutSpec(0.1), nn.LinearSpec(4, 1))
    )
    new = dp.replace_values(model, nn.Dropout, lambda d: dataclasses.replace(d, p=0.5))
    assert new[1].p == 0.5 and model[1].p == 0.1
    assert new[0] is model[0] and new[2] is model[2]
    renamed = dp.replace_values({"a": Two(1, 2.0)}, float, lambda path, v: path, with_path=True)
    assert renamed["a"].right == "a.right" and renamed["a"].left == 1


def test_replace_values_replaces_a_shared_block_once_and_keeps_it_shared() -> None:
    dog = Dog(param(2))
    calls = []
    new = dp.replace_values(Two(dog, [dog]), Dog, lambda d: calls.append(d) or Cat(d.tail))
    assert len(calls) == 1 and new.left is new.right[0] and type(new.left) is Cat


def test_replace_values_puts_a_plain_tensor_where_a_parameter_was_as_a_parameter() -> None:
    model = Two(param(2), Frozen(torch.ones(2)))
    new = dp.replace_values(model, torch.Tensor, torch.zeros_like)
    assert type(new.left) is dp.Parameter and type(new.right) is Frozen


def test_walk_gives_state_dict_paths() -> None:
    model = {"bn": dp.sample(nn.BatchNorm1dSpec(2)), "xs": [1, "s"]}
    assert [path for path, _ in dp.walk(model)] == [
        "bn.num_features",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        "bn.eps",
        "bn.momentum",
        "xs.0",
        "xs.1",
    ]
