"""MAML on sine waves: meta-learn an initialisation (and a learning rate) that adapts fast.

Each task is a sine wave ``y = a * sin(x - phase)`` (amplitude in [0.1, 5], phase in [0, pi],
x in [-5, 5]), seen through 10 support points. Model-agnostic meta-learning (Finn et al., 2017)
trains the initial weights of a 1-40-40-1 MLP so that a few steps of plain SGD on a task's
support points fit the whole wave. The inner steps are taken by ``run_step`` with
``SGD.init(model, differentiable=True)``: the adapted model is a differentiable function of
the initial one and of the inner learning rate, so the loss on the task's query points after
adaptation is differentiated through the inner loop, with respect to the initial weights and
to the (log) learning rate, which is learned too. The outer loop is Adam on both.

At the end it compares, on new tasks, the meta-trained initialisation with a plain (freshly
sampled) one, each adapted with the same steps, prints the query loss after 0, 1, ... steps,
and saves a plot of one task (needs matplotlib: ``pip install "diffprog[examples]"``).

Run: ``python -m diffprog.examples.maml`` (``--iterations 20`` for a quick run).
"""

from __future__ import annotations

import argparse
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

import diffprog as dp
from diffprog.nn import MLPSpec, Sequential
from diffprog.optim import SGD, Adam, run_step

SUPPORT = 10
QUERY = 10

Meta = dict[str, Any]
"""The meta-parameters: ``{"init": the MLP's initial weights, "log_lr": the inner log-lr}``."""


def sample_tasks(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` sine tasks: amplitudes and phases, each of shape ``[count]``."""
    amplitude = 0.1 + 4.9 * torch.rand(count, generator=generator)
    phase = math.pi * torch.rand(count, generator=generator)
    return amplitude, phase


def task_points(
    amplitude: torch.Tensor, phase: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random points of each task's wave: ``x`` and ``y`` of shape ``[tasks, n, 1]``."""
    x = -5.0 + 10.0 * torch.rand(len(amplitude), n, 1, generator=generator)
    return x, wave(amplitude, phase, x)


def wave(amplitude: torch.Tensor, phase: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The tasks' sine waves at ``x`` (``[tasks, n, 1]``)."""
    return amplitude[:, None, None] * torch.sin(x - phase[:, None, None])


def adapt(
    model: Sequential, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor | float, steps: int
) -> list[Sequential]:
    """The model after 0, 1, ..., ``steps`` differentiable SGD steps on the points ``(x, y)``.

    Each step is ``run_step`` with an optimizer built with ``differentiable=True``: the models
    it returns stay in the autograd graph of ``model`` and ``lr``.
    """
    optimizer = SGD.init(model, differentiable=True)
    models = [model]
    for _ in range(steps):
        model, optimizer = run_step(model, optimizer, F.mse_loss(model(x), y), lr)
        models.append(model)
    return models


def meta_loss(
    meta: Meta,
    amplitude: torch.Tensor,
    phase: torch.Tensor,
    inner_steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The query loss after adapting ``meta["init"]`` to each task, averaged over the tasks."""
    xs, ys = task_points(amplitude, phase, SUPPORT, generator)
    xq, yq = task_points(amplitude, phase, QUERY, generator)
    lr = meta["log_lr"].exp()
    losses = []
    for t in range(len(amplitude)):
        adapted = adapt(meta["init"], xs[t], ys[t], lr, inner_steps)[-1]
        losses.append(F.mse_loss(adapted(xq[t]), yq[t]))
    return torch.stack(losses).mean()


def meta_train(
    *,
    iterations: int = 3000,
    tasks_per_batch: int = 4,
    inner_steps: int = 1,
    inner_lr: float = 0.03,
    meta_lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 500,
) -> tuple[Meta, list[float]]:
    """Meta-train the MLP's initialisation and the inner learning rate.

    Args:
        iterations: outer (Adam) steps.
        tasks_per_batch: tasks per outer step.
        inner_steps: differentiable SGD steps per task.
        inner_lr: the inner learning rate to start from (learned, through its log).
        meta_lr: Adam's learning rate.
        seed: seeds the initial weights and the tasks.
        log_every: print the meta-loss every this many iterations (0: never).

    Returns:
        The meta-parameters and the meta-loss of each iteration.
    """
    generator = torch.Generator().manual_seed(seed)
    init = dp.sample(MLPSpec((1, 40, 40, 1)), generator=generator)
    meta: Meta = {"init": init, "log_lr": dp.make_independent(torch.tensor(math.log(inner_lr)))}
    optimizer = Adam.init(meta)
    history = []
    for i in range(1, iterations + 1):
        amplitude, phase = sample_tasks(tasks_per_batch, generator)
        loss = meta_loss(meta, amplitude, phase, inner_steps, generator)
        history.append(loss.item())
        if log_every and i % log_every == 0:
            print(
                f"iteration {i:5d} | meta-loss {sum(history[-log_every:]) / log_every:.4f} "
                f"| inner lr {meta['log_lr'].exp().item():.4f}"
            )
        meta, optimizer = run_step(meta, optimizer, loss, meta_lr)
    return meta, history


def evaluate(
    model: Sequential, lr: float, steps: int, tasks: int, generator: torch.Generator
) -> list[float]:
    """The mean query loss over ``tasks`` new tasks after 0, 1, ..., ``steps`` SGD steps."""
    amplitude, phase = sample_tasks(tasks, generator)
    xs, ys = task_points(amplitude, phase, SUPPORT, generator)
    xq, yq = task_points(amplitude, phase, 100, generator)
    totals = [0.0] * (steps + 1)
    for t in range(tasks):
        for k, adapted in enumerate(adapt(model, xs[t], ys[t], lr, steps)):
            totals[k] += F.mse_loss(adapted(xq[t]), yq[t]).item() / tasks
    return totals


def plot(meta: Meta, plain: Sequential, lr: float, steps: int, path: pathlib.Path) -> None:
    """Plot one new task (amplitude 4, phase 1): the wave, its support points, and both
    models before and after ``steps`` adaptation steps.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    generator = torch.Generator().manual_seed(1234)
    amplitude, phase = torch.tensor([4.0]), torch.tensor([1.0])  # a wave well above the noise
    xs, ys = task_points(amplitude, phase, SUPPORT, generator)
    grid = torch.linspace(-5.0, 5.0, 200).reshape(1, -1, 1)
    figure = Figure(figsize=(10, 4), layout="constrained")
    panels = [("meta-trained init", meta["init"]), ("plain init", plain)]
    for axes, (title, model) in zip(figure.subplots(1, 2), panels, strict=True):
        before, *_, after = adapt(model, xs[0], ys[0], lr, steps)
        axes.plot(grid[0, :, 0], wave(amplitude, phase, grid)[0, :, 0], "k", label="task")
        axes.plot(xs[0, :, 0], ys[0, :, 0], "o", color="tab:red", label="support points")
        with torch.no_grad():
            axes.plot(grid[0, :, 0], before(grid[0])[:, 0], "--", label="before adaptation")
            axes.plot(grid[0, :, 0], after(grid[0])[:, 0], label=f"after {steps} steps")
        axes.set(title=title, xlabel="x", ylabel="y", ylim=(-6, 6))
        axes.legend(loc="lower right", fontsize=8)
    figure.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, meta-train, compare with a plain initialisation, plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000, help="outer steps (3000)")
    parser.add_argument("--inner-steps", type=int, default=1, help="inner SGD steps (1)")
    parser.add_argument("--eval-steps", type=int, default=5, help="adaptation steps shown (5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tasks")
    parser.add_argument(
        "--plot", type=pathlib.Path, default=pathlib.Path("maml.png"), help="PNG to write"
    )
    args = parser.parse_args(argv)
    log_every = max(1, min(500, args.iterations // 5))
    meta, _ = meta_train(
        iterations=args.iterations,
        inner_steps=args.inner_steps,
        seed=args.seed,
        log_every=log_every,
    )
    lr = meta["log_lr"].exp().item()
    print(f"learned inner learning rate: {lr:.4f} (started at 0.0300)")
    plain = dp.sample(MLPSpec((1, 40, 40, 1)), generator=torch.Generator().manual_seed(args.seed))
    generator = torch.Generator().manual_seed(args.seed + 1)
    ours = evaluate(meta["init"], lr, args.eval_steps, 50, generator)
    generator = torch.Generator().manual_seed(args.seed + 1)  # the same tasks
    theirs = evaluate(plain, lr, args.eval_steps, 50, generator)
    print("query loss on 50 new tasks after k SGD steps on 10 points:")
    print("   k | meta-trained init | plain init")
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        print(f"{k:4d} | {a:17.4f} | {b:10.4f}")
    try:
        plot(meta, plain, lr, args.eval_steps, args.plot)
    except ModuleNotFoundError:
        print("matplotlib is not installed: no plot (pip install 'diffprog[examples]')")
        return
    print(f"saved the plot to {args.plot}")


if __name__ == "__main__":
    main()
