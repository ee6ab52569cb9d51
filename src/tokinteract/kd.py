"""Supervised fine-tuning and Vanilla KD (Eq. 2) on response tokens.

Indexing: ``logits[b, t]`` predicts token ``t + 1``; :func:`shift_labels` aligns labels to
logits, so position ``t`` is supervised iff ``shift_labels(labels)[b, t] != ignore_index``.

Vanilla KD (paper Eq. 2, averaged instead of summed over response tokens):

    L_kd = sum_{b,t valid} D(S_{b,t}, T_{b,t}) / max(num_items or #valid, 1)

with ``D`` the forward KL ``KL(T || S)`` by default (see :mod:`tokinteract.divergence`).
The teacher is a fixed target: its logits are detached.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tokinteract._checks import check_integer, check_tensor
from tokinteract.align_ti import align_ti_terms
from tokinteract.divergence import DivergenceModule

__all__ = ["KDLoss", "SFTLoss", "kd_loss", "shift_labels", "sft_loss"]


def shift_labels(labels: Int[Tensor, "batch seq"], ignore_index: int = -100) -> Int[Tensor, "batch seq"]:
    """Labels aligned to logits: ``labels[:, 1:]`` followed by one ``ignore_index``."""
    check_tensor("labels", labels, ndim=2)
    check_integer("labels", labels)
    if labels.shape[1] == 0:
        return labels.clone()
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def sft_loss(
    student_logits: Float[Tensor, "batch seq vocab"],
    labels: Int[Tensor, "batch seq"],
    *,
    ignore_index: int = -100,
    num_items: int | float | Tensor | None = None,
) -> Float[Tensor, ""]:
    """Next-token cross-entropy ``-log S_{b,t}(labels[b, t+1])``, mean over supervised positions.

        L_sft = sum_{b,t valid} -log softmax(z_{b,t})[labels[b, t+1]] / max(num_items or #valid, 1)
    """
    total, _ = align_ti_terms(
        student_logits, None, labels, sft=1.0, kd=0.0, iva=0.0, tpa=0.0, ignore_index=ignore_index,
        num_items=num_items,
    )
    return total


def kd_loss(
    student_logits: Float[Tensor, "batch seq vocab"],
    teacher_logits: Float[Tensor, "batch seq tvocab"],
    labels: Int[Tensor, "batch seq"],
    *,
    ignore_index: int = -100,
    kind: str = "fkl",
    temperature: int | float = 1.0,
    beta: int | float = 0.5,
    alpha: int | float = 0.1,
    vocab_size: int | None = None,
    num_items: int | float | Tensor | None = None,
) -> Float[Tensor, ""]:
    """Vanilla KD (Eq. 2): mean of ``D(S, T)`` over positions whose aligned label is valid.

    ``D`` defaults to the forward KL ``KL(T || S)``; see :func:`tokinteract.token_divergence`
    for the other kinds and the temperature convention. Only supervised rows are converted
    to fp32, so memory scales with the number of response tokens, not the sequence.
    """
    total, _ = align_ti_terms(
        student_logits, teacher_logits, labels, sft=0.0, kd=1.0, iva=0.0, tpa=0.0, ignore_index=ignore_index,
        kind=kind, temperature=temperature, beta=beta, alpha=alpha, vocab_size=vocab_size, num_items=num_items,
    )
    return total


class SFTLoss(nn.Module):
    """Module twin of :func:`sft_loss`.

    Args:
        ignore_index: label value of the positions that are not supervised.
    """

    def __init__(self, *, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(
        self,
        student_logits: Float[Tensor, "batch seq vocab"],
        labels: Int[Tensor, "batch seq"],
        *,
        num_items: int | float | Tensor | None = None,
    ) -> Float[Tensor, ""]:
        return sft_loss(student_logits, labels, ignore_index=self.ignore_index, num_items=num_items)


class KDLoss(DivergenceModule):
    """Module twin of :func:`kd_loss`.

    ``KDLoss(**options)(s, t, labels)`` equals ``kd_loss(s, t, labels, **options)``.

    Args:
        ignore_index: label value of the positions that are not supervised.
        kind, temperature, beta, alpha, vocab_size: the divergence options of
            :func:`tokinteract.token_divergence` (default ``kind="fkl"``, KL(T||S)).
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        kind: str = "fkl",
        temperature: int | float = 1.0,
        beta: int | float = 0.5,
        alpha: int | float = 0.1,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__(kind=kind, temperature=temperature, beta=beta, alpha=alpha, vocab_size=vocab_size)
        self.ignore_index = ignore_index

    def forward(
        self,
        student_logits: Float[Tensor, "batch seq vocab"],
        teacher_logits: Float[Tensor, "batch seq tvocab"],
        labels: Int[Tensor, "batch seq"],
        *,
        num_items: int | float | Tensor | None = None,
    ) -> Float[Tensor, ""]:
        return kd_loss(
            student_logits, teacher_logits, labels, ignore_index=self.ignore_index, num_items=num_items,
            **self.options,
        )
