"""Models as torch pytrees: what ``torch.func``, ``torch.compile`` and ``torch.export`` see.

torch's function transformations read the Python pytree registry (``torch.utils._pytree``).
Every ``Parameterized`` class is registered there when it is created, and so is every type
given an instance with ``register_parameterized`` (and a hand-written class when diffprog first
meets it, or by :func:`register_pytree`).

What a transformation sees of a model (one flatten for the whole model, nested models included):

* **children**: every tensor of the model, as :func:`diffprog.tensors` lists them: Parameters,
  frozen parameters (``Frozen``) and buffers (constants such as BatchNorm's running statistics),
  in flatten order, a tied tensor once. All of them, because ``torch.func.vmap`` can only map
  over leaves: a stacked ensemble has stacked buffers too (``torch.func.stack_module_state``
  stacks parameters and buffers alike);
* **static structure** (the pytree context): the model's types, its non-tensor fields
  (activations, strides, flags, dtypes) and where each tensor sits (ties included). Two models
  have equal contexts when their structure is equal: same types, equal static fields (a
  function by identity), tensors at the same places, tied alike. Not the tensors' kinds: a
  model of gradients or tangents (plain tensors) has the structure of its model, as
  ``torch.func.jvp`` requires. The context also keeps the model it was taken from, as the
  template that ``unflatten`` rebuilds.

``unflatten`` puts the tensors it is given in place as they are: inside a transformation they
are torch's wrapped tensors (batched, gradient-tracking), which must not be rewrapped, so
Parameters come back as plain tensors, as ``torch.func.functional_call`` leaves them. (A round
trip with the model's own tensors gives the model's own tensors, Parameters included.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.utils._pytree as torch_pytree

from diffprog._errors import CycleError, InstanceError, ModelError, PathKey, state_dict_path
from diffprog._nodes import (
    _SCAN_LEAVES,
    HandWrittenNode,
    _ModuleNode,
    _OpaqueNode,
    node_for,
    scan_children,
)
from diffprog._stream import ParamStream
from diffprog._traverse import _hand_written_leaves

__all__ = ["Structure", "register_pytree", "tree_flatten_model", "tree_unflatten_model"]

# Key = nested tuples describing a value's structure (see _describe).
Key = tuple[Any, ...]


class _Static:
    """A static value in a structure key: compared with ``==`` when it is hashable, else by
    identity (an unhashable opaque object)."""

    __slots__ = ("hashable", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        try:
            hash(value)
            self.hashable = True
        except TypeError:
            self.hashable = False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Static):
            return NotImplemented
        if self.hashable and other.hashable:
            return type(self.value) is type(other.value) and bool(self.value == other.value)
        return self.value is other.value

    def __hash__(self) -> int:
        return hash(self.value) if self.hashable else id(self.value)

    def __repr__(self) -> str:
        return repr(self.value)


@dataclasses.dataclass(frozen=True, eq=False)
class Structure:
    """The pytree context of a model: its static structure, and the model as a template.

    Equal (and equally hashed) for models of equal structure, whatever their tensors' values.

    Attributes:
        key: the structure, as nested tuples.
        template: the model it was taken from (``unflatten`` rebuilds it with new tensors).
        paths: the ``state_dict`` path of each tensor, in leaf order.
    """

    key: Key
    template: Any
    paths: tuple[str, ...]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Structure):
            return NotImplemented
        return self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"Structure({type(self.template).__qualname__}, {len(self.paths)} tensors)"


class _Leaf:
    """A non-tensor value put in a tensor's place by ``unflatten`` (torch fills a model's
    structure with numbers or ``None`` to broadcast ``in_dims``/``out_dims``): boxed, so that
    flattening the result gives it back as a leaf again, as the pytree contract requires."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"<pytree leaf {self.value!r}>"


def _located(error: ModelError, path: tuple[PathKey, ...]) -> ModelError:
    for key in reversed(path):
        error.push(*key)
    return error


def _refuse_unlisted(value: Any, listed: list[Any], path: tuple[PathKey, ...]) -> None:
    """Raise if a hand-written instance holds a tensor its ``flatten_parameters`` does not list:
    a transformation could neither map over it nor differentiate it (a silent wrong result)."""
    ids = {id(t) for t in listed}
    seen: set[int] = set()
    stack: list[tuple[Any, tuple[PathKey, ...]]] = [(value, ())]
    while stack:
        x, inner = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            if id(x) not in ids:
                raise _located(
                    InstanceError(
                        f"{type(value).__qualname__} is a hand-written instance holding this "
                        "tensor without listing it in its flatten_parameters, so torch's "
                        "transformations cannot see it",
                        "List it in flatten_parameters (a constant may be listed: only "
                        "Parameters are flattened), or make the class a derived Parameterized.",
                    ),
                    (*path, *inner),
                )
            continue
        children = scan_children(x)
        if isinstance(children, list):
            stack.extend(
                (c, (*inner, k)) for k, c in reversed(children) if type(c) not in _SCAN_LEAVES
            )


def _describe(
    value: Any,
    path: tuple[PathKey, ...],
    leaves: list[torch.Tensor],
    paths: list[str],
    seen: dict[int, int],
    active: set[int],
) -> Key:
    """The structure key of ``value``; its tensors are appended to ``leaves`` (once each).

    Raises as ``flatten_parameters`` does where a tensor would silently be left out: a
    Parameter hidden in an opaque value, a tensor a hand-written instance does not list, a
    cycle.
    """
    if isinstance(value, (torch.Tensor, _Leaf)):
        index = seen.get(id(value))
        if index is not None:  # a tie: the same tensor at a second path
            return ("tie", index)
        seen[id(value)] = len(leaves)
        leaves.append(value if isinstance(value, torch.Tensor) else value.value)
        paths.append(state_dict_path(path))
        return ("leaf",)
    node = node_for(type(value))
    if node.static:
        return ("static", _Static(value))
    if isinstance(node, (_OpaqueNode, _ModuleNode)):
        try:
            node.flatten(value, [])  # raises for a Parameter hidden inside
        except ModelError as e:
            raise _located(e, path) from None
        return ("static", _Static(value))
    if id(value) in active:
        raise _located(
            CycleError(
                "this value is one of its own ancestors (a cycle)",
                "A model must be a tree (shared sub-values are fine, loops are not).",
            ),
            path,
        )
    if isinstance(node, HandWrittenNode):
        # What its flatten_parameters lists, unchecked: after an unflatten it may hold boxed
        # non-tensor leaves (see _Leaf), which the checked list refuses.
        listed = list(node.flatten_fn(value))
        if not any(isinstance(c, _Leaf) for c in listed):
            _refuse_unlisted(value, listed, path)
        # Each listed tensor named by the field that holds it (as named_parameters names it).
        named = [(tuple(keys), c) for keys, c in _hand_written_leaves(listed, value, ())]
        children_keys: tuple[PathKey, ...] = tuple(("index", i) for i in range(len(listed)))
    else:
        children = node.children(value)
        named = [((k,), c) for k, c in children]
        children_keys = tuple(k for k, _ in children)
    active.add(id(value))
    try:
        return (
            type(value),
            children_keys,
            tuple(_describe(c, (*path, *k), leaves, paths, seen, active) for k, c in named),
        )
    finally:
        active.discard(id(value))


def tree_flatten_model(model: Any) -> tuple[list[torch.Tensor], Structure]:
    """The tensors of ``model`` and its :class:`Structure` (the registered flatten).

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> layer = sample(LinearSpec(3, 1))
        >>> leaves, structure = tree_flatten_model(layer)
        >>> structure.paths
        ('weight', 'bias')
    """
    leaves: list[torch.Tensor] = []
    paths: list[str] = []
    key = _describe(model, (), leaves, paths, {}, set())
    return leaves, Structure(key, model, tuple(paths))


class _ReadBack(ParamStream):
    """The stream a hand-written instance reads its new tensors from: they may be torch's
    wrapped or stacked tensors, so nothing is checked against the old ones."""

    __slots__ = ()

    def verify(self) -> None:
        """Check nothing (see the class)."""
        return None


def _rebuild(template: Any, key: Key, leaves: list[Any], counter: list[int]) -> Any:
    kind = key[0]
    if kind == "leaf":
        counter[0] += 1
        return leaves[counter[0] - 1]
    if kind == "tie":
        return leaves[key[1]]
    if kind == "static":
        return template
    node = node_for(type(template))
    if isinstance(node, HandWrittenNode):
        old = list(node.flatten_fn(template))
        new = [_rebuild(c, k, leaves, counter) for c, k in zip(old, key[2], strict=True)]
        if _unchanged(new, old):
            return template
        return node._run(template, _ReadBack(new))
    old = list(node.values(template))
    new = [_rebuild(c, k, leaves, counter) for c, k in zip(old, key[2], strict=True)]
    if _unchanged(new, old):
        return template
    return node.rebuild(template, new)


def _unchanged(new: list[Any], old: list[Any]) -> bool:
    """Whether every rebuilt child is the old one (then the old value is kept, as it is).

    Not asked while torch.compile traces (an unflatten inside a compiled function): dynamo
    cannot trace ``is`` between tuples, and there the children are new anyway.
    """
    if torch.compiler.is_compiling():
        return False
    return all(n is o for n, o in zip(new, old, strict=True))


def tree_unflatten_model(leaves: Iterable[Any], structure: Structure) -> Any:
    """The model of ``structure`` with ``leaves`` in place of its tensors, as they are.

    Example:
        >>> from diffprog.nn import LinearSpec
        >>> layer = sample(LinearSpec(3, 1))
        >>> leaves, structure = tree_flatten_model(layer)
        >>> doubled = tree_unflatten_model([t * 2 for t in leaves], structure)
        >>> type(doubled).__name__, type(doubled.weight).__name__
        ('Linear', 'Tensor')
    """
    return _rebuild(structure.template, structure.key, _distinct(list(leaves)), [0])


def _distinct(leaves: list[Any]) -> list[Any]:
    """``leaves`` as distinct objects, non-tensors boxed (see ``_Leaf``).

    A flatten lists a tensor met at several places once (a tie), so one tensor given for two
    leaves (``tree_map(lambda t: zero, model)``) would flatten back as one leaf: the second
    gets an alias (``view_as``: same storage, same autograd history) instead.
    """
    seen: set[int] = set()
    out: list[Any] = []
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            leaf = _Leaf(leaf)
        elif id(leaf) in seen:
            leaf = leaf.view_as(leaf)
        seen.add(id(leaf))
        out.append(leaf)
    return out


def _flatten_with_keys(model: Any) -> tuple[list[tuple[Any, torch.Tensor]], Structure]:
    leaves, structure = tree_flatten_model(model)
    # torch.export knows torch's own key types only; the state_dict path names the input.
    keys: list[Any] = [
        torch_pytree.MappingKey(p) if p else torch_pytree.SequenceKey(i)
        for i, p in enumerate(structure.paths)
    ]
    return list(zip(keys, leaves, strict=True)), structure


def register_pytree(cls: type) -> None:
    """Register ``cls`` with torch's pytree registry as a model (see the module's docstring).

    Done for you for every ``Parameterized`` class (when it is created) and every type given
    to ``register_parameterized``; call it for a class with hand-written ``flatten_parameters``
    and ``replace_own_parameters`` that is not a ``Parameterized`` subclass, before giving one
    to a transformation (diffprog also registers it the first time it traverses one). A class
    already in the registry is left as it is.

    Args:
        cls: the model class.

    Example:
        >>> import torch.utils._pytree as pytree
        >>> from diffprog.nn import LinearSpec
        >>> layer = sample(LinearSpec(3, 1))
        >>> [tuple(t.shape) for t in pytree.tree_leaves(layer)]
        [(1, 3), (1,)]
    """
    if cls in torch_pytree.SUPPORTED_NODES:
        return
    torch_pytree.register_pytree_node(
        cls,
        tree_flatten_model,
        tree_unflatten_model,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=_flatten_with_keys,
    )
