"""diffprog: differentiable functional programming on PyTorch.

A model is an ordinary immutable value (a ``Parameterized`` dataclass, or containers of them);
``flatten_parameters`` unrolls it into its trainable leaves and ``replace_parameters`` rebuilds
it from new ones. Everything else (optimizers, layers, training loops) is built on that pair.
"""

from diffprog._autograd import IndependentTensor, Parameter, grad, make_independent, to_dependent
from diffprog._compare import Comparison, allclose, tree_equal
from diffprog._errors import (
    CycleError,
    DiffprogError,
    DiffprogWarning,
    HiddenParameterError,
    InstanceError,
    ModelError,
    NameClashError,
    ParameterCountError,
    ParameterShapeError,
    ParameterTypeError,
    UnsampledSpecError,
)
from diffprog._filter import Filter, Selector, select
from diffprog._freeze import combine, count_parameters, freeze, partition, unfreeze
from diffprog._frozen import Frozen
from diffprog._map import (
    collect,
    map_parameters,
    map_tensors,
    named_tensors,
    replace_values,
    tensors,
    to,
)
from diffprog._nodes import register_parameterized
from diffprog._parameterized import Parameterized, field
from diffprog._pytree import register_pytree
from diffprog._random import DeviceLike, Randomizable, init_parameter, sample
from diffprog._repr import tree_repr
from diffprog._stream import ParamStream
from diffprog._summary import Summary, SummaryRow, summary
from diffprog._surgery import At, SurgeryError, at
from diffprog._traverse import flatten_parameters, named_parameters, replace_parameters, walk
from diffprog.serialize import (
    Checkpoint,
    LoadError,
    LoadResult,
    OptimizerState,
    OptimizerStateError,
    SaveError,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    load_optimizer_state_dict,
    load_params,
    load_state_dict,
    load_tensors,
    optimizer_state,
    optimizer_state_dict,
    save_checkpoint,
    save_params,
    save_tensors,
    state_dict,
)

__version__ = "0.1.0"

__all__ = [
    # models as values: the core
    "Parameterized",
    "field",
    "flatten_parameters",
    "replace_parameters",
    "named_parameters",
    "register_parameterized",
    "register_pytree",
    "ParamStream",
    "walk",
    "tree_repr",
    # autograd
    "Parameter",
    "IndependentTensor",
    "make_independent",
    "to_dependent",
    "grad",
    # specs and sampling
    "Randomizable",
    "sample",
    "init_parameter",
    "DeviceLike",
    # traversals: map, convert and move, read and replace by type
    "to",
    "map_parameters",
    "map_tensors",
    "tensors",
    "named_tensors",
    "collect",
    "replace_values",
    # surgery, filters, freezing
    "at",
    "At",
    "SurgeryError",
    "select",
    "Selector",
    "Filter",
    "partition",
    "combine",
    "freeze",
    "unfreeze",
    "Frozen",
    "count_parameters",
    # inspecting
    "summary",
    "Summary",
    "SummaryRow",
    "tree_equal",
    "allclose",
    "Comparison",
    # saving and loading (diffprog.serialize)
    "state_dict",
    "load_state_dict",
    "save_params",
    "load_params",
    "save_tensors",
    "load_tensors",
    "LoadResult",
    "LoadError",
    "SaveError",
    # optimizer state and checkpoints (diffprog.serialize)
    "optimizer_state",
    "load_optimizer_state",
    "OptimizerState",
    "OptimizerStateError",
    "optimizer_state_dict",
    "load_optimizer_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "Checkpoint",
    # errors
    "DiffprogError",
    "DiffprogWarning",
    "ModelError",
    "CycleError",
    "HiddenParameterError",
    "InstanceError",
    "NameClashError",
    "ParameterCountError",
    "ParameterShapeError",
    "ParameterTypeError",
    "UnsampledSpecError",
]
