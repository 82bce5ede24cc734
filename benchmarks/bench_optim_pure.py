"""Pure Adam (``diffprog.optim.Adam`` through ``run_step``) against torch.optim.Adam.

Time: one training step (forward, gradients, update) of a small MLP (32-64-64-1, batch 32) and a
medium one (784-256-256-10, batch 64). The same network as a ``torch.nn.Module`` trained with
``torch.optim.Adam(fused=True)`` is the baseline; ``foreach=True`` is shown too. Every variant
runs in the same process, interleaved round by round; each figure is the median over rounds of
(variant time / fused time in the same round).

Memory: 100 Adam steps on a 50.3M-parameter MLP (4096-4096-4096-4096, batch 8), each variant in
a fresh subprocess: peak resident memory (``ru_maxrss``) minus the resident memory right after
the imports, as a ratio to the torch.optim loop. Tensors this large are mmap-allocated and
returned to the system when freed, so the peak is the live memory at the worst moment.

Run: ``python benchmarks/bench_optim_pure.py`` with ``--rounds N``, ``--threads T`` (on a shared,
busy machine ``--threads 1`` avoids measuring thread contention instead of the code),
``--skip-time`` or ``--skip-memory``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import diffprog as dp
from diffprog.nn import Linear, LinearSpec
from diffprog.optim import Adam, run_step


class MLP(dp.Parameterized):
    """ReLU between the layers, as ``torch.nn.Sequential(Linear, ReLU, ..., Linear)``."""

    layers: tuple[Linear, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def build(sizes: list[int], seed: int = 0) -> tuple[MLP, torch.nn.Sequential]:
    """The same network (same weights) as a diffprog value and as a torch.nn.Module."""
    gen = torch.Generator().manual_seed(seed)
    ours = MLP(
        tuple(dp.sample(LinearSpec(a, b), generator=gen) for a, b in itertools.pairwise(sizes))
    )
    modules: list[torch.nn.Module] = []
    for layer in ours.layers:
        linear = torch.nn.Linear(layer.weight.shape[1], layer.weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(layer.weight)
            assert layer.bias is not None
            linear.bias.copy_(layer.bias)
        modules += [linear, torch.nn.ReLU()]
    return ours, torch.nn.Sequential(*modules[:-1])


def torch_step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    """The usual in-place torch training step."""

    def run() -> None:
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        opt.step()

    return run


def pure_step(
    model: MLP, opt: Adam, x: torch.Tensor, y: torch.Tensor, check: bool = True
) -> Callable[[], None]:
    """A diffprog training step with a pure optimizer; the state is threaded through a cell.

    ``check=False`` turns off run_step's non-finite check (``on_nonfinite="ignore"``), to show
    what it costs."""
    state = [model, opt]
    on_nonfinite = "raise" if check else "ignore"

    def run() -> None:
        m, o = state
        loss = F.mse_loss(m(x), y)
        state[0], state[1] = run_step(m, o, loss, 1e-4, on_nonfinite=on_nonfinite)

    return run


def time_case(name: str, sizes: list[int], batch: int, rounds: int, reps: int) -> dict[str, float]:
    """Median per-round ratios of each variant to torch's fused Adam."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, sizes[0], generator=gen), torch.randn(batch, sizes[-1], generator=gen)
    variants: dict[str, Callable[[], None]] = {}
    model, net = build(sizes)
    variants["torch fused"] = torch_step(
        net, torch.optim.Adam(net.parameters(), 1e-4, fused=True), x, y
    )
    model, net = build(sizes)
    variants["torch foreach"] = torch_step(
        net, torch.optim.Adam(net.parameters(), 1e-4, foreach=True), x, y
    )
    model, _ = build(sizes)
    variants["pure Adam"] = pure_step(model, Adam.init(model), x, y)
    model, _ = build(sizes)
    variants["pure Adam, no check"] = pure_step(model, Adam.init(model), x, y, check=False)
    model, _ = build(sizes)
    variants["pure Adam donate"] = pure_step(model, Adam.init(model, donate=True), x, y)
    for run in variants.values():  # warm up
        for _ in range(reps):
            run()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, run in variants.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                run()
            times[k].append((time.perf_counter() - t0) / reps)
    base = times["torch fused"]
    print(f"\n{name} ({'-'.join(map(str, sizes))}, batch {batch}); {rounds} rounds of {reps} steps")
    result = {}
    for k, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        result[k] = ratio
        print(f"  {k:20s} {statistics.median(ts) * 1e6:9.1f} us/step   {ratio:5.3f}x fused")
    return result


MEMORY_SIZES = [4096, 4096, 4096, 4096]
MEMORY_STEPS = 100


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def memory_child(variant: str) -> None:
    """Run 100 steps of one variant; print the peak memory above the post-import baseline."""
    baseline = _rss_kib()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, MEMORY_SIZES[0], generator=gen)
    y = torch.randn(8, MEMORY_SIZES[-1], generator=gen)
    if variant.startswith("torch"):
        layers: list[torch.nn.Module] = []
        for a, b in itertools.pairwise(MEMORY_SIZES):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers[:-1])
        opt = torch.optim.Adam(net.parameters(), 1e-4, **{variant.split()[1]: True})
        params = sum(p.numel() for p in net.parameters())
        for _ in range(MEMORY_STEPS):
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            opt.step()
    else:
        model = MLP(tuple(dp.sample(LinearSpec(a, b)) for a, b in itertools.pairwise(MEMORY_SIZES)))
        params = sum(p.numel() for p in dp.flatten_parameters(model))
        pure = Adam.init(model, donate=variant.endswith("donate"))
        for _ in range(MEMORY_STEPS):
            loss = F.mse_loss(model(x), y)
            model, pure = run_step(model, pure, loss, 1e-4)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": peak - baseline, "params": params}))


def memory(variants: list[str]) -> dict[str, float]:
    """Peak memory of each variant, each in a fresh subprocess, as ratios to the first."""
    print(f"\nPeak memory of {MEMORY_STEPS} Adam steps, MLP {'-'.join(map(str, MEMORY_SIZES))}")
    peaks = {}
    for variant in variants:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", variant],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        found = json.loads(out.strip().splitlines()[-1])
        peaks[variant] = found["peak_kib"] / 1024
        params = found["params"]
    base = peaks[variants[0]]
    one_copy = params * 4 / 2**20
    print(f"  ({params / 1e6:.1f}M parameters: one float32 copy is {one_copy:.0f} MiB)")
    ratios = {}
    for variant, peak in peaks.items():
        ratios[variant] = peak / base
        print(
            f"  {variant:18s} {peak:8.0f} MiB = {peak / one_copy:4.2f} copies   "
            f"{peak / base:5.3f}x {variants[0]}"
        )
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_time:
        if not os.environ.get("BENCH_MEDIUM_ONLY"):
            time_case("small MLP", [32, 64, 64, 1], 32, args.rounds, reps=50)
        time_case("medium MLP", [784, 256, 256, 10], 64, args.rounds, reps=10)
    if not args.skip_memory:
        memory(["torch fused", "torch foreach", "pure Adam", "pure Adam donate"])


if __name__ == "__main__":
    main()
