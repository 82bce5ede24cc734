"""diffprog.serialize: state_dict, load_state_dict, save_params/load_params, .pt files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import diffprog as dp
import diffprog.nn as dnn
from diffprog._frozen import Frozen
from diffprog.serialize import _files

T = torch.nn

# (diffprog spec, the equivalent torch.nn module): state_dict keys, order included, must agree.
LAYERS: list[tuple[str, Any, Callable[[], torch.nn.Module]]] = [
    ("linear", dnn.LinearSpec(3, 4), lambda: T.Linear(3, 4)),
    ("linear_nobias", dnn.LinearSpec(3, 4, bias=False), lambda: T.Linear(3, 4, bias=False)),
    ("conv2d", dnn.Conv2dSpec(3, 4, 3), lambda: T.Conv2d(3, 4, 3)),
    ("embedding", dnn.EmbeddingSpec(7, 3), lambda: T.Embedding(7, 3)),
    ("batchnorm", dnn.BatchNorm1dSpec(4), lambda: T.BatchNorm1d(4)),
    ("batchnorm2d", dnn.BatchNorm2dSpec(4), lambda: T.BatchNorm2d(4)),
    ("layernorm", dnn.LayerNormSpec(4), lambda: T.LayerNorm(4)),
    (
        "instancenorm",
        dnn.InstanceNorm1dSpec(4, affine=True, track_running_stats=True),
        lambda: T.InstanceNorm1d(4, affine=True, track_running_stats=True),
    ),
    ("lstm2", dnn.LSTMSpec(3, 4, num_layers=2), lambda: T.LSTM(3, 4, num_layers=2)),
    (
        "gru_bi",
        dnn.GRUSpec(3, 4, bidirectional=True),
        lambda: T.GRU(3, 4, bidirectional=True),
    ),
    ("lstm_proj", dnn.LSTMSpec(3, 4, proj_size=2), lambda: T.LSTM(3, 4, proj_size=2)),
    ("lstmcell", dnn.LSTMCellSpec(3, 4), lambda: T.LSTMCell(3, 4)),
    ("mha", dnn.MultiheadAttentionSpec(8, 2), lambda: T.MultiheadAttention(8, 2)),
    (
        "encoder_layer",
        dnn.TransformerEncoderLayerSpec(8, 2, 16),
        lambda: T.TransformerEncoderLayer(8, 2, 16),
    ),
    ("conv1d", dnn.Conv1dSpec(2, 3, 3, bias=False), lambda: T.Conv1d(2, 3, 3, bias=False)),
    ("conv3d", dnn.Conv3dSpec(2, 3, 2), lambda: T.Conv3d(2, 3, 2)),
    ("convt2d", dnn.ConvTranspose2dSpec(2, 3, 3), lambda: T.ConvTranspose2d(2, 3, 3)),
    ("batchnorm3d", dnn.BatchNorm3dSpec(2), lambda: T.BatchNorm3d(2)),
    (
        "batchnorm_no_stats",
        dnn.BatchNorm1dSpec(3, track_running_stats=False),
        lambda: T.BatchNorm1d(3, track_running_stats=False),
    ),
    ("groupnorm", dnn.GroupNormSpec(2, 4), lambda: T.GroupNorm(2, 4)),
    ("rmsnorm", dnn.RMSNormSpec(4), lambda: T.RMSNorm(4)),
    ("instancenorm_plain", dnn.InstanceNorm2dSpec(3), lambda: T.InstanceNorm2d(3)),
    ("rnn", dnn.RNNSpec(3, 4, num_layers=2), lambda: T.RNN(3, 4, num_layers=2)),
    ("grucell", dnn.GRUCellSpec(3, 4), lambda: T.GRUCell(3, 4)),
    ("rnncell", dnn.RNNCellSpec(3, 4, bias=False), lambda: T.RNNCell(3, 4, bias=False)),
    (
        "mha_kdim",
        dnn.MultiheadAttentionSpec(8, 2, kdim=4, vdim=6, bias=False),
        lambda: T.MultiheadAttention(8, 2, kdim=4, vdim=6, bias=False),
    ),
    (
        "decoder_layer",
        dnn.TransformerDecoderLayerSpec(8, 2, 16),
        lambda: T.TransformerDecoderLayer(8, 2, 16),
    ),
    (
        "transformer",
        dnn.TransformerSpec(8, 2, 1, 1, 16, batch_first=True),
        lambda: T.Transformer(8, 2, 1, 1, 16, batch_first=True),
    ),
    ("identity", dnn.IdentitySpec(), lambda: T.Identity()),
    ("dropout", dnn.DropoutSpec(0.5), lambda: T.Dropout(0.5)),
    (
        "sequential_cnn",
        dnn.SequentialSpec(dnn.Conv2dSpec(1, 2, 3), dnn.BatchNorm2dSpec(2)),
        lambda: T.Sequential(T.Conv2d(1, 2, 3), T.BatchNorm2d(2)),
    ),
]
LAYER_IDS = [name for name, _, _ in LAYERS]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomised(model: Any, seed: int) -> Any:
    """``model`` with every tensor (buffers too) replaced by fresh random values."""
    g = _gen(seed)
    values = {}
    for key, t in dp.state_dict(model).items():
        if t.is_floating_point():  # positive: a valid running variance too
            values[key] = torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5
        else:
            values[key] = torch.randint(0, 100, t.shape, generator=g, dtype=t.dtype)
    return dp.load_state_dict(model, values)


def _assert_same_state(a: Any, b: Any) -> None:
    sa, sb = dp.state_dict(a), dp.state_dict(b)
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------- state_dict


@pytest.mark.parametrize(("name", "spec", "module"), LAYERS, ids=LAYER_IDS)
def test_state_dict_keys_and_order_equal_torch_nn(name: str, spec: Any, module: Any) -> None:
    model = dp.sample(spec, generator=_gen())
    torch_module = module()
    assert list(dp.state_dict(model)) == list(torch_module.state_dict())
    for key, t in dp.state_dict(model).items():
        expected = torch_module.state_dict()[key]
        assert (t.shape, t.dtype) == (expected.shape, expected.dtype), key


@pytest.mark.parametrize(("name", "spec", "module"), LAYERS, ids=LAYER_IDS)
def test_state_dict_loads_into_torch_module_strictly_and_back(
    name: str, spec: Any, module: Any
) -> None:
    model = _randomised(dp.sample(spec, generator=_gen()), seed=1)
    torch_module = module()
    torch_module.load_state_dict(dp.state_dict(model), strict=True)
    for key, t in torch_module.state_dict().items():
        assert torch.equal(t, dp.state_dict(model)[key]), key
    back = dp.load_state_dict(dp.sample(spec, device="meta"), torch_module.state_dict())
    _assert_same_state(back, model)


def test_state_dict_holds_buffers_and_frozen_parameters_detached() -> None:
    bn = _randomised(dp.sample(dnn.BatchNorm1dSpec(3)), seed=2)
    model = {"bn": bn, "frozen": Frozen(torch.ones(2)), "const": torch.arange(3)}
    sd = dp.state_dict(model)
    assert list(sd) == [
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        "frozen",
        "const",
    ]
    assert all(type(t) is torch.Tensor and not t.requires_grad for t in sd.values())
    # As torch's state_dict: detached tensors sharing the model's storage.
    assert sd["bn.weight"].data_ptr() == bn.weight.data_ptr()


class _TorchTied(T.Module):
    """torch's Embedding + tied output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = T.Embedding(5, 3)
        self.head = T.Linear(3, 5)
        self.head.weight = self.embed.weight


def test_state_dict_repeats_a_tied_tensor_under_every_key_as_torch() -> None:
    embed = dp.sample(dnn.EmbeddingSpec(5, 3), generator=_gen())
    head = dp.sample(dnn.LinearSpec(3, 5), generator=_gen())
    model = {"embed": embed, "head": dnn.Linear(embed.weight, head.bias)}
    sd = dp.state_dict(model)
    assert list(sd) == ["embed.weight", "head.weight", "head.bias"]
    assert sd["embed.weight"] is sd["head.weight"]
    assert list(_TorchTied().state_dict()) == list(sd)


def test_state_dict_refuses_two_tensors_with_one_key() -> None:
    with pytest.raises(dp.NameClashError, match="'1'"):
        dp.state_dict({1: torch.zeros(1), "1": torch.ones(1)})


# ---------------------------------------------------------------- load_state_dict


@pytest.mark.parametrize(("name", "spec", "module"), LAYERS, ids=LAYER_IDS)
def test_load_state_dict_round_trip_every_layer(name: str, spec: Any, module: Any) -> None:
    source = _randomised(dp.sample(spec, generator=_gen()), seed=3)
    skeleton = dp.sample(spec, generator=_gen(9))
    before = {k: v.clone() for k, v in dp.state_dict(skeleton).items()}
    loaded = dp.load_state_dict(skeleton, dp.state_dict(source))
    _assert_same_state(loaded, source)
    # The skeleton is never changed.
    for key, t in dp.state_dict(skeleton).items():
        assert torch.equal(t, before[key]), key


def test_loaded_tensors_are_trainable_leaves_buffers_and_frozen() -> None:
    model = {
        "bn": dp.sample(dnn.BatchNorm1dSpec(3)),
        "frozen": Frozen(torch.ones(2)),
    }
    values = {
        k: v.clone().requires_grad_(v.is_floating_point()) for k, v in dp.state_dict(model).items()
    }
    values = {k: v * 2 if v.is_floating_point() else v for k, v in values.items()}  # graph
    new = dp.load_state_dict(model, values)
    w = new["bn"].weight
    assert type(w) is torch.nn.Parameter and w.is_leaf and w.requires_grad
    for buffer in (new["bn"].running_mean, new["bn"].num_batches_tracked):
        assert type(buffer) is torch.Tensor and not buffer.requires_grad and buffer.is_leaf
    assert type(new["frozen"]) is Frozen and not new["frozen"].requires_grad
    assert [n for n, _ in dp.named_parameters(new)] == ["bn.weight", "bn.bias"]


def test_load_state_dict_copies_so_later_writes_to_the_dict_or_model_do_not_leak() -> None:
    layer = dp.sample(dnn.LinearSpec(3, 2))
    values = {"weight": torch.ones(2, 3), "bias": torch.ones(2)}
    new = dp.load_state_dict(layer, values)
    values["weight"].zero_()
    assert new.weight.sum().item() == 6.0
    # A model loaded from another's state dict does not share its storage (an in-place
    # optimizer on one must not move the other).
    copy = dp.load_state_dict(layer, dp.state_dict(new))
    with torch.no_grad():
        copy.weight.add_(1)
    assert new.weight.sum().item() == 6.0


def test_load_state_dict_assign_shares_storage() -> None:
    layer = dp.sample(dnn.LinearSpec(3, 2))
    values = {"weight": torch.ones(2, 3), "bias": torch.ones(2)}
    new = dp.load_state_dict(layer, values, assign=True)
    assert new.weight.data_ptr() == values["weight"].data_ptr()
    assert new.weight.requires_grad and new.weight.is_leaf


def test_strict_reports_every_missing_unexpected_and_mismatched_key_in_one_error() -> None:
    model = dp.sample(dnn.SequentialSpec(dnn.LinearSpec(3, 4), dnn.BatchNorm1dSpec(4)))
    sd = {k: v.clone() for k, v in dp.state_dict(model).items()}
    del sd["0.bias"], sd["1.running_var"]
    sd["extra"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(3, 4)
    sd["1.num_batches_tracked"] = torch.tensor(0, dtype=torch.int32)
    with pytest.raises(dp.LoadError) as info:
        dp.load_state_dict(model, sd)
    e = info.value
    assert e.missing_keys == ["0.bias", "1.running_var"]
    assert e.unexpected_keys == ["extra"]
    assert e.mismatched_keys == ["0.weight", "1.num_batches_tracked"]
    for text in ("0.bias", "1.running_var", "extra", "float32[3, 4]", "int32[]", "Sequential"):
        assert text in str(e)
    assert isinstance(e, dp.DiffprogError)


def test_non_strict_reports_the_same_keys_as_torch() -> None:
    model = dp.sample(dnn.SequentialSpec(dnn.LinearSpec(3, 4), dnn.BatchNorm1dSpec(4)))
    torch_module = T.Sequential(T.Linear(3, 4), T.BatchNorm1d(4))
    sd = {k: torch.full_like(v, 3) for k, v in dp.state_dict(model).items()}
    del sd["0.bias"], sd["1.running_var"]
    sd["extra"] = torch.zeros(1)
    sd["2.weight"] = torch.zeros(1)
    result = dp.load_state_dict(model, sd, strict=False)
    incompatible = torch_module.load_state_dict(sd, strict=False)
    assert isinstance(result, dp.LoadResult)
    assert result.missing_keys == incompatible.missing_keys
    assert result.unexpected_keys == incompatible.unexpected_keys
    new, _, _ = result
    assert torch.equal(new[0].weight, torch.full((4, 3), 3.0))
    # A missing tensor keeps the skeleton's value, as in torch (a copy: nothing is shared).
    assert torch.equal(new[0].bias, model[0].bias) and new[0].bias is not model[0].bias
    assert new[0].bias.requires_grad and new[0].bias.is_leaf


def test_shape_mismatch_is_an_error_even_when_not_strict_as_torch() -> None:
    model = dp.sample(dnn.LinearSpec(3, 4))
    sd = {"weight": torch.zeros(4, 4)}
    with pytest.raises(RuntimeError, match="size mismatch"):
        T.Linear(3, 4).load_state_dict(sd, strict=False)
    with pytest.raises(dp.LoadError, match=r"'weight'.*float32\[4, 4\]"):
        dp.load_state_dict(model, sd, strict=False)


def test_dtype_mismatch_is_an_error_where_torch_casts_and_dtype_converts() -> None:
    model = dp.sample(dnn.BatchNorm1dSpec(2))
    sd64 = {k: v.double() if v.is_floating_point() else v for k, v in dp.state_dict(model).items()}
    torch_module = T.BatchNorm1d(2)
    torch_module.load_state_dict(sd64)  # torch casts silently into the module's float32
    assert torch_module.weight.dtype == torch.float32
    with pytest.raises(dp.LoadError, match=r"float64\[2\].*float32\[2\]") as info:
        dp.load_state_dict(model, sd64)
    assert info.value.mismatched_keys == ["weight", "bias", "running_mean", "running_var"]
    cast = dp.load_state_dict(model, sd64, dtype=torch.float32)
    assert cast.weight.dtype == torch.float32 and cast.num_batches_tracked.dtype == torch.int64
    half = dp.load_state_dict(model, sd64, dtype=torch.float16)
    assert half.weight.dtype == torch.float16 and half.weight.requires_grad
    # Integer tensors never convert: a different integer dtype is a mismatch.
    wrong = {**sd64, "num_batches_tracked": torch.tensor(0, dtype=torch.int32)}
    with pytest.raises(dp.LoadError, match="num_batches_tracked"):
        dp.load_state_dict(model, wrong, dtype=torch.float32)
    with pytest.raises(ValueError, match="floating-point"):
        dp.load_state_dict(model, sd64, dtype=torch.int64)


def _tied_model() -> dict[str, Any]:
    embed = dp.sample(dnn.EmbeddingSpec(5, 3), generator=_gen())
    head = dp.sample(dnn.LinearSpec(3, 5), generator=_gen(1))
    return {"embed": embed, "head": dnn.Linear(embed.weight, head.bias)}


def test_ties_come_back_tied() -> None:
    model = _tied_model()
    sd = {k: v.clone() + 1 for k, v in dp.state_dict(model).items()}
    sd["head.weight"] = sd["embed.weight"].clone()  # equal values under both keys
    new = dp.load_state_dict(model, sd)
    assert new["embed"].weight is new["head"].weight
    assert len(dp.flatten_parameters(new)) == 2
    assert torch.equal(new["embed"].weight, sd["embed.weight"])


def test_tied_keys_with_different_values_are_refused() -> None:
    model = _tied_model()
    sd = {k: v.clone() for k, v in dp.state_dict(model).items()}
    sd["head.weight"] = sd["head.weight"] + 1
    with pytest.raises(dp.LoadError, match="'embed.weight' and 'head.weight' hold different"):
        dp.load_state_dict(model, sd)
    # torch copies each key in turn into the one tensor: the last one wins, silently.
    torch_tied = _TorchTied()
    torch_tied.load_state_dict(sd)
    assert torch.equal(torch_tied.embed.weight, sd["head.weight"])


def test_tied_key_missing_is_reported_as_torch_does() -> None:
    model = _tied_model()
    sd = {k: v.clone() for k, v in dp.state_dict(model).items()}
    del sd["head.weight"]
    with pytest.raises(dp.LoadError) as info:
        dp.load_state_dict(model, sd)
    assert info.value.missing_keys == ["head.weight"]
    assert _TorchTied().load_state_dict(sd, strict=False).missing_keys == ["head.weight"]
    new, missing, _ = dp.load_state_dict(model, sd, strict=False)
    assert missing == ["head.weight"]
    assert new["embed"].weight is new["head"].weight  # the present key fills the tie


def test_meta_skeleton_takes_the_sources_tensors() -> None:
    spec = dnn.SequentialSpec(dnn.LinearSpec(3, 4), dnn.BatchNorm1dSpec(4))
    source = _randomised(dp.sample(spec), seed=4)
    loaded = dp.load_state_dict(dp.sample(spec, device="meta"), dp.state_dict(source))
    assert all(t.device.type == "cpu" for t in dp.state_dict(loaded).values())
    _assert_same_state(loaded, source)
    # Non-strict: what the source lacks stays on meta (there are no values to give it).
    partial = {k: v for k, v in dp.state_dict(source).items() if k != "0.bias"}
    new, missing, _ = dp.load_state_dict(dp.sample(spec, device="meta"), partial, strict=False)
    assert missing == ["0.bias"] and new[0].bias.is_meta and new[0].bias.requires_grad


def test_device_option_moves_every_tensor() -> None:
    model = dp.sample(dnn.LinearSpec(3, 2), device="meta")
    new = dp.load_state_dict(
        model, {"weight": torch.ones(2, 3), "bias": torch.ones(2)}, device="cpu"
    )
    assert new.weight.device.type == "cpu"


def test_key_map_renames_source_keys() -> None:
    layer = dp.sample(dnn.LinearSpec(3, 2))
    sd = {"module.weight": torch.ones(2, 3), "module.bias": torch.ones(2), "junk": torch.ones(1)}
    fn = dp.load_state_dict(
        layer, sd, key_map=lambda k: k.removeprefix("module.") if k != "junk" else None
    )
    assert torch.equal(fn.weight, torch.ones(2, 3))
    table = dp.load_state_dict(
        layer, {"w": torch.ones(2, 3), "bias": torch.ones(2)}, key_map={"w": "weight"}
    )
    assert torch.equal(table.weight, torch.ones(2, 3))
    with pytest.raises(dp.LoadError, match="'w'.*'weight'.*both map to 'weight'"):
        dp.load_state_dict(
            layer,
            {"w": torch.ones(2, 3), "weight": torch.zeros(2, 3), "bias": torch.ones(2)},
            key_map={"w": "weight"},
        )
    with pytest.raises(dp.LoadError, match=r"'w' \(as 'weight'\)"):
        dp.load_state_dict(
            layer, {"w": torch.ones(3, 3), "bias": torch.ones(2)}, key_map={"w": "weight"}
        )


def test_check_finite_refuses_nan_and_inf() -> None:
    layer = dp.sample(dnn.LinearSpec(3, 2))
    sd = {"weight": torch.full((2, 3), float("nan")), "bias": torch.tensor([1.0, float("inf")])}
    dp.load_state_dict(layer, sd)  # not asked: loads
    with pytest.raises(dp.LoadError, match="NaN or infinite") as info:
        dp.load_state_dict(layer, sd, check_finite=True)
    assert info.value.mismatched_keys == ["weight", "bias"]


def test_state_dict_values_must_be_dense_tensors_with_values() -> None:
    layer = dp.sample(dnn.LinearSpec(3, 2))
    cases: list[Any] = [
        {"weight": [[1.0]], "bias": torch.ones(2)},
        {"weight": torch.ones(2, 3).to_sparse(), "bias": torch.ones(2)},
        {"weight": torch.ones(2, 3, device="meta"), "bias": torch.ones(2)},
        {1: torch.ones(2, 3)},
    ]
    for sd in cases:
        with pytest.raises(dp.LoadError, match="cannot load the state dict"):
            dp.load_state_dict(layer, sd)
    with pytest.raises(dp.LoadError, match="not a mapping"):
        dp.load_state_dict(layer, [torch.ones(1)])  # type: ignore[arg-type]


class _Cell(dp.Parameterized):
    weight: dp.Parameter
    bias: dp.Parameter

    def flatten_parameters(self) -> list[dp.Parameter]:
        return [self.weight, self.bias]

    def replace_own_parameters(self, stream: dp.ParamStream) -> _Cell:
        return _Cell(stream.next_parameter(), stream.next_parameter())


def test_load_into_a_hand_written_instance() -> None:
    model = {
        "cell": _Cell(dp.make_independent(torch.zeros(2, 2)), dp.make_independent(torch.zeros(2)))
    }
    assert list(dp.state_dict(model)) == ["cell.weight", "cell.bias"]
    new = dp.load_state_dict(model, {"cell.weight": torch.ones(2, 2), "cell.bias": torch.ones(2)})
    assert torch.equal(new["cell"].weight, torch.ones(2, 2)) and new["cell"].weight.requires_grad
    assert torch.equal(model["cell"].weight, torch.zeros(2, 2))
    # From a meta skeleton too (a meta slot takes a tensor of any device).
    meta = {
        "cell": _Cell(*(dp.make_independent(torch.zeros(s, device="meta")) for s in [(2, 2), (2,)]))
    }
    loaded = dp.load_state_dict(meta, {"cell.weight": torch.ones(2, 2), "cell.bias": torch.ones(2)})
    assert torch.equal(loaded["cell"].bias, torch.ones(2))


def test_a_hand_written_instance_takes_a_dtype_conversion_through_its_own_replace() -> None:
    # The loaded tensors go back through the instance's replace_own_parameters (map_tensors),
    # so dtype= converts its parameters as it converts every other tensor.
    model = {
        "cell": _Cell(dp.make_independent(torch.zeros(2, 2)), dp.make_independent(torch.zeros(2)))
    }
    sd = {"cell.weight": torch.ones(2, 2), "cell.bias": torch.ones(2)}
    new = dp.load_state_dict(model, sd, dtype=torch.float64)
    assert new["cell"].weight.dtype == torch.float64 and new["cell"].weight.requires_grad
    assert torch.equal(new["cell"].bias, torch.ones(2, dtype=torch.float64))
    assert model["cell"].weight.dtype == torch.float32  # the skeleton is unchanged


# ---------------------------------------------------------------- files


def _model() -> Any:
    spec = dnn.SequentialSpec(dnn.LinearSpec(3, 4), dnn.BatchNorm1dSpec(4), dnn.LinearSpec(4, 2))
    return _randomised(dp.sample(spec, generator=_gen()), seed=5), spec


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_params_load_params_round_trip_into_a_meta_skeleton(
    tmp_path: Path, suffix: str
) -> None:
    model, spec = _model()
    path = tmp_path / f"model{suffix}"
    dp.save_params(model, path)
    loaded = dp.load_params(dp.sample(spec, device="meta"), path)
    _assert_same_state(loaded, model)
    assert loaded[0].weight.requires_grad and loaded[0].weight.is_leaf
    assert type(loaded[1].running_mean) is torch.Tensor
    x = torch.randn(5, 3)
    with dnn.evaluating():
        assert torch.equal(loaded(x), model(x))


def test_save_params_writes_a_standard_safetensors_file(tmp_path: Path) -> None:
    model, _ = _model()
    path = tmp_path / "model.safetensors"
    dp.save_params(model, path, metadata={"epoch": "3"})
    read = safetensors.torch.load_file(path)
    sd = dp.state_dict(model)
    assert sorted(read) == sorted(sd)
    for key in sd:
        assert torch.equal(read[key], sd[key])
    with safetensors.safe_open(path, "pt") as f:  # type: ignore[no-untyped-call]
        assert f.metadata()["epoch"] == "3"


def test_load_params_reads_files_written_by_safetensors_and_torch(tmp_path: Path) -> None:
    torch_module = T.Sequential(T.Conv2d(1, 2, 3), T.BatchNorm2d(2))
    torch_module.train()(torch.randn(4, 1, 5, 5))  # running statistics move
    spec = dnn.SequentialSpec(dnn.Conv2dSpec(1, 2, 3), dnn.BatchNorm2dSpec(2))
    safetensors.torch.save_file(torch_module.state_dict(), tmp_path / "a.safetensors")
    torch.save(torch_module.state_dict(), tmp_path / "a.pt")
    for name in ("a.safetensors", "a.pt"):
        loaded = dp.load_params(dp.sample(spec, device="meta"), tmp_path / name)
        for key, t in torch_module.state_dict().items():
            assert torch.equal(dp.state_dict(loaded)[key], t), (name, key)


def test_tied_weights_are_stored_once_and_a_file_with_both_keys_loads(tmp_path: Path) -> None:
    model = _tied_model()
    path = tmp_path / "tied.safetensors"
    dp.save_params(model, path)
    assert sorted(safetensors.torch.load_file(path)) == ["embed.weight", "head.bias"]
    assert os.path.getsize(path) < 4 * (15 + 15 + 5) + 500  # the table once
    new = dp.load_params(model, path)
    assert new["embed"].weight is new["head"].weight
    assert torch.equal(new["embed"].weight, model["embed"].weight)
    # A file written from torch holds the tied weight under both keys.
    both = {k: v.clone() for k, v in dp.state_dict(model).items()}
    safetensors.torch.save_file(both, tmp_path / "both.safetensors")
    again = dp.load_params(model, tmp_path / "both.safetensors")
    assert again["embed"].weight is again["head"].weight
    # .pt: torch.save keeps the one storage.
    dp.save_params(model, tmp_path / "tied.pt")
    read = torch.load(tmp_path / "tied.pt")
    assert read["embed.weight"].data_ptr() == read["head.weight"].data_ptr()
    assert dp.load_params(model, tmp_path / "tied.pt")["head"].weight is not None


def test_load_tensors_expands_aliases(tmp_path: Path) -> None:
    model = _tied_model()
    dp.save_params(model, tmp_path / "tied.safetensors")
    read = dp.load_tensors(tmp_path / "tied.safetensors")
    assert list(read) == ["embed.weight", "head.bias", "head.weight"]
    assert read["embed.weight"] is read["head.weight"]


def test_save_tensors_stores_torch_tied_state_dict_once(tmp_path: Path) -> None:
    torch_tied = T.Linear(3, 3)
    sd = {"a": torch_tied.weight.detach(), "b": torch_tied.weight.detach()}  # two tensors, one view
    dp.save_tensors(sd, tmp_path / "t.safetensors")
    assert list(safetensors.torch.load_file(tmp_path / "t.safetensors")) == ["a"]
    assert list(dp.load_tensors(tmp_path / "t.safetensors")) == ["a", "b"]


def test_loaded_tensors_from_a_pt_file_never_share_storage(tmp_path: Path) -> None:
    base = torch.arange(8.0)
    torch.save({"weight": base[:4].view(2, 2), "bias": base[4:6]}, tmp_path / "views.pt")
    layer = dp.sample(dnn.LinearSpec(2, 2))
    new = dp.load_params(layer, tmp_path / "views.pt")
    assert new.weight.untyped_storage().data_ptr() != new.bias.untyped_storage().data_ptr()
    assert torch.equal(new.bias, torch.tensor([4.0, 5.0]))


def test_pt_file_reads_with_plain_torch_load(tmp_path: Path) -> None:
    model = {"bn": _randomised(dp.sample(dnn.BatchNorm1dSpec(3)), 6), "f": Frozen(torch.ones(2))}
    dp.save_params(model, tmp_path / "m.pt")
    read = torch.load(tmp_path / "m.pt")  # torch's safe default, weights_only=True
    assert torch.load(tmp_path / "m.pt", weights_only=True).keys() == read.keys()
    assert list(read) == list(dp.state_dict(model))
    assert all(type(t) is torch.Tensor for t in read.values())
    back = dp.load_params(model, tmp_path / "m.pt")
    _assert_same_state(back, model)
    assert type(back["f"]) is Frozen


def test_pt_files_are_read_with_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, spec = _model()
    dp.save_params(model, tmp_path / "m.pt")
    calls: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    dp.load_params(dp.sample(spec, device="meta"), tmp_path / "m.pt")
    dp.load_tensors(tmp_path / "m.pt")
    assert len(calls) == 2 and all(c["weights_only"] is True for c in calls)


def test_format_by_suffix_or_argument(tmp_path: Path) -> None:
    model, spec = _model()
    dp.save_params(model, tmp_path / "m.weights", format="pt")
    assert isinstance(torch.load(tmp_path / "m.weights"), dict)
    dp.save_params(model, tmp_path / "m.data", format="safetensors")
    safetensors.torch.load_file(tmp_path / "m.data")
    for name in ("m.weights", "m.data"):  # loading tells the format from the content
        _assert_same_state(dp.load_params(dp.sample(spec, device="meta"), tmp_path / name), model)
    with pytest.raises(ValueError, match=r"suffix '\.ckpt'.*format="):
        dp.save_params(model, tmp_path / "m.ckpt")
    with pytest.raises(dp.LoadError, match="not a pt file: it looks like a safetensors"):
        dp.load_params(model, tmp_path / "m.data", format="pt")
    with pytest.raises(ValueError, match="metadata"):
        dp.save_params(model, tmp_path / "m.pt", metadata={"a": "b"})


def test_save_params_refuses_a_meta_model(tmp_path: Path) -> None:
    _, spec = _model()
    for suffix in (".safetensors", ".pt"):
        with pytest.raises(dp.SaveError, match="meta device"):
            dp.save_params(dp.sample(spec, device="meta"), tmp_path / f"m{suffix}")
        assert not (tmp_path / f"m{suffix}").exists()


def test_save_is_atomic_a_failed_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = _model()
    path = tmp_path / "m.safetensors"
    dp.save_params(model, path)
    old = path.read_bytes()

    def broken(f: Any, tensors: Any, metadata: Any) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(_files._safetensors, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        dp.save_params(_randomised(model, 7), path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left behind


def test_saved_file_has_the_usual_permissions(tmp_path: Path) -> None:
    model, _ = _model()
    umask = os.umask(0o022)
    os.umask(umask)
    dp.save_params(model, tmp_path / "m.safetensors")
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o666 & ~umask


def test_load_params_reads_only_the_skeletons_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = {"weight": torch.ones(2, 3), "bias": torch.ones(2), "other": torch.ones(1000)}
    dp.save_tensors(big, tmp_path / "m.safetensors")
    read: list[str] = []
    real = _files._safetensors.read_tensor

    def spy(f: Any, entry: Any, key: str, path: str) -> torch.Tensor:
        read.append(key)
        return real(f, entry, key, path)

    monkeypatch.setattr(_files._safetensors, "read_tensor", spy)
    new, _, unexpected = dp.load_params(
        dp.sample(dnn.LinearSpec(3, 2), device="meta"),
        tmp_path / "m.safetensors",
        strict=False,
        mmap=False,
    )
    assert read == ["weight", "bias"] and unexpected == ["other"]
    assert torch.equal(new.weight, torch.ones(2, 3))


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int32,
        torch.int8,
        torch.uint8,
        torch.bool,
    ],
)
def test_safetensors_dtypes_round_trip_with_the_safetensors_library(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    t = (torch.arange(12).reshape(3, 4) % 2).to(dtype)
    dp.save_tensors({"t": t, "empty": torch.zeros(0, 2, dtype=dtype)}, tmp_path / "a.safetensors")
    assert torch.equal(safetensors.torch.load_file(tmp_path / "a.safetensors")["t"], t)
    safetensors.torch.save_file({"t": t}, tmp_path / "b.safetensors")
    assert torch.equal(dp.load_tensors(tmp_path / "b.safetensors")["t"], t)
    assert dp.load_tensors(tmp_path / "a.safetensors")["empty"].shape == (0, 2)


@pytest.mark.cuda
def test_load_params_onto_the_skeletons_device_cuda(tmp_path: Path) -> None:
    model, spec = _model()
    dp.save_params(model, tmp_path / "m.safetensors")
    on_gpu = dp.load_params(dp.sample(spec, device="cuda"), tmp_path / "m.safetensors")
    assert all(t.is_cuda for t in dp.state_dict(on_gpu).values())
    moved = dp.load_params(
        dp.sample(spec, device="meta"), tmp_path / "m.safetensors", device="cuda"
    )
    assert all(t.is_cuda for t in dp.state_dict(moved).values())
    back = dp.load_params(dp.sample(spec), tmp_path / "m.safetensors")
    _assert_same_state(back, model)


def test_format_is_told_from_the_content_for_every_header_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: a safetensors header of 128 bytes starts with byte 0x80, which is also how
    # a pickle starts; the file was taken for a .pt file (and format="safetensors" refused).
    def no_torch_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a safetensors file went to torch.load")

    monkeypatch.setattr(torch, "load", no_torch_load)
    path = tmp_path / "m.safetensors"
    lengths = set()
    for size in range(0, 300, 3):
        dp.save_tensors({"w": torch.ones(2)}, path, metadata={"pad": "x" * size})
        lengths.add(path.read_bytes()[0])
        for format in (None, "safetensors"):
            read = dp.load_tensors(path, format=format)  # type: ignore[arg-type]
            assert list(read) == ["w"] and torch.equal(read["w"], torch.ones(2))
    assert 0x80 in lengths


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_tie_in_the_file_loaded_into_an_untied_model_gives_separate_memory(
    tmp_path: Path, suffix: str
) -> None:
    # A file from a tied model (one stored tensor under two keys) into a model whose two
    # weights are separate: each gets its own memory, or an in-place optimizer step on one
    # would move the other.
    dp.save_params(_tied_model(), tmp_path / f"tied{suffix}")
    untied = {
        "embed": dp.sample(dnn.EmbeddingSpec(5, 3)),
        "head": dp.sample(dnn.LinearSpec(3, 5)),
    }
    for mmap in (False, True):
        new = dp.load_params(untied, tmp_path / f"tied{suffix}", mmap=mmap)
        assert torch.equal(new["embed"].weight, new["head"].weight)
        with torch.no_grad():
            new["head"].weight.add_(1)
        assert not torch.equal(new["embed"].weight, new["head"].weight)


def test_mmap_load_gives_the_same_model_and_never_writes_the_file(tmp_path: Path) -> None:
    model, spec = _model()
    path = tmp_path / "m.safetensors"
    dp.save_params(model, path)
    data = path.read_bytes()
    mapped = dp.load_params(dp.sample(spec, device="meta"), path, mmap=True)
    _assert_same_state(mapped, model)
    assert mapped[0].weight.requires_grad and mapped[0].weight.is_leaf
    with torch.no_grad():  # an in-place optimizer writes into the mapped pages
        for p in dp.flatten_parameters(mapped):
            p.add_(1)
    assert path.read_bytes() == data  # private mapping: the file is unchanged
    # Saving over the file (a new file renamed into place) leaves the mapped model intact.
    dp.save_params(model, path)
    assert torch.equal(mapped[0].weight, model[0].weight + 1)


_PEAK_CHILD = """
import gc, sys
import torch
import diffprog as dp
from diffprog.nn import LinearSpec, SequentialSpec

def high_water_mark():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

skeleton = dp.sample(SequentialSpec(*(LinearSpec(2048, 2048) for _ in range(4))), device="meta")
gc.collect()
before = high_water_mark()
model = dp.load_params(skeleton, sys.argv[1], mmap=sys.argv[2] == "mmap")
# every value used once (a mapped file is read as it is used)
total = sum(float(t.sum()) for t in dp.state_dict(model).values())
print(high_water_mark() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize(
    ("suffix", "mode"), [(".safetensors", "mmap"), (".safetensors", "read"), (".pt", "read")]
)
def test_loading_into_a_meta_skeleton_allocates_the_model_once(
    tmp_path: Path, suffix: str, mode: str
) -> None:
    # 67 MB of parameters; the peak resident set of a fresh process grows by the model's
    # size, not twice it (no initialisation, no file buffer plus copy).
    spec = dnn.SequentialSpec(*(dnn.LinearSpec(2048, 2048) for _ in range(4)))
    sd = {k: torch.randn(v.shape) for k, v in dp.state_dict(dp.sample(spec, device="meta")).items()}
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    path = tmp_path / f"big{suffix}"
    dp.save_tensors(sd, path)
    del sd
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD, str(path), mode],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout
    growth = int(out.split()[-1])
    assert 0.9 * nbytes < growth < 1.3 * nbytes, growth / nbytes


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_is_durable_by_default_and_durable_false_skips_fsync(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, spec = _model()
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    dp.save_params(model, tmp_path / f"a{suffix}")
    assert len(synced) == 2  # the file, then the folder after the rename
    dp.save_params(model, tmp_path / f"b{suffix}", durable=False)
    assert len(synced) == 2
    _assert_same_state(
        dp.load_params(dp.sample(spec, device="meta"), tmp_path / f"b{suffix}"), model
    )
