"""The digits classifier (``diffprog.examples.digits``) trained data-parallel on CPU processes.

Each process (a rank) trains on its share of every batch: a ``DistributedSampler`` deals the
shuffled training images out to the ranks, ``broadcast_model`` starts every rank from rank 0's
weights, and ``DataParallel(Adam)`` averages the gradients over the ranks (gloo, all-reduce in
buckets overlapping the backward pass) before each Adam step, so the ranks stay identical and
train as one process would on the whole batch. Each rank prints its throughput; rank 0 prints
the test accuracy after each epoch and, with ``--checkpoint DIR``, saves a checkpoint there
after each epoch (``--resume`` continues from the newest, on any number of ranks).

Run: ``torchrun --nproc-per-node 2 -m diffprog.examples.digits_ddp [--epochs 10]``
(``python -m diffprog.examples.digits_ddp`` runs one rank). Needs scikit-learn (the
``examples`` extra).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import diffprog as dp
from diffprog.distributed import DataParallel, broadcast_model, load_checkpoint, save_checkpoint
from diffprog.examples.digits import accuracy, cnn_spec, load, shift
from diffprog.optim import Adam, run_step


def init_process_group(timeout: float) -> None:
    """Join the group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), or
    make a group of one when run without torchrun."""
    wait = datetime.timedelta(seconds=timeout)
    if "RANK" in os.environ:
        dist.init_process_group("gloo", timeout=wait)
    else:
        store = dist.HashStore()  # type: ignore[attr-defined]
        dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=wait)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, train data-parallel, print throughput and accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (10)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate (3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights, order")
    parser.add_argument("--timeout", type=float, default=60.0, help="collective timeout (s)")
    parser.add_argument("--checkpoint", type=pathlib.Path, help="folder for checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per rank: these layers are small
    init_process_group(args.timeout)
    try:
        train(args)
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def train(args: argparse.Namespace) -> None:
    """The training loop of every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must divide among {world} ranks")
    data = load(seed=args.seed)
    dataset = TensorDataset(data.train_x, data.train_y)
    # Each rank gets its own 1/world of a shuffled order (the same order on every rank,
    # reshuffled by set_epoch); drop_last keeps the shares, so the batches, equal.
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        dataset, world, rank, shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(dataset, batch_size=args.batch_size // world, sampler=sampler)
    model = dp.sample(cnn_spec(), generator=torch.Generator().manual_seed(args.seed))
    model = broadcast_model(model)  # rank 0's weights everywhere
    optimizer = DataParallel(Adam.init(model))
    first = 1
    if args.checkpoint is not None:
        args.checkpoint.mkdir(parents=True, exist_ok=True)
    if args.resume and args.checkpoint is not None:
        latest = dp.latest_checkpoint(args.checkpoint)
        if latest is not None:
            loaded = load_checkpoint(latest, model=model, optimizer=optimizer)
            model, optimizer, first = loaded.model, loaded.optimizer, loaded.extra["epoch"] + 1
            if rank == 0:
                print(f"resumed from {latest} (epoch {first - 1}, step {loaded.step})")
    if rank == 0:
        print(
            f"{world} rank(s), {len(data.train_y)} training images, global batch {args.batch_size}"
        )
    images, seconds = 0, 0.0
    for epoch in range(first, args.epochs + 1):
        sampler.set_epoch(epoch)
        # Each rank shifts its images with its own random numbers (augmentation).
        generator = torch.Generator().manual_seed(args.seed * 1000 + epoch * world + rank)
        start = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(shift(x, generator)), y)
            model, optimizer = run_step(model, optimizer, loss, args.lr)
            images += len(y)
        seconds += time.perf_counter() - start
        if rank == 0:
            tested = accuracy(model, data.test_x, data.test_y)
            print(f"epoch {epoch}: loss {loss.item():.4f}, test accuracy {tested:.2%}")
        if args.checkpoint is not None:
            save_checkpoint(
                args.checkpoint / f"epoch-{epoch}.safetensors",
                model=model,
                optimizer=optimizer,
                step=optimizer.count,
                keep_last=2,
                epoch=epoch,
            )
    rate = images / seconds if seconds > 0 else math.nan
    line = f"rank {rank}: {images} images in {seconds:.1f} s, {rate:.0f} images/s"
    # Rank 0 prints every rank's line, in rank order: lines the ranks printed themselves would
    # interleave in torchrun's shared output.
    lines: list[str | None] = [None] * world
    dist.all_gather_object(lines, line)
    if rank == 0:
        print("\n".join(str(each) for each in lines))
        print(f"final test accuracy: {accuracy(model, data.test_x, data.test_y):.2%}")


if __name__ == "__main__":
    main()
