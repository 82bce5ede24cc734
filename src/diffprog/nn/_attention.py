"""Multi-head attention (``torch.nn.MultiheadAttention``) as a value, and the causal mask helper."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from diffprog import (
    DeviceLike,
    Parameter,
    Parameterized,
    flatten_parameters,
    init_parameter,
    sample,
)
from diffprog.nn._dropout import Dropout
from diffprog.nn._linear import Linear, LinearSpec
from diffprog.nn._state import is_training, training_generator, warn_unless_mode_chosen

__all__ = ["MultiheadAttention", "MultiheadAttentionSpec", "generate_square_subsequent_mask"]


def generate_square_subsequent_mask(
    sz: int, device: DeviceLike = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The causal mask of ``torch.nn.Transformer.generate_square_subsequent_mask``.

    A float ``[sz, sz]`` mask with ``-inf`` above the diagonal and ``0.0`` elsewhere: position
    ``i`` may attend to positions ``0..i`` only. Pass it as ``attn_mask``/``src_mask``/``tgt_mask``
    (with ``is_causal=True`` as a hint, if you like).

    Args:
        sz: the sequence length.
        device: where the mask lives (default: torch's default device).
        dtype: its dtype (default: ``torch.get_default_dtype()``); ``torch.bool`` gives the
            boolean form, ``True`` where attention is not allowed.

    Returns:
        The ``[sz, sz]`` mask.

    Example:
        >>> generate_square_subsequent_mask(3)
        tensor([[0., -inf, -inf],
                [0., 0., -inf],
                [0., 0., 0.]])
    """
    if dtype is None:
        dtype = torch.get_default_dtype()
    return torch.triu(torch.full((sz, sz), float("-inf"), dtype=dtype, device=device), diagonal=1)


def _canonical_mask(
    mask: torch.Tensor | None, name: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """A boolean mask as an additive float mask (``-inf`` where ``True``); a float mask as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(
            f"{name} has dtype {mask.dtype}; only bool and floating point masks are supported. "
            f"Pass a bool mask (True = not allowed to attend) or an additive float mask."
        )
    return mask


def _check_shapes(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    num_heads: int,
) -> bool:
    """Check the input ranks as ``torch.nn.MultiheadAttention`` does; return whether batched."""
    if query.dim() == 3:
        if key.dim() != 3 or value.dim() != 3:
            raise ValueError(
                f"For batched (3-D) query, key and value must be 3-D too; got key.dim()="
                f"{key.dim()} and value.dim()={value.dim()}."
            )
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise ValueError(
                f"For batched (3-D) query, key_padding_mask must be 2-D [batch, source length]; "
                f"got {key_padding_mask.dim()}-D."
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(
                f"For batched (3-D) query, attn_mask must be 2-D [target length, source length] "
                f"or 3-D [batch * num_heads, target length, source length]; "
                f"got {attn_mask.dim()}-D."
            )
        return True
    if query.dim() == 2:
        if key.dim() != 2 or value.dim() != 2:
            raise ValueError(
                f"For unbatched (2-D) query, key and value must be 2-D too; got key.dim()="
                f"{key.dim()} and value.dim()={value.dim()}."
            )
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise ValueError(
                f"For unbatched (2-D) query, key_padding_mask must be 1-D [source length]; "
                f"got {key_padding_mask.dim()}-D."
            )
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise ValueError(
                    f"For unbatched (2-D) query, attn_mask must be 2-D or 3-D; "
                    f"got {attn_mask.dim()}-D."
                )
            if attn_mask.dim() == 3 and attn_mask.shape[0] != num_heads:
                raise ValueError(
                    f"For unbatched (2-D) query, a 3-D attn_mask must have num_heads="
                    f"{num_heads} as its first dimension; got shape {tuple(attn_mask.shape)}."
                )
        return False
    raise ValueError(
        f"query must be 2-D (unbatched) or 3-D (batched); got a {query.dim()}-D tensor of shape "
        f"{tuple(query.shape)}."
    )


def _inputs_then_parameters(
    layer: MultiheadAttention, *inputs: torch.Tensor
) -> Iterator[torch.Tensor]:
    """The inputs, then the layer's parameters (flattened lazily: only if no input needs grad)."""
    yield from inputs
    yield from flatten_parameters(layer)


class MultiheadAttention(Parameterized, kw_only=True):
    """Multi-head attention, as ``torch.nn.MultiheadAttention``.

    Hasktorch's typed API has it as ``MultiheadAttention`` too.
    ``out = softmax(q k^T / sqrt(head_dim) + mask) v`` for each head, with ``q, k, v`` the
    projected query, key and value, the heads concatenated and projected by ``out_proj``.
    Build it with :class:`MultiheadAttentionSpec`; the fields carry torch.nn's names, so
    ``named_parameters`` equals its ``state_dict`` keys.

    Attributes:
        in_proj_weight: ``[3 * embed_dim, embed_dim]``, the packed query/key/value projection
            (``None`` when ``kdim`` or ``vdim`` differ from ``embed_dim``).
        q_proj_weight: ``[embed_dim, embed_dim]`` (only when ``kdim``/``vdim`` differ).
        k_proj_weight: ``[embed_dim, kdim]`` (only when ``kdim``/``vdim`` differ).
        v_proj_weight: ``[embed_dim, vdim]`` (only when ``kdim``/``vdim`` differ).
        in_proj_bias: ``[3 * embed_dim]``, or ``None`` (``bias=False``).
        bias_k: ``[1, 1, embed_dim]``, appended to the keys (``add_bias_kv=True``), or ``None``.
        bias_v: ``[1, 1, embed_dim]``, appended to the values, or ``None``.
        out_proj: the output projection, a :class:`Linear` ``embed_dim -> embed_dim``.
        num_heads: the number of heads; ``embed_dim`` must be divisible by it.
        dropout: dropout probability on the attention weights, in training mode only.
        add_zero_attn: append a zero key and value (a position that attracts no information).
        batch_first: inputs and outputs are ``[batch, seq, feature]`` rather than
            ``[seq, batch, feature]``.

    Example:
        >>> mha = sample(MultiheadAttentionSpec(8, 2, batch_first=True))
        >>> x = torch.randn(3, 5, 8)
        >>> out, weights = mha(x, x, x)
        >>> out.shape, weights.shape
        (torch.Size([3, 5, 8]), torch.Size([3, 5, 5]))
        >>> [name for name, _ in named_parameters(mha)]
        ['in_proj_weight', 'in_proj_bias', 'out_proj.weight', 'out_proj.bias']
    """

    in_proj_weight: Parameter | None = None
    q_proj_weight: Parameter | None = None
    k_proj_weight: Parameter | None = None
    v_proj_weight: Parameter | None = None
    in_proj_bias: Parameter | None = None
    bias_k: Parameter | None = None
    bias_v: Parameter | None = None
    out_proj: Linear
    num_heads: int
    dropout: float = 0.0
    add_zero_attn: bool = False
    batch_first: bool = False

    def __post_init__(self) -> None:
        separate = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        if self.in_proj_weight is None and any(w is None for w in separate):
            raise ValueError(
                "MultiheadAttention needs in_proj_weight, or all of q_proj_weight, "
                "k_proj_weight and v_proj_weight (when kdim/vdim differ from embed_dim)."
            )
        if self.in_proj_weight is not None and any(w is not None for w in separate):
            raise ValueError(
                "MultiheadAttention takes either in_proj_weight or q/k/v_proj_weight, not both; "
                "drop one of them."
            )
        if (self.bias_k is None) != (self.bias_v is None):
            raise ValueError(
                "bias_k and bias_v must be given together (add_bias_kv) or not at all."
            )
        if self.num_heads <= 0 or self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}), "
                f"and num_heads must be positive."
            )
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(
                f"dropout probability has to be between 0 and 1, but got {self.dropout}"
            )

    @property
    def embed_dim(self) -> int:
        """The model dimension (``out_proj.out_features``)."""
        return int(self.out_proj.weight.shape[0])

    @property
    def kdim(self) -> int:
        """The number of features of the key."""
        if self.k_proj_weight is not None:
            return int(self.k_proj_weight.shape[1])
        return self.embed_dim

    @property
    def vdim(self) -> int:
        """The number of features of the value."""
        if self.v_proj_weight is not None:
            return int(self.v_proj_weight.shape[1])
        return self.embed_dim

    @property
    def head_dim(self) -> int:
        """The dimension of each head: ``embed_dim // num_heads``."""
        return self.embed_dim // self.num_heads

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        training: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``query`` to ``key``/``value``, as ``torch.nn.MultiheadAttention.forward``.

        Shapes use ``L`` target length, ``S`` source length, ``N`` batch, ``E`` embed_dim;
        with ``batch_first`` the batch comes first (``[N, L, E]``). Unbatched inputs
        (``[L, E]``) give unbatched outputs.

        Args:
            query: ``[L, N, E]``.
            key: ``[S, N, kdim]``.
            value: ``[S, N, vdim]``.
            key_padding_mask: ``[N, S]``: ``True`` (bool) marks keys to ignore (padding); a
                float mask is added to the attention scores.
            need_weights: also return the attention weights (computed explicitly; without
                them the fused ``scaled_dot_product_attention`` kernel is used).
            attn_mask: ``[L, S]`` or ``[N * num_heads, L, S]``: ``True`` (bool) forbids
                attending; a float mask is added to the scores.
            average_attn_weights: average the returned weights over the heads.
            is_causal: a hint that ``attn_mask`` is the causal mask (it must still be given,
                as in PyTorch); lets the fused kernel skip reading it.
            training: dropout on the attention weights if ``True``; default: whether a
                ``diffprog.nn.training`` pass runs.
            generator: the random source for that dropout; default: the training pass's,
                else torch's global generator (then the draws equal ``torch.nn``'s for the
                same seed).

        Returns:
            ``(attn_output, attn_weights)``: ``attn_output`` is ``[L, N, E]``;
            ``attn_weights`` is ``[N, L, S]`` (averaged) or ``[N, num_heads, L, S]``, or
            ``None`` when ``need_weights=False``.

        Raises:
            ValueError: inputs of the wrong rank or size, a mask of the wrong shape, or
                ``is_causal=True`` without ``attn_mask``.
            TypeError: a mask that is neither bool nor floating point.

        Example:
            >>> mha = sample(MultiheadAttentionSpec(4, 2))
            >>> q, kv = torch.randn(3, 2, 4), torch.randn(6, 2, 4)
            >>> padding = torch.zeros(2, 6, dtype=torch.bool)
            >>> padding[:, 4:] = True  # the last two keys are padding
            >>> out, w = mha(q, kv, kv, key_padding_mask=padding)
            >>> out.shape, bool(w[:, :, 4:].abs().sum() == 0)
            (torch.Size([3, 2, 4]), True)
        """
        if training is None:
            training = is_training()
            if not training and self.dropout > 0:
                warn_unless_mode_chosen(
                    self,
                    "no dropout on the attention weights",
                    _inputs_then_parameters(self, query, key, value),
                )
        if generator is None:
            generator = training_generator()
        dropout_p = self.dropout if training else 0.0
        is_batched = _check_shapes(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        # The packed projection runs one matmul for self-attention (query is key is value).
        same_qk, same_kv = query is key, key is value
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        num_heads, head_dim = self.num_heads, self.head_dim
        if embed_dim != self.embed_dim:
            raise ValueError(
                f"query has {embed_dim} features but the layer's embed_dim is {self.embed_dim}."
            )
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"key and value must have the same sequence length and batch size; got key "
                f"{tuple(key.shape)} and value {tuple(value.shape)} (sequence-first)."
            )
        # Drawing the dropout mask from an explicit generator needs the weights explicitly.
        explicit = need_weights or (dropout_p > 0.0 and generator is not None)

        key_padding_mask = _canonical_mask(key_padding_mask, "key_padding_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise ValueError(
                "is_causal=True is a hint and needs attn_mask too (as in PyTorch); pass "
                "attn_mask=diffprog.nn.generate_square_subsequent_mask(L)."
            )
        if is_causal and key_padding_mask is None and not explicit:
            attn_mask = None  # the fused kernel builds the causal mask itself
        else:
            attn_mask = _canonical_mask(attn_mask, "attn_mask", query.dtype)
            if key_padding_mask is not None:
                is_causal = False  # merged with the padding mask, no longer causal

        q, k, v = self._in_projection(query, key, value, same_qk, same_kv)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise ValueError(
                        f"The shape of the 2-D attn_mask is {tuple(attn_mask.shape)}, but should "
                        f"be (target length, source length) = {(tgt_len, src_len)}."
                    )
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise ValueError(
                    f"The shape of the 3-D attn_mask is {tuple(attn_mask.shape)}, but should be "
                    f"(batch * num_heads, target length, source length) = "
                    f"{(bsz * num_heads, tgt_len, src_len)}."
                )
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=1)
            v = torch.cat([v, zeros], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]

        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise ValueError(
                    f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, but should be "
                    f"(batch, source length) = {(bsz, src_len)}."
                )
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, num_heads, -1, -1)
                .reshape(bsz * num_heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

        weights: torch.Tensor | None = None
        if explicit:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                scores = torch.bmm(q_scaled, k.transpose(-2, -1))
            probs = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                probs = Dropout(dropout_p)(probs, training=True, generator=generator)
            out = torch.bmm(probs, v)
            out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            if need_weights:
                weights = probs.view(bsz, num_heads, tgt_len, src_len)
                if average_attn_weights:
                    weights = weights.mean(dim=1)
                if not is_batched:
                    weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                if attn_mask.shape[0] == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
            out = F.scaled_dot_product_attention(
                q.view(bsz, num_heads, tgt_len, head_dim),
                k.view(bsz, num_heads, src_len, head_dim),
                v.view(bsz, num_heads, src_len, head_dim),
                attn_mask,
                dropout_p,
                is_causal,
            )
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, embed_dim)
        if not is_batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(1, 0)
        return out, weights

    def _in_projection(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        same_qk: bool,
        same_kv: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project query, key and value (sequence-first), as torch's ``_in_projection*``."""
        E = self.embed_dim
        b = self.in_proj_bias
        w = self.in_proj_weight
        if w is None:
            assert self.q_proj_weight is not None and self.k_proj_weight is not None
            assert self.v_proj_weight is not None
            b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
            return (
                F.linear(query, self.q_proj_weight, b_q),
                F.linear(key, self.k_proj_weight, b_k),
                F.linear(value, self.v_proj_weight, b_v),
            )
        if same_kv and same_qk:
            proj = torch.unflatten(F.linear(query, w, b), -1, (3, E)).movedim(-2, 0).contiguous()
            return proj[0], proj[1], proj[2]
        if same_kv:
            w_q, w_kv = torch.split(w, [E, 2 * E])
            b_q, b_kv = (None, None) if b is None else torch.split(b, [E, 2 * E])
            kv = torch.unflatten(F.linear(key, w_kv, b_kv), -1, (2, E)).movedim(-2, 0).contiguous()
            return F.linear(query, w_q, b_q), kv[0], kv[1]
        w_q, w_k, w_v = w.chunk(3)
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


@dataclasses.dataclass(frozen=True)
class MultiheadAttentionSpec:
    """The spec of :class:`MultiheadAttention`, with ``torch.nn.MultiheadAttention``'s arguments.

    ``sample`` initialises as PyTorch does, in its order of random draws: ``out_proj`` as a
    ``Linear`` (kaiming-uniform weight, uniform bias), then xavier-uniform ``in_proj_weight``
    (or ``q``, ``k``, ``v_proj_weight``), zero biases, xavier-normal ``bias_k`` and
    ``bias_v``; with the same seed the weights equal ``torch.nn.MultiheadAttention``'s bit for
    bit.

    Attributes:
        embed_dim: the model dimension.
        num_heads: the number of parallel heads; ``embed_dim`` must be divisible by it.
        dropout: dropout probability on the attention weights (training mode only).
        bias: whether the input and output projections have biases.
        add_bias_kv: add learnt biases ``bias_k``, ``bias_v`` to the key and value sequences.
        add_zero_attn: append a batch of zeros to the key and value sequences.
        kdim: the number of key features (default: ``embed_dim``).
        vdim: the number of value features (default: ``embed_dim``).
        batch_first: inputs and outputs are ``[batch, seq, feature]``.

    Raises:
        ValueError: non-positive sizes, ``embed_dim`` not divisible by ``num_heads``, or a
            dropout probability outside ``[0, 1]``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> reference = torch.nn.MultiheadAttention(8, 2)
        >>> ours = sample(MultiheadAttentionSpec(8, 2), generator=torch.Generator().manual_seed(0))
        >>> torch.equal(ours.in_proj_weight, reference.in_proj_weight)
        True
    """

    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    kdim: int | None = None
    vdim: int | None = None
    batch_first: bool = False

    def __post_init__(self) -> None:
        if self.embed_dim <= 0 or self.num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be greater than 0, got embed_dim={self.embed_dim} "
                f"and num_heads={self.num_heads} instead"
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}); "
                f"each head gets embed_dim // num_heads features."
            )
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(
                f"dropout probability has to be between 0 and 1, but got {self.dropout}"
            )

    def sample(
        self,
        *,
        generator: torch.Generator | None = None,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> MultiheadAttention:
        """Sample a :class:`MultiheadAttention` with PyTorch's initialisation.

        Args:
            generator: the random source (``None``: torch's global generator).
            device: where the parameters live (``"meta"``: shapes only, nothing drawn).
            dtype: their floating point dtype.

        Returns:
            The layer.
        """
        kw = {"generator": generator, "device": device, "dtype": dtype}
        E = self.embed_dim
        kdim = self.kdim if self.kdim is not None else E
        vdim = self.vdim if self.vdim is not None else E

        def xavier_uniform(t: torch.Tensor, g: torch.Generator | None) -> object:
            return torch.nn.init.xavier_uniform_(t, generator=g)

        def xavier_normal(t: torch.Tensor, g: torch.Generator | None) -> object:
            return torch.nn.init.xavier_normal_(t, generator=g)

        # torch.nn builds out_proj (a Linear, drawing its weight and bias) in __init__, then
        # draws the projections in _reset_parameters: that order makes the weights equal.
        out_proj = sample(LinearSpec(E, E, bias=self.bias), **kw)  # type: ignore[arg-type]
        in_proj_weight = q_proj_weight = k_proj_weight = v_proj_weight = None
        if kdim == E and vdim == E:
            in_proj_weight = init_parameter((3 * E, E), xavier_uniform, **kw)  # type: ignore[arg-type]
        else:
            q_proj_weight = init_parameter((E, E), xavier_uniform, **kw)  # type: ignore[arg-type]
            k_proj_weight = init_parameter((E, kdim), xavier_uniform, **kw)  # type: ignore[arg-type]
            v_proj_weight = init_parameter((E, vdim), xavier_uniform, **kw)  # type: ignore[arg-type]
        in_proj_bias = None
        if self.bias:
            in_proj_bias = _zeros((3 * E,), device, dtype)
            out_proj = Linear(out_proj.weight, _zeros((E,), device, dtype))
        bias_k = bias_v = None
        if self.add_bias_kv:
            bias_k = init_parameter((1, 1, E), xavier_normal, **kw)  # type: ignore[arg-type]
            bias_v = init_parameter((1, 1, E), xavier_normal, **kw)  # type: ignore[arg-type]
        return MultiheadAttention(
            in_proj_weight=in_proj_weight,
            q_proj_weight=q_proj_weight,
            k_proj_weight=k_proj_weight,
            v_proj_weight=v_proj_weight,
            in_proj_bias=in_proj_bias,
            bias_k=bias_k,
            bias_v=bias_v,
            out_proj=out_proj,
            num_heads=self.num_heads,
            dropout=self.dropout,
            add_zero_attn=self.add_zero_attn,
            batch_first=self.batch_first,
        )


def _zeros(shape: tuple[int, ...], device: DeviceLike, dtype: torch.dtype | None) -> Parameter:
    return init_parameter(shape, lambda t, g: torch.nn.init.zeros_(t), device=device, dtype=dtype)
