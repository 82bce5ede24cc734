"""PyTorch interop both ways, with real torch.nn modules and their diffprog equivalents.

A Linear stack, a CNN with BatchNorm and dropout, a multi-layer LSTM (batch_first and not), a
Transformer encoder layer and an Embedding with a tied output: a module's ``state_dict()`` (or a
safetensors file written from one by ``safetensors.torch.save_file``/``save_model``) loads into
the diffprog model with no renaming; a diffprog ``state_dict`` (or ``save_params`` file) loads
into the torch module with ``load_state_dict(strict=True)``; outputs, gradients and the state
after a training pass (BatchNorm's running statistics) are equal after either transfer, in
train mode (dropout drawn from the same global seed) and in eval mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import diffprog as dp
from diffprog import nn

tnn = torch.nn


def x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def randomise(module: tnn.Module, seed: int = 1) -> tnn.Module:
    """Random parameters and running statistics: a transfer that drops any would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)
    return module


# --------------------------------------------------------------------------------------------
# The models: each a torch.nn module and the diffprog model with the same names
# --------------------------------------------------------------------------------------------


def mlp_torch() -> tnn.Module:
    return tnn.Sequential(
        tnn.Linear(4, 16), tnn.ReLU(), tnn.Linear(16, 16), tnn.Tanh(), tnn.Linear(16, 3)
    )


def mlp_dp(device: str | None) -> Any:
    spec = nn.SequentialSpec(
        nn.LinearSpec(4, 16), torch.relu, nn.LinearSpec(16, 16), torch.tanh, nn.LinearSpec(16, 3)
    )
    return dp.sample(spec, device=device)


class TorchCNN(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = tnn.BatchNorm2d(4)
        self.conv2 = tnn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn2 = tnn.BatchNorm2d(8)
        self.drop = tnn.Dropout(0.25)
        self.fc = tnn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(self.drop(x.flatten(1)))


class DpCNN(dp.Parameterized):
    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d
    conv2: nn.Conv2d
    bn2: nn.BatchNorm2d
    drop: nn.Dropout
    fc: nn.Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(self.drop(x.flatten(1)))


def cnn_dp(device: str | None) -> DpCNN:
    specs = [
        nn.Conv2dSpec(1, 4, 3, padding=1),
        nn.BatchNorm2dSpec(4),
        nn.Conv2dSpec(4, 8, 3, padding=1, bias=False),
        nn.BatchNorm2dSpec(8),
        nn.DropoutSpec(0.25),
        nn.LinearSpec(8 * 2 * 2, 5),
    ]
    g = torch.Generator().manual_seed(2) if device != "meta" else None
    return DpCNN(*(dp.sample(s, generator=g, device=device) for s in specs))


class TorchTagger(tnn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.lstm = tnn.LSTM(5, 8, num_layers=3, dropout=0.3, batch_first=batch_first)
        self.head = tnn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out)


class DpTagger(dp.Parameterized):
    lstm: nn.LSTM
    head: nn.Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out)


def tagger_dp(batch_first: bool) -> Callable[[str | None], DpTagger]:
    def build(device: str | None) -> DpTagger:
        spec = nn.LSTMSpec(5, 8, num_layers=3, dropout=0.3, batch_first=batch_first)
        return DpTagger(
            dp.sample(spec, device=device), dp.sample(nn.LinearSpec(8, 3), device=device)
        )

    return build


def encoder_torch() -> tnn.Module:
    return tnn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)


def encoder_dp(device: str | None) -> Any:
    spec = nn.TransformerEncoderLayerSpec(16, 4, 32, dropout=0.1, batch_first=True)
    return dp.sample(spec, device=device)


class TorchLM(tnn.Module):
    """An embedding, a norm and an output layer whose weight is the embedding's (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = tnn.Embedding(20, 8)
        self.norm = tnn.LayerNorm(8)
        self.head = tnn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(ids)))


class DpLM(dp.Parameterized):
    emb: nn.Embedding
    norm: nn.LayerNorm
    head: nn.Linear

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(ids)))


def lm_dp(device: str | None) -> DpLM:
    emb = dp.sample(nn.EmbeddingSpec(20, 8), device=device)
    return DpLM(emb, dp.sample(nn.LayerNormSpec(8), device=device), nn.Linear(emb.weight))


@dataclasses.dataclass(frozen=True)
class Pair:
    torch_model: Callable[[], tnn.Module]
    dp_model: Callable[[str | None], Any]  # device -> the diffprog model ("meta": a skeleton)
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    tied: bool = False


PAIRS = {
    "linear-stack": Pair(mlp_torch, mlp_dp, lambda: (x(6, 4),)),
    "cnn-batchnorm": Pair(TorchCNN, cnn_dp, lambda: (x(6, 1, 8, 8),)),
    "lstm": Pair(lambda: TorchTagger(False), tagger_dp(False), lambda: (x(7, 4, 5),)),
    "lstm-batch_first": Pair(lambda: TorchTagger(True), tagger_dp(True), lambda: (x(4, 7, 5),)),
    "transformer-encoder-layer": Pair(encoder_torch, encoder_dp, lambda: (x(3, 6, 16),)),
    "embedding-tied-head": Pair(
        TorchLM, lm_dp, lambda: (torch.tensor([[1, 5, 19, 0], [3, 3, 7, 2]]),), tied=True
    ),
}


# --------------------------------------------------------------------------------------------
# Comparing a torch module and a diffprog model
# --------------------------------------------------------------------------------------------


def assert_same_state(model: Any, module: tnn.Module) -> None:
    ours, theirs = dp.state_dict(model), module.state_dict()
    assert list(ours) == list(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype, key
        assert_close(ours[key], t, rtol=0, atol=0, msg=key)


def assert_same_eval(model: Any, module: tnn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    module.eval()
    with nn.evaluating():
        ours = model(*inputs)
    assert_close(ours, module(*inputs), rtol=0, atol=0)


def assert_same_train(model: Any, module: tnn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """One training-mode forward: output (dropout masks from the same global seed), gradients,
    and the state after it (running statistics updated in place by torch, handed back by
    ``nn.training`` here)."""
    module.train()
    torch.manual_seed(11)
    theirs = module(*inputs)
    torch.manual_seed(11)
    ours, updated = nn.training(lambda m: m(*inputs), model)
    assert_close(ours, theirs, rtol=0, atol=0)
    assert_same_state(updated, module)
    named = dp.named_parameters(model)
    torch_named = list(module.named_parameters())
    assert [n for n, _ in named] == [n for n, _ in torch_named]
    grads = torch.autograd.grad(ours.square().sum(), [p for _, p in named])
    torch_grads = torch.autograd.grad(theirs.square().sum(), [p for _, p in torch_named])
    for (name, _), g, tg in zip(named, grads, torch_grads, strict=True):
        assert_close(g, tg, rtol=1e-5, atol=1e-6, msg=name)


def assert_equivalent(model: Any, module: tnn.Module, pair: Pair) -> None:
    assert_same_state(model, module)
    assert_same_eval(model, module, pair.inputs())
    assert_same_train(model, module, pair.inputs())


def trained_dp_model(pair: Pair) -> Any:
    """A diffprog model with its own weights and running statistics moved by a training pass."""
    model = pair.dp_model(None)
    g = torch.Generator().manual_seed(4)
    params = [
        dp.make_independent(torch.rand(p.shape, generator=g) - 0.5)
        for p in dp.flatten_parameters(model)
    ]
    model = dp.replace_parameters(model, params)
    _, model = nn.training(lambda m: m(*pair.inputs()), model)
    return model


def fresh_torch_module(pair: Pair) -> tnn.Module:
    torch.manual_seed(123)  # weights unlike the diffprog model's
    return pair.torch_model()


# --------------------------------------------------------------------------------------------
# torch -> diffprog
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIRS))
def test_a_torch_state_dict_loads_into_the_diffprog_model_with_no_renaming(name: str) -> None:
    pair = PAIRS[name]
    module = randomise(pair.torch_model())
    model = dp.load_state_dict(pair.dp_model("meta"), module.state_dict())
    if pair.tied:
        assert model.head.weight is model.emb.weight  # the tie comes back
    assert_equivalent(model, module, pair)


@pytest.mark.parametrize("writer", ["save_file", "save_model"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_a_safetensors_file_written_from_torch_loads_into_the_diffprog_model(
    name: str, writer: str, tmp_path: Path
) -> None:
    pair = PAIRS[name]
    module = randomise(pair.torch_model())
    path = tmp_path / "model.safetensors"
    if writer == "save_model":
        # stores a tied tensor once and names the dropped key in the metadata
        safetensors.torch.save_model(module, str(path))
    elif pair.tied:
        with pytest.raises(RuntimeError, match="share memory"):  # safetensors' own refusal
            safetensors.torch.save_file(module.state_dict(), str(path))
        return
    else:
        safetensors.torch.save_file(module.state_dict(), str(path))
    model = dp.load_params(pair.dp_model("meta"), path)
    if pair.tied:
        assert model.head.weight is model.emb.weight
    assert_equivalent(model, module, pair)


# --------------------------------------------------------------------------------------------
# diffprog -> torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIRS))
def test_a_diffprog_state_dict_loads_into_torch_strictly(name: str) -> None:
    pair = PAIRS[name]
    model = trained_dp_model(pair)
    module = fresh_torch_module(pair)
    result = module.load_state_dict(dp.state_dict(model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    if pair.tied:
        assert module.head.weight is module.emb.weight
    assert_equivalent(model, module, pair)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_a_save_params_file_loads_into_torch(name: str, suffix: str, tmp_path: Path) -> None:
    pair = PAIRS[name]
    model = trained_dp_model(pair)
    path = tmp_path / f"model{suffix}"
    dp.save_params(model, path)
    module = fresh_torch_module(pair)
    if suffix == ".pt":
        module.load_state_dict(torch.load(path), strict=True)  # torch's safe default
    elif pair.tied:
        # a tie is stored once; safetensors' load_model restores the other key, as for its own
        # save_model files
        missing, unexpected = safetensors.torch.load_model(module, str(path), strict=True)
        assert not missing and not unexpected
    else:
        module.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    assert_equivalent(model, module, pair)


@pytest.mark.parametrize("name", list(PAIRS))
def test_round_trip_torch_to_diffprog_to_torch_changes_nothing(name: str) -> None:
    pair = PAIRS[name]
    module = randomise(pair.torch_model())
    model = dp.load_state_dict(pair.dp_model("meta"), module.state_dict())
    back = fresh_torch_module(pair)
    back.load_state_dict(dp.state_dict(model), strict=True)
    for (key, a), b in zip(module.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


# --------------------------------------------------------------------------------------------
# from_torch on the models built only from supported layers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear-stack", "transformer-encoder-layer"])
def test_from_torch_gives_the_equivalent_model(name: str) -> None:
    pair = PAIRS[name]
    module = randomise(pair.torch_model())
    model = nn.from_torch(module)
    assert type(model) is type(pair.dp_model("meta"))
    assert_equivalent(model, module, pair)


@pytest.mark.parametrize(
    "name", ["cnn-batchnorm", "lstm", "lstm-batch_first", "embedding-tied-head"]
)
def test_from_torch_of_a_registered_model_class_gives_the_equivalent_model(name: str) -> None:
    """A model class of one's own: registering its diffprog twin (same field names) is enough."""
    for torch_type, dp_type in [(TorchCNN, DpCNN), (TorchTagger, DpTagger), (TorchLM, DpLM)]:
        nn.register_from_torch(torch_type, dp_type)
    pair = PAIRS[name]
    module = randomise(pair.torch_model())
    model = nn.from_torch(module)
    assert type(model) is type(pair.dp_model("meta"))
    if pair.tied:
        assert model.head.weight is model.emb.weight
    assert_equivalent(model, module, pair)


# --------------------------------------------------------------------------------------------
# Names that differ: key_map
# --------------------------------------------------------------------------------------------


class HubLM(tnn.Module):
    """The language model of DpLM under other names, with a buffer DpLM does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = tnn.Embedding(20, 8)
        self.ln_f = tnn.LayerNorm(8)
        self.lm_head = tnn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.word_embeddings.weight
        self.register_buffer("position_ids", torch.arange(4))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(self.word_embeddings(ids)))


RENAMES = {
    "word_embeddings.weight": "emb.weight",
    "ln_f.weight": "norm.weight",
    "ln_f.bias": "norm.bias",
    "lm_head.weight": "head.weight",
}


def test_key_map_loads_a_model_whose_names_differ_both_ways() -> None:
    module = randomise(HubLM())
    ids = torch.tensor([[1, 5, 19, 0]])
    # Without it: one error listing every missing and unexpected key, nothing loaded.
    with pytest.raises(dp.LoadError, match="missing") as info:
        dp.load_state_dict(lm_dp("meta"), module.state_dict())
    assert "position_ids" in str(info.value)

    def key_map(key: str) -> str | None:
        # a function: rename, and skip (None) what the diffprog model has no place for
        return None if key == "position_ids" else RENAMES[key]

    model = dp.load_state_dict(lm_dp("meta"), module.state_dict(), key_map=key_map)
    assert model.head.weight is model.emb.weight
    module.eval()
    with nn.evaluating():
        assert_close(model(ids), module(ids), rtol=0, atol=0)

    # A dict maps the keys it names and keeps the others; the extra buffer is then unexpected,
    # which a non-strict load reports and skips.
    result = dp.load_state_dict(lm_dp("meta"), module.state_dict(), key_map=RENAMES, strict=False)
    assert result.unexpected_keys == ["position_ids"] and result.missing_keys == []
    assert torch.equal(result.model.norm.bias, module.ln_f.bias)

    # The other way: rename diffprog's keys to torch's; the module keeps its own buffer.
    back = {new: old for old, new in RENAMES.items()}
    torch.manual_seed(9)
    other = HubLM()
    renamed = {back[key]: t for key, t in dp.state_dict(model).items()}
    missing, unexpected = other.load_state_dict(renamed, strict=False)
    assert missing == ["position_ids"] and unexpected == []
    other.eval()
    assert_close(other(ids), module(ids), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# On a GPU (pytest -m cuda)
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(PAIRS))
def test_cuda_transfers_keep_the_device_and_outputs_agree(name: str) -> None:
    pair = PAIRS[name]
    module = randomise(pair.torch_model()).cuda().eval()
    inputs = tuple(t.cuda() for t in pair.inputs())
    # torch -> diffprog: a meta skeleton takes the source's device
    model = dp.load_state_dict(pair.dp_model("meta"), module.state_dict())
    assert all(t.is_cuda for t in dp.state_dict(model).values())
    with torch.no_grad(), nn.evaluating():
        assert_close(model(*inputs), module(*inputs))
    # diffprog -> torch, strictly, and from_torch keeps the device too
    other = fresh_torch_module(pair).cuda().eval()
    other.load_state_dict(dp.state_dict(model), strict=True)
    with torch.no_grad():
        assert_close(other(*inputs), module(*inputs))
    if name in ("linear-stack", "transformer-encoder-layer"):
        converted = nn.from_torch(module)
        assert all(t.is_cuda for t in dp.state_dict(converted).values())
        with torch.no_grad(), nn.evaluating():
            assert_close(converted(*inputs), module(*inputs))
