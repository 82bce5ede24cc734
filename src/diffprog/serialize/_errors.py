"""The errors of saving and loading: every one names the file (or the state dict) and the keys."""

from __future__ import annotations

from collections.abc import Sequence

from diffprog._errors import DiffprogError

__all__ = ["LoadError", "SaveError"]

# A message lists at most this many keys per kind; the error's attributes hold all of them.
_SHOWN = 50


def quoted(keys: Sequence[str], limit: int = _SHOWN) -> str:
    """``'a', 'b', 'c'`` (and ``... and 7 more`` past ``limit``)."""
    text = ", ".join(repr(k) for k in keys[:limit])
    if len(keys) > limit:
        text += f", ... and {len(keys) - limit} more"
    return text


class LoadError(DiffprogError, ValueError):
    """A file or state dict that cannot be loaded into the model given; nothing was loaded.

    Raised for a truncated or corrupt file, a file of another format, a pickle that asks for
    anything but tensors, keys the model does not have or lacks, shapes or dtypes that differ
    from the model's, tied keys with different values and (when asked) non-finite values.

    Attributes:
        source: the file's path, or ``"the state dict"``.
        missing_keys: keys of the model that the source lacks.
        unexpected_keys: keys of the source (as written there) that the model does not have.
        mismatched_keys: keys whose shape or dtype differs from the model's, tied keys whose
            values differ, and keys with non-finite values (``check_finite=True``).
    """

    def __init__(
        self,
        message: str,
        *,
        source: str = "",
        missing_keys: Sequence[str] = (),
        unexpected_keys: Sequence[str] = (),
        mismatched_keys: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.source = source
        self.missing_keys = list(missing_keys)
        self.unexpected_keys = list(unexpected_keys)
        self.mismatched_keys = list(mismatched_keys)


class SaveError(DiffprogError, ValueError):
    """A model or state dict that cannot be written (a tensor without data, a key clash)."""
