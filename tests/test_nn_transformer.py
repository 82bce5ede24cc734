"""Transformer layers and stacks against torch.nn itself: init, forward, gradients, training."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import diffprog as dp
from diffprog import nn
from diffprog.nn import (
    LayerNormSpec,
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerDecoderLayerSpec,
    TransformerDecoderSpec,
    TransformerEncoder,
    TransformerEncoderLayer,
    TransformerEncoderLayerSpec,
    TransformerEncoderSpec,
    TransformerSpec,
    generate_square_subsequent_mask,
)
from diffprog.optim import Adam, run_step

DTYPES = [torch.float32, torch.float64]
D, HEADS, FF = 8, 2, 16
CONFIGS: list[dict[str, Any]] = [
    {},
    {"norm_first": True},
    {"activation": "gelu", "batch_first": True},
    {"activation": F.silu, "norm_first": True, "batch_first": True},
    {"bias": False, "layer_norm_eps": 1e-3},
]


def case_id(value: object) -> str:
    """A stable test id (no memory addresses, which differ between xdist workers)."""
    if isinstance(value, dict):
        parts = [f"{k}={getattr(v, '__name__', v)}" for k, v in value.items()]
        return ",".join(parts) or "defaults"
    return str(value)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-7, "atol": 1e-9}


def load_into(module: torch.nn.Module, model: Any) -> None:
    state = {name: p.detach().clone() for name, p in dp.named_parameters(model)}
    module.load_state_dict(state, strict=True)


def assert_same_init(ours: Any, reference: torch.nn.Module, dtype: torch.dtype) -> None:
    names = [name for name, _ in dp.named_parameters(ours)]
    assert names == [name for name, _ in reference.named_parameters()]
    assert names == list(reference.state_dict())  # no buffers either
    theirs = dict(reference.named_parameters())
    for name, p in dp.named_parameters(ours):
        assert p.dtype == dtype
        assert torch.equal(p, theirs[name]), name


def torch_encoder_layer(config: dict[str, Any], dtype: torch.dtype, **kw: Any) -> Any:
    return torch.nn.TransformerEncoderLayer(D, HEADS, FF, dtype=dtype, **config, **kw)


def torch_decoder_layer(config: dict[str, Any], dtype: torch.dtype, **kw: Any) -> Any:
    return torch.nn.TransformerDecoderLayer(D, HEADS, FF, dtype=dtype, **config, **kw)


def check_grads(
    ours: Any,
    reference: torch.nn.Module,
    out: torch.Tensor,
    ref_out: torch.Tensor,
    inputs: list[torch.Tensor],
    dtype: torch.dtype,
) -> None:
    assert_close(out, ref_out, **tol(dtype))
    probe = torch.randn(out.shape, dtype=dtype, generator=gen(9))
    ours_grads = dp.grad((out * probe).sum(), [*dp.flatten_parameters(ours), *inputs])
    theirs = [*reference.parameters(), *inputs]
    theirs_grads = torch.autograd.grad((ref_out * probe).sum(), theirs)
    assert len(ours_grads) == len(theirs_grads)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        assert_close(a, b, **tol(dtype))


def seq(length: int, n: int, batch_first: bool, dtype: torch.dtype, seed: int) -> torch.Tensor:
    shape = (n, length, D) if batch_first else (length, n, D)
    return torch.randn(shape, dtype=dtype, generator=gen(seed)).requires_grad_()


def padding(n: int, length: int) -> torch.Tensor:
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask[0, length - 2 :] = True
    return mask


# --- initialisation --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=case_id)
def test_layer_init_matches_torch_bit_for_bit(config: dict[str, Any], dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    reference = torch_encoder_layer(config, dtype)
    ours = dp.sample(
        TransformerEncoderLayerSpec(D, HEADS, FF, **config), generator=gen(5), dtype=dtype
    )
    assert_same_init(ours, reference, dtype)
    torch.manual_seed(6)
    reference = torch_decoder_layer(config, dtype)
    ours = dp.sample(
        TransformerDecoderLayerSpec(D, HEADS, FF, **config), generator=gen(6), dtype=dtype
    )
    assert_same_init(ours, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stack_init_matches_torch_bit_for_bit(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    layer = torch_encoder_layer({}, dtype)
    reference: torch.nn.Module = torch.nn.TransformerEncoder(
        layer, 3, norm=torch.nn.LayerNorm(D, dtype=dtype), enable_nested_tensor=False
    )
    spec = TransformerEncoderSpec(
        TransformerEncoderLayerSpec(D, HEADS, FF), 3, norm=LayerNormSpec(D)
    )
    ours = dp.sample(spec, generator=gen(2), dtype=dtype)
    assert_same_init(ours, reference, dtype)
    assert ours.num_layers == 3

    torch.manual_seed(3)
    reference = torch.nn.TransformerDecoder(torch_decoder_layer({}, dtype), 2)
    ours_dec = dp.sample(
        TransformerDecoderSpec(TransformerDecoderLayerSpec(D, HEADS, FF), 2),
        generator=gen(3),
        dtype=dtype,
    )
    assert_same_init(ours_dec, reference, dtype)
    assert ours_dec.num_layers == 2 and ours_dec.norm is None


def test_stack_layers_start_equal_but_are_not_tied() -> None:
    spec = TransformerEncoderSpec(TransformerEncoderLayerSpec(D, HEADS, FF), 2)
    encoder = dp.sample(spec, generator=gen(0))
    first, second = encoder.layers
    assert torch.equal(first.linear1.weight, second.linear1.weight)
    assert first.linear1.weight is not second.linear1.weight
    per_layer = len(dp.flatten_parameters(first))
    assert len(dp.flatten_parameters(encoder)) == 2 * per_layer


@pytest.mark.parametrize("config", CONFIGS, ids=case_id)
def test_meta_device_gives_shapes_only(config: dict[str, Any]) -> None:
    g = gen(1)
    before = g.get_state()
    ours = dp.sample(
        TransformerDecoderSpec(TransformerDecoderLayerSpec(D, HEADS, FF, **config), 2),
        generator=g,
        device="meta",
    )
    reference = torch.nn.TransformerDecoder(torch_decoder_layer(config, None, device="meta"), 2)
    assert torch.equal(g.get_state(), before)
    shapes = {name: p.shape for name, p in reference.named_parameters()}
    assert {name: p.shape for name, p in dp.named_parameters(ours)} == shapes
    assert all(p.is_meta for p in dp.flatten_parameters(ours))


# --- forward and gradients -------------------------------------------------------------------

ENCODER_MASKS = ["none", "bool", "float", "padding", "causal", "causal_padding"]


def encoder_masks(kind: str, length: int, n: int, dtype: torch.dtype) -> dict[str, Any]:
    g = gen(4)
    if kind == "none":
        return {}
    if kind == "bool":
        mask = torch.rand(length, length, generator=g) < 0.3
        mask.fill_diagonal_(False)
        return {"src_mask": mask}
    if kind == "float":
        return {"src_mask": torch.randn(length, length, generator=g, dtype=dtype)}
    if kind == "padding":
        return {"src_key_padding_mask": padding(n, length)}
    if kind == "causal":
        return {"src_mask": generate_square_subsequent_mask(length, dtype=dtype), "is_causal": True}
    if kind == "causal_padding":
        return {
            "src_mask": generate_square_subsequent_mask(length, dtype=torch.bool),
            "src_key_padding_mask": padding(n, length),
            "is_causal": True,
        }
    raise AssertionError(kind)


# Every mask with the default layer; two mask kinds with each other configuration.
ENCODER_CASES = [({}, mask) for mask in ENCODER_MASKS] + [
    (config, mask) for config in CONFIGS[1:] for mask in ("bool", "causal_padding")
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("config", "mask"), ENCODER_CASES, ids=case_id)
def test_encoder_layer_matches_torch(config: dict[str, Any], mask: str, dtype: torch.dtype) -> None:
    ours = dp.sample(
        TransformerEncoderLayerSpec(D, HEADS, FF, **config), generator=gen(1), dtype=dtype
    )
    reference = torch_encoder_layer(config, dtype).eval()
    load_into(reference, ours)
    batch_first = config.get("batch_first", False)
    src = seq(5, 3, batch_first, dtype, 2)
    kw = encoder_masks(mask, 5, 3, dtype)
    with nn.evaluating():  # torch's eval(), chosen explicitly: no ModeWarning
        out = ours(src, **kw)
    check_grads(ours, reference, out, reference(src, **kw), [src], dtype)


def test_encoder_layer_unbatched_matches_torch() -> None:
    dtype = torch.float64
    ours = dp.sample(TransformerEncoderLayerSpec(D, HEADS, FF), generator=gen(1), dtype=dtype)
    reference = torch_encoder_layer({}, dtype).eval()
    load_into(reference, ours)
    src = torch.randn(5, D, dtype=dtype, requires_grad=True)
    mask = generate_square_subsequent_mask(5, dtype=dtype)
    with nn.evaluating():
        out = ours(src, mask)
    check_grads(ours, reference, out, reference(src, mask), [src], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=case_id)
def test_decoder_layer_matches_torch(config: dict[str, Any], dtype: torch.dtype) -> None:
    ours = dp.sample(
        TransformerDecoderLayerSpec(D, HEADS, FF, **config), generator=gen(1), dtype=dtype
    )
    reference = torch_decoder_layer(config, dtype).eval()
    load_into(reference, ours)
    batch_first = config.get("batch_first", False)
    tgt, memory = seq(4, 3, batch_first, dtype, 2), seq(6, 3, batch_first, dtype, 3)
    memory_mask = torch.rand(4, 6, generator=gen(5)) < 0.3
    memory_mask[:, 0] = False
    cases: list[dict[str, Any]] = [
        {},
        {
            "tgt_mask": generate_square_subsequent_mask(4, dtype=dtype),
            "tgt_is_causal": True,
            "memory_key_padding_mask": torch.zeros(3, 6, dtype=dtype).masked_fill(
                padding(3, 6), -1e9
            ),
        },
        {
            "tgt_mask": generate_square_subsequent_mask(4, dtype=torch.bool),
            "memory_mask": memory_mask,
            "tgt_key_padding_mask": padding(3, 4),
            "memory_key_padding_mask": padding(3, 6),
        },
    ]
    for kw in cases:
        with nn.evaluating():
            out = ours(tgt, memory, **kw)
        ref_out = reference(tgt, memory, **kw)
        check_grads(ours, reference, out, ref_out, [tgt, memory], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first", [False, True])
def test_stacks_match_torch(norm_first: bool, dtype: torch.dtype) -> None:
    layer_kw = {"norm_first": norm_first, "batch_first": True}
    enc_spec = TransformerEncoderSpec(
        TransformerEncoderLayerSpec(D, HEADS, FF, **layer_kw), 2, norm=LayerNormSpec(D)
    )
    encoder = dp.sample(enc_spec, generator=gen(0), dtype=dtype)
    # Different weights per layer, to check that each layer's own are used.
    encoder = dp.replace_parameters(
        encoder,
        [dp.make_independent(torch.randn_like(p) * 0.3) for p in dp.flatten_parameters(encoder)],
    )
    ref_encoder = torch.nn.TransformerEncoder(
        torch_encoder_layer(layer_kw, dtype),
        2,
        norm=torch.nn.LayerNorm(D, dtype=dtype),
        enable_nested_tensor=False,
    ).eval()
    load_into(ref_encoder, encoder)
    src = seq(5, 2, True, dtype, 1)
    for kw in (
        {},
        {"mask": generate_square_subsequent_mask(5, dtype=dtype)},  # detected as causal
        {"mask": generate_square_subsequent_mask(5, dtype=torch.bool), "is_causal": True},
        {"src_key_padding_mask": padding(2, 5)},
    ):
        with nn.evaluating():
            out = encoder(src, **kw)
        check_grads(encoder, ref_encoder, out, ref_encoder(src, **kw), [src], dtype)

    dec_spec = TransformerDecoderSpec(
        TransformerDecoderLayerSpec(D, HEADS, FF, **layer_kw), 2, norm=LayerNormSpec(D)
    )
    decoder = dp.sample(dec_spec, generator=gen(1), dtype=dtype)
    ref_decoder = torch.nn.TransformerDecoder(
        torch_decoder_layer(layer_kw, dtype), 2, norm=torch.nn.LayerNorm(D, dtype=dtype)
    ).eval()
    load_into(ref_decoder, decoder)
    tgt, memory = seq(4, 2, True, dtype, 2), seq(6, 2, True, dtype, 3)
    kw = {
        "tgt_mask": generate_square_subsequent_mask(4, dtype=dtype),
        "memory_key_padding_mask": padding(2, 6).to(dtype) * -1e9,
    }
    with nn.evaluating():
        out = decoder(tgt, memory, **kw)
    ref_out = ref_decoder(tgt, memory, **kw)
    check_grads(decoder, ref_decoder, out, ref_out, [tgt, memory], dtype)


def torch_transformer(dtype: torch.dtype | None, **kw: Any) -> Any:
    with warnings.catch_warnings():  # torch's nested-tensor fast path notice
        warnings.simplefilter("ignore", UserWarning)
        return torch.nn.Transformer(D, HEADS, 2, 2, FF, dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [{}, {"norm_first": True, "batch_first": True}], ids=case_id)
def test_transformer_init_and_forward_match_torch(
    config: dict[str, Any], dtype: torch.dtype
) -> None:
    torch.manual_seed(4)
    reference = torch_transformer(dtype, **config)
    spec = TransformerSpec(D, HEADS, 2, 2, FF, **config)
    ours = dp.sample(spec, generator=gen(4), dtype=dtype)
    assert_same_init(ours, reference, dtype)
    # xavier re-initialises every matrix, so the layers of a stack differ (unlike the stacks)
    first, second = ours.encoder.layers
    assert not torch.equal(first.linear1.weight, second.linear1.weight)

    reference.eval()
    batch_first = config.get("batch_first", False)
    src, tgt = seq(6, 2, batch_first, dtype, 1), seq(4, 2, batch_first, dtype, 2)
    kw = {
        "tgt_mask": Transformer.generate_square_subsequent_mask(4, dtype=dtype),
        "src_key_padding_mask": padding(2, 6),
        "memory_key_padding_mask": padding(2, 6),
    }
    with nn.evaluating():
        out = ours(src, tgt, **kw)
    ref_out = reference(src, tgt, **kw)
    check_grads(ours, reference, out, ref_out, [src, tgt], dtype)


def test_transformer_meta_custom_parts_and_errors() -> None:
    g = gen(0)
    before = g.get_state()
    meta = dp.sample(TransformerSpec(D, HEADS, 2, 2, FF), generator=g, device="meta")
    assert torch.equal(g.get_state(), before)
    shapes = {n: p.shape for n, p in torch_transformer(None, device="meta").named_parameters()}
    assert {n: p.shape for n, p in dp.named_parameters(meta)} == shapes
    assert all(p.is_meta for p in dp.flatten_parameters(meta))

    custom = TransformerEncoderSpec(TransformerEncoderLayerSpec(D, HEADS, 4), 1)
    model = dp.sample(TransformerSpec(D, HEADS, 1, 1, FF, custom_encoder=custom))
    assert model.encoder.layers[0].linear1.weight.shape == (4, D)
    assert model.encoder.norm is None
    with pytest.raises(ValueError, match="batch number"):
        model(torch.randn(5, 2, D), torch.randn(3, 1, D))
    with pytest.raises(ValueError, match="d_model=8"):
        model(torch.randn(5, 2, D), torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="num_decoder_layers"):
        TransformerSpec(D, HEADS, num_decoder_layers=0)


# --- training mode ---------------------------------------------------------------------------


def test_training_mode_dropout_equals_torch_for_the_same_global_seed() -> None:
    dtype = torch.float64
    spec = TransformerEncoderLayerSpec(D, HEADS, FF, dropout=0.2)
    ours = dp.sample(spec, generator=gen(0), dtype=dtype)
    reference = torch_encoder_layer({"dropout": 0.2}, dtype).train()
    load_into(reference, ours)
    src = torch.randn(5, 3, D, dtype=dtype)
    pad = padding(3, 5)
    torch.manual_seed(1)
    expected = reference(src, src_key_padding_mask=pad)
    torch.manual_seed(1)
    got, same = nn.training(lambda m: m(src, src_key_padding_mask=pad), ours)
    assert_close(got, expected)
    assert same is ours  # no state to update
    with nn.evaluating():
        assert not torch.allclose(got, ours(src, src_key_padding_mask=pad))  # eval: no dropout

    dec = dp.sample(
        TransformerDecoderLayerSpec(D, HEADS, FF, dropout=0.2), generator=gen(0), dtype=dtype
    )
    ref_dec = torch_decoder_layer({"dropout": 0.2}, dtype).train()
    load_into(ref_dec, dec)
    memory = torch.randn(6, 3, D, dtype=dtype)
    torch.manual_seed(2)
    expected = ref_dec(src, memory)
    torch.manual_seed(2)
    assert_close(dec(src, memory, training=True), expected)


def test_training_with_a_generator_is_reproducible() -> None:
    encoder = dp.sample(
        TransformerEncoderSpec(TransformerEncoderLayerSpec(D, HEADS, FF, dropout=0.3), 2)
    )
    src = torch.randn(5, 2, D)

    def run(seed: int) -> torch.Tensor:
        out, _ = nn.training(lambda m: m(src), encoder, generator=gen(seed))
        return out

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    with nn.evaluating():
        assert not torch.allclose(run(3), encoder(src))


def test_a_transformer_layer_trains() -> None:
    spec = TransformerEncoderLayerSpec(D, HEADS, FF, dropout=0.1, batch_first=True, norm_first=True)
    model = dp.sample(spec, generator=gen(0))
    src = torch.randn(4, 6, D, generator=gen(1))
    # Each position's target mixes its own features with the sequence mean (attention's job).
    mixing = torch.randn(D, D, generator=gen(2)) / D**0.5
    target = torch.tanh(src @ mixing + src.mean(dim=1, keepdim=True))
    g = gen(3)

    def loss_fn(m: TransformerEncoderLayer) -> torch.Tensor:
        return F.mse_loss(m(src), target)

    with nn.evaluating():
        first = loss_fn(model).item()
    optimizer = Adam()
    for _ in range(25):
        loss, model = nn.training(loss_fn, model, generator=g)
        model, optimizer = run_step(model, optimizer, loss, 1e-2)
    with nn.evaluating():
        assert loss_fn(model).item() < 0.5 * first


# --- errors and values -----------------------------------------------------------------------


def test_spec_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="relu' or 'gelu"):
        TransformerEncoderLayerSpec(D, HEADS, activation="tanh")
    with pytest.raises(TypeError, match="callable"):
        TransformerDecoderLayerSpec(D, HEADS, activation=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        TransformerEncoderLayerSpec(6, 4)
    with pytest.raises(ValueError, match="greater than 0"):
        TransformerDecoderLayerSpec(8, 2, dim_feedforward=0)
    with pytest.raises(ValueError, match="dropout"):
        TransformerEncoderLayerSpec(8, 2, dropout=-0.1)
    with pytest.raises(ValueError, match="num_layers"):
        TransformerEncoderSpec(TransformerEncoderLayerSpec(8, 2), 0)
    with pytest.raises(ValueError, match="num_layers"):
        TransformerDecoderSpec(TransformerDecoderLayerSpec(8, 2), 0)


def test_activation_names_resolve_to_torchs_functions() -> None:
    relu = dp.sample(TransformerEncoderLayerSpec(8, 2, 8))
    gelu = dp.sample(TransformerDecoderLayerSpec(8, 2, 8, activation="gelu"))
    assert relu.activation is F.relu and gelu.activation is F.gelu


def test_layers_are_values() -> None:
    layer = dp.sample(TransformerDecoderLayerSpec(8, 2, 8, dropout=0.0))
    assert isinstance(layer, TransformerDecoderLayer)
    zeroed = dp.replace_parameters(
        layer, [dp.make_independent(torch.zeros_like(p)) for p in dp.flatten_parameters(layer)]
    )
    assert zeroed.norm_first is False and zeroed.activation is F.relu
    assert not torch.equal(zeroed.linear1.weight, layer.linear1.weight)
    encoder = dp.sample(TransformerEncoderSpec(TransformerEncoderLayerSpec(8, 2, 8), 1))
    assert isinstance(encoder, TransformerEncoder) and encoder.norm is None
    decoder = dp.sample(TransformerDecoderSpec(TransformerDecoderLayerSpec(8, 2, 8), 1))
    assert isinstance(decoder, TransformerDecoder)


# --- torch.nn's nested-tensor path (issue 8 item 8) ------------------------------------------

# The encoder-layer configurations: the default post-norm batch_first layer (torch converts to
# nested tensors), and each way torch.nn's TransformerEncoder.__init__ turns that path off.
NESTED_LAYERS: list[tuple[str, dict[str, Any], int]] = [
    ("nested", {"batch_first": True}, HEADS),
    ("gelu", {"batch_first": True, "activation": "gelu"}, HEADS),
    ("seq_first", {}, HEADS),
    ("norm_first", {"batch_first": True, "norm_first": True}, HEADS),
    ("silu", {"batch_first": True, "activation": F.silu}, HEADS),
    ("no_bias", {"batch_first": True, "bias": False}, HEADS),
    ("odd_heads", {"batch_first": True}, 1),
]


def _padding_masks(n: int, length: int) -> dict[str, torch.Tensor]:
    left = torch.zeros(n, length, dtype=torch.bool)
    left[0, 3:] = True
    left[1, 1:] = True
    all_padded = left.clone()
    all_padded[2] = True
    not_left = left.clone()
    not_left[2, 0] = True  # padding before a kept token
    soft = torch.zeros(n, length).masked_fill(left, float("-inf"))
    soft[2, -1] = -0.5  # a float mask's nonzero entries are padding to torch's nested path
    return {
        "left_aligned": left,
        "float_left_aligned": torch.zeros(n, length).masked_fill(left, float("-inf")),
        "all_padded_row": all_padded,
        "not_left_aligned": not_left,
        "float_soft": soft,
        "none_padded": torch.zeros(n, length, dtype=torch.bool),
    }


# Masks on which torch.nn's per-layer inference fast path (torch._transformer_encoder_layer_fwd,
# taken in eval mode without gradients) gives other values than its regular path: a fully padded
# sequence gives NaN, and a float padding mask's nonzero entries count as padding.
TORCH_FAST_PATH_QUIRKS = ("all_padded_row", "float_soft")


def _encoder_pair(
    config: dict[str, Any], heads: int, enable_nested_tensor: bool, with_norm: bool
) -> tuple[Any, torch.nn.TransformerEncoder]:
    layer_spec = TransformerEncoderLayerSpec(D, heads, FF, dropout=0.0, **config)
    norm = LayerNormSpec(D, bias=config.get("bias", True)) if with_norm else None
    spec = TransformerEncoderSpec(
        layer_spec, 2, norm=norm, enable_nested_tensor=enable_nested_tensor
    )
    ours = dp.sample(spec, generator=gen(0))
    # Distinct weights per layer and a norm bias that is not zero: norm(0) shows at padding.
    ours = dp.replace_parameters(
        ours, [dp.make_independent(torch.randn_like(p) * 0.5) for p in dp.flatten_parameters(ours)]
    )
    with warnings.catch_warnings():  # torch's notice that its nested path is off
        warnings.simplefilter("ignore", UserWarning)
        reference = torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(D, heads, FF, dropout=0.0, **config),
            2,
            norm=torch.nn.LayerNorm(D, bias=config.get("bias", True)) if with_norm else None,
            enable_nested_tensor=enable_nested_tensor,
        )
    load_into(reference, ours)
    return ours, reference


# torch warns once per process when it first builds a nested tensor.
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize(
    ("name", "config", "heads"), NESTED_LAYERS, ids=[c[0] for c in NESTED_LAYERS]
)
@pytest.mark.parametrize("enable_nested_tensor", [True, False], ids=["nested_on", "nested_off"])
@pytest.mark.parametrize("with_norm", [False, True], ids=["no_norm", "norm"])
def test_encoder_outputs_equal_torchs_nested_path_at_padded_positions(
    name: str, config: dict[str, Any], heads: int, enable_nested_tensor: bool, with_norm: bool
) -> None:
    """In eval mode without gradients torch.nn zeroes padded outputs (nested tensors): so do we.

    Every position is compared with torch.nn itself, for every padding mask, with and without
    gradients recorded (torch's path needs none), in training and eval mode.
    """
    ours, reference = _encoder_pair(config, heads, enable_nested_tensor, with_norm)
    frozen_ours = dp.replace_parameters(ours, [p.detach() for p in dp.flatten_parameters(ours)])
    frozen_ref = copy.deepcopy(reference).requires_grad_(False)
    batch_first = config.get("batch_first", False)
    src = torch.randn((3, 5, D) if batch_first else (5, 3, D), generator=gen(1))
    nested = name in ("nested", "gelu") and enable_nested_tensor
    for mask_name, pad in _padding_masks(3, 5).items():
        kw = {"src_key_padding_mask": pad}
        # Gradients recorded: torch's regular path, values at padded positions too.
        regular = reference.eval()(src, **kw)
        with nn.evaluating():
            got = ours(src, **kw)
        assert_close(got, regular, **tol(torch.float32), msg=mask_name)
        # torch.nn's per-layer inference fast path differs from its regular path on these
        # masks; diffprog follows the regular one (documented), unless the nested path (which
        # zeroes a fully padded sequence) is taken.
        quirk = mask_name in TORCH_FAST_PATH_QUIRKS and not nested
        with torch.no_grad(), nn.evaluating():
            got, expected = ours(src, **kw), reference.eval()(src, **kw)
        assert_close(got, regular if quirk else expected, **tol(torch.float32), msg=mask_name)
        # Nothing requires grad (frozen parameters, plain input): torch's path again.
        with nn.evaluating():
            got, expected = frozen_ours(src, **kw), frozen_ref.eval()(src, **kw)
        assert_close(got, regular if quirk else expected, **tol(torch.float32), msg=mask_name)
        # Training mode: the regular path (dropout=0, so the outputs are deterministic).
        with torch.no_grad():
            got, _ = nn.training(lambda m, kw: m(src, **kw), ours, kw)
        assert_close(got, reference.train()(src, **kw), **tol(torch.float32), msg=mask_name)


# torch warns once per process when it first builds a nested tensor.
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_the_nested_path_needs_no_src_mask_and_a_batched_input() -> None:
    ours, reference = _encoder_pair({"batch_first": True}, HEADS, True, False)
    reference.eval()
    pad = _padding_masks(3, 5)["left_aligned"]
    src = torch.randn(3, 5, D, generator=gen(2))
    causal = generate_square_subsequent_mask(5, dtype=torch.bool)
    with torch.no_grad(), nn.evaluating():
        got = ours(src, mask=causal, src_key_padding_mask=pad)  # a src mask: regular path
        assert_close(got, reference(src, mask=causal, src_key_padding_mask=pad))
        assert got[pad].abs().amax() > 0
        got = ours(src, src_key_padding_mask=pad)  # nested path: zero at padding
        assert_close(got, reference(src, src_key_padding_mask=pad))
        assert torch.equal(got[pad], torch.zeros_like(got[pad]))
        unbatched = ours(src[0], src_key_padding_mask=pad[0])  # unbatched: regular path
        assert_close(unbatched, reference(src[0], src_key_padding_mask=pad[0]))
        assert unbatched[pad[0]].abs().amax() > 0
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), nn.evaluating():
            got = ours(src, src_key_padding_mask=pad)
            assert_close(got, reference(src, src_key_padding_mask=pad))
            assert got[pad].abs().amax() > 0  # torch's path turned off: values at padding
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


# torch warns once per process when it first builds a nested tensor.
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_transformer_memory_at_padding_equals_torchs_without_a_memory_mask() -> None:
    """torch.nn.Transformer's encoder takes the nested path too: its decoder sees that memory."""
    config = {"batch_first": True, "dropout": 0.0}
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = torch.nn.Transformer(D, HEADS, 2, 1, FF, **config).eval()
    ours = dp.sample(TransformerSpec(D, HEADS, 2, 1, FF, **config), generator=gen(3))
    load_into(reference, ours)
    src, tgt = torch.randn(3, 5, D, generator=gen(4)), torch.randn(3, 4, D, generator=gen(5))
    pad = _padding_masks(3, 5)["left_aligned"]
    with torch.no_grad(), nn.evaluating():
        got = ours(src, tgt, src_key_padding_mask=pad)
        assert_close(got, reference(src, tgt, src_key_padding_mask=pad))
        with_grad_path = ours(src, tgt, src_key_padding_mask=pad, memory_key_padding_mask=pad)
        assert_close(
            with_grad_path,
            reference(src, tgt, src_key_padding_mask=pad, memory_key_padding_mask=pad),
        )


def test_torchs_layer_fast_path_quirks_are_not_reproduced() -> None:
    """Pins the documented difference: diffprog computes torch.nn's regular path there.

    torch.nn's eval-mode layer fast path gives NaN for a fully padded sequence and treats a
    float padding mask's nonzero entries as padding; diffprog gives, in every mode, what
    torch.nn gives with gradients recorded or in training mode.
    """
    ours, reference = _encoder_pair({"batch_first": True}, HEADS, False, False)
    layer, ref_layer = ours.layers[0], reference.layers[0].eval()
    src = torch.randn(3, 5, D, generator=gen(6))
    masks = _padding_masks(3, 5)
    for mask_name in TORCH_FAST_PATH_QUIRKS:
        pad = masks[mask_name]
        regular = ref_layer(src, src_key_padding_mask=pad)  # gradients recorded
        with torch.no_grad():
            fast = ref_layer(src, src_key_padding_mask=pad)
            with nn.evaluating():
                got = layer(src, src_key_padding_mask=pad)
        assert_close(got, regular, **tol(torch.float32), msg=mask_name)
        assert not torch.allclose(fast[2], regular[2], equal_nan=False), mask_name
    assert torch.isfinite(got).all()
