"""``AdamW``: Adam with decoupled weight decay, torch.optim.AdamW's algorithm as a value."""

from __future__ import annotations

from diffprog.optim._adam import Adam
from diffprog.optim._declare import hyper, non_negative

__all__ = ["AdamW"]


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter): Adam whose weight decay shrinks the parameters directly,
    ``p * (1 - lr * weight_decay)``, instead of adding to the gradient. Exactly
    ``torch.optim.AdamW`` (default ``weight_decay=1e-2``; as torch's, it is ``Adam`` with
    ``decoupled_weight_decay=True``, which its ``init`` does not take); fields as
    :class:`Adam`'s.

    Example:
        >>> p = make_independent(torch.tensor([1.0]))
        >>> new, _ = AdamW.init([p], weight_decay=0.5).step(0.1, [torch.tensor([0.0])], [p])
        >>> new
        [tensor([0.9500])]
    """

    weight_decay: float = hyper(1e-2, doc="decoupled weight decay", check=non_negative)
    decoupled_weight_decay: bool = hyper(True, doc="always True for AdamW", settable=False)
