"""Convolutions: ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` with their specs.

Hasktorch's ``Torch.NN`` convolutions with PyTorch's arguments and initialisation. The weight
is drawn as ``torch.nn``'s is (kaiming-uniform with ``a=sqrt(5)``, fan-in
``in_channels / groups * prod(kernel_size)``), which is not Hasktorch's fan-in.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

import torch
import torch.nn.functional as F

from diffprog import DeviceLike, Parameter, Parameterized, init_parameter

__all__ = [
    "Conv1d",
    "Conv1dSpec",
    "Conv2d",
    "Conv2dSpec",
    "Conv3d",
    "Conv3dSpec",
    "ConvTranspose1d",
    "ConvTranspose1dSpec",
    "ConvTranspose2d",
    "ConvTranspose2dSpec",
    "ConvTranspose3d",
    "ConvTranspose3dSpec",
    "PaddingMode",
]

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
"""How a convolution pads its input: torch.nn's ``padding_mode`` values."""

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_PADDING_STRINGS = ("same", "valid")

_CONV: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T: dict[int, Callable[..., torch.Tensor]] = {
    1: F.conv_transpose1d,
    2: F.conv_transpose2d,
    3: F.conv_transpose3d,
}


def _ints(owner: str, name: str, value: object, n: int, minimum: int = 1) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ``n`` ints, each ``>= minimum``) as a tuple."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        if isinstance(value, Sequence):
            out = tuple(operator.index(v) for v in value)
        else:
            out = (operator.index(value),) * n  # type: ignore[arg-type]
    except TypeError:
        out = ()
    if len(out) != n:
        raise ValueError(
            f"{owner}: {name} must be an int or a tuple of {n} ints, got {value!r}. "
            f"Pass e.g. {name}=1 or {name}={(1,) * n}."
        )
    if any(v < minimum for v in out):
        raise ValueError(f"{owner}: {name} must be at least {minimum}, got {value!r}.")
    return out


def _hyper(
    owner: str,
    n: int,
    transposed: bool,
    *,
    stride: object,
    padding: object,
    dilation: object,
    groups: int,
    padding_mode: str,
    output_padding: object = 0,
) -> dict[str, Any]:
    """Check and normalise a convolution's hyper-parameters, as torch.nn's constructor does."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"{owner}: groups must be a positive integer, got {groups!r}.")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(
            f"{owner}: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}."
        )
    strides = _ints(owner, "stride", stride, n)
    out: dict[str, Any] = {
        "stride": strides,
        "dilation": _ints(owner, "dilation", dilation, n),
        "groups": groups,
        "padding_mode": padding_mode,
    }
    if transposed:
        if padding_mode != "zeros":
            raise ValueError(
                f'{owner}: only padding_mode="zeros" is supported for transposed convolutions '
                f"(as in torch.nn), got {padding_mode!r}."
            )
        if isinstance(padding, str):
            raise ValueError(
                f"{owner}: padding must be an int or a tuple of {n} ints, got {padding!r}; "
                "transposed convolutions have no 'same'/'valid' padding. To get a given "
                "output size, pass output_size when calling the layer."
            )
        out["output_padding"] = _ints(owner, "output_padding", output_padding, n, minimum=0)
        out["padding"] = _ints(owner, "padding", padding, n, minimum=0)
    elif isinstance(padding, str):
        if padding not in _PADDING_STRINGS:
            raise ValueError(
                f"{owner}: invalid padding string {padding!r}; use 'same', 'valid', an int "
                f"or a tuple of {n} ints."
            )
        if padding == "same" and any(s != 1 for s in strides):
            raise ValueError(
                f"{owner}: padding='same' is not supported for strided convolutions "
                f"(stride={strides}); pad explicitly with an int or tuple instead."
            )
        out["padding"] = padding
    else:
        out["padding"] = _ints(owner, "padding", padding, n, minimum=0)
    return out


class _ConvNd(Parameterized):
    """What the convolutions share: the fields, their checks and the properties."""

    weight: Parameter
    bias: Parameter | None = None
    stride: tuple[int, ...] = (1,)
    padding: str | tuple[int, ...] = (0,)
    dilation: tuple[int, ...] = (1,)
    groups: int = 1
    padding_mode: PaddingMode = "zeros"

    _dims: ClassVar[int] = 1
    _transposed: ClassVar[bool] = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        n = self._dims
        if not isinstance(self.weight, torch.Tensor) or self.weight.dim() != n + 2:
            layout = (
                "in_channels, out_channels/groups"
                if self._transposed
                else ("out_channels, in_channels/groups")
            )
            got = tuple(self.weight.shape) if isinstance(self.weight, torch.Tensor) else None
            raise ValueError(
                f"{owner}: weight must be a tensor of {n + 2} dimensions "
                f"[{layout}, *kernel_size], got shape {got}."
            )
        extra = {"output_padding": getattr(self, "output_padding", 0)} if self._transposed else {}
        hyper = _hyper(
            owner,
            n,
            self._transposed,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
            **extra,
        )
        for name, value in hyper.items():
            object.__setattr__(self, name, value)
        if self.weight.shape[0] % self.groups != 0:
            what = "in_channels" if self._transposed else "out_channels"
            raise ValueError(
                f"{owner}: {what} (weight.shape[0] = {self.weight.shape[0]}) must be divisible "
                f"by groups = {self.groups}."
            )
        if self.bias is not None and tuple(self.bias.shape) != (self.out_channels,):
            raise ValueError(
                f"{owner}: bias must have shape ({self.out_channels},) (out_channels), got "
                f"{tuple(self.bias.shape)}."
            )

    @property
    def in_channels(self) -> int:
        """The number of input channels, as torch.nn's attribute (derived from ``weight``)."""
        if self._transposed:
            return int(self.weight.shape[0])
        return int(self.weight.shape[1]) * self.groups

    @property
    def out_channels(self) -> int:
        """The number of output channels, as torch.nn's attribute (derived from ``weight``)."""
        if self._transposed:
            return int(self.weight.shape[1]) * self.groups
        return int(self.weight.shape[0])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """The kernel's spatial size, as torch.nn's attribute (``weight.shape[2:]``)."""
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def transposed(self) -> bool:
        """Whether this is a transposed convolution, as torch.nn's attribute."""
        return self._transposed


class _Conv(_ConvNd):
    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        """Convolve ``input``, as the torch.nn layer's ``forward``.

        Args:
            input: ``[N, C_in, *spatial]``, or unbatched ``[C_in, *spatial]``.

        Returns:
            ``[N, C_out, *spatial_out]`` (unbatched: ``[C_out, *spatial_out]``).

        Raises:
            RuntimeError: ``input`` has the wrong number of dimensions or channels (from torch).

        Example:
            >>> conv = sample(Conv2dSpec(3, 4, kernel_size=3, stride=2))
            >>> conv(torch.randn(2, 3, 9, 9)).shape, conv(torch.randn(3, 9, 9)).shape
            (torch.Size([2, 4, 4, 4]), torch.Size([4, 4, 4]))
        """
        conv = _CONV[self._dims]
        if self.padding_mode != "zeros":
            padded = F.pad(input, _reversed_padding(self), mode=self.padding_mode)
            return conv(padded, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


def _reversed_padding(layer: _ConvNd) -> list[int]:
    """The amounts ``F.pad`` takes (last dimension first, before and after), as torch.nn's."""
    kernel = layer.kernel_size
    padding = layer.padding
    if not isinstance(padding, str):
        return [p for p in reversed(padding) for _ in range(2)]
    if padding == "valid":
        return [0, 0] * len(kernel)
    out: list[int] = []  # "same": the total d * (k - 1), the odd one more on the right
    for d, k in zip(reversed(layer.dilation), reversed(kernel), strict=True):
        total = d * (k - 1)
        out += [total // 2, total - total // 2]
    return out


class Conv1d(_Conv):
    """A 1-d convolution over ``[N, C_in, L]`` (or ``[C_in, L]``), as ``torch.nn.Conv1d``.

    Attributes:
        weight: ``[out_channels, in_channels / groups, kernel_size]``.
        bias: ``[out_channels]``, or ``None``.
        stride, padding, dilation: tuples of one int; ``padding`` may be ``"same"`` or
            ``"valid"``.
        groups: blocked connections from input to output channels.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Example:
        >>> conv = sample(Conv1dSpec(4, 8, kernel_size=3, padding=1))
        >>> conv
        Conv1d(
          weight=f32[8,4,3],
          bias=f32[8],
          stride=(1,),
          padding=(1,),
          dilation=(1,),
          groups=1,
          padding_mode='zeros',
        )
        >>> conv(torch.randn(2, 4, 10)).shape
        torch.Size([2, 8, 10])
    """

    stride: tuple[int, ...] = (1,)
    padding: str | tuple[int, ...] = (0,)
    dilation: tuple[int, ...] = (1,)
    _dims: ClassVar[int] = 1


class Conv2d(_Conv):
    """A 2-d convolution over ``[N, C_in, H, W]`` (or ``[C_in, H, W]``), as ``torch.nn.Conv2d``.

    Attributes:
        weight: ``[out_channels, in_channels / groups, kH, kW]``.
        bias: ``[out_channels]``, or ``None``.
        stride, padding, dilation: tuples of two ints; ``padding`` may be ``"same"`` or
            ``"valid"``.
        groups: blocked connections from input to output channels.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Example:
        >>> conv = sample(Conv2dSpec(in_channels=1, out_channels=8, kernel_size=3, padding=1))
        >>> conv.kernel_size, conv.padding, conv.in_channels, conv.out_channels
        ((3, 3), (1, 1), 1, 8)
        >>> conv(torch.randn(5, 1, 28, 28)).shape
        torch.Size([5, 8, 28, 28])
    """

    stride: tuple[int, ...] = (1, 1)
    padding: str | tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    _dims: ClassVar[int] = 2


class Conv3d(_Conv):
    """A 3-d convolution over ``[N, C_in, D, H, W]`` (or unbatched), as ``torch.nn.Conv3d``.

    Attributes:
        weight: ``[out_channels, in_channels / groups, kD, kH, kW]``.
        bias: ``[out_channels]``, or ``None``.
        stride, padding, dilation: tuples of three ints; ``padding`` may be ``"same"`` or
            ``"valid"``.
        groups: blocked connections from input to output channels.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Example:
        >>> conv = sample(Conv3dSpec(2, 4, kernel_size=(1, 3, 3), padding="same"))
        >>> conv(torch.randn(1, 2, 4, 6, 6)).shape
        torch.Size([1, 4, 4, 6, 6])
    """

    stride: tuple[int, ...] = (1, 1, 1)
    padding: str | tuple[int, ...] = (0, 0, 0)
    dilation: tuple[int, ...] = (1, 1, 1)
    _dims: ClassVar[int] = 3


class _ConvTranspose(_ConvNd):
    padding: tuple[int, ...] = (0,)
    output_padding: tuple[int, ...] = (0,)
    _transposed: ClassVar[bool] = True

    def __call__(
        self, input: torch.Tensor, output_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Apply the transposed convolution, as the torch.nn layer's ``forward``.

        Args:
            input: ``[N, C_in, *spatial]``, or unbatched ``[C_in, *spatial]``.
            output_size: the wanted output size (spatial dimensions, optionally with the
                leading batch and channel ones), to pick between the sizes a strided
                transposed convolution can produce; overrides ``output_padding``.

        Returns:
            ``[N, C_out, *spatial_out]`` (unbatched: ``[C_out, *spatial_out]``).

        Raises:
            ValueError: ``output_size`` has the wrong length or is out of reach.
            RuntimeError: ``input`` has the wrong number of dimensions or channels (from torch).

        Example:
            >>> up = sample(ConvTranspose1dSpec(2, 2, kernel_size=3, stride=2))
            >>> x = torch.randn(1, 2, 5)
            >>> up(x).shape, up(x, output_size=[12]).shape
            (torch.Size([1, 2, 11]), torch.Size([1, 2, 12]))
        """
        output_padding = (
            self.output_padding if output_size is None else self._output_padding(input, output_size)
        )
        return _CONV_T[self._dims](
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )

    def _output_padding(self, input: torch.Tensor, output_size: Sequence[int]) -> tuple[int, ...]:
        """The output padding that gives ``output_size`` (torch.nn's ``_output_padding``)."""
        n = self._dims
        leading = 2 if input.dim() == n + 2 else 1
        size = [int(s) for s in output_size]
        if len(size) == leading + n:
            size = size[leading:]
        if len(size) != n:
            raise ValueError(
                f"{type(self).__name__}: for {input.dim()}D input, output_size must have {n} "
                f"or {leading + n} elements (got {len(size)})."
            )
        lowest = [
            (input.size(d + leading) - 1) * self.stride[d]
            - 2 * self.padding[d]
            + self.dilation[d] * (self.kernel_size[d] - 1)
            + 1
            for d in range(n)
        ]
        highest = [low + s - 1 for low, s in zip(lowest, self.stride, strict=True)]
        if any(not lo <= s <= hi for s, lo, hi in zip(size, lowest, highest, strict=True)):
            raise ValueError(
                f"{type(self).__name__}: requested an output size of {size}, but valid sizes "
                f"range from {lowest} to {highest} (for an input of "
                f"{list(input.shape[leading:])})."
            )
        return tuple(s - lo for s, lo in zip(size, lowest, strict=True))


class ConvTranspose1d(_ConvTranspose):
    """A 1-d transposed convolution, as ``torch.nn.ConvTranspose1d``.

    The gradient of :class:`Conv1d` with respect to its input ("deconvolution").

    Attributes:
        weight: ``[in_channels, out_channels / groups, kernel_size]`` (PyTorch's layout).
        bias: ``[out_channels]``, or ``None``.
        stride, padding, output_padding, dilation: tuples of one int.
        groups: blocked connections from input to output channels.
        padding_mode: ``"zeros"`` (the only mode torch.nn supports here).

    Example:
        >>> up = sample(ConvTranspose1dSpec(4, 2, kernel_size=4, stride=2, padding=1))
        >>> up(torch.randn(3, 4, 8)).shape
        torch.Size([3, 2, 16])
    """

    stride: tuple[int, ...] = (1,)
    padding: tuple[int, ...] = (0,)
    dilation: tuple[int, ...] = (1,)
    output_padding: tuple[int, ...] = (0,)
    _dims: ClassVar[int] = 1


class ConvTranspose2d(_ConvTranspose):
    """A 2-d transposed convolution, as ``torch.nn.ConvTranspose2d``.

    Attributes:
        weight: ``[in_channels, out_channels / groups, kH, kW]`` (PyTorch's layout).
        bias: ``[out_channels]``, or ``None``.
        stride, padding, output_padding, dilation: tuples of two ints.
        groups: blocked connections from input to output channels.
        padding_mode: ``"zeros"`` (the only mode torch.nn supports here).

    Example:
        >>> up = sample(ConvTranspose2dSpec(8, 4, kernel_size=3, stride=2, padding=1))
        >>> x = torch.randn(1, 8, 7, 7)
        >>> up(x).shape, up(x, output_size=[14, 14]).shape
        (torch.Size([1, 4, 13, 13]), torch.Size([1, 4, 14, 14]))
    """

    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    output_padding: tuple[int, ...] = (0, 0)
    _dims: ClassVar[int] = 2


class ConvTranspose3d(_ConvTranspose):
    """A 3-d transposed convolution, as ``torch.nn.ConvTranspose3d``.

    Attributes:
        weight: ``[in_channels, out_channels / groups, kD, kH, kW]`` (PyTorch's layout).
        bias: ``[out_channels]``, or ``None``.
        stride, padding, output_padding, dilation: tuples of three ints.
        groups: blocked connections from input to output channels.
        padding_mode: ``"zeros"`` (the only mode torch.nn supports here).

    Example:
        >>> up = sample(ConvTranspose3dSpec(2, 2, kernel_size=2, stride=2))
        >>> up(torch.randn(1, 2, 3, 3, 3)).shape
        torch.Size([1, 2, 6, 6, 6])
    """

    stride: tuple[int, ...] = (1, 1, 1)
    padding: tuple[int, ...] = (0, 0, 0)
    dilation: tuple[int, ...] = (1, 1, 1)
    output_padding: tuple[int, ...] = (0, 0, 0)
    _dims: ClassVar[int] = 3


C = TypeVar("C", bound=_ConvNd)


def _sample(
    spec: _ConvSpec[Any] | _ConvTransposeSpec[Any],
    cls: type[C],
    generator: torch.Generator | None,
    device: DeviceLike,
    dtype: torch.dtype | None,
) -> C:
    """Draw a convolution as torch.nn's ``_ConvNd.reset_parameters`` does."""
    owner = type(spec).__name__
    n = cls._dims
    transposed = cls._transposed
    groups = spec.groups
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"{owner}: groups must be a positive integer, got {groups!r}.")
    for name in ("in_channels", "out_channels"):
        channels = getattr(spec, name)
        if channels % groups != 0:
            raise ValueError(
                f"{owner}: {name} = {channels} must be divisible by groups = {groups}."
            )
    extra = {"output_padding": spec.output_padding} if isinstance(spec, _ConvTransposeSpec) else {}
    hyper = _hyper(
        owner,
        n,
        transposed,
        stride=spec.stride,
        padding=spec.padding,
        dilation=spec.dilation,
        groups=groups,
        padding_mode=spec.padding_mode,
        **extra,
    )
    kernel = _ints(owner, "kernel_size", spec.kernel_size, n)
    if transposed:
        shape = (spec.in_channels, spec.out_channels // groups, *kernel)
    else:
        shape = (spec.out_channels, spec.in_channels // groups, *kernel)
    kw: dict[str, Any] = {"generator": generator, "device": device, "dtype": dtype}
    weight = init_parameter(
        shape,
        lambda t, g: torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g),
        **kw,
    )
    bias = None
    if spec.bias:
        fan_in = shape[1] * math.prod(kernel)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        bias = init_parameter(
            (spec.out_channels,),
            lambda t, g: torch.nn.init.uniform_(t, -bound, bound, generator=g),
            **kw,
        )
    return cls(weight, bias, **hyper)


class _Samples(Generic[C]):
    """What the conv and transposed-conv specs share: ``sample``, for the layer class each
    sets in ``_layer``."""

    _layer: ClassVar[type[_ConvNd]]

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> C:
        """Sample the layer with PyTorch's default initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The layer, its int arguments made tuples (``kernel_size=3`` -> ``(3, 3)``).

        Raises:
            ValueError: ``groups`` does not divide the channels, a size has the wrong
                length, an unknown padding string or mode, ``padding="same"`` with a
                stride.
        """
        spec = cast("_ConvSpec[C] | _ConvTransposeSpec[C]", self)
        return _sample(spec, cast("type[C]", self._layer), generator, device, dtype)


@dataclasses.dataclass(frozen=True)
class _ConvSpec(_Samples[C]):
    """``torch.nn.ConvNd``'s constructor arguments, shared by the three specs."""

    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, ...]
    stride: int | tuple[int, ...] = 1
    padding: str | int | tuple[int, ...] = 0
    dilation: int | tuple[int, ...] = 1
    groups: int = 1
    bias: bool = True
    padding_mode: PaddingMode = "zeros"


@dataclasses.dataclass(frozen=True)
class _ConvTransposeSpec(_Samples[C]):
    """``torch.nn.ConvTransposeNd``'s constructor arguments, in its order."""

    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, ...]
    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] = 0
    output_padding: int | tuple[int, ...] = 0
    groups: int = 1
    bias: bool = True
    dilation: int | tuple[int, ...] = 1
    padding_mode: PaddingMode = "zeros"


@dataclasses.dataclass(frozen=True)
class Conv1dSpec(_ConvSpec[Conv1d]):
    """The spec of :class:`Conv1d`, with ``torch.nn.Conv1d``'s arguments and defaults.

    With the same seed, ``sample`` gives ``torch.nn.Conv1d``'s weights bit for bit.

    Attributes:
        in_channels: the number of input channels.
        out_channels: the number of output channels.
        kernel_size: the kernel's size: an int for every dimension, or one per dimension.
        stride: the step of the kernel (int or tuple).
        padding: zeros (or ``padding_mode``) added to both sides: an int or tuple, ``"same"``
            (output size = input size; stride 1 only) or ``"valid"`` (none).
        dilation: the spacing between kernel elements (int or tuple).
        groups: blocked connections from input to output channels (divides both counts).
        bias: whether the layer has a bias.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> reference = torch.nn.Conv1d(2, 4, 3)
        >>> ours = sample(Conv1dSpec(2, 4, 3), generator=torch.Generator().manual_seed(0))
        >>> torch.equal(ours.weight, reference.weight), torch.equal(ours.bias, reference.bias)
        (True, True)
    """

    _layer = Conv1d


@dataclasses.dataclass(frozen=True)
class Conv2dSpec(_ConvSpec[Conv2d]):
    """The spec of :class:`Conv2d`, with ``torch.nn.Conv2d``'s arguments and defaults.

    With the same seed, ``sample`` gives ``torch.nn.Conv2d``'s weights bit for bit.

    Attributes:
        in_channels: the number of input channels.
        out_channels: the number of output channels.
        kernel_size: the kernel's size: an int for every dimension, or one per dimension.
        stride: the step of the kernel (int or tuple).
        padding: zeros (or ``padding_mode``) added to both sides: an int or tuple, ``"same"``
            (output size = input size; stride 1 only) or ``"valid"`` (none).
        dilation: the spacing between kernel elements (int or tuple).
        groups: blocked connections from input to output channels (divides both counts).
        bias: whether the layer has a bias.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Example:
        >>> spec = Conv2dSpec(in_channels=1, out_channels=8, kernel_size=3, padding=1)
        >>> _ = torch.manual_seed(0)
        >>> reference = torch.nn.Conv2d(1, 8, 3, padding=1)
        >>> ours = sample(spec, generator=torch.Generator().manual_seed(0))
        >>> torch.equal(ours.weight, reference.weight), torch.equal(ours.bias, reference.bias)
        (True, True)
    """

    _layer = Conv2d


@dataclasses.dataclass(frozen=True)
class Conv3dSpec(_ConvSpec[Conv3d]):
    """The spec of :class:`Conv3d`, with ``torch.nn.Conv3d``'s arguments and defaults.

    With the same seed, ``sample`` gives ``torch.nn.Conv3d``'s weights bit for bit.

    Attributes:
        in_channels: the number of input channels.
        out_channels: the number of output channels.
        kernel_size: the kernel's size: an int for every dimension, or one per dimension.
        stride: the step of the kernel (int or tuple).
        padding: zeros (or ``padding_mode``) added to both sides: an int or tuple, ``"same"``
            (output size = input size; stride 1 only) or ``"valid"`` (none).
        dilation: the spacing between kernel elements (int or tuple).
        groups: blocked connections from input to output channels (divides both counts).
        bias: whether the layer has a bias.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Example:
        >>> depthwise = sample(Conv3dSpec(3, 6, kernel_size=(1, 3, 3), groups=3, bias=False))
        >>> depthwise.weight.shape, depthwise.bias
        (torch.Size([6, 1, 1, 3, 3]), None)
    """

    _layer = Conv3d


@dataclasses.dataclass(frozen=True)
class ConvTranspose1dSpec(_ConvTransposeSpec[ConvTranspose1d]):
    """The spec of :class:`ConvTranspose1d`, with ``torch.nn.ConvTranspose1d``'s arguments.

    With the same seed, ``sample`` gives ``torch.nn.ConvTranspose1d``'s weights bit for bit
    (the fan-in is taken from the weight's second dimension, ``out_channels / groups``, as
    torch.nn does).

    Attributes:
        in_channels: the number of input channels.
        out_channels: the number of output channels.
        kernel_size: the kernel's size: an int for every dimension, or one per dimension.
        stride: the step of the kernel (int or tuple).
        padding: ``dilation * (kernel_size - 1) - padding`` zeros are added to both sides of
            the input (int or tuple).
        output_padding: extra size added to one side of the output (int or tuple; smaller
            than ``stride`` or ``dilation``).
        groups: blocked connections from input to output channels (divides both counts).
        bias: whether the layer has a bias.
        dilation: the spacing between kernel elements (int or tuple).
        padding_mode: only ``"zeros"``, as in torch.nn.

    Example:
        >>> sample(ConvTranspose1dSpec(4, 2, kernel_size=3)).weight.shape
        torch.Size([4, 2, 3])
    """

    _layer = ConvTranspose1d


@dataclasses.dataclass(frozen=True)
class ConvTranspose2dSpec(_ConvTransposeSpec[ConvTranspose2d]):
    """The spec of :class:`ConvTranspose2d`, with ``torch.nn.ConvTranspose2d``'s arguments.

    With the same seed, ``sample`` gives ``torch.nn.ConvTranspose2d``'s weights bit for bit.

    Attributes:
        in_channels: the number of input channels.
        out_channels: the number of output channels.
        kernel_size: the kernel's size: an int for every dimension, or one per dimension.
        stride: the step of the kernel (int or tuple).
        padding: ``dilation * (kernel_size - 1) - padding`` zeros are added to both sides of
            the input (int or tuple).
        output_padding: extra size added to one side of the output (int or tuple; smaller
            than ``stride`` or ``dilation``).
        groups: blocked connections from input to output channels (divides both counts).
        bias: whether the layer has a bias.
        dilation: the spacing between kernel elements (int or tuple).
        padding_mode: only ``"zeros"``, as in torch.nn.

    Example:
        >>> sample(ConvTranspose2dSpec(8, 4, kernel_size=2, stride=2)).stride
        (2, 2)
    """

    _layer = ConvTranspose2d


@dataclasses.dataclass(frozen=True)
class ConvTranspose3dSpec(_ConvTransposeSpec[ConvTranspose3d]):
    """The spec of :class:`ConvTranspose3d`, with ``torch.nn.ConvTranspose3d``'s arguments.

    With the same seed, ``sample`` gives ``torch.nn.ConvTranspose3d``'s weights bit for bit.

    Attributes:
        in_channels: the number of input channels.
        out_channels: the number of output channels.
        kernel_size: the kernel's size: an int for every dimension, or one per dimension.
        stride: the step of the kernel (int or tuple).
        padding: ``dilation * (kernel_size - 1) - padding`` zeros are added to both sides of
            the input (int or tuple).
        output_padding: extra size added to one side of the output (int or tuple; smaller
            than ``stride`` or ``dilation``).
        groups: blocked connections from input to output channels (divides both counts).
        bias: whether the layer has a bias.
        dilation: the spacing between kernel elements (int or tuple).
        padding_mode: only ``"zeros"``, as in torch.nn.

    Example:
        >>> sample(ConvTranspose3dSpec(2, 4, kernel_size=3), device="meta").weight.shape
        torch.Size([2, 4, 3, 3, 3])
    """

    _layer = ConvTranspose3d
