"""Every diffprog.nn layer's state-dict keys, order included, equal torch.nn's for the same config.

The diffprog keys are every tensor leaf (parameters AND buffers such as BatchNorm's running
statistics) named as ``state_dict`` names it; the torch keys are ``module.state_dict()``'s.
A test below checks that the grid covers every layer class ``diffprog.nn`` exports.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import diffprog as dp
from diffprog import nn

tnn = torch.nn


def dp_keys(model: Any) -> list[str]:
    """The state-dict keys of a diffprog value (parameters and buffers), in order."""
    return list(dp.state_dict(model))


class _TorchResidual(tnn.Module):
    """The torch module with nn.Residual's layout (a block and an optional shortcut)."""

    def __init__(self, block: tnn.Module, shortcut: tnn.Module | None = None) -> None:
        super().__init__()
        self.block = block
        self.shortcut = shortcut


def _enc_layer(**kw: Any) -> tuple[nn.TransformerEncoderLayerSpec, tnn.TransformerEncoderLayer]:
    return nn.TransformerEncoderLayerSpec(8, 2, 16, **kw), tnn.TransformerEncoderLayer(
        8, 2, 16, **kw
    )


def _dec_layer(**kw: Any) -> tuple[nn.TransformerDecoderLayerSpec, tnn.TransformerDecoderLayer]:
    return nn.TransformerDecoderLayerSpec(8, 2, 16, **kw), tnn.TransformerDecoderLayer(
        8, 2, 16, **kw
    )


def _encoder(norm: bool) -> tuple[Any, tnn.Module]:
    spec, layer = _enc_layer()
    dp_norm = nn.LayerNormSpec(8) if norm else None
    torch_norm = tnn.LayerNorm(8) if norm else None
    return (
        nn.TransformerEncoderSpec(spec, 3, norm=dp_norm),
        tnn.TransformerEncoder(layer, 3, norm=torch_norm, enable_nested_tensor=False),
    )


def _decoder(norm: bool) -> tuple[Any, tnn.Module]:
    spec, layer = _dec_layer()
    dp_norm = nn.LayerNormSpec(8) if norm else None
    torch_norm = tnn.LayerNorm(8) if norm else None
    return (
        nn.TransformerDecoderSpec(spec, 2, norm=dp_norm),
        tnn.TransformerDecoder(layer, 2, norm=torch_norm),
    )


# (the diffprog layer class the case covers, a thunk building (spec, torch module)); every
# configuration option that adds, removes or reorders a tensor has a case.
CASES: list[tuple[str, type, Callable[[], tuple[Any, tnn.Module]]]] = []


def case(name: str, cls: type, build: Callable[[], tuple[Any, tnn.Module]]) -> None:
    CASES.append((name, cls, build))


case("Identity", nn.Identity, lambda: (nn.IdentitySpec(), tnn.Identity()))
case("Linear", nn.Linear, lambda: (nn.LinearSpec(3, 4), tnn.Linear(3, 4)))
case("Linear-nobias", nn.Linear, lambda: (nn.LinearSpec(3, 4, False), tnn.Linear(3, 4, False)))
case("Embedding", nn.Embedding, lambda: (nn.EmbeddingSpec(5, 3), tnn.Embedding(5, 3)))
case(
    "Embedding-padding",
    nn.Embedding,
    lambda: (nn.EmbeddingSpec(5, 3, padding_idx=0), tnn.Embedding(5, 3, padding_idx=0)),
)
for _n, (_conv, _tconv, _convt, _tconvt) in enumerate(
    [
        (nn.Conv1d, tnn.Conv1d, nn.ConvTranspose1d, tnn.ConvTranspose1d),
        (nn.Conv2d, tnn.Conv2d, nn.ConvTranspose2d, tnn.ConvTranspose2d),
        (nn.Conv3d, tnn.Conv3d, nn.ConvTranspose3d, tnn.ConvTranspose3d),
    ],
    start=1,
):
    _spec = getattr(nn, f"Conv{_n}dSpec")
    _spect = getattr(nn, f"ConvTranspose{_n}dSpec")
    for _bias in (True, False):
        case(
            f"Conv{_n}d-bias={_bias}",
            _conv,
            lambda s=_spec, t=_tconv, b=_bias: (
                s(4, 6, 3, groups=2, bias=b),
                t(4, 6, 3, groups=2, bias=b),
            ),
        )
        case(
            f"ConvTranspose{_n}d-bias={_bias}",
            _convt,
            lambda s=_spect, t=_tconvt, b=_bias: (
                s(4, 6, 3, groups=2, bias=b),
                t(4, 6, 3, groups=2, bias=b),
            ),
        )
case(
    "Conv2d-circular",
    nn.Conv2d,
    lambda: (
        nn.Conv2dSpec(2, 3, 3, padding_mode="circular"),
        tnn.Conv2d(2, 3, 3, padding_mode="circular"),
    ),
)


def _norm_case(name: str, affine: bool, track: bool, bias: bool) -> tuple[Any, tnn.Module]:
    kw = {"affine": affine, "track_running_stats": track, "bias": bias}
    return getattr(nn, name + "Spec")(3, **kw), getattr(tnn, name)(3, **kw)


for _kind in ("Batch", "Instance"):
    for _n in (1, 2, 3):
        _name = f"{_kind}Norm{_n}d"
        for _affine in (True, False):
            for _track in (True, False):
                for _bias in (True, False) if _affine else (True,):
                    case(
                        f"{_name}-affine={_affine}-track={_track}-bias={_bias}",
                        getattr(nn, _name),
                        lambda a=(_name, _affine, _track, _bias): _norm_case(*a),
                    )
for _affine, _bias in [(True, True), (True, False), (False, True)]:
    case(
        f"LayerNorm-affine={_affine}-bias={_bias}",
        nn.LayerNorm,
        lambda a=_affine, b=_bias: (
            nn.LayerNormSpec((2, 3), elementwise_affine=a, bias=b),
            tnn.LayerNorm((2, 3), elementwise_affine=a, bias=b),
        ),
    )
    case(
        f"GroupNorm-affine={_affine}-bias={_bias}",
        nn.GroupNorm,
        lambda a=_affine, b=_bias: (
            nn.GroupNormSpec(2, 4, affine=a, bias=b),
            tnn.GroupNorm(2, 4, affine=a, bias=b),
        ),
    )
for _affine in (True, False):
    case(
        f"RMSNorm-affine={_affine}",
        nn.RMSNorm,
        lambda a=_affine: (
            nn.RMSNormSpec(3, elementwise_affine=a),
            tnn.RMSNorm(3, elementwise_affine=a),
        ),
    )
for _cls in (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
):
    case(
        _cls.__name__,
        _cls,
        lambda c=_cls: (getattr(nn, c.__name__ + "Spec")(0.2), getattr(tnn, c.__name__)(0.2)),
    )
case(
    "Upsample", nn.UpSample, lambda: (nn.UpsampleSpec(scale_factor=2), tnn.Upsample(scale_factor=2))
)
for _rnn in ("RNN", "LSTM", "GRU"):
    for _layers, _bidi, _bias in [
        (1, False, True),
        (2, True, True),
        (3, False, False),
        (2, True, False),
    ]:
        case(
            f"{_rnn}-layers={_layers}-bidirectional={_bidi}-bias={_bias}",
            getattr(nn, _rnn),
            lambda r=_rnn, n=_layers, bi=_bidi, b=_bias: (
                getattr(nn, r + "Spec")(3, 4, n, bias=b, bidirectional=bi),
                getattr(tnn, r)(3, 4, n, bias=b, bidirectional=bi),
            ),
        )
for _bidi in (False, True):
    case(
        f"LSTM-proj-bidirectional={_bidi}",
        nn.LSTM,
        lambda bi=_bidi: (
            nn.LSTMSpec(3, 4, 2, proj_size=2, bidirectional=bi),
            tnn.LSTM(3, 4, 2, proj_size=2, bidirectional=bi),
        ),
    )
for _cell in ("RNNCell", "LSTMCell", "GRUCell"):
    for _bias in (True, False):
        case(
            f"{_cell}-bias={_bias}",
            getattr(nn, _cell),
            lambda c=_cell, b=_bias: (
                getattr(nn, c + "Spec")(3, 4, bias=b),
                getattr(tnn, c)(3, 4, bias=b),
            ),
        )
for _kw in [
    {},
    {"bias": False},
    {"add_bias_kv": True},
    {"kdim": 3, "vdim": 5},
    {"kdim": 3, "vdim": 5, "add_bias_kv": True, "bias": False},
    {"add_zero_attn": True, "batch_first": True},
]:
    case(
        f"MultiheadAttention-{_kw}",
        nn.MultiheadAttention,
        lambda kw=_kw: (nn.MultiheadAttentionSpec(8, 2, **kw), tnn.MultiheadAttention(8, 2, **kw)),
    )
for _kw in [{}, {"norm_first": True}, {"bias": False}, {"batch_first": True}]:
    case(
        f"TransformerEncoderLayer-{_kw}",
        nn.TransformerEncoderLayer,
        lambda kw=_kw: _enc_layer(**kw),
    )
    case(
        f"TransformerDecoderLayer-{_kw}",
        nn.TransformerDecoderLayer,
        lambda kw=_kw: _dec_layer(**kw),
    )
for _norm in (True, False):
    case(f"TransformerEncoder-norm={_norm}", nn.TransformerEncoder, lambda n=_norm: _encoder(n))
    case(f"TransformerDecoder-norm={_norm}", nn.TransformerDecoder, lambda n=_norm: _decoder(n))
case(
    "Transformer",
    nn.Transformer,
    lambda: (nn.TransformerSpec(8, 2, 2, 1, 16), tnn.Transformer(8, 2, 2, 1, 16)),
)
case(
    "Transformer-norm_first-nobias",
    nn.Transformer,
    lambda: (
        nn.TransformerSpec(8, 2, 1, 2, 16, norm_first=True, bias=False),
        tnn.Transformer(8, 2, 1, 2, 16, norm_first=True, bias=False),
    ),
)
case(
    "Sequential",
    nn.Sequential,
    lambda: (
        nn.SequentialSpec(
            nn.LinearSpec(3, 4), torch.relu, nn.BatchNorm1dSpec(4), nn.LinearSpec(4, 2)
        ),
        tnn.Sequential(tnn.Linear(3, 4), tnn.ReLU(), tnn.BatchNorm1d(4), tnn.Linear(4, 2)),
    ),
)
case(
    "MLP",
    nn.Sequential,
    lambda: (nn.MLPSpec([3, 5, 2]), tnn.Sequential(tnn.Linear(3, 5), tnn.ReLU(), tnn.Linear(5, 2))),
)
# The wiring records have no torch.nn class; their torch counterparts are the modules with the
# same attributes: a ModuleList for the inlined branches, a module with block/shortcut.
for _cls in (nn.FanOut, nn.Parallel):
    case(
        _cls.__name__,
        _cls,
        lambda c=_cls: (
            getattr(nn, c.__name__ + "Spec")(nn.LinearSpec(3, 4), nn.BatchNorm1dSpec(3)),
            tnn.ModuleList([tnn.Linear(3, 4), tnn.BatchNorm1d(3)]),
        ),
    )
case(
    "Residual",
    nn.Residual,
    lambda: (
        nn.ResidualSpec(
            nn.SequentialSpec(nn.LinearSpec(3, 3), nn.BatchNorm1dSpec(3)), nn.LinearSpec(3, 3)
        ),
        _TorchResidual(tnn.Sequential(tnn.Linear(3, 3), tnn.BatchNorm1d(3)), tnn.Linear(3, 3)),
    ),
)
case(
    "Residual-identity",
    nn.Residual,
    lambda: (nn.ResidualSpec(nn.LinearSpec(3, 3)), _TorchResidual(tnn.Linear(3, 3))),
)


@pytest.mark.parametrize(
    ("name", "build"), [(n, b) for n, _, b in CASES], ids=[n for n, _, _ in CASES]
)
def test_state_dict_keys_equal_torch_in_order(
    name: str, build: Callable[[], tuple[Any, tnn.Module]]
) -> None:
    with warnings.catch_warnings():
        # torch warns about its own fast path settings (enable_nested_tensor with norm_first)
        warnings.simplefilter("ignore", UserWarning)
        spec, module = build()
    ours = dp_keys(dp.sample(spec))
    theirs = list(module.state_dict().keys())
    assert ours == theirs, f"{name}:\n ours   {ours}\n theirs {theirs}"


def test_state_dict_key_grid_covers_every_layer() -> None:
    """Every layer class diffprog.nn exports has at least one case above."""
    layers = {
        obj
        for name in nn.__all__
        if isinstance(obj := getattr(nn, name), type) and issubclass(obj, dp.Parameterized)
    }
    covered = {cls for _, cls, _ in CASES}
    assert layers - covered == set()


def test_state_dict_keys_of_a_nested_model_equal_torch() -> None:
    """A model of models: dict and list containers give torch's ModuleDict/ModuleList keys."""
    model = {
        "enc": [dp.sample(nn.LinearSpec(2, 3)), dp.sample(nn.BatchNorm1dSpec(3))],
        "rnn": dp.sample(nn.LSTMSpec(3, 4, 2)),
    }
    module = tnn.ModuleDict(
        {"enc": tnn.ModuleList([tnn.Linear(2, 3), tnn.BatchNorm1d(3)]), "rnn": tnn.LSTM(3, 4, 2)}
    )
    assert dp_keys(model) == list(module.state_dict().keys())
