"""Sharded (ZeRO style, DTensor) against replicated data-parallel training, on N processes.

Both variants run in the same N processes (gloo on loopback, CPU), interleaved round by round,
on the same MLP and the same per-rank batch, with pure Adam through ``run_step``:

- replicated: every rank holds the whole model and Adam state; the gradients are averaged with
  one all-reduce of a flat buffer (what data parallelism does), then ``apply_gradients``;
- sharded: ``diffprog.distributed.shard``; the loss of ``gathered(model)`` (all-gather), the
  gradients reduce-scattered into the shards, Adam stepping the shards.

Printed: the median over rounds of (sharded step time / replicated step time in the same
round), and the bytes each rank holds between steps (parameters + optimizer state), counted
exactly from the tensors (``to_local()`` for the shards). On one host the step time measures
the overhead of the communication and of DTensor's dispatch, not a speed-up.

Then the peak memory of a step, each variant in fresh processes (``--memory-sizes``, a larger
MLP): the growth of each rank's peak resident memory (``ru_maxrss``) over a few steps, from
the resident memory right after building the model and its optimizer, as a ratio of the
replicated one. That peak includes what a step holds whole either way (the gathered
parameters, the activations, the full gradients before the reduce-scatter).

Run: ``python benchmarks/bench_distributed_shard.py`` with ``--world N`` (default 2),
``--rounds R``, ``--sizes 512,1024,1024,10``, ``--batch B`` (per rank), ``--skip-memory``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import resource
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import diffprog as dp
from diffprog.nn import Linear, LinearSpec
from diffprog.optim import Adam, apply_gradients, run_step


class MLP(dp.Parameterized):
    layers: tuple[Linear, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def _held_bytes(*values: Any) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for value in values:
        for t in dp.tensors(value):
            local = t.to_local() if isinstance(t, DTensor) else t
            total += local.numel() * local.element_size()
    return total


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    from torch.distributed.device_mesh import init_device_mesh

    from diffprog.distributed import gathered, shard

    mesh = init_device_mesh("cpu", (world,))
    sizes = [int(s) for s in args.sizes.split(",")]
    gen = torch.Generator().manual_seed(0)
    model = MLP(
        tuple(dp.sample(LinearSpec(a, b), generator=gen) for a, b in itertools.pairwise(sizes))
    )
    x = torch.randn(args.batch, sizes[0], generator=torch.Generator().manual_seed(rank))
    y = torch.randint(0, sizes[-1], (args.batch,), generator=torch.Generator().manual_seed(rank))

    replicated, rep_opt = model, Adam.init(model)
    sharded = shard(model, mesh)
    sh_opt = Adam.init(sharded)

    def replicated_step() -> None:
        nonlocal replicated, rep_opt
        params = dp.flatten_parameters(replicated)
        grads = dp.grad(F.cross_entropy(replicated(x), y), params, retain_graph=False)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        averaged = [
            piece.view_as(g)
            for piece, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)
        ]
        replicated, rep_opt = apply_gradients(replicated, rep_opt, averaged, 1e-3)

    def sharded_step() -> None:
        nonlocal sharded, sh_opt
        loss = F.cross_entropy(gathered(sharded)(x), y)
        sharded, sh_opt = run_step(sharded, sh_opt, loss, 1e-3)

    def timed(step: Any) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        dist.barrier()
        return (time.perf_counter() - start) / args.steps

    for step in (replicated_step, sharded_step):  # warm-up
        timed(step)
    ratios, rep_times, sh_times = [], [], []
    for _ in range(args.rounds):
        rep = timed(replicated_step)
        sh = timed(sharded_step)
        rep_times.append(rep)
        sh_times.append(sh)
        ratios.append(sh / rep)
    if rank == 0:
        n = sum(p.numel() for p in dp.flatten_parameters(model))
        rep_bytes = _held_bytes(replicated, rep_opt)
        sh_bytes = _held_bytes(sharded, sh_opt)
        med_rep, med_sh = statistics.median(rep_times), statistics.median(sh_times)
        lines = [
            f"world {world}, MLP {args.sizes} ({n / 1e6:.2f}M parameters), Adam, "
            f"batch {args.batch} per rank, 1 thread per rank",
            f"replicated step {med_rep * 1e3:.1f} ms, sharded {med_sh * 1e3:.1f} ms",
            f"sharded / replicated step time: median {statistics.median(ratios):.2f} "
            f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {args.rounds} rounds",
            "held per rank between steps (parameters + Adam state): "
            f"replicated {rep_bytes / 2**20:.1f} MiB, sharded {sh_bytes / 2**20:.1f} MiB "
            f"(ratio {sh_bytes / rep_bytes:.2f})",
        ]
        print("\n".join(lines))
    dist.destroy_process_group()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    from torch.distributed.device_mesh import init_device_mesh

    from diffprog.distributed import gathered, shard

    sizes = [int(s) for s in args.memory_sizes.split(",")]
    gen = torch.Generator().manual_seed(0)
    model = MLP(
        tuple(dp.sample(LinearSpec(a, b), generator=gen) for a, b in itertools.pairwise(sizes))
    )
    x = torch.randn(args.batch, sizes[0], generator=torch.Generator().manual_seed(rank))
    y = torch.randint(0, sizes[-1], (args.batch,), generator=torch.Generator().manual_seed(rank))
    if args.variant == "sharded":
        model = shard(model, init_device_mesh("cpu", (world,)))
    optimizer = Adam.init(model)
    del gen
    held = _held_bytes(model, optimizer)
    base = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(3):
        if args.variant == "sharded":
            loss = F.cross_entropy(gathered(model)(x), y)
            model, optimizer = run_step(model, optimizer, loss, 1e-3)
        else:
            params = dp.flatten_parameters(model)
            grads = dp.grad(F.cross_entropy(model(x), y), params, retain_graph=False)
            for g in grads:
                dist.all_reduce(g)
            model, optimizer = apply_gradients(model, optimizer, grads, 1e-3)
            del grads, params
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.put((rank, held, max(peak, peak_before) - base))
    dist.destroy_process_group()


def _memory(args: argparse.Namespace) -> None:
    results = {}
    for variant in ("replicated", "sharded"):
        args.variant = variant
        queue = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(
            _memory_worker,
            args=(args.world, _port(), args, queue),
            nprocs=args.world,
            start_method="spawn",
        )
        results[variant] = [queue.get() for _ in range(args.world)]
    n = sum(a * b + b for a, b in itertools.pairwise(int(s) for s in args.memory_sizes.split(",")))
    print(f"peak memory, MLP {args.memory_sizes} ({n / 1e6:.1f}M parameters), Adam, 3 steps:")
    rep_peak = max(r[2] for r in results["replicated"])
    for variant, rows in results.items():
        held = max(r[1] for r in rows) / 2**20
        peak = max(r[2] for r in rows)
        print(
            f"  {variant}: held {held:.0f} MiB per rank; peak growth during steps "
            f"{peak / 2**20:.0f} MiB per rank (ratio to replicated {peak / rep_peak:.2f})"
        )


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sizes", default="512,1024,1024,10")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--memory-sizes", default="2048,2048,2048,2048,10")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    port = _port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(
        _worker, args=(args.world, port, args), nprocs=args.world, start_method="spawn"
    )
    if not args.skip_memory:
        _memory(args)


if __name__ == "__main__":
    main()
