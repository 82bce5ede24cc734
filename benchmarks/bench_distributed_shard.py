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

Run: ``python benchmarks/bench_distributed_shard.py`` with ``--world N`` (default 2),
``--rounds R``, ``--sizes 512,1024,1024,10``, ``--batch B`` (per rank).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sizes", default="512,1024,1024,10")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(
        _worker, args=(args.world, port, args), nprocs=args.world, start_method="spawn"
    )


if __name__ == "__main__":
    main()
