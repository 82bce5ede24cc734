"""Regressions found in review: shared stateful layers, stale losses, sparse gradients, ties."""

from __future__ import annotations

import pytest
import torch

import diffprog as dp
from diffprog import nn
from diffprog.nn import BatchNorm1dSpec, EmbeddingSpec, LinearSpec
from diffprog.optim import GD, Adam, run_step


class SharedNorm(dp.Parameterized):
    """A model calling one BatchNorm layer at two places, as a torch module may."""

    first: nn.BatchNorm1d
    second: nn.BatchNorm1d
    head: nn.Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(torch.tanh(self.first(x))))


def test_a_shared_batchnorm_stays_shared_through_training_and_run_step() -> None:
    gen = torch.Generator().manual_seed(0)
    bn = dp.sample(BatchNorm1dSpec(3), generator=gen)
    model = SharedNorm(bn, bn, dp.sample(LinearSpec(3, 1), generator=gen))

    class Reference(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(3)
            self.head = torch.nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(torch.tanh(self.norm(x))))

    reference = Reference()
    with torch.no_grad():
        reference.head.weight.copy_(model.head.weight)
        reference.head.bias.copy_(model.head.bias)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = GD()
    for _ in range(3):
        x = torch.randn(8, 3, generator=gen)
        loss, model = nn.training(lambda m, x: m(x).square().mean(), model, x)
        model, opt = run_step(model, opt, loss, 0.1)
        sgd.zero_grad()
        reference(x).square().mean().backward()
        sgd.step()
        assert model.first is model.second
    assert int(model.first.num_batches_tracked) == int(reference.norm.num_batches_tracked) == 6
    torch.testing.assert_close(model.first.running_mean, reference.norm.running_mean)
    torch.testing.assert_close(model.first.running_var, reference.norm.running_var)
    torch.testing.assert_close(model.head.weight, reference.head.weight)


def test_run_step_refuses_a_loss_from_a_stale_model() -> None:
    model = dp.sample(LinearSpec(2, 1), generator=torch.Generator().manual_seed(0))
    x = torch.ones(3, 2)
    opt = Adam.init(model)
    new_model, opt = run_step(model, opt, model(x).sum(), 0.1)
    before = new_model.weight.detach().clone()
    with pytest.raises(dp.DiffprogError, match="does not depend on any parameter"):
        run_step(new_model, opt, model(x).sum(), 0.1)  # the loss of the old model
    with torch.no_grad():
        no_graph = new_model(x).sum()
    with pytest.raises(dp.DiffprogError, match=r"torch.no_grad\(\)"):
        run_step(new_model, opt, no_graph, 0.1)
    assert torch.equal(new_model.weight, before)
    assert opt.count == 1


def test_sparse_embedding_gradients_with_gd_match_torch_and_others_say_what_to_do() -> None:
    ours = dp.sample(EmbeddingSpec(10, 3, sparse=True), generator=torch.Generator().manual_seed(0))
    reference = torch.nn.Embedding(10, 3, sparse=True)
    with torch.no_grad():
        reference.weight.copy_(ours.weight)
    idx = torch.tensor([[1, 2, 2], [4, 9, 1]])
    new, _ = run_step(ours, GD(), ours(idx).square().sum(), 0.1)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference(idx).square().sum().backward()
    sgd.step()
    torch.testing.assert_close(new.weight, reference.weight)
    with pytest.raises(dp.DiffprogError, match="does not take sparse gradients"):
        run_step(ours, Adam.init(ours), ours(idx).sum(), 0.1)


def test_a_sparse_non_finite_gradient_is_reported_not_crashed() -> None:
    from diffprog.optim import NonFiniteError

    ours = dp.sample(EmbeddingSpec(5, 2, sparse=True))
    loss = (ours(torch.tensor([1])) * float("inf")).sum()
    with pytest.raises(NonFiniteError):
        run_step(ours, GD(), loss, 0.1)


def test_an_optimizer_built_from_a_list_with_a_tie_counts_it_once() -> None:
    p = dp.make_independent(torch.ones(3))
    model = [p, p]
    opt = Adam.init(model)
    new, opt = run_step(model, opt, (model[0] * model[1]).sum(), 0.1)
    assert new[0] is new[1]
    assert len(opt.exp_avg) == 1
