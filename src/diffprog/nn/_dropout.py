"""Dropout layers, with explicit randomness and a train/eval switch.

Each layer is the identity in eval mode. It drops in training mode: inside
:func:`diffprog.nn.training`, or when called with ``training=True``. Its random numbers come
from the ``generator`` argument, else the training pass's generator, else torch's global
generator; in that last case the layer calls ``torch.nn.functional``'s function itself, so the
mask is torch's for the same ``torch.manual_seed``. With a generator the mask is drawn the way
ATen's CPU kernels draw it (``bernoulli_(1 - p)`` into a tensor like the input, or like
``[N, C, 1, ...]`` for channel-wise dropout), so a CPU generator seeded ``s`` gives the mask
that torch gives on CPU after ``torch.manual_seed(s)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from diffprog import DeviceLike, Parameterized
from diffprog.nn._state import is_training, training_generator, warn_unless_mode_chosen

__all__ = [
    "AlphaDropout",
    "AlphaDropoutSpec",
    "Dropout",
    "Dropout1d",
    "Dropout1dSpec",
    "Dropout2d",
    "Dropout2dSpec",
    "Dropout3d",
    "Dropout3dSpec",
    "DropoutSpec",
    "FeatureAlphaDropout",
    "FeatureAlphaDropoutSpec",
]

_SELU_ALPHA = 1.7580993408473766  # -scale * alpha of SELU, as ATen's alpha dropout uses


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}.")


def _drop(
    input: torch.Tensor,
    p: float,
    generator: torch.Generator,
    *,
    feature: bool,
    alpha: bool,
    inplace: bool,
) -> torch.Tensor:
    """ATen's ``_dropout_impl`` (the CPU path of every dropout), drawing from ``generator``."""
    if input.numel() == 0:
        return input
    if p == 1.0:
        zero = torch.zeros((), dtype=input.dtype, device=input.device)
        return input.mul_(zero) if inplace else input * zero
    if feature:
        if input.dim() < 2:
            raise ValueError(
                "channel-wise dropout needs an input with a batch and a channel dimension, "
                f"got shape {tuple(input.shape)}."
            )
        shape = (input.shape[0], input.shape[1]) + (1,) * (input.dim() - 2)
        noise = torch.empty(shape, dtype=input.dtype, device=generator.device)
    else:
        noise = torch.empty_like(input, device=generator.device)
    noise.bernoulli_(1.0 - p, generator=generator)
    noise = noise.to(input.device)
    if alpha:
        a = 1.0 / math.sqrt((_SELU_ALPHA * _SELU_ALPHA * p + 1) * (1 - p))
        shift = noise.add(-1).mul_(_SELU_ALPHA * a).add_(_SELU_ALPHA * a * p)
        noise.mul_(a)
        out = input.mul_(noise) if inplace else input * noise
        return out.add_(shift)
    noise.div_(1.0 - p)
    return input.mul_(noise) if inplace else input * noise


class _DropoutBase(Parameterized):
    """The fields and the train/eval logic shared by the dropout layers."""

    p: float = 0.5
    inplace: bool = False

    _feature: ClassVar[bool] = False
    _alpha: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_p(self.p)

    def __call__(
        self,
        input: torch.Tensor,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Apply dropout to ``input``.

        Args:
            input: the input; its shape is the output's.
            training: drop (``True``) or be the identity (``False``); ``None`` (the default)
                drops exactly inside :func:`diffprog.nn.training`.
            generator: the random source; ``None`` takes the training pass's generator, else
                torch's global one.

        Returns:
            ``input`` with elements (or channels) zeroed and the rest rescaled, or ``input``
            itself in eval mode and for ``p=0``.

        Raises:
            TypeError: ``generator`` is not a ``torch.Generator``.
            ValueError: the input's rank does not suit the layer.
        """
        self._check_input(input)
        if training is None:
            training = is_training()
            if not training and self.p > 0.0:
                warn_unless_mode_chosen(self, "no dropout", (input,))
        if not training or self.p == 0.0:
            return input
        if generator is None:
            generator = training_generator()
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        if generator is None:
            return self._torch(input)
        return self._with_generator(input, generator)

    def _check_input(self, input: torch.Tensor) -> None:
        return None

    def _torch(self, input: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def _with_generator(self, input: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return _drop(
            input,
            self.p,
            generator,
            feature=self._feature,
            alpha=self._alpha,
            inplace=self.inplace,
        )


class Dropout(_DropoutBase):
    """Zero each element with probability ``p`` in training mode, scaling the rest by ``1/(1-p)``.

    As ``torch.nn.Dropout``. The identity outside training mode. Training mode is on inside
    ``diffprog.nn.training`` or when ``training=True`` is passed; randomness comes from the
    ``generator`` argument, else the training pass's generator, else torch's global one
    (then the mask equals ``torch.nn.functional.dropout``'s for the same seed).

    Attributes:
        p: the probability of an element being zeroed.
        inplace: overwrite the input tensor (as torch's ``inplace=True``).

    Example:
        >>> drop = sample(DropoutSpec(p=0.5))
        >>> torch.equal(drop(torch.ones(4)), torch.ones(4))  # eval mode: identity
        True
        >>> g = torch.Generator().manual_seed(0)
        >>> set(drop(torch.ones(100), training=True, generator=g).tolist()) <= {0.0, 2.0}
        True
    """

    def _torch(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, training=True, inplace=self.inplace)


class _FeatureDropout(_DropoutBase):
    """Channel-wise dropout over inputs of rank ``_batched`` or ``_batched - 1`` (unbatched)."""

    _feature = True
    _batched: ClassVar[int] = 0
    _unbatched: ClassVar[bool] = True
    _rank_hint: ClassVar[str] = ""

    def _check_input(self, input: torch.Tensor) -> None:
        ranks = (self._batched - 1, self._batched) if self._unbatched else (self._batched,)
        if input.dim() not in ranks:
            expected = " or ".join(f"{r}D" for r in ranks)
            raise ValueError(
                f"{type(self).__name__} expected {expected} input (got {input.dim()}D input)."
                + self._rank_hint
            )

    def _with_generator(self, input: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if input.dim() == self._batched:
            return super()._with_generator(input, generator)
        batched = input.unsqueeze_(0) if self.inplace else input.unsqueeze(0)
        out = super()._with_generator(batched, generator)
        return out.squeeze_(0) if self.inplace else out.squeeze(0)


class Dropout1d(_FeatureDropout):
    """Zero whole channels of ``[N, C, L]`` or ``[C, L]`` input: ``torch.nn.Dropout1d``.

    Each channel is zeroed with probability ``p``, the others scaled by ``1/(1-p)``. Train/eval
    switch and randomness as :class:`Dropout`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = sample(Dropout1dSpec(0.5))(torch.ones(4, 8, 5), training=True, generator=g)
        >>> bool((y == y[..., :1]).all())  # constant along each channel
        True
    """

    _batched = 3

    def _torch(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout1d(input, self.p, training=True, inplace=self.inplace)


class Dropout2d(_FeatureDropout):
    """Zero whole channels of ``[N, C, H, W]`` input: ``torch.nn.Dropout2d``.

    Each channel is zeroed with probability ``p``, the others scaled by ``1/(1-p)``. Train/eval
    switch and randomness as :class:`Dropout`. Unlike torch (which warns and treats a 3D input
    as ``[N, C, L]``), a 3D input is an error: use :class:`Dropout1d` for ``[N, C, L]``, or
    ``unsqueeze(0)`` an unbatched ``[C, H, W]`` input.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = sample(Dropout2dSpec(0.5))(torch.ones(2, 6, 3, 3), training=True, generator=g)
        >>> bool((y == y[..., :1, :1]).all())
        True
    """

    _batched = 4
    _unbatched = False
    _rank_hint = (
        " For [N, C, L] input use Dropout1d; unsqueeze(0) an unbatched [C, H, W] input first."
    )

    def _torch(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(input, self.p, training=True, inplace=self.inplace)


class Dropout3d(_FeatureDropout):
    """Zero whole channels of ``[N, C, D, H, W]`` or ``[C, D, H, W]`` input.

    As ``torch.nn.Dropout3d``. Train/eval switch and randomness as :class:`Dropout`.

    Example:
        >>> drop = sample(Dropout3dSpec(0.2))
        >>> drop(torch.ones(2, 3, 2, 2, 2)).shape  # eval mode: identity
        torch.Size([2, 3, 2, 2, 2])
    """

    _batched = 5

    def _torch(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout3d(input, self.p, training=True, inplace=self.inplace)


class AlphaDropout(_DropoutBase):
    """Dropout that keeps SELU's self-normalising mean and variance: ``torch.nn.AlphaDropout``.

    Dropped elements are set to SELU's negative saturation value, then an affine map restores
    zero mean and unit variance. Train/eval switch and randomness as :class:`Dropout`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = sample(AlphaDropoutSpec(0.2))(torch.randn(10000), training=True, generator=g)
        >>> abs(y.mean().item()) < 0.05 and abs(y.std().item() - 1) < 0.05
        True
    """

    _alpha = True

    def _torch(self, input: torch.Tensor) -> torch.Tensor:
        return F.alpha_dropout(input, self.p, training=True, inplace=self.inplace)


class FeatureAlphaDropout(_DropoutBase):
    """Alpha dropout of whole channels of ``[N, C, *]`` input: ``torch.nn.FeatureAlphaDropout``.

    Train/eval switch and randomness as :class:`Dropout`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> drop = sample(FeatureAlphaDropoutSpec(0.5))
        >>> y = drop(torch.zeros(2, 8, 4), training=True, generator=g)
        >>> bool((y == y[..., :1]).all())
        True
    """

    _feature = True
    _alpha = True

    def _check_input(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"FeatureAlphaDropout expected an input with a batch and a channel dimension "
                f"(at least 2D), got {input.dim()}D input."
            )

    def _torch(self, input: torch.Tensor) -> torch.Tensor:
        return F.feature_alpha_dropout(input, self.p, training=True, inplace=self.inplace)


@dataclasses.dataclass(frozen=True)
class _DropoutSpecBase:
    p: float = 0.5
    inplace: bool = False

    _layer: ClassVar[type[_DropoutBase]]

    def __post_init__(self) -> None:
        _check_p(self.p)

    def _build(self) -> _DropoutBase:
        return self._layer(p=self.p, inplace=self.inplace)


@dataclasses.dataclass(frozen=True)
class DropoutSpec(_DropoutSpecBase):
    """The spec of :class:`Dropout`, with ``torch.nn.Dropout``'s arguments ``p`` and ``inplace``.

    Example:
        >>> sample(DropoutSpec(0.1))
        Dropout(p=0.1, inplace=False)
    """

    _layer = Dropout

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Dropout:
        """Build the (parameter-free) layer."""
        return self._build()  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Dropout1dSpec(_DropoutSpecBase):
    """The spec of :class:`Dropout1d`, with ``torch.nn.Dropout1d``'s arguments.

    Example:
        >>> sample(Dropout1dSpec(0.1)).p
        0.1
    """

    _layer = Dropout1d

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Dropout1d:
        """Build the (parameter-free) layer."""
        return self._build()  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Dropout2dSpec(_DropoutSpecBase):
    """The spec of :class:`Dropout2d`, with ``torch.nn.Dropout2d``'s arguments.

    Example:
        >>> sample(Dropout2dSpec(0.1)).p
        0.1
    """

    _layer = Dropout2d

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Dropout2d:
        """Build the (parameter-free) layer."""
        return self._build()  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Dropout3dSpec(_DropoutSpecBase):
    """The spec of :class:`Dropout3d`, with ``torch.nn.Dropout3d``'s arguments.

    Example:
        >>> sample(Dropout3dSpec(0.1)).p
        0.1
    """

    _layer = Dropout3d

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Dropout3d:
        """Build the (parameter-free) layer."""
        return self._build()  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class AlphaDropoutSpec(_DropoutSpecBase):
    """The spec of :class:`AlphaDropout`, with ``torch.nn.AlphaDropout``'s arguments.

    Example:
        >>> sample(AlphaDropoutSpec(0.1)).p
        0.1
    """

    _layer = AlphaDropout

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> AlphaDropout:
        """Build the (parameter-free) layer."""
        return self._build()  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class FeatureAlphaDropoutSpec(_DropoutSpecBase):
    """The spec of :class:`FeatureAlphaDropout`, with ``torch.nn.FeatureAlphaDropout``'s arguments.

    Example:
        >>> sample(FeatureAlphaDropoutSpec(0.1)).p
        0.1
    """

    _layer = FeatureAlphaDropout

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> FeatureAlphaDropout:
        """Build the (parameter-free) layer."""
        return self._build()  # type: ignore[return-value]
