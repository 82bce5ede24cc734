"""Training beyond one process on ``torch.distributed``: sharded parameters (ZeRO style).

See docs/distributed-sharded.md.
"""

from diffprog.distributed._shard import gathered, is_sharded, shard, shard_optimizer, unshard

__all__ = ["gathered", "is_sharded", "shard", "shard_optimizer", "unshard"]
