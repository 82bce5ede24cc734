"""``UpSample`` (Hasktorch's name; ``Upsample`` as in PyTorch) and its spec."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from diffprog import DeviceLike, Parameterized

__all__ = ["InterpolationMode", "UpSample", "UpSampleSpec", "Upsample", "UpsampleSpec"]

InterpolationMode = Literal[
    "nearest", "linear", "bilinear", "bicubic", "trilinear", "area", "nearest-exact"
]
"""The ``mode`` values of ``torch.nn.Upsample`` (``torch.nn.functional.interpolate``)."""

_MODES = ("nearest", "linear", "bilinear", "bicubic", "trilinear", "area", "nearest-exact")
_INTERPOLATING = ("linear", "bilinear", "bicubic", "trilinear")


class UpSample(Parameterized):
    """Resize ``[N, C, *spatial]`` to a size or by a factor, as ``torch.nn.Upsample``.

    Nearest neighbour or (bi/tri)linear/bicubic interpolation over the last 1, 2 or 3
    dimensions (``[N, C, W]``, ``[N, C, H, W]``, ``[N, C, D, H, W]``), with
    ``torch.nn.functional.interpolate``. Exactly one of ``size`` and ``scale_factor`` is given.

    Attributes:
        size: the output's spatial size (an int for every dimension, or one per dimension),
            or ``None``.
        scale_factor: the multiplier of the spatial size (a float, or one per dimension), or
            ``None``; stored as float(s), as torch.nn does.
        mode: ``"nearest"`` (default), ``"linear"``, ``"bilinear"``, ``"bicubic"``,
            ``"trilinear"``, ``"area"`` or ``"nearest-exact"``.
        align_corners: for the interpolating modes, align the corner pixels of input and
            output (``None``: ``False``).
        recompute_scale_factor: compute the interpolation's scale from the output size
            rather than using ``scale_factor`` as given.

    Example:
        >>> up = sample(UpSampleSpec(scale_factor=2, mode="nearest"))
        >>> up
        UpSample(
          size=None,
          scale_factor=2.0,
          mode='nearest',
          align_corners=None,
          recompute_scale_factor=None,
        )
        >>> up(torch.arange(4.0).view(1, 1, 2, 2)).tolist()
        [[[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0]]]]
    """

    size: int | tuple[int, ...] | None = None
    scale_factor: float | tuple[float, ...] | None = None
    mode: InterpolationMode = "nearest"
    align_corners: bool | None = None
    recompute_scale_factor: bool | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if (self.size is None) == (self.scale_factor is None):
            raise ValueError(
                f"{owner}: give exactly one of size and scale_factor (got size={self.size!r}, "
                f"scale_factor={self.scale_factor!r})."
            )
        if self.mode not in _MODES:
            raise ValueError(f"{owner}: mode must be one of {_MODES}, got {self.mode!r}.")
        if self.align_corners is not None and self.mode not in _INTERPOLATING:
            raise ValueError(
                f"{owner}: align_corners can only be set with the interpolating modes "
                f"{_INTERPOLATING}, not mode={self.mode!r}; leave it None."
            )
        try:
            if isinstance(self.size, Sequence):
                object.__setattr__(self, "size", tuple(operator.index(s) for s in self.size))
            elif self.size is not None:
                object.__setattr__(self, "size", operator.index(self.size))
            if isinstance(self.scale_factor, Sequence):
                factors = tuple(float(f) for f in self.scale_factor)
                object.__setattr__(self, "scale_factor", factors)
            elif self.scale_factor is not None:
                object.__setattr__(self, "scale_factor", float(self.scale_factor))
        except TypeError:
            raise ValueError(
                f"{owner}: size must be an int or a tuple of ints and scale_factor a float or "
                f"a tuple of floats, got size={self.size!r}, "
                f"scale_factor={self.scale_factor!r}."
            ) from None

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        """Resize ``input``, as ``torch.nn.Upsample.forward``.

        Args:
            input: ``[N, C, W]``, ``[N, C, H, W]`` or ``[N, C, D, H, W]``.

        Returns:
            ``[N, C, *new_spatial]``.

        Raises:
            ValueError: the mode does not fit the input's dimensions, or the number of sizes
                or factors differs from the spatial dimensions (from torch).

        Example:
            >>> up = UpSample(size=5, mode="linear", align_corners=True)
            >>> up(torch.tensor([[[0.0, 4.0]]])).tolist()
            [[[0.0, 1.0, 2.0, 3.0, 4.0]]]
        """
        return F.interpolate(
            input,
            self.size,
            self.scale_factor,
            self.mode,
            self.align_corners,
            recompute_scale_factor=self.recompute_scale_factor,
        )


@dataclasses.dataclass(frozen=True)
class UpSampleSpec:
    """The spec of :class:`UpSample`, with ``torch.nn.Upsample``'s arguments and defaults.

    Attributes:
        size: the output's spatial size, or ``None``.
        scale_factor: the multiplier of the spatial size, or ``None``.
        mode: the interpolation (default ``"nearest"``).
        align_corners: for the interpolating modes (``None``: ``False``).
        recompute_scale_factor: as for ``torch.nn.functional.interpolate``.

    Example:
        >>> sample(UpsampleSpec(size=(4, 6), mode="bilinear"))(torch.zeros(1, 3, 2, 3)).shape
        torch.Size([1, 3, 4, 6])
    """

    size: int | tuple[int, ...] | None = None
    scale_factor: float | tuple[float, ...] | None = None
    mode: InterpolationMode = "nearest"
    align_corners: bool | None = None
    recompute_scale_factor: bool | None = None

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> UpSample:
        """Build the (parameter-free) layer; the arguments are accepted and unused.

        Returns:
            The layer.

        Raises:
            ValueError: neither or both of ``size`` and ``scale_factor``, an unknown mode, or
                ``align_corners`` with a mode that does not interpolate.
        """
        return UpSample(
            self.size, self.scale_factor, self.mode, self.align_corners, self.recompute_scale_factor
        )


Upsample = UpSample
"""PyTorch's spelling of :class:`UpSample` (``torch.nn.Upsample``)."""

UpsampleSpec = UpSampleSpec
"""PyTorch's spelling of :class:`UpSampleSpec`."""
