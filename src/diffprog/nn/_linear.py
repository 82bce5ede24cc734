"""Dense layers: ``Linear`` and its spec (Hasktorch's ``Torch.NN.Linear``)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from diffprog import DeviceLike, Parameter, Parameterized, init_parameter

__all__ = ["Linear", "LinearSpec"]


class Linear(Parameterized):
    """An affine map ``y = x @ weight.T + bias``, as ``torch.nn.Linear``.

    Attributes:
        weight: ``[out_features, in_features]`` (PyTorch's layout).
        bias: ``[out_features]``, or ``None``.

    Example:
        >>> layer = sample(LinearSpec(3, 2), generator=torch.Generator().manual_seed(0))
        >>> layer
        Linear(weight=f32[2,3], bias=f32[2])
        >>> layer(torch.ones(4, 3)).shape
        torch.Size([4, 2])
    """

    weight: Parameter
    bias: Parameter | None = None

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``input`` of shape ``[*, in_features]``."""
        return F.linear(input, self.weight, self.bias)


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """The spec of :class:`Linear`, with ``torch.nn.Linear``'s arguments.

    ``sample`` initialises as PyTorch does: weight kaiming-uniform with ``a=sqrt(5)``, bias
    uniform in ``(-1/sqrt(in_features), 1/sqrt(in_features))``; with the same seed the weights
    equal ``torch.nn.Linear``'s bit for bit.

    Example:
        >>> torch.manual_seed(0); reference = torch.nn.Linear(3, 2)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> ours = sample(LinearSpec(3, 2), generator=torch.Generator().manual_seed(0))
        >>> torch.equal(ours.weight, reference.weight), torch.equal(ours.bias, reference.bias)
        (True, True)
    """

    in_features: int
    out_features: int
    bias: bool = True

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Linear:
        """Sample a :class:`Linear` with PyTorch's default initialisation."""
        kw = {"generator": generator, "device": device, "dtype": dtype}
        weight = init_parameter(
            (self.out_features, self.in_features),
            lambda t, g: torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g),
            **kw,  # type: ignore[arg-type]
        )
        bias = None
        if self.bias:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            bias = init_parameter(
                (self.out_features,),
                lambda t, g: torch.nn.init.uniform_(t, -bound, bound, generator=g),
                **kw,  # type: ignore[arg-type]
            )
        return Linear(weight, bias)
