"""The position rule: which position ids a TPA candidate takes.

A candidate for position ``t`` replaces ground-truth token ``t + 1``: the model must see it
exactly as it would see a text token appended to the real prefix ``<= t`` of that sequence.
That is the only rule; :func:`tokinteract.tpa_expand` (one row of position ids) and the
Hugging Face adapter (several rows, e.g. the multimodal RoPE of Qwen-VL models) both derive
the candidates' position ids from :func:`next_position_ids`.

Position ids have ``R`` rows (``[R, B, T]``; ``R = 1`` for ordinary 1-D RoPE, 3 for Qwen-VL's
temporal/height/width rows, 4 when a text row leads). For a text token appended after the
prefix ending at ``t``:

* if token ``t`` is text, every row is ``position_ids[:, b, t] + 1`` (text positions of
  every supported family advance by one after a text token, on every row);
* otherwise (token ``t`` is an image or video token, whose rows follow the grid) the
  appended token takes the rows of ground-truth token ``t + 1`` when that token is a real
  text token - the model placed exactly such a token there;
* anything else (a candidate after the last token of an image with no text after it) has
  no position that can be read off the ground truth: it is reported, never guessed.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tokinteract._checks import check_bool, check_integer, check_tensor

__all__ = ["next_position_ids"]


def next_position_ids(
    position_ids: Int[Tensor, "rows batch seq"],
    attention_mask: Bool[Tensor, "batch seq"],
    text_mask: Bool[Tensor, "batch seq"] | None = None,
) -> tuple[Int[Tensor, "rows batch seq"], Bool[Tensor, "batch seq"]]:
    """Position ids of a text token appended after the real prefix ending at each ``t``.

    Args:
        position_ids: ``[R, B, T]`` position ids of the ground truth (real tokens' values
            are used; pads are ignored).
        attention_mask: bool ``[B, T]``, True = real token.
        text_mask: bool ``[B, T]``, True = text token (``None``: every token is text, as
            for models whose position ids are one sequential row).

    Returns:
        ``(next_ids [R, B, T], defined [B, T])``: ``next_ids[:, b, t]`` is the position of a
        text token appended after the prefix ending at ``t``; ``defined[b, t]`` is False
        where the rule above gives no position (or ``t`` is a pad). Values where
        ``defined`` is False are unspecified.
    """
    check_tensor("position_ids", position_ids, ndim=3)
    check_integer("position_ids", position_ids)
    check_tensor("attention_mask", attention_mask, ndim=2)
    check_bool("attention_mask", attention_mask)
    if tuple(position_ids.shape[1:]) != tuple(attention_mask.shape):
        raise ValueError(
            f"position_ids must have shape [rows, *attention_mask.shape] = [R, {list(attention_mask.shape)}], "
            f"got {tuple(position_ids.shape)}"
        )
    after_text = position_ids + 1
    if text_mask is None:
        return after_text, attention_mask.clone()
    check_tensor("text_mask", text_mask, ndim=2)
    check_bool("text_mask", text_mask)
    if tuple(text_mask.shape) != tuple(attention_mask.shape):
        raise ValueError(f"text_mask must have the shape of attention_mask {tuple(attention_mask.shape)}, got {tuple(text_mask.shape)}")
    real_text = attention_mask & text_mask
    # rows of token t + 1 (the last column has no successor)
    succ = torch.cat([position_ids[..., 1:], position_ids[..., -1:]], dim=-1)
    succ_text = torch.cat([real_text[:, 1:], torch.zeros_like(real_text[:, :1])], dim=1)
    out = torch.where(real_text[None], after_text, succ)
    defined = attention_mask & (real_text | succ_text)
    return out, defined
