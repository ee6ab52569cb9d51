"""Instruction-aware Vision Alignment (paper Eq. 4).

Importance of visual position ``k`` (teacher attention at layer ``l*``):

    w[b, k] = (1/H) sum_h (1/N_i) sum_{u in instruction rows} A[b, h, u, k]   (k visual)
    w[b, k] = 0                                                               (otherwise)

IVA loss (per sample a weighted sum over visual output positions, mean over the batch):

    L_iva = sum_b sum_t w[b, t] * D(S_{b,t}, T_{b,t}) / max(num_sequences or B, 1)

``D`` is the forward KL ``KL(T || S)`` by default. ``D_t`` is taken at the visual token's
own output position ``t`` (the "visual-token output positions" of the paper's Eq. 1-4: the
decoder emits one output per input token), and its weight is the attention *to* key ``t``. Weights and teacher logits are treated
as constants (detached). Uniform weights ``1/N_v`` give the LLaVA-KD baseline (Table 6).

**Which instruction rows** (:func:`instruction_rows`, the one place of this rule): the
instruction tokens *after the sample's first visual token*. Under causal attention a row
before every visual token attends to no visual key, so counting it in Eq. 4's mean only
scales the weights down by the share of such rows (a question written before and after the
image would get half the weights of the same question after it alone; a question written
only before the image would give all-zero weights, i.e. an IVA term of 0). The paper's
LLaVA prompts put the image first, where the rule keeps every instruction token. A sample
with visual tokens and no such row has no Eq. 4 weights: :func:`visual_importance` refuses it.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tokinteract._checks import check_bool, check_finite, check_float, check_integer, check_tensor
from tokinteract.align_ti import align_ti_terms
from tokinteract.divergence import DivergenceModule

__all__ = ["IVALoss", "instruction_rows", "iva_loss", "uniform_visual_weights", "visual_importance"]


def instruction_rows(
    instruction_mask: Bool[Tensor, "batch queries"],
    visual_mask: Bool[Tensor, "batch keys"],
    query_positions: Int[Tensor, "batch queries"] | None = None,
) -> Bool[Tensor, "batch queries"]:
    """IVA's query rows: the instruction tokens after the sample's first visual token.

    ``rows[b, u] = instruction_mask[b, u] and pos(u) > min{k : visual_mask[b, k]}``, with
    ``pos(u) = query_positions[b, u]`` (default ``u``: row ``u`` is position ``u``). Rows before
    every visual token cannot attend to one (causal attention), so they carry no
    instruction-to-vision attention; a sample without visual tokens has no rows. Identical to
    ``instruction_mask`` for image-first prompts (the paper's LLaVA layout). No host sync.

    Args:
        instruction_mask: ``[B, Q]`` the instruction tokens (the user's words), per query row.
        visual_mask: ``[B, K]`` the visual tokens, per key position.
        query_positions: ``[B, Q]`` the position (``< K``) of each query row when the rows are
            a selection (:attr:`tokinteract.hf.AttentionCapture.row_index`); ``None`` when
            row ``u`` is position ``u`` (then ``Q <= K``).
    """
    check_tensor("instruction_mask", instruction_mask, ndim=2)
    check_bool("instruction_mask", instruction_mask)
    check_tensor("visual_mask", visual_mask, ndim=2)
    check_bool("visual_mask", visual_mask)
    B, Q = instruction_mask.shape
    K = visual_mask.shape[1]
    if visual_mask.shape[0] != B:
        raise ValueError(f"visual_mask must have batch size {B} (instruction_mask's), got {visual_mask.shape[0]}")
    seen = visual_mask.long().cumsum(1) > 0  # [B, K]: at or after the first visual token
    # a query row at the first visual token itself is that token (not an instruction), so
    # "at or after" equals "after" on instruction rows
    if query_positions is None:
        if Q > K:
            raise ValueError(
                f"instruction_mask has {Q} query rows but visual_mask only {K} positions; pass query_positions "
                "when the rows are a selection"
            )
        after = seen[:, :Q]
    else:
        check_tensor("query_positions", query_positions, ndim=2)
        check_integer("query_positions", query_positions)
        if tuple(query_positions.shape) != (B, Q):
            raise ValueError(
                f"query_positions must have shape {(B, Q)} (instruction_mask's), got {tuple(query_positions.shape)}"
            )
        after = seen.gather(1, query_positions.to(seen.device).long())  # an index outside [0, K) raises
    return instruction_mask & after.to(instruction_mask.device)


def visual_importance(
    attn: Float[Tensor, "batch heads queries keys"] | Float[Tensor, "batch queries keys"],
    instruction_mask: Bool[Tensor, "batch queries"],
    visual_mask: Bool[Tensor, "batch keys"],
    *,
    normalize: bool = False,
    query_positions: Int[Tensor, "batch queries"] | None = None,
) -> Float[Tensor, "batch keys"]:
    """Instruction-to-vision importance of each key position (Eq. 4: mean over heads and rows).

    ``w[b, k] = (1/H) sum_h (1/N) sum_{u in rows} A[b, h, u, k]`` at visual ``k``, 0 elsewhere,
    with ``rows = instruction_rows(instruction_mask, visual_mask, query_positions)`` (the
    instruction tokens after the sample's first visual token; ``N`` their number).

    Args:
        attn: attention probabilities at one layer, ``[B, H, Q, K]`` or head-averaged
            ``[B, Q, K]``. With the full map ``Q = K = T``; with
            :func:`tokinteract.hf.capture_attention` the rows may be only the captured ones
            (then pass ``query_positions``, or use ``AttentionCapture.visual_importance``).
        instruction_mask: which query rows are instruction tokens (the user's words).
        visual_mask: which key positions are visual tokens.
        normalize: rescale each row's weights to sum to 1.
        query_positions: ``[B, Q]`` the position of each query row; required when ``Q != K``.

    Returns:
        fp32 ``[B, K]``, 0 at non-visual positions and in samples without visual tokens.

    Raises:
        ValueError: a sample holds visual tokens but no instruction token after the first one
            (its Eq. 4 weights are undefined: an empty mean), naming the samples.
    """
    check_tensor("attn", attn, ndim=(3, 4))
    check_float("attn", attn)
    a = attn.float()
    if a.ndim == 4:
        a = a.mean(1)
    check_tensor("instruction_mask", instruction_mask, ndim=2)
    check_bool("instruction_mask", instruction_mask)
    check_tensor("visual_mask", visual_mask, ndim=2)
    check_bool("visual_mask", visual_mask)
    B, Q, K = a.shape
    if tuple(instruction_mask.shape) != (B, Q):
        raise ValueError(f"instruction_mask must have shape {(B, Q)} (batch, attn query rows), got {tuple(instruction_mask.shape)}")
    if tuple(visual_mask.shape) != (B, K):
        raise ValueError(f"visual_mask must have shape {(B, K)} (batch, attn keys), got {tuple(visual_mask.shape)}")
    if query_positions is None and Q != K:
        raise ValueError(
            f"attn holds {Q} query rows over {K} keys: pass query_positions (the position of each row, "
            "e.g. AttentionCapture.row_index) so the instruction rows after the image can be chosen"
        )
    check_finite("attn", a)
    vm = visual_mask.to(a.device)
    rows_mask = instruction_rows(instruction_mask.to(a.device), vm, query_positions)
    missing = vm.any(1) & ~rows_mask.any(1)
    if bool(missing.any()):
        raise ValueError(
            f"samples {missing.nonzero().flatten().tolist()} of the batch hold visual tokens but no instruction token "
            "after the first one: IVA's weights (Eq. 4, the mean over instruction rows of their attention to the "
            "visual tokens) are undefined for them; put the instruction after the image (LLaVA's '<image>\\n' + "
            "question), or use uniform weights (the trainer's iva_weights='uniform')"
        )
    rows = rows_mask.to(a.dtype)
    n_rows = rows.sum(1, keepdim=True).clamp(min=1.0)
    w = torch.einsum("bq,bqk->bk", rows, a) / n_rows
    w = torch.where(vm, w, w.new_zeros(()))
    if normalize:
        total = w.sum(1, keepdim=True)
        w = torch.where(total > 0, w / total.clamp(min=torch.finfo(w.dtype).tiny), w.new_zeros(()))
    return w


def uniform_visual_weights(visual_mask: Bool[Tensor, "batch seq"]) -> Float[Tensor, "batch seq"]:
    """``1/N_v`` at each visual position of a row, 0 elsewhere (LLaVA-KD's uniform alignment)."""
    check_tensor("visual_mask", visual_mask, ndim=2)
    check_bool("visual_mask", visual_mask)
    w = visual_mask.float()
    return w / w.sum(1, keepdim=True).clamp(min=1.0)


def iva_loss(
    student_logits: Float[Tensor, "batch seq vocab"],
    teacher_logits: Float[Tensor, "batch seq tvocab"],
    weights: Float[Tensor, "batch seq"],
    *,
    kind: str = "fkl",
    temperature: int | float = 1.0,
    beta: int | float = 0.5,
    alpha: int | float = 0.1,
    vocab_size: int | None = None,
    num_sequences: int | float | Tensor | None = None,
) -> Float[Tensor, ""]:
    """IVA (Eq. 4): per sample ``sum_t weights[b, t] * D_t``, mean over the batch.

    Only positions with a non-zero weight are evaluated (typically the visual tokens).

    Args:
        weights: from :func:`visual_importance` (teacher attention at ``l*``) or
            :func:`uniform_visual_weights`; detached, must be finite and >= 0.
        num_sequences: global number of sequences for gradient accumulation
            (default: this batch's ``B``).
    """
    total, _ = align_ti_terms(
        student_logits, teacher_logits, None, sft=0.0, kd=0.0, iva=1.0, tpa=0.0, visual_weights=weights,
        visual_weights_name="weights", kind=kind, temperature=temperature, beta=beta, alpha=alpha,
        vocab_size=vocab_size, num_sequences=num_sequences,
    )
    return total


class IVALoss(DivergenceModule):
    """Module twin of :func:`iva_loss`.

    ``IVALoss(**options)(s, t, weights, ...)`` equals ``iva_loss(s, t, weights, ..., **options)``.

    Args:
        kind, temperature, beta, alpha, vocab_size: the divergence options of
            :func:`tokinteract.token_divergence` (default ``kind="fkl"``, KL(T||S)).
    """

    def forward(
        self,
        student_logits: Float[Tensor, "batch seq vocab"],
        teacher_logits: Float[Tensor, "batch seq tvocab"],
        weights: Float[Tensor, "batch seq"],
        *,
        num_sequences: int | float | Tensor | None = None,
    ) -> Float[Tensor, ""]:
        return iva_loss(student_logits, teacher_logits, weights, num_sequences=num_sequences, **self.options)
