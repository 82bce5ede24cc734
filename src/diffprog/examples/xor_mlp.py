"""XOR with a small MLP, as in Hasktorch's ``xor-mlp`` example.

A 2-2-1 multi-layer perceptron with ``tanh`` between the layers learns XOR from random batches
of two binary inputs, by plain gradient descent on the mean squared error: 2000 steps at
learning rate 0.1, the loss printed every 100 steps, then the predictions for the four inputs.

Run: ``python -m diffprog.examples.xor_mlp [--steps 2000] [--lr 0.1] [--seed 1]``
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import diffprog as dp
from diffprog.nn import MLPSpec, Sequential
from diffprog.optim import GD, fold_loop, run_step

INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])


def tensor_xor(x: torch.Tensor) -> torch.Tensor:
    """XOR of the two columns of a 0/1 tensor ``[batch, 2]``, written with arithmetic."""
    a, b = x[:, 0], x[:, 1]
    return (1 - (1 - a) * (1 - b)) * (1 - a * b)


def train(
    *,
    steps: int = 2000,
    lr: float = 0.1,
    batch_size: int = 2,
    hidden: int = 2,
    seed: int = 1,
    log_every: int = 100,
) -> Sequential:
    """Train the MLP on random XOR batches and return it.

    Args:
        steps: gradient-descent steps.
        lr: the learning rate.
        batch_size: random input pairs per step.
        hidden: hidden units (Hasktorch's example: 2).
        seed: seeds both the initial weights and the batches.
        log_every: print the loss every this many steps (0: never).

    Returns:
        The trained model: ``Sequential(Linear(2, hidden), tanh, Linear(hidden, 1))``.
    """
    generator = torch.Generator().manual_seed(seed)
    spec = MLPSpec((2, hidden, 1), activation=torch.tanh)
    init = dp.sample(spec, generator=generator)

    def body(state: tuple[Sequential, GD], i: int) -> tuple[Sequential, GD]:
        model, optimizer = state
        x = (torch.rand(batch_size, 2, generator=generator) > 0.5).float()
        loss = F.mse_loss(model(x).squeeze(-1), tensor_xor(x))
        if log_every and i % log_every == 0:
            print(f"Iteration: {i:4d} | Loss: {loss.item():.6f}")
        return run_step(model, optimizer, loss, lr)

    trained, _ = fold_loop((init, GD()), steps, body)
    return trained


def predict(model: Sequential) -> torch.Tensor:
    """The model's outputs for the inputs (0,0), (0,1), (1,0), (1,1)."""
    with torch.no_grad():
        return model(INPUTS).squeeze(-1)  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, train, and print the final predictions."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (2000)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (0.1)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size (2)")
    parser.add_argument("--hidden", type=int, default=2, help="hidden units (2)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    args = parser.parse_args(argv)
    model = train(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, hidden=args.hidden, seed=args.seed
    )
    print("Final model:")
    for (a, b), y in zip(INPUTS.tolist(), predict(model).tolist(), strict=True):
        print(f"{a:.0f}, {b:.0f} => {y:.4f}")


if __name__ == "__main__":
    main()
