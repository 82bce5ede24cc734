"""An ensemble of small regressors, trained at once as one stacked model.

K MLPs (1-32-32-1, tanh), each from its own seed and on its own bootstrap resample of noisy
``sin`` data observed on ``[-3, -1]`` and ``[1, 3]``, are stacked into one model
(``diffprog.func.sample_stack``) and trained together: one ``torch.func.vmap`` forward, one
loss (the sum of the members'), one Adam step per iteration. The members agree where there
was data and spread apart in the gap and beyond it: the spread of an ensemble's predictions
is a cheap estimate of its uncertainty. Prints the spread in and out of the data and saves a
plot of the members' predictions and their spread.

Needs matplotlib for the plot (``pip install "diffprog[examples]"``); without it, no plot.

Run: ``python -m diffprog.examples.ensemble [plot.png] [--members K] [--steps N]``
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence
from typing import Any

import torch

import diffprog as dp
from diffprog.func import sample_stack
from diffprog.nn import MLPSpec
from diffprog.optim import Adam, run_step

SPEC = MLPSpec([1, 32, 32, 1], activation=torch.tanh)
MEMBERS = 8
STEPS = 400
POINTS = 40
DEFAULT_PLOT = "ensemble.png"


def data(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy ``sin(x)`` at ``POINTS`` points of ``[-3, -1]`` and ``[1, 3]``: ``[POINTS, 1]``."""
    x = torch.rand(POINTS, 1, generator=generator) * 2 + 1
    x = torch.where(torch.arange(POINTS).unsqueeze(1) % 2 == 0, x, -x)
    return x, torch.sin(x) + 0.1 * torch.randn(POINTS, 1, generator=generator)


def bootstrap(
    x: torch.Tensor, y: torch.Tensor, members: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One resample (with replacement) of the data per member: ``[members, POINTS, 1]``."""
    index = torch.randint(0, x.shape[0], (members, x.shape[0]), generator=generator)
    return x[index], y[index]


def member_loss(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One member's mean squared error on its own data."""
    return torch.nn.functional.mse_loss(model(x), y)


def train(members: int = MEMBERS, steps: int = STEPS, seed: int = 0) -> tuple[Any, Any]:
    """Train the stacked ensemble; return it and the data ``(x, y)`` it saw."""
    generator = torch.Generator().manual_seed(seed)
    x, y = data(generator)
    xs, ys = bootstrap(x, y, members, generator)
    ensemble = sample_stack(SPEC, [seed * 1000 + i for i in range(members)])
    optimizer = Adam.init(ensemble)
    losses = torch.func.vmap(member_loss)
    for _ in range(steps):
        # The members' losses summed: each member's gradient is that of its own loss.
        ensemble, optimizer = run_step(ensemble, optimizer, losses(ensemble, xs, ys).sum(), 1e-2)
    return ensemble, (x, y)


def predict(ensemble: Any, x: torch.Tensor) -> torch.Tensor:
    """Every member's prediction at ``x`` (``[N, 1]``): ``[members, N]``."""
    with torch.no_grad():
        out = torch.func.vmap(lambda m, x: m(x), in_dims=(0, None))(ensemble, x)
    return out.squeeze(-1)  # type: ignore[no-any-return]


def spread(ensemble: Any) -> dict[str, float]:
    """The mean standard deviation across members, in the data, in the gap, and beyond."""
    regions = {
        "data (1 <= |x| <= 3)": torch.cat([torch.linspace(-3, -1, 50), torch.linspace(1, 3, 50)]),
        "gap (|x| < 0.5)": torch.linspace(-0.5, 0.5, 50),
        "beyond (|x| > 4)": torch.cat([torch.linspace(-6, -4, 50), torch.linspace(4, 6, 50)]),
    }
    return {
        name: float(predict(ensemble, x.unsqueeze(1)).std(0).mean()) for name, x in regions.items()
    }


def plot(ensemble: Any, x: torch.Tensor, y: torch.Tensor, path: pathlib.Path) -> bool:
    """Save the members' predictions, their mean and two standard deviations as a PNG;
    ``False`` (nothing saved) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        return False
    grid = torch.linspace(-6, 6, 300)
    out = predict(ensemble, grid.unsqueeze(1))
    mean, std = out.mean(0), out.std(0)
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    axes.fill_between(grid, mean - 2 * std, mean + 2 * std, alpha=0.25, label="mean ± 2 std")
    for member in out:
        axes.plot(grid, member, linewidth=0.7, alpha=0.6)
    axes.plot(grid, mean, color="black", linewidth=1.5, label="ensemble mean")
    axes.plot(grid, torch.sin(grid), "--", color="gray", label="sin(x)")
    axes.scatter(x.squeeze(1), y.squeeze(1), s=10, color="black", label="data")
    axes.set(
        title=f"{out.shape[0]} regressors trained at once: their spread",
        xlabel="x",
        ylabel="prediction",
        ylim=(-3, 3),
    )
    axes.legend(loc="upper left")
    figure.savefig(path, dpi=100)
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """Train, print the spread in and out of the data, save the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("plot", nargs="?", default=DEFAULT_PLOT, help="where to save the plot")
    parser.add_argument("--members", type=int, default=MEMBERS, help="ensemble size (8)")
    parser.add_argument("--steps", type=int, default=STEPS, help="Adam steps (400)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, resamples, weights")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch (1: fastest for these sizes)"
    )
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report(args)
    finally:
        torch.set_num_threads(threads)


def report(args: argparse.Namespace) -> None:
    """Train with ``args``, print the spread, save the plot."""
    ensemble, (x, y) = train(args.members, args.steps, args.seed)
    with torch.no_grad():
        errors = torch.func.vmap(member_loss, in_dims=(0, None, None))(ensemble, x, y)
    print(f"{args.members} members, {dp.count_parameters(ensemble)} parameters in all")
    print(f"mean squared error on the data, averaged over members: {float(errors.mean()):.4f}")
    for name, value in spread(ensemble).items():
        print(f"spread (std across members) {name}: {value:.3f}")
    file = pathlib.Path(args.plot)
    if plot(ensemble, x, y, file):
        print(f"Plot saved to {file.resolve()}")
    else:
        print("matplotlib is not installed, so no plot: pip install 'diffprog[examples]'")


if __name__ == "__main__":
    main()
