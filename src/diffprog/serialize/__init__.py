"""Saving and loading: model files, optimizer state, PyTorch interop and training checkpoints."""

from diffprog.serialize._optim_state import (
    OptimizerState,
    OptimizerStateError,
    load_optimizer_state,
    load_optimizer_state_dict,
    optimizer_state,
    optimizer_state_dict,
)

__all__ = [
    # --- optimizer state (hf) ---
    "OptimizerState",
    "OptimizerStateError",
    "load_optimizer_state",
    "load_optimizer_state_dict",
    "optimizer_state",
    "optimizer_state_dict",
]
