"""Recurrent layers over sequences: multi-layer, optionally bidirectional RNN, LSTM and GRU.

Each layer holds its parameters in one inlined dict field, ``weights``, keyed and ordered
exactly as torch.nn's (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``,
``weight_ih_l0_reverse``, ..., ``weight_hr_l0`` for LSTM's projections), so
``named_parameters`` equals the torch.nn layer's ``state_dict`` keys and the dict's values are
the flat weight list of torch's fused kernels (``torch._VF.lstm`` ...), which the layers call
as torch.nn does: outputs, final states and gradients are PyTorch's.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar, Protocol, overload

import torch
from torch import _VF
from torch.nn.utils.rnn import PackedSequence

from diffprog import DeviceLike, Parameter, Parameterized, field, init_parameter
from diffprog.nn._rnn_cell import Nonlinearity
from diffprog.nn._state import is_training, training_generator, warn_unless_mode_chosen

__all__ = ["GRU", "LSTM", "RNN", "GRUSpec", "LSTMSpec", "RNNSpec"]

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}
_NOT_COMPACT = "RNN module weights are not part of single contiguous chunk of memory"


def _weight_names(num_layers: int, bidirectional: bool, bias: bool, proj: bool) -> list[str]:
    """torch.nn's ``_flat_weights_names``: the parameter names in kernel order."""
    names: list[str] = []
    for layer in range(num_layers):
        for suffix in ("", "_reverse") if bidirectional else ("",):
            kinds = ["weight_ih", "weight_hh"]
            if bias:
                kinds += ["bias_ih", "bias_hh"]
            if proj:
                kinds.append("weight_hr")
            names += [f"{kind}_l{layer}{suffix}" for kind in kinds]
    return names


def _weight_shapes(
    gates: int,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    bidirectional: bool,
    bias: bool,
    proj_size: int,
) -> dict[str, tuple[int, ...]]:
    """The name -> shape table of a layer, in torch.nn's parameter order."""
    directions = 2 if bidirectional else 1
    real_hidden = proj_size if proj_size > 0 else hidden_size
    names = iter(_weight_names(num_layers, bidirectional, bias, proj_size > 0))
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else real_hidden * directions
        for _ in range(directions):
            shapes[next(names)] = (gates * hidden_size, layer_input)
            shapes[next(names)] = (gates * hidden_size, real_hidden)
            if bias:
                shapes[next(names)] = (gates * hidden_size,)
                shapes[next(names)] = (gates * hidden_size,)
            if proj_size > 0:
                shapes[next(names)] = (proj_size, hidden_size)
    return shapes


def _dropout(
    x: torch.Tensor, p: float, generator: torch.Generator | None, batch_first: bool
) -> torch.Tensor:
    """The dropout between layers, drawn as ATen's RNN kernels draw it on the CPU.

    Args:
        x: a layer's output: ``[seq, batch, H]``, ``[batch, seq, H]`` if ``batch_first``, or
            the ``[total, H]`` data of a packed sequence (then ``batch_first`` is ``False``).
        p: the dropout probability.
        generator: the random source (``None``: torch's global generator).
        batch_first: whether ``x`` is ``[batch, seq, H]``.

    Returns:
        ``x`` with the mask applied, scaled by ``1 / (1 - p)``.
    """
    if p == 1.0:
        return x * torch.zeros((), dtype=x.dtype, device=x.device)
    # ATen transposes a batch_first input to [seq, batch, H] before the first layer and draws
    # each mask on that contiguous layout; drawing on [batch, seq, H] would give the same
    # numbers in a different order, i.e. other masks than torch.nn's for the same seed.
    seq_first = x.transpose(0, 1) if batch_first else x
    draw_on = generator.device if generator is not None else x.device
    noise = torch.empty(seq_first.shape, dtype=x.dtype, device=draw_on)
    noise.bernoulli_(1.0 - p, generator=generator)
    noise = noise.div_(1.0 - p).to(x.device)
    return x * (noise.transpose(0, 1) if batch_first else noise)


class _RNNBase(Parameterized):
    """What RNN, LSTM and GRU share: the weights dict, its checks, the forward pass."""

    weights: dict[str, Parameter] = field(inline=True)
    batch_first: bool = field(default=False, kw_only=True)
    dropout: float = field(default=0.0, kw_only=True)

    _name: ClassVar[str] = "RNN"

    @property
    def mode(self) -> str:
        """The kernel, as torch.nn's attribute: ``RNN_TANH``, ``RNN_RELU``, ``LSTM`` or ``GRU``."""
        return self._name

    def __post_init__(self) -> None:
        owner = type(self).__name__
        w = self.weights
        if not isinstance(w, dict) or "weight_ih_l0" not in w or "weight_hh_l0" not in w:
            raise ValueError(
                f"{owner}: weights must be a dict of parameters named as torch.nn.{owner}'s "
                "(weight_ih_l0, weight_hh_l0, ...); sample the layer from its spec, or pass "
                f"dict(torch_layer.named_parameters()) of a torch.nn.{owner}."
            )
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool):
            raise TypeError(f"{owner}: dropout must be a number in [0, 1], got {self.dropout!r}.")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(
                f"{owner}: dropout should be a number in range [0, 1] representing the "
                f"probability of an element being zeroed, got {self.dropout}."
            )
        first = w["weight_ih_l0"]
        if not isinstance(first, torch.Tensor) or first.dim() != 2:
            got = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
            raise ValueError(
                f"{owner}: weight_ih_l0 must be a 2-d tensor [gates*hidden_size, input_size], "
                f"got {got}."
            )
        num_layers = sum(1 for n in w if n.startswith("weight_ih_l") and n[11:].isdigit())
        expected = _weight_shapes(
            _GATES[self.mode],
            self.input_size,
            self.hidden_size,
            num_layers,
            self.bidirectional,
            self.bias,
            self.proj_size if self.mode == "LSTM" else 0,
        )
        if list(w) != list(expected):
            missing = [n for n in expected if n not in w]
            unexpected = [n for n in w if n not in expected]
            detail = (
                f"missing {missing}, unexpected {unexpected}"
                if missing or unexpected
                else f"they are in the order {list(w)}"
            )
            raise ValueError(
                f"{owner}: the weights must be named and ordered as torch.nn.{owner}'s "
                f"parameters, {list(expected)}; {detail}."
            )
        for name, shape in expected.items():
            t = w[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"{owner}: {name} must have shape {shape} (from input_size="
                    f"{self.input_size}, hidden_size={self.hidden_size}"
                    + (f", proj_size={self.proj_size}" if self.proj_size else "")
                    + f"), got {got}."
                )

    def __getattr__(self, name: str) -> Parameter:
        """A parameter by its torch.nn name, e.g. ``lstm.weight_ih_l0``, as on torch.nn's layer."""
        weights = self.__dict__.get("weights")
        if isinstance(weights, dict) and name in weights:
            return weights[name]  # type: ignore[no-any-return]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def input_size(self) -> int:
        """The number of input features (``weight_ih_l0.shape[1]``), as torch.nn's attribute."""
        return int(self.weights["weight_ih_l0"].shape[1])

    @property
    def hidden_size(self) -> int:
        """The number of hidden features, as torch.nn's attribute."""
        return int(self.weights["weight_ih_l0"].shape[0]) // _GATES[self.mode]

    @property
    def proj_size(self) -> int:
        """The size of LSTM's projected hidden state (0: no projection), as torch.nn's."""
        w_hr = self.weights.get("weight_hr_l0")
        return 0 if w_hr is None else int(w_hr.shape[0])

    @property
    def bias(self) -> bool:
        """Whether the layer has biases, as torch.nn's attribute."""
        return "bias_ih_l0" in self.weights

    @property
    def bidirectional(self) -> bool:
        """Whether every layer also runs backwards in time, as torch.nn's attribute."""
        return "weight_ih_l0_reverse" in self.weights

    @property
    def num_layers(self) -> int:
        """The number of stacked layers, as torch.nn's attribute."""
        per_layer = (2 + 2 * self.bias + (self.proj_size > 0)) * (1 + self.bidirectional)
        return len(self.weights) // per_layer

    @property
    def all_weights(self) -> list[list[Parameter]]:
        """The parameters grouped by layer and direction, as torch.nn's ``all_weights``."""
        flat = list(self.weights.values())
        per = 2 + 2 * self.bias + (self.proj_size > 0)
        return [flat[i : i + per] for i in range(0, len(flat), per)]

    def _run(
        self,
        input: torch.Tensor | PackedSequence,
        hx: tuple[torch.Tensor, ...] | None,
        training: bool | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor | PackedSequence, tuple[torch.Tensor, ...]]:
        """The forward pass of torch.nn's RNN/LSTM/GRU, with the state as a tuple."""
        owner = type(self).__name__
        lstm = self.mode == "LSTM"
        num_layers = self.num_layers
        rows = num_layers * (2 if self.bidirectional else 1)  # layers * directions
        hidden = self.hidden_size
        state_sizes = (self.proj_size or hidden, hidden) if lstm else (hidden,)
        hx_name = "hx and cx" if lstm else "hx"
        if hx is not None and (
            not isinstance(hx, (tuple, list))
            or len(hx) != len(state_sizes)
            or not all(isinstance(h, torch.Tensor) for h in hx)
        ):
            raise TypeError(
                f"{owner}: hx must be "
                + ("a tuple (h_0, c_0) of two tensors" if lstm else "a tensor")
                + f", got {type(hx if lstm else hx[0]).__name__}."
            )

        batch_sizes: torch.Tensor | None = None
        unsorted: torch.Tensor | None = None
        batched = True
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted = input
            batch = int(batch_sizes[0])
            if hx is not None and sorted_indices is not None:
                hx = tuple(h.index_select(1, sorted_indices) for h in hx)
        else:
            data = input
            if data.dim() not in (2, 3):
                raise ValueError(
                    f"{owner}: Expected input to be 2D or 3D, got {data.dim()}D instead: give "
                    f"[seq, batch, input_size] ([batch, seq, input_size] with batch_first), "
                    f"[seq, input_size] unbatched, or a PackedSequence."
                )
            batched = data.dim() == 3
            if hx is not None and any(h.dim() != data.dim() for h in hx):
                dims = ", ".join(f"{h.dim()}-D" for h in hx)
                raise RuntimeError(
                    f"{owner}: For {'batched 3-D' if batched else 'unbatched 2-D'} input, "
                    f"{hx_name} should also be {data.dim()}-D but got ({dims}) tensors: "
                    f"[num_layers*num_directions, {'batch, ' if batched else ''}hidden]."
                )
            if not batched:
                data = data.unsqueeze(0 if self.batch_first else 1)
                hx = None if hx is None else tuple(h.unsqueeze(1) for h in hx)
            batch = data.size(0 if self.batch_first else 1)

        weights = list(self.weights.values())
        if data.dtype != weights[0].dtype:
            raise ValueError(
                f"{owner}: input dtype ({data.dtype}) does not match weight dtype "
                f"({weights[0].dtype}). Convert the input, input.to({weights[0].dtype}), or "
                f"sample the layer with dtype={data.dtype}."
            )
        if data.size(-1) != self.input_size:
            raise RuntimeError(
                f"{owner}: input.size(-1) must be equal to input_size. Expected "
                f"{self.input_size}, got {data.size(-1)}."
            )
        if hx is None:
            hx = tuple(
                torch.zeros(rows, batch, size, dtype=data.dtype, device=data.device)
                for size in state_sizes
            )
        for index, (h, size) in enumerate(zip(hx, state_sizes, strict=True)):
            expected = (rows, batch, size)
            if tuple(h.shape) != expected:
                what = f"hidden[{index}]" if lstm else "hidden"
                raise RuntimeError(
                    f"{owner}: Expected {what} size {expected}, got {list(h.shape)} "
                    "(num_layers * num_directions, batch, "
                    f"{'proj_size or hidden_size' if lstm and index == 0 else 'hidden_size'})."
                )

        train = is_training() if training is None else training
        if training is None and not train and self.dropout > 0 and num_layers > 1:
            warn_unless_mode_chosen(self, "no dropout between layers", (data, *hx, *weights))
        if generator is None:
            generator = training_generator()
        layered = train and self.dropout > 0 and num_layers > 1 and generator is not None
        # The kernel's own train flag also decides whether cuDNN keeps what its backward pass
        # needs: cuDNN refuses to differentiate a forward run with train=False. diffprog is in
        # eval mode by default yet differentiates every step, so on CUDA the kernel runs in
        # train mode whenever a gradient may be taken (its dropout stays 0 unless training).
        kernel_train = train or (
            data.is_cuda
            and torch.is_grad_enabled()
            and (
                data.requires_grad
                or any(w.requires_grad for w in weights)
                or any(h.requires_grad for h in hx)
            )
        )
        if not layered:
            output, h_n = self._kernel(
                data,
                batch_sizes,
                hx,
                weights,
                num_layers,
                self.dropout if train else 0.0,
                kernel_train,
            )
        else:  # layer by layer, so that the dropout between layers uses the given generator
            per = len(weights) // num_layers
            directions = rows // num_layers
            finals: list[tuple[torch.Tensor, ...]] = []
            output = data
            for layer in range(num_layers):
                if layer > 0:
                    output = _dropout(
                        output, self.dropout, generator, self.batch_first and batch_sizes is None
                    )
                own = slice(layer * directions, (layer + 1) * directions)
                output, states = self._kernel(
                    output,
                    batch_sizes,
                    tuple(h[own] for h in hx),
                    weights[layer * per : (layer + 1) * per],
                    1,
                    0.0,
                    kernel_train,
                )
                finals.append(states)
            h_n = tuple(torch.cat(parts) for parts in zip(*finals, strict=True))

        if isinstance(input, PackedSequence):
            if unsorted is not None:
                h_n = tuple(h.index_select(1, unsorted) for h in h_n)
            return PackedSequence(output, batch_sizes, input.sorted_indices, unsorted), h_n
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n = tuple(h.squeeze(1) for h in h_n)
        return output, h_n

    def _kernel(
        self,
        data: torch.Tensor,
        batch_sizes: torch.Tensor | None,
        hx: tuple[torch.Tensor, ...],
        weights: list[Parameter],
        num_layers: int,
        dropout: float,
        train: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Call torch's fused kernel (the one torch.nn's forward calls)."""
        if data.is_cuda:
            # cuDNN wants the weights in one buffer, which torch.nn keeps (flatten_parameters)
            # but values replaced at every step cannot: cuDNN then copies them into one per
            # call, as for torch.func.functional_call on a torch.nn.LSTM, and warns each time.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", _NOT_COMPACT, UserWarning)
                return self._fused(data, batch_sizes, hx, weights, num_layers, dropout, train)
        return self._fused(data, batch_sizes, hx, weights, num_layers, dropout, train)

    def _fused(
        self,
        data: torch.Tensor,
        batch_sizes: torch.Tensor | None,
        hx: tuple[torch.Tensor, ...],
        weights: list[Parameter],
        num_layers: int,
        dropout: float,
        train: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        bias, bidirectional = self.bias, self.bidirectional
        params: list[torch.Tensor] = list(weights)
        if self.mode == "LSTM":
            if batch_sizes is None:
                out = _VF.lstm(
                    data,
                    hx,
                    params,
                    bias,
                    num_layers,
                    dropout,
                    train,
                    bidirectional,
                    self.batch_first,
                )
            else:
                out = _VF.lstm(
                    data,
                    batch_sizes,
                    hx,
                    params,
                    bias,
                    num_layers,
                    dropout,
                    train,
                    bidirectional,
                )
            return out[0], (out[1], out[2])
        kernel = {"GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}[self.mode]
        if batch_sizes is None:
            output, h = kernel(
                data,
                hx[0],
                params,
                bias,
                num_layers,
                dropout,
                train,
                bidirectional,
                self.batch_first,
            )
        else:
            output, h = kernel(
                data,
                batch_sizes,
                hx[0],
                params,
                bias,
                num_layers,
                dropout,
                train,
                bidirectional,
            )
        return output, (h,)


class _SingleStateRNN(_RNNBase):
    """RNN and GRU: one state tensor per layer and direction (LSTM has two)."""

    @overload
    def __call__(
        self,
        input: torch.Tensor,
        hx: torch.Tensor | None = None,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def __call__(
        self,
        input: PackedSequence,
        hx: torch.Tensor | None = None,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[PackedSequence, torch.Tensor]: ...

    def __call__(
        self,
        input: torch.Tensor | PackedSequence,
        hx: torch.Tensor | None = None,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor | PackedSequence, torch.Tensor]:
        """Run over a sequence, as ``torch.nn.RNN.forward`` / ``torch.nn.GRU.forward``.

        Args:
            input: ``[seq, batch, input_size]`` (``[batch, seq, input_size]`` with
                ``batch_first``), ``[seq, input_size]`` unbatched, or a ``PackedSequence``.
            hx: the initial states, ``[num_layers * num_directions, batch, hidden_size]``
                (``[num_layers * num_directions, hidden_size]`` unbatched); zeros if ``None``.
            training: force training (``True``) or eval (``False``) behaviour of the dropout
                between layers; ``None``: :func:`diffprog.nn.is_training`.
            generator: the random source of that dropout.

        Returns:
            ``(output, h_n)``: the last layer's outputs at every step,
            ``[seq, batch, num_directions * hidden_size]`` (a ``PackedSequence`` for one),
            and the final states of every layer and direction, shaped as ``hx``.

        Raises:
            ValueError: ``input`` is not 2-D or 3-D, or its dtype is not the weights'.
            RuntimeError: the feature size of ``input`` or the shape of ``hx`` is wrong.

        Example:
            >>> rnn = sample(RNNSpec(3, 4, batch_first=True, bidirectional=True))
            >>> output, h_n = rnn(torch.randn(2, 6, 3))  # [batch, seq, feature]
            >>> output.shape, h_n.shape
            (torch.Size([2, 6, 8]), torch.Size([2, 2, 4]))
        """
        output, (h_n,) = self._run(input, None if hx is None else (hx,), training, generator)
        return output, h_n


class RNN(_SingleStateRNN):
    """A multi-layer Elman RNN over a sequence, as ``torch.nn.RNN``.

    Each layer computes ``h_t = tanh(x_t @ W_ih.T + b_ih + h_{t-1} @ W_hh.T + b_hh)`` (ReLU
    with ``nonlinearity="relu"``), layer ``l > 0`` reading the outputs of layer ``l - 1``.
    With ``dropout > 0``, in training mode (:func:`diffprog.nn.training`), the outputs of
    every layer but the last are dropped out; the randomness comes from the ``generator``
    argument, else the training pass's generator, else torch's global one, where the masks
    are those of ``torch.nn.RNN`` for the same seed.

    Attributes:
        weights: the parameters by their torch.nn names (``weight_ih_l0``, ``weight_hh_l0``,
            ``bias_ih_l0``, ``bias_hh_l0``, ``weight_ih_l0_reverse``, ...), in torch.nn's
            order; each is also an attribute (``rnn.weight_ih_l0``). Treat it as read-only.
        nonlinearity: ``"tanh"`` or ``"relu"`` (keyword only).
        batch_first: input and output are ``[batch, seq, feature]`` (keyword only).
        dropout: the dropout probability between layers (keyword only).

    ``input_size``, ``hidden_size``, ``num_layers``, ``bias`` and ``bidirectional`` are
    properties read from ``weights``.

    Example:
        >>> rnn = sample(RNNSpec(3, 5, num_layers=2), generator=torch.Generator().manual_seed(0))
        >>> [name for name, _ in named_parameters(rnn)][:4]
        ['weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0']
        >>> output, h_n = rnn(torch.randn(7, 2, 3))  # [seq, batch, feature]
        >>> output.shape, h_n.shape
        (torch.Size([7, 2, 5]), torch.Size([2, 2, 5]))
    """

    nonlinearity: Nonlinearity = field(default="tanh", kw_only=True)

    @property
    def mode(self) -> str:
        """The kernel, as torch.nn's attribute: ``RNN_TANH`` or ``RNN_RELU``."""
        return "RNN_RELU" if self.nonlinearity == "relu" else "RNN_TANH"

    def __post_init__(self) -> None:
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"RNN: Unknown nonlinearity {self.nonlinearity!r}. Select from 'tanh' or 'relu'."
            )
        super().__post_init__()


class LSTM(_RNNBase):
    """A multi-layer long short-term memory over a sequence, as ``torch.nn.LSTM``.

    With ``proj_size > 0`` the hidden state is projected by ``weight_hr_l{k}`` to
    ``proj_size`` features (the cell state keeps ``hidden_size``). With ``dropout > 0``, in
    training mode, the outputs of every layer but the last are dropped out, with randomness
    from ``generator``, else the training pass's generator, else torch's global one (then the
    masks are ``torch.nn.LSTM``'s for the same seed).

    Attributes:
        weights: the parameters by their torch.nn names (``weight_ih_l0``, ``weight_hh_l0``,
            ``bias_ih_l0``, ``bias_hh_l0``, ``weight_hr_l0``, ``weight_ih_l0_reverse``, ...),
            in torch.nn's order; each is also an attribute (``lstm.weight_hh_l1``). Treat it
            as read-only.
        batch_first: input and output are ``[batch, seq, feature]`` (keyword only).
        dropout: the dropout probability between layers (keyword only).

    ``input_size``, ``hidden_size``, ``num_layers``, ``bias``, ``bidirectional`` and
    ``proj_size`` are properties read from ``weights``.

    Example:
        >>> spec = LSTMSpec(input_size=3, hidden_size=5, num_layers=2, batch_first=True)
        >>> lstm = sample(spec, generator=torch.Generator().manual_seed(0))
        >>> output, (h_n, c_n) = lstm(torch.randn(4, 7, 3))
        >>> output.shape, h_n.shape, c_n.shape
        (torch.Size([4, 7, 5]), torch.Size([2, 4, 5]), torch.Size([2, 4, 5]))
    """

    _name: ClassVar[str] = "LSTM"

    @overload
    def __call__(
        self,
        input: torch.Tensor,
        hx: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]: ...

    @overload
    def __call__(
        self,
        input: PackedSequence,
        hx: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[PackedSequence, tuple[torch.Tensor, torch.Tensor]]: ...

    def __call__(
        self,
        input: torch.Tensor | PackedSequence,
        hx: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor | PackedSequence, tuple[torch.Tensor, torch.Tensor]]:
        """Run over a sequence, as ``torch.nn.LSTM.forward``.

        Args:
            input: ``[seq, batch, input_size]`` (``[batch, seq, input_size]`` with
                ``batch_first``), ``[seq, input_size]`` unbatched, or a ``PackedSequence``.
            hx: ``(h_0, c_0)``: ``[num_layers * num_directions, batch, proj_size or
                hidden_size]`` and ``[num_layers * num_directions, batch, hidden_size]``
                (without the batch dimension when unbatched); zeros if ``None``.
            training: force training (``True``) or eval (``False``) behaviour of the dropout
                between layers; ``None``: :func:`diffprog.nn.is_training`.
            generator: the random source of that dropout.

        Returns:
            ``(output, (h_n, c_n))``: the last layer's outputs at every step,
            ``[seq, batch, num_directions * (proj_size or hidden_size)]`` (a
            ``PackedSequence`` for one), and the final states, shaped as ``hx``.

        Raises:
            ValueError: ``input`` is not 2-D or 3-D, or its dtype is not the weights'.
            RuntimeError: the feature size of ``input`` or the shape of a state is wrong.

        Example:
            >>> lstm = sample(LSTMSpec(3, 8, num_layers=2))
            >>> output, (h_n, c_n) = lstm(torch.randn(5, 3))  # unbatched [seq, feature]
            >>> output.shape, h_n.shape, c_n.shape
            (torch.Size([5, 8]), torch.Size([2, 8]), torch.Size([2, 8]))
        """
        output, (h_n, c_n) = self._run(input, hx, training, generator)
        return output, (h_n, c_n)


class GRU(_SingleStateRNN):
    """A multi-layer gated recurrent unit over a sequence, as ``torch.nn.GRU``.

    With ``dropout > 0``, in training mode, the outputs of every layer but the last are
    dropped out, with randomness from ``generator``, else the training pass's generator, else
    torch's global one (then the masks are ``torch.nn.GRU``'s for the same seed).

    Attributes:
        weights: the parameters by their torch.nn names (``weight_ih_l0``, ``weight_hh_l0``,
            ``bias_ih_l0``, ``bias_hh_l0``, ``weight_ih_l0_reverse``, ...), in torch.nn's
            order; each is also an attribute (``gru.weight_ih_l0``). Treat it as read-only.
        batch_first: input and output are ``[batch, seq, feature]`` (keyword only).
        dropout: the dropout probability between layers (keyword only).

    ``input_size``, ``hidden_size``, ``num_layers``, ``bias`` and ``bidirectional`` are
    properties read from ``weights``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> gru = sample(GRUSpec(3, 5, bidirectional=True), generator=g)
        >>> output, h_n = gru(torch.randn(7, 2, 3))
        >>> output.shape, h_n.shape
        (torch.Size([7, 2, 10]), torch.Size([2, 2, 5]))

    Unbatched:

        >>> gru = sample(GRUSpec(3, 4, num_layers=2))
        >>> output, h_n = gru(torch.randn(6, 3), torch.zeros(2, 4))
        >>> output.shape, h_n.shape
        (torch.Size([6, 4]), torch.Size([2, 4]))
    """

    _name: ClassVar[str] = "GRU"


def _check_spec(
    owner: str,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    bias: bool,
    batch_first: bool,
    dropout: float,
    proj_size: int = 0,
) -> None:
    """torch.nn's ``RNNBase.__init__`` checks, with its exception types and warning."""
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError(
            f"{owner}: dropout should be a number in range [0, 1] representing the probability "
            f"of an element being zeroed, got {dropout!r}."
        )
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero "
            f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
            f"num_layers={num_layers}",
            UserWarning,
            stacklevel=4,
        )
    for name, flag in (("bias", bias), ("batch_first", batch_first)):
        if not isinstance(flag, bool):
            raise TypeError(f"{owner}: {name} should be of type bool, got: {type(flag).__name__}")
    for name, size in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"{owner}: {name} should be of type int, got: {type(size).__name__}")
        if size <= 0:
            raise ValueError(f"{owner}: {name} must be greater than zero, got {size}.")
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(f"{owner}: num_layers must be greater than zero, got {num_layers!r}.")
    if not isinstance(proj_size, int) or proj_size < 0:
        raise ValueError(
            f"{owner}: proj_size should be a positive integer or zero to disable projections, "
            f"got {proj_size!r}."
        )
    if proj_size >= hidden_size:
        raise ValueError(
            f"{owner}: proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
            f"and hidden_size={hidden_size}."
        )


class _StackSpec(Protocol):
    """What the RNN, LSTM and GRU specs share (an LSTM spec also has ``proj_size``)."""

    @property
    def input_size(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def bidirectional(self) -> bool: ...
    @property
    def bias(self) -> bool: ...


def _sample_weights(
    gates: int,
    spec: _StackSpec,
    generator: torch.Generator | None,
    device: DeviceLike,
    dtype: torch.dtype | None,
) -> dict[str, Parameter]:
    """torch.nn's ``RNNBase.reset_parameters``: every parameter uniform(-1/√h, 1/√h), in order."""
    bound = 1.0 / math.sqrt(spec.hidden_size)
    shapes = _weight_shapes(
        gates,
        spec.input_size,
        spec.hidden_size,
        spec.num_layers,
        spec.bidirectional,
        spec.bias,
        getattr(spec, "proj_size", 0),
    )
    return {
        name: init_parameter(
            shape,
            lambda t, g: torch.nn.init.uniform_(t, -bound, bound, generator=g),
            generator=generator,
            device=device,
            dtype=dtype,
        )
        for name, shape in shapes.items()
    }


@dataclasses.dataclass(frozen=True)
class RNNSpec:
    """The spec of :class:`RNN`, with ``torch.nn.RNN``'s arguments, names and defaults.

    ``sample`` initialises as PyTorch does (every parameter uniform in
    ``(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``, in parameter order): with the same seed
    the weights equal ``torch.nn.RNN``'s bit for bit.

    Attributes:
        input_size: the number of input features.
        hidden_size: the number of hidden features.
        num_layers: the number of stacked layers.
        nonlinearity: ``"tanh"`` or ``"relu"``.
        bias: whether the layers have biases.
        batch_first: input and output are ``[batch, seq, feature]``.
        dropout: the dropout probability on the outputs of every layer but the last, in
            training mode.
        bidirectional: whether each layer also runs backwards in time.

    Raises:
        ValueError: a size or ``dropout`` is out of range, or ``nonlinearity`` is unknown.
        TypeError: a size is not an int, or ``bias``/``batch_first`` not a bool.

    Warns:
        UserWarning: ``dropout > 0`` with one layer (it has no effect), as torch.nn warns.

    Example:
        >>> torch.manual_seed(0); reference = torch.nn.RNN(3, 4, num_layers=2)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> ours = sample(RNNSpec(3, 4, num_layers=2), generator=torch.Generator().manual_seed(0))
        >>> all(torch.equal(p, reference.get_parameter(n)) for n, p in named_parameters(ours))
        True
    """

    input_size: int
    hidden_size: int
    num_layers: int = 1
    nonlinearity: Nonlinearity = "tanh"
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False

    def __post_init__(self) -> None:
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"RNNSpec: Unknown nonlinearity {self.nonlinearity!r}. Select from 'tanh' or "
                "'relu'."
            )
        _check_spec(
            "RNNSpec",
            self.input_size,
            self.hidden_size,
            self.num_layers,
            self.bias,
            self.batch_first,
            self.dropout,
        )

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> RNN:
        """Sample an :class:`RNN` with PyTorch's default initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The layer.
        """
        weights = _sample_weights(1, self, generator, device, dtype)
        return RNN(
            weights,
            nonlinearity=self.nonlinearity,
            batch_first=self.batch_first,
            dropout=float(self.dropout),
        )


@dataclasses.dataclass(frozen=True)
class LSTMSpec:
    """The spec of :class:`LSTM`, with ``torch.nn.LSTM``'s arguments, names and defaults.

    ``sample`` initialises as PyTorch does; with the same seed the weights equal
    ``torch.nn.LSTM``'s bit for bit.

    Attributes:
        input_size: the number of input features.
        hidden_size: the number of hidden (and cell) features.
        num_layers: the number of stacked layers.
        bias: whether the layers have biases.
        batch_first: input and output are ``[batch, seq, feature]``.
        dropout: the dropout probability on the outputs of every layer but the last, in
            training mode.
        bidirectional: whether each layer also runs backwards in time.
        proj_size: if positive, the hidden state is projected to this size
            (``weight_hr_l{k}``); must be smaller than ``hidden_size``.

    Raises:
        ValueError: a size or ``dropout`` is out of range.
        TypeError: a size is not an int, or ``bias``/``batch_first`` not a bool.

    Warns:
        UserWarning: ``dropout > 0`` with one layer (it has no effect), as torch.nn warns.

    Example:
        >>> spec = LSTMSpec(input_size=3, hidden_size=4, num_layers=2, proj_size=2)
        >>> _ = torch.manual_seed(0)
        >>> reference = torch.nn.LSTM(3, 4, num_layers=2, proj_size=2)
        >>> ours = sample(spec, generator=torch.Generator().manual_seed(0))
        >>> [n for n, _ in named_parameters(ours)] == list(reference.state_dict())
        True
        >>> all(torch.equal(p, reference.get_parameter(n)) for n, p in named_parameters(ours))
        True
    """

    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int = 0

    def __post_init__(self) -> None:
        _check_spec(
            "LSTMSpec",
            self.input_size,
            self.hidden_size,
            self.num_layers,
            self.bias,
            self.batch_first,
            self.dropout,
            self.proj_size,
        )

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> LSTM:
        """Sample an :class:`LSTM` with PyTorch's default initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The layer.
        """
        weights = _sample_weights(4, self, generator, device, dtype)
        return LSTM(weights, batch_first=self.batch_first, dropout=float(self.dropout))


@dataclasses.dataclass(frozen=True)
class GRUSpec:
    """The spec of :class:`GRU`, with ``torch.nn.GRU``'s arguments, names and defaults.

    ``sample`` initialises as PyTorch does; with the same seed the weights equal
    ``torch.nn.GRU``'s bit for bit.

    Attributes:
        input_size: the number of input features.
        hidden_size: the number of hidden features.
        num_layers: the number of stacked layers.
        bias: whether the layers have biases.
        batch_first: input and output are ``[batch, seq, feature]``.
        dropout: the dropout probability on the outputs of every layer but the last, in
            training mode.
        bidirectional: whether each layer also runs backwards in time.

    Raises:
        ValueError: a size or ``dropout`` is out of range.
        TypeError: a size is not an int, or ``bias``/``batch_first`` not a bool.

    Warns:
        UserWarning: ``dropout > 0`` with one layer (it has no effect), as torch.nn warns.

    Example:
        >>> gru = sample(GRUSpec(3, 4, bias=False))
        >>> [name for name, _ in named_parameters(gru)]
        ['weight_ih_l0', 'weight_hh_l0']
    """

    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False

    def __post_init__(self) -> None:
        _check_spec(
            "GRUSpec",
            self.input_size,
            self.hidden_size,
            self.num_layers,
            self.bias,
            self.batch_first,
            self.dropout,
        )

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> GRU:
        """Sample a :class:`GRU` with PyTorch's default initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The layer.
        """
        weights = _sample_weights(3, self, generator, device, dtype)
        return GRU(weights, batch_first=self.batch_first, dropout=float(self.dropout))
