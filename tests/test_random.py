"""Randomizable specs and sample."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import diffprog as dp
from diffprog.nn import Linear, LinearSpec


def test_same_generator_seed_gives_the_same_model_bit_for_bit() -> None:
    a = dp.sample(LinearSpec(5, 4), generator=torch.Generator().manual_seed(3))
    b = dp.sample(LinearSpec(5, 4), generator=torch.Generator().manual_seed(3))
    c = dp.sample(LinearSpec(5, 4), generator=torch.Generator().manual_seed(4))
    assert all(
        torch.equal(p, q)
        for p, q in zip(dp.flatten_parameters(a), dp.flatten_parameters(b), strict=True)
    )
    assert not torch.equal(a.weight, c.weight)


@pytest.mark.parametrize(("fan_in", "fan_out"), [(3, 1), (1, 7), (64, 32), (5, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_init_equals_torch_after_manual_seed(
    fan_in: int, fan_out: int, dtype: torch.dtype, bias: bool
) -> None:
    torch.manual_seed(11)
    reference = torch.nn.Linear(fan_in, fan_out, bias=bias, dtype=dtype)
    ours = dp.sample(
        LinearSpec(fan_in, fan_out, bias=bias),
        generator=torch.Generator().manual_seed(11),
        dtype=dtype,
    )
    assert ours.weight.shape == (fan_out, fan_in)  # PyTorch's [out, in] layout
    assert torch.equal(ours.weight, reference.weight)
    if bias:
        assert ours.bias is not None and torch.equal(ours.bias, reference.bias)
    else:
        assert ours.bias is None
    assert [n for n, _ in dp.named_parameters(ours)] == [n for n, _ in reference.named_parameters()]


def test_without_a_generator_torch_manual_seed_applies() -> None:
    torch.manual_seed(5)
    reference = torch.nn.Linear(4, 2)
    torch.manual_seed(5)
    ours = dp.sample(LinearSpec(4, 2))
    assert torch.equal(ours.weight, reference.weight)


def test_linear_forward_and_gradients_match_torch() -> None:
    ours = dp.sample(LinearSpec(3, 2), generator=torch.Generator().manual_seed(0))
    reference = torch.nn.Linear(3, 2)
    with torch.no_grad():
        reference.weight.copy_(ours.weight)
        reference.bias.copy_(ours.bias)
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x), reference(x))
    grads = dp.grad(ours(x).square().sum(), dp.flatten_parameters(ours))
    reference(x).square().sum().backward()
    torch.testing.assert_close(grads, [reference.weight.grad, reference.bias.grad])


def test_meta_device_builds_shapes_without_data() -> None:
    layer = dp.sample(LinearSpec(1000, 1000), device="meta")
    assert layer.weight.device.type == "meta" and layer.weight.shape == (1000, 1000)
    assert isinstance(layer.weight, dp.Parameter)


def test_device_and_dtype_are_honoured() -> None:
    layer = dp.sample(LinearSpec(2, 2), device=torch.device("cpu"), dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.bias is not None
    assert layer.bias.dtype == torch.float64 and layer.weight.device.type == "cpu"


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    sizes: tuple[int, ...]

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: dp.DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Linear, ...]:
        return tuple(
            dp.sample(LinearSpec(i, o), generator=generator, device=device, dtype=dtype)
            for i, o in zip(self.sizes[:-1], self.sizes[1:], strict=True)
        )


def test_a_users_spec_composes_other_specs_and_is_randomizable() -> None:
    spec = MLPSpec((4, 8, 1))
    assert isinstance(spec, dp.Randomizable)
    mlp = dp.sample(spec, generator=torch.Generator().manual_seed(0))
    assert [tuple(layer.weight.shape) for layer in mlp] == [(8, 4), (1, 8)]
    # one generator threads through the parts, as two torch.nn.Linear built in a row
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    assert torch.equal(mlp[1].weight, second.weight) and torch.equal(mlp[0].bias, first.bias)


def test_sample_rejects_something_that_is_not_a_spec() -> None:
    with pytest.raises(TypeError, match="needs a spec"):
        dp.sample(42)  # type: ignore[arg-type]


def test_init_parameter_draws_on_the_generators_device_then_moves() -> None:
    gen = torch.Generator().manual_seed(0)
    p = dp.init_parameter((3,), lambda t, g: t.uniform_(generator=g), generator=gen, device="meta")
    assert p.device.type == "meta"
    q = dp.init_parameter((3,), lambda t, g: t.uniform_(generator=g), generator=gen)
    assert isinstance(q, dp.Parameter) and q.requires_grad and q.is_leaf
