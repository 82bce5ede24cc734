"""Models are torch pytrees: torch.func, torch.compile and torch.export take and return them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree

import diffprog as dp
from diffprog.nn import BatchNorm1dSpec, Linear, LinearSpec, MLPSpec


def _param(*shape: int) -> dp.Parameter:
    return dp.make_independent(torch.randn(*shape))


class Tied(dp.Parameterized):
    """Two uses of one weight, a dict of layers, a static flag and a buffer."""

    encoder: dp.Parameter
    decoder: dp.Parameter  # the same object as encoder
    heads: dict[str, Linear]
    scale: torch.Tensor  # a constant
    squash: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.encoder.T) if self.squash else x @ self.encoder.T
        y = h @ self.decoder * self.scale
        return sum((head(y) for head in self.heads.values()), torch.zeros(()))


def tied() -> Tied:
    w = _param(4, 3)
    heads = {"a": dp.sample(LinearSpec(3, 2)), "b": dp.sample(LinearSpec(3, 2))}
    return Tied(w, w, heads, torch.tensor(0.5))


class Circle(dp.Parameterized):
    radius: dp.Parameter

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.radius


class Square(dp.Parameterized):
    side: dp.Parameter
    power: int = 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.side**self.power


class Shapes(dp.Parameterized):
    """A sum type: each field holds one of several model types."""

    first: Circle | Square
    second: Circle | Square

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x) + self.second(x)


class HandWritten:
    """A hand-written instance that is not a Parameterized subclass."""

    def __init__(self, w: torch.Tensor, activation: Any = torch.tanh) -> None:
        self.w = w
        self.activation = activation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x @ self.w)

    def flatten_parameters(self) -> list[torch.Tensor]:
        return [self.w]

    def replace_own_parameters(self, stream: dp.ParamStream) -> HandWritten:
        return HandWritten(stream.next_parameter(), self.activation)


dp.register_pytree(HandWritten)


class Foreign:
    """A class given an instance with register_parameterized."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


dp.register_parameterized(
    Foreign, flatten=lambda f: [f.w], replace=lambda f, s: Foreign(s.next_parameter())
)


def models() -> list[tuple[str, Any, torch.Tensor]]:
    """(name, model, input) for each kind of model."""
    return [
        ("mlp", dp.sample(MLPSpec([3, 5, 2])), torch.randn(4, 3)),
        ("tied", tied(), torch.randn(4, 3)),
        ("sum type", Shapes(Circle(_param(3)), Square(_param(3), power=3)), torch.randn(4, 3)),
        ("hand-written", HandWritten(_param(3, 2)), torch.randn(4, 3)),
        ("registered", Foreign(_param(3)), torch.randn(4, 3)),
    ]


def _loss(model: Any, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).sum()


def _autograd_grads(model: Any, x: torch.Tensor) -> list[torch.Tensor]:
    """The reference: torch.autograd.grad with respect to every tensor leaf."""
    leaves = pytree.tree_leaves(model)
    copies = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
    rebuilt = pytree.tree_unflatten(copies, pytree.tree_structure(model))
    return list(torch.autograd.grad(_loss(rebuilt, x), copies, allow_unused=True))


@pytest.mark.parametrize("case", models(), ids=lambda c: c[0])
def test_pytree_round_trip_keeps_the_model(case: tuple[str, Any, torch.Tensor]) -> None:
    _, model, x = case
    leaves, spec = pytree.tree_flatten(model)
    again = pytree.tree_unflatten(leaves, spec)
    assert type(again) is type(model)
    assert dp.flatten_parameters(again) == dp.flatten_parameters(model)  # Parameters kept
    torch.testing.assert_close(again(x), model(x))


def test_leaves_are_every_tensor_once_with_ties_kept() -> None:
    model = tied()
    leaves = pytree.tree_leaves(model)
    assert [id(t) for t in leaves] == [id(t) for t in dp.tensors(model)]
    doubled = pytree.tree_map(lambda t: t * 2, model)
    assert doubled.encoder is doubled.decoder  # the tie survives
    assert type(doubled.encoder) is torch.Tensor  # new leaves go in as they are
    assert doubled.squash is True and doubled.heads.keys() == {"a", "b"}


def test_structure_is_equal_for_equal_models_and_differs_on_static_fields() -> None:
    a, b = dp.sample(MLPSpec([3, 5, 2])), dp.sample(MLPSpec([3, 5, 2]))
    assert pytree.tree_structure(a) == pytree.tree_structure(b)
    assert hash(pytree.tree_structure(a)) == hash(pytree.tree_structure(b))
    other = dp.sample(MLPSpec([3, 5, 2], activation=torch.tanh))
    assert pytree.tree_structure(a) != pytree.tree_structure(other)
    square = Square(_param(3), power=3)
    assert pytree.tree_structure(square) != pytree.tree_structure(Square(_param(3)))
    # gradients and tangents (plain tensors) have the structure of their model
    assert pytree.tree_structure(pytree.tree_map(torch.zeros_like, a)) == pytree.tree_structure(a)


def test_one_tensor_given_for_two_leaves_flattens_back_to_two() -> None:
    model = dp.sample(LinearSpec(2, 2))
    zero = torch.zeros(())
    filled = pytree.tree_map(lambda t: zero, model)
    assert len(pytree.tree_leaves(filled)) == 2


@pytest.mark.parametrize("case", models(), ids=lambda c: c[0])
def test_grad_and_grad_and_value_give_model_shaped_gradients(
    case: tuple[str, Any, torch.Tensor],
) -> None:
    _, model, x = case
    grads = torch.func.grad(_loss)(model, x)
    assert type(grads) is type(model)
    expected = _autograd_grads(model, x)
    for got, want in zip(pytree.tree_leaves(grads), expected, strict=True):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want)
    grads2, value = torch.func.grad_and_value(_loss)(model, x)
    torch.testing.assert_close(value, _loss(model, x))
    for a, b in zip(pytree.tree_leaves(grads2), pytree.tree_leaves(grads), strict=True):
        torch.testing.assert_close(a, b)


def test_grad_of_a_tied_model_flows_to_the_one_tensor() -> None:
    model, x = tied(), torch.randn(4, 3)
    grads = torch.func.grad(_loss)(model, x)
    assert grads.encoder is grads.decoder  # one leaf, one gradient: both uses summed
    torch.testing.assert_close(grads.encoder, _autograd_grads(model, x)[0])


@pytest.mark.parametrize("case", models(), ids=lambda c: c[0])
def test_jacrev_and_jvp_take_models(case: tuple[str, Any, torch.Tensor]) -> None:
    _, model, x = case
    jac = torch.func.jacrev(lambda m: m(x))(model)
    assert type(jac) is type(model)
    tangent = pytree.tree_map(torch.ones_like, model)
    out, jvp_out = torch.func.jvp(lambda m: m(x), (model,), (tangent,))
    torch.testing.assert_close(out, model(x))
    # the jvp is the Jacobian contracted with the tangent
    contracted = sum(
        (
            (j * t).reshape(*out.shape, -1).sum(-1)
            for j, t in zip(pytree.tree_leaves(jac), pytree.tree_leaves(tangent), strict=True)
        ),
        torch.zeros(()),
    )
    torch.testing.assert_close(jvp_out, contracted)


@pytest.mark.parametrize("case", models(), ids=lambda c: c[0])
def test_vmap_over_a_stacked_model(case: tuple[str, Any, torch.Tensor]) -> None:
    _, model, x = case
    shifted = pytree.tree_map(lambda t: t + 1, model)
    stacked = pytree.tree_map(lambda *ts: torch.stack(ts), model, shifted)
    out = torch.func.vmap(lambda m, x: m(x), in_dims=(0, None))(stacked, x)
    torch.testing.assert_close(out, torch.stack([model(x), shifted(x)]))
    # a model as out_dims-broadcast output: vmap returns a stacked model
    back = torch.func.vmap(lambda m: pytree.tree_map(lambda t: t * 2, m))(stacked)
    assert type(back) is type(model)


def test_grad_over_the_parameters_of_a_model_with_integer_buffers() -> None:
    # torch.func.grad makes every leaf require grad, which an integer buffer cannot: split the
    # parameters off with partition and differentiate with respect to them only.
    model = dp.sample(BatchNorm1dSpec(3))  # num_batches_tracked is an int64 buffer
    params, rest = dp.partition(model, dp.Parameter)
    x = torch.randn(5, 3)

    def loss(params: Any) -> torch.Tensor:
        return dp.combine(params, rest)(x, training=False).pow(3).sum()

    grads = torch.func.grad(loss)(params)
    y = model(x, training=False)
    expected = torch.autograd.grad(y.pow(3).sum(), [model.weight, model.bias])
    torch.testing.assert_close(grads.weight, expected[0])
    torch.testing.assert_close(grads.bias, expected[1])
    with pytest.raises(RuntimeError, match="floating point"):
        torch.func.grad(lambda m: m(x, training=False).sum())(model)


def test_functional_call_style_swap_of_tensors() -> None:
    # The diffprog counterpart of torch.func.functional_call: put other tensors in place.
    model = dp.sample(MLPSpec([3, 5, 2]))
    leaves, spec = pytree.tree_flatten(model)
    new = [t.detach() * 0 for t in leaves]
    torch.testing.assert_close(
        pytree.tree_unflatten(new, spec)(torch.ones(1, 3)), torch.zeros(1, 2)
    )


# Dynamo reads the .grad of every tensor it guards, which warns for torch.func's wrapped ones.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_torch_compile_takes_and_returns_models() -> None:
    torch._dynamo.reset()
    model, x = dp.sample(MLPSpec([3, 5, 2])), torch.randn(4, 3)
    forward = torch.compile(lambda m, x: m(x), fullgraph=True, backend="eager")
    torch.testing.assert_close(forward(model, x), model(x))
    grad = torch.compile(torch.func.grad(_loss), backend="eager")
    grads = grad(model, x)
    assert type(grads) is type(model)
    for a, b in zip(
        pytree.tree_leaves(grads), pytree.tree_leaves(torch.func.grad(_loss)(model, x)), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_torch_export_takes_a_model_argument() -> None:
    class Apply(torch.nn.Module):
        def forward(self, model: Any, x: torch.Tensor) -> torch.Tensor:
            return model(x)  # type: ignore[no-any-return]

    model, x = dp.sample(MLPSpec([3, 5, 2])), torch.randn(4, 3)
    program = torch.export.export(Apply(), (model, x))
    assert program.graph_signature.user_inputs[:2] == ("model_0_weight", "model_0_bias")
    other = dp.sample(MLPSpec([3, 5, 2]))  # same structure, other weights
    torch.testing.assert_close(program.module()(other, x), other(x))


def test_every_parameterized_class_is_registered_at_creation() -> None:
    class Fresh(dp.Parameterized):
        w: dp.Parameter

    assert Fresh in pytree.SUPPORTED_NODES
    name = pytree.SUPPORTED_SERIALIZED_TYPES[Fresh].serialized_type_name
    assert name.endswith("Fresh")  # torch.export names the type by it
    assert Foreign in pytree.SUPPORTED_NODES and HandWritten in pytree.SUPPORTED_NODES


def test_a_hand_written_class_is_registered_when_diffprog_first_meets_it() -> None:
    @dataclasses.dataclass(frozen=True)
    class Lazy:
        w: torch.Tensor

        def flatten_parameters(self) -> list[torch.Tensor]:
            return [self.w]

        def replace_own_parameters(self, stream: dp.ParamStream) -> Any:
            return Lazy(stream.next_parameter())

    assert Lazy not in pytree.SUPPORTED_NODES
    dp.flatten_parameters([Lazy(_param(2))])
    assert Lazy in pytree.SUPPORTED_NODES


class Holder:
    """A plain object diffprog does not traverse."""

    def __init__(self, p: torch.Tensor) -> None:
        self.p = p


class Hiding(dp.Parameterized):
    w: dp.Parameter
    box: Any


class Unlisting:
    """A hand-written instance holding a buffer it does not list."""

    def __init__(self, w: torch.Tensor, buffer: torch.Tensor) -> None:
        self.w = w
        self.buffer = buffer

    def flatten_parameters(self) -> list[torch.Tensor]:
        return [self.w]

    def replace_own_parameters(self, stream: dp.ParamStream) -> Unlisting:
        return Unlisting(stream.next_parameter(), self.buffer)


dp.register_pytree(Unlisting)


def test_flatten_refuses_what_a_transformation_would_silently_leave_out() -> None:
    # a Parameter hidden in an opaque value would be neither mapped nor differentiated
    with pytest.raises(dp.HiddenParameterError, match=r"at box\.p"):
        pytree.tree_leaves(Hiding(_param(2), Holder(_param(2))))
    assert len(pytree.tree_leaves(Hiding(_param(2), Holder(torch.zeros(2))))) == 1  # a constant
    with pytest.raises(dp.InstanceError, match=r"without listing it.*at buffer"):
        pytree.tree_leaves([Unlisting(_param(2), torch.zeros(2))])
    shared = Circle(_param(1))  # a shared sub-model is no cycle
    assert len(pytree.tree_leaves(Shapes(shared, shared))) == 1
    cyclic: dict[str, Any] = {"w": _param(2)}
    cyclic["self"] = cyclic
    with pytest.raises(dp.CycleError):
        pytree.tree_leaves(Hiding(_param(2), cyclic))


# Dynamo reads the .grad of every tensor it guards, which warns for torch.func's wrapped ones.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_torch_compile_reuses_its_graph_for_another_model_of_the_structure() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    forward = torch.compile(lambda m, x: m(x), backend="eager")
    x = torch.randn(4, 3)
    for _ in range(3):
        model = dp.sample(MLPSpec([3, 5, 2]))
        torch.testing.assert_close(forward(model, x), model(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("case", models()[1:], ids=lambda c: c[0])
def test_torch_export_names_inputs_by_state_dict_path(case: tuple[str, Any, torch.Tensor]) -> None:
    class Apply(torch.nn.Module):
        def forward(self, model: Any, x: torch.Tensor) -> torch.Tensor:
            return model(x)  # type: ignore[no-any-return]

    _, model, x = case
    program = torch.export.export(Apply(), (model, x))
    names = [name.replace(".", "_") for name, _ in dp.named_tensors(model)]
    assert program.graph_signature.user_inputs == (*(f"model_{n}" for n in names), "x")
    torch.testing.assert_close(program.module()(model, x), model(x))


# Dynamo reads the .grad of every tensor it guards, which warns for torch.func's wrapped ones.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("case", models(), ids=lambda c: c[0])
def test_torch_compile_takes_and_returns_every_kind_of_model(
    case: tuple[str, Any, torch.Tensor],
) -> None:
    """fullgraph=True over each kind of model (ties, a sum type, hand-written and registered
    instances): a forward, a function returning a model, and torch.func.grad compiled."""
    torch._dynamo.reset()
    _, model, x = case
    forward = torch.compile(lambda m, x: m(x), fullgraph=True, backend="eager")
    torch.testing.assert_close(forward(model, x), model(x))
    # A traversal inside the graph needs diffprog to have met each class eagerly once (docs:
    # "Your own compiled functions over models"): flattening the model does that.
    pytree.tree_leaves(model)
    scaled = torch.compile(
        lambda m: pytree.tree_map(lambda t: t * 2, m), fullgraph=True, backend="eager"
    )
    out = scaled(model)
    assert type(out) is type(model)
    assert pytree.tree_structure(out) == pytree.tree_structure(model)
    for a, b in zip(pytree.tree_leaves(out), pytree.tree_leaves(model), strict=True):
        torch.testing.assert_close(a, b * 2)
    grads = torch.compile(torch.func.grad(_loss), fullgraph=True, backend="eager")(model, x)
    assert type(grads) is type(model)
    for a, b in zip(
        pytree.tree_leaves(grads), pytree.tree_leaves(torch.func.grad(_loss)(model, x)), strict=True
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", models(), ids=lambda c: c[0])
def test_jvp_returns_a_model_tangent(case: tuple[str, Any, torch.Tensor]) -> None:
    """torch.func.jvp of a function from models to models: the output and its tangent are
    models of the structure (here a linear map, so the tangent is the map of the tangent)."""
    _, model, _ = case

    def halve(m: Any) -> Any:
        return pytree.tree_map(lambda t: t * 0.5, m)

    tangent = pytree.tree_map(torch.ones_like, model)
    out, out_tangent = torch.func.jvp(halve, (model,), (tangent,))
    assert type(out) is type(model) and type(out_tangent) is type(model)
    for t in pytree.tree_leaves(out_tangent):
        torch.testing.assert_close(t, torch.full_like(t, 0.5))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("case", models(), ids=lambda c: c[0])
def test_torch_export_returns_a_model(case: tuple[str, Any, torch.Tensor]) -> None:
    """An exported program whose output is a model returns a model of the structure, whatever
    the weights it is called with. (torch.func.grad inside torch.export is refused by torch:
    "meta conversion to view functorch tensor".)"""

    class Step(torch.nn.Module):
        def forward(self, model: Any, x: torch.Tensor) -> Any:
            return pytree.tree_map(lambda t: t - 0.1 * x.mean() * t, model)

    _, model, x = case
    pytree.tree_leaves(model)  # diffprog meets each class eagerly first (as for compile)
    program = torch.export.export(Step(), (model, x))
    other = pytree.tree_map(lambda t: t + 0.25, model)  # same structure, other weights
    got = program.module()(other, x)
    want = Step()(other, x)
    assert type(got) is type(model)
    assert pytree.tree_structure(got) == pytree.tree_structure(model)
    for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(want), strict=True):
        torch.testing.assert_close(a, b)
