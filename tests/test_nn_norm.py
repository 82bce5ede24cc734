"""Normalisation layers against torch.nn itself: init, outputs, gradients, running statistics."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import diffprog as dp
from diffprog import nn
from diffprog.optim import GD, run_step

DTYPES = [torch.float32, torch.float64]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def state_of(layer: Any) -> dict[str, torch.Tensor]:
    """Our layer's parameters and buffers, by torch's state_dict keys."""
    state = {name: p.detach().clone() for name, p in dp.named_parameters(layer)}
    for name in BUFFERS:
        value = getattr(layer, name, None)
        if value is not None:
            state[name] = value.clone()
    return state


def randomised(layer: Any, seed: int = 1) -> Any:
    """``layer`` with random parameters and (if any) random running statistics."""
    g = gen(seed)
    params = dp.flatten_parameters(layer)
    new = [dp.make_independent(torch.randn(p.shape, dtype=p.dtype, generator=g)) for p in params]
    layer = dp.replace_parameters(layer, new)
    if getattr(layer, "running_mean", None) is not None:
        mean, var = layer.running_mean, layer.running_var
        layer = dataclasses.replace(
            layer,
            running_mean=torch.randn(mean.shape, dtype=mean.dtype, generator=g),
            running_var=torch.rand(var.shape, dtype=var.dtype, generator=g) + 0.5,
            num_batches_tracked=torch.tensor(3),
        )
    return layer


def torch_twin(layer: Any, module: torch.nn.Module) -> torch.nn.Module:
    module.load_state_dict(state_of(layer), strict=True)
    return module


def grads_of(layer: Any, loss: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n, _ in dp.named_parameters(layer)]
    found = dp.grad(loss, [x, *dp.flatten_parameters(layer)])
    return {"input": found[0], **dict(zip(names, found[1:], strict=True))}


def torch_grads_of(module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    assert x.grad is not None
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    return grads


# (our spec, the torch.nn layer with the same arguments, input shapes)
Case = tuple[Any, Callable[..., torch.nn.Module], list[tuple[int, ...]]]
CASES: list[Case] = [
    (nn.BatchNorm1dSpec(3), lambda **kw: torch.nn.BatchNorm1d(3, **kw), [(5, 3), (4, 3, 6)]),
    (
        nn.BatchNorm1dSpec(3, momentum=None, bias=False),
        lambda **kw: torch.nn.BatchNorm1d(3, momentum=None, bias=False, **kw),
        [(5, 3)],
    ),
    (
        nn.BatchNorm1dSpec(3, affine=False, track_running_stats=False),
        lambda **kw: torch.nn.BatchNorm1d(3, affine=False, track_running_stats=False, **kw),
        [(5, 3), (2, 3, 4)],
    ),
    (
        nn.BatchNorm2dSpec(4, eps=1e-3, momentum=0.3),
        lambda **kw: torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.3, **kw),
        [(2, 4, 5, 3), (3, 4, 1, 2)],
    ),
    (nn.BatchNorm3dSpec(2), lambda **kw: torch.nn.BatchNorm3d(2, **kw), [(2, 2, 3, 2, 3)]),
    (
        nn.InstanceNorm1dSpec(3),
        lambda **kw: torch.nn.InstanceNorm1d(3, **kw),
        [(2, 3, 7), (3, 5)],
    ),
    (
        nn.InstanceNorm1dSpec(3, affine=True, track_running_stats=True),
        lambda **kw: torch.nn.InstanceNorm1d(3, affine=True, track_running_stats=True, **kw),
        [(2, 3, 7), (3, 5)],
    ),
    (
        nn.InstanceNorm2dSpec(4, momentum=0.2, affine=True, track_running_stats=True),
        lambda **kw: torch.nn.InstanceNorm2d(
            4, momentum=0.2, affine=True, track_running_stats=True, **kw
        ),
        [(2, 4, 3, 5), (4, 3, 3)],
    ),
    (
        nn.InstanceNorm3dSpec(2, affine=True),
        lambda **kw: torch.nn.InstanceNorm3d(2, affine=True, **kw),
        [(2, 2, 3, 2, 2), (2, 2, 3, 3)],
    ),
    (nn.LayerNormSpec(5), lambda **kw: torch.nn.LayerNorm(5, **kw), [(5,), (3, 5), (2, 3, 5)]),
    (
        nn.LayerNormSpec([3, 4], eps=1e-3, bias=False),
        lambda **kw: torch.nn.LayerNorm([3, 4], eps=1e-3, bias=False, **kw),
        [(2, 3, 4)],
    ),
    (
        nn.LayerNormSpec((4,), elementwise_affine=False),
        lambda **kw: torch.nn.LayerNorm((4,), elementwise_affine=False, **kw),
        [(3, 4)],
    ),
    (nn.GroupNormSpec(2, 6), lambda **kw: torch.nn.GroupNorm(2, 6, **kw), [(3, 6), (2, 6, 5)]),
    (
        nn.GroupNormSpec(3, 3, eps=1e-4, affine=False),
        lambda **kw: torch.nn.GroupNorm(3, 3, eps=1e-4, affine=False, **kw),
        [(2, 3, 4, 4)],
    ),
    (
        nn.GroupNormSpec(1, 4, bias=False),
        lambda **kw: torch.nn.GroupNorm(1, 4, bias=False, **kw),
        [(2, 4, 3)],
    ),
    (nn.RMSNormSpec(5), lambda **kw: torch.nn.RMSNorm(5, **kw), [(5,), (3, 5)]),
    (
        nn.RMSNormSpec([2, 3], eps=1e-6),
        lambda **kw: torch.nn.RMSNorm([2, 3], eps=1e-6, **kw),
        [(4, 2, 3)],
    ),
    (
        nn.RMSNormSpec(4, elementwise_affine=False),
        lambda **kw: torch.nn.RMSNorm(4, elementwise_affine=False, **kw),
        [(2, 4)],
    ),
]
IDS = [f"{type(spec).__name__}-{i}" for i, (spec, _, _) in enumerate(CASES)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("spec", "make", "shapes"), CASES, ids=IDS)
def test_init_equals_torch(spec: Any, make: Any, shapes: Any, dtype: torch.dtype) -> None:
    ours = dp.sample(spec, generator=gen(), dtype=dtype)
    module = make(dtype=dtype)
    theirs = dict(module.named_parameters())
    assert [n for n, _ in dp.named_parameters(ours)] == list(theirs)
    for name, p in dp.named_parameters(ours):
        assert isinstance(p, torch.nn.Parameter)
        assert p.dtype == dtype
        assert torch.equal(p, theirs[name])
    buffers = dict(module.named_buffers())
    for name in BUFFERS:
        value = getattr(ours, name, None)
        if name not in buffers:
            assert value is None
            continue
        assert value is not None
        assert not isinstance(value, torch.nn.Parameter)
        assert value.dtype == buffers[name].dtype
        assert torch.equal(value, buffers[name])
    assert set(state_of(ours)) == set(module.state_dict())


def _parity(spec: Any, make: Any, shape: tuple[int, ...], dtype: torch.dtype, train: bool) -> None:
    layer = randomised(dp.sample(spec, dtype=dtype))
    module = torch_twin(layer, make(dtype=dtype)).train(train)
    x = torch.randn(shape, dtype=dtype, generator=gen(2))
    x_ours = x.clone().requires_grad_()
    x_theirs = x.clone().requires_grad_()
    weights = torch.randn(shape, dtype=dtype, generator=gen(3))

    def loss_fn(m: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = m(x)
        return y, (y * weights).sum()

    if train:
        (y, loss), updated = nn.training(loss_fn, layer, x_ours)
    else:
        with nn.evaluating():  # torch's eval(), chosen explicitly: no ModeWarning
            (y, loss), updated = loss_fn(layer, x_ours), layer
    y_ref = module(x_theirs)
    (y_ref * weights).sum().backward()
    assert_close(y, y_ref)
    found = grads_of(layer, loss, x_ours)
    expected = torch_grads_of(module, x_theirs)
    assert found.keys() == expected.keys()
    for name in expected:
        assert_close(found[name], expected[name], msg=name)
    # Running statistics after the pass equal torch's buffers (eval and
    # InstanceNorm's eval leave them alone; compare where torch updates them).
    if train:
        for name, buffer in module.named_buffers():
            assert_close(getattr(updated, name), buffer, msg=name)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("spec", "make", "shapes"), CASES, ids=IDS)
def test_forward_and_gradients_equal_torch(
    spec: Any, make: Any, shapes: Any, dtype: torch.dtype, train: bool
) -> None:
    for shape in shapes:
        _parity(spec, make, shape, dtype, train)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    normalized=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
)
def test_layer_and_rms_norm_any_shape(batch: list[int], normalized: list[int], eps: float) -> None:
    shape = (*batch, *normalized)
    for spec, module in [
        (nn.LayerNormSpec(normalized, eps=eps), torch.nn.LayerNorm(normalized, eps=eps)),
        (nn.RMSNormSpec(normalized, eps=eps), torch.nn.RMSNorm(normalized, eps=eps)),
    ]:
        layer = randomised(dp.sample(spec, dtype=torch.float64))
        torch_twin(layer, module.double())
        x = torch.randn(shape, dtype=torch.float64, generator=gen(4))
        assert_close(layer(x), module(x))


# -- running statistics: several steps, like torch in train mode -------------------------------


BN_STEP_CASES = [
    (nn.BatchNorm1dSpec(3), torch.nn.BatchNorm1d(3), (6, 3)),
    (nn.BatchNorm1dSpec(3, momentum=None), torch.nn.BatchNorm1d(3, momentum=None), (6, 3, 2)),
    (nn.BatchNorm2dSpec(2, momentum=0.5), torch.nn.BatchNorm2d(2, momentum=0.5), (3, 2, 2, 2)),
    (
        nn.InstanceNorm1dSpec(3, track_running_stats=True),
        torch.nn.InstanceNorm1d(3, track_running_stats=True),
        (4, 3, 5),
    ),
    (
        nn.InstanceNorm2dSpec(2, momentum=None, track_running_stats=True),
        torch.nn.InstanceNorm2d(2, momentum=None, track_running_stats=True),  # type: ignore[arg-type]
        (3, 2, 3, 3),
    ),
]


@pytest.mark.parametrize(("spec", "module", "shape"), BN_STEP_CASES)
def test_running_statistics_follow_torch_over_steps(
    spec: Any, module: torch.nn.Module, shape: tuple[int, ...]
) -> None:
    layer = dp.sample(spec)
    original = state_of(layer)
    module.train()
    g = gen(5)
    for _ in range(4):
        x = torch.randn(shape, generator=g) * 3 + 1
        y, new = nn.training(lambda m, x: m(x), layer, x)
        assert_close(y, module(x))
        # The layer given is never changed; the new one carries torch's buffers.
        for name, value in state_of(layer).items():
            assert torch.equal(value, original[name] if layer is not new else value)
        for name, buffer in module.named_buffers():
            assert_close(getattr(new, name), buffer, msg=name, rtol=1e-6, atol=1e-6)
        layer, original = new, state_of(new)
    module.eval()
    x = torch.randn(shape, generator=g)
    with nn.evaluating():
        assert_close(layer(x), module(x))


def test_forward_never_changes_the_layer() -> None:
    bn = randomised(dp.sample(nn.BatchNorm2dSpec(3)))
    before = state_of(bn)
    x = torch.randn(4, 3, 2, 2)
    with nn.evaluating():
        bn(x)
    _, new = nn.training(lambda m: m(x), bn)
    for name, value in state_of(bn).items():
        assert torch.equal(value, before[name])
    assert new is not bn
    assert new.num_batches_tracked.item() == before["num_batches_tracked"].item() + 1
    # The new layer shares its Parameters with the old one: gradients reach the same leaves.
    assert new.weight is bn.weight
    assert new.bias is bn.bias
    # Running statistics are plain constants, not part of any autograd graph.
    assert not new.running_mean.requires_grad
    assert new.running_mean.grad_fn is None


def test_eval_without_running_stats_uses_batch_statistics() -> None:
    layer = dp.sample(nn.BatchNorm1dSpec(3, track_running_stats=False))
    x = torch.randn(8, 3) * 4 + 2
    y = layer(x)
    assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    _, same = nn.training(lambda m: m(x), layer)
    assert same is layer  # nothing to update


def test_layer_used_twice_updates_twice_like_torch() -> None:
    layer = dp.sample(nn.BatchNorm1dSpec(4, momentum=None))
    module = torch.nn.BatchNorm1d(4, momentum=None).train()
    lin = dp.sample(nn.LinearSpec(4, 4), generator=gen(1))
    torch_lin = torch.nn.Linear(4, 4)
    torch_lin.load_state_dict(state_of(lin))

    class Twice(dp.Parameterized):
        norm: nn.BatchNorm1d
        lin: nn.Linear

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.lin(self.norm(x)))

    model = Twice(layer, lin)
    x = torch.randn(5, 4, generator=gen(2))
    y, new = nn.training(lambda m, x: m(x), model, x)
    assert_close(y, module(torch_lin(module(x))))
    assert new.norm.num_batches_tracked.item() == 2
    assert_close(new.norm.running_mean, module.running_mean)
    assert_close(new.norm.running_var, module.running_var)
    assert new.lin is lin


def test_errors_name_the_problem() -> None:
    bn = dp.sample(nn.BatchNorm2dSpec(3))
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="got an input with 5 channels"):
        bn(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.training(lambda m: m(torch.randn(1, 3, 1, 1)), bn)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        dp.sample(nn.GroupNormSpec(4, 6))
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        dataclasses.replace(bn, running_var=None)
    norm = dp.sample(nn.InstanceNorm1dSpec(3, affine=True))
    with pytest.raises(ValueError, match="channels at dimension 1"):
        norm(torch.randn(2, 4, 5))
    with pytest.warns(UserWarning, match="num_features is unused"):
        dp.sample(nn.InstanceNorm1dSpec(3))(torch.randn(2, 4, 5))


def test_properties_and_repr() -> None:
    bn = dp.sample(nn.BatchNorm1dSpec(2))
    assert bn.affine
    assert bn.track_running_stats
    plain = dp.sample(nn.InstanceNorm2dSpec(2))
    assert not plain.affine
    assert not plain.track_running_stats
    assert "running_mean=const f32[2]" in repr(bn)
    assert not dp.sample(nn.GroupNormSpec(1, 2, affine=False)).affine


# -- the stateful pattern through models, containers and run_step ------------------------------


class Net(dp.Parameterized):
    """A user's own model: its __call__ just calls its layers."""

    fc1: nn.Linear
    bn: nn.BatchNorm1d
    fc2: nn.Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 5)
        self.bn = torch.nn.BatchNorm1d(5)
        self.fc2 = torch.nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def make_net(seed: int = 0) -> Net:
    g = gen(seed)
    return Net(
        dp.sample(nn.LinearSpec(3, 5), generator=g),
        randomised(dp.sample(nn.BatchNorm1dSpec(5)), seed),
        dp.sample(nn.LinearSpec(5, 1), generator=g),
    )


def net_state(model: Net) -> dict[str, torch.Tensor]:
    state = {n: p.detach() for n, p in dp.named_parameters(model)}
    for name in BUFFERS:
        state[f"bn.{name}"] = getattr(model.bn, name)
    return state


def test_training_with_run_step_equals_torch_sgd() -> None:
    model = make_net()
    reference = TorchNet()
    reference.load_state_dict(net_state(model))
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    optimizer = GD()
    g = gen(9)

    def loss_fn(m: Net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (m(x) - y).pow(2).mean()

    for _ in range(3):
        x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
        loss, updated = nn.training(loss_fn, model, x, y)
        # The updated model holds the very Parameters the loss was computed with.
        assert [id(p) for p in dp.flatten_parameters(updated)] == [
            id(p) for p in dp.flatten_parameters(model)
        ]
        model, optimizer = run_step(updated, optimizer, loss, 0.1)
        sgd.zero_grad()
        reference.train()
        ref_loss = loss_fn(reference, x, y)  # type: ignore[arg-type]
        ref_loss.backward()
        sgd.step()
        assert_close(loss, ref_loss)
    for name, value in reference.state_dict().items():
        assert_close(net_state(model)[name], value, msg=name)
    reference.eval()
    x = torch.randn(4, 3, generator=g)
    with nn.evaluating():
        assert_close(model(x), reference(x))


def test_containers_of_layers_are_updated() -> None:
    bns = [randomised(dp.sample(nn.BatchNorm1dSpec(2)), seed) for seed in range(4)]
    model = {"a": [bns[0], (bns[1], nn.Dropout(0.0))], "b": {"c": bns[2]}, "d": (bns[3],)}

    def fn(m: Any, x: torch.Tensor) -> torch.Tensor:
        _, (b, drop) = m["a"]
        return m["a"][0](x) + drop(b(x)) + m["b"]["c"](x) + m["d"][0](x)

    x = torch.randn(6, 2)
    _, new = nn.training(fn, model, x)
    layers = [new["a"][0], new["a"][1][0], new["b"]["c"], new["d"][0]]
    assert isinstance(new["a"][1], tuple)
    assert isinstance(new["d"], tuple)
    assert new["a"][1][1] is model["a"][1][1]
    for old, layer in zip(bns, layers, strict=True):
        assert layer is not old
        assert layer.num_batches_tracked.item() == 4
        expected = 0.9 * old.running_mean + 0.1 * x.mean(0)
        assert_close(layer.running_mean, expected)
    assert model["a"][0] is bns[0]  # the original container is untouched


def test_nested_user_models() -> None:
    class Block(dp.Parameterized):
        lin: nn.Linear
        norm: nn.BatchNorm1d

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.norm(self.lin(x)))

    class Tower(dp.Parameterized):
        blocks: tuple[Block, ...]
        head: nn.Linear

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    g = gen(3)
    blocks = tuple(
        Block(dp.sample(nn.LinearSpec(4, 4), generator=g), dp.sample(nn.BatchNorm1dSpec(4)))
        for _ in range(3)
    )
    tower = Tower(blocks, dp.sample(nn.LinearSpec(4, 2), generator=g))
    reference = torch.nn.Sequential(
        *[
            torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU())
            for _ in range(3)
        ],
        torch.nn.Linear(4, 2),
    )
    state = {}
    for i, block in enumerate(tower.blocks):
        state[f"{i}.0.weight"], state[f"{i}.0.bias"] = block.lin.weight, block.lin.bias
        for name in BUFFERS:
            state[f"{i}.1.{name}"] = getattr(block.norm, name)
        state[f"{i}.1.weight"], state[f"{i}.1.bias"] = block.norm.weight, block.norm.bias
    state["3.weight"], state["3.bias"] = tower.head.weight, tower.head.bias
    reference.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    x = torch.randn(7, 4)
    for _ in range(2):
        y, tower = nn.training(lambda m, x: m(x), tower, x)
        assert_close(y, reference.train()(x))
    for i, block in enumerate(tower.blocks):
        assert_close(block.norm.running_mean, reference[i][1].running_mean)
        assert_close(block.norm.running_var, reference[i][1].running_var)
    with nn.evaluating():
        assert_close(tower(x), reference.eval()(x))


def test_sequential_threads_state() -> None:
    seq = dp.sample(
        nn.SequentialSpec(nn.LinearSpec(3, 4), nn.BatchNorm1dSpec(4), torch.relu),
        generator=gen(0),
    )
    x = torch.randn(5, 3)
    _, new = nn.training(lambda m, x: m(x), seq, x)
    assert type(new) is type(seq)
    norm = next(layer for layer in new if isinstance(layer, nn.BatchNorm1d))
    assert norm.num_batches_tracked.item() == 1


def test_state_works_under_torch_func_grad() -> None:
    model = make_net()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    params = [p.detach() for p in dp.flatten_parameters(model)]

    def loss_of(params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        m = dp.replace_parameters(model, params)
        loss, new = nn.training(lambda m: (m(x) - y).pow(2).mean(), m)
        return loss, new.bn.running_mean

    grads, running_mean = torch.func.grad(loss_of, has_aux=True)(params)
    loss, new = nn.training(lambda m: (m(x) - y).pow(2).mean(), model)
    for found, expected in zip(grads, dp.grad(loss, dp.flatten_parameters(model)), strict=True):
        assert_close(found, expected)
    assert_close(running_mean, new.bn.running_mean)


def test_eval_mode_works_under_vmap() -> None:
    bn = randomised(dp.sample(nn.BatchNorm1dSpec(3)))
    xs = torch.randn(4, 5, 3)
    with nn.evaluating():
        assert_close(torch.func.vmap(bn)(xs), torch.stack([bn(x) for x in xs]))


def test_training_inside_vmap_gives_per_member_statistics() -> None:
    """vmap a function that runs its own training pass: one set of statistics per member."""
    bn = randomised(dp.sample(nn.BatchNorm1dSpec(3)))
    xs = torch.randn(4, 6, 3)

    def member(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, new = nn.training(lambda m: m(x), bn)
        return y, new.running_mean, new.running_var

    ys, means, variances = torch.func.vmap(member)(xs)
    for x, y, mean, var in zip(xs, ys, means, variances, strict=True):
        y_ref, new = nn.training(lambda m, x: m(x), bn, x)
        assert_close(y, y_ref)
        assert_close(mean, new.running_mean)
        assert_close(var, new.running_var)


@pytest.mark.parametrize(
    ("spec", "make", "shape"),
    [
        (nn.BatchNorm2dSpec(3), lambda: torch.nn.BatchNorm2d(3), (4, 3, 2, 2)),
        (
            nn.InstanceNorm1dSpec(3, affine=True, track_running_stats=True),
            lambda: torch.nn.InstanceNorm1d(3, affine=True, track_running_stats=True),
            (4, 3, 5),
        ),
    ],
)
def test_training_switch_overrides_the_mode(spec: Any, make: Any, shape: Any) -> None:
    layer = randomised(dp.sample(spec))
    x = torch.randn(shape)
    # training=False inside a pass: evaluation, and no update (a frozen norm layer).
    y, same = nn.training(lambda m: m(x, training=False), layer)
    assert_close(y, torch_twin(layer, make()).eval()(x))
    assert same is layer
    # training=True outside a pass: batch statistics; the layer is unchanged.
    before = state_of(layer)
    assert_close(layer(x, training=True), torch_twin(layer, make()).train()(x))
    for name, value in state_of(layer).items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize(
    ("spec", "module"),
    [
        (nn.BatchNorm1dSpec, torch.nn.BatchNorm1d),
        (nn.BatchNorm2dSpec, torch.nn.BatchNorm2d),
        (nn.BatchNorm3dSpec, torch.nn.BatchNorm3d),
        (nn.InstanceNorm1dSpec, torch.nn.InstanceNorm1d),
        (nn.InstanceNorm2dSpec, torch.nn.InstanceNorm2d),
        (nn.InstanceNorm3dSpec, torch.nn.InstanceNorm3d),
        (nn.LayerNormSpec, torch.nn.LayerNorm),
        (nn.GroupNormSpec, torch.nn.GroupNorm),
        (nn.RMSNormSpec, torch.nn.RMSNorm),
    ],
)
def test_spec_fields_are_torch_arguments(spec: Any, module: Any) -> None:
    ours = {
        f.name: (None if f.default is dataclasses.MISSING else f.default, f.kw_only)
        for f in dataclasses.fields(spec)
    }
    theirs = {
        name: (
            None if p.default is inspect.Parameter.empty else p.default,
            p.kind is inspect.Parameter.KEYWORD_ONLY,
        )
        for name, p in inspect.signature(module.__init__).parameters.items()
        if name not in ("self", "device", "dtype")
    }
    assert ours == theirs
