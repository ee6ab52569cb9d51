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
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tokinteract._checks import check_bool, check_finite, check_float, check_tensor
from tokinteract.align_ti import align_ti_terms
from tokinteract.divergence import DivergenceModule

__all__ = ["IVALoss", "iva_loss", "uniform_visual_weights", "visual_importance"]


def visual_importance(
    attn: Float[Tensor, "batch heads queries keys"] | Float[Tensor, "batch queries keys"],
    instruction_mask: Bool[Tensor, "batch queries"],
    visual_mask: Bool[Tensor, "batch keys"],
    *,
    normalize: bool = False,
) -> Float[Tensor, "batch keys"]:
    """Instruction-to-vision importance of each key position (mean over heads and rows).

    Args:
        attn: attention probabilities at one layer, ``[B, H, Q, K]`` or head-averaged
            ``[B, Q, K]``. With the full map ``Q = K = T``; with
            :func:`tokinteract.hf.capture_attention` the rows may be only the captured ones.
        instruction_mask: which query rows are instruction tokens.
        visual_mask: which key positions are visual tokens.
        normalize: rescale each row's weights to sum to 1 (rows without visual tokens or
            instruction rows stay 0).

    Returns:
        fp32 ``[B, K]``, 0 at non-visual positions and in rows with no instruction token.
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
    check_finite("attn", a)
    rows = instruction_mask.to(a.dtype)
    n_rows = rows.sum(1, keepdim=True).clamp(min=1.0)
    w = torch.einsum("bq,bqk->bk", rows, a) / n_rows
    w = torch.where(visual_mask, w, w.new_zeros(()))
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
