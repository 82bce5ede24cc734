"""``CollectiveError``: a collective operation of a data-parallel step failed on this rank."""

from __future__ import annotations

from diffprog import DiffprogError

__all__ = ["CollectiveError"]


class CollectiveError(DiffprogError):
    """A collective of ``torch.distributed`` failed: a peer died, hung or disagreed.

    Raised in place of the backend's error (``torch.distributed.DistBackendError``, a gloo
    "Connection closed by peer", a timeout), which stays attached as ``__cause__``. The step
    was not taken: the model and optimizer passed in are unchanged (a ``TorchOptimizer``'s
    too, as nothing was written). The process group cannot be used any more: end the process
    and restart every rank from the last checkpoint.

    Attributes:
        what: the collective that failed, in words (``"the all-reduce of gradient bucket 2"``).
        rank: this process's rank in the group.
        world: the number of processes in the group.
    """

    def __init__(self, what: str, rank: int, world: int, cause: BaseException) -> None:
        self.what = what
        self.rank = rank
        self.world = world
        super().__init__(
            f"{what} failed on rank {rank} of {world}: {type(cause).__name__}: "
            f"{str(cause).strip().splitlines()[0] if str(cause).strip() else 'no message'}. "
            "Another rank probably died, or did not reach the same collective within the "
            "process group's timeout (init_process_group(timeout=...)). The step was not "
            "taken. Stop every rank and restart from the last checkpoint "
            "(diffprog.distributed.load_checkpoint)."
        )
