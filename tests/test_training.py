"""The first training loop: GD, run_step, fold_loop, and the regression example."""

from __future__ import annotations

import pytest
import torch

import diffprog as dp
from diffprog.examples import regression
from diffprog.nn import LinearSpec
from diffprog.optim import GD, Optimizer, fold_loop, run_step, step


def test_gd_is_an_optimizer_and_steps_out_of_place() -> None:
    assert isinstance(GD(), Optimizer)
    params = [torch.tensor([1.0, 2.0])]
    grads = [torch.tensor([10.0, 20.0])]
    new, opt = GD().step(0.1, grads, params)
    torch.testing.assert_close(new[0], torch.tensor([0.0, 0.0]))
    assert torch.equal(params[0], torch.tensor([1.0, 2.0]))
    assert isinstance(opt, GD)
    # a 0-dim tensor learning rate too, and Hasktorch's argument order
    new, _ = step(torch.tensor(0.1), grads, params, GD())
    torch.testing.assert_close(new[0], torch.tensor([0.0, 0.0]))


def test_run_step_matches_torch_sgd() -> None:
    model = dp.sample(LinearSpec(3, 2), generator=torch.Generator().manual_seed(0))
    reference = torch.nn.Linear(3, 2)
    with torch.no_grad():
        reference.weight.copy_(model.weight)
        reference.bias.copy_(model.bias)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    opt = GD()
    for _ in range(20):
        x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        model, opt = run_step(model, opt, loss, 0.05)
        sgd.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        sgd.step()
    torch.testing.assert_close(model.weight, reference.weight)
    torch.testing.assert_close(model.bias, reference.bias)


def test_run_step_is_pure_and_returns_fresh_leaves() -> None:
    model = dp.sample(LinearSpec(2, 1), generator=torch.Generator().manual_seed(0))
    before = model.weight.detach().clone()
    loss = model(torch.ones(4, 2)).pow(2).sum()
    new_model, _ = run_step(model, GD(), loss, 0.01)
    assert torch.equal(model.weight, before)  # the old model still works as it was
    assert new_model.weight is not model.weight
    assert new_model.weight.is_leaf and new_model.weight.requires_grad
    assert new_model(torch.ones(4, 2)).pow(2).sum() < loss


def test_fold_loop_counts_from_one() -> None:
    seen: list[int] = []

    def body(total: int, i: int) -> int:
        seen.append(i)
        return total + i

    assert fold_loop(0, 5, body) == 15 and seen == [1, 2, 3, 4, 5]
    assert fold_loop("unchanged", 0, lambda s, i: s + "!") == "unchanged"


def test_the_regression_example_learns_the_ground_truth() -> None:
    trained = regression.train(seed=0, verbose=False)
    torch.testing.assert_close(
        trained.weight.detach().squeeze(), regression.TRUE_WEIGHT, atol=0.5, rtol=0
    )
    assert trained.bias is not None
    assert abs(trained.bias.item() - regression.TRUE_BIAS) < 0.5


def test_the_regression_example_prints_progress_and_result(
    capsys: pytest.CaptureFixture[str],
) -> None:
    regression.main()
    out = capsys.readouterr().out
    assert out.count("Iteration:") == 20 and "Iteration: 2000 | Loss:" in out
    assert "Learned weight:" in out and "Learned bias:" in out
