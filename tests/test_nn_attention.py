"""MultiheadAttention against torch.nn.MultiheadAttention itself: init, outputs, gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import diffprog as dp
from diffprog import nn
from diffprog.nn import MultiheadAttention, MultiheadAttentionSpec, generate_square_subsequent_mask

DTYPES = [torch.float32, torch.float64]
CONFIGS: list[dict[str, Any]] = [
    {},
    {"bias": False},
    {"add_bias_kv": True},
    {"add_zero_attn": True},
    {"add_bias_kv": True, "add_zero_attn": True, "bias": False},
    {"kdim": 3, "vdim": 5},
    {"kdim": 3, "vdim": 5, "add_bias_kv": True},
]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-7, "atol": 1e-9}


def torch_layer(seed: int, dtype: torch.dtype, *args: Any, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.MultiheadAttention(*args, **kwargs, dtype=dtype)


def load_into(module: torch.nn.Module, model: Any) -> None:
    state = {name: p.detach().clone() for name, p in dp.named_parameters(model)}
    module.load_state_dict(state, strict=True)


def param_grads(model: Any, loss: torch.Tensor, extra: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(dp.grad(loss, [*dp.flatten_parameters(model), *extra]))


def leaf(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=gen(seed)).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_init_matches_torch_bit_for_bit(config: dict[str, Any], dtype: torch.dtype) -> None:
    reference = torch_layer(7, dtype, 8, 2, **config)
    ours = dp.sample(MultiheadAttentionSpec(8, 2, **config), generator=gen(7), dtype=dtype)
    names = [name for name, _ in dp.named_parameters(ours)]
    assert names == [name for name, _ in reference.named_parameters()]
    theirs = dict(reference.named_parameters())
    for name, p in dp.named_parameters(ours):
        assert p.dtype == dtype
        assert torch.equal(p, theirs[name]), name


def test_init_from_global_generator_matches_torch() -> None:
    reference = torch_layer(3, torch.float32, 6, 3, add_bias_kv=True)
    torch.manual_seed(3)
    ours = dp.sample(MultiheadAttentionSpec(6, 3, add_bias_kv=True))
    for (_, a), (_, b) in zip(dp.named_parameters(ours), reference.named_parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_meta_device_gives_shapes_only(config: dict[str, Any]) -> None:
    g = gen(1)
    before = g.get_state()
    ours = dp.sample(MultiheadAttentionSpec(8, 4, **config), generator=g, device="meta")
    reference = torch.nn.MultiheadAttention(8, 4, **config, device="meta")
    assert torch.equal(g.get_state(), before)  # nothing drawn
    shapes = {name: p.shape for name, p in reference.named_parameters()}
    assert {name: p.shape for name, p in dp.named_parameters(ours)} == shapes
    assert all(p.is_meta for p in dp.flatten_parameters(ours))
    assert (ours.embed_dim, ours.head_dim) == (8, 2)
    assert (ours.kdim, ours.vdim) == (config.get("kdim", 8), config.get("vdim", 8))


def _masks(kind: str, dtype: torch.dtype, n: int, heads: int, lq: int, lk: int) -> dict[str, Any]:
    """attn_mask / key_padding_mask / is_causal for a mask scenario (no fully masked rows)."""
    g = gen(11)
    bool_mask = torch.rand(lq, lk, generator=g) < 0.3
    bool_mask[:, 0] = False
    padding = torch.zeros(n, lk, dtype=torch.bool)
    padding[0, lk - 2 :] = True
    if kind == "none":
        return {}
    if kind == "bool":
        return {"attn_mask": bool_mask}
    if kind == "float":
        return {"attn_mask": torch.randn(lq, lk, generator=g, dtype=dtype)}
    if kind == "3d":
        return {"attn_mask": torch.randn(n * heads, lq, lk, generator=g, dtype=dtype)}
    if kind == "padding":
        return {"key_padding_mask": padding}
    if kind == "padding_float":
        return {"key_padding_mask": torch.zeros(n, lk, dtype=dtype).masked_fill(padding, -1e4)}
    if kind == "both":
        return {"attn_mask": bool_mask, "key_padding_mask": padding}
    if kind == "causal":
        return {"attn_mask": generate_square_subsequent_mask(lq, dtype=dtype), "is_causal": True}
    if kind == "causal_padding":
        return {
            "attn_mask": generate_square_subsequent_mask(lq, dtype=torch.bool),
            "key_padding_mask": padding,
            "is_causal": True,
        }
    raise AssertionError(kind)


MASKS = ["none", "bool", "float", "3d", "padding", "padding_float", "both", "causal"]


def _compare(
    config: dict[str, Any],
    dtype: torch.dtype,
    *,
    batch_first: bool,
    need_weights: bool,
    mask: str,
    average: bool = True,
    self_attention: bool = True,
    batched: bool = True,
    heads: int = 2,
) -> None:
    E, n, lq = 8, 3, 5
    kdim, vdim = config.get("kdim", E), config.get("vdim", E)
    self_attention = self_attention and kdim == E and vdim == E
    lk = lq if self_attention or mask.startswith("causal") else 6
    spec = MultiheadAttentionSpec(E, heads, batch_first=batch_first, **config)
    ours = dp.sample(spec, generator=gen(5), dtype=dtype)
    reference = torch.nn.MultiheadAttention(
        E, heads, batch_first=batch_first, **config, dtype=dtype
    )
    load_into(reference, ours)
    reference.eval()

    def shaped(length: int, dim: int, seed: int) -> torch.Tensor:
        if not batched:
            return leaf((length, dim), dtype, seed)
        return leaf((n, length, dim) if batch_first else (length, n, dim), dtype, seed)

    query = shaped(lq, E, 1)
    if self_attention:
        key = value = query
    else:
        key, value = shaped(lk, kdim, 2), shaped(lk, vdim, 3)
    kw = _masks(mask, dtype, n, heads, lq, lk)
    if not batched and "key_padding_mask" in kw:
        kw["key_padding_mask"] = kw["key_padding_mask"][0]
    kw.update(need_weights=need_weights, average_attn_weights=average)
    out, weights = ours(query, key, value, **kw)
    ref_out, ref_weights = reference(query, key, value, **kw)
    assert_close(out, ref_out, **tol(dtype))
    if need_weights:
        assert weights is not None and ref_weights is not None
        assert_close(weights, ref_weights, **tol(dtype))
    else:
        assert weights is None and ref_weights is None

    inputs = [query] if self_attention else [query, key, value]
    probe = torch.randn(out.shape, dtype=dtype, generator=gen(9))
    ours_grads = param_grads(ours, (out * probe).sum(), inputs)
    theirs_params = list(reference.parameters())
    theirs_grads = torch.autograd.grad((ref_out * probe).sum(), [*theirs_params, *inputs])
    assert len(ours_grads) == len(theirs_grads)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        assert_close(a, b, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_forward_and_gradients_match_torch_with_masks(
    mask: str, need_weights: bool, dtype: torch.dtype
) -> None:
    _compare({}, dtype, batch_first=False, need_weights=need_weights, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("batch_first", [False, True])
def test_forward_and_gradients_match_torch_per_config(
    config: dict[str, Any], batch_first: bool, dtype: torch.dtype
) -> None:
    for need_weights in (True, False):
        _compare(
            config,
            dtype,
            batch_first=batch_first,
            need_weights=need_weights,
            mask="both",
            self_attention=False,
        )
    _compare(config, dtype, batch_first=batch_first, need_weights=True, mask="none")


@pytest.mark.parametrize("mask", ["none", "padding", "causal_padding", "3d", "causal"])
def test_per_head_weights_cross_attention_and_odd_heads(mask: str) -> None:
    for heads in (1, 4):
        _compare(
            {},
            torch.float64,
            batch_first=True,
            need_weights=True,
            mask=mask,
            average=False,
            self_attention=False,
            heads=heads,
        )


@pytest.mark.parametrize("mask", ["none", "bool", "padding", "causal"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_unbatched_inputs_match_torch(mask: str, need_weights: bool) -> None:
    for batch_first in (False, True):
        _compare(
            {"add_bias_kv": True},
            torch.float64,
            batch_first=batch_first,
            need_weights=need_weights,
            mask=mask,
            batched=False,
        )


def _trained_pair(p: float, dtype: torch.dtype = torch.float64) -> tuple[Any, torch.nn.Module]:
    ours = dp.sample(MultiheadAttentionSpec(8, 2, dropout=p), generator=gen(0), dtype=dtype)
    reference = torch.nn.MultiheadAttention(8, 2, dropout=p, dtype=dtype)
    load_into(reference, ours)
    return ours, reference.train()


@pytest.mark.parametrize("need_weights", [True, False])
def test_training_dropout_equals_torch_for_the_same_global_seed(need_weights: bool) -> None:
    ours, reference = _trained_pair(0.3)
    x = torch.randn(5, 2, 8, dtype=torch.float64, generator=gen(1))
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    torch.manual_seed(4)
    expected = reference(x, x, x, key_padding_mask=padding, need_weights=need_weights)
    torch.manual_seed(4)
    got = ours(x, x, x, key_padding_mask=padding, need_weights=need_weights, training=True)
    assert_close(got[0], expected[0])
    torch.manual_seed(4)
    got_in_pass, _ = nn.training(
        lambda m: m(x, x, x, key_padding_mask=padding, need_weights=need_weights), ours
    )
    assert_close(got_in_pass[0], expected[0])
    with nn.evaluating():
        evaluated = ours(x, x, x, key_padding_mask=padding)[0]
    assert not torch.allclose(got[0], evaluated)  # it dropped


def test_training_dropout_with_a_generator_draws_torchs_mask() -> None:
    # With a generator the weights are computed explicitly and the mask drawn as ATen's CPU
    # dropout draws it, so a generator seeded s gives torch's mask for torch.manual_seed(s).
    ours, reference = _trained_pair(0.4)
    x = torch.randn(5, 3, 8, dtype=torch.float64, generator=gen(2))
    torch.manual_seed(8)
    expected_out, expected_w = reference(x, x, x, average_attn_weights=False)
    got_out, got_w = ours(x, x, x, average_attn_weights=False, training=True, generator=gen(8))
    assert_close(got_out, expected_out)
    assert_close(got_w, expected_w)
    # need_weights=False: same explicit computation, same mask, no weights returned.
    (lean_out, none), _ = nn.training(
        lambda m: m(x, x, x, need_weights=False), ours, generator=gen(8)
    )
    assert none is None
    assert_close(lean_out, expected_out)


def test_eval_mode_ignores_dropout_and_never_draws() -> None:
    ours, _ = _trained_pair(0.5)
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    g = gen(0)
    before = g.get_state()
    with nn.evaluating():
        a = ours(x, x, x, generator=g)[0]
    b = ours(x, x, x, training=False, generator=g)[0]
    assert torch.equal(a, b)
    assert torch.equal(g.get_state(), before)


def test_the_layer_is_a_value() -> None:
    ours = dp.sample(MultiheadAttentionSpec(4, 2))
    params = dp.flatten_parameters(ours)
    rebuilt = dp.replace_parameters(ours, [dp.make_independent(p * 0) for p in params])
    assert isinstance(rebuilt, MultiheadAttention)
    assert rebuilt.num_heads == 2 and rebuilt.batch_first is False
    x = torch.randn(3, 1, 4)
    assert torch.equal(rebuilt(x, x, x)[0], torch.zeros(3, 1, 4))
    assert not torch.equal(ours(x, x, x)[0], torch.zeros(3, 1, 4))


@given(
    heads=st.sampled_from([1, 2, 4]),
    lq=st.integers(1, 5),
    lk=st.integers(1, 5),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_weights_are_distributions_that_ignore_padding(
    heads: int, lq: int, lk: int, n: int, seed: int
) -> None:
    mha = dp.sample(MultiheadAttentionSpec(8, heads, batch_first=True), generator=gen(seed))
    g = gen(seed + 1)
    q, kv = torch.randn(n, lq, 8, generator=g), torch.randn(n, lk, 8, generator=g)
    padding = torch.rand(n, lk, generator=g) < 0.5
    padding[:, 0] = False
    with torch.no_grad():
        out, weights = mha(q, kv, kv, key_padding_mask=padding, average_attn_weights=False)
    assert weights is not None
    assert out.shape == (n, lq, 8) and weights.shape == (n, heads, lq, lk)
    assert_close(weights.sum(-1), torch.ones(n, heads, lq))
    assert bool((weights.masked_select(padding[:, None, None, :]) == 0).all())


def test_spec_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttentionSpec(10, 3)
    with pytest.raises(ValueError, match="greater than 0"):
        MultiheadAttentionSpec(0, 1)
    with pytest.raises(ValueError, match="dropout"):
        MultiheadAttentionSpec(4, 2, dropout=1.5)


def test_forward_errors_name_the_problem() -> None:
    mha = dp.sample(MultiheadAttentionSpec(4, 2))
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="needs attn_mask"):
        mha(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="2-D attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="3-D attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool and floating point"):
        mha(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="embed_dim is 4"):
        mha(torch.randn(3, 2, 5), x, x)
    with pytest.raises(ValueError, match="2-D .unbatched. or 3-D"):
        mha(torch.randn(3), x, x)
    with pytest.raises(ValueError, match="key and value must be 3-D"):
        mha(x, x[0], x)
    with pytest.raises(ValueError, match="same sequence length"):
        mha(x, x, x[:2])


def test_direct_construction_is_checked() -> None:
    out_proj = dp.sample(nn.LinearSpec(4, 4))
    w = dp.make_independent(torch.zeros(12, 4))
    with pytest.raises(ValueError, match="needs in_proj_weight"):
        MultiheadAttention(out_proj=out_proj, num_heads=2)
    with pytest.raises(ValueError, match="together"):
        MultiheadAttention(
            in_proj_weight=w,
            bias_k=dp.make_independent(torch.zeros(1, 1, 4)),
            out_proj=out_proj,
            num_heads=2,
        )
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(in_proj_weight=w, out_proj=out_proj, num_heads=3)


def test_causal_mask_equals_torchs() -> None:
    for dtype in (torch.float32, torch.float64, torch.bool):
        expected = torch.nn.Transformer.generate_square_subsequent_mask(4, dtype=dtype)
        assert torch.equal(generate_square_subsequent_mask(4, dtype=dtype), expected)
