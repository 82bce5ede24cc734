"""Transformations of models: compiled training steps and torch.nn.Module views."""

from diffprog.func._compile import CompiledStep, compile_step
from diffprog.func._module import ModelModule, as_module

__all__ = ["CompiledStep", "ModelModule", "as_module", "compile_step"]
