"""Optimizers on the Rosenbrock function, as in Hasktorch's optimizer chapter.

``f(x, y) = (1 - x)^2 + 100 (y - x^2)^2`` has its minimum at ``(1, 1)`` at the end of a long,
flat, curved valley. From ``(-1.2, 1)``, 2000 steps of plain gradient descent at lr 1e-3 reach
the valley and then crawl along it; gradient descent with momentum gets further; Adam at 2e-2
gets to ``(1, 1)``. The same Adam run once more with ``TorchOptimizer(torch.optim.Adam)``, the
in-place fast path, lands on the same numbers as the pure one.

Prints a table and saves a plot of the paths over the function's contours (needs matplotlib,
the ``examples`` extra; without it the example says so and skips the plot).

Run: ``python -m diffprog.examples.rosenbrock [PLOT_FILE] [--steps N]``
(the plot goes to ``./rosenbrock.png`` by default).
"""

from __future__ import annotations

import argparse
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

import diffprog as dp
from diffprog.optim import GD, GDM, Adam, TorchOptimizer, fold_loop, run_step

START = (-1.2, 1.0)
STEPS = 2000
DEFAULT_PLOT = "rosenbrock.png"


class Coord(dp.Parameterized):
    """The point being optimized: Hasktorch's ``Coord { x :: Parameter, y :: Parameter }``."""

    x: dp.Parameter
    y: dp.Parameter


def rosenbrock(coord: Coord, a: float = 1.0, b: float = 100.0) -> torch.Tensor:
    """``(a - x)^2 + b (y - x^2)^2``, smallest (0) at ``(a, a^2)``."""
    return (a - coord.x) ** 2 + b * (coord.y - coord.x**2) ** 2


def start() -> Coord:
    """A fresh starting point ``(-1.2, 1)``, in float64 so that runs compare exactly."""
    x, y = START
    return Coord(
        dp.make_independent(torch.tensor(x, dtype=torch.float64)),
        dp.make_independent(torch.tensor(y, dtype=torch.float64)),
    )


Path = list[tuple[float, float]]


def optimize(make_optimizer: Callable[[Coord], Any], lr: float, steps: int) -> tuple[Coord, Path]:
    """Run ``steps`` steps from :func:`start`; return the end point and the path taken."""
    init = start()
    path: Path = [START]

    def body(state: tuple[Coord, Any], i: int) -> tuple[Coord, Any]:
        coord, optimizer = state
        coord, optimizer = run_step(coord, optimizer, rosenbrock(coord), lr)
        path.append((float(coord.x.detach()), float(coord.y.detach())))
        return coord, optimizer

    final, _ = fold_loop((init, make_optimizer(init)), steps, body)
    return final, path


RUNS: list[tuple[str, Callable[[Coord], Any], float]] = [
    ("GD", lambda c: GD(), 1e-3),
    ("GDM (momentum 0.9)", lambda c: GDM.init(c, momentum=0.9), 1e-3),
    ("Adam", lambda c: Adam.init(c), 2e-2),
    ("Adam, in place (torch.optim.Adam)", lambda c: TorchOptimizer.init(c, torch.optim.Adam), 2e-2),
]


def run_all(steps: int = STEPS) -> dict[str, tuple[float, Coord, Path]]:
    """Every run of the example: name -> (lr, end point, path)."""
    return {name: (lr, *optimize(make, lr, steps)) for name, make, lr in RUNS}


def table(results: dict[str, tuple[float, Coord, Path]], steps: int) -> str:
    """The results as a text table."""
    lines = [
        f"Rosenbrock from {START}, {steps} steps; minimum 0 at (1, 1)",
        f"{'optimizer':<36}{'lr':>8}{'x':>10}{'y':>10}{'f(x, y)':>12}{'to (1, 1)':>11}",
    ]
    for name, (lr, coord, _) in results.items():
        x, y = float(coord.x.detach()), float(coord.y.detach())
        loss = float(rosenbrock(coord).detach())
        lines.append(
            f"{name:<36}{lr:>8g}{x:>10.4f}{y:>10.4f}{loss:>12.3e}{math.hypot(1 - x, 1 - y):>11.4f}"
        )
    return "\n".join(lines)


def draw(results: dict[str, tuple[float, Coord, Path]], ax: Any) -> None:
    """Draw the contours, every path and its end point, the start and the minimum on ``ax``."""
    xs = torch.linspace(-2.0, 2.0, 400, dtype=torch.float64)
    ys = torch.linspace(-1.0, 3.0, 400, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    z = (1 - gx) ** 2 + 100 * (gy - gx**2) ** 2
    ax.contour(gx.numpy(), gy.numpy(), torch.log10(z + 1e-3).numpy(), levels=30, colors="0.75")
    # Thick, faint lines below, thin ones on top (zorder), so that GD's path stays visible
    # where it runs along Adam's; each end point has its own colour, marker and legend entry.
    styles = {  # first word of the run's name -> (colour, line width, zorder, end marker)
        "Adam": ("tab:blue", 6.0, 2, "o"),
        "GDM": ("tab:green", 1.2, 3, "s"),
        "GD": ("tab:red", 1.2, 4, "X"),
    }
    for name, (lr, _, path) in results.items():
        if "in place" in name:
            continue  # the same path as the pure Adam's
        color, width, order, marker = styles.get(name.split()[0], ("black", 1.0, 5, "D"))
        px, py = zip(*path, strict=True)
        alpha = 0.45 if width > 2 else 1.0
        ax.plot(
            px,
            py,
            "-",
            color=color,
            linewidth=width,
            alpha=alpha,
            zorder=order,
            label=f"{name}, lr {lr:g}",
        )
        ax.plot(
            [px[-1]],
            [py[-1]],
            marker,
            color=color,
            markeredgecolor="black",
            markersize=7,
            zorder=10,
            label=f"{name.split()[0]} end ({px[-1]:.2f}, {py[-1]:.2f})",
        )
    ax.plot(
        [1.0],
        [1.0],
        "*",
        color="gold",
        markeredgecolor="black",
        markersize=24,
        zorder=9,  # below the end markers, large enough to show around one that reached it
        label="minimum (1, 1)",
    )
    ax.plot([START[0]], [START[1]], "ko", zorder=11, label=f"start {START}")


def plot(results: dict[str, tuple[float, Coord, Path]], file: pathlib.Path) -> bool:
    """Plot the paths over the contours into ``file``; ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 6))
    draw(results, ax)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("Rosenbrock: paths of the optimizers (contours of log10 f)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """Run the optimizers, print the table, save the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("plot", nargs="?", default=DEFAULT_PLOT, help="where to save the plot")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per optimizer")
    args = parser.parse_args(argv)
    results = run_all(args.steps)
    print(table(results, args.steps))
    pure = results["Adam"][1]
    in_place = results["Adam, in place (torch.optim.Adam)"][1]
    gap = max(
        abs(float(a.detach() - b.detach()))
        for a, b in zip((pure.x, pure.y), (in_place.x, in_place.y), strict=True)
    )
    print(f"Adam in place vs pure: largest difference {gap:.1e}")
    file = pathlib.Path(args.plot)
    if plot(results, file):
        print(f"Plot saved to {file.resolve()}")
    else:
        print("matplotlib is not installed, so no plot: pip install 'diffprog[examples]'")


if __name__ == "__main__":
    main()
