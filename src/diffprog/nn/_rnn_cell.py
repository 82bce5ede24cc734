"""Recurrent cells: ``RNNCell`` (Elman), ``LSTMCell`` and ``GRUCell`` (Hasktorch's ``Torch.NN``).

A cell computes one time step. Each is a record of torch.nn's four parameters
(``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``) and runs torch's own fused kernels
(``torch._VF.rnn_tanh_cell`` ...), the ones ``torch.nn.RNNCell`` and its siblings call, so
outputs and gradients are PyTorch's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import torch
from torch import _VF

from diffprog import DeviceLike, Parameter, Parameterized, field, init_parameter

__all__ = [
    "GRUCell",
    "GRUCellSpec",
    "LSTMCell",
    "LSTMCellSpec",
    "RNNCell",
    "RNNCellSpec",
]

Nonlinearity = Literal["tanh", "relu"]


class _CellBase(Parameterized):
    """What the cells share: torch.nn's parameters, their checks and the size properties."""

    weight_ih: Parameter
    weight_hh: Parameter
    bias_ih: Parameter | None = None
    bias_hh: Parameter | None = None

    _chunks: ClassVar[int] = 1

    def __post_init__(self) -> None:
        owner = type(self).__name__
        w_ih, w_hh = self.weight_ih, self.weight_hh
        if not (isinstance(w_ih, torch.Tensor) and isinstance(w_hh, torch.Tensor)):
            raise TypeError(f"{owner}: weight_ih and weight_hh must be tensors.")
        if w_ih.dim() != 2 or w_hh.dim() != 2:
            raise ValueError(
                f"{owner}: weight_ih and weight_hh must be 2-d, got shapes "
                f"{tuple(w_ih.shape)} and {tuple(w_hh.shape)}."
            )
        gates = self._chunks * w_hh.shape[1]
        if w_hh.shape[0] != gates or w_ih.shape[0] != gates:
            raise ValueError(
                f"{owner}: weight_hh must be [{self._chunks}*hidden_size, hidden_size] and "
                f"weight_ih [{self._chunks}*hidden_size, input_size]; got "
                f"{tuple(w_hh.shape)} and {tuple(w_ih.shape)}. Use the layout of torch.nn."
                f"{owner}, or sample the layer from {owner}Spec."
            )
        if (self.bias_ih is None) != (self.bias_hh is None):
            raise ValueError(
                f"{owner}: give both bias_ih and bias_hh, or neither (a layer without bias)."
            )
        for name in ("bias_ih", "bias_hh"):
            b = getattr(self, name)
            if b is not None and tuple(b.shape) != (gates,):
                raise ValueError(
                    f"{owner}: {name} must have shape ({gates},) ({self._chunks}*hidden_size), "
                    f"got {tuple(b.shape)}."
                )

    @property
    def input_size(self) -> int:
        """The number of input features (``weight_ih.shape[1]``), as torch.nn's attribute."""
        return int(self.weight_ih.shape[1])

    @property
    def hidden_size(self) -> int:
        """The number of hidden features (``weight_hh.shape[1]``), as torch.nn's attribute."""
        return int(self.weight_hh.shape[1])

    @property
    def bias(self) -> bool:
        """Whether the cell has the biases ``bias_ih`` and ``bias_hh``."""
        return self.bias_ih is not None

    def _batch(self, input: torch.Tensor, hx: tuple[torch.Tensor, ...] | None) -> bool:
        """Check the ranks of ``input`` and ``hx``; return whether they are batched."""
        owner = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(
                f"{owner}: Expected input to be 1D or 2D, got {input.dim()}D instead: give "
                "[batch, input_size] or [input_size]; for a sequence, loop over its steps or "
                "use the sequence layer."
            )
        batched = input.dim() == 2
        for index, h in enumerate(hx or ()):
            if h.dim() != input.dim():
                what = "hidden" if len(hx or ()) == 1 else f"hx[{index}]"
                raise ValueError(
                    f"{owner}: Expected {what} to be {input.dim()}D like the input "
                    f"({'[batch, hidden_size]' if batched else '[hidden_size]'}), got "
                    f"{h.dim()}D instead."
                )
        return batched

    def _zeros(self, input: torch.Tensor) -> torch.Tensor:
        return torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)


class RNNCell(_CellBase):
    """An Elman cell, ``h' = tanh(x @ weight_ih.T + bias_ih + h @ weight_hh.T + bias_hh)``.

    As ``torch.nn.RNNCell`` (Hasktorch's ``ElmanCell``); ``nonlinearity="relu"`` uses ReLU
    instead of tanh.

    Attributes:
        weight_ih: ``[hidden_size, input_size]``.
        weight_hh: ``[hidden_size, hidden_size]``.
        bias_ih: ``[hidden_size]``, or ``None``.
        bias_hh: ``[hidden_size]``, or ``None``.
        nonlinearity: ``"tanh"`` or ``"relu"`` (keyword only).

    Example:
        >>> cell = sample(RNNCellSpec(3, 5), generator=torch.Generator().manual_seed(0))
        >>> [name for name, _ in named_parameters(cell)]
        ['weight_ih', 'weight_hh', 'bias_ih', 'bias_hh']
        >>> h = cell(torch.ones(2, 3))
        >>> cell(torch.ones(2, 3), h).shape
        torch.Size([2, 5])
    """

    nonlinearity: Nonlinearity = field(default="tanh", kw_only=True)

    _chunks: ClassVar[int] = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"RNNCell: Unknown nonlinearity {self.nonlinearity!r}. Select from 'tanh' or "
                "'relu'."
            )

    def __call__(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:
        """One step, as ``torch.nn.RNNCell.forward``.

        Args:
            input: ``[batch, input_size]``, or ``[input_size]`` (unbatched).
            hx: the hidden state, ``[batch, hidden_size]`` or ``[hidden_size]``; zeros if
                ``None``.

        Returns:
            The next hidden state, shaped as ``hx``.

        Raises:
            ValueError: ``input`` or ``hx`` has the wrong number of dimensions.

        Example:
            >>> cell = sample(RNNCellSpec(3, 4, nonlinearity="relu"))
            >>> bool((cell(torch.randn(3)) >= 0).all())
            True
        """
        batched = self._batch(input, None if hx is None else (hx,))
        if not batched:
            input = input.unsqueeze(0)
            hx = None if hx is None else hx.unsqueeze(0)
        if hx is None:
            hx = self._zeros(input)
        kernel = _VF.rnn_tanh_cell if self.nonlinearity == "tanh" else _VF.rnn_relu_cell
        h = kernel(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h if batched else h.squeeze(0)


class LSTMCell(_CellBase):
    """A long short-term memory cell, as ``torch.nn.LSTMCell`` (Hasktorch's ``LSTMCell``).

    The gates are stacked in torch's order (input, forget, cell, output) along the first
    dimension of the weights.

    Attributes:
        weight_ih: ``[4*hidden_size, input_size]``.
        weight_hh: ``[4*hidden_size, hidden_size]``.
        bias_ih: ``[4*hidden_size]``, or ``None``.
        bias_hh: ``[4*hidden_size]``, or ``None``.

    Example:
        >>> cell = sample(LSTMCellSpec(3, 5), generator=torch.Generator().manual_seed(0))
        >>> h, c = cell(torch.ones(2, 3))
        >>> h, c = cell(torch.ones(2, 3), (h, c))
        >>> h.shape, c.shape
        (torch.Size([2, 5]), torch.Size([2, 5]))
    """

    _chunks: ClassVar[int] = 4

    def __call__(
        self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step, as ``torch.nn.LSTMCell.forward``.

        Args:
            input: ``[batch, input_size]``, or ``[input_size]`` (unbatched).
            hx: ``(h, c)``, each ``[batch, hidden_size]`` or ``[hidden_size]``; zeros if
                ``None``.

        Returns:
            ``(h', c')``, shaped as ``h`` and ``c``.

        Raises:
            ValueError: ``input`` or a state has the wrong number of dimensions.

        Example:
            >>> cell = sample(LSTMCellSpec(3, 4))
            >>> [t.shape for t in cell(torch.randn(3))]
            [torch.Size([4]), torch.Size([4])]
        """
        batched = self._batch(input, hx)
        if not batched:
            input = input.unsqueeze(0)
            hx = None if hx is None else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if hx is None:
            zeros = self._zeros(input)
            hx = (zeros, zeros)
        h, c = _VF.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_CellBase):
    """A gated recurrent unit, as ``torch.nn.GRUCell`` (Hasktorch's ``GRUCell``).

    The gates are stacked in torch's order (reset, update, new) along the first dimension of
    the weights.

    Attributes:
        weight_ih: ``[3*hidden_size, input_size]``.
        weight_hh: ``[3*hidden_size, hidden_size]``.
        bias_ih: ``[3*hidden_size]``, or ``None``.
        bias_hh: ``[3*hidden_size]``, or ``None``.

    Example:
        >>> cell = sample(GRUCellSpec(3, 5), generator=torch.Generator().manual_seed(0))
        >>> cell(torch.ones(2, 3)).shape
        torch.Size([2, 5])
    """

    _chunks: ClassVar[int] = 3

    def __call__(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:
        """One step, as ``torch.nn.GRUCell.forward``.

        Args:
            input: ``[batch, input_size]``, or ``[input_size]`` (unbatched).
            hx: the hidden state, ``[batch, hidden_size]`` or ``[hidden_size]``; zeros if
                ``None``.

        Returns:
            The next hidden state, shaped as ``hx``.

        Raises:
            ValueError: ``input`` or ``hx`` has the wrong number of dimensions.

        Example:
            >>> cell = sample(GRUCellSpec(3, 4))
            >>> cell(torch.randn(3), torch.zeros(4)).shape
            torch.Size([4])
        """
        batched = self._batch(input, None if hx is None else (hx,))
        if not batched:
            input = input.unsqueeze(0)
            hx = None if hx is None else hx.unsqueeze(0)
        if hx is None:
            hx = self._zeros(input)
        h = _VF.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h if batched else h.squeeze(0)


def _check_sizes(owner: str, input_size: int, hidden_size: int, bias: bool) -> None:
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{owner}: {name} should be of type int, got: {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{owner}: {name} must be greater than zero, got {value}.")
    if not isinstance(bias, bool):
        raise TypeError(f"{owner}: bias should be of type bool, got: {type(bias).__name__}")


def _sample_cell(
    chunks: int,
    input_size: int,
    hidden_size: int,
    bias: bool,
    generator: torch.Generator | None,
    device: DeviceLike,
    dtype: torch.dtype | None,
) -> tuple[Parameter, Parameter, Parameter | None, Parameter | None]:
    """torch.nn's ``RNNCellBase.reset_parameters``: every parameter uniform(-1/√h, 1/√h)."""
    bound = 1.0 / math.sqrt(hidden_size)
    shapes: list[tuple[int, ...]] = [
        (chunks * hidden_size, input_size),
        (chunks * hidden_size, hidden_size),
    ]
    if bias:
        shapes += [(chunks * hidden_size,), (chunks * hidden_size,)]
    params = [
        init_parameter(
            shape,
            lambda t, g: torch.nn.init.uniform_(t, -bound, bound, generator=g),
            generator=generator,
            device=device,
            dtype=dtype,
        )
        for shape in shapes
    ]
    if bias:
        return params[0], params[1], params[2], params[3]
    return params[0], params[1], None, None


@dataclasses.dataclass(frozen=True)
class RNNCellSpec:
    """The spec of :class:`RNNCell`, with ``torch.nn.RNNCell``'s arguments.

    ``sample`` initialises as PyTorch does (every parameter uniform in
    ``(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``, in parameter order): with the same seed
    the weights equal ``torch.nn.RNNCell``'s bit for bit.

    Attributes:
        input_size: the number of input features.
        hidden_size: the number of hidden features.
        bias: whether the cell has ``bias_ih`` and ``bias_hh``.
        nonlinearity: ``"tanh"`` or ``"relu"``.

    Raises:
        ValueError: a size is not positive or ``nonlinearity`` is unknown.
        TypeError: a size is not an int or ``bias`` not a bool.

    Example:
        >>> torch.manual_seed(0); reference = torch.nn.RNNCell(3, 4)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> ours = sample(RNNCellSpec(3, 4), generator=torch.Generator().manual_seed(0))
        >>> all(torch.equal(p, reference.get_parameter(n)) for n, p in named_parameters(ours))
        True
    """

    input_size: int
    hidden_size: int
    bias: bool = True
    nonlinearity: Nonlinearity = "tanh"

    def __post_init__(self) -> None:
        _check_sizes("RNNCellSpec", self.input_size, self.hidden_size, self.bias)
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"RNNCellSpec: Unknown nonlinearity {self.nonlinearity!r}. Select from 'tanh' "
                "or 'relu'."
            )

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> RNNCell:
        """Sample an :class:`RNNCell` with PyTorch's default initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The cell.
        """
        params = _sample_cell(
            1, self.input_size, self.hidden_size, self.bias, generator, device, dtype
        )
        return RNNCell(*params, nonlinearity=self.nonlinearity)


@dataclasses.dataclass(frozen=True)
class LSTMCellSpec:
    """The spec of :class:`LSTMCell`, with ``torch.nn.LSTMCell``'s arguments.

    ``sample`` initialises as PyTorch does; with the same seed the weights equal
    ``torch.nn.LSTMCell``'s bit for bit.

    Attributes:
        input_size: the number of input features.
        hidden_size: the number of hidden features.
        bias: whether the cell has ``bias_ih`` and ``bias_hh``.

    Raises:
        ValueError: a size is not positive.
        TypeError: a size is not an int or ``bias`` not a bool.

    Example:
        >>> cell = sample(LSTMCellSpec(3, 4, bias=False))
        >>> [name for name, _ in named_parameters(cell)]
        ['weight_ih', 'weight_hh']
    """

    input_size: int
    hidden_size: int
    bias: bool = True

    def __post_init__(self) -> None:
        _check_sizes("LSTMCellSpec", self.input_size, self.hidden_size, self.bias)

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> LSTMCell:
        """Sample an :class:`LSTMCell` with PyTorch's default initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The cell.
        """
        params = _sample_cell(
            4, self.input_size, self.hidden_size, self.bias, generator, device, dtype
        )
        return LSTMCell(*params)


@dataclasses.dataclass(frozen=True)
class GRUCellSpec:
    """The spec of :class:`GRUCell`, with ``torch.nn.GRUCell``'s arguments.

    ``sample`` initialises as PyTorch does; with the same seed the weights equal
    ``torch.nn.GRUCell``'s bit for bit.

    Attributes:
        input_size: the number of input features.
        hidden_size: the number of hidden features.
        bias: whether the cell has ``bias_ih`` and ``bias_hh``.

    Raises:
        ValueError: a size is not positive.
        TypeError: a size is not an int or ``bias`` not a bool.

    Example:
        >>> cell = sample(GRUCellSpec(3, 4))
        >>> tuple(cell.weight_ih.shape)
        (12, 3)
    """

    input_size: int
    hidden_size: int
    bias: bool = True

    def __post_init__(self) -> None:
        _check_sizes("GRUCellSpec", self.input_size, self.hidden_size, self.bias)

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> GRUCell:
        """Sample a :class:`GRUCell` with PyTorch's default initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The cell.
        """
        params = _sample_cell(
            3, self.input_size, self.hidden_size, self.bias, generator, device, dtype
        )
        return GRUCell(*params)
