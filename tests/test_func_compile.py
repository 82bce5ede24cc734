"""diffprog.func.compile_step: a whole training step under torch.compile.

The step is checked against run_step (the eager step, itself tested against torch.optim),
its compiles are counted with a counting backend, and the donated form is checked to update
the optimizer's state in place. Most tests use the "aot_eager" backend (it functionalizes the
graph as inductor does, without generating code); one uses inductor.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import diffprog as dp
from diffprog import DiffprogError, Parameterized, flatten_parameters
from diffprog.func import compile_step
from diffprog.nn import Linear, LinearSpec
from diffprog.optim import (
    GD,
    SGD,
    Adam,
    AdamW,
    NonFiniteError,
    TorchOptimizer,
    mk_adam,
    run_step,
)


class MLP(Parameterized):
    layers: tuple[Linear, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


class Tied(Parameterized):
    """One Linear used at two paths (a tied weight)."""

    first: Linear
    second: Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def mlp(sizes: tuple[int, ...] = (4, 8, 3), seed: int = 0) -> MLP:
    gen = torch.Generator().manual_seed(seed)
    return MLP(
        tuple(dp.sample(LinearSpec(a, b), generator=gen) for a, b in itertools.pairwise(sizes))
    )


def mse(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def batch(n: int = 6, sizes: tuple[int, ...] = (4, 8, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, sizes[0], generator=gen), torch.randn(n, sizes[-1], generator=gen)


OPTIMIZERS = [
    ("GD", lambda m, donate: GD()),
    ("SGD momentum", lambda m, donate: SGD.init(m, momentum=0.9, donate=donate)),
    ("Adam", lambda m, donate: Adam.init(m, donate=donate)),
    (
        "Adam amsgrad wd",
        lambda m, donate: Adam.init(m, amsgrad=True, weight_decay=0.1, donate=donate),
    ),
    ("Adam beta1 0", lambda m, donate: Adam.init(m, betas=(0.0, 0.99), donate=donate)),
    ("AdamW", lambda m, donate: AdamW.init(m, weight_decay=0.1, donate=donate)),
    ("AdamW maximize", lambda m, donate: AdamW.init(m, maximize=True, donate=donate)),
]


def assert_close_models(a: Any, b: Any) -> None:
    for p, q in zip(flatten_parameters(a), flatten_parameters(b), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize(("name", "make"), OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_compile_step_matches_run_step(name: str, make: Any, donate: bool) -> None:
    model = mlp()
    x, y = batch()
    step = compile_step(mse, 0.05, backend="aot_eager")
    ours, ours_opt = model, make(model, donate)
    ref, ref_opt = model, make(model, donate)
    for _ in range(4):
        ours, ours_opt, loss = step(ours, ours_opt, x, y)
        expected_loss = mse(ref, x, y)
        ref, ref_opt = run_step(ref, ref_opt, expected_loss, 0.05)
        torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-6, atol=1e-7)
    assert_close_models(ours, ref)
    assert type(ours) is MLP and ours_opt.count == ref_opt.count == 4
    for kind in type(ref_opt).declaration().state:
        for s, t in zip(getattr(ours_opt, kind), getattr(ref_opt, kind), strict=True):
            torch.testing.assert_close(s, t, rtol=1e-6, atol=1e-7)
    assert all(isinstance(p, torch.nn.Parameter) for p in flatten_parameters(ours))


INDUCTOR_CASES = [
    ("Adam donated", lambda m: Adam.init(m, donate=True)),
    ("Adam at step 1000", lambda m: mk_adam(1000, 0.8, 0.99, m)),
    (
        "AdamW amsgrad maximize donated",
        lambda m: AdamW.init(m, amsgrad=True, maximize=True, weight_decay=0.1, donate=True),
    ),
]


# Inductor's own import of torch.jit warns (torch's, not ours).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("name", "make"), INDUCTOR_CASES, ids=[n for n, _ in INDUCTOR_CASES])
def test_compile_step_with_inductor_matches_run_step(name: str, make: Any) -> None:
    # Generated code: Adam's traced path (bias corrections computed once per step, from the
    # step count; amsgrad, maximize, decoupled weight decay), pure and donated, against eager.
    model = mlp()
    x, y = batch()
    step = compile_step(mse, lambda count: 0.01 / (1 + count % 3))  # inductor, generating code
    ours, ours_opt = model, make(model)
    ref, ref_opt = model, make(model)
    for _ in range(3):
        ours, ours_opt, loss = step(ours, ours_opt, x, y)
        expected = mse(ref, x, y)
        ref, ref_opt = run_step(ref, ref_opt, expected, 0.01 / (1 + ref_opt.count % 3))
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    assert_close_models(ours, ref)
    assert ours_opt.count == ref_opt.count
    for kind in type(ref_opt).declaration().state:
        for s, t in zip(getattr(ours_opt, kind), getattr(ref_opt, kind), strict=True):
            torch.testing.assert_close(s, t, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_step_with_inductor_nonfinite_raises_and_changes_nothing() -> None:
    # The check in generated code: the refused step leaves the donated state as it was.
    model = mlp()
    x, y = batch()
    opt = Adam.init(model, donate=True)
    state = [t.clone() for t in opt.exp_avg + opt.exp_avg_sq]
    step = compile_step(nan_loss, 0.1)
    with pytest.raises(NonFiniteError, match="loss is nan") as info:
        step(model, opt, x, y)
    assert info.value.paths == tuple(name for name, _ in dp.named_parameters(model))
    for held, kept in zip(opt.exp_avg + opt.exp_avg_sq, state, strict=True):
        assert torch.equal(held, kept)
    assert not opt.lease.spent  # type: ignore[union-attr]


def test_compile_step_recompiles_only_when_shapes_or_structure_change() -> None:
    counter = CompileCounterWithBackend("eager")
    schedule = lambda count: 0.1 / (1 + count)  # noqa: E731 (a new lr every step)
    step = compile_step(mse, schedule, backend=counter)
    model = mlp()
    opt = Adam.init(model)
    x, y = batch()
    for _ in range(5):  # new model, optimizer, count and lr each step: one compile
        model, opt, _ = step(model, opt, x, y)
    assert counter.frame_count == 1
    other = mlp(seed=3)  # another model of the same structure and shapes
    step(other, Adam.init(other), x, y)
    assert counter.frame_count == 1
    step(model, opt, *batch(n=9))  # a new batch size: compiled once more, with the size a
    # symbol (or not at all where an earlier compile in this process, at this code location,
    # already saw the batch size change: dynamo remembers that per code location)
    after_new_batch = counter.frame_count
    assert after_new_batch <= 2
    step(model, opt, *batch(n=11))  # and no more for other sizes
    assert counter.frame_count == after_new_batch
    wider = mlp((4, 16, 3))  # new shapes
    step(wider, Adam.init(wider), x, y)
    deeper = mlp((4, 8, 8, 3))  # new structure
    step(deeper, Adam.init(deeper), x, y)
    calls = counter.frame_count
    assert calls > after_new_batch
    for _ in range(3):
        deeper, _, _ = step(deeper, Adam.init(deeper), x, y)
    assert counter.frame_count == calls
    step(model, Adam.init(model, donate=True), x, y)  # donation is part of the program
    assert counter.frame_count == calls + 1


def test_compile_step_is_the_same_under_any_grad_mode() -> None:
    # The model's own Parameters are the compiled graph's inputs and the call runs under
    # no_grad: grad mode outside neither recompiles nor changes the numbers, the Parameters
    # passed in are not changed, and the new ones are trainable leaves of their own.
    counter = CompileCounterWithBackend("aot_eager")
    step = compile_step(mse, 0.1, backend=counter)
    model = mlp()
    before = [p.clone() for p in flatten_parameters(model)]
    x, y = batch()
    ours, ours_opt = model, Adam.init(model)
    ref, ref_opt = model, Adam.init(model)
    compiled = []
    for grad_mode in (True, False, True, False):
        with torch.set_grad_enabled(grad_mode):
            ours, ours_opt, loss = step(ours, ours_opt, x, y)
        ref, ref_opt = run_step(ref, ref_opt, mse(ref, x, y), 0.1)
        assert not loss.requires_grad
        compiled.append(counter.frame_count)
    assert_close_models(ours, ref)
    assert compiled[1:] == compiled[:1] * 3  # nothing compiled after the first step
    for p, old in zip(flatten_parameters(model), before, strict=True):
        assert torch.equal(p, old)
    for p, old in zip(flatten_parameters(ours), flatten_parameters(model), strict=True):
        assert p.is_leaf and p.requires_grad and p.grad_fn is None
        assert p.untyped_storage().data_ptr() != old.untyped_storage().data_ptr()


def test_compile_step_keeps_tied_parameters_tied() -> None:
    gen = torch.Generator().manual_seed(0)
    shared = dp.sample(LinearSpec(3, 3), generator=gen)
    model = Tied(shared, shared)
    assert len(flatten_parameters(model)) == 2
    x, y = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    counter = CompileCounterWithBackend("eager")
    step = compile_step(mse, 0.1, backend=counter)
    ours, ours_opt = model, Adam.init(model)
    ref, ref_opt = model, Adam.init(model)
    for _ in range(3):
        ours, ours_opt, _ = step(ours, ours_opt, x, y)
        ref, ref_opt = run_step(ref, ref_opt, mse(ref, x, y), 0.1)
    assert_close_models(ours, ref)
    assert ours.first is ours.second and counter.frame_count == 1
    untied = Tied(shared, dp.sample(LinearSpec(3, 3), generator=gen))
    step(untied, Adam.init(untied), x, y)  # another structure: compiled anew
    assert counter.frame_count == 2


def test_compile_step_donated_updates_state_in_place() -> None:
    model = mlp()
    x, y = batch()
    opt = Adam.init(model, donate=True)
    before = [t.data_ptr() for t in opt.exp_avg + opt.exp_avg_sq]
    first = [t.clone() for t in opt.exp_avg]
    step = compile_step(mse, 0.1, backend="aot_eager")
    new_model, new_opt, _ = step(model, opt, x, y)
    assert [t.data_ptr() for t in new_opt.exp_avg + new_opt.exp_avg_sq] == before
    assert not any(torch.equal(a, b) for a, b in zip(new_opt.exp_avg, first, strict=True))
    with pytest.raises(DiffprogError, match="donate=True and has already stepped"):
        step(model, opt, x, y)
    step(new_model, new_opt, x, y)  # the returned optimizer steps
    pure = Adam.init(model)
    _, pure_after, _ = step(model, pure, x, y)
    assert all(a is not b for a, b in zip(pure.exp_avg, pure_after.exp_avg, strict=True))
    assert all(bool((a == 0).all()) for a in pure.exp_avg)  # the old optimizer is unchanged


def nan_loss(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # NaN in the gradient of the last layer only (through its output).
    out = model(x)
    return F.mse_loss(out, y) + (out * torch.full_like(out, math.nan)).sum() * 0.0


@pytest.mark.parametrize("donate", [False, True])
def test_compile_step_nonfinite_raises_and_changes_nothing(donate: bool) -> None:
    model = mlp()
    x, y = batch()
    opt = Adam.init(model, donate=donate)
    state = [t.clone() for t in opt.exp_avg + opt.exp_avg_sq]
    step = compile_step(nan_loss, 0.1, backend="aot_eager")
    with pytest.raises(NonFiniteError, match="loss is nan") as info:
        step(model, opt, x, y)
    assert info.value.paths == tuple(name for name, _ in dp.named_parameters(model))
    for held, kept in zip(opt.exp_avg + opt.exp_avg_sq, state, strict=True):
        assert torch.equal(held, kept)
    good = compile_step(mse, 0.1, backend="aot_eager")
    good(model, opt, x, y)  # still valid: the refused step spent nothing
    skip = compile_step(nan_loss, 0.1, on_nonfinite="skip", backend="aot_eager")
    fresh = Adam.init(model, donate=donate)
    same_model, same_opt, loss = skip(model, fresh, x, y)
    assert same_model is model and same_opt is fresh and math.isnan(float(loss))


def test_compile_step_ignore_skips_the_check() -> None:
    model = mlp()
    x, y = batch()
    step = compile_step(nan_loss, 0.1, on_nonfinite="ignore", backend="aot_eager")
    new_model, _, _ = step(model, GD(), x, y)
    assert torch.isnan(new_model.layers[-1].weight).all()


def test_compile_step_refuses_what_it_does_not_take() -> None:
    model = mlp()
    x, y = batch()
    step = compile_step(mse, 0.1, backend="aot_eager")
    with pytest.raises(DiffprogError, match="pure optimizer"):
        step(model, TorchOptimizer.init(model, torch.optim.SGD, lr=0.1), x, y)
    with pytest.raises(DiffprogError, match="trains every parameter alike"):
        step(model, Adam.init(model, freeze="layers.0.bias"), x, y)
    with pytest.raises(DiffprogError, match="trains every parameter alike"):
        step(model, Adam.init(model, overrides={"*.bias": {"weight_decay": 0.0}}), x, y)
    with pytest.raises(DiffprogError, match="built for other parameters"):
        step(model, Adam.init(mlp((4, 5, 3))), x, y)
    with pytest.raises(ValueError, match="on_nonfinite"):
        compile_step(mse, 0.1, on_nonfinite="warn")  # type: ignore[arg-type]


def test_fused_kernels_are_not_traced() -> None:
    # Under torch.compile the pure optimizers take their _foreach_ paths: the fused kernels
    # do not functionalize (the regression: aot_eager failed on _fused_adam_).
    model = mlp()
    x, y = batch()
    assert dp.optim._pure.has_fused("_fused_adam_", torch.device("cpu"))
    step = compile_step(mse, torch.tensor(0.1), backend="aot_eager")
    step(model, AdamW.init(model), x, y)


def test_compile_step_steps_a_parameter_the_loss_does_not_reach() -> None:
    # Documented difference from run_step: torch.func.grad gives such a parameter a zero
    # gradient, so the compiled step moves it on weight decay (run_step leaves it alone).
    model = mlp()
    x, y = batch()

    def first_layer_only(m: MLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return m.layers[0](x).pow(2).mean()

    step = compile_step(first_layer_only, 0.1, backend="eager")
    opt = AdamW.init(model, weight_decay=0.5)
    ours, _, _ = step(model, opt, x, y)
    ref, ref_opt = run_step(model, opt, first_layer_only(model, x, y), 0.1)
    last = model.layers[-1].weight
    assert torch.equal(ref.layers[-1].weight, last) and ref_opt.param_counts
    torch.testing.assert_close(ours.layers[-1].weight, last * (1 - 0.1 * 0.5))
