"""``Randomizable`` specs and ``sample``: building models from specs (Hasktorch's ``sample``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import torch

from diffprog._autograd import Parameter

__all__ = ["DeviceLike", "Randomizable", "init_parameter", "sample"]

M_co = TypeVar("M_co", covariant=True)
M = TypeVar("M")

DeviceLike = torch.device | str | int | None


@runtime_checkable
class Randomizable(Protocol[M_co]):
    """A spec that can be sampled into a model: Hasktorch's ``Randomizable spec f``.

    Any object with this ``sample`` method is a spec; usually a frozen dataclass holding the
    hyper-parameters (``LinearSpec(in_features=3, out_features=1)``). A spec for a composite
    model samples its parts' specs, passing ``generator``, ``device`` and ``dtype`` on.

    Example:
        >>> import dataclasses
        >>> from diffprog.nn import Linear, LinearSpec
        >>> @dataclasses.dataclass(frozen=True)
        ... class TwoLayerSpec:
        ...     sizes: tuple[int, int, int]
        ...     def sample(self, *, generator=None, device=None, dtype=None):
        ...         a, b, c = self.sizes
        ...         kw = dict(generator=generator, device=device, dtype=dtype)
        ...         return (sample(LinearSpec(a, b), **kw), sample(LinearSpec(b, c), **kw))
        >>> first, second = sample(TwoLayerSpec((4, 8, 1)))
        >>> tuple(second.weight.shape)
        (1, 8)
    """

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> M_co:
        """Build a fresh model from this spec."""
        ...


def sample(
    spec: Randomizable[M],
    *,
    generator: torch.Generator | None = None,
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
) -> M:
    """Build a model from its spec, with fresh random parameters.

    The same generator state gives the same model, bit for bit. With a generator whose
    device differs from ``device`` (the usual CPU generator and a CUDA model), numbers are drawn
    on the generator's device and moved, so a model is the same on every device.

    Args:
        spec: the spec, e.g. ``diffprog.nn.LinearSpec(3, 1)``.
        generator: the random source; ``None`` uses torch's global generator (so
            ``torch.manual_seed`` applies, as for torch.nn layers).
        device: where the parameters live (default: torch's default device).
        dtype: the floating point dtype (default: ``torch.get_default_dtype()``).

    Returns:
        The model.

    Raises:
        TypeError: ``spec`` has no ``sample`` method.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> a = sample(LinearSpec(3, 1), generator=torch.Generator().manual_seed(7))
        >>> b = sample(LinearSpec(3, 1), generator=torch.Generator().manual_seed(7))
        >>> torch.equal(a.weight, b.weight)
        True
    """
    method = getattr(spec, "sample", None)
    if not callable(method):
        raise TypeError(
            f"sample needs a spec (an object with a sample method, see diffprog.Randomizable); "
            f"got {type(spec).__name__}."
        )
    return method(generator=generator, device=device, dtype=dtype)  # type: ignore[no-any-return]


def init_parameter(
    shape: Sequence[int],
    init: Callable[[torch.Tensor, torch.Generator | None], object],
    *,
    generator: torch.Generator | None = None,
    device: DeviceLike = None,
    dtype: torch.dtype | None = None,
) -> Parameter:
    """A new Parameter of ``shape``, filled in place by ``init(tensor, generator)``.

    The helper specs use: it draws on the generator's device (moving the result to
    ``device``), and skips drawing on the ``meta`` device.

    Args:
        shape: the parameter's shape.
        init: fills the tensor in place, e.g.
            ``lambda t, g: torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)``.
        generator: the random source (``None``: torch's global one).
        device: where the result lives.
        dtype: its dtype.

    Returns:
        The new Parameter.

    Example:
        >>> p = init_parameter((2, 2), lambda t, g: torch.nn.init.ones_(t))
        >>> p.sum().item()
        4.0
    """
    target = torch.device(device) if device is not None else torch.get_default_device()
    if target.type == "meta":
        return Parameter(torch.empty(tuple(shape), device=target, dtype=dtype))
    draw_on = generator.device if generator is not None else target
    t = torch.empty(tuple(shape), device=draw_on, dtype=dtype)
    with torch.no_grad():
        init(t, generator)
    return Parameter(t.to(target))
