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
    # inspecting: comparing models, summaries
    "Comparison",
    "Summary",
    "SummaryRow",
    "allclose",
    "summary",
    "tree_equal",
    # surgery, filters, freezing (issue 11)
    "At",
    "Filter",
    "Frozen",
    "Selector",
    "SurgeryError",
    "at",
    "combine",
    "count_parameters",
    "freeze",
    "partition",
    "select",
    "unfreeze",
    # the rest
    "CycleError",
    "DeviceLike",
    "DiffprogError",
    "DiffprogWarning",
    "HiddenParameterError",
    "IndependentTensor",
    "InstanceError",
    "ModelError",
    "NameClashError",
    "ParamStream",
    "Parameter",
    "ParameterCountError",
    "ParameterShapeError",
    "ParameterTypeError",
    "Parameterized",
    "Randomizable",
    "UnsampledSpecError",
    # --- traversals: map, convert and move, read and replace by type (issue 11) ---
    "collect",
    "map_parameters",
    "map_tensors",
    "named_tensors",
    "replace_values",
    "tensors",
    "to",
    # ---
    "field",
    "flatten_parameters",
    "grad",
    "init_parameter",
    "make_independent",
    "named_parameters",
    "register_parameterized",
    "replace_parameters",
    "sample",
    "to_dependent",
    "tree_repr",
    "walk",
    # --- optimizer state and checkpoints (diffprog.serialize, hf) ---
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
    # saving and loading (diffprog.serialize)
    "LoadError",
    "LoadResult",
    "SaveError",
    "load_params",
    "load_state_dict",
    "load_tensors",
    "save_params",
    "save_tensors",
    "state_dict",
]
