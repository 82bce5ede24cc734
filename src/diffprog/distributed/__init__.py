"""Training beyond one process on ``torch.distributed``: data parallel (gloo on CPU, NCCL on GPU,
launched with ``torchrun``). See docs/distributed.md.

``broadcast_model`` makes every rank start from rank 0's model; ``DataParallel(optimizer)``
averages the gradients over the ranks (bucketed, coalesced all-reduce overlapping the backward
pass) before any optimizer's step, with gradient accumulation as part of the value;
``save_checkpoint`` / ``load_checkpoint`` write on rank 0 and load on every rank.
"""

from diffprog.distributed._broadcast import broadcast_model, sync_tensors
from diffprog.distributed._checkpoint import load_checkpoint, save_checkpoint
from diffprog.distributed._data_parallel import BufferSync, DataParallel
from diffprog.distributed._errors import CollectiveError

__all__ = [
    # --- data parallel ---
    "BufferSync",
    "CollectiveError",
    "DataParallel",
    "broadcast_model",
    "load_checkpoint",
    "save_checkpoint",
    "sync_tensors",
]
