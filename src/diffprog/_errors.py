"""The exceptions diffprog raises, each able to name the place in a model where it happened."""

from __future__ import annotations

from typing import Any

# One step of a path into a model: a field/attribute name, a sequence index or a dict key.
# ("inline", "layers") is a field left out of state_dict names (see diffprog.field(inline=True)).
PathKey = tuple[str, Any]  # ("attr", "weight") | ("index", 2) | ("key", "enc")


def render_path(keys: list[PathKey] | tuple[PathKey, ...], root: str = "") -> str:
    """Render path keys Python-accessor style: ``blocks[2].linear.weight``, ``heads['q']``."""
    out = [root]
    for kind, key in keys:
        if kind in ("attr", "inline"):
            out.append(f".{key}" if (out[-1] or len(out) > 1) else str(key))
        elif kind == "index":
            out.append(f"[{key}]")
        else:
            out.append(f"[{key!r}]")
    text = "".join(out)
    return text or "<root>"


def state_dict_path(keys: list[PathKey] | tuple[PathKey, ...]) -> str:
    """Render path keys in PyTorch ``state_dict`` style: ``blocks.2.linear.weight``."""
    return ".".join(str(key) for kind, key in keys if kind != "inline")


class DiffprogError(Exception):
    """Base class of every error diffprog raises."""


class DiffprogWarning(UserWarning):
    """Base class of every warning diffprog gives.

    Filter them all with ``warnings.filterwarnings("ignore", category=dp.DiffprogWarning)``,
    or a single kind by its subclass (e.g. ``diffprog.nn.ModeWarning``).
    """


class ModelError(DiffprogError):
    """An error at a place inside a model; the message names that place.

    The path is collected while the exception travels up through the traversal, so the
    happy path pays nothing for it.
    """

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        self._reversed_keys: list[PathKey] = []
        self.root: str = ""

    def push(self, kind: str, key: Any) -> None:
        """Record one more (outer) step of the path; called while unwinding."""
        self._reversed_keys.append((kind, key))

    @property
    def path_keys(self) -> tuple[PathKey, ...]:
        """The path from the root of the model to the place of the error."""
        return tuple(reversed(self._reversed_keys))

    @property
    def path(self) -> str:
        """The path as text, e.g. ``blocks[2].linear.weight``."""
        return render_path(self.path_keys)

    def __str__(self) -> str:
        if not self._reversed_keys and not self.root:  # not inside a model (a declaration)
            return f"{self.problem}. {self.fix}".rstrip()
        where = render_path(self.path_keys)
        root = f" of the {self.root}" if self.root else ""
        text = f"{self.problem} (at {where}{root})."
        if self.fix:
            text += f" {self.fix}"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class ParameterCountError(ModelError, ValueError):
    """The parameter list given to ``replace_parameters`` is too short or too long."""


class ParameterShapeError(ModelError, ValueError):
    """A replacement parameter's shape, dtype or device differs from the slot it fills."""


class ParameterTypeError(ModelError, TypeError):
    """Something that is not a tensor was given where a parameter goes."""


class CycleError(ModelError, ValueError):
    """A model value contains itself."""


class HiddenParameterError(ModelError, TypeError):
    """A Parameter sits where diffprog cannot traverse (a plain object, a ``torch.nn.Module``)."""


class InstanceError(ModelError, TypeError):
    """A hand-written or registered Parameterized instance is inconsistent."""


class NameClashError(ModelError, ValueError):
    """Two different parameters would get the same ``named_parameters``/``state_dict`` name."""


class UnsampledSpecError(ModelError, TypeError):
    """A spec (something to ``sample``) was given where a model field expects a sampled layer."""
