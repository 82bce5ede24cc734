"""Convolutions (Conv1d/2d/3d, ConvTranspose1d/2d/3d) against torch.nn itself."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
from diffprog import nn

SPECS: dict[str, Any] = {
    "Conv1d": nn.Conv1dSpec,
    "Conv2d": nn.Conv2dSpec,
    "Conv3d": nn.Conv3dSpec,
    "ConvTranspose1d": nn.ConvTranspose1dSpec,
    "ConvTranspose2d": nn.ConvTranspose2dSpec,
    "ConvTranspose3d": nn.ConvTranspose3dSpec,
}

# (torch.nn class name, constructor keywords, input shape)
CONFIGS: list[tuple[str, dict[str, Any], tuple[int, ...]]] = [
    ("Conv1d", {"in_channels": 3, "out_channels": 4, "kernel_size": 3}, (2, 3, 9)),
    (
        "Conv1d",
        {"in_channels": 4, "out_channels": 6, "kernel_size": 5, "stride": 2, "padding": 2},
        (3, 4, 11),
    ),
    (
        "Conv1d",
        {
            "in_channels": 4,
            "out_channels": 6,
            "kernel_size": 4,
            "padding": "same",
            "dilation": 2,
            "groups": 2,
            "padding_mode": "reflect",
        },
        (2, 4, 10),
    ),
    (
        "Conv1d",
        {
            "in_channels": 3,
            "out_channels": 3,
            "kernel_size": 3,
            "padding": 1,
            "bias": False,
            "padding_mode": "circular",
        },
        (3, 8),  # unbatched
    ),
    (
        "Conv1d",
        {"in_channels": 2, "out_channels": 2, "kernel_size": 3, "padding": "valid"},
        (1, 2, 5),
    ),
    ("Conv2d", {"in_channels": 1, "out_channels": 8, "kernel_size": 3, "padding": 1}, (2, 1, 6, 6)),
    (
        "Conv2d",
        {
            "in_channels": 4,
            "out_channels": 8,
            "kernel_size": (3, 2),
            "stride": (2, 1),
            "padding": (1, 0),
            "dilation": (1, 2),
            "groups": 4,
        },
        (2, 4, 9, 8),
    ),
    (
        "Conv2d",
        {
            "in_channels": 3,
            "out_channels": 6,
            "kernel_size": 3,
            "padding": "same",
            "padding_mode": "replicate",
        },
        (3, 7, 7),  # unbatched
    ),
    (
        "Conv2d",
        {"in_channels": 2, "out_channels": 4, "kernel_size": 4, "padding": "same"},
        (2, 2, 7, 6),
    ),
    (
        "Conv2d",
        {
            "in_channels": 2,
            "out_channels": 2,
            "kernel_size": 3,
            "padding": 2,
            "padding_mode": "circular",
        },
        (1, 2, 5, 5),
    ),
    (
        "Conv3d",
        {"in_channels": 2, "out_channels": 4, "kernel_size": 3, "padding": 1},
        (2, 2, 4, 5, 5),
    ),
    (
        "Conv3d",
        {
            "in_channels": 4,
            "out_channels": 4,
            "kernel_size": (1, 3, 3),
            "stride": (1, 2, 2),
            "padding": (0, 1, 1),
            "groups": 2,
            "bias": False,
            "padding_mode": "reflect",
        },
        (1, 4, 3, 6, 6),
    ),
    (
        "ConvTranspose1d",
        {"in_channels": 4, "out_channels": 2, "kernel_size": 4, "stride": 2, "padding": 1},
        (2, 4, 8),
    ),
    (
        "ConvTranspose1d",
        {
            "in_channels": 4,
            "out_channels": 6,
            "kernel_size": 3,
            "stride": 3,
            "output_padding": 1,
            "groups": 2,
            "dilation": 2,
        },
        (4, 5),  # unbatched
    ),
    (
        "ConvTranspose2d",
        {
            "in_channels": 8,
            "out_channels": 4,
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "output_padding": 1,
        },
        (2, 8, 5, 5),
    ),
    (
        "ConvTranspose2d",
        {
            "in_channels": 4,
            "out_channels": 4,
            "kernel_size": (2, 3),
            "stride": (2, 1),
            "groups": 4,
            "bias": False,
        },
        (4, 3, 4),  # unbatched
    ),
    (
        "ConvTranspose3d",
        {"in_channels": 2, "out_channels": 3, "kernel_size": 2, "stride": 2},
        (1, 2, 2, 3, 3),
    ),
    (
        "ConvTranspose3d",
        {
            "in_channels": 2,
            "out_channels": 4,
            "kernel_size": 3,
            "stride": (1, 2, 2),
            "padding": 1,
            "dilation": (2, 1, 1),
        },
        (2, 2, 3, 3, 4),
    ),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CONFIGS)]
DTYPES = [torch.float32, torch.float64]

# torch.nn's own warning for an even kernel with padding="same" (both layers trigger it).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


def _pair(
    name: str, kwargs: dict[str, Any], dtype: torch.dtype, seed: int = 0
) -> tuple[Any, torch.nn.Module]:
    """Our layer and torch.nn's, both sampled from ``seed``."""
    torch.manual_seed(seed)
    reference = getattr(torch.nn, name)(**kwargs, dtype=dtype)
    ours = dp.sample(
        SPECS[name](**kwargs), generator=torch.Generator().manual_seed(seed), dtype=dtype
    )
    return ours, reference


def _check_parity(ours: Any, reference: torch.nn.Module, x: torch.Tensor, **call: Any) -> None:
    """Same outputs and the same gradients w.r.t. the input and every parameter."""
    reference.load_state_dict({k: v.detach() for k, v in dp.named_parameters(ours)})
    x_ours = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    out = ours(x_ours, **call)
    expected = reference(x_ref, **call)
    torch.testing.assert_close(out, expected)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    named = dp.named_parameters(ours)
    grads = dp.grad((out * cotangent).sum(), [x_ours, *(p for _, p in named)])
    ref_params = dict(reference.named_parameters())
    expected_grads = torch.autograd.grad(
        (expected * cotangent).sum(), [x_ref, *(ref_params[k] for k, _ in named)]
    )
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "kwargs", "shape"), CONFIGS, ids=IDS)
def test_sample_equals_torch_nn_init_bit_for_bit(
    name: str, kwargs: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    for seed in (0, 7):
        ours, reference = _pair(name, kwargs, dtype, seed)
        ours_named = dp.named_parameters(ours)
        assert [k for k, _ in ours_named] == list(reference.state_dict())
        for (_, p), q in zip(ours_named, reference.parameters(), strict=True):
            assert type(p) is dp.Parameter
            assert p.dtype == dtype
            assert torch.equal(p, q)


@pytest.mark.parametrize(("name", "kwargs", "shape"), CONFIGS, ids=IDS)
def test_meta_device_gives_shapes_without_data(
    name: str, kwargs: dict[str, Any], shape: tuple[int, ...]
) -> None:
    reference = getattr(torch.nn, name)(**kwargs, device="meta")
    ours = dp.sample(SPECS[name](**kwargs), device="meta", dtype=torch.float64)
    for (k, p), (k_ref, q) in zip(
        dp.named_parameters(ours), reference.named_parameters(), strict=True
    ):
        assert k == k_ref
        assert p.is_meta
        assert p.shape == q.shape
        assert p.dtype == torch.float64


@pytest.mark.parametrize(("name", "kwargs", "shape"), CONFIGS, ids=IDS)
def test_hyper_parameters_are_torch_nn_attributes(
    name: str, kwargs: dict[str, Any], shape: tuple[int, ...]
) -> None:
    ours, reference = _pair(name, kwargs, torch.float32)
    attributes = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"]
    attributes += ["groups", "padding_mode", "transposed"]
    if name.startswith("ConvTranspose"):
        attributes.append("output_padding")
    for attribute in attributes:
        assert getattr(ours, attribute) == getattr(reference, attribute), attribute
    assert type(ours).__name__ == name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "kwargs", "shape"), CONFIGS, ids=IDS)
def test_forward_and_gradients_match_torch_nn(
    name: str, kwargs: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    ours, reference = _pair(name, kwargs, dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    _check_parity(ours, reference, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [[13, 13], [14, 14], [13, 14], [2, 4, 14, 13]])
def test_conv_transpose_output_size_matches_torch_nn(dtype: torch.dtype, size: list[int]) -> None:
    kwargs = {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1}
    ours, reference = _pair("ConvTranspose2d", kwargs, dtype)
    x = torch.randn(2, 3, 7, 7, dtype=dtype)
    _check_parity(ours, reference, x, output_size=size)
    assert ours(x, output_size=size).shape[-2:] == torch.Size(size[-2:])
    assert ours(x[0], output_size=torch.Size(size[-2:])).shape[-2:] == torch.Size(size[-2:])


def test_conv_transpose_output_size_out_of_reach_or_wrong_length_is_a_clear_error() -> None:
    up = dp.sample(nn.ConvTranspose2dSpec(3, 4, kernel_size=3, stride=2, padding=1))
    x = torch.randn(1, 3, 7, 7)
    with pytest.raises(ValueError, match=r"valid sizes range from \[13, 13\] to \[14, 14\]"):
        up(x, output_size=[15, 15])
    with pytest.raises(ValueError, match="output_size must have 2 or 4 elements"):
        up(x, output_size=[14])


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    dims=st.sampled_from([1, 2]),
    transposed=st.booleans(),
    groups=st.sampled_from([1, 2]),
    channels=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    batch=st.sampled_from([None, 1, 3]),
    bias=st.booleans(),
)
def test_random_convolutions_match_torch_nn(
    data: st.DataObject,
    dims: int,
    transposed: bool,
    groups: int,
    channels: tuple[int, int],
    kernel: int,
    stride: int,
    dilation: int,
    batch: int | None,
    bias: bool,
) -> None:
    in_channels, out_channels = channels[0] * groups, channels[1] * groups
    kwargs: dict[str, Any] = {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "kernel_size": tuple(data.draw(st.integers(1, kernel)) for _ in range(dims)),
        "stride": stride,
        "dilation": dilation,
        "groups": groups,
        "bias": bias,
    }
    if transposed:
        name = f"ConvTranspose{dims}d"
        kwargs["padding"] = data.draw(st.integers(0, 1))
        kwargs["output_padding"] = data.draw(st.integers(0, max(stride, dilation) - 1))
    else:
        name = f"Conv{dims}d"
        options: list[Any] = [0, 1, "valid"] + (["same"] if stride == 1 else [])
        kwargs["padding"] = data.draw(st.sampled_from(options))
        kwargs["padding_mode"] = data.draw(
            st.sampled_from(["zeros", "reflect", "replicate", "circular"])
        )
    spatial = tuple(data.draw(st.integers(5, 8)) for _ in range(dims))  # >= dilated kernel
    shape = (in_channels, *spatial) if batch is None else (batch, in_channels, *spatial)
    ours, reference = _pair(name, kwargs, torch.float64, seed=data.draw(st.integers(0, 2**16)))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _check_parity(ours, reference, x)


def test_layers_are_immutable_values_and_rebuild_with_their_hyper_parameters() -> None:
    conv = dp.sample(nn.Conv2dSpec(2, 4, kernel_size=3, stride=2, padding="valid"))
    with pytest.raises(AttributeError):
        conv.stride = (1, 1)  # type: ignore[misc]
    zeros = [dp.make_independent(torch.zeros_like(p)) for p in dp.flatten_parameters(conv)]
    rebuilt = dp.replace_parameters(conv, zeros)
    assert type(rebuilt) is nn.Conv2d
    assert rebuilt.stride == (2, 2)
    assert rebuilt.padding == "valid"
    assert torch.equal(rebuilt(torch.randn(1, 2, 5, 5)), torch.zeros(1, 4, 2, 2))
    assert conv.weight.abs().sum() > 0  # the original is unchanged


def test_a_conv_trains_with_run_step() -> None:
    from diffprog.optim import GD, run_step

    conv = dp.sample(
        nn.Conv1dSpec(1, 1, kernel_size=3, padding=1), generator=torch.Generator().manual_seed(0)
    )
    x = torch.randn(4, 1, 8, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(3):
        loss = (conv(x) - x).pow(2).mean()
        losses.append(loss.item())
        conv, _ = run_step(conv, GD(), loss, 0.1)
    assert losses[2] < losses[0]
    assert conv.padding == (1,)


def test_layers_can_be_built_directly_with_ints_for_tuples() -> None:
    weight = dp.make_independent(torch.randn(4, 2, 3, 3))
    conv = nn.Conv2d(weight, None, stride=2, padding=1)  # type: ignore[arg-type]
    assert conv.stride == (2, 2)
    assert conv.padding == (1, 1)
    assert conv.dilation == (1, 1)
    assert conv.in_channels == 2
    assert conv.out_channels == 4
    assert conv.kernel_size == (3, 3)
    grouped = nn.Conv2d(weight, None, groups=2)
    assert grouped.in_channels == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (nn.Conv2dSpec(3, 4, 3, groups=2), "in_channels = 3 must be divisible by groups = 2"),
        (nn.Conv2dSpec(4, 3, 3, groups=2), "out_channels = 3 must be divisible by groups = 2"),
        (nn.Conv2dSpec(4, 4, 3, groups=0), "groups must be a positive integer"),
        (nn.Conv2dSpec(1, 1, 3, padding="full"), "invalid padding string 'full'"),
        (nn.Conv2dSpec(1, 1, 3, stride=2, padding="same"), "not supported for strided"),
        (nn.Conv1dSpec(1, 1, 3, padding_mode="mirror"), "padding_mode must be one of"),  # type: ignore[arg-type]
        (nn.Conv2dSpec(1, 1, (3, 3, 3)), r"kernel_size must be an int or a tuple of 2 ints"),
        (nn.Conv3dSpec(1, 1, 3, stride=(1, 2)), r"stride must be an int or a tuple of 3 ints"),
        (nn.Conv2dSpec(1, 1, 3, stride=(1, 0)), r"stride must be at least 1"),
        (nn.Conv1dSpec(1, 1, 0), r"kernel_size must be at least 1"),
        (nn.ConvTranspose2dSpec(1, 1, 3, padding=-1), r"padding must be at least 0"),
        (nn.Conv2dSpec(1, 1, 2.5), r"kernel_size must be an int or a tuple of 2 ints"),  # type: ignore[arg-type]
        (nn.ConvTranspose2dSpec(1, 1, 3, padding_mode="reflect"), 'only padding_mode="zeros"'),
        (nn.ConvTranspose1dSpec(1, 1, 3, padding="same"), "no 'same'/'valid' padding"),  # type: ignore[arg-type]
    ],
)
def test_bad_specs_are_rejected_with_the_fix(spec: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dp.sample(spec)


def test_bad_weights_are_rejected_when_building_a_layer() -> None:
    with pytest.raises(ValueError, match=r"weight must be a tensor of 4 dimensions"):
        nn.Conv2d(dp.make_independent(torch.randn(4, 2, 3)))
    with pytest.raises(
        ValueError, match=r"out_channels \(weight.shape\[0\] = 3\) must be divisible"
    ):
        nn.Conv2d(dp.make_independent(torch.randn(3, 1, 3, 3)), groups=2)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        nn.ConvTranspose1d(
            dp.make_independent(torch.randn(2, 4, 3)), dp.make_independent(torch.randn(2))
        )
