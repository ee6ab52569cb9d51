"""FlexAttention ``BlockMask`` for the TPA ribbon mask (GPU training path).

:func:`tokinteract.tpa_expand` builds the dense ribbon mask ``[B, 1, T2, T2]``; with ``d``
candidates per response token most of it is False (a candidate sees its prefix and itself,
never another candidate), and dense-mask SDPA still does the full ``T2 x T2`` work.
FlexAttention skips the blocks that are entirely masked. :func:`ribbon_block_mask` builds
that ``BlockMask`` from a :class:`tokinteract.TPAExpansion`.

GPU only for training: on CPU FlexAttention has no backward pass, and compiled flex gave wrong
results at some lengths in our measurements; eager
(uncompiled) flex forward on CPU materialises the scores and only serves to check the mask.

The ``mask_mod`` closes over the expansion's per-slot tensors padded with "unused" slots to
a multiple of ``block_size``, so a kernel that evaluates it on the padded tail of the last
block never indexes out of bounds; padded slots attend only to themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tokinteract._checks import check_int
from tokinteract.expansion import TPAExpansion

__all__ = ["padded_ribbon_mask_mod", "ribbon_block_mask"]


def padded_ribbon_mask_mod(
    expansion: TPAExpansion, *, multiple: int = 128
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The ribbon ``mask_mod(b, h, q_idx, kv_idx)`` safe to evaluate up to the next multiple.

    Equal to ``expansion.mask_mod()`` (and to ``expansion.attention_mask``) on every index
    ``< T2``; indices in ``[T2, ceil(T2 / multiple) * multiple)`` are unused slots that attend
    only to themselves.
    """
    if not isinstance(expansion, TPAExpansion):
        raise TypeError(f"expansion must be a TPAExpansion, got {type(expansion).__name__}")
    check_int("multiple", multiple, minimum=1)
    T2 = expansion.expanded_len
    pad = (-T2) % multiple
    src = torch.nn.functional.pad(expansion.slot_source, (0, pad), value=-1)
    is_query = torch.nn.functional.pad(expansion.slot_is_query, (0, pad), value=False)
    is_context = torch.nn.functional.pad(expansion.slot_is_context, (0, pad), value=False)
    # The rule of ``TPAExpansion.mask_mod`` as a lambda, not a def calling it: FlexAttention
    # counts mask_mod's positional parameters and traces it with dynamo, and runtime type
    # checkers (the jaxtyping import hook used in tests) wrap every ``def`` of the package
    # into an untraceable ``(*args, **kwargs)``; a lambda cannot be decorated.
    mask_mod = lambda b, h, q_idx, kv_idx: (  # noqa: E731
        is_query[b, q_idx] & is_context[b, kv_idx] & (src[b, kv_idx] <= src[b, q_idx])
    ) | (q_idx == kv_idx)
    return mask_mod


def ribbon_block_mask(
    expansion: TPAExpansion,
    *,
    block_size: int = 128,
    device: torch.device | str | None = None,
    compiled: bool = False,
) -> Any:
    """``torch.nn.attention.flex_attention.create_block_mask`` for the expansion's ribbon mask.

    Args:
        expansion: the :class:`tokinteract.TPAExpansion` the packed forward runs on.
        block_size: FlexAttention block size (128 on current GPUs); the index tensors are
            padded to a multiple of it.
        device: where the block mask is built (default: the expansion's device).
        compiled: build the mask with ``torch.compile`` (``_compile=True``), which avoids
            materialising the ``T2 x T2`` mask at long lengths (GPU).

    Returns:
        A ``BlockMask`` for ``Q_LEN = KV_LEN = T2``, heads broadcast, to pass as
        ``flex_attention(q, k, v, block_mask=...)``.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if not isinstance(expansion, TPAExpansion):
        raise TypeError(f"expansion must be a TPAExpansion, got {type(expansion).__name__}")
    check_int("block_size", block_size, minimum=1)
    if not isinstance(compiled, bool):
        raise TypeError(f"compiled must be a bool, got {type(compiled).__name__}")
    dev = expansion.input_ids.device if device is None else torch.device(device)
    ex = expansion.to(dev)
    B, T2 = ex.input_ids.shape
    mod = padded_ribbon_mask_mod(ex, multiple=block_size)
    return create_block_mask(mod, B, None, T2, T2, device=dev, BLOCK_SIZE=block_size, _compile=compiled)
