"""Function transformations over models: ensembles and per-example gradients.

Models are torch pytrees (see ``docs/transformations.md``), so ``torch.func`` takes them as
they are; this package adds what is specific to models: stacking an ensemble into one model
(``stack``, ``unstack``, ``sample_stack``) and per-example gradients in one call.
"""

from diffprog.func._ensemble import sample_stack, stack, unstack
from diffprog.func._per_example import per_example_grads

__all__ = [
    # ensembles: K models as one
    "stack",
    "unstack",
    "sample_stack",
    # per-example gradients
    "per_example_grads",
]
