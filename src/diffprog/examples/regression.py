"""Linear regression, as in Hasktorch's first example.

Learns ``y = x @ (42, 64, 96) + 3.14`` from random batches with plain gradient descent:
2000 steps at lr 5e-3, batch 4, the loss printed every 100 steps.

Run: ``python -m diffprog.examples.regression``
"""

from __future__ import annotations

import torch

import diffprog as dp
from diffprog.nn import Linear, LinearSpec
from diffprog.optim import GD, fold_loop, run_step

BATCH_SIZE = 4
NUM_ITERS = 2000
NUM_FEATURES = 3
TRUE_WEIGHT = torch.tensor([42.0, 64.0, 96.0])
TRUE_BIAS = 3.14


def ground_truth(x: torch.Tensor) -> torch.Tensor:
    """The function to learn."""
    return x @ TRUE_WEIGHT + TRUE_BIAS


def model(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """The prediction of the linear model, one number per example."""
    return layer(x).squeeze(-1)


def train(seed: int = 0, *, verbose: bool = True) -> Linear:
    """Train the model and return it."""
    gen = torch.Generator().manual_seed(seed)
    init = dp.sample(LinearSpec(in_features=NUM_FEATURES, out_features=1), generator=gen)
    if verbose:
        print("Initial weight:", [round(w, 3) for w in init.weight.detach().squeeze().tolist()])

    def body(state: tuple[Linear, GD], i: int) -> tuple[Linear, GD]:
        layer, optimizer = state
        x = torch.randn(BATCH_SIZE, NUM_FEATURES, generator=gen)
        loss = torch.nn.functional.mse_loss(model(layer, x), ground_truth(x))
        if verbose and i % 100 == 0:
            print(f"Iteration: {i:4d} | Loss: {loss.item():.6f}")
        return run_step(layer, optimizer, loss, 5e-3)

    trained, _ = fold_loop((init, GD()), NUM_ITERS, body)
    return trained


def main() -> None:
    """Train and print the learned parameters next to the truth."""
    trained = train()
    assert trained.bias is not None
    weight = [round(w, 3) for w in trained.weight.detach().squeeze().tolist()]
    bias = trained.bias.detach().item()
    print(f"Learned weight: {weight}  (truth {TRUE_WEIGHT.tolist()})")
    print(f"Learned bias:   {bias:.3f}  (truth {TRUE_BIAS})")


if __name__ == "__main__":
    main()
