"""One forward's positions and masks, per model family (internal to :mod:`tokinteract.hf`).

A :class:`PassPlan` holds, for the slots of a :class:`~tokinteract.TPAExpansion` (ground
truth first, then candidates), the position ids the model receives and, per text layer
type, the rule ``allowed(b, h, q, k)`` its attention must honour:

    allowed = (ribbon(q, k) | same_image(q, k)) & within_window(q, k)

``ribbon`` is :func:`tokinteract.ribbon_mod` (from :func:`tokinteract.ribbon_rule`, the one
definition of the ribbon mask);
``same_image`` holds for two ground-truth tokens of one image block (families with
bidirectional image attention, given ``token_type_ids``); ``within_window`` holds when
``position(q) - position(k) < sliding_window`` on ``sliding_attention`` layers, with the
sequence positions of :attr:`TPAExpansion.position_ids` (an unpadded sequence's indexes, as
the model's own sliding windows count them). The HF composition is the same: sliding
layers apply the window after OR-ing the image blocks into the causal mask. Every mask form
(bool, additive float, FlexAttention ``BlockMask``, the cached pass's row slice) is derived
from these rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tokinteract.expansion import TPAExpansion
from tokinteract.ribbon import ribbon_mod
from tokinteract.hf import _attn, families
from tokinteract.positions import next_position_ids

Rule = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(eq=False)
class GroundTruthLayout:
    """What the family derives from the ground truth alone (kept for the candidate pass)."""

    position_ids: Tensor  # [R, B, T]
    text_mask: Tensor | None  # [B, T] or None (one sequential row)
    blocks: Tensor | None  # [B, T] image block ids (-1 none) or None


@dataclass(eq=False)
class PassPlan:
    position_ids: Tensor  # [R, B, T2]
    rules: dict[str, Rule]  # layer type -> allowed(b, h, q, k)
    plain: bool  # one full-attention layer type and no image blocks: the rule is the ribbon alone


def ground_truth_layout(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, inputs: Mapping[str, Any]) -> GroundTruthLayout:
    am = attention_mask.bool()
    return GroundTruthLayout(
        position_ids=families.ground_truth_positions(model, input_ids, am, inputs),
        text_mask=families.text_mask(model, input_ids, inputs),
        blocks=families.image_blocks(model, inputs, tuple(input_ids.shape)),
    )


def _block_rule(base: Rule, blk: Tensor) -> Rule:
    return lambda b, h, q, k: base(b, h, q, k) | ((blk[b, q] >= 0) & (blk[b, q] == blk[b, k]))  # noqa: E731


def _window_rule(base: Rule, pos: Tensor, window: int) -> Rule:
    return lambda b, h, q, k: base(b, h, q, k) & (pos[b, q] - pos[b, k] < window)  # noqa: E731


def plan(model: nn.Module, expansion: TPAExpansion, gt: GroundTruthLayout) -> PassPlan:
    """Positions and per-layer-type rules for every slot of ``expansion``.

    Raises:
        ValueError: a candidate whose position the family cannot read off the ground truth
            (after an image with no text after it), or one that would split an image block.
    """
    exp = expansion
    B, T = exp.gt_index.shape
    T2 = exp.expanded_len
    dev = exp.input_ids.device
    gpos = gt.position_ids.to(dev)
    R = gpos.shape[0]
    am = exp.slot_is_context[:, :T]
    nxt, defined = next_position_ids(gpos, am, None if gt.text_mask is None else gt.text_mask.to(dev))
    b, t, _, slot = exp.candidate_slots()
    if b.numel() and not bool(defined[b, t].all()):
        bad = [(int(x), int(y)) for x, y in zip(b[~defined[b, t]], t[~defined[b, t]])][:5]
        raise ValueError(
            f"candidates at (batch, position) {bad} follow an image or video token with no text token after it; "
            "the model's position for a token there cannot be read off the ground truth. Put candidates on "
            "response tokens only."
        )
    pos = torch.ones((R, B, T2), dtype=gpos.dtype, device=dev)
    pos[:, :, :T] = gpos
    pos[:, b, slot] = nxt[:, b, t]
    base = ribbon_mod(exp.slot_source, exp.slot_is_query, exp.slot_is_context)
    blk_slots = None
    if gt.blocks is not None:
        blocks = gt.blocks.to(dev)
        nxt_blk = torch.cat([blocks[:, 1:], torch.full_like(blocks[:, :1], -1)], dim=1)
        split = (blocks[b, t] >= 0) & (blocks[b, t] == nxt_blk[b, t])
        if bool(split.any()):
            raise ValueError(
                "a candidate lies inside an image block (its ground-truth token and the next one belong to the same "
                "image, which attends bidirectionally): the prefix would cut the image. Put candidates on response "
                "tokens only."
            )
        blk_slots = torch.full((B, T2), -1, dtype=blocks.dtype, device=dev)
        blk_slots[:, :T] = torch.where(am, blocks, torch.full_like(blocks, -1))
        base = _block_rule(base, blk_slots)
    windows = families.layer_windows(model)
    seq_pos = exp.position_ids.to(dev)
    rules = {lt: base if w is None else _window_rule(base, seq_pos, w) for lt, w in windows.items()}
    plain = blk_slots is None and all(w is None for w in windows.values())
    return PassPlan(position_ids=pos, rules=rules, plain=plain)


def dense(rule: Rule, batch: int, q_start: int, q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Bool ``[B, 1, q_len, k_len]`` of ``rule`` for queries ``q_start ..`` (True = attend)."""
    bi = torch.arange(batch, device=device)[:, None, None]
    qi = torch.arange(q_start, q_start + q_len, device=device)[None, :, None]
    ki = torch.arange(k_len, device=device)[None, None, :]
    return rule(bi, 0, qi, ki).expand(batch, q_len, k_len)[:, None]


def _offset(rule: Rule, q_start: int) -> Rule:
    return lambda b, h, q, k: rule(b, h, q + q_start, k)  # noqa: E731


def model_masks(
    model: nn.Module, p: PassPlan, batch: int, q_start: int, q_len: int, k_len: int, *, block_masks: Any = None
) -> Any:
    """The attention mask(s) the model receives: one per layer type, in its format.

    A tensor (or ``BlockMask``) when the text model has one layer type, else a dict keyed by
    layer type (the form Hugging Face text models accept for per-layer-type masks).
    """
    fmt = _attn.mask_format(model)
    dev = _attn.model_device(model)
    dtype = _attn.model_dtype(model)
    out: dict[str, Any] = {}
    for lt, rule in p.rules.items():
        if fmt == "block":
            if block_masks is not None:
                out[lt] = block_masks
                continue
            from torch.nn.attention.flex_attention import create_block_mask

            out[lt] = create_block_mask(_offset(rule, q_start), B=batch, H=None, Q_LEN=q_len, KV_LEN=k_len, device=dev)
        else:
            out[lt] = _attn.convert_mask(dense(rule, batch, q_start, q_len, k_len, dev), fmt, dtype)
    return next(iter(out.values())) if len(out) == 1 else out


def ground_truth_is_causal(model: nn.Module, p: PassPlan, attention_mask: Tensor) -> bool:
    """Whether the ground-truth block of ``p`` (slots ``0 .. T-1``) is exactly the attention the
    model computes on its own with no mask: one full-attention layer type and no image blocks
    (:attr:`PassPlan.plain`), no padding (the ribbon's ground-truth block is then plain causal
    attention), one row of position ids equal to ``0 .. T-1`` in every sequence (nothing for
    Hugging Face to read as packed documents), and a dense-mask implementation (eager or sdpa,
    which build that causal mask, or skip it for SDPA's causal kernel, when given none).
    """
    if not p.plain or _attn.mask_format(model) == "block" or not bool(attention_mask.all()):
        return False
    T = attention_mask.shape[1]
    pos = p.position_ids
    if pos.shape[0] != 1:
        return False
    return bool((pos[0, :, :T] == torch.arange(T, device=pos.device)).all())


def model_position_ids(p: PassPlan, start: int = 0, stop: int | None = None) -> Tensor:
    """Position ids of slots ``start:stop`` in the form the model takes (``[B, L]`` for one row)."""
    pos = p.position_ids[:, :, start:stop]
    return pos[0] if pos.shape[0] == 1 else pos
