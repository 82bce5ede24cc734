"""Dropout, with explicit randomness and a train/eval switch."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from diffprog import DeviceLike, Parameterized
from diffprog.nn._state import is_training, training_generator

__all__ = ["Dropout", "DropoutSpec"]


class Dropout(Parameterized):
    """Zero each element with probability ``p`` in training mode, scaling the rest by ``1/(1-p)``.

    As ``torch.nn.Dropout``. The identity outside training mode. Training mode is on inside
    ``diffprog.nn.training`` or when ``training=True`` is passed; randomness comes from the
    ``generator`` argument, else the training pass's generator, else torch's global one
    (then the mask equals ``torch.nn.functional.dropout``'s for the same seed).

    Example:
        >>> drop = sample(DropoutSpec(p=0.5))
        >>> torch.equal(drop(torch.ones(4)), torch.ones(4))  # eval mode: identity
        True
        >>> g = torch.Generator().manual_seed(0)
        >>> set(drop(torch.ones(100), training=True, generator=g).tolist()) <= {0.0, 2.0}
        True
    """

    p: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {self.p}")

    def __call__(
        self,
        input: torch.Tensor,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Apply dropout to ``input`` (any shape)."""
        if training is None:
            training = is_training()
        if not training or self.p == 0.0:
            return input
        if generator is None:
            generator = training_generator()
        if generator is None:
            return F.dropout(input, self.p, training=True)
        if self.p == 1.0:
            return input * 0.0
        keep = torch.empty(input.shape, dtype=input.dtype, device=generator.device)
        keep.bernoulli_(1.0 - self.p, generator=generator)
        return input * keep.to(input.device).div_(1.0 - self.p)


@dataclasses.dataclass(frozen=True)
class DropoutSpec:
    """The spec of :class:`Dropout`, with ``torch.nn.Dropout``'s argument ``p``."""

    p: float = 0.5

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Dropout:
        """Build the (parameter-free) layer."""
        return Dropout(p=self.p)
