"""Function transformations over models: ensembles, per-example gradients, compiled steps.

Models are torch pytrees (see ``docs/transformations.md``), so ``torch.func`` takes them as
they are; this package adds what is specific to models: stacking an ensemble into one model
(``stack``, ``unstack``, ``sample_stack``), per-example gradients in one call, a whole training
step compiled with ``torch.compile`` (``compile_step``), and a ``torch.nn.Module`` view of a
model for tools that insist on modules (``as_module``).
"""

from diffprog.func._compile import CompiledStep, compile_step
from diffprog.func._ensemble import sample_stack, stack, unstack
from diffprog.func._module import ModelModule, as_module
from diffprog.func._per_example import per_example_grads

__all__ = [
    # ensembles: K models as one
    "stack",
    "unstack",
    "sample_stack",
    # per-example gradients
    "per_example_grads",
    # compiled training steps
    "compile_step",
    "CompiledStep",
    # torch.nn.Module views
    "as_module",
    "ModelModule",
]
