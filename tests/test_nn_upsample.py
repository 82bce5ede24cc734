"""UpSample (torch.nn.Upsample) against torch.nn itself."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
from diffprog import nn

DTYPES = [torch.float32, torch.float64]
# (constructor keywords, input shape)
CONFIGS: list[tuple[dict[str, Any], tuple[int, ...]]] = [
    ({"scale_factor": 2}, (2, 3, 5)),
    ({"scale_factor": 2.0, "mode": "nearest"}, (1, 2, 3, 4)),
    ({"size": 7, "mode": "linear"}, (2, 3, 4)),
    ({"size": (5, 9), "mode": "bilinear", "align_corners": True}, (2, 2, 3, 4)),
    ({"scale_factor": (1.5, 2.5), "mode": "bicubic"}, (1, 3, 4, 4)),
    ({"scale_factor": 1.7, "mode": "bilinear", "recompute_scale_factor": True}, (1, 1, 5, 6)),
    ({"scale_factor": 2, "mode": "trilinear", "align_corners": False}, (1, 2, 2, 3, 3)),
    ({"size": (3, 4, 5), "mode": "nearest-exact"}, (2, 1, 2, 2, 3)),
    ({"size": 3, "mode": "area"}, (1, 2, 7, 7)),
]
IDS = [str(kwargs) for kwargs, _ in CONFIGS]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kwargs", "shape"), CONFIGS, ids=IDS)
def test_forward_and_input_gradient_match_torch_nn_upsample(
    kwargs: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    ours = dp.sample(nn.UpSampleSpec(**kwargs))
    reference = torch.nn.Upsample(**kwargs)
    assert dp.flatten_parameters(ours) == []
    for name in ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor"):
        assert getattr(ours, name) == getattr(reference, name), name
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype)
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, expected = ours(x_ours), reference(x_ref)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    cotangent = torch.randn(out.shape, generator=g, dtype=dtype)
    (grad,) = dp.grad((out * cotangent).sum(), [x_ours])
    (expected_grad,) = torch.autograd.grad((expected * cotangent).sum(), [x_ref])
    torch.testing.assert_close(grad, expected_grad)


@settings(max_examples=40, deadline=None)
@given(
    dims=st.integers(1, 3),
    data=st.data(),
    use_size=st.booleans(),
    dtype=st.sampled_from(DTYPES),
)
def test_random_resizes_match_torch_nn_upsample(
    dims: int, data: st.DataObject, use_size: bool, dtype: torch.dtype
) -> None:
    interpolating = {1: "linear", 2: "bilinear", 3: "trilinear"}[dims]
    mode = data.draw(st.sampled_from(["nearest", "nearest-exact", "area", interpolating]))
    kwargs: dict[str, Any] = {"mode": mode}
    if use_size:
        kwargs["size"] = tuple(data.draw(st.integers(1, 8)) for _ in range(dims))
    else:
        kwargs["scale_factor"] = data.draw(st.floats(0.5, 3.0))
        if mode != "area":
            kwargs["recompute_scale_factor"] = data.draw(st.sampled_from([None, True, False]))
    if mode == interpolating:
        kwargs["align_corners"] = data.draw(st.sampled_from([None, True, False]))
    shape = (2, 2, *(data.draw(st.integers(2, 5)) for _ in range(dims)))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = nn.UpSample(**kwargs)(x_ours)
    expected = torch.nn.Upsample(**kwargs)(x_ref)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    (grad,) = dp.grad(out.pow(2).sum(), [x_ours])
    (expected_grad,) = torch.autograd.grad(expected.pow(2).sum(), [x_ref])
    torch.testing.assert_close(grad, expected_grad)


def test_pytorch_spelling_is_the_same_class() -> None:
    assert nn.Upsample is nn.UpSample
    assert nn.UpsampleSpec is nn.UpSampleSpec
    assert isinstance(dp.sample(nn.UpsampleSpec(scale_factor=2)), nn.UpSample)


def test_scale_factor_and_size_are_normalised_as_torch_does() -> None:
    up = nn.UpSample(size=[4, 5], scale_factor=None)  # type: ignore[arg-type]
    assert up.size == (4, 5)
    assert nn.UpSample(scale_factor=(2, 3)).scale_factor == (2.0, 3.0)
    assert type(nn.UpSample(scale_factor=2).scale_factor) is float


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of size and scale_factor"),
        ({"size": 4, "scale_factor": 2}, "exactly one of size and scale_factor"),
        ({"scale_factor": 2, "mode": "cubic"}, "mode must be one of"),
        ({"scale_factor": 2, "align_corners": True}, "align_corners can only be set"),
        ({"size": 2.5}, "size must be an int or a tuple of ints"),
    ],
)
def test_bad_arguments_are_rejected_when_the_layer_is_built(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        dp.sample(nn.UpSampleSpec(**kwargs))


def test_upsample_sits_in_a_decoder_with_a_conv() -> None:
    g = torch.Generator().manual_seed(0)
    up = nn.UpSample(scale_factor=2, mode="bilinear", align_corners=False)
    conv = dp.sample(nn.Conv2dSpec(4, 2, kernel_size=3, padding=1), generator=g)
    x = torch.randn(1, 4, 5, 5, generator=g)
    assert conv(up(x)).shape == (1, 2, 10, 10)
