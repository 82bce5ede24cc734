"""Composition: Sequential, MLPSpec, Residual, FanOut, Parallel, against torch.nn itself."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import diffprog as dp
from diffprog import nn
from diffprog.nn import (
    FanOut,
    FanOutSpec,
    LinearSpec,
    MLPSpec,
    Parallel,
    ParallelSpec,
    Residual,
    ResidualSpec,
    Sequential,
    SequentialSpec,
)
from diffprog.optim import GD, run_step

DTYPES = [torch.float32, torch.float64]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def load_into(module: torch.nn.Module, model: Any) -> None:
    """Copy our parameters into a torch.nn module by state_dict key (strict)."""
    state = {name: p.detach().clone() for name, p in dp.named_parameters(model)}
    module.load_state_dict(state, strict=True)


def param_grads(model: Any, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n, _ in dp.named_parameters(model)]
    return dict(zip(names, dp.grad(loss, dp.flatten_parameters(model)), strict=True))


def torch_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


class TorchResidual(torch.nn.Module):
    def __init__(self, block: torch.nn.Module, shortcut: torch.nn.Module | None = None):
        super().__init__()
        self.block = block
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + (x if self.shortcut is None else self.shortcut(x))


class TorchFanOut(torch.nn.ModuleList):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m in self)


class TorchParallel(torch.nn.ModuleList):
    def forward(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m, x in zip(self, xs, strict=True))


class Concat(torch.nn.Module):
    def forward(self, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat(xs, -1)


def cat(xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat(xs, -1)


# --- Sequential and its spec ---------------------------------------------------------------


def test_sequential_spec_matches_torch_init_and_keys() -> None:
    spec = SequentialSpec(LinearSpec(3, 5), torch.relu, LinearSpec(5, 2))
    ours = dp.sample(spec, generator=gen(11))
    torch.manual_seed(11)
    ref = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    assert [n for n, _ in dp.named_parameters(ours)] == list(ref.state_dict())
    for (_, p), q in zip(dp.named_parameters(ours), ref.state_dict().values(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_sequential_forward_and_grads_match_torch(
    dtype: torch.dtype, batch: tuple[int, ...]
) -> None:
    ours = dp.sample(
        SequentialSpec(
            LinearSpec(3, 6), torch.tanh, LinearSpec(6, 6), torch.relu, LinearSpec(6, 2)
        ),
        generator=gen(1),
        dtype=dtype,
    )
    ref = torch.nn.Sequential(
        torch.nn.Linear(3, 6),
        torch.nn.Tanh(),
        torch.nn.Linear(6, 6),
        torch.nn.ReLU(),
        torch.nn.Linear(6, 2),
    ).to(dtype)
    load_into(ref, ours)
    x = torch.randn(*batch, 3, dtype=dtype, generator=gen(2), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = ours(x), ref(x_ref)
    assert_close(out, out_ref)
    loss, loss_ref = out.pow(2).sum(), out_ref.pow(2).sum()
    grads = param_grads(ours, loss)
    loss_ref.backward()
    assert_close(grads, torch_grads(ref))
    (gx,) = torch.autograd.grad(ours(x).pow(2).sum(), x)
    assert_close(gx, x_ref.grad)


def test_sequential_holds_modules_functions_and_lambdas() -> None:
    seq = Sequential(torch.nn.ReLU(), lambda t: t * 2, torch.neg)
    assert torch.equal(seq(torch.tensor([-1.0, 1.0])), torch.tensor([0.0, -2.0]))
    assert dp.flatten_parameters(seq) == []


def test_sequential_indexing_slicing_len_iter() -> None:
    a, b = dp.sample(LinearSpec(2, 2), generator=gen()), dp.sample(LinearSpec(2, 2))
    seq = Sequential(a, torch.relu, b)
    assert len(seq) == 3
    assert list(seq) == [a, torch.relu, b]
    assert seq[0] is a and seq[-1] is b
    tail = seq[1:]
    assert isinstance(tail, Sequential)
    assert tail.layers == (torch.relu, b)
    assert [n for n, _ in dp.named_parameters(tail)] == ["1.weight", "1.bias"]
    assert len(Sequential()) == 0
    x = torch.randn(2)
    assert torch.equal(Sequential()(x), x)


def test_sequential_returns_tuples_as_they_are() -> None:
    seq = Sequential(FanOut(torch.sin, torch.cos), Parallel(torch.neg, torch.neg))
    s, c = seq(torch.zeros(1))
    assert torch.equal(s, torch.zeros(1)) and torch.equal(c, -torch.ones(1))


def test_sequential_rejects_specs_and_non_callables() -> None:
    with pytest.raises(TypeError, match="SequentialSpec"):
        Sequential(LinearSpec(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="part 1 is of type int"):
        Sequential(torch.relu, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="part 0 is of type str"):
        SequentialSpec("relu")
    with pytest.raises(TypeError, match="ResidualSpec"):
        Residual(LinearSpec(2, 2))
    with pytest.raises(TypeError, match="FanOutSpec"):
        FanOut(LinearSpec(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ParallelSpec"):
        Parallel(torch.relu, LinearSpec(2, 2))  # type: ignore[arg-type]


def test_sequential_is_immutable() -> None:
    seq = Sequential(torch.relu)
    with pytest.raises(AttributeError):
        seq.layers = ()  # type: ignore[misc]


# --- MLPSpec ---------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    seed=st.integers(0, 2**16),
    bias=st.booleans(),
)
def test_mlp_spec_matches_torch_sequential(sizes: list[int], seed: int, bias: bool) -> None:
    ours = dp.sample(MLPSpec(sizes, activation=torch.tanh, bias=bias), generator=gen(seed))
    torch.manual_seed(seed)
    modules: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        modules.append(torch.nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            modules.append(torch.nn.Tanh())
    ref = torch.nn.Sequential(*modules)
    assert [n for n, _ in dp.named_parameters(ours)] == list(ref.state_dict())
    for (_, p), q in zip(dp.named_parameters(ours), ref.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    x = torch.randn(3, sizes[0], generator=gen(seed + 1))
    assert_close(ours(x), ref(x))


def test_mlp_spec_final_activation_dropout_and_dtype() -> None:
    spec = MLPSpec((2, 4, 4, 1), final_activation=torch.sigmoid, dropout=0.25)
    mlp = dp.sample(spec, generator=gen(3), dtype=torch.float64)
    ref = torch.nn.Sequential(
        torch.nn.Linear(2, 4),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.25),
        torch.nn.Linear(4, 4),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.25),
        torch.nn.Linear(4, 1),
        torch.nn.Sigmoid(),
    ).double()
    load_into(ref, mlp)
    ref.eval()
    x = torch.randn(5, 2, dtype=torch.float64, generator=gen(4))
    with nn.evaluating():
        assert_close(mlp(x), ref(x))
    assert all(p.dtype == torch.float64 for p in dp.flatten_parameters(mlp))
    assert isinstance(mlp[2], nn.Dropout) and mlp[2].p == 0.25
    assert mlp[-1] is torch.sigmoid
    # in training mode the dropout layers drop, with the pass's generator
    out, _ = nn.training(
        lambda m, x: m[:3](x), mlp, torch.ones(200, 2, dtype=torch.float64), generator=gen(5)
    )
    assert (out == 0).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": (3,)}, "at least two sizes"),
        ({"sizes": (3, 0)}, "positive integers"),
        ({"sizes": (3, 1), "dropout": 1.5}, "between 0 and 1"),
    ],
)
def test_mlp_spec_validates(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MLPSpec(**kwargs)


# --- Residual, FanOut, Parallel ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_matches_torch(dtype: torch.dtype) -> None:
    spec = ResidualSpec(
        SequentialSpec(LinearSpec(4, 3), torch.relu, LinearSpec(3, 2)),
        shortcut=LinearSpec(4, 2, bias=False),
    )
    ours = dp.sample(spec, generator=gen(7), dtype=dtype)
    torch.manual_seed(7)
    ref = TorchResidual(
        torch.nn.Sequential(
            torch.nn.Linear(4, 3, dtype=dtype), torch.nn.ReLU(), torch.nn.Linear(3, 2, dtype=dtype)
        ),
        torch.nn.Linear(4, 2, bias=False, dtype=dtype),
    )
    assert [n for n, _ in dp.named_parameters(ours)] == list(ref.state_dict())
    for (_, p), q in zip(dp.named_parameters(ours), ref.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    x = torch.randn(5, 4, dtype=dtype, generator=gen(8))
    out, out_ref = ours(x), ref(x)
    assert_close(out, out_ref)
    grads = param_grads(ours, out.square().mean())
    out_ref.square().mean().backward()
    assert_close(grads, torch_grads(ref))


def test_residual_identity_shortcut() -> None:
    res = dp.sample(ResidualSpec(LinearSpec(3, 3)), generator=gen())
    assert res.shortcut is None
    assert [n for n, _ in dp.named_parameters(res)] == ["block.weight", "block.bias"]
    x = torch.randn(2, 3)
    assert_close(res(x), res.block(x) + x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fan_out_and_parallel_match_torch(dtype: torch.dtype) -> None:
    # (x -> (f x, g x)) >>> (h *** k) >>> concat >>> head
    spec = SequentialSpec(
        FanOutSpec(LinearSpec(3, 4), LinearSpec(3, 2)),
        ParallelSpec(LinearSpec(4, 2), torch.tanh),
        cat,
        LinearSpec(4, 1),
    )
    ours = dp.sample(spec, generator=gen(9), dtype=dtype)
    torch.manual_seed(9)
    ref = torch.nn.Sequential(
        TorchFanOut([torch.nn.Linear(3, 4, dtype=dtype), torch.nn.Linear(3, 2, dtype=dtype)]),
        TorchParallel([torch.nn.Linear(4, 2, dtype=dtype), torch.nn.Tanh()]),
        Concat(),
        torch.nn.Linear(4, 1, dtype=dtype),
    )
    assert [n for n, _ in dp.named_parameters(ours)] == list(ref.state_dict())
    for (_, p), q in zip(dp.named_parameters(ours), ref.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    x = torch.randn(6, 3, dtype=dtype, generator=gen(10), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = ours(x), ref(x_ref)
    assert_close(out, out_ref)
    grads = param_grads(ours, out.sum())
    out_ref.sum().backward()
    assert_close(grads, torch_grads(ref))
    (gx,) = torch.autograd.grad(ours(x).sum(), x)
    assert_close(gx, x_ref.grad)


def test_parallel_checks_its_input() -> None:
    par = Parallel(torch.neg, torch.neg)
    with pytest.raises(ValueError, match="2 branches but got 3 inputs"):
        par((torch.ones(1),) * 3)
    with pytest.raises(TypeError, match="one tuple"):
        par(torch.ones(2))  # type: ignore[arg-type]
    assert len(par) == 2 and len(FanOut(torch.neg)) == 1
    for cls in (FanOut, Parallel, FanOutSpec, ParallelSpec):
        with pytest.raises(ValueError, match="at least one branch"):
            cls()


# --- flatten / replace / ties ----------------------------------------------------------------


def nested_model() -> Any:
    spec = SequentialSpec(
        LinearSpec(3, 4),
        ResidualSpec(MLPSpec((4, 5, 4))),
        FanOutSpec(LinearSpec(4, 2), SequentialSpec(torch.relu, LinearSpec(4, 2))),
        ParallelSpec(torch.tanh, LinearSpec(2, 2)),
        cat,
    )
    return dp.sample(spec, generator=gen(12))


def test_named_parameters_through_nested_combinators() -> None:
    names = [n for n, _ in dp.named_parameters(nested_model())]
    assert names == [
        "0.weight",
        "0.bias",
        "1.block.0.weight",
        "1.block.0.bias",
        "1.block.2.weight",
        "1.block.2.bias",
        "2.0.weight",
        "2.0.bias",
        "2.1.1.weight",
        "2.1.1.bias",
        "3.1.weight",
        "3.1.bias",
    ]


def test_flatten_replace_round_trip_through_combinators() -> None:
    model = nested_model()
    params = dp.flatten_parameters(model)
    new = [dp.make_independent(torch.full_like(p, float(i))) for i, p in enumerate(params)]
    rebuilt = dp.replace_parameters(model, new)
    assert type(rebuilt) is Sequential and type(rebuilt[1]) is Residual
    assert all(a is b for a, b in zip(dp.flatten_parameters(rebuilt), new, strict=True))
    assert rebuilt[4] is cat and rebuilt[3][0] is torch.tanh  # functions are kept
    # the original is unchanged
    assert all(a is b for a, b in zip(dp.flatten_parameters(model), params, strict=True))
    with pytest.raises(dp.ParameterCountError):
        dp.replace_parameters(model, new[:-1])


def test_tied_layer_in_sequential() -> None:
    lin = dp.sample(LinearSpec(3, 3), generator=gen(13))
    seq = Sequential(lin, torch.tanh, lin)
    ref_lin = torch.nn.Linear(3, 3)
    ref = torch.nn.Sequential(ref_lin, torch.nn.Tanh(), ref_lin)
    with torch.no_grad():
        ref_lin.weight.copy_(lin.weight)
        ref_lin.bias.copy_(lin.bias)  # type: ignore[arg-type]
    assert [n for n, _ in dp.named_parameters(seq)] == [n for n, _ in ref.named_parameters()]
    x = torch.randn(4, 3, generator=gen(14))
    out, out_ref = seq(x), ref(x)
    assert_close(out, out_ref)
    grads = param_grads(seq, out.sum())
    out_ref.sum().backward()
    assert_close(grads, torch_grads(ref))
    new = [dp.make_independent(p * 2) for p in dp.flatten_parameters(seq)]
    rebuilt = dp.replace_parameters(seq, new)
    assert rebuilt[0].weight is rebuilt[2].weight  # still tied
    assert rebuilt[0].bias is rebuilt[2].bias
    assert_close(rebuilt[2].weight, lin.weight * 2)


# --- training -------------------------------------------------------------------------------


def test_run_step_matches_torch_sgd() -> None:
    mlp = dp.sample(MLPSpec((2, 8, 1), activation=torch.tanh), generator=gen(15))
    ref = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    load_into(ref, mlp)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    state = (mlp, GD())
    for _ in range(5):
        model, optimizer = state
        state = run_step(model, optimizer, torch.nn.functional.mse_loss(model(x), y), 0.1)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
    for (name, p), (ref_name, q) in zip(
        dp.named_parameters(state[0]), ref.named_parameters(), strict=True
    ):
        assert name == ref_name
        assert_close(p, q)


class Counter(dp.Parameterized):
    """A minimal stateful layer: counts its training-mode calls (as BatchNorm counts batches)."""

    count: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if nn.is_training():
            now = nn.current(self)
            nn.record(self, Counter(now.count + 1))
        return x


def test_state_updates_thread_through_combinators() -> None:
    def fresh() -> Counter:
        return Counter(torch.zeros((), dtype=torch.long))

    a, b, c, d = fresh(), fresh(), fresh(), fresh()
    lin = dp.sample(LinearSpec(2, 2), generator=gen(16))
    model = Sequential(
        lin, a, Residual(Sequential(b, lin), shortcut=c), FanOut(d, d), Parallel(a, torch.neg)
    )
    out, updated = nn.training(lambda m, x: m(x), model, torch.ones(1, 2))
    assert isinstance(out, tuple)
    assert updated[1].count.item() == 2  # called twice (shared), like torch's BatchNorm
    assert updated[2].block[0].count.item() == 1
    assert updated[2].shortcut.count.item() == 1
    assert updated[3].branches[0].count.item() == 2
    assert updated[3].branches[0] is updated[3].branches[1]
    assert updated[4].branches[0] is updated[1]  # still one layer
    assert updated[0] is lin and updated[2].block[1] is lin  # no state: shared, not copied
    for layer in (a, b, c, d):
        assert layer.count.item() == 0  # the given model is unchanged
    # outside training mode nothing is recorded
    assert model(torch.ones(1, 2))[0].shape == (1, 2)
    assert a.count.item() == 0


def test_batch_norm_inside_sequential_matches_torch_train_and_eval() -> None:
    spec = SequentialSpec(
        LinearSpec(3, 4), nn.BatchNorm1dSpec(4), torch.relu, ResidualSpec(LinearSpec(4, 4))
    )
    model = dp.sample(spec, generator=gen(17))
    ref = torch.nn.Sequential(
        torch.nn.Linear(3, 4),
        torch.nn.BatchNorm1d(4),
        torch.nn.ReLU(),
        TorchResidual(torch.nn.Linear(4, 4)),
    )
    load_into_with_buffers(ref, model)
    optimizer, ref_opt = GD(), torch.optim.SGD(ref.parameters(), lr=0.1)
    ref.train()
    for i in range(3):
        x = torch.randn(8, 3, generator=gen(100 + i))
        loss, model = nn.training(lambda m, x: m(x).square().mean(), model, x)
        model, optimizer = run_step(model, optimizer, loss, 0.1)
        ref_opt.zero_grad()
        ref_loss = ref(x).square().mean()
        ref_loss.backward()
        ref_opt.step()
        assert_close(loss, ref_loss)
    bn, ref_bn = model[1], ref[1]
    assert isinstance(bn, nn.BatchNorm1d)
    assert_close(bn.running_mean, ref_bn.running_mean)
    assert_close(bn.running_var, ref_bn.running_var)
    assert bn.num_batches_tracked.item() == 3
    ref.eval()
    x = torch.randn(5, 3, generator=gen(200))
    with nn.evaluating():
        assert_close(model(x), ref(x))  # eval mode: the running statistics


def load_into_with_buffers(module: torch.nn.Module, model: Any) -> None:
    """Copy parameters and buffers into a torch.nn module by name."""
    state = {name: p.detach().clone() for name, p in dp.named_parameters(model)}
    for name, leaf in dp.walk(model):
        if isinstance(leaf, torch.Tensor) and not isinstance(leaf, torch.nn.Parameter):
            state[name] = leaf.clone()
    module.load_state_dict(state, strict=True)
