"""``diffprog.nn.from_torch`` against torch.nn itself: every supported type, its parameters and
buffers, its outputs in eval and train mode (running-statistics updates and dropout masks
included, with the same global seed), its gradients; ties; the error paths."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import diffprog as dp
from diffprog import nn
from diffprog._frozen import Frozen
from diffprog.nn._from_torch import BUILTIN_TYPES, PARAMETER_FREE

tnn = torch.nn

# torch notes that its LSTM kernel with projections is not the oneDNN one
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")


def x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dp_state(model: Any) -> dict[str, torch.Tensor]:
    """Every tensor leaf of a diffprog value by its state-dict key, in order."""
    return {path: leaf for path, leaf in dp.walk(model) if isinstance(leaf, torch.Tensor)}


def randomise(module: tnn.Module, seed: int = 1) -> tnn.Module:
    """Random parameters and running statistics, so that a copy that drops any shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif name.endswith("num_batches_tracked"):
                b.fill_(3)
    return module


def call(model: Any, *inputs: Any) -> Any:
    return model(*inputs)


def call_each(model: Any, *inputs: Any) -> Any:
    """A ModuleList / ModuleDict (a list / dict here): each part on the input."""
    parts = model.values() if isinstance(model, (dict, tnn.ModuleDict)) else model
    return tuple(part(*inputs) for part in parts)


def assert_tree_equal(ours: Any, theirs: Any) -> None:
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor)
        assert ours.dtype == theirs.dtype
        assert_close(ours, theirs, rtol=0, atol=0)
    elif isinstance(theirs, (tuple, list)):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert_tree_equal(a, b)
    else:
        assert ours == theirs


Case = tuple[str, Callable[[], tnn.Module], Callable[[], tuple[Any, ...]], Callable[..., Any]]
CASES: list[Case] = []


def case(
    name: str,
    build: Callable[[], tnn.Module],
    inputs: Callable[[], tuple[Any, ...]],
    fn: Callable[..., Any] = call,
) -> None:
    CASES.append((name, build, inputs, fn))


def seq_batch(n: int = 5) -> tuple[Any, ...]:
    return (x(n, 2, 8),)


case("Identity", tnn.Identity, lambda: (x(2, 3),))
case("Linear", lambda: tnn.Linear(3, 4), lambda: (x(2, 3),))
case("Linear-nobias", lambda: tnn.Linear(3, 4, bias=False), lambda: (x(2, 3),))
case(
    "Embedding-padding",
    lambda: tnn.Embedding(6, 3, padding_idx=1),
    lambda: (torch.tensor([[0, 1, 5], [2, 2, 1]]),),
)
case(
    "Embedding-max_norm",
    lambda: tnn.Embedding(6, 3, max_norm=0.5),
    lambda: (torch.tensor([[0, 1, 5], [2, 2, 1]]),),
)
for _n in (1, 2, 3):
    _sp = (6,) * _n
    case(
        f"Conv{_n}d",
        lambda n=_n: getattr(tnn, f"Conv{n}d")(4, 6, 3, stride=2, padding=1, groups=2),
        lambda sp=_sp: (x(2, 4, *sp),),
    )
    case(
        f"Conv{_n}d-same-reflect-nobias",
        lambda n=_n: getattr(tnn, f"Conv{n}d")(
            2, 3, 3, padding="same", dilation=2, bias=False, padding_mode="reflect"
        ),
        lambda sp=_sp: (x(2, 2, *sp),),
    )
    case(
        f"ConvTranspose{_n}d",
        lambda n=_n: getattr(tnn, f"ConvTranspose{n}d")(
            4, 6, 3, stride=2, padding=1, output_padding=1, groups=2
        ),
        lambda sp=_sp: (x(2, 4, *sp),),
    )
    case(
        f"BatchNorm{_n}d",
        lambda n=_n: getattr(tnn, f"BatchNorm{n}d")(3),
        lambda n=_n: (x(4, 3, *(3,) * n) if n > 1 else x(4, 3),),
    )
    case(
        f"BatchNorm{_n}d-momentum=None-noaffine",
        lambda n=_n: getattr(tnn, f"BatchNorm{n}d")(3, momentum=None, affine=False),
        lambda n=_n: (x(4, 3, *(3,) * n),),
    )
    case(
        f"BatchNorm{_n}d-notrack",
        lambda n=_n: getattr(tnn, f"BatchNorm{n}d")(3, track_running_stats=False),
        lambda n=_n: (x(4, 3, *(3,) * n),),
    )
    case(
        f"InstanceNorm{_n}d",
        lambda n=_n: getattr(tnn, f"InstanceNorm{n}d")(3),
        lambda n=_n: (x(2, 3, *(4,) * n),),
    )
    case(
        f"InstanceNorm{_n}d-affine-track",
        lambda n=_n: getattr(tnn, f"InstanceNorm{n}d")(3, affine=True, track_running_stats=True),
        lambda n=_n: (x(2, 3, *(4,) * n),),
    )
case("LayerNorm", lambda: tnn.LayerNorm((2, 3), eps=1e-3), lambda: (x(4, 2, 3),))
case("LayerNorm-nobias", lambda: tnn.LayerNorm(3, bias=False), lambda: (x(4, 3),))
case("LayerNorm-noaffine", lambda: tnn.LayerNorm(3, elementwise_affine=False), lambda: (x(4, 3),))
case("GroupNorm", lambda: tnn.GroupNorm(2, 4), lambda: (x(3, 4, 5),))
case("GroupNorm-noaffine", lambda: tnn.GroupNorm(2, 4, affine=False), lambda: (x(3, 4, 5),))
case("RMSNorm", lambda: tnn.RMSNorm(3, eps=1e-4), lambda: (x(4, 3),))
case(
    "RMSNorm-noaffine", lambda: tnn.RMSNorm((2, 3), elementwise_affine=False), lambda: (x(4, 2, 3),)
)
case("Dropout", lambda: tnn.Dropout(0.3), lambda: (x(4, 5),))
case("Dropout1d", lambda: tnn.Dropout1d(0.3), lambda: (x(4, 5, 3),))
case("Dropout2d", lambda: tnn.Dropout2d(0.3), lambda: (x(4, 5, 3, 3),))
case("Dropout3d", lambda: tnn.Dropout3d(0.3), lambda: (x(4, 5, 2, 3, 3),))
case("AlphaDropout", lambda: tnn.AlphaDropout(0.3), lambda: (x(4, 5),))
case("FeatureAlphaDropout", lambda: tnn.FeatureAlphaDropout(0.3), lambda: (x(4, 5, 3, 3),))
case("Upsample", lambda: tnn.Upsample(scale_factor=2, mode="bilinear"), lambda: (x(1, 2, 3, 3),))
case("Upsample-size", lambda: tnn.Upsample(size=5), lambda: (x(1, 2, 3),))
case(
    "UpsamplingNearest2d", lambda: tnn.UpsamplingNearest2d(scale_factor=2), lambda: (x(1, 2, 3, 3),)
)
case(
    "UpsamplingBilinear2d", lambda: tnn.UpsamplingBilinear2d(size=(5, 4)), lambda: (x(1, 2, 3, 3),)
)
for _rnn in ("RNN", "LSTM", "GRU"):
    case(
        f"{_rnn}",
        lambda r=_rnn: getattr(tnn, r)(3, 4),
        lambda: (x(5, 2, 3),),
    )
    case(
        f"{_rnn}-2layers-bidirectional-batch_first-dropout",
        lambda r=_rnn: getattr(tnn, r)(3, 4, 2, batch_first=True, bidirectional=True, dropout=0.3),
        lambda: (x(2, 5, 3),),
    )
    case(
        f"{_rnn}-3layers-nobias-with-state",
        lambda r=_rnn: getattr(tnn, r)(3, 4, 3, bias=False),
        lambda r=_rnn: (
            x(5, 2, 3),
            (x(3, 2, 4, seed=1), x(3, 2, 4, seed=2)) if r == "LSTM" else x(3, 2, 4, seed=1),
        ),
    )
case("RNN-relu", lambda: tnn.RNN(3, 4, nonlinearity="relu"), lambda: (x(5, 2, 3),))
case("LSTM-proj", lambda: tnn.LSTM(3, 4, 2, proj_size=2, bidirectional=True), lambda: (x(5, 2, 3),))
for _cell in ("RNNCell", "LSTMCell", "GRUCell"):
    case(_cell, lambda c=_cell: getattr(tnn, c)(3, 4), lambda: (x(2, 3),))
    case(f"{_cell}-nobias", lambda c=_cell: getattr(tnn, c)(3, 4, bias=False), lambda: (x(2, 3),))
case("RNNCell-relu", lambda: tnn.RNNCell(3, 4, nonlinearity="relu"), lambda: (x(2, 3),))
case(
    "MultiheadAttention",
    lambda: tnn.MultiheadAttention(8, 2, dropout=0.2),
    lambda: (x(5, 2, 8), x(6, 2, 8, seed=1), x(6, 2, 8, seed=2)),
)
case(
    "MultiheadAttention-kdim-vdim-bias_kv-zero_attn-batch_first",
    lambda: tnn.MultiheadAttention(
        8, 2, kdim=3, vdim=5, add_bias_kv=True, add_zero_attn=True, batch_first=True
    ),
    lambda: (x(2, 5, 8), x(2, 6, 3, seed=1), x(2, 6, 5, seed=2)),
)
case(
    "MultiheadAttention-nobias",
    lambda: tnn.MultiheadAttention(8, 2, bias=False),
    lambda: (x(5, 2, 8), x(5, 2, 8, seed=1), x(5, 2, 8, seed=2)),
)
for _kw in [
    {},
    {"norm_first": True, "activation": "gelu", "batch_first": True},
    {"bias": False, "activation": tnn.GELU(approximate="tanh"), "layer_norm_eps": 1e-3},
]:
    case(
        f"TransformerEncoderLayer-{sorted(_kw)}",
        lambda kw=_kw: tnn.TransformerEncoderLayer(8, 2, 16, **kw),
        seq_batch,
    )
    case(
        f"TransformerDecoderLayer-{sorted(_kw)}",
        lambda kw=_kw: tnn.TransformerDecoderLayer(8, 2, 16, **kw),
        lambda kw=_kw: (
            (x(2, 5, 8), x(2, 6, 8, seed=1))
            if kw.get("batch_first")
            else (x(5, 2, 8), x(6, 2, 8, seed=1))
        ),
    )
case(
    "TransformerEncoder",
    lambda: tnn.TransformerEncoder(
        tnn.TransformerEncoderLayer(8, 2, 16), 2, norm=tnn.LayerNorm(8), enable_nested_tensor=False
    ),
    seq_batch,
)
case(
    "TransformerDecoder",
    lambda: tnn.TransformerDecoder(tnn.TransformerDecoderLayer(8, 2, 16), 2),
    lambda: (x(5, 2, 8), x(6, 2, 8, seed=1)),
)
case(
    "Transformer",
    lambda: tnn.Transformer(8, 2, 1, 2, 16, batch_first=True),
    lambda: (x(2, 6, 8), x(2, 5, 8, seed=1)),
)
case(
    "Sequential-CNN",
    lambda: tnn.Sequential(
        tnn.Conv2d(1, 4, 3, padding=1),
        tnn.BatchNorm2d(4),
        tnn.ReLU(),
        tnn.MaxPool2d(2),
        tnn.Dropout(0.2),
        tnn.Flatten(),
        tnn.Linear(4 * 3 * 3, 3),
    ),
    lambda: (x(4, 1, 6, 6),),
)
case(
    "ModuleList",
    lambda: tnn.ModuleList([tnn.Linear(3, 3), tnn.BatchNorm1d(3), tnn.Sequential(tnn.Tanh())]),
    lambda: (x(4, 3),),
    call_each,
)
case(
    "ModuleDict",
    lambda: tnn.ModuleDict({"lin": tnn.Linear(3, 3), "bn": tnn.BatchNorm1d(3)}),
    lambda: (x(4, 3),),
    call_each,
)

# Each parameter-free function, with settings that are not its defaults where it has some.
FREE: dict[type, tuple[Callable[[], tnn.Module], Callable[[], tuple[Any, ...]]]] = {
    tnn.ReLU: (tnn.ReLU, lambda: (x(3, 4),)),
    tnn.ReLU6: (tnn.ReLU6, lambda: (x(3, 4) * 8,)),
    tnn.LeakyReLU: (lambda: tnn.LeakyReLU(0.2), lambda: (x(3, 4),)),
    tnn.ELU: (lambda: tnn.ELU(0.5), lambda: (x(3, 4),)),
    tnn.SELU: (tnn.SELU, lambda: (x(3, 4),)),
    tnn.CELU: (lambda: tnn.CELU(0.7), lambda: (x(3, 4),)),
    tnn.GELU: (lambda: tnn.GELU("tanh"), lambda: (x(3, 4),)),
    tnn.SiLU: (tnn.SiLU, lambda: (x(3, 4),)),
    tnn.Mish: (tnn.Mish, lambda: (x(3, 4),)),
    tnn.Sigmoid: (tnn.Sigmoid, lambda: (x(3, 4),)),
    tnn.Tanh: (tnn.Tanh, lambda: (x(3, 4),)),
    tnn.Hardtanh: (lambda: tnn.Hardtanh(-0.5, 0.5), lambda: (x(3, 4),)),
    tnn.Hardsigmoid: (tnn.Hardsigmoid, lambda: (x(3, 4) * 4,)),
    tnn.Hardswish: (tnn.Hardswish, lambda: (x(3, 4) * 4,)),
    tnn.Hardshrink: (lambda: tnn.Hardshrink(0.3), lambda: (x(3, 4),)),
    tnn.Softshrink: (lambda: tnn.Softshrink(0.3), lambda: (x(3, 4),)),
    tnn.Tanhshrink: (tnn.Tanhshrink, lambda: (x(3, 4),)),
    tnn.Softplus: (lambda: tnn.Softplus(beta=2.0), lambda: (x(3, 4),)),
    tnn.Softsign: (tnn.Softsign, lambda: (x(3, 4),)),
    tnn.LogSigmoid: (tnn.LogSigmoid, lambda: (x(3, 4),)),
    tnn.Threshold: (lambda: tnn.Threshold(0.1, 20.0), lambda: (x(3, 4),)),
    tnn.GLU: (lambda: tnn.GLU(0), lambda: (x(4, 3),)),
    tnn.Softmax: (lambda: tnn.Softmax(dim=0), lambda: (x(3, 4),)),
    tnn.Softmin: (lambda: tnn.Softmin(dim=1), lambda: (x(3, 4),)),
    tnn.LogSoftmax: (lambda: tnn.LogSoftmax(dim=1), lambda: (x(3, 4),)),
    tnn.Softmax2d: (tnn.Softmax2d, lambda: (x(2, 3, 4, 4),)),
    tnn.Flatten: (lambda: tnn.Flatten(0, 1), lambda: (x(2, 3, 4),)),
    tnn.Unflatten: (lambda: tnn.Unflatten(1, (2, 2)), lambda: (x(3, 4),)),
    tnn.PixelShuffle: (lambda: tnn.PixelShuffle(2), lambda: (x(1, 8, 2, 2),)),
    tnn.PixelUnshuffle: (lambda: tnn.PixelUnshuffle(2), lambda: (x(1, 2, 4, 4),)),
    tnn.ChannelShuffle: (lambda: tnn.ChannelShuffle(2), lambda: (x(1, 4, 2, 2),)),
}
for _d in (1, 2, 3):
    _inp = lambda d=_d: (x(1, 2, *(6,) * d),)  # noqa: E731
    FREE[getattr(tnn, f"MaxPool{_d}d")] = (lambda d=_d: getattr(tnn, f"MaxPool{d}d")(2), _inp)
    FREE[getattr(tnn, f"AvgPool{_d}d")] = (
        lambda d=_d: getattr(tnn, f"AvgPool{d}d")(3, stride=2, padding=1),
        _inp,
    )
    FREE[getattr(tnn, f"AdaptiveAvgPool{_d}d")] = (
        lambda d=_d: getattr(tnn, f"AdaptiveAvgPool{d}d")(4),
        _inp,
    )
    FREE[getattr(tnn, f"AdaptiveMaxPool{_d}d")] = (
        lambda d=_d: getattr(tnn, f"AdaptiveMaxPool{d}d")(4),
        _inp,
    )
    if _d < 3:
        FREE[getattr(tnn, f"LPPool{_d}d")] = (lambda d=_d: getattr(tnn, f"LPPool{d}d")(2, 2), _inp)
    for _pad in ("Zero", "Constant", "Reflection", "Replication", "Circular"):
        _args = (1, 0.5) if _pad == "Constant" else (1,)
        FREE[getattr(tnn, f"{_pad}Pad{_d}d")] = (
            lambda d=_d, p=_pad, a=_args: getattr(tnn, f"{p}Pad{d}d")(*a),
            _inp,
        )
for _type, (_build, _inputs) in FREE.items():
    case(_type.__name__, _build, _inputs)


IDS = [name for name, *_ in CASES]
IN_PLACE_RENORM = {"Embedding-max_norm"}


def build(make: Callable[[], tnn.Module]) -> tnn.Module:
    with warnings.catch_warnings():
        # torch's notes on its own fast paths (enable_nested_tensor with norm_first, ...)
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(0)
        return randomise(make())


def test_every_registered_type_has_a_case() -> None:
    covered = set()
    for _, make, _, _ in CASES:
        for module in build(make).modules():
            covered.add(type(module))
    assert BUILTIN_TYPES - covered == set()
    assert set(PARAMETER_FREE) <= set(FREE)


@pytest.mark.parametrize(("name", "make", "inputs", "fn"), CASES, ids=IDS)
def test_from_torch_copies_parameters_and_buffers(
    name: str, make: Callable[[], tnn.Module], inputs: Any, fn: Any
) -> None:
    module = build(make)
    model = nn.from_torch(module)
    ours, theirs = dp_state(model), module.state_dict(keep_vars=True)
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype, key
        assert torch.equal(ours[key], tensor), key
        assert ours[key].data_ptr() != tensor.data_ptr(), f"{key} shares memory with the module"
        assert isinstance(ours[key], tnn.Parameter) == isinstance(tensor, tnn.Parameter), key
    names = [n for n, _ in dp.named_parameters(model)]
    assert names == [n for n, _ in module.named_parameters()]
    assert all(p.requires_grad and p.is_leaf for p in dp.flatten_parameters(model))


@pytest.mark.parametrize(("name", "make", "inputs", "fn"), CASES, ids=IDS)
def test_from_torch_outputs_equal_in_eval_mode(
    name: str, make: Callable[[], tnn.Module], inputs: Callable[[], tuple[Any, ...]], fn: Any
) -> None:
    module = build(make).eval()
    model = nn.from_torch(module)
    args = inputs()
    with nn.evaluating():
        ours = fn(model, *args)
    assert_tree_equal(ours, fn(module, *args))


@pytest.mark.parametrize(("name", "make", "inputs", "fn"), CASES, ids=IDS)
def test_from_torch_outputs_state_and_gradients_equal_in_train_mode(
    name: str, make: Callable[[], tnn.Module], inputs: Callable[[], tuple[Any, ...]], fn: Any
) -> None:
    """Train mode: dropout draws the same masks from the same global seed, norms use batch
    statistics and update their running ones as torch's do in place."""
    module = build(make).train()
    model = nn.from_torch(module)
    before = {k: v.clone() for k, v in dp_state(model).items()}
    args = inputs()
    torch.manual_seed(5)
    theirs = fn(module, *args)
    torch.manual_seed(5)
    ours, updated = nn.training(fn, model, *args)
    assert_tree_equal(ours, theirs)
    assert all(torch.equal(v, before[k]) for k, v in dp_state(model).items())  # model unchanged
    if name in IN_PLACE_RENORM:
        # torch.nn's max_norm renormalises rows of its weight in place; diffprog's Embedding
        # is a value and leaves its weight alone (docs/nn-dense.md, Embedding's docstring),
        # so the state after the pass and the gradients of over-long rows differ by design.
        assert torch.equal(dp_state(updated)["weight"], before["weight"])
        return
    # the running statistics (and everything else) after the pass equal torch's, in place
    after = dp_state(updated)
    for key, tensor in module.state_dict().items():
        assert_close(after[key], tensor, rtol=0, atol=0, msg=key)
    params = dp.flatten_parameters(model)
    if not params:
        return
    loss_ours = sum(t.sum() for t in _tensors(ours))
    loss_theirs = sum(t.sum() for t in _tensors(theirs))
    grads = torch.autograd.grad(loss_ours, params, allow_unused=True)
    torch_params = [p for _, p in module.named_parameters()]
    torch_grads = torch.autograd.grad(loss_theirs, torch_params, allow_unused=True)
    for g, tg in zip(grads, torch_grads, strict=True):
        if tg is None:
            assert g is None or not g.any()
        else:
            assert_close(g, tg, rtol=1e-6, atol=1e-6)


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree] if tree.is_floating_point() else []
    if isinstance(tree, (tuple, list)):
        return [t for part in tree for t in _tensors(part)]
    return []


# --------------------------------------------------------------------------------------------
# Ties, sharing, frozen parameters, dtypes, the module left alone
# --------------------------------------------------------------------------------------------


def test_tied_weights_and_shared_submodules_stay_shared() -> None:
    emb = tnn.Embedding(10, 4)
    head = tnn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # the language-model head tied to the embedding
    shared = tnn.Linear(4, 4)
    module = tnn.ModuleDict({"emb": emb, "mid": tnn.ModuleList([shared, shared]), "head": head})
    model = nn.from_torch(module)
    assert model["head"].weight is model["emb"].weight
    assert model["mid"][0] is model["mid"][1]
    assert list(dp_state(model)) == list(module.state_dict())
    assert [n for n, _ in dp.named_parameters(model)] == [n for n, _ in module.named_parameters()]
    assert len(dp.flatten_parameters(model)) == len(list(module.parameters())) == 3


def test_a_parameter_without_requires_grad_becomes_a_frozen_constant() -> None:
    module = tnn.Sequential(tnn.Embedding.from_pretrained(torch.randn(5, 3)), tnn.Linear(3, 2))
    model = nn.from_torch(module)
    assert type(model[0].weight) is Frozen
    assert torch.equal(model[0].weight, module[0].weight)
    assert [n for n, _ in dp.named_parameters(model)] == ["1.weight", "1.bias"]
    assert list(dp_state(model)) == list(module.state_dict())


def test_dtypes_are_kept_and_the_module_is_not_changed() -> None:
    module = tnn.Sequential(tnn.Linear(3, 4), tnn.BatchNorm1d(4)).double()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    model = nn.from_torch(module)
    assert all(p.dtype == torch.float64 for p in dp.flatten_parameters(model))
    assert model[1].num_batches_tracked.dtype == torch.long
    _, trained = nn.training(call, model, x(5, 3).double())
    with torch.no_grad():
        module[0].weight.add_(1.0)  # the module changing in place does not reach the value
    assert not torch.equal(model[0].weight, module[0].weight)
    assert torch.equal(model[1].running_mean, before["1.running_mean"])
    assert not torch.equal(trained[1].running_mean, before["1.running_mean"])


def test_from_torch_on_the_meta_device_gives_meta_tensors() -> None:
    with torch.device("meta"):
        module = tnn.Sequential(tnn.Linear(3, 4), tnn.LSTM(4, 5, 2))
    model = nn.from_torch(module)
    assert all(t.is_meta for t in dp_state(model).values())
    assert list(dp_state(model)) == list(module.state_dict())


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class Net(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = tnn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class MyLinear(tnn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 2


def test_an_unsupported_module_itself_is_named() -> None:
    with pytest.raises(nn.FromTorchError, match=r"the module itself \(Net\)") as info:
        nn.from_torch(Net())
    assert info.value.path == "" and info.value.module_type is Net and info.value.option is None
    assert "load_state_dict" in str(info.value) and "register_from_torch" in str(info.value)


def test_the_first_unsupported_submodule_is_named_by_path_and_type() -> None:
    module = tnn.Sequential(
        tnn.Linear(2, 2),
        tnn.ModuleDict({"ok": tnn.ReLU(), "block": tnn.ModuleList([tnn.Tanh(), Net()])}),
        tnn.PReLU(),  # also unsupported, but later
    )
    with pytest.raises(nn.FromTorchError, match=r"'1\.block\.1' \(Net\)") as info:
        nn.from_torch(module)
    assert info.value.path == "1.block.1" and info.value.module_type is Net


@pytest.mark.parametrize(
    ("module", "hint"),
    [
        (MyLinear(2, 2), "only exact types"),
        (tnn.LazyLinear(3), "lazy module"),
        (tnn.utils.parametrizations.weight_norm(tnn.Linear(2, 2)), "parametrization"),
        (tnn.RReLU(), "no converter"),
        (tnn.PReLU(), "no converter"),
        (tnn.Bilinear(2, 2, 3), "no converter"),
    ],
    ids=["subclass", "lazy", "parametrized", "RReLU", "PReLU", "Bilinear"],
)
def test_unsupported_types_are_refused_with_a_hint(module: tnn.Module, hint: str) -> None:
    with pytest.raises(nn.FromTorchError, match=hint) as info:
        nn.from_torch(tnn.Sequential(tnn.Identity(), module))
    assert info.value.path == "1"


def test_a_wrapper_is_refused_naming_the_module_to_convert() -> None:
    wrapped = tnn.DataParallel(tnn.Linear(2, 2))
    with pytest.raises(nn.FromTorchError, match=r"convert that one, module\.module"):
        nn.from_torch(wrapped)
    assert list(dp.state_dict(nn.from_torch(wrapped.module))) == ["weight", "bias"]


def test_options_without_a_diffprog_equivalent_are_named() -> None:
    bn = tnn.BatchNorm1d(3)
    bn.track_running_stats = False  # buffers kept: torch then uses batch statistics in eval
    with pytest.raises(nn.FromTorchError, match="option track_running_stats") as info:
        nn.from_torch(tnn.Sequential(tnn.Linear(3, 3), bn))
    assert (info.value.path, info.value.option, info.value.module_type) == (
        "1",
        "track_running_stats",
        tnn.BatchNorm1d,
    )

    hooked = tnn.Linear(2, 2)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(nn.FromTorchError, match="option forward hooks") as info:
        nn.from_torch(tnn.ModuleDict({"a": hooked}))
    assert info.value.path == "a" and info.value.option == "forward hooks"

    named = tnn.Sequential()
    named.add_module("fc", tnn.Linear(2, 2))
    with pytest.raises(nn.FromTorchError, match=r"option child names .*\['fc'\]"):
        nn.from_torch(named)


def test_parts_in_different_modes_are_refused() -> None:
    """diffprog chooses the mode per call for every layer: a BatchNorm kept in eval mode in a
    model in train mode (a frozen BatchNorm) cannot be carried, and is not silently trained."""
    module = tnn.Sequential(tnn.Linear(3, 3), tnn.BatchNorm1d(3), tnn.Dropout(0.1)).train()
    module[1].eval()
    expected = r"option training \(train mode, while the submodule '1' \(BatchNorm1d\) is in eval"
    with pytest.raises(nn.FromTorchError, match=expected) as info:
        nn.from_torch(module)
    assert (info.value.path, info.value.option) == ("2", "training")
    module[0].eval()  # the mode of a layer whose computation does not depend on it is free
    module[1].train()
    nn.from_torch(module)
    nn.from_torch(module.eval())
    # a dropout that drops nothing does not depend on the mode either
    nn.from_torch(tnn.Sequential(tnn.Dropout(0.0).train(), tnn.BatchNorm1d(2).eval()))


def test_state_a_standard_layer_does_not_have_is_refused_not_dropped() -> None:
    layer = tnn.Linear(2, 2)
    layer.register_parameter("scale", tnn.Parameter(torch.ones(2)))
    with pytest.raises(nn.FromTorchError, match=r"not carried: \['scale'\]"):
        nn.from_torch(layer)
    layer = tnn.Linear(2, 2)
    layer.register_buffer("extra", torch.zeros(1))
    with pytest.raises(nn.FromTorchError, match=r"not carried: \['extra'\]"):
        nn.from_torch(tnn.Sequential(layer))


def test_a_configuration_the_layer_refuses_is_reported_at_its_path() -> None:
    lstm = tnn.LSTM(3, 4)
    del lstm.weight_hh_l0  # an inconsistent module
    lstm._flat_weights_names.remove("weight_hh_l0")
    with pytest.raises(nn.FromTorchError, match=r"'0' \(LSTM\).*weight_hh_l0"):
        nn.from_torch(tnn.Sequential(lstm))


def test_a_sequential_holding_a_container_is_refused_at_its_path() -> None:
    module = tnn.ModuleDict({"body": tnn.Sequential(tnn.Linear(2, 2), tnn.ModuleList())})
    with pytest.raises(nn.FromTorchError, match=r"'body' \(Sequential\).*part 1 is of type list"):
        nn.from_torch(module)


def test_from_torch_refuses_what_is_not_a_module() -> None:
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        nn.from_torch(dp.sample(nn.LinearSpec(2, 2)))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


class Block(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = tnn.LayerNorm(4)
        self.proj = tnn.Linear(4, 4)
        self.scale = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.proj(self.norm(x))


class DpBlock(dp.Parameterized):
    norm: nn.LayerNorm
    proj: nn.Linear
    scale: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.proj(self.norm(x))


class Scaled(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = tnn.Linear(4, 4)
        self.factor = 3.0


def test_register_from_torch_with_a_class_or_a_function() -> None:
    nn.register_from_torch(Block, DpBlock)
    module = randomise(tnn.Sequential(Block(), Block()))
    model = nn.from_torch(module)
    assert isinstance(model[1], DpBlock) and model[1].scale == 0.5
    assert list(dp_state(model)) == list(module.state_dict())
    assert_tree_equal(model(x(3, 4)), module(x(3, 4)))

    def convert(m: Scaled, conversion: nn.TorchConversion) -> Any:
        if m.factor < 0:
            conversion.refuse("factor", f"negative ({m.factor})")
        inner = conversion.get("inner")
        return {"inner": inner}

    nn.register_from_torch(Scaled, convert)
    assert list(dp_state(nn.from_torch(Scaled()))) == ["inner.weight", "inner.bias"]
    bad = Scaled()
    bad.factor = -1.0
    with pytest.raises(nn.FromTorchError, match=r"option factor \(negative \(-1.0\)\)"):
        nn.from_torch(tnn.ModuleList([bad]))


class DpBlockMisnamed(dp.Parameterized):
    norm: nn.LayerNorm
    projection: nn.Linear  # the torch module calls it proj


class Block2(Block):
    pass


def test_a_converter_class_with_a_field_the_module_lacks_is_named() -> None:
    nn.register_from_torch(Block2, DpBlockMisnamed)
    with pytest.raises(nn.FromTorchError, match=r"'0' \(Block2\).*attribute 'projection'"):
        nn.from_torch(tnn.Sequential(Block2()))


def test_register_from_torch_refuses_what_it_cannot_use() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module subclass"):
        nn.register_from_torch(int, DpBlock)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Parameterized class"):
        nn.register_from_torch(Block, int)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Any nesting of containers
# --------------------------------------------------------------------------------------------

_LEAVES = st.sampled_from(
    [
        lambda: tnn.Linear(3, 2),
        lambda: tnn.BatchNorm1d(4),
        lambda: tnn.LayerNorm(5),
        lambda: tnn.LSTM(2, 3, 2),
        lambda: tnn.ReLU(),
        lambda: tnn.Dropout(0.1),
        lambda: tnn.Conv1d(2, 2, 3),
    ]
).map(lambda make: make())


def _containers(children: st.SearchStrategy[list[tnn.Module]]) -> st.SearchStrategy[tnn.Module]:
    # A Sequential calls its parts: a ModuleList/ModuleDict in one is refused (tested below).
    callable_parts = children.filter(
        lambda parts: not any(isinstance(p, (tnn.ModuleList, tnn.ModuleDict)) for p in parts)
    )
    return st.one_of(
        callable_parts.map(lambda parts: tnn.Sequential(*parts)),
        children.map(tnn.ModuleList),
        children.map(lambda parts: tnn.ModuleDict({f"m{i}": p for i, p in enumerate(parts)})),
    )


MODULES = st.recursive(
    _LEAVES, lambda inner: _containers(st.lists(inner, min_size=0, max_size=3)), max_leaves=8
)


@settings(max_examples=40, deadline=None)
@given(MODULES)
def test_any_nesting_of_containers_converts_and_loads_back_both_ways(module: tnn.Module) -> None:
    module = randomise(module)
    model = nn.from_torch(module)
    ours = dp.state_dict(model)
    assert list(ours) == list(module.state_dict())
    assert all(torch.equal(ours[k], t) for k, t in module.state_dict().items())
    # the diffprog state dict loads into a fresh copy of the module, strictly
    fresh = copy.deepcopy(module)
    with torch.no_grad():
        for t in fresh.state_dict().values():
            t.zero_()
    fresh.load_state_dict(ours, strict=True)
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ours.values(), strict=True)
    )
    # and the module's state dict loads into the converted model's skeleton
    again = dp.load_state_dict(model, module.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(dp.state_dict(again).values(), ours.values(), strict=True)
    )
