"""Optimizers as values (Hasktorch's ``Torch.Optim``) and the training loop around them."""

from diffprog.optim._gd import GD
from diffprog.optim._loop import fold_loop, run_step
from diffprog.optim._optimizer import Gradients, LearningRate, Optimizer, step

__all__ = ["GD", "Gradients", "LearningRate", "Optimizer", "fold_loop", "run_step", "step"]
