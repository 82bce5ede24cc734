"""Layers as values: each a ``Parameterized`` record with a spec that ``sample`` turns into it.

Each layer family lives in its own module; the imports and ``__all__`` have one block each.
"""

from diffprog.nn._dropout import Dropout, DropoutSpec
from diffprog.nn._linear import Linear, LinearSpec
from diffprog.nn._state import current, is_training, record, training, training_generator

__all__ = [
    # --- training mode and stateful layers ---
    "current",
    "is_training",
    "record",
    "training",
    "training_generator",
    # --- dense ---
    "Linear",
    "LinearSpec",
    # --- dropout ---
    "Dropout",
    "DropoutSpec",
]
