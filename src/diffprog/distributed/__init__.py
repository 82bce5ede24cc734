"""Training beyond one process on ``torch.distributed`` (gloo on CPU, NCCL on GPU, launched
with ``torchrun``): data parallel and sharded parameters. See docs/distributed.md and
docs/distributed-sharded.md.

``broadcast_model`` makes every rank start from rank 0's model; ``DataParallel(optimizer)``
averages the gradients over the ranks (bucketed, coalesced all-reduce overlapping the backward
pass) before any optimizer's step, with gradient accumulation as part of the value;
``save_checkpoint`` / ``load_checkpoint`` write on rank 0 and load on every rank.
``shard(model, mesh)`` holds each Parameter as a DTensor shard (ZeRO style: the optimizer
state is sharded with it), ``gathered`` gives the forward the whole parameters, and the
sharded checkpoints write one file per rank.
"""

from diffprog.distributed._broadcast import broadcast_model, sync_tensors
from diffprog.distributed._checkpoint import load_checkpoint, save_checkpoint
from diffprog.distributed._data_parallel import BufferSync, DataParallel
from diffprog.distributed._errors import CollectiveError
from diffprog.distributed._shard import gathered, is_sharded, shard, shard_optimizer, unshard
from diffprog.distributed._shard_checkpoint import (
    gather_checkpoint,
    latest_sharded_checkpoint,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)

__all__ = [
    # --- data parallel ---
    "BufferSync",
    "CollectiveError",
    "DataParallel",
    "broadcast_model",
    "load_checkpoint",
    "save_checkpoint",
    "sync_tensors",
    # --- sharded parameters (ZeRO style, DTensor) ---
    "gathered",
    "is_sharded",
    "shard",
    "shard_optimizer",
    "unshard",
    "gather_checkpoint",
    "latest_sharded_checkpoint",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
]
