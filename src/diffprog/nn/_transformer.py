"""Transformer layers, stacks and the encoder-decoder model, as torch.nn's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from diffprog import (
    DeviceLike,
    Parameterized,
    Randomizable,
    flatten_parameters,
    init_parameter,
    make_independent,
    replace_parameters,
    sample,
)
from diffprog.nn._attention import (
    MultiheadAttention,
    MultiheadAttentionSpec,
    generate_square_subsequent_mask,
)
from diffprog.nn._dropout import Dropout
from diffprog.nn._linear import Linear, LinearSpec
from diffprog.nn._norm import LayerNorm, LayerNormSpec
from diffprog.nn._state import is_training

__all__ = [
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerDecoderLayerSpec",
    "TransformerDecoderSpec",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "TransformerEncoderLayerSpec",
    "TransformerEncoderSpec",
    "TransformerSpec",
]

Activation = Callable[[torch.Tensor], torch.Tensor]
T = TypeVar("T")


def _activation(activation: str | Activation) -> Activation:
    """Resolve ``"relu"``/``"gelu"`` to torch's functions; check that anything else is callable."""
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise ValueError(
            f"activation should be 'relu' or 'gelu', not {activation!r}; for anything else pass "
            f"the function itself, e.g. activation=torch.nn.functional.silu."
        )
    if not callable(activation):
        raise TypeError(
            f"activation must be 'relu', 'gelu' or a callable, got {type(activation).__name__}."
        )
    return activation


def _check_sizes(d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
    if d_model <= 0 or nhead <= 0 or dim_feedforward <= 0:
        raise ValueError(
            f"d_model, nhead and dim_feedforward must be greater than 0, got d_model={d_model}, "
            f"nhead={nhead}, dim_feedforward={dim_feedforward}."
        )
    if d_model % nhead != 0:
        raise ValueError(
            f"d_model ({d_model}) must be divisible by nhead ({nhead}); each head gets "
            f"d_model // nhead features."
        )
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout}")


def _clones(layer: T, num_layers: int) -> tuple[T, ...]:
    """``num_layers`` copies of ``layer`` with their own (equal) parameters: torch's deep copy."""
    if num_layers <= 0:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
    params = flatten_parameters(layer)
    copies = [
        replace_parameters(layer, [make_independent(p.detach().clone()) for p in params])
        for _ in range(num_layers - 1)
    ]
    return (layer, *copies)


def _is_causal_mask(mask: torch.Tensor | None, is_causal: bool | None, size: int) -> bool:
    """torch's ``_detect_is_causal_mask``: ``is_causal`` if given, else whether ``mask`` is."""
    if is_causal is not None or mask is None:
        return is_causal is True
    causal = generate_square_subsequent_mask(size, device=mask.device, dtype=mask.dtype)
    return mask.shape == causal.shape and bool((mask == causal).all())


def _seq_len(x: torch.Tensor, batch_first: bool) -> int:
    if x.dim() == 2:  # unbatched: [seq, feature]
        return int(x.shape[0])
    return int(x.shape[1 if batch_first else 0])


class TransformerEncoderLayer(Parameterized, kw_only=True):
    """Self-attention and a feed-forward block, as ``torch.nn.TransformerEncoderLayer``.

    Post-norm (the default, as in "Attention Is All You Need")::

        x = norm1(x + dropout1(self_attn(x)))
        x = norm2(x + dropout2(linear2(dropout(activation(linear1(x))))))

    Pre-norm (``norm_first=True``) normalises before each block instead:
    ``x = x + dropout1(self_attn(norm1(x)))``, ``x = x + dropout2(ff(norm2(x)))``.
    Dropout is active in training mode only. Build it with
    :class:`TransformerEncoderLayerSpec`.

    Attributes:
        self_attn: the self-attention.
        linear1: ``d_model -> dim_feedforward``.
        dropout: dropout after the activation.
        linear2: ``dim_feedforward -> d_model``.
        norm_first: pre-norm if ``True``, post-norm if ``False``.
        norm1: the norm around the attention block.
        norm2: the norm around the feed-forward block.
        dropout1: dropout on the attention block's output.
        dropout2: dropout on the feed-forward block's output.
        activation: the feed-forward activation (a function, or a layer value).

    Example:
        >>> spec = TransformerEncoderLayerSpec(d_model=8, nhead=2, dim_feedforward=16,
        ...                                    batch_first=True)
        >>> layer = sample(spec, generator=torch.Generator().manual_seed(0))
        >>> with dp.nn.evaluating():  # explicit eval mode: no dropout, no warning
        ...     layer(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
        >>> [name for name, _ in named_parameters(layer)][:3]
        ['self_attn.in_proj_weight', 'self_attn.in_proj_bias', 'self_attn.out_proj.weight']
    """

    self_attn: MultiheadAttention
    linear1: Linear
    dropout: Dropout
    linear2: Linear
    norm_first: bool = False
    norm1: LayerNorm
    norm2: LayerNorm
    dropout1: Dropout
    dropout2: Dropout
    activation: Activation = F.relu

    def __call__(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Apply the layer, as ``torch.nn.TransformerEncoderLayer.forward``.

        Args:
            src: ``[S, N, E]`` (``[N, S, E]`` with ``batch_first``), or unbatched ``[S, E]``.
            src_mask: ``[S, S]`` or ``[N * nhead, S, S]`` attention mask, bool (``True``:
                not allowed) or float (added to the scores).
            src_key_padding_mask: ``[N, S]``, ``True`` (bool) where ``src`` is padding.
            is_causal: a hint that ``src_mask`` is the causal mask (it must be given too).
            training: dropout on if ``True``; default: whether a ``diffprog.nn.training``
                pass runs.
            generator: the random source for dropout (default: the training pass's, else
                torch's global one).

        Returns:
            The output, shaped as ``src``.

        Raises:
            ValueError: inputs or masks of the wrong shape, or ``is_causal=True`` without
                ``src_mask`` (from :class:`MultiheadAttention`).

        Example:
            >>> layer = sample(TransformerEncoderLayerSpec(8, 2, dim_feedforward=16))
            >>> causal = generate_square_subsequent_mask(5)
            >>> with dp.nn.evaluating():  # explicit eval mode: no dropout, no warning
            ...     layer(torch.randn(5, 2, 8), src_mask=causal, is_causal=True).shape
            torch.Size([5, 2, 8])
        """
        x = src
        if self.norm_first:
            x = x + self._sa_block(
                self.norm1(x), src_mask, src_key_padding_mask, is_causal, training, generator
            )
            x = x + self._ff_block(self.norm2(x), training, generator)
        else:
            x = self.norm1(
                x
                + self._sa_block(x, src_mask, src_key_padding_mask, is_causal, training, generator)
            )
            x = self.norm2(x + self._ff_block(x, training, generator))
        return x

    def _sa_block(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
        training: bool | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        return _attention_block(
            self.self_attn,
            self.dropout1,
            x,
            x,
            attn_mask,
            key_padding_mask,
            is_causal,
            training,
            generator,
        )

    def _ff_block(
        self, x: torch.Tensor, training: bool | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        return _feed_forward_block(self, self.dropout2, x, training, generator)


@dataclasses.dataclass(frozen=True)
class TransformerEncoderLayerSpec:
    """The spec of :class:`TransformerEncoderLayer`, with torch.nn's arguments.

    The fields are ``torch.nn.TransformerEncoderLayer``'s arguments, with its defaults.

    ``sample`` draws in torch.nn's order (``self_attn``, ``linear1``, ``linear2``; the norms
    are ones and zeros), so with the same seed the weights equal torch.nn's bit for bit.

    Attributes:
        d_model: the number of expected features in the input.
        nhead: the number of attention heads.
        dim_feedforward: the hidden size of the feed-forward block.
        dropout: the dropout probability (attention weights and the three dropout sites).
        activation: ``"relu"``, ``"gelu"`` or a callable (default ``torch.nn.functional.relu``).
        layer_norm_eps: the norms' ``eps``.
        batch_first: inputs and outputs are ``[batch, seq, feature]``.
        norm_first: pre-norm (normalise before the attention and feed-forward blocks).
        bias: whether the linear layers and the norms have biases.

    Raises:
        ValueError: non-positive sizes, ``d_model`` not divisible by ``nhead``, a dropout
            probability outside ``[0, 1]``, or an unknown activation name.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> reference = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
        >>> ours = sample(TransformerEncoderLayerSpec(8, 2, dim_feedforward=16),
        ...               generator=torch.Generator().manual_seed(0))
        >>> torch.equal(ours.linear2.weight, reference.linear2.weight)
        True
    """

    d_model: int
    nhead: int
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str | Activation = F.relu
    layer_norm_eps: float = 1e-5
    batch_first: bool = False
    norm_first: bool = False
    bias: bool = True

    def __post_init__(self) -> None:
        _check_sizes(self.d_model, self.nhead, self.dim_feedforward, self.dropout)
        _activation(self.activation)

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> TransformerEncoderLayer:
        """Sample a :class:`TransformerEncoderLayer` with PyTorch's initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The layer.
        """
        kw: dict[str, Any] = {"generator": generator, "device": device, "dtype": dtype}
        d, ff = self.d_model, self.dim_feedforward
        attn = MultiheadAttentionSpec(
            d, self.nhead, dropout=self.dropout, bias=self.bias, batch_first=self.batch_first
        )
        norm = LayerNormSpec(d, eps=self.layer_norm_eps, bias=self.bias)
        return TransformerEncoderLayer(
            self_attn=sample(attn, **kw),
            linear1=sample(LinearSpec(d, ff, bias=self.bias), **kw),
            dropout=Dropout(self.dropout),
            linear2=sample(LinearSpec(ff, d, bias=self.bias), **kw),
            norm_first=self.norm_first,
            norm1=sample(norm, **kw),
            norm2=sample(norm, **kw),
            dropout1=Dropout(self.dropout),
            dropout2=Dropout(self.dropout),
            activation=_activation(self.activation),
        )


class TransformerDecoderLayer(Parameterized, kw_only=True):
    """Self-attention, attention to ``memory``, feed-forward: ``torch.nn.TransformerDecoderLayer``.

    Post-norm (the default)::

        x = norm1(x + dropout1(self_attn(x)))
        x = norm2(x + dropout2(multihead_attn(x, memory)))
        x = norm3(x + dropout3(linear2(dropout(activation(linear1(x))))))

    Pre-norm (``norm_first=True``) computes ``x = x + block(norm(x))`` for each block. Build
    it with :class:`TransformerDecoderLayerSpec`.

    Attributes:
        self_attn: the self-attention over the target.
        multihead_attn: the attention from the target to ``memory``.
        linear1: ``d_model -> dim_feedforward``.
        dropout: dropout after the activation.
        linear2: ``dim_feedforward -> d_model``.
        norm_first: pre-norm if ``True``, post-norm if ``False``.
        norm1: the norm around the self-attention block.
        norm2: the norm around the cross-attention block.
        norm3: the norm around the feed-forward block.
        dropout1: dropout on the self-attention block's output.
        dropout2: dropout on the cross-attention block's output.
        dropout3: dropout on the feed-forward block's output.
        activation: the feed-forward activation.

    Example:
        >>> layer = sample(TransformerDecoderLayerSpec(8, 2, dim_feedforward=16))
        >>> tgt, memory = torch.randn(4, 2, 8), torch.randn(6, 2, 8)
        >>> with dp.nn.evaluating():  # explicit eval mode: no dropout, no warning
        ...     layer(tgt, memory).shape
        torch.Size([4, 2, 8])
    """

    self_attn: MultiheadAttention
    multihead_attn: MultiheadAttention
    linear1: Linear
    dropout: Dropout
    linear2: Linear
    norm_first: bool = False
    norm1: LayerNorm
    norm2: LayerNorm
    norm3: LayerNorm
    dropout1: Dropout
    dropout2: Dropout
    dropout3: Dropout
    activation: Activation = F.relu

    def __call__(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Apply the layer, as ``torch.nn.TransformerDecoderLayer.forward``.

        Args:
            tgt: ``[T, N, E]`` (``[N, T, E]`` with ``batch_first``), or unbatched ``[T, E]``.
            memory: ``[S, N, E]``: the encoder's output.
            tgt_mask: ``[T, T]`` (or ``[N * nhead, T, T]``) mask for the self-attention.
            memory_mask: ``[T, S]`` (or ``[N * nhead, T, S]``) mask for the cross-attention.
            tgt_key_padding_mask: ``[N, T]``, ``True`` (bool) where ``tgt`` is padding.
            memory_key_padding_mask: ``[N, S]``, ``True`` (bool) where ``memory`` is padding.
            tgt_is_causal: a hint that ``tgt_mask`` is the causal mask.
            memory_is_causal: a hint that ``memory_mask`` is the causal mask.
            training: dropout on if ``True``; default: whether a ``diffprog.nn.training``
                pass runs.
            generator: the random source for dropout.

        Returns:
            The output, shaped as ``tgt``.

        Raises:
            ValueError: inputs or masks of the wrong shape, or a causal hint without its mask
                (from :class:`MultiheadAttention`).

        Example:
            >>> layer = sample(TransformerDecoderLayerSpec(8, 2, dim_feedforward=16))
            >>> tgt, memory = torch.randn(4, 8), torch.randn(6, 8)  # unbatched
            >>> mask = generate_square_subsequent_mask(4)
            >>> with dp.nn.evaluating():  # explicit eval mode: no dropout, no warning
            ...     layer(tgt, memory, tgt_mask=mask, tgt_is_causal=True).shape
            torch.Size([4, 8])
        """
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(
                self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal, training, generator
            )
            x = x + self._mha_block(
                self.norm2(x),
                memory,
                memory_mask,
                memory_key_padding_mask,
                memory_is_causal,
                training,
                generator,
            )
            x = x + self._ff_block(self.norm3(x), training, generator)
        else:
            x = self.norm1(
                x
                + self._sa_block(
                    x, tgt_mask, tgt_key_padding_mask, tgt_is_causal, training, generator
                )
            )
            x = self.norm2(
                x
                + self._mha_block(
                    x,
                    memory,
                    memory_mask,
                    memory_key_padding_mask,
                    memory_is_causal,
                    training,
                    generator,
                )
            )
            x = self.norm3(x + self._ff_block(x, training, generator))
        return x

    def _sa_block(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
        training: bool | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        return _attention_block(
            self.self_attn,
            self.dropout1,
            x,
            x,
            attn_mask,
            key_padding_mask,
            is_causal,
            training,
            generator,
        )

    def _mha_block(
        self,
        x: torch.Tensor,
        mem: torch.Tensor,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
        training: bool | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        return _attention_block(
            self.multihead_attn,
            self.dropout2,
            x,
            mem,
            attn_mask,
            key_padding_mask,
            is_causal,
            training,
            generator,
        )

    def _ff_block(
        self, x: torch.Tensor, training: bool | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        return _feed_forward_block(self, self.dropout3, x, training, generator)


@dataclasses.dataclass(frozen=True)
class TransformerDecoderLayerSpec:
    """The spec of :class:`TransformerDecoderLayer`, with torch.nn's arguments.

    The fields are ``torch.nn.TransformerDecoderLayer``'s arguments, with its defaults.

    ``sample`` draws in torch.nn's order (``self_attn``, ``multihead_attn``, ``linear1``,
    ``linear2``), so with the same seed the weights equal torch.nn's bit for bit.

    Attributes:
        d_model: the number of expected features in the input.
        nhead: the number of attention heads.
        dim_feedforward: the hidden size of the feed-forward block.
        dropout: the dropout probability.
        activation: ``"relu"``, ``"gelu"`` or a callable (default ``torch.nn.functional.relu``).
        layer_norm_eps: the norms' ``eps``.
        batch_first: inputs and outputs are ``[batch, seq, feature]``.
        norm_first: pre-norm.
        bias: whether the linear layers and the norms have biases.

    Raises:
        ValueError: as :class:`TransformerEncoderLayerSpec`.

    Example:
        >>> layer = sample(TransformerDecoderLayerSpec(8, 2, norm_first=True))
        >>> [name for name, _ in named_parameters(layer)][4:6]
        ['multihead_attn.in_proj_weight', 'multihead_attn.in_proj_bias']
    """

    d_model: int
    nhead: int
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str | Activation = F.relu
    layer_norm_eps: float = 1e-5
    batch_first: bool = False
    norm_first: bool = False
    bias: bool = True

    def __post_init__(self) -> None:
        _check_sizes(self.d_model, self.nhead, self.dim_feedforward, self.dropout)
        _activation(self.activation)

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> TransformerDecoderLayer:
        """Sample a :class:`TransformerDecoderLayer` with PyTorch's initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The layer.
        """
        kw: dict[str, Any] = {"generator": generator, "device": device, "dtype": dtype}
        d, ff = self.d_model, self.dim_feedforward
        attn = MultiheadAttentionSpec(
            d, self.nhead, dropout=self.dropout, bias=self.bias, batch_first=self.batch_first
        )
        norm = LayerNormSpec(d, eps=self.layer_norm_eps, bias=self.bias)
        return TransformerDecoderLayer(
            self_attn=sample(attn, **kw),
            multihead_attn=sample(attn, **kw),
            linear1=sample(LinearSpec(d, ff, bias=self.bias), **kw),
            dropout=Dropout(self.dropout),
            linear2=sample(LinearSpec(ff, d, bias=self.bias), **kw),
            norm_first=self.norm_first,
            norm1=sample(norm, **kw),
            norm2=sample(norm, **kw),
            norm3=sample(norm, **kw),
            dropout1=Dropout(self.dropout),
            dropout2=Dropout(self.dropout),
            dropout3=Dropout(self.dropout),
            activation=_activation(self.activation),
        )


def _nested_fast_path_keep(
    encoder: TransformerEncoder,
    src: torch.Tensor,
    mask: torch.Tensor | None,
    src_key_padding_mask: torch.Tensor | None,
    training: bool,
) -> torch.Tensor | None:
    """Where torch.nn.TransformerEncoder's nested-tensor path keeps tokens, if it takes it.

    In eval mode with nothing to differentiate, torch.nn's encoder packs a batch_first input
    with a key padding mask into a nested tensor (only the tokens kept), runs the layers on it
    and pads the result back with zeros: its output is 0 at padded positions, where the
    regular computation gives values. This returns the ``[N, S]`` bool mask of kept tokens
    when torch would take that path (its conditions in ``TransformerEncoder.__init__`` and
    ``forward``, in torch's order), else ``None``. A mask that is not left-aligned (padding only
    at the end of each row) is never converted: torch checks that (``mask_check``) or, with
    ``mask_check=False``, mis-converts it, which is not something to reproduce.
    """
    if (
        src_key_padding_mask is None
        or mask is not None
        or training
        or not encoder.enable_nested_tensor
        or src.dim() != 3
        or src.is_nested
        or not torch.backends.mha.get_fastpath_enabled()
    ):
        return None
    first = encoder.layers[0]
    attn = first.self_attn
    # torch.nn.TransformerEncoder.__init__'s conditions on the layer (use_nested_tensor).
    if (
        not isinstance(first, TransformerEncoderLayer)
        or first.norm_first
        or not attn.batch_first
        or attn.in_proj_weight is None  # kdim/vdim differ from embed_dim
        or attn.in_proj_bias is None
        or not (
            first.activation is F.relu
            or first.activation is F.gelu
            or isinstance(first.activation, (torch.nn.ReLU, torch.nn.GELU))
        )
        or first.norm1.eps != first.norm2.eps
        or attn.num_heads % 2 == 1
    ):
        return None
    if encoder.mask_check and torch.compiler.is_compiling():
        return None
    if torch.is_autocast_enabled():
        return None
    batch, length = src.shape[:2]
    if src_key_padding_mask.shape != (batch, length):
        return None  # the layers report the wrong shape
    tensors = [
        t
        for t in (
            src,
            attn.in_proj_weight,
            attn.in_proj_bias,
            attn.out_proj.weight,
            attn.out_proj.bias,
            first.norm1.weight,
            first.norm1.bias,
            first.norm2.weight,
            first.norm2.bias,
            first.linear1.weight,
            first.linear1.bias,
            first.linear2.weight,
            first.linear2.bias,
        )
        if t is not None
    ]
    if torch.overrides.has_torch_function(tensors):
        return None
    if src.device.type not in ("cpu", "cuda", "xpu", torch._C._get_privateuse1_backend_name()):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    # As torch: a bool mask is True at padding; a float one keeps exactly its zeros.
    keep = src_key_padding_mask.logical_not()
    # Left-aligned: no kept token after a padded one in any row.
    if bool((keep[:, 1:] & ~keep[:, :-1]).any()):
        return None
    return keep


class TransformerEncoder(Parameterized, kw_only=True):
    """A stack of encoder layers and an optional final norm, as ``torch.nn.TransformerEncoder``.

    Build it with :class:`TransformerEncoderSpec`. Parameters are named
    ``layers.0.self_attn.in_proj_weight``, ..., ``norm.weight`` as in PyTorch.

    Attributes:
        layers: the encoder layers, applied in order.
        norm: applied to the last layer's output, or ``None``.
        enable_nested_tensor: as torch.nn's: where torch.nn's encoder would take its
            nested-tensor path (eval mode, no gradient recorded, a batch_first input with a
            left-aligned ``src_key_padding_mask`` and no ``mask``, a post-norm first layer
            with biases, relu/gelu and an even number of heads), the outputs at padded
            positions are zero before ``norm``, as torch.nn's are. ``False``: never.
        mask_check: as torch.nn's (under ``torch.compile``, ``True`` turns that path off).

    Example:
        >>> layer = TransformerEncoderLayerSpec(8, 2, dim_feedforward=16, batch_first=True)
        >>> encoder = sample(TransformerEncoderSpec(layer, num_layers=2))
        >>> with dp.nn.evaluating():  # explicit eval mode: no dropout, no warning
        ...     encoder(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
        >>> encoder.num_layers
        2
    """

    layers: tuple[TransformerEncoderLayer, ...]
    norm: Activation | None = None
    enable_nested_tensor: bool = True
    mask_check: bool = True

    @property
    def num_layers(self) -> int:
        """The number of layers."""
        return len(self.layers)

    def __call__(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Apply the layers in turn, then the norm, as ``torch.nn.TransformerEncoder.forward``.

        Args:
            src: ``[S, N, E]`` (``[N, S, E]`` with ``batch_first``), or unbatched ``[S, E]``.
            mask: ``[S, S]`` or ``[N * nhead, S, S]`` attention mask (bool or float).
            src_key_padding_mask: ``[N, S]``, ``True`` (bool) where ``src`` is padding.
            is_causal: whether ``mask`` is the causal mask; ``None`` (the default) checks
                ``mask`` against :func:`generate_square_subsequent_mask`, as PyTorch does.
            training: dropout on if ``True``; default: whether a training pass runs.
            generator: the random source for dropout.

        Returns:
            The output, shaped as ``src``.

        Raises:
            ValueError: inputs or masks of the wrong shape (from :class:`MultiheadAttention`).

        Example:
            >>> spec = TransformerEncoderSpec(TransformerEncoderLayerSpec(8, 2, 16), 2)
            >>> encoder = sample(spec)
            >>> padding = torch.tensor([[False, False, True]])  # [batch, seq]
            >>> with dp.nn.evaluating():  # explicit eval mode: no dropout, no warning
            ...     encoder(torch.randn(3, 1, 8), src_key_padding_mask=padding).shape
            torch.Size([3, 1, 8])
        """
        causal = _is_causal_mask(
            mask, is_causal, _seq_len(src, self.layers[0].self_attn.batch_first)
        )
        train = is_training() if training is None else training
        keep = _nested_fast_path_keep(self, src, mask, src_key_padding_mask, train)
        if keep is not None:
            # torch.nn's layers then see only the kept tokens: the same as a bool padding mask
            # (a float mask's nonzero entries count as padding, as torch converts it).
            src_key_padding_mask = keep.logical_not()
        output = src
        for layer in self.layers:
            output = layer(
                output,
                src_mask=mask,
                src_key_padding_mask=src_key_padding_mask,
                is_causal=causal,
                training=training,
                generator=generator,
            )
        if keep is not None:
            output = output.masked_fill(~keep.unsqueeze(-1), 0.0)  # torch pads back with zeros
        if self.norm is not None:
            output = self.norm(output)
        return output


@dataclasses.dataclass(frozen=True)
class TransformerEncoderSpec:
    """The spec of :class:`TransformerEncoder`, with ``torch.nn.TransformerEncoder``'s arguments.

    As in PyTorch, which deep-copies ``encoder_layer``, every layer starts from the same
    weights (as separate parameters, not tied): ``sample`` samples ``encoder_layer`` once and
    copies it. For independently initialised layers, sample the layer spec ``num_layers``
    times and build ``TransformerEncoder(layers=...)`` yourself.

    Attributes:
        encoder_layer: the spec of each layer.
        num_layers: the number of layers.
        norm: the spec of the final norm (usually a ``LayerNormSpec``), or ``None``.
        enable_nested_tensor: kept on the sampled stack: where torch.nn's encoder would take
            its nested-tensor path, the outputs at padded positions are zero, as torch.nn's
            (see :class:`TransformerEncoder`).
        mask_check: kept on the sampled stack, as torch.nn's.

    Raises:
        ValueError: ``num_layers`` below 1.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
        >>> reference = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        >>> spec = TransformerEncoderSpec(TransformerEncoderLayerSpec(8, 2, dim_feedforward=16), 2)
        >>> ours = sample(spec, generator=torch.Generator().manual_seed(0))
        >>> ours_w = ours.layers[1].linear1.weight
        >>> torch.equal(ours_w, reference.layers[1].linear1.weight)
        True
    """

    encoder_layer: TransformerEncoderLayerSpec
    num_layers: int
    norm: Randomizable[Activation] | None = None
    enable_nested_tensor: bool = True
    mask_check: bool = True

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}.")

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> TransformerEncoder:
        """Sample the layer once and copy it ``num_layers`` times, as PyTorch does.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The stack.
        """
        kw: dict[str, Any] = {"generator": generator, "device": device, "dtype": dtype}
        layer = sample(self.encoder_layer, **kw)
        norm = None if self.norm is None else sample(self.norm, **kw)
        return TransformerEncoder(
            layers=_clones(layer, self.num_layers),
            norm=norm,
            enable_nested_tensor=self.enable_nested_tensor,
            mask_check=self.mask_check,
        )


class TransformerDecoder(Parameterized, kw_only=True):
    """A stack of decoder layers and an optional final norm, as ``torch.nn.TransformerDecoder``.

    Build it with :class:`TransformerDecoderSpec`.

    Attributes:
        layers: the decoder layers, applied in order, each attending to the same ``memory``.
        norm: applied to the last layer's output, or ``None``.

    Example:
        >>> layer = TransformerDecoderLayerSpec(8, 2, dim_feedforward=16)
        >>> decoder = sample(TransformerDecoderSpec(layer, num_layers=2))
        >>> tgt, memory = torch.randn(4, 3, 8), torch.randn(6, 3, 8)
        >>> causal = generate_square_subsequent_mask(4)
        >>> with dp.nn.evaluating():  # explicit eval mode: no dropout, no warning
        ...     decoder(tgt, memory, tgt_mask=causal).shape
        torch.Size([4, 3, 8])
    """

    layers: tuple[TransformerDecoderLayer, ...]
    norm: Activation | None = None

    @property
    def num_layers(self) -> int:
        """The number of layers."""
        return len(self.layers)

    def __call__(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Apply the layers in turn, then the norm, as ``torch.nn.TransformerDecoder.forward``.

        Args:
            tgt: ``[T, N, E]`` (``[N, T, E]`` with ``batch_first``), or unbatched ``[T, E]``.
            memory: ``[S, N, E]``.
            tgt_mask: ``[T, T]`` mask for the self-attention.
            memory_mask: ``[T, S]`` mask for the cross-attention.
            tgt_key_padding_mask: ``[N, T]``.
            memory_key_padding_mask: ``[N, S]``.
            tgt_is_causal: whether ``tgt_mask`` is causal; ``None`` checks it, as PyTorch.
            memory_is_causal: a hint that ``memory_mask`` is causal.
            training: dropout on if ``True``; default: whether a training pass runs.
            generator: the random source for dropout.

        Returns:
            The output, shaped as ``tgt``.

        Raises:
            ValueError: inputs or masks of the wrong shape (from :class:`MultiheadAttention`).

        Example:
            >>> spec = TransformerDecoderSpec(TransformerDecoderLayerSpec(8, 2, 16), 2)
            >>> decoder = sample(spec)
            >>> tgt, memory = torch.randn(4, 1, 8), torch.randn(3, 1, 8)
            >>> with dp.nn.evaluating():  # explicit eval mode: no dropout, no warning
            ...     decoder(tgt, memory, tgt_mask=generate_square_subsequent_mask(4)).shape
            torch.Size([4, 1, 8])
        """
        causal = _is_causal_mask(
            tgt_mask, tgt_is_causal, _seq_len(tgt, self.layers[0].self_attn.batch_first)
        )
        output = tgt
        for layer in self.layers:
            output = layer(
                output,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=causal,
                memory_is_causal=memory_is_causal,
                training=training,
                generator=generator,
            )
        if self.norm is not None:
            output = self.norm(output)
        return output


@dataclasses.dataclass(frozen=True)
class TransformerDecoderSpec:
    """The spec of :class:`TransformerDecoder`, with ``torch.nn.TransformerDecoder``'s arguments.

    As in PyTorch, every layer starts from the same weights (separate, untied parameters):
    ``sample`` samples ``decoder_layer`` once and copies it.

    Attributes:
        decoder_layer: the spec of each layer.
        num_layers: the number of layers.
        norm: the spec of the final norm, or ``None``.

    Raises:
        ValueError: ``num_layers`` below 1.

    Example:
        >>> spec = TransformerDecoderSpec(TransformerDecoderLayerSpec(8, 2), 3)
        >>> decoder = sample(spec)
        >>> torch.equal(decoder.layers[0].linear1.weight, decoder.layers[2].linear1.weight)
        True
    """

    decoder_layer: TransformerDecoderLayerSpec
    num_layers: int
    norm: Randomizable[Activation] | None = None

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}.")

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> TransformerDecoder:
        """Sample the layer once and copy it ``num_layers`` times, as PyTorch does.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The stack.
        """
        kw: dict[str, Any] = {"generator": generator, "device": device, "dtype": dtype}
        layer = sample(self.decoder_layer, **kw)
        norm = None if self.norm is None else sample(self.norm, **kw)
        return TransformerDecoder(layers=_clones(layer, self.num_layers), norm=norm)


class Transformer(Parameterized, kw_only=True):
    """An encoder-decoder transformer, as ``torch.nn.Transformer``.

    The encoder reads ``src`` into ``memory``; the decoder reads ``tgt`` attending to it.
    Build it with :class:`TransformerSpec`. Parameters are named ``encoder.layers.0...``,
    ``encoder.norm...``, ``decoder.layers.0...``, ``decoder.norm...`` as in PyTorch.

    Attributes:
        encoder: the encoder (a :class:`TransformerEncoder`, or any layer with its call).
        decoder: the decoder (a :class:`TransformerDecoder`, or any layer with its call).
        d_model: the number of features of ``src`` and ``tgt``.
        nhead: the number of attention heads.
        batch_first: inputs and outputs are ``[batch, seq, feature]``.

    Example:
        >>> spec = TransformerSpec(d_model=8, nhead=2, num_encoder_layers=1,
        ...                        num_decoder_layers=1, dim_feedforward=16)
        >>> model = sample(spec, generator=torch.Generator().manual_seed(0))
        >>> src, tgt = torch.randn(6, 2, 8), torch.randn(4, 2, 8)
        >>> mask = Transformer.generate_square_subsequent_mask(4)
        >>> with dp.nn.evaluating():  # explicit eval mode: no dropout, no warning
        ...     model(src, tgt, tgt_mask=mask).shape
        torch.Size([4, 2, 8])
    """

    encoder: Any
    decoder: Any
    d_model: int
    nhead: int
    batch_first: bool = False

    generate_square_subsequent_mask = staticmethod(generate_square_subsequent_mask)

    def __call__(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        src_is_causal: bool | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Encode ``src``, decode ``tgt`` against it, as ``torch.nn.Transformer.forward``.

        Args:
            src: ``[S, N, E]`` (``[N, S, E]`` with ``batch_first``), or unbatched ``[S, E]``.
            tgt: ``[T, N, E]`` (``[N, T, E]`` with ``batch_first``), or unbatched ``[T, E]``.
            src_mask: ``[S, S]`` mask for the encoder's self-attention.
            tgt_mask: ``[T, T]`` mask for the decoder's self-attention (usually causal).
            memory_mask: ``[T, S]`` mask for the decoder's attention to the memory.
            src_key_padding_mask: ``[N, S]``, ``True`` (bool) where ``src`` is padding.
            tgt_key_padding_mask: ``[N, T]``, ``True`` (bool) where ``tgt`` is padding.
            memory_key_padding_mask: ``[N, S]``, usually ``src_key_padding_mask``.
            src_is_causal: whether ``src_mask`` is causal (``None``: detected).
            tgt_is_causal: whether ``tgt_mask`` is causal (``None``: detected).
            memory_is_causal: a hint that ``memory_mask`` is causal.
            training: dropout on if ``True``; default: whether a training pass runs.
            generator: the random source for dropout.

        Returns:
            The decoder's output, shaped as ``tgt``.

        Raises:
            ValueError: ``src`` and ``tgt`` differ in batch size, or their feature size is not
                ``d_model``.

        Example:
            >>> spec = TransformerSpec(8, 2, 1, 1, 16, batch_first=True)
            >>> model = sample(spec)
            >>> with dp.nn.evaluating():  # explicit eval mode: no dropout, no warning
            ...     model(torch.randn(2, 5, 8), torch.randn(2, 3, 8)).shape
            torch.Size([2, 3, 8])
        """
        if src.dim() == 3:
            batch = 0 if self.batch_first else 1
            if src.shape[batch] != tgt.shape[batch]:
                raise ValueError(
                    f"the batch number of src and tgt must be equal; got src {tuple(src.shape)} "
                    f"and tgt {tuple(tgt.shape)} (batch_first={self.batch_first})."
                )
        if src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise ValueError(
                f"the feature number of src and tgt must be equal to d_model={self.d_model}; "
                f"got {src.shape[-1]} and {tgt.shape[-1]}."
            )
        memory = self.encoder(
            src,
            mask=src_mask,
            src_key_padding_mask=src_key_padding_mask,
            is_causal=src_is_causal,
            training=training,
            generator=generator,
        )
        return self.decoder(  # type: ignore[no-any-return]
            tgt,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
            training=training,
            generator=generator,
        )


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """The spec of :class:`Transformer`, with ``torch.nn.Transformer``'s arguments and defaults.

    ``sample`` builds as PyTorch does: an encoder of ``num_encoder_layers`` copies of one
    encoder layer with a final ``LayerNorm``, the same for the decoder, then
    ``xavier_uniform_`` on every parameter with more than one dimension, in parameter order;
    with the same seed the weights equal ``torch.nn.Transformer``'s bit for bit.

    Attributes:
        d_model: the number of expected features of ``src`` and ``tgt``.
        nhead: the number of attention heads.
        num_encoder_layers: the number of encoder layers.
        num_decoder_layers: the number of decoder layers.
        dim_feedforward: the hidden size of the feed-forward blocks.
        dropout: the dropout probability.
        activation: ``"relu"``, ``"gelu"`` or a callable.
        custom_encoder: a spec to sample as the encoder instead (the xavier re-initialisation
            applies to it too, as in PyTorch).
        custom_decoder: a spec to sample as the decoder instead.
        layer_norm_eps: the norms' ``eps``.
        batch_first: inputs and outputs are ``[batch, seq, feature]``.
        norm_first: pre-norm layers.
        bias: whether the linear layers and the norms have biases.

    Raises:
        ValueError: as :class:`TransformerEncoderLayerSpec`, or fewer than one layer.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> reference = torch.nn.Transformer(8, 2, 1, 1, 16, batch_first=True)
        >>> spec = TransformerSpec(8, 2, 1, 1, 16, batch_first=True)
        >>> ours = sample(spec, generator=torch.Generator().manual_seed(0))
        >>> torch.equal(ours.decoder.layers[0].linear2.weight,
        ...             reference.decoder.layers[0].linear2.weight)
        True
    """

    d_model: int = 512
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str | Activation = F.relu
    custom_encoder: Randomizable[Any] | None = None
    custom_decoder: Randomizable[Any] | None = None
    layer_norm_eps: float = 1e-5
    batch_first: bool = False
    norm_first: bool = False
    bias: bool = True

    def __post_init__(self) -> None:
        _check_sizes(self.d_model, self.nhead, self.dim_feedforward, self.dropout)
        _activation(self.activation)
        for name in ("num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> Transformer:
        """Sample a :class:`Transformer` with PyTorch's initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The model.
        """
        kw: dict[str, Any] = {"generator": generator, "device": device, "dtype": dtype}
        layer_args = (
            self.d_model,
            self.nhead,
            self.dim_feedforward,
            self.dropout,
            self.activation,
            self.layer_norm_eps,
            self.batch_first,
            self.norm_first,
            self.bias,
        )
        norm = LayerNormSpec(self.d_model, eps=self.layer_norm_eps, bias=self.bias)
        encoder_spec: Randomizable[Any] = TransformerEncoderSpec(
            TransformerEncoderLayerSpec(*layer_args), self.num_encoder_layers, norm=norm
        )
        if self.custom_encoder is not None:
            encoder_spec = self.custom_encoder
        encoder = sample(encoder_spec, **kw)
        decoder_spec: Randomizable[Any] = TransformerDecoderSpec(
            TransformerDecoderLayerSpec(*layer_args), self.num_decoder_layers, norm=norm
        )
        if self.custom_decoder is not None:
            decoder_spec = self.custom_decoder
        decoder = sample(decoder_spec, **kw)
        model = Transformer(
            encoder=encoder,
            decoder=decoder,
            d_model=self.d_model,
            nhead=self.nhead,
            batch_first=self.batch_first,
        )

        def xavier(t: torch.Tensor, g: torch.Generator | None) -> object:
            return torch.nn.init.xavier_uniform_(t, generator=g)

        # torch.nn.Transformer._reset_parameters: xavier on every matrix, in parameter order.
        fresh = [
            init_parameter(p.shape, xavier, generator=generator, device=p.device, dtype=p.dtype)
            if p.dim() > 1
            else p
            for p in flatten_parameters(model)
        ]
        return replace_parameters(model, fresh)


def _attention_block(
    attention: MultiheadAttention,
    dropout: Dropout,
    x: torch.Tensor,
    memory: torch.Tensor,
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    training: bool | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Attention of ``x`` over ``memory`` (itself for self-attention), then dropout."""
    out = attention(
        x,
        memory,
        memory,
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        need_weights=False,
        is_causal=is_causal,
        training=training,
        generator=generator,
    )[0]
    return dropout(out, training=training, generator=generator)


def _feed_forward_block(
    layer: TransformerEncoderLayer | TransformerDecoderLayer,
    dropout: Dropout,
    x: torch.Tensor,
    training: bool | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``linear2(dropout(activation(linear1(x))))``, then the layer's last dropout."""
    x = layer.activation(layer.linear1(x))
    x = layer.linear2(layer.dropout(x, training=training, generator=generator))
    return dropout(x, training=training, generator=generator)
