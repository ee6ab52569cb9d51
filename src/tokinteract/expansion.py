"""The TPA expansion: ground truth and candidate tokens packed in one sequence.

Layout (ours; consumers use only the indexes): the ``T`` ground-truth tokens first, at
slots ``0 .. T-1``; then, row by row, ``d`` candidate slots for each position ``t`` with
``candidate_mask[b, t]``, in increasing ``t``; then unused slots up to the longest row.
Because the ground truth comes first, the first ``T`` outputs of the packed forward are
exactly the outputs of a plain forward on the ground truth, and a KV-cached candidate
pass appends the candidate block after the ground-truth pass with the same indexes.

The ribbon mask (paper Fig. 9; the rule itself is :func:`tokinteract.ribbon.ribbon_rule`), in
logits positions (``logits[t]`` predicts token t+1):

* a ground-truth token at ``t`` attends to exactly the non-pad ground-truth tokens at
  positions ``<= t`` (plain causal attention with padding);
* a candidate for position ``t`` (an alternative to token ``t + 1``) attends to exactly the
  non-pad ground-truth tokens at positions ``<= t`` and to itself, never to another
  candidate; its position id is that of token ``t + 1``;
* pad tokens and unused slots attend only to themselves, so no softmax row is empty.

Position ids follow Hugging Face: ``cumsum(attention_mask) - 1``, with 1 at pad positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tokinteract.positions import next_position_ids
from tokinteract._checks import (
    check_bool,
    check_int,
    check_integer,
    check_leading_shape,
    check_tensor,
)
from tokinteract.ribbon import ribbon_dense, ribbon_mod

__all__ = ["TPAExpansion", "ribbon_mask", "ribbon_mask_mod", "tpa_expand"]


@dataclass(frozen=True, eq=False)
class TPAExpansion:
    """A packed TPA sequence and the indexes that find each token in it.

    Attributes:
        input_ids: ``[B, T2]`` ground truth then candidates (unused slots hold ``pad_token_id``).
        position_ids: ``[B, T2]``; a candidate for ``t`` has the position id of token ``t+1``.
        attention_mask: bool ``[B, 1, T2, T2]``, True = may attend (the ribbon mask).
        gt_index: ``[B, T]`` slot of each original token.
        candidate_index: ``[B, T, d]`` slot of each candidate, ``-1`` where none.
        candidate_mask: ``[B, T]`` positions that received candidates.
        slot_source: ``[B, T2]`` the original position each slot belongs to (``-1`` unused).
        slot_is_query: ``[B, T2]`` the slot is a real (non-pad, used) token.
        slot_is_context: ``[B, T2]`` the slot is a non-pad ground-truth token (a key that
            later slots of the same or a later position may see).
    """

    input_ids: Int[Tensor, "batch xseq"]
    position_ids: Int[Tensor, "batch xseq"]
    attention_mask: Bool[Tensor, "batch 1 xseq xseq"]
    gt_index: Int[Tensor, "batch seq"]
    candidate_index: Int[Tensor, "batch seq cand"]
    candidate_mask: Bool[Tensor, "batch seq"]
    slot_source: Int[Tensor, "batch xseq"]
    slot_is_query: Bool[Tensor, "batch xseq"]
    slot_is_context: Bool[Tensor, "batch xseq"]

    @property
    def seq_len(self) -> int:
        """``T``, the length of the ground-truth sequence."""
        return self.gt_index.shape[1]

    @property
    def num_candidates(self) -> int:
        """``d``, candidates per position."""
        return self.candidate_index.shape[2]

    @property
    def expanded_len(self) -> int:
        """``T2``, the length of the packed sequence."""
        return self.input_ids.shape[1]

    def check_logits(self, logits: Tensor) -> None:
        """``ValueError`` unless ``logits`` (or hidden states) are ``[B, T2, ...]`` over this expansion."""
        check_tensor("logits", logits, ndim=3)
        if tuple(logits.shape[:2]) != tuple(self.input_ids.shape):
            raise ValueError(
                f"logits must cover the expanded sequence {tuple(self.input_ids.shape)} in their "
                f"first two dimensions, got shape {tuple(logits.shape)}"
            )

    def gather_gt(self, logits: Float[Tensor, "batch xseq vocab"]) -> Float[Tensor, "batch seq vocab"]:
        """Outputs at the ground-truth slots, ``[B, T, V]`` (a view: ground truth comes first)."""
        self.check_logits(logits)
        return logits[:, : self.seq_len]

    def gather_candidates(
        self, logits: Float[Tensor, "batch xseq vocab"]
    ) -> Float[Tensor, "batch seq cand vocab"]:
        """Outputs at the candidate slots, ``[B, T, d, V]``; zeros where there is no candidate."""
        self.check_logits(logits)
        B, T, d = self.candidate_index.shape
        idx = self.candidate_index.clamp(min=0).reshape(B, T * d)
        rows = logits.gather(1, idx[..., None].expand(B, T * d, logits.shape[-1]))
        rows = rows.reshape(B, T, d, -1)
        return torch.where((self.candidate_index >= 0)[..., None], rows, rows.new_zeros(()))

    def candidate_slots(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(batch_idx, pos_idx, cand_idx, slot)`` for every real candidate, flattened."""
        b, t, u = (self.candidate_index >= 0).nonzero(as_tuple=True)
        return b, t, u, self.candidate_index[b, t, u]

    def mask_mod(self) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """The ribbon rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``."""
        return ribbon_mod(self.slot_source, self.slot_is_query, self.slot_is_context)

    def to(self, device: torch.device | str) -> "TPAExpansion":
        """A copy with every tensor on ``device``."""
        return TPAExpansion(**{k: v.to(device) for k, v in self.__dict__.items()})


def _check_inputs(
    candidate_mask: Tensor, num_candidates: int, attention_mask: Tensor | None
) -> Tensor:
    check_tensor("candidate_mask", candidate_mask, ndim=2)
    check_bool("candidate_mask", candidate_mask)
    check_int("num_candidates", num_candidates, minimum=1)
    if attention_mask is None:
        attention_mask = torch.ones_like(candidate_mask)
    check_tensor("attention_mask", attention_mask, ndim=2)
    check_leading_shape("attention_mask", attention_mask, "candidate_mask", candidate_mask, 2)
    if attention_mask.dtype != torch.bool:
        check_integer("attention_mask", attention_mask)
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0/1 (or bool) values")
        attention_mask = attention_mask.bool()
    on_pad = int((candidate_mask & ~attention_mask).sum())
    if on_pad:
        raise ValueError(
            f"candidate_mask is set on {on_pad} pad position(s) (attention_mask False); "
            "candidates may only follow real tokens"
        )
    if candidate_mask.shape[1] and bool(candidate_mask[:, -1].any()):
        raise ValueError(
            "candidate_mask is set on the last position; a candidate at t replaces token t+1, "
            "which the last position does not have"
        )
    return attention_mask


def _layout(candidate_mask: Tensor, d: int, attention_mask: Tensor) -> dict[str, Tensor]:
    B, T = candidate_mask.shape
    dev = candidate_mask.device
    counts = candidate_mask.sum(1)
    n_max = int(counts.max()) if B else 0
    T2 = T + n_max * d
    rank = candidate_mask.long().cumsum(1) - 1
    u = torch.arange(d, device=dev)
    cand_index = torch.where(
        candidate_mask[..., None], T + rank[..., None] * d + u, torch.full((), -1, device=dev)
    )
    positions = attention_mask.long().cumsum(1) - 1
    positions = positions.masked_fill(~attention_mask, 1)
    ar = torch.arange(T, device=dev).expand(B, T)

    src = torch.full((B, T2), -1, dtype=torch.long, device=dev)
    src[:, :T] = ar
    pos = torch.ones((B, T2), dtype=torch.long, device=dev)
    pos[:, :T] = positions
    is_query = torch.zeros((B, T2), dtype=torch.bool, device=dev)
    is_query[:, :T] = attention_mask
    is_context = is_query.clone()

    b, t, uu = (cand_index >= 0).nonzero(as_tuple=True)
    slot = cand_index[b, t, uu]
    src[b, slot] = t
    pos[b, slot] = next_position_ids(positions[None], attention_mask)[0][0, b, t]
    is_query[b, slot] = True
    return dict(
        cand_index=cand_index, gt_index=ar.clone(), src=src, pos=pos, is_query=is_query,
        is_context=is_context, b=b, t=t, u=uu, slot=slot,
    )


def ribbon_mask(
    candidate_mask: Bool[Tensor, "batch seq"],
    num_candidates: int,
    attention_mask: Bool[Tensor, "batch seq"] | Int[Tensor, "batch seq"] | None = None,
) -> Bool[Tensor, "batch 1 xseq xseq"]:
    """The dense ribbon attention mask (True = may attend) that :func:`tpa_expand` builds.

    See the module docstring for the rule. ``attention_mask`` is the usual padding mask
    (True/1 = real token); left and right padding both work.
    """
    am = _check_inputs(candidate_mask, num_candidates, attention_mask)
    lay = _layout(candidate_mask, num_candidates, am)
    return ribbon_dense(lay["src"], lay["is_query"], lay["is_context"])


def ribbon_mask_mod(
    candidate_mask: Bool[Tensor, "batch seq"],
    num_candidates: int,
    attention_mask: Bool[Tensor, "batch seq"] | Int[Tensor, "batch seq"] | None = None,
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The ribbon rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    ``mask_mod(b, h, q, k)`` equals ``ribbon_mask(...)[b, 0, q, k]`` for every index; pass
    it to ``torch.nn.attention.flex_attention.create_block_mask`` with ``Q_LEN = KV_LEN = T2``.
    """
    am = _check_inputs(candidate_mask, num_candidates, attention_mask)
    lay = _layout(candidate_mask, num_candidates, am)
    return ribbon_mod(lay["src"], lay["is_query"], lay["is_context"])


def tpa_expand(
    input_ids: Int[Tensor, "batch seq"],
    candidates: Int[Tensor, "batch seq cand"],
    candidate_mask: Bool[Tensor, "batch seq"],
    attention_mask: Bool[Tensor, "batch seq"] | Int[Tensor, "batch seq"] | None = None,
    *,
    pad_token_id: int = 0,
) -> TPAExpansion:
    """Pack ground truth and candidates into one sequence with the ribbon mask (Fig. 9).

    Args:
        input_ids: the ground-truth tokens.
        candidates: ``candidates[b, t, u]`` replaces token ``t + 1`` (from
            :func:`tokinteract.sample_candidates`).
        candidate_mask: positions that get candidates, typically
            ``shift_labels(labels) != ignore_index``. Rows may differ in how many.
        attention_mask: padding mask, True/1 = real token (left or right padding).
        pad_token_id: token id written into unused slots (they attend only to themselves).
    """
    check_tensor("input_ids", input_ids, ndim=2)
    check_integer("input_ids", input_ids)
    check_tensor("candidates", candidates, ndim=3)
    check_integer("candidates", candidates)
    check_leading_shape("candidates", candidates, "input_ids", input_ids, 2)
    check_tensor("candidate_mask", candidate_mask, ndim=2)
    check_leading_shape("candidate_mask", candidate_mask, "input_ids", input_ids, 2)
    d = candidates.shape[2]
    if d < 1:
        raise ValueError(
            f"candidates must hold d >= 1 candidates per position (shape [batch, seq, d]), "
            f"got shape {tuple(candidates.shape)}"
        )
    am = _check_inputs(candidate_mask, d, attention_mask)
    lay = _layout(candidate_mask, d, am)
    B, T = input_ids.shape
    T2 = lay["src"].shape[1]
    ids = torch.full((B, T2), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    ids[:, :T] = input_ids
    ids[lay["b"], lay["slot"]] = candidates[lay["b"], lay["t"], lay["u"]].to(input_ids.dtype)
    return TPAExpansion(
        input_ids=ids,
        position_ids=lay["pos"],
        attention_mask=ribbon_dense(lay["src"], lay["is_query"], lay["is_context"]),
        gt_index=lay["gt_index"],
        candidate_index=lay["cand_index"],
        candidate_mask=candidate_mask.clone(),
        slot_source=lay["src"],
        slot_is_query=lay["is_query"],
        slot_is_context=lay["is_context"],
    )
