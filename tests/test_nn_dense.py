"""Dense layers (Linear, Identity) against torch.nn itself."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
from diffprog import nn

DTYPES = [torch.float32, torch.float64]
CONFIGS = [
    (3, 2, True),
    (1, 1, True),
    (16, 5, False),
    (7, 33, True),
    # an empty layer: torch.nn.init warns (for both), and the draw is a no-op
    pytest.param(4, 0, True, marks=pytest.mark.filterwarnings("ignore:Initializing zero-element")),
]


def _pair(
    in_features: int, out_features: int, bias: bool, dtype: torch.dtype, seed: int
) -> tuple[nn.Linear, torch.nn.Linear]:
    torch.manual_seed(seed)
    reference = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    spec = nn.LinearSpec(in_features, out_features, bias=bias)
    ours = dp.sample(spec, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return ours, reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("in_features", "out_features", "bias"), CONFIGS)
def test_sample_equals_torch_nn_linear_bit_for_bit(
    in_features: int, out_features: int, bias: bool, dtype: torch.dtype
) -> None:
    for seed in (0, 1, 1234):
        ours, reference = _pair(in_features, out_features, bias, dtype, seed)
        named = dp.named_parameters(ours)
        assert [k for k, _ in named] == list(reference.state_dict())
        for (_, p), q in zip(named, reference.parameters(), strict=True):
            assert type(p) is dp.Parameter
            assert p.dtype == dtype
            assert torch.equal(p, q)
        assert ours.in_features == reference.in_features
        assert ours.out_features == reference.out_features


def test_sample_with_the_global_generator_follows_torch_manual_seed() -> None:
    torch.manual_seed(3)
    reference = torch.nn.Linear(5, 4)
    torch.manual_seed(3)
    ours = dp.sample(nn.LinearSpec(5, 4))
    assert torch.equal(ours.weight, reference.weight)
    assert ours.bias is not None
    assert torch.equal(ours.bias, reference.bias)


@pytest.mark.parametrize(("in_features", "out_features", "bias"), CONFIGS[:3])
def test_meta_device_gives_shapes_without_data(
    in_features: int, out_features: int, bias: bool
) -> None:
    ours = dp.sample(nn.LinearSpec(in_features, out_features, bias), device="meta")
    reference = torch.nn.Linear(in_features, out_features, bias, device="meta")
    for (k, p), (k_ref, q) in zip(
        dp.named_parameters(ours), reference.named_parameters(), strict=True
    ):
        assert k == k_ref
        assert p.is_meta
        assert p.shape == q.shape


@settings(max_examples=40, deadline=None)
@given(
    in_features=st.integers(1, 8),
    out_features=st.integers(1, 8),
    bias=st.booleans(),
    batch=st.lists(st.integers(1, 3), max_size=3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_forward_and_gradients_match_torch_nn_linear(
    in_features: int,
    out_features: int,
    bias: bool,
    batch: list[int],
    dtype: torch.dtype,
    seed: int,
) -> None:
    ours, reference = _pair(in_features, out_features, bias, dtype, seed)
    reference.load_state_dict({k: v.detach() for k, v in dp.named_parameters(ours)})
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*batch, in_features, generator=g, dtype=dtype)
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, expected = ours(x_ours), reference(x_ref)
    torch.testing.assert_close(out, expected)
    cotangent = torch.randn(out.shape, generator=g, dtype=dtype)
    named = dp.named_parameters(ours)
    grads = dp.grad((out * cotangent).sum(), [x_ours, *(p for _, p in named)])
    ref_params = dict(reference.named_parameters())
    expected_grads = torch.autograd.grad(
        (expected * cotangent).sum(), [x_ref, *(ref_params[k] for k, _ in named)]
    )
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_linear_without_bias_has_only_a_weight() -> None:
    layer = dp.sample(nn.LinearSpec(3, 2, bias=False))
    assert layer.bias is None
    assert [k for k, _ in dp.named_parameters(layer)] == ["weight"]


def test_identity_returns_its_input_and_has_no_parameters() -> None:
    identity = dp.sample(nn.IdentitySpec(), generator=torch.Generator(), dtype=torch.float64)
    x = torch.randn(2, 3, requires_grad=True)
    assert identity(x) is x
    assert identity(x) is torch.nn.Identity(54, unused="argument")(x)
    assert dp.flatten_parameters(identity) == []
    assert dp.named_parameters(identity) == []
    assert dp.replace_parameters(identity, []) is identity


def test_identity_sits_in_a_model_where_a_layer_is_expected() -> None:
    class Head(dp.Parameterized):
        proj: nn.Linear | nn.Identity

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    with_proj = Head(dp.sample(nn.LinearSpec(4, 4)))
    without = Head(nn.Identity())
    x = torch.randn(2, 4)
    assert with_proj(x).shape == without(x).shape
    assert len(dp.flatten_parameters(without)) == 0


def test_linear_built_from_tensors_checks_their_shapes() -> None:
    weight = dp.make_independent(torch.zeros(2, 3))
    assert nn.Linear(weight).in_features == 3
    with pytest.raises(
        ValueError, match=r"weight must be a 2-d tensor \[out_features, in_features\]"
    ):
        nn.Linear(dp.make_independent(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        nn.Linear(weight, dp.make_independent(torch.zeros(3)))
