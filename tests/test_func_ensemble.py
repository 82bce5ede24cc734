"""diffprog.func: stacked ensembles (stack, unstack, sample_stack, vmap, training) and
per-example gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
from diffprog.func import per_example_grads, sample_stack, stack, unstack
from diffprog.nn import BatchNorm1dSpec, Linear, LinearSpec, MLPSpec
from diffprog.optim import SGD, Adam, run_step

SPEC = MLPSpec([2, 8, 1], activation=torch.tanh)


def _members(k: int = 3) -> list[Any]:
    return [dp.sample(SPEC, generator=torch.Generator().manual_seed(i)) for i in range(k)]


def _mse(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


class TiedPair(dp.Parameterized):
    first: Linear
    second: Linear  # shares its weight with first
    scale: torch.Tensor  # a buffer
    frozen: dp.Frozen

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x))) * self.scale + self.frozen


def _tied(seed: int) -> TiedPair:
    g = torch.Generator().manual_seed(seed)
    w = dp.make_independent(torch.randn(2, 2, generator=g))
    a = Linear(w, dp.make_independent(torch.randn(2, generator=g)))
    b = Linear(w, dp.make_independent(torch.randn(2, generator=g)))
    return TiedPair(a, b, torch.rand((), generator=g), dp.Frozen(torch.randn(2, generator=g)))


def test_stack_stacks_every_tensor_keeping_kinds_and_ties() -> None:
    members = [_tied(i) for i in range(3)]
    ensemble = stack(members)
    assert type(ensemble.first.weight) is torch.nn.Parameter
    assert ensemble.first.weight is ensemble.second.weight  # still tied
    assert type(ensemble.frozen) is dp.Frozen and type(ensemble.scale) is torch.Tensor
    assert ensemble.first.weight.is_leaf and ensemble.first.weight.requires_grad
    for i, member in enumerate(members):
        for got, want in zip(dp.tensors(ensemble), dp.tensors(member), strict=True):
            assert torch.equal(got[i], want)
    assert len(dp.flatten_parameters(ensemble)) == len(dp.flatten_parameters(members[0]))


def test_unstack_inverts_stack() -> None:
    members = [_tied(i) for i in range(3)]
    back = unstack(stack(members))
    assert len(back) == 3
    for got, want in zip(back, members, strict=True):
        assert type(got) is TiedPair
        assert got.first.weight is got.second.weight
        assert type(got.frozen) is dp.Frozen
        assert dp.tree_equal(got, want)


def test_stack_refuses_models_of_different_structure_naming_the_path() -> None:
    a = dp.sample(SPEC)
    tanh_vs_relu = dp.sample(MLPSpec([2, 8, 1], activation=torch.relu))
    with pytest.raises(ValueError, match=r"model 1 differs from model 0 at model\.layers\[1\]"):
        stack([a, tanh_vs_relu])
    wider = dp.sample(MLPSpec([2, 9, 1], activation=torch.tanh))
    with pytest.raises(ValueError, match=r"'0\.weight' do not stack: .*\(8, 2\).*\(9, 2\)"):
        stack([a, wider])
    with pytest.raises(ValueError, match=r"'0\.weight' do not stack: .*float32.*float64"):
        stack([a, dp.to(a, torch.float64)])  # torch.stack would promote silently
    with pytest.raises(ValueError, match="different children"):
        stack([{"a": a}, {"b": a}])
    untied = _tied(0)
    untied = TiedPair(
        untied.first,
        Linear(dp.make_independent(untied.second.weight.detach().clone()), untied.second.bias),
        untied.scale,
        untied.frozen,
    )
    with pytest.raises(ValueError, match=r"at model\.second\.weight: a tensor tied"):
        stack([_tied(0), untied])
    with pytest.raises(ValueError, match="at least one"):
        stack([])


def test_unstack_refuses_tensors_of_different_leading_size() -> None:
    model = {"w": dp.make_independent(torch.zeros(3, 2)), "b": dp.make_independent(torch.zeros(2))}
    with pytest.raises(ValueError, match="'b' has leading size 2"):
        unstack(model)


def test_sample_stack_equals_sampling_each() -> None:
    ensemble = sample_stack(SPEC, [0, 1, torch.Generator().manual_seed(2)])
    for got, want in zip(unstack(ensemble), _members(3), strict=True):
        assert dp.tree_equal(got, want)
    bn = sample_stack(BatchNorm1dSpec(4), [5, 6], dtype=torch.float64)
    assert bn.running_mean.shape == (2, 4) and bn.weight.dtype == torch.float64
    assert bn.num_batches_tracked.shape == (2,)
    with pytest.raises(ValueError, match="at least one"):
        sample_stack(SPEC, [])


def test_vmap_of_a_forward_over_a_stacked_model_and_a_batch() -> None:
    members = _members(4)
    x = torch.randn(16, 2)
    ensemble = stack(members)
    out = torch.func.vmap(lambda m, x: m(x), in_dims=(0, None))(ensemble, x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))
    # one batch per member
    xs = torch.randn(4, 16, 2)
    out = torch.func.vmap(lambda m, x: m(x))(ensemble, xs)
    torch.testing.assert_close(out, torch.stack([m(x) for m, x in zip(members, xs, strict=True)]))


@pytest.mark.parametrize(
    "make_opt",
    [lambda m: Adam.init(m), lambda m: SGD.init(m, momentum=0.9, weight_decay=0.01)],
    ids=["adam", "sgd"],
)
def test_training_an_ensemble_in_one_step_equals_training_each(make_opt: Any) -> None:
    members = _members(3)
    x, y = torch.randn(3, 16, 2), torch.randn(3, 16, 1)
    ensemble = stack(members)
    opt = make_opt(ensemble)
    for _ in range(5):
        # the loss is the sum of the members' losses: each member's gradient is its own
        loss = torch.func.vmap(_mse)(ensemble, x, y).sum()
        ensemble, opt = run_step(ensemble, opt, loss, 0.05)
    for i, member in enumerate(members):
        alone, alone_opt = member, make_opt(member)
        for _ in range(5):
            alone, alone_opt = run_step(alone, alone_opt, _mse(alone, x[i], y[i]), 0.05)
        assert dp.allclose(unstack(ensemble)[i], alone, rtol=1e-5, atol=1e-6)


def _loop_grads(loss_fn: Any, model: Any, *batch: torch.Tensor) -> list[list[torch.Tensor]]:
    """The reference: one backward pass per example."""
    params = dp.flatten_parameters(model)
    return [
        list(torch.autograd.grad(loss_fn(model, *(t[i : i + 1] for t in batch)), params))
        for i in range(batch[0].shape[0])
    ]


def test_per_example_grads_equal_a_loop_over_examples() -> None:
    model = _tied(3)
    x, y = torch.randn(6, 2), torch.randn(6, 2)
    grads, losses = per_example_grads(_mse, model, x, y)
    assert type(grads) is TiedPair
    assert grads.scale is None and grads.frozen is None  # constants get no gradient
    assert grads.first.weight is grads.second.weight  # a tie: one gradient, both uses
    leaves = pytree.tree_leaves(grads)
    assert len(leaves) == len(dp.flatten_parameters(model))
    for i, want in enumerate(_loop_grads(_mse, model, x, y)):
        for got, w in zip(leaves, want, strict=True):
            torch.testing.assert_close(got[i], w)
        torch.testing.assert_close(losses[i], _mse(model, x[i : i + 1], y[i : i + 1]))


def test_per_example_grads_with_integer_buffers_and_one_input() -> None:
    model = dp.sample(BatchNorm1dSpec(3))

    def loss_fn(m: Any, x: torch.Tensor) -> torch.Tensor:
        return m(x, training=False).pow(3).sum()

    x = torch.randn(4, 3)
    grads, _ = per_example_grads(loss_fn, model, x)
    assert grads.running_mean is None and grads.num_batches_tracked is None
    for i, want in enumerate(_loop_grads(loss_fn, model, x)):
        torch.testing.assert_close(grads.weight[i], want[0])
        torch.testing.assert_close(grads.bias[i], want[1])


def test_per_example_grads_refuses_bad_batches() -> None:
    layer = dp.sample(LinearSpec(2, 1))
    with pytest.raises(ValueError, match="at least one batch"):
        per_example_grads(_mse, layer)
    with pytest.raises(ValueError, match="one size"):
        per_example_grads(_mse, layer, torch.randn(3, 2), torch.randn(4, 1))


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    members=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_stack_then_unstack_gives_each_member_back_and_vmap_agrees(
    sizes: list[int], members: int, seed: int
) -> None:
    spec = MLPSpec(sizes, activation=torch.tanh)
    seeds = [seed + i for i in range(members)]
    originals = [dp.sample(spec, generator=torch.Generator().manual_seed(s)) for s in seeds]
    ensemble = sample_stack(spec, seeds)
    x = torch.randn(3, sizes[0])
    out = torch.func.vmap(lambda m, x: m(x), in_dims=(0, None))(ensemble, x)
    for i, (got, want) in enumerate(zip(unstack(ensemble), originals, strict=True)):
        assert dp.tree_equal(got, want)
        torch.testing.assert_close(out[i], want(x))
    leaves, spec_tree = pytree.tree_flatten(ensemble)
    assert dp.tree_equal(pytree.tree_unflatten(leaves, spec_tree), ensemble)


def test_stack_refuses_members_whose_tensors_differ_in_kind() -> None:
    # Review: the stacked tensor took model 0's kind, so a frozen member became trainable in
    # the ensemble (or a trainable one frozen) without a word.
    from diffprog.nn import LinearSpec

    trainable = dp.sample(LinearSpec(3, 2), generator=torch.Generator().manual_seed(0))
    frozen = dp.freeze(dp.sample(LinearSpec(3, 2), generator=torch.Generator().manual_seed(1)))
    for members in ([trainable, frozen], [frozen, trainable]):
        with pytest.raises(ValueError, match="different kinds"):
            stack(members)
    assert type(stack([frozen, frozen]).weight) is dp.Frozen
