"""``as_module``: a ``torch.nn.Module`` view of a model, for tools that insist on modules."""

from __future__ import annotations

from typing import Any

import torch

from diffprog import named_tensors, state_dict

__all__ = ["ModelModule", "as_module"]


class ModelModule(torch.nn.Module):
    """A ``torch.nn.Module`` whose parameters are a model's Parameters: see :func:`as_module`.

    Attributes:
        model: the model (a diffprog value); ``forward`` calls it.
    """

    model: Any

    def __init__(self, model: Any) -> None:
        super().__init__()
        # Set around nn.Module.__setattr__: a model is no Module, Parameter or buffer of its
        # own (its tensors are registered below, by their state_dict keys).
        object.__setattr__(self, "model", model)
        objects = {name: t for name, t in named_tensors(model)}
        detached = state_dict(model)
        # state_dict has every key (a tied tensor under each of its keys, as one object);
        # named_tensors has the model's own tensor objects, under each one's first key.
        first_key = {id(detached[name]): name for name in objects}
        for key, t in detached.items():
            _register(self, key, objects[first_key[id(t)]])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model."""
        return self.model(*args, **kwargs)


def _register(root: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` at the dotted ``key`` under ``root`` (a Parameter as a parameter,
    any other tensor as a buffer), creating empty container modules on the way."""
    *path, name = key.split(".")
    module = root
    for part in path:
        child = module._modules.get(part)
        if child is None:
            child = torch.nn.Module()
            module.add_module(part, child)
        module = child
    if isinstance(tensor, torch.nn.Parameter):
        module.register_parameter(name, tensor)
    else:
        module.register_buffer(name, tensor)


def as_module(model: Any) -> ModelModule:
    """A ``torch.nn.Module`` view of ``model``, for tools that insist on modules.

    Its parameters are the model's Parameters (the same objects), registered under their
    ``state_dict`` keys (``layers.0.weight``), so ``module.named_parameters()`` and
    ``module.state_dict()`` have the keys of :func:`diffprog.named_parameters` and
    :func:`diffprog.state_dict` (the order of ``state_dict`` may differ: torch lists a module's
    own tensors before its children's); every other tensor (a buffer, a frozen parameter) is a
    buffer. ``forward`` calls the model. Use it for ``torch.export``, ONNX export, FSDP or
    Lightning. It is a view, not a conversion: an in-place change of a tensor (an optimizer
    of torch.optim stepping ``module.parameters()``) changes the model's tensor too, while a
    diffprog step returns a new model (make a new view of it). The reverse direction, a
    ``torch.nn`` module into a diffprog model, is :func:`diffprog.nn.from_torch`.

    Args:
        model: any model value that can be called.

    Returns:
        The module.

    Raises:
        NameClashError: two different tensors of the model would get the same key.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> model = sample(LinearSpec(3, 2))
        >>> module = as_module(model)
        >>> [name for name, _ in module.named_parameters()], module.weight is model.weight
        (['weight', 'bias'], True)
        >>> torch.equal(module(torch.ones(1, 3)), model(torch.ones(1, 3)))
        True
    """
    return ModelModule(model)
