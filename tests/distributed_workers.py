"""What the processes of tests/test_distributed.py run, and the one-process references.

Each test starts real processes (``multiprocessing``'s spawn, gloo over loopback, a file store
in the test's folder) that run :func:`worker` with a list of jobs; each job writes what it
found to ``out/<job>-rank<r>.pt`` for the test to compare with :func:`reference`, computed in
the test's own process on the concatenated batches.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import diffprog as dp
from diffprog import Parameterized, nn
from diffprog.distributed import (
    CollectiveError,
    DataParallel,
    broadcast_model,
    load_checkpoint,
    save_checkpoint,
)
from diffprog.nn import BatchNorm1dSpec, Linear, LinearSpec, Sequential, SequentialSpec
from diffprog.optim import GD, SGD, Adam, TorchOptimizer, run_step

GLOBAL_BATCH = 12  # divisible by 2 and 3 ranks, and by 2 micro-batches on each
STEPS = 3
TIMEOUT = datetime.timedelta(seconds=15)


class Tied(Parameterized):
    """A model with a tie (``dec.weight is enc.weight``), a frozen layer and an unused one."""

    enc: Linear
    dec: Linear
    frozen: Linear
    unused: Linear
    head: Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.dec(torch.tanh(self.enc(x)))) + self.frozen(x)
        return self.head(h)


def tied_model(seed: int) -> Tied:
    """The tied model, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    enc = dp.sample(LinearSpec(4, 4), generator=g)
    dec = dp.sample(LinearSpec(4, 4), generator=g)
    model = Tied(
        enc,
        Linear(enc.weight, dec.bias),
        dp.sample(LinearSpec(4, 4), generator=g),
        dp.sample(LinearSpec(4, 4), generator=g),
        dp.sample(LinearSpec(4, 2), generator=g),
    )
    return dp.freeze(model, "frozen.*")


def bn_model(seed: int) -> Sequential:
    """Linear (no bias: BatchNorm cancels it, and Adam would amplify its zero gradient's
    rounding), BatchNorm1d, ReLU, Linear: a model with buffers."""
    spec = SequentialSpec(
        LinearSpec(4, 3, bias=False), BatchNorm1dSpec(3), torch.relu, LinearSpec(3, 2)
    )
    return dp.sample(spec, generator=torch.Generator().manual_seed(seed))


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the grid: an optimizer (built for the model), its lr, accumulation."""

    name: str
    make: Callable[[Any], Any]
    lr: float | None
    accumulate: int = 1
    bucket_cap_mb: float = 25.0
    bn: str | None = None  # the buffers setting, for the BatchNorm model
    branch: bool = False  # rank 0's loss also reaches the "unused" layer, the others' do not


TINY = 1e-4  # MiB: about 100 bytes, several buckets for these models

CASES = [
    Case("gd", lambda m: GD(), 0.1),
    Case("gd-acc", lambda m: GD(), 0.1, accumulate=2, bucket_cap_mb=TINY),
    Case("sgdm", lambda m: SGD.init(m, momentum=0.9), 0.05, bucket_cap_mb=TINY),
    Case("sgdm-acc", lambda m: SGD.init(m, momentum=0.9), 0.05, accumulate=2),
    Case("adam", lambda m: Adam.init(m), 0.01),
    Case("adam-acc", lambda m: Adam.init(m), 0.01, accumulate=2, bucket_cap_mb=TINY),
    Case("torch-adam", lambda m: TorchOptimizer.init(m, torch.optim.Adam, lr=0.01), None),
    Case(
        "torch-sgdm-acc",
        lambda m: TorchOptimizer.init(m, torch.optim.SGD, lr=0.05, momentum=0.9),
        None,
        accumulate=2,
        bucket_cap_mb=TINY,
    ),
    Case("adam-branch", lambda m: Adam.init(m), 0.01, branch=True, bucket_cap_mb=TINY),
    Case("bn-broadcast", lambda m: Adam.init(m), 0.01, bn="broadcast", bucket_cap_mb=TINY),
    Case("bn-average", lambda m: SGD.init(m, momentum=0.9), 0.05, bn="average"),
]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: inputs ``[12, 4]``, targets ``[12, 2]``."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 4, generator=g), torch.randn(GLOBAL_BATCH, 2, generator=g)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of ``t`` (what a DistributedSampler without shuffling
    gives, up to order)."""
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def mse(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean squared error of ``model`` on ``(x, y)``."""
    return F.mse_loss(model(x), y)


def extra(model: Any, x: torch.Tensor) -> torch.Tensor:
    """A term of rank 0's loss only: a parameter that one rank's loss reaches."""
    return 0.1 * model.unused(x).pow(2).mean()


def initial(case: Case, seed: int) -> Any:
    """The case's model, drawn from ``seed``."""
    return bn_model(seed) if case.bn else tied_model(seed)


def train_dp(case: Case, model: Any, opt: Any, rank: int, world: int, steps: range) -> Any:
    """Data-parallel training of ``case`` for ``steps``, from ``(model, opt)``."""
    for step in steps:
        x, y = batch(step)
        xs, ys = shard(x, rank, world), shard(y, rank, world)
        micro = xs.shape[0] // case.accumulate
        for k in range(case.accumulate):
            xm, ym = xs[k * micro : (k + 1) * micro], ys[k * micro : (k + 1) * micro]
            if case.bn:
                loss, model = nn.training(mse, model, xm, ym)
            else:
                loss = mse(model, xm, ym)
            if case.branch and rank == 0:
                loss = loss + extra(model, xm)
            model, opt = run_step(model, opt, loss, case.lr)
    return model, opt


def reference(case: Case, world: int, steps: int = STEPS) -> Any:
    """One process on the concatenated batches (for BatchNorm: each rank's share normalised
    on its own, the running statistics from rank 0's share or averaged, as DataParallel's
    buffers setting says)."""
    model = initial(case, seed=0)
    opt = case.make(model)
    for step in range(steps):
        x, y = batch(step)
        if case.bn is None:
            loss = mse(model, x, y)
            if case.branch:  # rank 0's extra term, in the average over the ranks
                loss = loss + extra(model, shard(x, 0, world)) / world
        else:
            parts = [
                nn.training(mse, model, shard(x, r, world), shard(y, r, world))
                for r in range(world)
            ]
            loss = torch.stack([p[0] for p in parts]).mean()
            updated = [p[1] for p in parts]
            if case.bn == "broadcast":
                model = updated[0]
            else:
                stats = [dp.named_tensors(m) for m in updated]
                mean = {
                    path: torch.stack([dict(s)[path] for s in stats]).mean(0)
                    if t.is_floating_point() and not isinstance(t, torch.nn.Parameter)
                    else t
                    for path, t in stats[0]
                }
                model = dp.map_tensors(
                    lambda path, t, mean=mean: mean[path], updated[0], with_path=True
                )
        model, opt = run_step(model, opt, loss, case.lr)
    return model


def values(model: Any) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` by path, detached copies."""
    return {path: t.detach().clone() for path, t in dp.named_tensors(model)}


# --- the jobs ---------------------------------------------------------------------------------


def job_grid(rank: int, world: int, out: pathlib.Path) -> None:
    """Every case: a different model per rank, broadcast from rank 0, trained STEPS steps."""
    found = {}
    for case in CASES:
        own = initial(case, seed=rank)  # rank 0 draws the reference's model
        model = broadcast_model(own)
        assert torch.equal(
            dp.flatten_parameters(own)[0], dp.flatten_parameters(initial(case, rank))[0]
        )
        opt = DataParallel(
            case.make(model),
            accumulate=case.accumulate,
            bucket_cap_mb=case.bucket_cap_mb,
            buffers=case.bn or "broadcast",
        )
        model, opt = train_dp(case, model, opt, rank, world, range(STEPS))
        found[case.name] = values(model)
        if case.bn is None:
            found[case.name + ":tie"] = model.dec.weight is model.enc.weight  # type: ignore[assignment]
    torch.save(found, out / f"grid-rank{rank}.pt")


RESUMED = ["adam", "torch-sgdm-acc"]


def job_resume(rank: int, world: int, out: pathlib.Path) -> None:
    """Load the checkpoints the test saved at step 2 (one process), train to step STEPS."""
    found = {}
    for name in RESUMED:
        case = next(c for c in CASES if c.name == name)
        skeleton = initial(case, seed=rank + 7)
        opt = DataParallel(case.make(skeleton), accumulate=case.accumulate)
        loaded = load_checkpoint(out / f"{name}.safetensors", model=skeleton, optimizer=opt)
        assert loaded.step == 2 and isinstance(loaded.optimizer, DataParallel)
        model, _ = train_dp(case, loaded.model, loaded.optimizer, rank, world, range(2, STEPS))
        found[name] = values(model)
    torch.save(found, out / f"resume-rank{rank}.pt")


def job_diverge(rank: int, world: int, out: pathlib.Path) -> None:
    """Each rank draws its own model and does not broadcast it: the first step refuses."""
    case = next(c for c in CASES if c.name == "adam")
    model = initial(case, seed=rank)
    x, y = batch(0)
    try:
        run_step(model, DataParallel(case.make(model)), mse(model, x, y), 0.1)
    except dp.DiffprogError as e:
        (out / f"diverge-rank{rank}.txt").write_text(str(e))
    # The trained parameters broadcast, the frozen layer each rank's own: refused too.
    model = broadcast_model(initial(case, seed=0))
    own = initial(case, seed=rank)
    swap = {
        id(a): b
        for a, b in zip(dp.tensors(model), dp.tensors(own), strict=True)
        if isinstance(a, dp.Frozen)
    }
    assert swap  # the case has a frozen layer
    model = dp.map_tensors(lambda t: swap.get(id(t), t), model)
    try:
        run_step(model, DataParallel(case.make(model)), mse(model, x, y), 0.1)
    except dp.DiffprogError as e:
        (out / f"diverge-frozen-rank{rank}.txt").write_text(str(e))


HANG_TIMEOUT = datetime.timedelta(seconds=2)


def job_hang(rank: int, world: int, out: pathlib.Path) -> None:
    """In a group with a short timeout, the last rank does not come to a step; the others
    report their error."""
    group = dist.new_group(timeout=HANG_TIMEOUT)
    case = next(c for c in CASES if c.name == "gd")
    model = initial(case, seed=0)
    opt = DataParallel(case.make(model), group=group)
    if rank == world - 1:
        time.sleep(HANG_TIMEOUT.total_seconds() + 2)  # hangs, then goes on without this group
        return
    start = time.monotonic()
    try:
        train_dp(case, model, opt, rank, world, range(1))
    except CollectiveError as e:
        (out / f"hang-rank{rank}.txt").write_text(f"{time.monotonic() - start:.1f}\n{e}")


def job_die(rank: int, world: int, out: pathlib.Path) -> None:
    """Checkpoint every step; the last rank dies at step 3; the others report their error."""
    case = next(c for c in CASES if c.name == "adam")
    model = broadcast_model(initial(case, seed=0))
    opt = DataParallel(case.make(model))
    start = time.monotonic()
    try:
        for step in range(10):
            if step == 3 and rank == world - 1:
                os._exit(3)  # no goodbye: a crash
            model, opt = train_dp(case, model, opt, rank, world, range(step, step + 1))
            save_checkpoint(
                out / f"die-{step + 1}.safetensors",
                model=model,
                optimizer=opt,
                step=step + 1,
                keep_last=2,
            )
            start = time.monotonic()
    except CollectiveError as e:
        (out / f"die-rank{rank}.txt").write_text(f"{time.monotonic() - start:.1f}\n{e}")
        os._exit(0)  # the group is broken: no clean shutdown to wait for


JOBS = {
    "grid": job_grid,
    "resume": job_resume,
    "hang": job_hang,
    "diverge": job_diverge,
    "die": job_die,
}


def worker(rank: int, world: int, folder: str, jobs: list[str]) -> None:
    """One process: join the group (gloo, loopback, a file store), run ``jobs``, leave."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    out = pathlib.Path(folder)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{out / 'store'}",
            rank=rank,
            world_size=world,
            timeout=TIMEOUT,
        )
        for job in jobs:
            JOBS[job](rank, world, out)
        dist.destroy_process_group()
    except BaseException:
        (out / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise
