"""Dropout layers: explicit randomness, the train/eval switch, parity with torch's masks."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import diffprog as dp
from diffprog import nn

DTYPES = [torch.float32, torch.float64]

# (our spec class, torch.nn class, torch.nn.functional function, input shapes)
KINDS: list[
    tuple[Any, type[torch.nn.Module], Callable[..., torch.Tensor], list[tuple[int, ...]]]
] = [
    (nn.DropoutSpec, torch.nn.Dropout, F.dropout, [(50,), (4, 6, 5)]),
    (nn.Dropout1dSpec, torch.nn.Dropout1d, F.dropout1d, [(4, 6, 5), (6, 5)]),
    (nn.Dropout2dSpec, torch.nn.Dropout2d, F.dropout2d, [(3, 6, 4, 2)]),
    (nn.Dropout3dSpec, torch.nn.Dropout3d, F.dropout3d, [(2, 6, 2, 3, 2), (6, 2, 2, 3)]),
    (nn.AlphaDropoutSpec, torch.nn.AlphaDropout, F.alpha_dropout, [(50,), (4, 6, 5)]),
    (
        nn.FeatureAlphaDropoutSpec,
        torch.nn.FeatureAlphaDropout,
        F.feature_alpha_dropout,
        [(4, 6, 5), (3, 5)],
    ),
]
IDS = [spec.__name__ for spec, *_ in KINDS]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("spec", "module", "fn", "shapes"), KINDS, ids=IDS)
def test_spec_fields_are_torch_arguments(spec: Any, module: Any, fn: Any, shapes: Any) -> None:
    ours = {f.name: f.default for f in dataclasses.fields(spec)}
    theirs = {
        name: p.default
        for name, p in inspect.signature(module.__init__).parameters.items()
        if name != "self"
    }
    assert ours == theirs
    layer = dp.sample(spec(p=0.25, inplace=True), generator=gen(0))
    assert (layer.p, layer.inplace) == (0.25, True)
    assert dp.flatten_parameters(layer) == []


@pytest.mark.parametrize(("spec", "module", "fn", "shapes"), KINDS, ids=IDS)
def test_eval_and_p_zero_are_the_identity(spec: Any, module: Any, fn: Any, shapes: Any) -> None:
    x = torch.randn(shapes[0])
    layer = dp.sample(spec(0.5))
    assert layer(x) is x  # outside a training pass
    assert layer(x, training=False) is x
    assert nn.training(lambda m: m(x, training=False), layer)[0] is x
    zero = dp.sample(spec(0.0))
    assert zero(x, training=True) is x
    assert nn.training(lambda m: m(x), zero)[0] is x


@pytest.mark.parametrize("p", [0.2, 0.5, 1.0])
@pytest.mark.parametrize(("spec", "module", "fn", "shapes"), KINDS, ids=IDS)
def test_without_generator_equals_torch_for_the_same_seed(
    spec: Any, module: Any, fn: Any, shapes: Any, p: float
) -> None:
    layer = dp.sample(spec(p))
    for shape in shapes:
        x = torch.randn(shape)
        torch.manual_seed(7)
        expected = module(p).train()(x)
        torch.manual_seed(7)
        assert torch.equal(layer(x, training=True), expected)
        torch.manual_seed(7)
        y, same = nn.training(lambda m, x: m(x), layer, x)
        assert torch.equal(y, expected)
        assert same is layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
@pytest.mark.parametrize(("spec", "module", "fn", "shapes"), KINDS, ids=IDS)
def test_generator_mask_and_gradient_equal_torch_on_cpu(
    spec: Any, module: Any, fn: Any, shapes: Any, p: float, dtype: torch.dtype
) -> None:
    """A CPU generator seeded s draws the mask torch draws after torch.manual_seed(s)."""
    layer = dp.sample(spec(p))
    for shape in shapes:
        x = torch.randn(shape, dtype=dtype)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = layer(x_ours, training=True, generator=gen(11))
        torch.manual_seed(11)
        expected = module(p).train()(x_theirs)
        assert torch.equal(y, expected)
        weights = torch.randn(shape, dtype=dtype)
        (grad,) = torch.autograd.grad((y * weights).sum(), x_ours)
        (expected * weights).sum().backward()
        assert_close(grad, x_theirs.grad)
        # The training pass's generator is used the same way.
        y_pass, _ = nn.training(lambda m, x: m(x), layer, x, generator=gen(11))
        assert torch.equal(y_pass, expected.detach())


def test_explicit_generator_overrides_the_pass_generator() -> None:
    layer = nn.Dropout(0.5)
    x = torch.ones(100)
    y, _ = nn.training(lambda m: m(x, generator=gen(1)), layer, generator=gen(2))
    assert torch.equal(y, layer(x, training=True, generator=gen(1)))
    assert not torch.equal(y, layer(x, training=True, generator=gen(2)))


def test_same_generator_state_same_mask_and_the_generator_advances() -> None:
    layer = nn.Dropout(0.5)
    x = torch.ones(64)
    g = gen(3)
    first, second = layer(x, training=True, generator=g), layer(x, training=True, generator=g)
    assert not torch.equal(first, second)
    assert torch.equal(first, layer(x, training=True, generator=gen(3)))


def test_inplace_overwrites_the_input() -> None:
    layer = nn.Dropout(0.5, inplace=True)
    x = torch.ones(32)
    y = layer(x, training=True, generator=gen(0))
    assert y.data_ptr() == x.data_ptr()
    assert set(x.tolist()) <= {0.0, 2.0}
    x2 = torch.ones(3, 4, 5)
    y2 = nn.Dropout1d(0.5, inplace=True)(x2[0], training=True, generator=gen(0))
    assert y2.shape == (4, 5)


@settings(max_examples=30, deadline=None)
@given(
    p=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
)
def test_outputs_are_zero_or_scaled(p: float, seed: int, shape: list[int]) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    y = nn.Dropout(p)(x, training=True, generator=gen(seed))
    kept = y != 0
    assert_close(y[kept], x[kept] / (1 - p))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_drop_rate_and_mean_are_right(p: float) -> None:
    n = 100_000
    y = nn.Dropout(p)(torch.ones(n), training=True, generator=gen(5))
    dropped = (y == 0).double().mean().item()
    # Within 5 standard deviations of a binomial's rate: fails by chance ~1e-6 of the time.
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert abs(y.mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)


def test_channel_dropout_drops_whole_channels_at_rate_p() -> None:
    y = nn.Dropout2d(0.3)(torch.ones(200, 50, 3, 3), training=True, generator=gen(6))
    per_channel = y.flatten(2)
    assert torch.equal(per_channel.amin(-1), per_channel.amax(-1))  # constant per channel
    rate = (per_channel[..., 0] == 0).double().mean().item()
    assert abs(rate - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 10_000)


def test_alpha_dropout_keeps_mean_and_variance() -> None:
    x = torch.randn(200_000, generator=gen(7), dtype=torch.float64)
    for layer in (nn.AlphaDropout(0.3), nn.FeatureAlphaDropout(0.3)):
        shaped = x.view(20_000, 10) if isinstance(layer, nn.FeatureAlphaDropout) else x
        y = layer(shaped, training=True, generator=gen(8))
        assert abs(y.mean().item()) < 0.02
        assert abs(y.std().item() - 1.0) < 0.02


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.Dropout(1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.DropoutSpec(-0.1)
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D"):
        nn.Dropout1d()(torch.ones(1, 2, 3, 4), training=True)
    with pytest.raises(ValueError, match="use Dropout1d"):
        nn.Dropout2d()(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="at least 2D"):
        nn.FeatureAlphaDropout()(torch.ones(3))
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        nn.Dropout()(torch.ones(3), training=True, generator=3)  # type: ignore[arg-type]


def test_dropout_in_a_model_with_run_step() -> None:
    class Net(dp.Parameterized):
        lin: nn.Linear
        drop: nn.Dropout

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.lin(x))

    from diffprog.optim import GD, run_step

    model = Net(dp.sample(nn.LinearSpec(4, 3), generator=gen(0)), nn.Dropout(0.5))
    x = torch.randn(8, 4)
    loss, same = nn.training(lambda m: m(x).pow(2).sum(), model, generator=gen(1))
    assert same is model  # dropout has no state
    new, _ = run_step(model, GD(), loss, 0.1)
    mask = nn.Dropout(0.5)(torch.ones(8, 3), training=True, generator=gen(1))
    (expected,) = torch.autograd.grad(
        (F.linear(x, model.lin.weight, model.lin.bias) * mask).pow(2).sum(), [model.lin.weight]
    )
    assert_close(new.lin.weight, model.lin.weight - 0.1 * expected)
