"""``CollectiveError``: a collective operation of a data-parallel step failed on this rank."""

from __future__ import annotations

from typing import Literal

from diffprog import DiffprogError

__all__ = ["CollectiveError"]


class CollectiveError(DiffprogError):
    """A collective of ``torch.distributed`` failed: a peer died, hung or disagreed.

    Raised in place of the backend's error (``torch.distributed.DistBackendError``, a gloo
    "Connection closed by peer", a timeout), which stays attached as ``__cause__``. The step
    was not taken: the model and optimizer passed in are unchanged (a ``TorchOptimizer``'s
    too, as nothing was written). A wait that failed (``stage="wait"``: a peer died or timed
    out) leaves the process group unusable: end the process and restart every rank from the
    last checkpoint. A collective the backend refused to start (``stage="start"``: tensors on
    a device the group does not serve, say) is a mistake in the program, which the message
    names.

    Attributes:
        what: the collective that failed, in words (``"the all-reduce of gradient bucket 2"``).
        rank: this process's rank in the group.
        world: the number of processes in the group.
        stage: ``"start"`` (the backend refused to launch it) or ``"wait"`` (it failed or
            timed out while running).
    """

    def __init__(
        self,
        what: str,
        rank: int,
        world: int,
        cause: BaseException,
        *,
        stage: Literal["start", "wait"] = "wait",
    ) -> None:
        self.what = what
        self.rank = rank
        self.world = world
        self.stage = stage
        said = str(cause).strip().splitlines()[0] if str(cause).strip() else "no message"
        if stage == "start":
            advice = (
                "The backend refused to start it: the tensors are probably on a device the "
                "process group's backend does not serve (an NCCL group takes only CUDA "
                "tensors: move the model to this rank's GPU, torch.cuda.set_device(local_rank)"
                "), or the group was destroyed. The step was not taken."
            )
        else:
            advice = (
                "Another rank probably died, or did not reach the same collective within the "
                "process group's timeout (init_process_group(timeout=...)). The step was not "
                "taken. Stop every rank and restart from the last checkpoint "
                "(diffprog.distributed.load_checkpoint)."
            )
        super().__init__(
            f"{what} {'could not be started' if stage == 'start' else 'failed'} on rank {rank} "
            f"of {world}: {type(cause).__name__}: {said}. {advice}"
        )
