"""Embedding against torch.nn.Embedding, and weight tying with an output projection."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffprog as dp
from diffprog import nn
from diffprog.optim import GD, run_step

DTYPES = [torch.float32, torch.float64]
CONFIGS: list[dict[str, Any]] = [
    {"num_embeddings": 10, "embedding_dim": 3},
    {"num_embeddings": 5, "embedding_dim": 2, "padding_idx": 1},
    {"num_embeddings": 7, "embedding_dim": 4, "padding_idx": -1},
    {"num_embeddings": 1, "embedding_dim": 8, "padding_idx": 0},
    {"num_embeddings": 12, "embedding_dim": 5, "scale_grad_by_freq": True},
]


def _pair(
    kwargs: dict[str, Any], dtype: torch.dtype, seed: int = 0
) -> tuple[nn.Embedding, torch.nn.Embedding]:
    torch.manual_seed(seed)
    reference = torch.nn.Embedding(**kwargs, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    ours = dp.sample(nn.EmbeddingSpec(**kwargs), generator=generator, dtype=dtype)
    return ours, reference


def _grads(
    layer: nn.Embedding, reference: torch.nn.Embedding, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], tuple[torch.Tensor, ...]]:
    out, expected = layer(indices), reference(indices)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    grads = dp.grad((out * cotangent).sum(), dp.flatten_parameters(layer))
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), [reference.weight])
    return out, expected, grads, expected_grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_sample_equals_torch_nn_embedding_bit_for_bit(
    kwargs: dict[str, Any], dtype: torch.dtype
) -> None:
    for seed in (0, 42):
        ours, reference = _pair(kwargs, dtype, seed)
        assert [k for k, _ in dp.named_parameters(ours)] == list(reference.state_dict())
        assert type(ours.weight) is dp.Parameter
        assert ours.weight.dtype == dtype
        assert torch.equal(ours.weight, reference.weight)
        assert ours.padding_idx == reference.padding_idx  # made non-negative, as torch does
        assert ours.num_embeddings == reference.num_embeddings
        assert ours.embedding_dim == reference.embedding_dim


@pytest.mark.parametrize("kwargs", CONFIGS[:3])
def test_meta_device_gives_the_shape_without_data(kwargs: dict[str, Any]) -> None:
    ours = dp.sample(nn.EmbeddingSpec(**kwargs), device="meta")
    assert ours.weight.is_meta
    assert ours.weight.shape == (kwargs["num_embeddings"], kwargs["embedding_dim"])


@settings(max_examples=40, deadline=None)
@given(
    config=st.sampled_from(CONFIGS),
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_forward_and_gradients_match_torch_nn_embedding(
    config: dict[str, Any], shape: list[int], dtype: torch.dtype, seed: int
) -> None:
    ours, reference = _pair(config, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(config["num_embeddings"], shape, generator=g)
    out, expected, grads, expected_grads = _grads(ours, reference, indices)
    assert out.shape == (*shape, config["embedding_dim"])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads[0], expected_grads[0])
    if ours.padding_idx is not None:
        assert not grads[0][ours.padding_idx].any()


def test_int32_indices_work_as_in_torch() -> None:
    ours, reference = _pair(CONFIGS[0], torch.float32)
    indices = torch.tensor([[1, 2], [3, 9]], dtype=torch.int32)
    torch.testing.assert_close(ours(indices), reference(indices))


def test_sparse_gradient_matches_torch_nn_embedding() -> None:
    kwargs = {"num_embeddings": 9, "embedding_dim": 3, "sparse": True, "padding_idx": 2}
    ours, reference = _pair(kwargs, torch.float64)
    indices = torch.tensor([[0, 2, 4], [4, 8, 2]])
    out, expected, grads, expected_grads = _grads(ours, reference, indices)
    torch.testing.assert_close(out, expected)
    assert grads[0].is_sparse
    torch.testing.assert_close(grads[0].to_dense(), expected_grads[0].to_dense())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")])
def test_max_norm_gives_torch_outputs_without_changing_the_weight(
    norm_type: float, dtype: torch.dtype
) -> None:
    kwargs = {"num_embeddings": 6, "embedding_dim": 4, "max_norm": 1.5, "norm_type": norm_type}
    ours, reference = _pair(kwargs, dtype, seed=3)
    with torch.no_grad():  # some rows well inside the norm, some outside
        ours.weight[0].mul_(0.1)
        reference.weight[0].mul_(0.1)
    before = ours.weight.detach().clone()
    indices = torch.tensor([[0, 1, 2], [2, 3, 0]])
    out, expected, grads, expected_grads = _grads(ours, reference, indices)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(ours.weight, before)  # ours: a value, never changed
    assert not torch.equal(reference.weight, before)  # torch.nn: renormalised in place
    norms = torch.linalg.vector_norm(before, ord=norm_type, dim=1)
    inside = norms <= 1.5
    assert inside[0]
    assert not inside.all()
    # rows within max_norm: torch's gradient
    torch.testing.assert_close(grads[0][inside], expected_grads[0][inside])
    # rows beyond: the gradient of the function computed (through the renormalisation)
    weight = before.clone().requires_grad_(True)
    rows = weight[indices]
    row_norms = torch.linalg.vector_norm(rows, ord=norm_type, dim=-1, keepdim=True)
    scale = torch.where(row_norms > 1.5, 1.5 / (row_norms + 1e-7), torch.ones_like(row_norms))
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    (want,) = torch.autograd.grad((rows * scale * cotangent).sum(), [weight])
    torch.testing.assert_close(grads[0], want)


def test_from_pretrained_freezes_by_keeping_a_constant() -> None:
    table = torch.randn(4, 3)
    frozen = nn.Embedding.from_pretrained(table, padding_idx=-1)
    reference = torch.nn.Embedding.from_pretrained(table, padding_idx=-1)
    indices = torch.tensor([3, 0, 1])
    torch.testing.assert_close(frozen(indices), reference(indices))
    assert dp.flatten_parameters(frozen) == []
    assert frozen.padding_idx == reference.padding_idx == 3
    trainable = nn.Embedding.from_pretrained(table, freeze=False)
    (p,) = dp.flatten_parameters(trainable)
    assert p.data_ptr() == table.data_ptr()  # shared, as torch.nn shares it


@pytest.mark.parametrize("padding_idx", [5, -6, 100])
def test_padding_idx_out_of_range_is_a_clear_error(padding_idx: int) -> None:
    with pytest.raises(ValueError, match=r"padding_idx = .* is not a row of the table"):
        dp.sample(nn.EmbeddingSpec(5, 2, padding_idx=padding_idx))
    with pytest.raises(ValueError, match=r"padding_idx = .* is not a row of the table"):
        nn.Embedding(dp.make_independent(torch.zeros(5, 2)), padding_idx=padding_idx)


def test_a_weight_that_is_not_a_table_is_rejected() -> None:
    with pytest.raises(ValueError, match="2-d tensor"):
        nn.Embedding(dp.make_independent(torch.zeros(5)))


class TiedLM(dp.Parameterized):
    """A token embedding shared with the output projection (a Linear on the same Parameter)."""

    embed: nn.Embedding
    head: nn.Linear

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


class TorchTiedLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def _tied(vocab: int, dim: int, seed: int) -> TiedLM:
    g = torch.Generator().manual_seed(seed)
    embed = dp.sample(nn.EmbeddingSpec(vocab, dim), generator=g)
    head = dp.sample(nn.LinearSpec(dim, vocab), generator=g)
    return TiedLM(embed, nn.Linear(embed.weight, head.bias))


def test_tied_embedding_flattens_once_with_torch_names() -> None:
    model = _tied(11, 4, seed=0)
    params = dp.flatten_parameters(model)
    assert len(params) == 2
    assert params[0] is model.embed.weight
    assert model.head.weight is model.embed.weight
    reference = TorchTiedLM(11, 4)
    assert [k for k, _ in dp.named_parameters(model)] == [
        k for k, _ in reference.named_parameters()
    ]


def test_tied_embedding_stays_tied_after_run_step_and_trains_as_torch_does() -> None:
    model = _tied(11, 4, seed=0)
    reference = TorchTiedLM(11, 4)
    with torch.no_grad():
        reference.embed.weight.copy_(model.embed.weight)
        reference.head.bias.copy_(model.head.bias)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    tokens = torch.tensor([[1, 5, 7], [2, 2, 10]])
    targets = torch.tensor([[5, 7, 1], [2, 10, 3]])
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        new_model, _ = run_step(model, GD(), loss, 0.5)
        assert new_model.head.weight is new_model.embed.weight  # still one Parameter
        assert len(dp.flatten_parameters(new_model)) == 2
        assert model.head.weight is model.embed.weight  # the old model is untouched
        model = new_model

        optimizer.zero_grad()
        ref_logits = reference(tokens).flatten(0, 1)
        torch.nn.functional.cross_entropy(ref_logits, targets.flatten()).backward()
        optimizer.step()
    torch.testing.assert_close(model.embed.weight, reference.embed.weight)
    torch.testing.assert_close(model.head.bias, reference.head.bias)
