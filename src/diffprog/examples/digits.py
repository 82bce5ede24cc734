"""A small CNN on scikit-learn's 8x8 handwritten digits, trained with Adam.

The 1797 digits ship with scikit-learn (``load_digits``: no download). A seeded, stratified
split keeps 20% for testing. The network is two 3x3 convolutions, a 2x2 max-pool and two Linear
layers, written as one ``SequentialSpec``; the training images are shifted by up to one pixel
at random (augmentation), and Adam trains it for 30 epochs of batches of 64, with a progress
bar showing the loss and the test accuracy. It prints the final test accuracy (about 98-99%)
and saves a plot of the loss and accuracy curves. It runs on one CPU thread unless told
otherwise (``--threads``): layers this small run fastest that way, also on a busy machine.

Needs the ``examples`` extra (scikit-learn, matplotlib): ``pip install "diffprog[examples]"``.

Run: ``python -m diffprog.examples.digits [--epochs 30] [--plot digits.png] [--save PATH]``;
``--save`` writes the trained model (``dp.save_params``: a safetensors file), which
``python -m diffprog.examples.predict PATH`` loads to report the same test accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

import diffprog as dp
from diffprog.nn import Conv2dSpec, LinearSpec, Sequential, SequentialSpec
from diffprog.optim import Adam, run_step

_MISSING = "the digits example needs {} (the examples extra): pip install 'diffprog[examples]'"


def max_pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling."""
    return F.max_pool2d(x, 2)


def flatten(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C * H * W]``."""
    return x.flatten(1)


def cnn_spec(channels: tuple[int, int] = (16, 32), hidden: int = 128) -> SequentialSpec:
    """The network: conv-relu-conv-relu-pool, then Linear-relu-Linear to 10 classes."""
    c1, c2 = channels
    return SequentialSpec(
        Conv2dSpec(1, c1, kernel_size=3, padding=1),
        torch.relu,
        Conv2dSpec(c1, c2, kernel_size=3, padding=1),
        torch.relu,
        max_pool,
        flatten,
        LinearSpec(c2 * 4 * 4, hidden),
        torch.relu,
        LinearSpec(hidden, 10),
    )


@dataclasses.dataclass(frozen=True)
class Data:
    """The split data set: images ``[N, 1, 8, 8]`` scaled to [0, 1], and labels ``[N]``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load(seed: int = 0, test_fraction: float = 0.2) -> Data:
    """Load the digits and split them (stratified, seeded).

    Raises:
        ModuleNotFoundError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(_MISSING.format(e.name)) from e

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Data(train_x, train_y, test_x, test_y)


def shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Move each image by -1, 0 or +1 pixels in each direction, at random (zeros fill in)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, None, :, None].expand(n, 1, 8, 10)
    picked = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8))[:, None, None, :].expand(n, 1, 8, 8)
    return picked.gather(3, cols)


def accuracy(model: Sequential, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of ``x`` that ``model`` classifies as ``y``."""
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean().item())


@dataclasses.dataclass(frozen=True)
class History:
    """What training recorded: the loss of every step, the test accuracy after every epoch."""

    losses: list[float]
    accuracies: list[float]
    seconds: float


def train(
    data: Data,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    augment: bool = True,
    progress: bool = True,
) -> tuple[Sequential, History]:
    """Train the CNN with Adam; return it with the recorded history.

    Raises:
        ValueError: ``epochs`` is below 1.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}.")
    generator = torch.Generator().manual_seed(seed)
    model = dp.sample(cnn_spec(), generator=generator)
    optimizer = Adam.init(model)
    n = data.train_x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    losses: list[float] = []
    accuracies: list[float] = []
    start = time.perf_counter()
    with tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="step") as bar:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(n, generator=generator)
            for first in range(0, n, batch_size):
                index = order[first : first + batch_size]
                x = data.train_x[index]
                if augment:
                    x = shift(x, generator)
                loss = F.cross_entropy(model(x), data.train_y[index])
                model, optimizer = run_step(model, optimizer, loss, lr)
                losses.append(loss.item())
                tested = f"{accuracies[-1]:.2%}" if accuracies else "-"
                bar.set_postfix(
                    epoch=epoch, loss=f"{losses[-1]:.4f}", test_acc=tested, refresh=False
                )
                bar.update()
            accuracies.append(accuracy(model, data.test_x, data.test_y))
        bar.set_postfix(epoch=epochs, loss=f"{losses[-1]:.4f}", test_acc=f"{accuracies[-1]:.2%}")
    return model, History(losses, accuracies, time.perf_counter() - start)


def plot(history: History, path: pathlib.Path) -> None:
    """Save the loss (per step) and test accuracy (per epoch) curves as a PNG.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(_MISSING.format(e.name)) from e

    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.plot(history.losses, linewidth=0.8)
    left.set(title="training loss", xlabel="step", ylabel="cross-entropy", yscale="log")
    epochs = range(1, len(history.accuracies) + 1)
    right.plot(epochs, [100 * a for a in history.accuracies], marker="o", markersize=3)
    right.set(title="test accuracy", xlabel="epoch", ylabel="%")
    right.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, train, print the test accuracy and save the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (30)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate (3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights, batches")
    parser.add_argument("--no-augment", action="store_true", help="train on unshifted images")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch (1: fastest for these sizes)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--plot", type=pathlib.Path, default=pathlib.Path("digits.png"), help="PNG to write"
    )
    parser.add_argument(
        "--save", type=pathlib.Path, default=None, help="save the trained model (.safetensors)"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    data = load(seed=args.seed)
    print(f"digits: {len(data.train_y)} training and {len(data.test_y)} test images")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        model, history = train(
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            augment=not args.no_augment,
            progress=not args.no_progress,
        )
    finally:
        torch.set_num_threads(threads)
    print(f"test accuracy: {history.accuracies[-1]:.2%} (trained in {history.seconds:.1f} s)")
    plot(history, args.plot)
    print(f"saved the loss and accuracy plot to {args.plot}")
    if args.save is not None:
        save(model, args.save, seed=args.seed)
        print(f"saved the model to {args.save} (python -m diffprog.examples.predict {args.save})")


def save(model: Sequential, path: pathlib.Path, *, seed: int) -> None:
    """Save the trained model as a safetensors file, with the seed of its test split.

    The metadata says which example wrote it and which split it was tested on, so that
    ``diffprog.examples.predict`` tests it on the same images.
    """
    dp.save_params(model, path, metadata={"diffprog.example": "digits", "seed": str(seed)})


if __name__ == "__main__":
    main()
