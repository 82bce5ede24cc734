"""Normalisation layers: BatchNorm, InstanceNorm, LayerNorm, GroupNorm and RMSNorm.

BatchNorm (and InstanceNorm with ``track_running_stats=True``) keep running statistics. They
follow the stateful-layer pattern of :mod:`diffprog.nn._state`: outside a
:func:`diffprog.nn.training` pass they normalise with the running statistics (PyTorch's eval
mode); inside one they normalise with the batch statistics and record the layer with its new
running statistics, which ``training`` hands back. The layer given is never changed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import ClassVar, Generic, TypeVar, cast

import torch
import torch.nn.functional as F

from diffprog import DeviceLike, Parameter, Parameterized, init_parameter
from diffprog.nn._state import current, is_training, record, warn_unless_mode_chosen

__all__ = [
    "BatchNorm1d",
    "BatchNorm1dSpec",
    "BatchNorm2d",
    "BatchNorm2dSpec",
    "BatchNorm3d",
    "BatchNorm3dSpec",
    "GroupNorm",
    "GroupNormSpec",
    "InstanceNorm1d",
    "InstanceNorm1dSpec",
    "InstanceNorm2d",
    "InstanceNorm2dSpec",
    "InstanceNorm3d",
    "InstanceNorm3dSpec",
    "LayerNorm",
    "LayerNormSpec",
    "RMSNorm",
    "RMSNormSpec",
]

N = TypeVar("N", bound="_NormBase")

# The functional form of batch normalisation: it returns the new running statistics instead of
# writing them into the tensors passed in (as F.batch_norm does). Same kernel, so the same
# numbers as torch.nn's layers bit for bit; it also works under torch.func.vmap.
_batch_norm_functional = torch.ops.aten._native_batch_norm_legit_functional.default
# What evaluation mode does in a norm with running statistics (for the ModeWarning).
_RUNNING = "normalised with the running statistics, which are not updated"


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(d) for d in normalized_shape)


def _filled(
    shape: tuple[int, ...], value: float, device: DeviceLike, dtype: torch.dtype | None
) -> Parameter:
    """A Parameter of ones or zeros, by ``torch.nn.init.ones_``/``zeros_`` as torch.nn's."""
    fill = torch.nn.init.ones_ if value == 1.0 else torch.nn.init.zeros_
    return init_parameter(shape, lambda t, g: fill(t), device=device, dtype=dtype)


def _affine(
    num_features: int, affine: bool, bias: bool, device: DeviceLike, dtype: torch.dtype | None
) -> tuple[Parameter | None, Parameter | None]:
    if not affine:
        return None, None
    weight = _filled((num_features,), 1.0, device, dtype)
    return weight, (_filled((num_features,), 0.0, device, dtype) if bias else None)


def _running_stats(
    num_features: int, track: bool, device: DeviceLike, dtype: torch.dtype | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    if not track:
        return None, None, None
    return (
        torch.zeros(num_features, device=device, dtype=dtype),
        torch.ones(num_features, device=device, dtype=dtype),
        torch.tensor(0, dtype=torch.long, device=device),
    )


# --------------------------------------------------------------------------------------------
# BatchNorm and InstanceNorm
# --------------------------------------------------------------------------------------------


class _NormBase(Parameterized):
    """Fields and checks shared by BatchNorm and InstanceNorm (torch's ``_NormBase``)."""

    num_features: int
    weight: Parameter | None = None
    bias: Parameter | None = None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    num_batches_tracked: torch.Tensor | None = None
    eps: float = 1e-5
    momentum: float | None = 0.1

    # The input ranks the layer accepts, and the rank of an unbatched input (0: none).
    _ranks: ClassVar[tuple[int, ...]] = ()
    _unbatched_rank: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if (self.running_mean is None) != (self.running_var is None):
            raise ValueError(
                f"{type(self).__name__} needs both running_mean and running_var, or neither "
                "(track_running_stats=False)."
            )
        if self.bias is not None and self.weight is None:
            raise ValueError(
                f"{type(self).__name__} has a bias but no weight; affine=False has neither."
            )

    @property
    def affine(self) -> bool:
        """Whether the layer has a learnable weight (torch's ``affine``)."""
        return self.weight is not None

    @property
    def track_running_stats(self) -> bool:
        """Whether the layer keeps running statistics (torch's ``track_running_stats``)."""
        return self.running_mean is not None

    def _check_input(self, input: torch.Tensor) -> None:
        if input.dim() not in self._ranks:
            expected = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(
                f"{type(self).__name__} expected {expected} input (got {input.dim()}D input)."
            )

    def _with_stats(
        self: N,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        num_batches_tracked: torch.Tensor | None,
    ) -> N:
        return dataclasses.replace(
            self,
            running_mean=running_mean,
            running_var=running_var,
            num_batches_tracked=num_batches_tracked,
        )


def _values_per_channel(input: torch.Tensor, batch_counts: bool) -> int:
    size = input.shape[0] if batch_counts else 1
    for d in input.shape[2:]:
        size *= d
    return size


class _BatchNorm(_NormBase):
    """Batch normalisation over dimension 1 (channels); see :class:`BatchNorm1d`."""

    def __call__(self, input: torch.Tensor, *, training: bool | None = None) -> torch.Tensor:
        """Normalise ``input`` over all dimensions but the channel dimension 1.

        Args:
            input: ``[N, C]``/``[N, C, L]`` (1d), ``[N, C, H, W]`` (2d), ``[N, C, D, H, W]`` (3d).
            training: ``None`` (the default) follows :func:`diffprog.nn.is_training`;
                ``False`` forces evaluation (e.g. a frozen BatchNorm inside a training pass);
                ``True`` forces batch statistics (outside a pass the new running statistics
                are then dropped, there being no pass to hand them to).

        Returns:
            The normalised input, of its shape. In a training pass the layer also records
            itself with updated running statistics (see :func:`diffprog.nn.training`).

        Raises:
            ValueError: the input's rank is wrong, its channel count is not ``num_features``, or
                a training batch has a single value per channel.
        """
        self._check_input(input)
        if (self.weight is not None or self.running_mean is not None) and (
            input.shape[1] != self.num_features
        ):
            raise ValueError(
                f"{type(self).__name__}(num_features={self.num_features}) got an input with "
                f"{input.shape[1]} channels at dimension 1; shape {tuple(input.shape)}."
            )
        if training is None:
            training = is_training()
            if not training and self.running_mean is not None:
                warn_unless_mode_chosen(self, _RUNNING, (input, self.weight, self.bias))
        if not training:
            # Eval: the running statistics, or the batch's when there are none.
            return F.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                self.running_mean is None,
                0.0,
                self.eps,
            )
        if _values_per_channel(input, True) == 1:
            raise ValueError(
                f"{type(self).__name__} expected more than 1 value per channel when training, "
                f"got input size {tuple(input.shape)}."
            )
        if self.running_mean is None or not is_training():  # no state, or nowhere to keep it
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        layer = current(self)
        assert layer.running_mean is not None
        assert layer.running_var is not None
        count = layer.num_batches_tracked
        factor = 0.0 if self.momentum is None else self.momentum
        if count is not None:
            count = count + 1
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(count)
        output, _, _, mean, var = _batch_norm_functional(
            input,
            self.weight,
            self.bias,
            layer.running_mean,
            layer.running_var,
            True,
            factor,
            self.eps,
        )
        record(self, layer._with_stats(mean.detach(), var.detach(), count))
        result: torch.Tensor = output
        return result


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of ``[N, C]`` or ``[N, C, L]`` input: ``torch.nn.BatchNorm1d``.

    Outside :func:`diffprog.nn.training` (eval mode) it normalises with the running statistics;
    inside it uses the batch's statistics and records itself with updated running statistics,
    which ``training`` returns in the updated model (the layer itself never changes). The
    keyword ``training=`` overrides the mode (``False``: a frozen layer inside a pass).

    Attributes:
        num_features: ``C``.
        weight, bias: ``[C]`` Parameters, or ``None`` (``affine=False``; ``bias=False``).
        running_mean, running_var: ``[C]`` constant tensors, or ``None``
            (``track_running_stats=False``: batch statistics in eval mode too).
        num_batches_tracked: a 0-d ``long`` tensor counting training batches, or ``None``.
        eps: added to the variance.
        momentum: the running statistics' update factor; ``None`` for a cumulative average.

    Example:
        >>> bn = sample(BatchNorm1dSpec(3))
        >>> x = torch.randn(16, 3)
        >>> y, bn2 = dp.nn.training(lambda m, x: m(x), bn, x)
        >>> bn2.num_batches_tracked.item(), bn.num_batches_tracked.item()
        (1, 0)
        >>> torch.allclose(bn2.running_mean, 0.1 * x.mean(0))
        True
    """

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of ``[N, C, H, W]`` input: ``torch.nn.BatchNorm2d``.

    Fields and training behaviour as :class:`BatchNorm1d`.

    Example:
        >>> bn = sample(BatchNorm2dSpec(4))
        >>> with dp.nn.evaluating():  # explicit eval mode: the running statistics
        ...     bn(torch.randn(2, 4, 5, 5)).shape
        torch.Size([2, 4, 5, 5])
    """

    _ranks = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch normalisation of ``[N, C, D, H, W]`` input: ``torch.nn.BatchNorm3d``.

    Fields and training behaviour as :class:`BatchNorm1d`.

    Example:
        >>> bn = sample(BatchNorm3dSpec(2))
        >>> with dp.nn.evaluating():  # explicit eval mode: the running statistics
        ...     bn(torch.randn(2, 2, 3, 3, 3)).shape
        torch.Size([2, 2, 3, 3, 3])
    """

    _ranks = (5,)


class _InstanceNorm(_NormBase):
    """Instance normalisation (each sample and channel apart); see :class:`InstanceNorm1d`."""

    def __call__(self, input: torch.Tensor, *, training: bool | None = None) -> torch.Tensor:
        """Normalise each channel of each sample over its spatial dimensions.

        Args:
            input: ``[N, C, *spatial]``, or unbatched ``[C, *spatial]``.
            training: as for :class:`BatchNorm1d`; it matters only with running statistics.

        Returns:
            The normalised input, of its shape. With running statistics, a training pass also
            records the layer with updated ones (see :func:`diffprog.nn.training`).

        Raises:
            ValueError: the input's rank is wrong, its channel count is not ``num_features``
                (with ``affine`` or running statistics), or a training input has a single
                spatial element.
        """
        self._check_input(input)
        unbatched = input.dim() == self._unbatched_rank
        channel_dim = 0 if unbatched else 1
        if input.shape[channel_dim] != self.num_features:
            message = (
                f"{type(self).__name__}(num_features={self.num_features}) got an input with "
                f"{input.shape[channel_dim]} channels at dimension {channel_dim}; shape "
                f"{tuple(input.shape)}."
            )
            if self.weight is not None or self.running_mean is not None:
                raise ValueError(message)
            warnings.warn(
                message + " num_features is unused without affine or running statistics.",
                stacklevel=2,
            )
        if unbatched:
            input = input.unsqueeze(0)
        if training is None:
            training = is_training()
            if not training and self.running_mean is not None:
                warn_unless_mode_chosen(self, _RUNNING, (input, self.weight, self.bias))
        output = self._normalise(input, training)
        return output.squeeze(0) if unbatched else output

    def _normalise(self, input: torch.Tensor, training: bool) -> torch.Tensor:
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.running_mean is None or not training:
            running_mean, running_var = self.running_mean, self.running_var
            if running_mean is not None and running_var is not None:
                # F.instance_norm writes (the mean of copies of) them back: pass copies.
                running_mean, running_var = running_mean.clone(), running_var.clone()
            return F.instance_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                self.running_mean is None or training,
                momentum,
                self.eps,
            )
        if _values_per_channel(input, False) == 1:
            raise ValueError(
                f"{type(self).__name__} expected more than 1 spatial element when training, "
                f"got input size {tuple(input.shape)}."
            )
        layer = current(self)
        assert layer.running_mean is not None
        assert layer.running_var is not None
        # As ATen's instance_norm: batch norm of [1, N*C, ...] with the statistics repeated
        # N times, then the running statistics averaged back over the N copies.
        n, c = input.shape[0], input.shape[1]
        output, _, _, mean, var = _batch_norm_functional(
            input.contiguous().view(1, n * c, *input.shape[2:]),
            None if self.weight is None else self.weight.repeat(n),
            None if self.bias is None else self.bias.repeat(n),
            layer.running_mean.repeat(n),
            layer.running_var.repeat(n),
            True,
            momentum,
            self.eps,
        )
        mean = mean.detach().view(n, c).mean(0)
        var = var.detach().view(n, c).mean(0)
        record(self, layer._with_stats(mean, var, layer.num_batches_tracked))
        result: torch.Tensor = output.view(input.shape)
        return result


class InstanceNorm1d(_InstanceNorm):
    """Instance normalisation of ``[N, C, L]`` or ``[C, L]`` input: ``torch.nn.InstanceNorm1d``.

    Each sample's channels are normalised over their own length. By default there is neither
    an affine map nor running statistics (``InstanceNormSpec``'s defaults, as torch's); with
    ``track_running_stats=True`` it follows :class:`BatchNorm1d`'s pattern: running statistics
    outside :func:`diffprog.nn.training`, updated ones recorded inside (``num_batches_tracked``
    is kept but, as in torch, not counted).

    Example:
        >>> norm = sample(InstanceNorm1dSpec(3))
        >>> y = norm(torch.randn(2, 3, 10))
        >>> torch.allclose(y.mean(-1), torch.zeros(2, 3), atol=1e-6)
        True
    """

    _ranks = (2, 3)
    _unbatched_rank = 2


class InstanceNorm2d(_InstanceNorm):
    """Instance normalisation of ``[N, C, H, W]`` or ``[C, H, W]`` input.

    As ``torch.nn.InstanceNorm2d``; fields and behaviour as :class:`InstanceNorm1d`.

    Example:
        >>> sample(InstanceNorm2dSpec(3, affine=True))(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """

    _ranks = (3, 4)
    _unbatched_rank = 3


class InstanceNorm3d(_InstanceNorm):
    """Instance normalisation of ``[N, C, D, H, W]`` or ``[C, D, H, W]`` input.

    As ``torch.nn.InstanceNorm3d``; fields and behaviour as :class:`InstanceNorm1d`.

    Example:
        >>> sample(InstanceNorm3dSpec(2))(torch.randn(2, 3, 3, 3)).shape
        torch.Size([2, 3, 3, 3])
    """

    _ranks = (4, 5)
    _unbatched_rank = 4


@dataclasses.dataclass(frozen=True)
class _NormSpec(Generic[N]):
    num_features: int
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    bias: bool = dataclasses.field(default=True, kw_only=True)

    _layer: ClassVar[type[_NormBase]]

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> N:
        """Build the layer with PyTorch's initialisation (no randomness: ``generator`` is unused).

        Args:
            generator: unused (the initialisation is deterministic).
            device: where the parameters and buffers live.
            dtype: their floating point dtype.

        Returns:
            The layer: weight ones, bias zeros, running mean zeros, running variance ones.
        """
        weight, bias = _affine(self.num_features, self.affine, self.bias, device, dtype)
        mean, var, count = _running_stats(
            self.num_features, self.track_running_stats, device, dtype
        )
        layer = self._layer(
            self.num_features, weight, bias, mean, var, count, self.eps, self.momentum
        )
        return cast("N", layer)


@dataclasses.dataclass(frozen=True)
class BatchNorm1dSpec(_NormSpec[BatchNorm1d]):
    """The spec of :class:`BatchNorm1d`, with ``torch.nn.BatchNorm1d``'s arguments.

    ``sample`` initialises as PyTorch does: weight ones, bias zeros, running mean zeros,
    running variance ones, ``num_batches_tracked`` 0 (no randomness).

    Example:
        >>> bn = sample(BatchNorm1dSpec(3, momentum=None, affine=False))
        >>> bn.weight, bn.running_var.tolist()
        (None, [1.0, 1.0, 1.0])
    """

    _layer = BatchNorm1d


@dataclasses.dataclass(frozen=True)
class BatchNorm2dSpec(_NormSpec[BatchNorm2d]):
    """The spec of :class:`BatchNorm2d`, with ``torch.nn.BatchNorm2d``'s arguments.

    Initialisation as :class:`BatchNorm1dSpec`.

    Example:
        >>> sample(BatchNorm2dSpec(8)).running_mean.shape
        torch.Size([8])
    """

    _layer = BatchNorm2d


@dataclasses.dataclass(frozen=True)
class BatchNorm3dSpec(_NormSpec[BatchNorm3d]):
    """The spec of :class:`BatchNorm3d`, with ``torch.nn.BatchNorm3d``'s arguments.

    Initialisation as :class:`BatchNorm1dSpec`.

    Example:
        >>> sample(BatchNorm3dSpec(8, track_running_stats=False)).running_mean is None
        True
    """

    _layer = BatchNorm3d


@dataclasses.dataclass(frozen=True)
class _InstanceNormSpec(_NormSpec[N]):
    affine: bool = False
    track_running_stats: bool = False


@dataclasses.dataclass(frozen=True)
class InstanceNorm1dSpec(_InstanceNormSpec[InstanceNorm1d]):
    """The spec of :class:`InstanceNorm1d`, with ``torch.nn.InstanceNorm1d``'s arguments.

    As torch's, ``affine`` and ``track_running_stats`` default to ``False``; initialisation as
    :class:`BatchNorm1dSpec`.

    Example:
        >>> norm = sample(InstanceNorm1dSpec(4))
        >>> norm.weight is None and norm.running_mean is None
        True
    """

    _layer = InstanceNorm1d


@dataclasses.dataclass(frozen=True)
class InstanceNorm2dSpec(_InstanceNormSpec[InstanceNorm2d]):
    """The spec of :class:`InstanceNorm2d`, with ``torch.nn.InstanceNorm2d``'s arguments.

    Defaults and initialisation as :class:`InstanceNorm1dSpec`.

    Example:
        >>> sample(InstanceNorm2dSpec(4, track_running_stats=True)).running_var.tolist()
        [1.0, 1.0, 1.0, 1.0]
    """

    _layer = InstanceNorm2d


@dataclasses.dataclass(frozen=True)
class InstanceNorm3dSpec(_InstanceNormSpec[InstanceNorm3d]):
    """The spec of :class:`InstanceNorm3d`, with ``torch.nn.InstanceNorm3d``'s arguments.

    Defaults and initialisation as :class:`InstanceNorm1dSpec`.

    Example:
        >>> sample(InstanceNorm3dSpec(4, affine=True)).weight.shape
        torch.Size([4])
    """

    _layer = InstanceNorm3d


# --------------------------------------------------------------------------------------------
# LayerNorm, GroupNorm, RMSNorm (no state)
# --------------------------------------------------------------------------------------------


class LayerNorm(Parameterized):
    """Normalise over the last dimensions, then scale and shift: ``torch.nn.LayerNorm``.

    Attributes:
        normalized_shape: the trailing shape normalised over, as a tuple.
        weight: ``normalized_shape``, or ``None`` (``elementwise_affine=False``).
        bias: ``normalized_shape``, or ``None`` (``elementwise_affine=False`` or ``bias=False``).
        eps: added to the variance for numerical stability.

    Example:
        >>> norm = sample(LayerNormSpec(4))
        >>> norm
        LayerNorm(normalized_shape=(4,), weight=f32[4], bias=f32[4], eps=1e-05)
        >>> y = norm(torch.arange(8.0).reshape(2, 4))
        >>> torch.allclose(y.mean(-1), torch.zeros(2), atol=1e-6)
        True
    """

    normalized_shape: tuple[int, ...]
    weight: Parameter | None = None
    bias: Parameter | None = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "normalized_shape", _shape(self.normalized_shape))

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` over its trailing ``normalized_shape`` dimensions.

        Args:
            input: ``[*, *normalized_shape]``.

        Returns:
            The normalised, scaled and shifted input, of its shape.
        """
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


@dataclasses.dataclass(frozen=True)
class LayerNormSpec:
    """The spec of :class:`LayerNorm`, with ``torch.nn.LayerNorm``'s arguments.

    ``sample`` initialises as PyTorch does: weight ones, bias zeros (no randomness).

    Example:
        >>> norm = sample(LayerNormSpec([2, 3], elementwise_affine=True, bias=False))
        >>> norm.weight.shape, norm.bias
        (torch.Size([2, 3]), None)
    """

    normalized_shape: int | Sequence[int]
    eps: float = 1e-5
    elementwise_affine: bool = True
    bias: bool = True

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> LayerNorm:
        """Build a :class:`LayerNorm` with PyTorch's initialisation (ones and zeros)."""
        shape = _shape(self.normalized_shape)
        weight = bias = None
        if self.elementwise_affine:
            weight = _filled(shape, 1.0, device, dtype)
            if self.bias:
                bias = _filled(shape, 0.0, device, dtype)
        return LayerNorm(shape, weight, bias, self.eps)


class GroupNorm(Parameterized):
    """Normalise groups of channels of each sample: ``torch.nn.GroupNorm``.

    The ``C = num_channels`` channels of ``[N, C, *]`` input are split into ``num_groups``
    groups, each normalised over its channels and the spatial dimensions.

    Attributes:
        num_groups: the number of groups; it divides ``num_channels``.
        num_channels: ``C``.
        weight, bias: ``[C]`` Parameters, or ``None`` (``affine=False``; ``bias=False``).
        eps: added to the variance.

    Example:
        >>> norm = sample(GroupNormSpec(2, 4))
        >>> norm(torch.randn(3, 4, 5)).shape
        torch.Size([3, 4, 5])
    """

    num_groups: int
    num_channels: int
    weight: Parameter | None = None
    bias: Parameter | None = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.num_groups <= 0 or self.num_channels % self.num_groups != 0:
            raise ValueError(
                f"num_channels ({self.num_channels}) must be divisible by num_groups "
                f"({self.num_groups})."
            )

    @property
    def affine(self) -> bool:
        """Whether the layer has a learnable weight (torch's ``affine``)."""
        return self.weight is not None

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise each group of channels of each sample.

        Args:
            input: ``[N, C, *]`` with ``C = num_channels``.

        Returns:
            The normalised, scaled and shifted input, of its shape.
        """
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


@dataclasses.dataclass(frozen=True)
class GroupNormSpec:
    """The spec of :class:`GroupNorm`, with ``torch.nn.GroupNorm``'s arguments.

    ``sample`` initialises as PyTorch does: weight ones, bias zeros.

    Example:
        >>> sample(GroupNormSpec(num_groups=2, num_channels=6, affine=False)).weight is None
        True
    """

    num_groups: int
    num_channels: int
    eps: float = 1e-5
    affine: bool = True
    bias: bool = dataclasses.field(default=True, kw_only=True)

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> GroupNorm:
        """Build a :class:`GroupNorm` with PyTorch's initialisation.

        Raises:
            ValueError: ``num_groups`` does not divide ``num_channels``.
        """
        if self.num_groups <= 0 or self.num_channels % self.num_groups != 0:
            raise ValueError(
                f"num_channels ({self.num_channels}) must be divisible by num_groups "
                f"({self.num_groups})."
            )
        weight, bias = _affine(self.num_channels, self.affine, self.bias, device, dtype)
        return GroupNorm(self.num_groups, self.num_channels, weight, bias, self.eps)


class RMSNorm(Parameterized):
    """Root-mean-square normalisation over the last dimensions: ``torch.nn.RMSNorm``.

    ``y = x / sqrt(mean(x**2) + eps) * weight``, the mean over ``normalized_shape``.

    Attributes:
        normalized_shape: the trailing shape normalised over, as a tuple.
        weight: ``normalized_shape``, or ``None`` (``elementwise_affine=False``).
        eps: added to the mean square; ``None`` uses ``torch.finfo(input.dtype).eps``.

    Example:
        >>> norm = sample(RMSNormSpec(4))
        >>> y = norm(torch.full((2, 4), 3.0))
        >>> torch.allclose(y, torch.ones(2, 4))
        True
    """

    normalized_shape: tuple[int, ...]
    weight: Parameter | None = None
    eps: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "normalized_shape", _shape(self.normalized_shape))

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        """Divide ``input`` by its root mean square over the trailing ``normalized_shape``.

        Args:
            input: ``[*, *normalized_shape]``.

        Returns:
            The normalised and scaled input, of its shape.
        """
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


@dataclasses.dataclass(frozen=True)
class RMSNormSpec:
    """The spec of :class:`RMSNorm`, with ``torch.nn.RMSNorm``'s arguments.

    ``sample`` initialises as PyTorch does: weight ones.

    Example:
        >>> sample(RMSNormSpec([2, 3], eps=1e-6))
        RMSNorm(normalized_shape=(2, 3), weight=f32[2,3], eps=1e-06)
    """

    normalized_shape: int | Sequence[int]
    eps: float | None = None
    elementwise_affine: bool = True

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> RMSNorm:
        """Build an :class:`RMSNorm` with PyTorch's initialisation (ones)."""
        shape = _shape(self.normalized_shape)
        weight = _filled(shape, 1.0, device, dtype) if self.elementwise_affine else None
        return RMSNorm(shape, weight, self.eps)
