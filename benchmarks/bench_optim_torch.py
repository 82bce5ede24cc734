"""The in-place fast path: ``run_step`` with ``TorchOptimizer`` against a plain torch.optim loop.

1. One Adam training step (forward, gradients, update) of a small MLP (32-64-64-1, batch 32)
   and a medium one (784-256-256-10, batch 64): diffprog ``run_step`` with
   ``TorchOptimizer(torch.optim.Adam, fused=True)`` (and ``foreach=True``) as a ratio to the same
   network as a ``torch.nn.Module`` with ``torch.optim.Adam(fused=True)`` and
   ``(foreach=True)``. Target: at most 1.02x.
2. The cost of the non-finite check: the same steps with ``on_nonfinite="ignore"``, and a GD
   step (issue 2's ``run_step`` against ``nn.Module`` + ``torch.optim.SGD``) with and without it.
3. Peak memory of 100 Adam steps on a model of 51M parameters, each loop in a fresh
   subprocess: ``resource.getrusage`` ``ru_maxrss`` at the end minus ``ru_maxrss`` after the
   imports and data set-up (so the model, gradients, optimizer state and activations count),
   as a ratio to the torch.optim loop. Target: at most 1.05x.

Times are medians of many interleaved repeats, measured in one process (the machines are
shared; absolute times mean little). Run: ``python benchmarks/bench_optim_torch.py``
(``--quick`` for fewer repeats, ``--no-memory`` to skip part 3).
"""

from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import diffprog as dp
from diffprog.nn import MLPSpec
from diffprog.optim import GD, TorchOptimizer, run_step
from diffprog.optim._grad import all_finite


def per_call(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def compare(candidates: dict[str, Callable[[], Any]], number: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each candidate, measured interleaved (order rotated)."""
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(per_call(candidates[name], number))
    return {k: statistics.median(v) for k, v in samples.items()}


def twin_networks(sizes: tuple[int, ...], seed: int = 0) -> tuple[Any, torch.nn.Sequential]:
    """The same MLP as a diffprog value and as a torch.nn.Sequential, with equal weights."""
    model = dp.sample(
        MLPSpec(sizes, activation=torch.relu), generator=torch.Generator().manual_seed(seed)
    )
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers)
    with torch.no_grad():
        state = net.state_dict()
        for name, p in dp.named_parameters(model):
            state[name].copy_(p)
    return model, net


def bench_adam_step(
    label: str, sizes: tuple[int, ...], batch: int, classify: bool, number: int, rounds: int
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=gen)
    if classify:
        y = torch.randint(0, sizes[-1], (batch,), generator=gen)
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            torch.nn.functional.cross_entropy
        )
    else:
        y = torch.randn(batch, sizes[-1], generator=gen)
        loss_fn = torch.nn.functional.mse_loss

    candidates: dict[str, Callable[[], Any]] = {}

    def ours(option: str, check: str) -> Callable[[], None]:
        model, _ = twin_networks(sizes)
        state = {
            "model": model,
            "opt": TorchOptimizer.init(model, torch.optim.Adam, **{option: True}),
        }

        def step() -> None:
            m = state["model"]
            loss = loss_fn(m(x), y)
            state["model"], state["opt"] = run_step(m, state["opt"], loss, 1e-3, on_nonfinite=check)  # type: ignore[arg-type]

        return step

    def theirs(option: str) -> Callable[[], None]:
        _, net = twin_networks(sizes)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, **{option: True})

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()

        return step

    candidates["torch fused"] = theirs("fused")
    candidates["torch foreach"] = theirs("foreach")
    candidates["diffprog fused"] = ours("fused", "raise")
    candidates["diffprog foreach"] = ours("foreach", "raise")
    candidates["diffprog fused, unchecked"] = ours("fused", "ignore")
    # The check alone (what on_nonfinite="raise" adds), on this network's loss and gradients.
    probe, _ = twin_networks(sizes)
    probe_loss = loss_fn(probe(x), y)
    probe_grads = dp.grad(probe_loss, dp.flatten_parameters(probe))
    probe_loss = probe_loss.detach()
    candidates["check alone"] = lambda: all_finite(probe_loss, probe_grads)
    for fn in candidates.values():  # warm up (first fused step initialises kernels)
        for _ in range(5):
            fn()
    t = compare(candidates, number, rounds)
    print(f"Adam step, {label} MLP {'-'.join(map(str, sizes))} (batch {batch}):")
    print(f"  torch.optim.Adam fused   {t['torch fused'] * 1e6:9.1f} us")
    print(f"  torch.optim.Adam foreach {t['torch foreach'] * 1e6:9.1f} us")
    ratios = {
        "fused / torch fused": t["diffprog fused"] / t["torch fused"],
        "fused / torch foreach": t["diffprog fused"] / t["torch foreach"],
        "foreach / torch foreach": t["diffprog foreach"] / t["torch foreach"],
        "fused unchecked / torch fused": t["diffprog fused, unchecked"] / t["torch fused"],
        "check cost": t["check alone"] / t["torch fused"],
    }
    print(
        f"  run_step + TorchOptimizer(Adam, fused=True):   {ratios['fused / torch fused']:.3f}x"
        f" torch fused, {ratios['fused / torch foreach']:.3f}x torch foreach"
    )
    print(
        "  run_step + TorchOptimizer(Adam, foreach=True): "
        f"{ratios['foreach / torch foreach']:.3f}x torch foreach"
    )
    print(
        "  fused with on_nonfinite='ignore':              "
        f"{ratios['fused unchecked / torch fused']:.3f}x torch fused"
        f" (the check alone: {t['check alone'] * 1e6:.1f} us,"
        f" {ratios['check cost'] * 100:.1f}% of a torch fused step)"
    )
    return ratios


def bench_gd_check(number: int, rounds: int) -> None:
    sizes = (32, 64, 64, 1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 32, generator=gen), torch.randn(32, 1, generator=gen)

    def ours(check: str) -> Callable[[], None]:
        model, _ = twin_networks(sizes)
        state = {"model": model, "opt": GD()}

        def step() -> None:
            m = state["model"]
            loss = torch.nn.functional.mse_loss(m(x), y)
            state["model"], state["opt"] = run_step(m, state["opt"], loss, 1e-3, on_nonfinite=check)  # type: ignore[arg-type]

        return step

    _, net = twin_networks(sizes)
    sgd = torch.optim.SGD(net.parameters(), lr=1e-3)

    def theirs() -> None:
        sgd.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(x), y).backward()
        sgd.step()

    probe, _ = twin_networks(sizes)
    probe_loss = torch.nn.functional.mse_loss(probe(x), y)
    probe_grads = dp.grad(probe_loss, dp.flatten_parameters(probe))
    probe_loss = probe_loss.detach()
    candidates: dict[str, Callable[[], Any]] = {
        "torch": theirs,
        "checked": ours("raise"),
        "unchecked": ours("ignore"),
        "check alone": lambda: all_finite(probe_loss, probe_grads),
    }
    t = compare(candidates, number, rounds)
    print("GD step, MLP 32-64-64-1 (batch 32), as a ratio to nn.Module + torch.optim.SGD:")
    print(
        f"  run_step checked {t['checked'] / t['torch']:.3f}x, unchecked "
        f"{t['unchecked'] / t['torch']:.3f}x (the check alone: {t['check alone'] * 1e6:.1f} us,"
        f" {t['check alone'] / t['torch'] * 100:.1f}% of a step)"
    )


# --- memory: one loop per fresh process ---------------------------------------------------------

MEMORY_SIZES = (3584, 3584, 3584, 3584, 3584)  # 4 Linear layers: 51.4M parameters
MEMORY_STEPS = 100


def memory_child(kind: str) -> None:
    """Run 100 Adam steps of one kind; print the peak RSS growth in KiB."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, MEMORY_SIZES[0], generator=gen)
    y = torch.randn(8, MEMORY_SIZES[-1], generator=gen)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "torch":
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(MEMORY_SIZES)):
            layers.append(torch.nn.Linear(a, b))
            if i < len(MEMORY_SIZES) - 2:
                layers.append(torch.nn.ReLU())
        net = torch.nn.Sequential(*layers)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
        count = sum(p.numel() for p in net.parameters())
        for _ in range(MEMORY_STEPS):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    else:
        model = dp.sample(MLPSpec(MEMORY_SIZES, activation=torch.relu), generator=gen)
        topt = TorchOptimizer.init(model, torch.optim.Adam, lr=1e-4, fused=True)
        count = sum(p.numel() for p in dp.flatten_parameters(model))
        for _ in range(MEMORY_STEPS):
            loss = torch.nn.functional.mse_loss(model(x), y)
            model, topt = run_step(model, topt, loss, None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{peak - base} {count}")


def bench_memory() -> None:
    results: dict[str, int] = {}
    count = 0
    for kind in ("torch", "diffprog"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", kind],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        results[kind], count = int(out[0]), int(out[1])
    print(
        f"Peak memory of {MEMORY_STEPS} Adam(fused) steps, {count / 1e6:.1f}M parameters "
        "(ru_maxrss growth after set-up, fresh process each):"
    )
    print(f"  torch.optim loop {results['torch'] / 1024:8.1f} MiB")
    print(
        f"  run_step + TorchOptimizer {results['diffprog'] / 1024:8.1f} MiB: "
        f"{results['diffprog'] / results['torch']:.3f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory benchmark")
    parser.add_argument("--memory-child", choices=["torch", "diffprog"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    torch.set_num_threads(1)
    rounds = 7 if args.quick else 31
    bench_adam_step("small", (32, 64, 64, 1), 32, False, number=100, rounds=rounds)
    bench_adam_step("medium", (784, 256, 256, 10), 64, True, number=20, rounds=rounds)
    bench_gd_check(number=100, rounds=rounds)
    if not args.no_memory:
        bench_memory()


if __name__ == "__main__":
    main()
