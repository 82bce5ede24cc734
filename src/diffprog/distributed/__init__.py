"""Training beyond one process on ``torch.distributed``: sharded parameters (ZeRO style).

See docs/distributed-sharded.md.
"""

from diffprog.distributed._shard import gathered, is_sharded, shard, shard_optimizer, unshard
from diffprog.distributed._shard_checkpoint import (
    gather_checkpoint,
    latest_sharded_checkpoint,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)

__all__ = [
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
