"""Composition: ``Sequential``, ``MLPSpec`` and the wiring of Hasktorch's arrows chapter.

Hasktorch's arrows chapter builds networks from ``>>>`` (chain), ``&&&`` (fan out),
``***`` (parallel) and the residual ``(id &&& f) >>> arr (uncurry (+))``. Here these are small
``Parameterized`` records: :class:`Sequential`, :class:`FanOut`, :class:`Parallel` and
:class:`Residual`. They only wire; the parameters stay in the layers they hold, so
``flatten_parameters``, ``replace_parameters``, ``named_parameters`` (with torch.nn's
``state_dict`` keys), weight ties and training-mode state updates all work through them with no
code of their own. Each has a spec that samples its parts, in order, from one generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import torch

from diffprog import DeviceLike, Parameterized, field, sample
from diffprog.nn._dropout import Dropout
from diffprog.nn._linear import LinearSpec

__all__ = [
    "FanOut",
    "FanOutSpec",
    "MLPSpec",
    "Parallel",
    "ParallelSpec",
    "Residual",
    "ResidualSpec",
    "Sequential",
    "SequentialSpec",
]

Activation = Callable[[torch.Tensor], torch.Tensor]


def _is_spec(part: object) -> bool:
    """Whether ``part`` is a spec (something with a ``sample`` method), not a built part."""
    return not isinstance(part, Parameterized) and callable(getattr(part, "sample", None))


def _check_callables(owner: str, parts: Sequence[object], spec: str) -> None:
    for index, part in enumerate(parts):
        if _is_spec(part):
            raise TypeError(
                f"{owner} holds built layers, but part {index} is a spec "
                f"({type(part).__name__}). Sample it first, or build the whole {owner} from "
                f"its spec: sample({spec}(...))."
            )
        if not callable(part):
            raise TypeError(
                f"{owner} holds callables (layers or functions), but part {index} is of type "
                f"{type(part).__name__}, which cannot be called."
            )


def _check_parts(owner: str, parts: Sequence[object]) -> None:
    for index, part in enumerate(parts):
        if not (_is_spec(part) or callable(part)):
            raise TypeError(
                f"{owner} holds specs, layers or functions, but part {index} is of type "
                f"{type(part).__name__}, which is none of these."
            )


def _build(
    part: Any,
    generator: torch.Generator | None,
    device: DeviceLike,
    dtype: torch.dtype | None,
) -> Any:
    """Sample ``part`` if it is a spec; a built layer or a function is kept as it is."""
    if _is_spec(part):
        return sample(part, generator=generator, device=device, dtype=dtype)
    return part


class Sequential(Parameterized, init=False):
    """Apply callables in order: layers, plain functions (``torch.relu``), other combinators.

    As ``torch.nn.Sequential`` (Hasktorch's ``>>>``): each part's output is the next part's
    input, and whatever the last part returns is returned (a tuple stays a tuple). The parts are
    one inlined field, so ``named_parameters`` gives torch's ``state_dict`` keys: ``0.weight``,
    ``2.bias``... A layer that appears twice is one tied layer, stored once. Indexing gives a
    part, slicing a new ``Sequential`` sharing the parts.

    Args:
        *layers: the callables, in order.

    Raises:
        TypeError: a part is a spec (sample it, or use :class:`SequentialSpec`) or cannot be
            called.

    Example:
        >>> from diffprog.nn import LinearSpec, Sequential
        >>> g = torch.Generator().manual_seed(0)
        >>> net = Sequential(sample(LinearSpec(2, 4), generator=g), torch.tanh,
        ...                  sample(LinearSpec(4, 1), generator=g))
        >>> [name for name, _ in named_parameters(net)]
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> net(torch.ones(3, 2)).shape, len(net)
        (torch.Size([3, 1]), 3)
    """

    layers: tuple[Any, ...] = field(inline=True)

    def __init__(self, *layers: Callable[..., Any]) -> None:
        _check_callables("Sequential", layers, "SequentialSpec")
        object.__setattr__(self, "layers", tuple(layers))

    def __call__(self, input: Any) -> Any:
        """Feed ``input`` through every part in turn and return the last part's output."""
        for layer in self.layers:
            input = layer(input)
        return input

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> Sequential: ...

    def __getitem__(self, index: int | slice) -> Any:
        """The part at ``index``, or a ``Sequential`` of the parts in a slice."""
        if isinstance(index, slice):
            return Sequential(*self.layers[index])
        return self.layers[index]

    def __len__(self) -> int:
        """The number of parts."""
        return len(self.layers)

    def __iter__(self) -> Iterator[Any]:
        """The parts, in order."""
        return iter(self.layers)


@dataclasses.dataclass(frozen=True, init=False)
class SequentialSpec:
    """The spec of :class:`Sequential`: specs, and functions or built layers kept as they are.

    ``sample`` samples the specs in order from one generator, so with the same seed the weights
    equal those of the ``torch.nn.Sequential`` of the same layers after ``torch.manual_seed``.

    Args:
        *parts: specs (``LinearSpec(2, 4)``), functions (``torch.relu``) or built layers.

    Raises:
        TypeError: a part is neither a spec nor callable.

    Example:
        >>> from diffprog.nn import LinearSpec, SequentialSpec
        >>> spec = SequentialSpec(LinearSpec(2, 4), torch.relu, LinearSpec(4, 1))
        >>> sample(spec, generator=torch.Generator().manual_seed(0))
        Sequential(
          layers=(
            Linear(weight=f32[4,2], bias=f32[4]),
            <function relu>,
            Linear(weight=f32[1,4], bias=f32[1]),
          ),
        )
    """

    parts: tuple[Any, ...]

    def __init__(self, *parts: Any) -> None:
        _check_parts("SequentialSpec", parts)
        object.__setattr__(self, "parts", tuple(parts))

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Sequential:
        """Sample each spec in order; keep functions and built layers as they are."""
        return Sequential(*(_build(p, generator, device, dtype) for p in self.parts))


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """A multi-layer perceptron: Linear layers with an activation between them.

    Hasktorch's ``MLPSpec`` (``feature_counts``, ``nonlinearitySpec``). ``sample`` gives a
    :class:`Sequential` laid out as ``torch.nn.Sequential(Linear, activation, [Dropout],
    Linear, ..., Linear, [final_activation])``, so its ``named_parameters`` are that
    Sequential's ``state_dict`` keys (``0.weight``, ``2.weight``...) and, with the same seed, its
    weights are bit for bit those torch.nn gives.

    Args:
        sizes: the feature counts, input first: ``(2, 16, 1)`` is 2 -> 16 -> 1.
        activation: applied after every Linear but the last (a function such as ``torch.relu``
            or ``torch.tanh``, or any parameter-free callable).
        final_activation: applied after the last Linear, or ``None`` for none.
        bias: whether the Linear layers have biases.
        dropout: if above 0, a :class:`Dropout` with this ``p`` after each hidden activation.

    Raises:
        ValueError: fewer than two sizes, a size below 1, or ``dropout`` outside ``[0, 1]``.

    Example:
        >>> from diffprog.nn import MLPSpec
        >>> mlp = sample(MLPSpec((2, 8, 8, 1), activation=torch.tanh))
        >>> [name for name, _ in named_parameters(mlp)][::2]
        ['0.weight', '2.weight', '4.weight']
        >>> mlp(torch.zeros(5, 2)).shape
        torch.Size([5, 1])
    """

    sizes: Sequence[int]
    activation: Activation = torch.relu
    final_activation: Activation | None = None
    bias: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        sizes = tuple(self.sizes)
        if len(sizes) < 2:
            raise ValueError(
                f"MLPSpec needs at least two sizes (input and output features), got {sizes}."
            )
        if any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"MLPSpec sizes must be positive integers, got {sizes}.")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, got {self.dropout}")
        object.__setattr__(self, "sizes", sizes)

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Sequential:
        """Sample the Linear layers in order and wire them with the activations."""
        parts: list[Any] = []
        pairs = list(zip(self.sizes[:-1], self.sizes[1:], strict=True))
        for index, (n_in, n_out) in enumerate(pairs):
            spec = LinearSpec(n_in, n_out, bias=self.bias)
            parts.append(sample(spec, generator=generator, device=device, dtype=dtype))
            if index < len(pairs) - 1:
                parts.append(self.activation)
                if self.dropout > 0.0:
                    parts.append(Dropout(p=self.dropout))
            elif self.final_activation is not None:
                parts.append(self.final_activation)
        return Sequential(*parts)


class Residual(Parameterized):
    """A skip connection: ``block(x) + x``, or ``block(x) + shortcut(x)``.

    Hasktorch's ``residual f = (id &&& f) >>> arr (uncurry (+))``; with a ``shortcut`` (a
    projection when the shapes differ, like ResNet's ``downsample``) it is
    ``(shortcut &&& block) >>> arr (uncurry (+))``. The parameters are the block's
    (``block.0.weight``...) and the shortcut's (``shortcut.weight``...).

    Attributes:
        block: the main path (a layer, a Sequential, a function).
        shortcut: the skip path, or ``None`` for the identity.

    Example:
        >>> from diffprog.nn import LinearSpec, Residual
        >>> res = Residual(sample(LinearSpec(3, 3)))
        >>> x = torch.randn(2, 3)
        >>> torch.equal(res(x), res.block(x) + x)
        True
    """

    block: Callable[..., Any]
    shortcut: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        _check_callables("Residual", [self.block], "ResidualSpec")
        if self.shortcut is not None:
            _check_callables("Residual", [self.shortcut], "ResidualSpec")

    def __call__(self, input: Any) -> Any:
        """``block(input) + input`` (or ``+ shortcut(input)``)."""
        out = self.block(input)
        return out + (input if self.shortcut is None else self.shortcut(input))


@dataclasses.dataclass(frozen=True)
class ResidualSpec:
    """The spec of :class:`Residual`: the block's spec (and the shortcut's), sampled in order.

    Example:
        >>> from diffprog.nn import LinearSpec, ResidualSpec
        >>> res = sample(ResidualSpec(LinearSpec(4, 2), shortcut=LinearSpec(4, 2, bias=False)))
        >>> [name for name, _ in named_parameters(res)]
        ['block.weight', 'block.bias', 'shortcut.weight']
    """

    block: Any
    shortcut: Any = None

    def __post_init__(self) -> None:
        _check_parts("ResidualSpec", [self.block])
        if self.shortcut is not None:
            _check_parts("ResidualSpec", [self.shortcut])

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Residual:
        """Sample the block, then the shortcut."""
        block = _build(self.block, generator, device, dtype)
        shortcut = _build(self.shortcut, generator, device, dtype)
        return Residual(block, shortcut)


class FanOut(Parameterized, init=False):
    """Feed one input to several branches: ``x -> (f(x), g(x), ...)``.

    Hasktorch's ``&&&``. The result is a tuple; follow it with a function that merges it
    (``lambda ys: torch.cat(ys, -1)``, ``sum``) or with :class:`Parallel`. The branches are
    an inlined field: parameters are named ``0.weight``, ``1.weight``...

    Args:
        *branches: the callables, at least one.

    Raises:
        ValueError: no branch given.
        TypeError: a branch is a spec (use :class:`FanOutSpec`) or cannot be called.

    Example:
        >>> from diffprog.nn import FanOut
        >>> FanOut(torch.sin, torch.cos)(torch.zeros(2))
        (tensor([0., 0.]), tensor([1., 1.]))
    """

    branches: tuple[Any, ...] = field(inline=True)

    def __init__(self, *branches: Callable[..., Any]) -> None:
        if not branches:
            raise ValueError("FanOut needs at least one branch.")
        _check_callables("FanOut", branches, "FanOutSpec")
        object.__setattr__(self, "branches", tuple(branches))

    def __call__(self, input: Any) -> tuple[Any, ...]:
        """Every branch applied to ``input``, in order, as a tuple."""
        return tuple(branch(input) for branch in self.branches)

    def __getitem__(self, index: int) -> Any:
        """The branch at ``index``."""
        return self.branches[index]

    def __len__(self) -> int:
        """The number of branches."""
        return len(self.branches)

    def __iter__(self) -> Iterator[Any]:
        """The branches, in order."""
        return iter(self.branches)


@dataclasses.dataclass(frozen=True, init=False)
class FanOutSpec:
    """The spec of :class:`FanOut`: the branches' specs (or functions), sampled in order.

    Example:
        >>> from diffprog.nn import FanOutSpec, LinearSpec
        >>> heads = sample(FanOutSpec(LinearSpec(4, 1), LinearSpec(4, 3)))
        >>> [tuple(y.shape) for y in heads(torch.zeros(2, 4))]
        [(2, 1), (2, 3)]
    """

    branches: tuple[Any, ...]

    def __init__(self, *branches: Any) -> None:
        if not branches:
            raise ValueError("FanOutSpec needs at least one branch.")
        _check_parts("FanOutSpec", branches)
        object.__setattr__(self, "branches", tuple(branches))

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> FanOut:
        """Sample each branch's spec in order."""
        return FanOut(*(_build(b, generator, device, dtype) for b in self.branches))


class Parallel(Parameterized, init=False):
    """Apply branch ``i`` to element ``i`` of a tuple: ``(x, y) -> (f(x), g(y))``.

    Hasktorch's ``***``. It takes one argument, a tuple (or list) with one element per branch,
    so it composes inside :class:`Sequential` after a :class:`FanOut` or a layer returning a
    tuple. The branches are an inlined field: parameters are named ``0.weight``, ``1.weight``...

    Args:
        *branches: the callables, at least one.

    Raises:
        ValueError: no branch given.
        TypeError: a branch is a spec (use :class:`ParallelSpec`) or cannot be called.

    Example:
        >>> from diffprog.nn import Parallel
        >>> Parallel(torch.neg, torch.exp)((torch.ones(1), torch.zeros(1)))
        (tensor([-1.]), tensor([1.]))
    """

    branches: tuple[Any, ...] = field(inline=True)

    def __init__(self, *branches: Callable[..., Any]) -> None:
        if not branches:
            raise ValueError("Parallel needs at least one branch.")
        _check_callables("Parallel", branches, "ParallelSpec")
        object.__setattr__(self, "branches", tuple(branches))

    def __call__(self, inputs: Sequence[Any]) -> tuple[Any, ...]:
        """Each branch applied to its element of ``inputs``, as a tuple.

        Raises:
            TypeError: ``inputs`` is not a tuple or list.
            ValueError: ``inputs`` has not one element per branch.
        """
        if not isinstance(inputs, (tuple, list)):
            raise TypeError(
                f"Parallel takes one tuple with an element per branch, got a "
                f"{type(inputs).__name__}. Call it as parallel((x, y)), or put a FanOut "
                "before it to feed one input to every branch."
            )
        if len(inputs) != len(self.branches):
            raise ValueError(
                f"Parallel has {len(self.branches)} branches but got {len(inputs)} inputs; "
                "pass one input per branch."
            )
        return tuple(branch(x) for branch, x in zip(self.branches, inputs, strict=True))

    def __getitem__(self, index: int) -> Any:
        """The branch at ``index``."""
        return self.branches[index]

    def __len__(self) -> int:
        """The number of branches."""
        return len(self.branches)

    def __iter__(self) -> Iterator[Any]:
        """The branches, in order."""
        return iter(self.branches)


@dataclasses.dataclass(frozen=True, init=False)
class ParallelSpec:
    """The spec of :class:`Parallel`: the branches' specs (or functions), sampled in order.

    Example:
        >>> from diffprog.nn import LinearSpec, ParallelSpec
        >>> par = sample(ParallelSpec(LinearSpec(2, 1), LinearSpec(3, 1)))
        >>> [tuple(y.shape) for y in par((torch.zeros(5, 2), torch.zeros(5, 3)))]
        [(5, 1), (5, 1)]
    """

    branches: tuple[Any, ...]

    def __init__(self, *branches: Any) -> None:
        if not branches:
            raise ValueError("ParallelSpec needs at least one branch.")
        _check_parts("ParallelSpec", branches)
        object.__setattr__(self, "branches", tuple(branches))

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Parallel:
        """Sample each branch's spec in order."""
        return Parallel(*(_build(b, generator, device, dtype) for b in self.branches))
