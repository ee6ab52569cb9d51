"""Which rows each Align-TI part needs, with their weights and normalisers (private).

Shared by :class:`tokinteract.AlignTILoss` (argument checks), :mod:`tokinteract.chunked` and
:mod:`tokinteract.fused` (argument checks, the row plan and the single chunked pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokinteract._checks import check_finite, check_float, check_integer, check_nonnegative, check_tensor
from tokinteract._engine import run_terms
from tokinteract.divergence import check_divergence_options
from tokinteract.expansion import TPAExpansion
from tokinteract.kd import shift_labels
from tokinteract.reduction import resolve_count

PARTS = ("sft", "kd", "iva", "tpa")
TEACHER_PARTS = ("kd", "iva", "tpa")


def check_options(
    sft: float, kd: float, iva: float, tpa: float, kind: str, temperature: float, beta: float, alpha: float
) -> dict[str, float]:
    """The part weights as floats (each finite and >= 0, not all 0), after checking the divergence options."""
    weights = {"sft": float(sft), "kd": float(kd), "iva": float(iva), "tpa": float(tpa)}
    for name, w in weights.items():
        check_nonnegative(name, w)
    if not any(w > 0 for w in weights.values()):
        raise ValueError("every part has weight 0; enable at least one of sft, kd, iva, tpa")
    check_divergence_options(kind, temperature, beta, alpha)
    return weights


def check_part_inputs(
    weights: dict[str, float],
    *,
    teacher_missing: bool,
    teacher_is: str,
    expansion: object,
    visual_weights: Tensor | None,
) -> list[str]:
    """Check that every enabled part has its inputs; return the enabled parts that need the teacher.

    ``teacher_is`` names the missing teacher input in the message (e.g. ``"teacher_logits is"``).
    """
    needs_teacher = [k for k in TEACHER_PARTS if weights[k] > 0]
    if teacher_missing and needs_teacher:
        raise ValueError(f"{teacher_is} required when {needs_teacher} have non-zero weight, got None")
    if weights["tpa"] > 0 and expansion is None:
        raise ValueError("expansion is required when tpa > 0 (the TPAExpansion both forwards ran on), got None")
    if weights["iva"] > 0 and visual_weights is None:
        raise ValueError("visual_weights is required when iva > 0, got None")
    return needs_teacher


def check_expansion(expansion: object) -> TPAExpansion:
    """``expansion``, if it is a :class:`tokinteract.TPAExpansion`; a ``TypeError`` otherwise."""
    if not isinstance(expansion, TPAExpansion):
        raise TypeError(f"expansion must be a TPAExpansion, got {type(expansion).__name__}")
    return expansion


@dataclass
class Plan:
    """Which flattened rows the Align-TI terms need, with per-row coefficients.

    ``rows`` index the flattened ``[B * L]`` positions of the (possibly expanded) logits.
    ``div_coef[r]`` is the coefficient of ``D_r`` in the weighted total and ``ce_coef[r]``
    that of the cross-entropy (``ce_target[r] = -1``: none). ``parts`` maps each enabled
    part to ``(kind, coef)`` with ``kind`` ``"div"`` or ``"ce"`` and the part's own,
    unweighted coefficients (so ``part = sum coef * value``).
    """

    rows: Tensor
    div_coef: Tensor | None
    ce_target: Tensor | None
    ce_coef: Tensor | None
    parts: dict[str, tuple[str, Tensor]]


def check_labels(labels: Tensor, batch: int, seq: int, vocab: int, ignore_index: int) -> Tensor:
    """Validate ``labels [B, T]`` and return the aligned targets (``shift_labels``)."""
    check_tensor("labels", labels, ndim=2)
    check_integer("labels", labels)
    if tuple(labels.shape) != (batch, seq):
        raise ValueError(f"labels must have shape {(batch, seq)} (batch, ground-truth seq), got {tuple(labels.shape)}")
    target = shift_labels(labels, ignore_index)
    check_target_range("labels", target, vocab, ignore_index)
    return target


def check_target_range(name: str, target: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """``target != ignore_index``, after checking that every other entry lies in ``[0, vocab)``."""
    valid = target != ignore_index
    tv = target[valid]
    if tv.numel() and (int(tv.min()) < 0 or int(tv.max()) >= vocab):
        raise ValueError(
            f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}, "
            f"got values in [{int(tv.min())}, {int(tv.max())}]"
        )
    return valid


def plan_align_ti(
    *,
    batch: int,
    length: int,
    labels: Tensor,
    student_vocab: int,
    weights: dict[str, float],
    ignore_index: int,
    expansion: TPAExpansion | None,
    visual_weights: Tensor | None,
    num_items: int | float | Tensor | None,
    num_sequences: int | float | Tensor | None,
    device: torch.device,
) -> Plan:
    """Build the per-row coefficients of ``w_sft SFT + w_kd KD + w_iva IVA + w_tpa TPA``.

    ``length`` is the logits' sequence length: ``T`` without an expansion, ``T2`` with one
    (the ground truth is then the first ``T`` slots). Normalisers follow the core losses:
    sft/kd/tpa divide by ``max(num_items or #positions, 1)``, iva by ``max(num_sequences or B, 1)``.
    """
    if expansion is not None:
        if tuple(expansion.input_ids.shape) != (batch, length):
            raise ValueError(
                f"the logits must cover the expanded sequence {tuple(expansion.input_ids.shape)} in their "
                f"first two dimensions, got {(batch, length)}"
            )
        T = expansion.seq_len
    else:
        T = length
    target = check_labels(labels, batch, T, student_vocab, ignore_index)
    valid = target != ignore_index  # [B, T]
    N = batch * length
    cdt = torch.float32
    dense_div: dict[str, Tensor] = {}
    dense_ce: Tensor | None = None
    gt_flat = (torch.arange(batch, device=device)[:, None] * length + torch.arange(T, device=device)).reshape(-1)

    def dense_gt(values: Tensor) -> Tensor:
        out = torch.zeros(N, dtype=cdt, device=device)
        out[gt_flat] = values.reshape(-1).to(cdt)
        return out

    if weights.get("sft", 0.0) > 0 or weights.get("kd", 0.0) > 0:
        inv = 1.0 / resolve_count(valid, num_items)
        per = valid.to(cdt) * inv
        if weights.get("kd", 0.0) > 0:
            dense_div["kd"] = dense_gt(per)
        if weights.get("sft", 0.0) > 0:
            dense_ce = dense_gt(per)
    if weights.get("iva", 0.0) > 0:
        vw = visual_weights
        check_tensor("visual_weights", vw, ndim=2)
        check_float("visual_weights", vw)
        if tuple(vw.shape) != (batch, T):
            raise ValueError(f"visual_weights must have shape {(batch, T)} (batch, ground-truth seq), got {tuple(vw.shape)}")
        w = vw.detach().to(cdt)
        check_finite("visual_weights", w)
        if bool((w < 0).any()):
            raise ValueError(f"visual_weights must be >= 0, got {int((w < 0).sum())} negative value(s)")
        n = batch if num_sequences is None else num_sequences
        denom = resolve_count(torch.ones(batch, dtype=torch.bool, device=device), n)
        dense_div["iva"] = dense_gt(w / denom)
    if weights.get("tpa", 0.0) > 0:
        if expansion is None:
            raise ValueError("expansion is required when tpa > 0 (the TPAExpansion both forwards ran on), got None")
        b, _, _, slot = expansion.candidate_slots()
        inv = 1.0 / resolve_count(expansion.candidate_mask, num_items)
        out = torch.zeros(N, dtype=cdt, device=device)
        out.index_put_((b.to(device) * length + slot.to(device),), (inv / expansion.num_candidates).expand(b.shape[0]).to(cdt), accumulate=True)
        dense_div["tpa"] = out
    need = torch.zeros(N, dtype=torch.bool, device=device)
    div_total = None
    for name, vec in dense_div.items():
        need |= vec != 0
        div_total = weights[name] * vec if div_total is None else div_total + weights[name] * vec
    ce_target_dense = None
    if dense_ce is not None:
        need |= dense_ce != 0
        ce_target_dense = torch.full((N,), -1, dtype=torch.long, device=device)
        ce_target_dense[gt_flat] = torch.where(valid, target, torch.full_like(target, -1)).reshape(-1).long()
    rows = need.nonzero().reshape(-1)
    parts: dict[str, tuple[str, Tensor]] = {}
    if dense_ce is not None:
        parts["sft"] = ("ce", dense_ce[rows])
    for name, vec in dense_div.items():
        parts[name] = ("div", vec[rows])
    return Plan(
        rows=rows,
        div_coef=None if div_total is None else div_total[rows],
        ce_target=None if ce_target_dense is None else ce_target_dense[rows],
        ce_coef=None if dense_ce is None else weights["sft"] * dense_ce[rows],
        parts=parts,
    )


def parts_from_rows(plan: Plan, div_all: Tensor, ce_all: Tensor) -> dict[str, Tensor]:
    """Each part's (unweighted, detached) value from the per-row values of one pass."""
    out: dict[str, Tensor] = {}
    for name, (which, coef) in plan.parts.items():
        values = div_all if which == "div" else ce_all
        out[name] = (coef.to(values.dtype) * values).sum().detach()
    return out


def run_align_ti(
    student: tuple[Tensor, Tensor | None, Tensor | None],
    teacher: tuple[Tensor, Tensor | None, Tensor | None] | None,
    *,
    vocab: int,
    chunk_size: int | None,
    div_opts: dict[str, Any],
    student_name: str = "student_logits",
    teacher_name: str = "teacher_logits",
    **plan_args: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plan the rows, run them in one chunked pass; return ``(total, parts)`` in :data:`PARTS` order.

    ``student``/``teacher`` are ``(src, weight, bias)`` over the flattened ``[batch * length]``
    positions (see :func:`tokinteract._engine.run_terms`); ``teacher`` is None when no enabled
    part needs it. ``div_opts`` holds ``kind``, ``temperature``, ``beta``, ``alpha``; the names
    are for the error messages; ``plan_args`` are the keyword arguments of
    :func:`plan_align_ti` but ``device``.
    """
    plan = plan_align_ti(**plan_args, device=student[0].device)
    total, div_all, ce_all = run_terms(
        student, teacher, plan.rows, int(plan.rows.shape[0]),
        div_coef=plan.div_coef if teacher is not None else None, ce_target=plan.ce_target,
        ce_coef=plan.ce_coef, vocab=vocab, chunk_size=chunk_size, student_name=student_name,
        teacher_name=teacher_name, **div_opts,
    )
    parts = parts_from_rows(plan, div_all, ce_all)
    return total, {k: parts[k] for k in PARTS if k in parts}
