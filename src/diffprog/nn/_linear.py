"""Dense layers: ``Linear`` and ``Identity`` with their specs (Hasktorch's ``Torch.NN.Linear``)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from diffprog import DeviceLike, Parameter, Parameterized, init_parameter

__all__ = ["Identity", "IdentitySpec", "Linear", "LinearSpec"]


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

    def __post_init__(self) -> None:
        if not isinstance(self.weight, torch.Tensor) or self.weight.dim() != 2:
            got = tuple(self.weight.shape) if isinstance(self.weight, torch.Tensor) else None
            raise ValueError(
                f"Linear: weight must be a 2-d tensor [out_features, in_features], got shape {got}."
            )
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[0],):
            raise ValueError(
                f"Linear: bias must have shape ({self.weight.shape[0]},) (out_features), got "
                f"{tuple(self.bias.shape)}; pass None for a layer without bias."
            )

    @property
    def in_features(self) -> int:
        """The size of each input sample (``weight.shape[1]``), as ``torch.nn.Linear``'s."""
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        """The size of each output sample (``weight.shape[0]``), as ``torch.nn.Linear``'s."""
        return int(self.weight.shape[0])

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        """Apply the layer, as ``torch.nn.Linear.forward``.

        Args:
            input: ``[*, in_features]``: any number of leading (batch) dimensions, or none.

        Returns:
            ``[*, out_features]``.

        Raises:
            RuntimeError: the last dimension of ``input`` is not ``in_features`` (from torch).

        Example:
            >>> layer = sample(LinearSpec(3, 2, bias=False))
            >>> layer(torch.zeros(3)).tolist()
            [0.0, 0.0]
        """
        return F.linear(input, self.weight, self.bias)


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """The spec of :class:`Linear`, with ``torch.nn.Linear``'s arguments.

    ``sample`` initialises as PyTorch does: weight kaiming-uniform with ``a=sqrt(5)``, bias
    uniform in ``(-1/sqrt(in_features), 1/sqrt(in_features))``; with the same seed the weights
    equal ``torch.nn.Linear``'s bit for bit.

    Attributes:
        in_features: the size of each input sample.
        out_features: the size of each output sample.
        bias: whether the layer has a bias.

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
        """Sample a :class:`Linear` with PyTorch's default initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The layer.
        """
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


class Identity(Parameterized):
    """The identity map, as ``torch.nn.Identity``: a placeholder layer without parameters.

    Useful where a layer is expected but nothing should happen (a skipped projection, the
    ``fc`` of a backbone used as a feature extractor).

    Example:
        >>> x = torch.randn(2, 3)
        >>> Identity()(x) is x
        True
    """

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        """Return ``input`` itself (not a copy), as ``torch.nn.Identity.forward``.

        Args:
            input: any tensor.

        Returns:
            ``input``.
        """
        return input


@dataclasses.dataclass(frozen=True)
class IdentitySpec:
    """The spec of :class:`Identity`.

    ``torch.nn.Identity(*args, **kwargs)`` accepts and ignores any argument; a spec is a value
    compared and hashed by its fields, so this one has none.

    Example:
        >>> sample(IdentitySpec())
        Identity()
    """

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Identity:
        """Build the (parameter-free) layer; the arguments are accepted and unused."""
        return Identity()
