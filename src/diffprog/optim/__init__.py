"""Optimizers as values (Hasktorch's ``Torch.Optim``) and the training loop around them."""

from diffprog.optim._adagrad import Adagrad
from diffprog.optim._adam import Adam, mk_adam
from diffprog.optim._adamw import AdamW
from diffprog.optim._clip import (
    Chain,
    ClipByGlobalNorm,
    ClipByValue,
    ClipGradNorm,
    GradientTransform,
    chain,
    clip_by_global_norm,
    clip_by_value,
    clip_grad_norm,
    clip_grad_value,
)
from diffprog.optim._declare import Lease, hyper, non_negative, settings_table, state
from diffprog.optim._gd import GD
from diffprog.optim._gdm import GDM
from diffprog.optim._grad import (
    NonFiniteError,
    NothingToTrainError,
    OnNonFinite,
    apply_updates,
    flatten_like,
    value_and_grad,
)
from diffprog.optim._lion import Lion
from diffprog.optim._loop import apply_gradients, fold_loop, run_step
from diffprog.optim._optimizer import (
    Gradients,
    LearningRate,
    Optimizer,
    Schedule,
    learning_rate_at,
    step,
)
from diffprog.optim._pure import PureOptimizer
from diffprog.optim._rmsprop import RMSprop
from diffprog.optim._schedule import (
    constant_schedule,
    cosine_decay_schedule,
    join_schedules,
    linear_schedule,
    linear_warmup_schedule,
    step_decay_schedule,
    warmup_cosine_decay_schedule,
)
from diffprog.optim._select import ParamGroup, ParamSettings, Selection, Selector, select
from diffprog.optim._torch import TorchOptimizer

__all__ = [
    # --- pure optimizers, schedules, per-parameter settings, clipping ---
    "GD",
    "GDM",
    "Adam",
    "AdamW",
    "Adagrad",
    "RMSprop",
    "Lion",
    "mk_adam",
    "PureOptimizer",
    "Lease",
    "hyper",
    "state",
    "non_negative",
    "settings_table",
    "ClipGradNorm",
    "clip_grad_norm",
    "clip_grad_value",
    "Chain",
    "chain",
    "GradientTransform",
    "ClipByGlobalNorm",
    "ClipByValue",
    "clip_by_global_norm",
    "clip_by_value",
    "Schedule",
    "learning_rate_at",
    "constant_schedule",
    "cosine_decay_schedule",
    "join_schedules",
    "linear_schedule",
    "linear_warmup_schedule",
    "step_decay_schedule",
    "warmup_cosine_decay_schedule",
    "ParamGroup",
    "ParamSettings",
    "Selection",
    "Selector",
    "select",
    # --- the loop and the protocol ---
    "Gradients",
    "LearningRate",
    "Optimizer",
    "apply_gradients",
    "fold_loop",
    "run_step",
    "step",
    # --- the in-place fast path and the pieces of a step ---
    "TorchOptimizer",
    "NonFiniteError",
    "NothingToTrainError",
    "OnNonFinite",
    "apply_updates",
    "flatten_like",
    "value_and_grad",
]
