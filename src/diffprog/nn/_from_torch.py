"""``from_torch``: the diffprog value equivalent to a ``torch.nn`` module, weights included.

A registry maps each supported ``torch.nn`` type to a converter, a small function that builds
the diffprog value from the module. Most converters are one line: diffprog's layers carry
torch.nn's attribute names as their fields (``weight``, ``running_mean``, ``self_attn``...), so
the layer is built from the module's attributes of the same names (:meth:`TorchConversion.fields`).
The registry is keyed by exact type: a subclass of ``torch.nn.Linear`` may override ``forward``,
and converting it as a plain Linear would silently change what it computes.

Tensors are copied (the diffprog value does not share memory with the module, which torch may
change in place): a parameter becomes a :data:`diffprog.Parameter` (a frozen one,
``requires_grad=False``, a constant ``Frozen`` tensor), a buffer a plain tensor. A tensor or a
submodule reachable at several places (tied weights, a shared layer) is converted once and sits
at each place, so ties stay ties.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar, cast

import torch

from diffprog import DiffprogError, Parameterized, make_independent, walk
from diffprog._frozen import Frozen
from diffprog.nn._attention import MultiheadAttention
from diffprog.nn._compose import Sequential
from diffprog.nn._conv import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
)
from diffprog.nn._dropout import (
    AlphaDropout,
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    FeatureAlphaDropout,
)
from diffprog.nn._embedding import Embedding
from diffprog.nn._linear import Identity, Linear
from diffprog.nn._norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
)
from diffprog.nn._rnn import GRU, LSTM, RNN
from diffprog.nn._rnn_cell import GRUCell, LSTMCell, RNNCell
from diffprog.nn._transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from diffprog.nn._upsample import UpSample

__all__ = ["FromTorchError", "TorchConversion", "from_torch", "register_from_torch"]

M = TypeVar("M", bound=torch.nn.Module)
Converter = Callable[[Any, "TorchConversion"], Any]

tnn = torch.nn


class FromTorchError(DiffprogError, TypeError):
    """A ``torch.nn`` module, or one of its options, has no diffprog equivalent.

    Attributes:
        path: where the module sits in the converted module, ``state_dict`` style
            (``encoder.layers.0``; ``""`` for the module itself).
        module_type: the type of the module that could not be converted.
        option: the option diffprog has no equivalent for, or ``None`` when the type itself
            is unsupported.
    """

    def __init__(
        self, message: str, path: str, module_type: type, option: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.module_type = module_type
        self.option = option


def _where(path: str, module: torch.nn.Module) -> str:
    name = type(module).__qualname__
    return f"the submodule {path!r} ({name})" if path else f"the module itself ({name})"


_HOW_TO = (
    "For a module class of your own, write the diffprog model with the same field names and "
    "load the module's state_dict into it (diffprog.load_state_dict(model, "
    "module.state_dict())), or teach from_torch the class with "
    "diffprog.nn.register_from_torch(YourModule, converter)."
)


# Wrappers whose state_dict keys carry a prefix: the wrapped module is what to convert.
_WRAPPERS = {
    "OptimizedModule": "_orig_mod",  # torch.compile
    "DataParallel": "module",
    "DistributedDataParallel": "module",
}


def _unsupported(path: str, module: torch.nn.Module) -> FromTorchError:
    name = type(module).__qualname__
    hint = ""
    wrapped = _WRAPPERS.get(name)
    if wrapped is not None:
        hint = f" It wraps another module: convert that one, module.{wrapped}."
    elif isinstance(module, tnn.modules.lazy.LazyModuleMixin):
        hint = " A lazy module becomes its plain type after its first forward pass: run one."
    elif any(isinstance(module, t) for t in _CONVERTERS):
        hint = (
            " It subclasses a supported torch.nn type, but a subclass may compute something "
            "else (its own forward, a parametrization), so only exact types are converted."
        )
    return FromTorchError(
        f"from_torch cannot convert {_where(path, module)}: diffprog has no converter for "
        f"{type(module).__module__}.{name}.{hint} {_HOW_TO}",
        path,
        type(module),
    )


class TorchConversion:
    """What a converter is given besides the module: its converted parts, and a way to refuse.

    One is made for each module converted. The tensors and submodules it hands out are
    converted once per conversion, so a weight or a layer reachable at two places (a tie)
    comes back as the same object at both.

    Attributes:
        module: the ``torch.nn`` module being converted.
        path: its place in the root module, ``state_dict`` style (``""`` for the root).
    """

    def __init__(self, module: torch.nn.Module, path: str, memo: dict[int, Any]) -> None:
        self.module = module
        self.path = path
        self._memo = memo

    def get(self, name: str) -> Any:
        """The module's attribute ``name``, converted.

        A parameter comes back as a fresh :data:`diffprog.Parameter` holding a copy (a
        ``requires_grad=False`` one as a frozen constant), a buffer as a plain copy, a
        submodule as its diffprog value (through the registry), anything else as it is.

        Args:
            name: the attribute (a parameter, buffer or submodule name, or a setting).

        Returns:
            The converted value.

        Raises:
            FromTorchError: a submodule cannot be converted, or the module has no attribute
                ``name``.
        """
        m = self.module
        if name in m._parameters or name in m._buffers:
            value = m._parameters[name] if name in m._parameters else m._buffers[name]
            return None if value is None else _tensor(value, self._memo)
        if name in m._modules:
            child = m._modules[name]
            path = f"{self.path}.{name}" if self.path else name
            return None if child is None else _convert(child, path, self._memo)
        if not hasattr(m, name):
            raise FromTorchError(
                f"from_torch cannot convert {_where(self.path, m)}: its converter asks for "
                f"the attribute {name!r}, which the module does not have (a converter class's "
                "fields must be named as the module's attributes).",
                self.path,
                type(m),
            )
        return getattr(m, name)

    def fields(self, cls: type, **given: Any) -> dict[str, Any]:
        """The constructor arguments of the dataclass ``cls``: each field from the module's
        attribute of the same name (:meth:`get`), except those ``given``.

        Example: ``Linear(**conversion.fields(Linear))`` for a ``torch.nn.Linear``.
        """
        out = dict(given)
        for f in dataclasses.fields(cls):
            if f.init and f.name not in out:
                out[f.name] = self.get(f.name)
        return out

    def refuse(self, option: str, why: str) -> NoReturn:
        """Raise :class:`FromTorchError` for an option of this module diffprog cannot carry.

        Args:
            option: the option, as the user would name it (``"track_running_stats"``).
            why: what about it has no diffprog equivalent.
        """
        raise FromTorchError(
            f"from_torch cannot convert {_where(self.path, self.module)}: its option "
            f"{option} ({why}) has no diffprog equivalent. Change it on the module before "
            f"converting, or write the diffprog model by hand and load the state_dict.",
            self.path,
            type(self.module),
            option,
        )


_CONVERTERS: dict[type[torch.nn.Module], Converter] = {}


def register_from_torch(
    torch_type: type[M], converter: Callable[[M, TorchConversion], Any] | type[Parameterized]
) -> None:
    """Teach :func:`from_torch` to convert modules of exactly the type ``torch_type``.

    Args:
        torch_type: the ``torch.nn.Module`` subclass (subclasses of it are not matched).
        converter: a function ``(module, conversion) -> diffprog value``, which builds the value
            from ``conversion.get(name)`` (the module's converted parameters, buffers,
            submodules and settings) and calls ``conversion.refuse(option, why)`` for a
            setting it cannot carry; or a ``Parameterized`` class whose fields are named as the
            module's attributes, built from them. Replaces any earlier converter of the type.

    Example:
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.proj = torch.nn.Linear(2, 2)
        >>> class DpBlock(dp.Parameterized):
        ...     proj: Linear
        >>> register_from_torch(Block, DpBlock)
        >>> from_torch(Block())
        DpBlock(proj=Linear(weight=f32[2,2], bias=f32[2]))
    """
    if not (isinstance(torch_type, type) and issubclass(torch_type, torch.nn.Module)):
        raise TypeError(
            f"register_from_torch expects a torch.nn.Module subclass, got {torch_type!r}."
        )
    if isinstance(converter, type):
        if not issubclass(converter, Parameterized):
            raise TypeError(
                f"register_from_torch expects a converter function or a Parameterized class, "
                f"got the class {converter.__qualname__}."
            )
        _CONVERTERS[torch_type] = _by_fields(converter)
    else:
        _CONVERTERS[torch_type] = cast("Converter", converter)


def from_torch(module: torch.nn.Module) -> Any:
    """The diffprog value equivalent to ``module``, with copies of its weights and buffers.

    Supported: every layer ``diffprog.nn`` has (``Linear``, ``Conv2d``, ``BatchNorm2d``,
    ``LSTM``, ``MultiheadAttention``, ``TransformerEncoderLayer``, ...), parameter-free
    functions (``ReLU``, ``GELU``, ``Flatten``, ``MaxPool2d``, ... kept as they are), and
    ``Sequential`` (a :class:`diffprog.nn.Sequential`), ``ModuleList`` (a list) and
    ``ModuleDict`` (a dict) of them, nested in any way. The result's ``state_dict`` keys
    and order equal ``module.state_dict()``'s, and it computes what ``module`` computes.

    The mode is not carried: a torch module holds a train/eval flag, a diffprog value does not
    (a module whose dropout and norm layers are not all in one mode is refused). Choose it
    when calling, as for any diffprog model: inside ``diffprog.nn.training(...)``
    (torch's ``train()``: dropout on, batch statistics, running statistics updated) or
    ``with diffprog.nn.evaluating():`` (``eval()``).

    Args:
        module: the torch module.

    Returns:
        The diffprog value; parameters are fresh trainable leaves (copies), a parameter with
        ``requires_grad=False`` a frozen constant, buffers plain tensors, all on the module's
        devices and dtypes. Tied weights and shared submodules stay shared.

    Raises:
        FromTorchError: a submodule has no converter (the message names the first such one,
            in ``module.named_modules()`` order, by path and type), or a module has an option
            diffprog cannot carry (hooks, a setting with no diffprog equivalent, parts in
            different train/eval modes): the message names the module and the option.

    Example:
        >>> tnn = torch.nn
        >>> module = tnn.Sequential(tnn.Linear(3, 4), tnn.ReLU(), tnn.Linear(4, 2))
        >>> model = from_torch(module)
        >>> [name for name, _ in dp.named_parameters(model)] == list(module.state_dict())
        True
        >>> x = torch.randn(5, 3)
        >>> torch.equal(model(x), module(x))
        True
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch expects a torch.nn.Module, got {type(module).__name__}.")
    # Look for an unsupported module first, so that the error names the first one in
    # named_modules() order whatever order the converters visit their parts in.
    for path, sub in module.named_modules():
        if type(sub) not in _CONVERTERS:
            raise _unsupported(path, sub)
    _check_one_mode(module)
    return _convert(module, "", {})


def _mode_matters(module: torch.nn.Module) -> bool:
    """Whether ``module`` computes differently in train and eval mode."""
    if isinstance(module, tnn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, tnn.modules.batchnorm._NormBase):
        return module.running_mean is not None
    if isinstance(module, tnn.RNNBase):
        return bool(module.dropout > 0 and module.num_layers > 1)
    if isinstance(module, tnn.MultiheadAttention):
        return bool(module.dropout > 0)
    return False


def _check_one_mode(module: torch.nn.Module) -> None:
    """Refuse a module whose mode-dependent parts are not all in the same mode.

    A diffprog model has no mode of its own: the call chooses it for every layer at once
    (``nn.training`` / ``nn.evaluating``). A torch model with, say, a BatchNorm left in eval
    mode inside a model in train mode would be converted into one whose BatchNorm trains.
    """
    first: tuple[str, torch.nn.Module] | None = None
    for path, sub in module.named_modules():
        if not _mode_matters(sub):
            continue
        if first is None:
            first = (path, sub)
        elif sub.training != first[1].training:
            mode = "train" if sub.training else "eval"
            other = "train" if first[1].training else "eval"
            TorchConversion(sub, path, {}).refuse(
                "training",
                f"{mode} mode, while {_where(first[0], first[1])} is in {other} mode; a "
                "diffprog model takes its mode from the call (diffprog.nn.training or "
                "diffprog.nn.evaluating), for all its layers at once: put the module in one "
                "mode (module.train() or module.eval()), and for a layer that must keep "
                "evaluating inside a training pass, pass training=False to it in your own model",
            )


_HOOKS = {
    "_forward_hooks": "forward hooks",
    "_forward_pre_hooks": "forward pre-hooks",
    "_backward_hooks": "backward hooks",
    "_backward_pre_hooks": "backward pre-hooks",
}


def _convert(module: torch.nn.Module, path: str, memo: dict[int, Any]) -> Any:
    """Convert one module (memoised: a shared submodule becomes one shared value)."""
    if id(module) in memo:
        return memo[id(module)]
    conversion = TorchConversion(module, path, memo)
    converter = _CONVERTERS.get(type(module))
    if converter is None:
        raise _unsupported(path, module)
    for attribute, what in _HOOKS.items():
        if getattr(module, attribute, None):
            conversion.refuse(what, "they run code around forward that a value cannot hold")
    try:
        value = converter(module, conversion)
    except FromTorchError:
        raise
    except (TypeError, ValueError) as e:
        raise FromTorchError(
            f"from_torch cannot convert {_where(path, module)}: the diffprog layer refused its "
            f"configuration: {e}",
            path,
            type(module),
        ) from e
    _check_state(value, module, path)
    memo[id(module)] = value
    return value


def _tensor(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    """A parameter or buffer, copied (memoised: a tied tensor stays one tensor)."""
    if id(t) in memo:
        return cast("torch.Tensor", memo[id(t)])
    data = t.detach().clone()
    new: torch.Tensor
    if isinstance(t, tnn.Parameter):
        new = make_independent(data) if t.requires_grad else Frozen(data)
    else:
        new = data
    memo[id(t)] = new
    # Keep t alive while its id is a key (it is: the module holds it during the conversion).
    return new


def _check_state(value: Any, module: torch.nn.Module, path: str) -> None:
    """Refuse a conversion whose tensors are not the module's state_dict, key for key.

    A converter reads the attributes it knows; state the module has beyond them (a parameter
    or submodule added to a standard layer) would otherwise be dropped without a word.
    """
    ours = [
        (path, tuple(leaf.shape)) for path, leaf in walk(value) if isinstance(leaf, torch.Tensor)
    ]
    theirs = [(k, tuple(v.shape)) for k, v in module.state_dict(keep_vars=True).items()]
    if ours != theirs:
        missing = [k for k, _ in theirs if k not in dict(ours)]
        extra = [k for k, _ in ours if k not in dict(theirs)]
        raise FromTorchError(
            f"from_torch cannot convert {_where(path, module)}: the converted value's tensors "
            f"differ from the module's state_dict (not carried: {missing}; not in the module: "
            f"{extra}; or a shape or the order differs). The module holds state its diffprog "
            f"layer does not have (a parameter or submodule added to it?).",
            path,
            type(module),
        )


# --------------------------------------------------------------------------------------------
# The converters
# --------------------------------------------------------------------------------------------


def _by_fields(cls: type) -> Converter:
    """A converter building ``cls`` from the module's attributes named as its fields."""

    def convert(module: torch.nn.Module, conversion: TorchConversion) -> Any:
        return cls(**conversion.fields(cls))

    convert.__qualname__ = f"convert_to_{cls.__name__}"
    return convert


def _norm(cls: type) -> Converter:
    """BatchNorm/InstanceNorm: the layer tells ``track_running_stats`` by whether it has the
    running statistics, so a module whose flag was changed after construction is refused."""

    def convert(module: Any, conversion: TorchConversion) -> Any:
        if module.track_running_stats != (module.running_mean is not None):
            conversion.refuse(
                "track_running_stats",
                f"set to {module.track_running_stats} while the running statistics are "
                f"{'present' if module.running_mean is not None else 'absent'}",
            )
        return cls(**conversion.fields(cls))

    return convert


def _rnn(cls: type) -> Converter:
    """RNN/LSTM/GRU: the weights, in torch's order, are one inlined dict."""

    def convert(module: Any, conversion: TorchConversion) -> Any:
        weights = {name: conversion.get(name) for name in module._flat_weights_names}
        return cls(**conversion.fields(cls, weights=weights))

    return convert


def _stack(cls: type) -> Converter:
    """TransformerEncoder/Decoder: the ModuleList of layers is a tuple field."""

    def convert(module: Any, conversion: TorchConversion) -> Any:
        return cls(**conversion.fields(cls, layers=tuple(conversion.get("layers"))))

    return convert


def _sequential(module: tnn.Sequential, conversion: TorchConversion) -> Sequential:
    names = list(module._modules)
    if names != [str(i) for i in range(len(names))]:
        conversion.refuse(
            "child names",
            f"named {names}, while diffprog's Sequential numbers its layers 0, 1, ...; "
            "use a ModuleDict, or load the state_dict with a key_map",
        )
    return Sequential(*(conversion.get(name) for name in names))


def _module_list(module: tnn.ModuleList, conversion: TorchConversion) -> list[Any]:
    return [conversion.get(name) for name in module._modules]


def _module_dict(module: tnn.ModuleDict, conversion: TorchConversion) -> dict[str, Any]:
    return {name: conversion.get(name) for name in module._modules}


def _keep(module: torch.nn.Module, conversion: TorchConversion) -> torch.nn.Module:
    """A parameter-free function (ReLU, Flatten, MaxPool2d): a copy, called as it is."""
    return copy.deepcopy(module)


def _register_builtins() -> None:
    by_fields: dict[type[torch.nn.Module], type] = {
        tnn.Identity: Identity,
        tnn.Linear: Linear,
        # MultiheadAttention's out_proj: a Linear under another name (for quantization)
        tnn.modules.linear.NonDynamicallyQuantizableLinear: Linear,
        tnn.Embedding: Embedding,
        tnn.Conv1d: Conv1d,
        tnn.Conv2d: Conv2d,
        tnn.Conv3d: Conv3d,
        tnn.ConvTranspose1d: ConvTranspose1d,
        tnn.ConvTranspose2d: ConvTranspose2d,
        tnn.ConvTranspose3d: ConvTranspose3d,
        tnn.LayerNorm: LayerNorm,
        tnn.GroupNorm: GroupNorm,
        tnn.RMSNorm: RMSNorm,
        tnn.Dropout: Dropout,
        tnn.Dropout1d: Dropout1d,
        tnn.Dropout2d: Dropout2d,
        tnn.Dropout3d: Dropout3d,
        tnn.AlphaDropout: AlphaDropout,
        tnn.FeatureAlphaDropout: FeatureAlphaDropout,
        tnn.Upsample: UpSample,
        tnn.UpsamplingNearest2d: UpSample,
        tnn.UpsamplingBilinear2d: UpSample,
        tnn.RNNCell: RNNCell,
        tnn.LSTMCell: LSTMCell,
        tnn.GRUCell: GRUCell,
        tnn.MultiheadAttention: MultiheadAttention,
        tnn.TransformerEncoderLayer: TransformerEncoderLayer,
        tnn.TransformerDecoderLayer: TransformerDecoderLayer,
        tnn.Transformer: Transformer,
    }
    for torch_type, cls in by_fields.items():
        _CONVERTERS[torch_type] = _by_fields(cls)
    for torch_type, cls in {
        tnn.BatchNorm1d: BatchNorm1d,
        tnn.BatchNorm2d: BatchNorm2d,
        tnn.BatchNorm3d: BatchNorm3d,
        tnn.InstanceNorm1d: InstanceNorm1d,
        tnn.InstanceNorm2d: InstanceNorm2d,
        tnn.InstanceNorm3d: InstanceNorm3d,
    }.items():
        _CONVERTERS[torch_type] = _norm(cls)
    for torch_type, cls in {tnn.RNN: RNN, tnn.LSTM: LSTM, tnn.GRU: GRU}.items():
        _CONVERTERS[torch_type] = _rnn(cls)
    _CONVERTERS[tnn.TransformerEncoder] = _stack(TransformerEncoder)
    _CONVERTERS[tnn.TransformerDecoder] = _stack(TransformerDecoder)
    _CONVERTERS[tnn.Sequential] = cast("Converter", _sequential)
    _CONVERTERS[tnn.ModuleList] = cast("Converter", _module_list)
    _CONVERTERS[tnn.ModuleDict] = cast("Converter", _module_dict)
    for torch_type in PARAMETER_FREE:
        _CONVERTERS[torch_type] = _keep


# torch.nn modules without parameters, buffers or randomness, whose forward is a function of
# the input and their settings alone, the same in train and eval mode: a diffprog model holds
# them as they are (RReLU, random in training mode, is not among them).
PARAMETER_FREE: tuple[type[torch.nn.Module], ...] = (
    tnn.ReLU,
    tnn.ReLU6,
    tnn.LeakyReLU,
    tnn.ELU,
    tnn.SELU,
    tnn.CELU,
    tnn.GELU,
    tnn.SiLU,
    tnn.Mish,
    tnn.Sigmoid,
    tnn.Tanh,
    tnn.Hardtanh,
    tnn.Hardsigmoid,
    tnn.Hardswish,
    tnn.Hardshrink,
    tnn.Softshrink,
    tnn.Tanhshrink,
    tnn.Softplus,
    tnn.Softsign,
    tnn.LogSigmoid,
    tnn.Threshold,
    tnn.GLU,
    tnn.Softmax,
    tnn.Softmin,
    tnn.LogSoftmax,
    tnn.Softmax2d,
    tnn.Flatten,
    tnn.Unflatten,
    tnn.PixelShuffle,
    tnn.PixelUnshuffle,
    tnn.ChannelShuffle,
    tnn.MaxPool1d,
    tnn.MaxPool2d,
    tnn.MaxPool3d,
    tnn.AvgPool1d,
    tnn.AvgPool2d,
    tnn.AvgPool3d,
    tnn.AdaptiveAvgPool1d,
    tnn.AdaptiveAvgPool2d,
    tnn.AdaptiveAvgPool3d,
    tnn.AdaptiveMaxPool1d,
    tnn.AdaptiveMaxPool2d,
    tnn.AdaptiveMaxPool3d,
    tnn.LPPool1d,
    tnn.LPPool2d,
    tnn.ZeroPad1d,
    tnn.ZeroPad2d,
    tnn.ZeroPad3d,
    tnn.ConstantPad1d,
    tnn.ConstantPad2d,
    tnn.ConstantPad3d,
    tnn.ReflectionPad1d,
    tnn.ReflectionPad2d,
    tnn.ReflectionPad3d,
    tnn.ReplicationPad1d,
    tnn.ReplicationPad2d,
    tnn.ReplicationPad3d,
    tnn.CircularPad1d,
    tnn.CircularPad2d,
    tnn.CircularPad3d,
)

_register_builtins()
# The types diffprog itself converts (the registry may grow by register_from_torch).
BUILTIN_TYPES: frozenset[type[torch.nn.Module]] = frozenset(_CONVERTERS)
