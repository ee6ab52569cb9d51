"""Fused LM head + divergence: logits never exist for more than one chunk of rows.

The functions here take the hidden states that enter each model's LM head (after the final
norm) and the head's ``weight [V, H]`` (and optional ``bias [V]``), and compute

    logits_chunk = hidden[rows_chunk] @ weight.T + bias

one chunk of rows at a time, exactly the chunked computation of :mod:`tokinteract.chunked`.
Only the rows the loss needs ever reach the LM head (``logits_to_keep``-style selection), the
teacher's chunk is computed without gradient, and the student's gradients are accumulated per
chunk: ``d/dhidden = g @ W`` (hidden's dtype) and ``d/dW = g^T @ hidden``, ``d/db = sum g``
(accumulated in fp32, returned in the parameter's dtype), with ``g`` the chunk's gradient with
respect to its logits. No ``[rows, V]`` tensor is kept.

Tied embeddings: pass the embedding matrix as ``student_weight`` (``lm_head.weight`` *is*
``embed_tokens.weight`` when tied); autograd then accumulates this gradient into the same
Parameter as the embedding lookup's gradient, with no special handling.

Results equal the unfused losses on ``hidden @ weight.T + bias`` up to matmul rounding
(fp32) or bf16 rounding of the logits (bf16; the unfused path rounds the full logits to bf16
too, while the divergence itself is always computed in fp32).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tokinteract._checks import (
    Deferred,
    check_bool,
    check_choice,
    check_int,
    check_integer,
    check_lm_head,
    check_tensor,
    shared_vocab,
)
from tokinteract._engine import mean_row_divergence, resolve_chunk_size, run_terms
from tokinteract._plan import check_target_range
from tokinteract.align_ti import HIDDEN_LOGITS_NAMES, AlignTILoss, HiddenStates, align_ti_terms
from tokinteract.divergence import check_divergence_options
from tokinteract.expansion import TPAExpansion
from tokinteract.reduction import compute_dtype, resolve_count
from tokinteract.sampling import sample_candidates

__all__ = [
    "BACKENDS",
    "FusedAlignTILoss",
    "fused_align_ti_terms",
    "fused_linear_cross_entropy",
    "fused_linear_divergence",
    "fused_sample_candidates",
]


BACKENDS = ("tokinteract", "liger")
"""Backends of :func:`fused_align_ti_terms`: tokinteract's own pass, or Liger-Kernel for KD and TPA."""

_ALIGN_TI_BACKEND = {"tokinteract": "fused", "liger": "liger"}



def fused_linear_divergence(
    student_hidden: Float[Tensor, "rows hidden"],
    student_weight: Float[Tensor, "vocab hidden"],
    teacher_hidden: Float[Tensor, "rows feat"],
    teacher_weight: Float[Tensor, "tvocab feat"],
    row_weights: Float[Tensor, "rows"] | None = None,
    *,
    student_bias: Float[Tensor, "vocab"] | None = None,
    teacher_bias: Float[Tensor, "tvocab"] | None = None,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    normalizer: int | float | Tensor | None = None,
    chunk_size: int | None = None,
) -> Float[Tensor, ""]:
    """Weighted mean divergence of ``hidden @ weight.T + bias`` rows, logits never materialised.

        loss = sum_r w_r * D(S_r, T_r) / max(normalizer or rows, 1)
        S_r = softmax((h_s[r] @ W_s.T + b_s) / tau),  T_r = softmax((h_t[r] @ W_t.T + b_t) / tau)

    ``D`` as in :func:`tokinteract.token_divergence` (default forward KL ``KL(T || S)``,
    no ``tau**2``). Equal to :func:`tokinteract.chunked.chunked_divergence` on the
    materialised logits. Gradients flow to ``student_hidden``, ``student_weight`` and
    ``student_bias``; the teacher side and ``row_weights`` are constants.

    Args:
        student_hidden: ``[rows, H]`` input of the student's LM head.
        student_weight: ``[V, H]`` the student's LM head (the embedding when tied).
        teacher_hidden: ``[rows, H_t]`` input of the teacher's LM head.
        teacher_weight: ``[V_t, H_t]``.
        row_weights: ``[rows]`` finite, >= 0 (default all 1).
        student_bias: optional ``[V]`` bias of the student's LM head.
        teacher_bias: optional ``[V_t]`` bias of the teacher's LM head.
        kind: ``"fkl"`` (default), ``"rkl"``, ``"jsd"``, ``"skew_fkl"``, ``"skew_rkl"`` or ``"tvd"``.
        temperature: ``tau > 0``; both sides use ``softmax(logits / tau)``; no ``tau**2``.
        beta: JSD mixing weight of the teacher, in [0, 1].
        alpha: skew weight, in [0, 1).
        vocab_size: compare only the first ``vocab_size`` entries of both vocabularies.
        normalizer: the denominator; default the number of rows.
        chunk_size: rows per chunk; None = ``max(1, 2**24 // V)``.
    """
    check_divergence_options(kind, temperature, beta, alpha)
    check_tensor("student_hidden", student_hidden, ndim=2)
    check_tensor("teacher_hidden", teacher_hidden, ndim=2)
    check_lm_head("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
    check_lm_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias)
    R = student_hidden.shape[0]
    if teacher_hidden.shape[0] != R:
        raise ValueError(f"teacher_hidden must have {R} rows like student_hidden, got shape {tuple(teacher_hidden.shape)}")
    return mean_row_divergence(
        (student_hidden, student_weight, student_bias), (teacher_hidden, teacher_weight, teacher_bias),
        row_weights, normalizer=normalizer,
        vocab=shared_vocab("student_weight", student_weight.shape[0], "teacher_weight", teacher_weight.shape[0], vocab_size),
        chunk_size=chunk_size,
        div_opts=dict(kind=kind, temperature=temperature, beta=beta, alpha=alpha), **HIDDEN_LOGITS_NAMES,
    )


def fused_linear_cross_entropy(
    hidden: Float[Tensor, "rows hidden"],
    weight: Float[Tensor, "vocab hidden"],
    targets: Int[Tensor, "rows"],
    *,
    bias: Float[Tensor, "vocab"] | None = None,
    ignore_index: int = -100,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
) -> Float[Tensor, ""]:
    """``sum_{r: targets[r] != ignore_index} -log softmax(h[r] @ W.T + b)[targets[r]] / max(num_items or count, 1)``.

    The fused twin of :func:`tokinteract.sft_loss` on already-aligned targets (use
    :func:`tokinteract.shift_labels` first); temperature is always 1.
    """
    check_tensor("hidden", hidden, ndim=2)
    check_lm_head("hidden", hidden, "weight", weight, "bias", bias)
    check_tensor("targets", targets, ndim=1)
    check_integer("targets", targets)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must have one entry per row ({hidden.shape[0]}), got shape {tuple(targets.shape)}")
    V = weight.shape[0]
    checks = Deferred()
    valid = check_target_range("targets", targets, V, ignore_index, checks)
    rows = valid.nonzero().reshape(-1)
    coef = (1.0 / resolve_count(valid, num_items)).to(compute_dtype(weight)).expand(rows.shape[0]).contiguous()
    total, _, _ = run_terms(
        (hidden, weight, bias), None, rows, int(rows.shape[0]), div_coef=None,
        ce_target=targets[rows].long(), ce_coef=coef, kind="fkl", temperature=1.0, beta=0.5, alpha=0.1,
        vocab=V, chunk_size=chunk_size, student_name="logits (hidden @ weight.T)", checks=checks,
    )
    checks.resolve()
    return total


def fused_align_ti_terms(
    student_hidden: Float[Tensor, "batch len hidden"],
    student_weight: Float[Tensor, "vocab hidden"],
    teacher_hidden: Float[Tensor, "batch len feat"] | None,
    teacher_weight: Float[Tensor, "tvocab feat"] | None,
    labels: Int[Tensor, "batch seq"],
    *,
    student_bias: Float[Tensor, "vocab"] | None = None,
    teacher_bias: Float[Tensor, "tvocab"] | None = None,
    sft: int | float = 1.0,
    kd: int | float = 1.0,
    iva: int | float = 1.0,
    tpa: int | float = 1.0,
    expansion: TPAExpansion | None = None,
    visual_weights: Float[Tensor, "batch seq"] | None = None,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    num_items: int | float | Tensor | None = None,
    num_sequences: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "tokinteract",
    liger_compiled: bool = True,
    validate: bool = True,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """Align-TI (paper Eq. 8) from hidden states: ``w_sft SFT + w_kd KD + w_iva IVA + w_tpa TPA``.

    Equal to :class:`tokinteract.AlignTILoss` applied to ``hidden @ weight.T + bias`` of both
    models (same layouts: ``[B, T, H]`` on the ground truth or ``[B, T2, H]`` over the TPA
    expansion), but only the rows some enabled part needs go through the LM heads, one chunk
    at a time, each row once (see :func:`tokinteract.chunked.chunked_align_ti_terms`).

    Args:
        student_hidden: input of the student's LM head (after the final norm).
        student_weight: the student's LM-head weight ``[V, H]`` (the embedding when tied).
        teacher_hidden: input of the teacher's LM head; may be None for SFT only.
        teacher_weight: the teacher's LM-head weight ``[V_t, H_t]``.
        labels: ``[B, T]`` unshifted labels with ``ignore_index`` where unsupervised.
        backend: ``"tokinteract"`` (default) or ``"liger"``: the KD and TPA terms (uniform row
            weights) go through Liger-Kernel's ``LigerFusedLinearJSDLoss`` (see
            :mod:`tokinteract.liger`; ``kind`` must then be ``"fkl"``, ``"rkl"`` or ``"jsd"``),
            while SFT and IVA (attention-weighted rows) stay on tokinteract's pass. Same values
            and gradients within fp32 rounding, or bf16 tolerance for bf16 inputs (Liger computes
            in the input dtype). Needs ``pip install "tokinteract[liger]"``.
        liger_compiled: with ``backend="liger"``, let Liger ``torch.compile`` its chunk step
            (Liger's default); ignored otherwise.
        validate: check values with one device-to-host read per call (``False``: none).

    Returns:
        ``(total, parts)``; ``parts`` maps each enabled part to its detached, unweighted value.
    """
    check_choice("backend", backend, BACKENDS)
    return align_ti_terms(
        HiddenStates(student_hidden, student_weight, student_bias),
        None if teacher_hidden is None or teacher_weight is None else HiddenStates(teacher_hidden, teacher_weight, teacher_bias),
        labels, sft=sft, kd=kd, iva=iva, tpa=tpa, expansion=expansion, visual_weights=visual_weights, kind=kind,
        temperature=temperature, beta=beta, alpha=alpha, vocab_size=vocab_size, ignore_index=ignore_index,
        num_items=num_items, num_sequences=num_sequences, backend=_ALIGN_TI_BACKEND[backend], chunk_size=chunk_size,
        liger_compiled=liger_compiled, validate=validate,
    )


@torch.no_grad()
def fused_sample_candidates(
    student_hidden: Float[Tensor, "batch seq hidden"],
    student_weight: Float[Tensor, "vocab hidden"],
    num_candidates: int,
    *,
    mask: Bool[Tensor, "batch seq"],
    student_bias: Float[Tensor, "vocab"] | None = None,
    strategy: str = "nucleus",
    top_p: float = 0.95,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> Int[Tensor, "batch seq cand"]:
    """:func:`tokinteract.sample_candidates` from hidden states, one chunk of rows at a time.

    Only the rows where ``mask`` is True go through the LM head (``hidden @ weight.T + bias``,
    no gradient), ``chunk_size`` rows at a time, and each chunk is passed to
    :func:`tokinteract.sample_candidates` (same strategies, ``top_p``, ``temperature``);
    elsewhere the result is 0. ``"greedy"`` gives exactly the unfused result; the random
    strategies draw from the same distributions, and with one chunk covering every masked row
    they make exactly the unfused draws for the same generator (with several chunks the
    generator's stream is consumed chunk by chunk, so the draws may differ from the unfused
    ones while following the same distributions).

    Returns:
        ``int64`` token ids ``[batch, seq, d]``.
    """
    check_tensor("student_hidden", student_hidden, ndim=3)
    check_lm_head("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
    d = check_int("num_candidates", num_candidates, minimum=1)
    check_tensor("mask", mask, ndim=2)
    check_bool("mask", mask)
    B, T, _ = student_hidden.shape
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must have shape {(B, T)} (batch, seq of student_hidden), got {tuple(mask.shape)}")
    V = student_weight.shape[0]
    C = resolve_chunk_size(chunk_size, V)
    out = torch.zeros(B, T, d, dtype=torch.long, device=student_hidden.device)
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    for start in range(0, b_idx.shape[0], C):
        b, t = b_idx[start : start + C], t_idx[start : start + C]
        logits = torch.nn.functional.linear(student_hidden[b, t], student_weight, student_bias)
        picked = sample_candidates(
            logits[None], d, strategy=strategy, top_p=top_p, temperature=temperature, generator=generator
        )
        out[b, t] = picked[0]
    return out


class FusedAlignTILoss(nn.Module):
    """:class:`tokinteract.AlignTILoss` from hidden states and LM heads (:func:`fused_align_ti_terms`).

    Holds an ``AlignTILoss(backend="fused")`` (``backend="liger"``: ``AlignTILoss(backend="liger")``)
    and takes each model's hidden states, LM-head weight and bias as separate arguments. Same
    constructor as :class:`tokinteract.AlignTILoss` plus ``chunk_size``, ``backend``
    (``"tokinteract"`` or ``"liger"``) and ``liger_compiled``; see :func:`fused_align_ti_terms`.

    Args:
        backend: ``"tokinteract"`` (default) or ``"liger"`` (the KD and TPA terms through
            Liger-Kernel's fused-linear JSD; needs the ``liger`` extra).
        liger_compiled: with ``backend="liger"``, let Liger ``torch.compile`` its chunk step.
        **kwargs: ``chunk_size`` (rows per chunk; None = ``max(1, 2**24 // V)``) and every
            constructor argument of :class:`tokinteract.AlignTILoss`, with the same meaning.
    """

    def __init__(
        self, *, backend: str = "tokinteract", liger_compiled: bool = True, **kwargs: Any
    ) -> None:
        super().__init__()
        check_choice("backend", backend, BACKENDS)
        self.backend = backend
        self.loss = AlignTILoss(backend=_ALIGN_TI_BACKEND[backend], liger_compiled=liger_compiled, **kwargs)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def forward(
        self,
        student_hidden: Float[Tensor, "batch len hidden"],
        student_weight: Float[Tensor, "vocab hidden"],
        teacher_hidden: Float[Tensor, "batch len feat"] | None,
        teacher_weight: Float[Tensor, "tvocab feat"] | None,
        labels: Int[Tensor, "batch seq"],
        *,
        student_bias: Float[Tensor, "vocab"] | None = None,
        teacher_bias: Float[Tensor, "tvocab"] | None = None,
        expansion: TPAExpansion | None = None,
        visual_weights: Float[Tensor, "batch seq"] | None = None,
        num_items: int | float | Tensor | None = None,
        num_sequences: int | float | Tensor | None = None,
    ) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
        """Return ``(total, parts)`` like :meth:`tokinteract.AlignTILoss.forward`."""
        teacher = None if teacher_hidden is None or teacher_weight is None else HiddenStates(teacher_hidden, teacher_weight, teacher_bias)
        return self.loss(
            HiddenStates(student_hidden, student_weight, student_bias), teacher, labels, expansion=expansion,
            visual_weights=visual_weights, num_items=num_items, num_sequences=num_sequences,
        )
