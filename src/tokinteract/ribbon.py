"""The TPA ribbon rule (paper Fig. 9): which slot of a packed sequence may attend to which.

Every slot ``i`` of a packed sequence carries three facts (see :class:`tokinteract.TPAExpansion`):
``source[i]``, the ground-truth position it belongs to (``-1``: unused); ``is_query[i]``, it is
a real token (not pad, not unused); ``is_context[i]``, it is a non-pad ground-truth token that
later slots may see. The rule, for a query slot ``q`` and a key slot ``k``:

    allowed(q, k) = (is_query[q] & is_context[k] & source[k] <= source[q])  |  (q == k)

A ground-truth token therefore sees the non-pad ground truth up to itself (causal attention
with padding), a candidate for position ``t`` sees the ground truth up to ``t`` and itself
(never another candidate), and pad tokens and unused slots see only themselves, so no
softmax row is empty.

:func:`ribbon_rule` is the only definition of that rule; every mask form is derived from it:
:func:`ribbon_dense` (bool ``[B, 1, Q, K]``, True = may attend), :func:`ribbon_mod`
(FlexAttention ``mask_mod``, from which a ``BlockMask`` is built, see
:mod:`tokinteract.attention`), and the query blocks of a KV-cached pass (``q_start`` /
``q_offset``: queries from slot ``q_start`` on, keys from slot 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import no_type_check

import torch
from torch import Tensor

__all__ = ["ribbon_dense", "ribbon_mod", "ribbon_rule"]


@no_type_check  # evaluated inside traced mask_mods: no runtime type-checking wrapper may sit here
def ribbon_rule(q_source: Tensor, q_is_query: Tensor, k_source: Tensor, k_is_context: Tensor, same_slot: Tensor) -> Tensor:
    """``(q_is_query & k_is_context & (k_source <= q_source)) | same_slot`` (broadcasting).

    Args:
        q_source, q_is_query: the query slot's ground-truth position and "real token" flag.
        k_source, k_is_context: the key slot's ground-truth position and "visible context" flag.
        same_slot: whether query and key are the same slot.

    Returns:
        bool, True where the query may attend to the key.
    """
    return (q_is_query & k_is_context & (k_source <= q_source)) | same_slot


def ribbon_dense(source: Tensor, is_query: Tensor, is_context: Tensor, *, q_start: int = 0) -> Tensor:
    """The dense ribbon mask ``[B, 1, T2 - q_start, T2]`` (True = may attend) of slots ``[B, T2]``.

    ``q_start > 0`` gives the rows of the query slots ``q_start ..`` only, over every key (the
    block a KV-cached candidate pass needs: keys are the cached slots then the queries).
    """
    T2 = source.shape[1]
    q = torch.arange(q_start, T2, device=source.device)
    k = torch.arange(T2, device=source.device)
    allowed = ribbon_rule(
        source[:, q_start:, None], is_query[:, q_start:, None], source[:, None, :], is_context[:, None, :],
        (q[:, None] == k[None, :])[None],
    )
    return allowed[:, None]


def ribbon_mod(
    source: Tensor, is_query: Tensor, is_context: Tensor, *, q_offset: int = 0
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The ribbon rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    ``mask_mod(b, h, q, k) == ribbon_dense(...)[b, 0, q, k]``; with ``q_offset`` the query index
    is shifted (query ``q`` is slot ``q + q_offset``), which is the mask of a KV-cached block.
    """

    # a lambda: runtime type-checking import hooks (jaxtyping's, in our tests) never wrap one
    if q_offset:
        return lambda b, h, q, k: ribbon_rule(  # noqa: E731
            source[b, q + q_offset], is_query[b, q + q_offset], source[b, k], is_context[b, k], q + q_offset == k
        )
    return lambda b, h, q, k: ribbon_rule(source[b, q], is_query[b, q], source[b, k], is_context[b, k], q == k)  # noqa: E731
