"""Data-parallel step time: two processes against one, on the same global batch.

Two ranks (gloo over loopback, one torch thread each) train an MLP with Adam; each round, in
turn (the order rotated round by round):

- ``one``: one process steps on the whole global batch (``run_step``, plain ``Adam``) while
  the other rank waits at a barrier: the baseline.
- ``dp``: both ranks step on their half with ``DataParallel(Adam)`` (``run_step``: the
  all-reduce overlaps the backward pass).
- ``dp-after``: the same, the gradients computed first (``value_and_grad``) and averaged by
  ``apply_gradients``: no overlap.
- ``local``: both ranks step on their half with plain ``Adam``, no communication (the compute
  part of ``dp``, with both ranks on the machine's cores).

Each figure is the median over rounds of the ratio to ``one`` within the round (rank 0's
clock; the ranks wait for each other in every ``dp`` step). On one host this measures the
overhead of data parallelism (processes, all-reduce), not a speed-up: two processes on two
cores that other jobs share do not beat one. Run: ``python benchmarks/bench_distributed.py``
(``--quick`` for fewer rounds).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import diffprog as dp
from diffprog.distributed import DataParallel, broadcast_model
from diffprog.nn import MLPSpec
from diffprog.optim import Adam, apply_gradients, run_step, value_and_grad

SIZES = {"small": ((32, 64, 64, 1), 64), "medium": ((784, 256, 256, 10), 256)}


def rank_main(rank: int, world: int, store: str, rounds: int, steps: int, queue: Any) -> None:
    """One rank: join the group, time every candidate ``rounds`` times, report to ``queue``."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    results = {}
    for name, (sizes, batch) in SIZES.items():
        results[name] = measure(rank, world, sizes, batch, rounds, steps)
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def measure(
    rank: int, world: int, sizes: tuple[int, ...], batch: int, rounds: int, steps: int
) -> dict[str, list[float]]:
    """Seconds per step of each candidate in each round (rank 0's clock)."""
    g = torch.Generator().manual_seed(0)
    model = broadcast_model(dp.sample(MLPSpec(sizes, activation=torch.relu), generator=g))
    x = torch.randn(batch, sizes[0], generator=g)
    y = torch.randn(batch, sizes[-1], generator=g)
    part = slice(rank * batch // world, (rank + 1) * batch // world)
    xs, ys = x[part], y[part]
    state: dict[str, Any] = {
        "one": (model, Adam.init(model)),
        "dp": (model, DataParallel(Adam.init(model))),
        "dp-after": (model, DataParallel(Adam.init(model))),
        "local": (model, Adam.init(model)),
    }

    def one() -> None:
        if rank == 0:
            m, o = state["one"]
            state["one"] = run_step(m, o, F.mse_loss(m(x), y), 1e-3)

    def data_parallel() -> None:
        m, o = state["dp"]
        state["dp"] = run_step(m, o, F.mse_loss(m(xs), ys), 1e-3)

    def after() -> None:
        m, o = state["dp-after"]
        _, grads = value_and_grad(lambda mm: F.mse_loss(mm(xs), ys))(m)
        state["dp-after"] = apply_gradients(m, o, grads, 1e-3)

    def local() -> None:
        m, o = state["local"]
        state["local"] = run_step(m, o, F.mse_loss(m(xs), ys), 1e-3)

    candidates: dict[str, Callable[[], None]] = {
        "one": one,
        "dp": data_parallel,
        "dp-after": after,
        "local": local,
    }
    names = list(candidates)
    for fn in candidates.values():  # warm up
        fn()
        dist.barrier()
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                candidates[name]()
            samples[name].append((time.perf_counter() - start) / steps)
            dist.barrier()
    return samples


def main() -> None:
    """Start two ranks, print the medians and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    args = parser.parse_args()
    rounds, steps = (5, 10) if args.quick else (21, 30)
    world = 2
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        ranks = [
            context.Process(target=rank_main, args=(r, world, store, rounds, steps, queue))
            for r in range(world)
        ]
        for p in ranks:
            p.start()
        results = queue.get(timeout=1800)
        for p in ranks:
            p.join()
    print(
        f"torch {torch.__version__}, {world} ranks (gloo, loopback, 1 thread each), "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {rounds} rounds of {steps} steps"
    )
    for name, samples in results.items():
        sizes, batch = SIZES[name]
        print(
            f"\nMLP {'-'.join(map(str, sizes))}, global batch {batch} ({batch // world} per rank)"
        )
        one = samples["one"]
        print(f"  one process: {statistics.median(one) * 1e3:.2f} ms/step (the baseline)")
        for key in ("dp", "dp-after", "local"):
            ratios = [s / b for s, b in zip(samples[key], one, strict=True)]
            print(
                f"  {key:9s} {statistics.median(samples[key]) * 1e3:7.2f} ms/step, "
                f"{statistics.median(ratios):.2f}x of one process"
            )
        overhead = [a / b for a, b in zip(samples["dp"], samples["local"], strict=True)]
        print(f"  dp / local (what communication adds): {statistics.median(overhead):.2f}x")


if __name__ == "__main__":
    main()
