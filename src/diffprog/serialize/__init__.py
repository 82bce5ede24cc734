"""Saving and loading models: state dicts, safetensors and ``.pt`` files; optimizer state,
its ``torch.optim`` interop, and training checkpoints.

Re-exported at the top level (``dp.save_params``, ``dp.load_params``, ...). See
docs/serialize.md.
"""

from diffprog.serialize._checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from diffprog.serialize._errors import LoadError, SaveError
from diffprog.serialize._files import (
    Format,
    load_params,
    load_tensors,
    save_params,
    save_tensors,
)
from diffprog.serialize._optim_state import (
    OptimizerState,
    OptimizerStateError,
    load_optimizer_state,
    load_optimizer_state_dict,
    optimizer_state,
    optimizer_state_dict,
)
from diffprog.serialize._state_dict import KeyMap, LoadResult, load_state_dict, state_dict

__all__ = [
    "Format",
    "KeyMap",
    "LoadError",
    "LoadResult",
    "SaveError",
    "load_params",
    "load_state_dict",
    "load_tensors",
    "save_params",
    "save_tensors",
    "state_dict",
    # --- optimizer state and checkpoints (hf) ---
    "Checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "OptimizerState",
    "OptimizerStateError",
    "load_optimizer_state",
    "load_optimizer_state_dict",
    "optimizer_state",
    "optimizer_state_dict",
]
