"""``Embedding``: a lookup table of vectors, and its spec (Hasktorch's typed ``Embedding``)."""

from __future__ import annotations

import dataclasses
import operator
from typing import cast

import torch
import torch.nn.functional as F

from diffprog import DeviceLike, Parameter, Parameterized, init_parameter, make_independent

__all__ = ["Embedding", "EmbeddingSpec"]


def _padding_index(owner: str, padding_idx: int | None, num_embeddings: int) -> int | None:
    """``padding_idx`` checked and made non-negative, as torch.nn.Embedding does."""
    if padding_idx is None:
        return None
    index = operator.index(padding_idx)
    if not -num_embeddings <= index < num_embeddings:
        raise ValueError(
            f"{owner}: padding_idx = {padding_idx} is not a row of the table "
            f"(num_embeddings = {num_embeddings}); use an index in "
            f"[-{num_embeddings}, {num_embeddings}) or None."
        )
    return index + num_embeddings if index < 0 else index


class Embedding(Parameterized):
    """A table of ``num_embeddings`` vectors of size ``embedding_dim``, looked up by index.

    As ``torch.nn.Embedding``: ``layer(input)`` maps an integer tensor of any shape ``[*]`` to
    ``[*, embedding_dim]``. The row at ``padding_idx`` gets no gradient.

    ``max_norm`` differs from torch.nn in one respect, because a layer is a value: torch.nn
    renormalises the looked-up rows of its weight *in place* (under ``no_grad``) before the
    lookup; here the looked-up rows are renormalised out of place and ``weight`` stays as it
    was. The output is the same (each vector longer than ``max_norm`` in the ``norm_type``-norm
    is scaled by ``max_norm / (norm + 1e-7)``); the gradient is the gradient of that function,
    so for the over-long rows it flows through the rescaling, where torch.nn's is the plain
    lookup gradient taken at the renormalised row. Rows within ``max_norm`` get the same
    gradient as in torch.nn.

    Attributes:
        weight: ``[num_embeddings, embedding_dim]``, a Parameter. A frozen table (see
            :meth:`from_pretrained`) holds a plain tensor here instead, which
            ``flatten_parameters`` skips, as for any field.
        padding_idx: the padding row (made non-negative), or ``None``.
        max_norm: renormalise looked-up vectors longer than this, or ``None``.
        norm_type: the ``p`` of the p-norm for ``max_norm``.
        scale_grad_by_freq: scale gradients by the inverse frequency of the words in the
            mini-batch.
        sparse: the gradient w.r.t. ``weight`` is a sparse tensor (torch.nn's ``sparse=True``).

    Example:
        >>> embed = sample(EmbeddingSpec(10, 3, padding_idx=0))
        >>> embed
        Embedding(
          weight=f32[10,3],
          padding_idx=0,
          max_norm=None,
          norm_type=2.0,
          scale_grad_by_freq=False,
          sparse=False,
        )
        >>> embed(torch.tensor([[0, 2], [4, 9]])).shape
        torch.Size([2, 2, 3])
    """

    weight: Parameter
    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    scale_grad_by_freq: bool = False
    sparse: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.weight, torch.Tensor) or self.weight.dim() != 2:
            got = tuple(self.weight.shape) if isinstance(self.weight, torch.Tensor) else None
            raise ValueError(
                f"{owner}: weight must be a 2-d tensor [num_embeddings, embedding_dim], "
                f"got shape {got}."
            )
        index = _padding_index(owner, self.padding_idx, self.weight.shape[0])
        object.__setattr__(self, "padding_idx", index)

    @property
    def num_embeddings(self) -> int:
        """The size of the table (``weight.shape[0]``), as torch.nn's attribute."""
        return int(self.weight.shape[0])

    @property
    def embedding_dim(self) -> int:
        """The size of each vector (``weight.shape[1]``), as torch.nn's attribute."""
        return int(self.weight.shape[1])

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        """Look up the vectors of ``input``, as ``torch.nn.Embedding.forward``.

        Args:
            input: an integer (``int64`` or ``int32``) tensor of indices, any shape ``[*]``.

        Returns:
            ``[*, embedding_dim]``.

        Raises:
            RuntimeError: ``input`` is not an integer tensor, or an index is out of range
                (from torch).

        Example:
            >>> table = Embedding(make_independent(torch.eye(3) * 2), max_norm=1.0)
            >>> round(table(torch.tensor([1])).norm().item(), 4)  # renormalised to max_norm
            1.0
            >>> table.weight[1].tolist()  # the table itself is left as it was
            [0.0, 2.0, 0.0]
        """
        out = F.embedding(
            input, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse
        )
        if self.max_norm is None:
            return out
        # torch's embedding_renorm_: the norm and the scale in double, the scale then applied
        # in the table's dtype.
        norm = torch.linalg.vector_norm(out, ord=self.norm_type, dim=-1, keepdim=True).double()
        max_norm = norm.new_tensor(self.max_norm)  # a true division (number / tensor is not)
        scale = torch.where(norm > max_norm, max_norm / (norm + 1e-7), 1.0)
        return out * scale.to(out.dtype)

    @classmethod
    def from_pretrained(
        cls,
        embeddings: torch.Tensor,
        freeze: bool = True,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
    ) -> Embedding:
        """A table holding ``embeddings``, as ``torch.nn.Embedding.from_pretrained``.

        Args:
            embeddings: ``[num_embeddings, embedding_dim]``; shared, not copied.
            freeze: keep the table fixed: it is stored as a plain tensor, so it is not among
                ``flatten_parameters`` (and not trained). torch.nn keeps a frozen table as a
                parameter with ``requires_grad=False``; here being a parameter *is* being
                trainable. ``False``: the table is a fresh Parameter (``make_independent``).
            padding_idx: as for :class:`EmbeddingSpec` (the row is not zeroed).
            max_norm: as for :class:`EmbeddingSpec`.
            norm_type: as for :class:`EmbeddingSpec`.
            scale_grad_by_freq: as for :class:`EmbeddingSpec`.
            sparse: as for :class:`EmbeddingSpec`.

        Returns:
            The layer.

        Raises:
            ValueError: ``embeddings`` is not 2-d, or ``padding_idx`` is out of range.

        Example:
            >>> table = Embedding.from_pretrained(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
            >>> table(torch.tensor([1])).tolist(), flatten_parameters(table)
            ([[3.0, 4.0]], [])
        """
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError(
                "Embedding.from_pretrained: embeddings must be a 2-d tensor "
                "[num_embeddings, embedding_dim]."
            )
        # A constant where a Parameter would be is how a frozen layer looks in diffprog.
        weight = cast(Parameter, embeddings.detach()) if freeze else make_independent(embeddings)
        return cls(weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)


@dataclasses.dataclass(frozen=True)
class EmbeddingSpec:
    """The spec of :class:`Embedding`, with ``torch.nn.Embedding``'s arguments and defaults.

    ``sample`` draws the table from ``N(0, 1)`` and zeroes the ``padding_idx`` row, as
    torch.nn does; with the same seed the weight equals ``torch.nn.Embedding``'s bit for bit.

    Attributes:
        num_embeddings: the size of the table.
        embedding_dim: the size of each vector.
        padding_idx: a row that gets no gradient and starts at zero (negative counts from
            the end), or ``None``.
        max_norm: renormalise looked-up vectors longer than this (see :class:`Embedding`).
        norm_type: the ``p`` of the p-norm for ``max_norm``.
        scale_grad_by_freq: scale gradients by the inverse frequency of words in the batch.
        sparse: give the weight a sparse gradient.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> reference = torch.nn.Embedding(5, 2, padding_idx=1)
        >>> ours = sample(EmbeddingSpec(5, 2, padding_idx=1), generator=torch.Generator().manual_seed(0))
        >>> torch.equal(ours.weight, reference.weight), ours.weight[1].tolist()
        (True, [0.0, 0.0])
    """  # noqa: E501

    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    scale_grad_by_freq: bool = False
    sparse: bool = False

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Embedding:
        """Sample an :class:`Embedding` with PyTorch's default initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the table lives (``"meta"``: shape only, nothing drawn).
            dtype: its floating point dtype.

        Returns:
            The layer.

        Raises:
            ValueError: ``padding_idx`` is out of range.
        """
        index = _padding_index(type(self).__name__, self.padding_idx, self.num_embeddings)

        def init(t: torch.Tensor, g: torch.Generator | None) -> None:
            torch.nn.init.normal_(t, generator=g)
            if index is not None:
                t[index].fill_(0)

        weight = init_parameter(
            (self.num_embeddings, self.embedding_dim),
            init,
            generator=generator,
            device=device,
            dtype=dtype,
        )
        return Embedding(
            weight,
            index,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
