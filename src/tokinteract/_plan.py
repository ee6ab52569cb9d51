"""The one definition of the Align-TI terms: which rows each needs, with which coefficient (private).

Every term of paper Eq. 8 is linear in per-row quantities of the (flattened ``[B * L]``)
logits rows ``r``:

    SFT = sum_r c_sft[r] * CE_r       c_sft[r] = valid[r] / max(num_items or #valid, 1)
    KD  = sum_r c_kd[r]  * D_r        c_kd[r]  = valid[r] / max(num_items or #valid, 1)
    IVA = sum_r c_iva[r] * D_r        c_iva[r] = w[b, t] / max(num_sequences or B, 1)
    TPA = sum_r c_tpa[r] * D_r        c_tpa[r] = 1 / (d * max(num_items or #candidate positions, 1))
                                                 on candidate slots

with ``valid`` the positions whose aligned label (:func:`tokinteract.shift_labels`) is not
``ignore_index``, ``w`` the detached visual weights and ``D_r`` the divergence of row ``r``
(:mod:`tokinteract.divergence`). :func:`plan_align_ti` builds these coefficients once;
:func:`run_align_ti` hands the plan to an evaluator of ``sum_r c_r * D_r + c'_r * CE_r``
(eager autograd, the chunked pass over logits or over hidden states, Liger-Kernel). The
backends differ only there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokinteract._checks import Deferred, check_integer, check_nonnegative, check_tensor, check_weights
from tokinteract._engine import run_terms
from tokinteract.divergence import check_divergence_options
from tokinteract.expansion import TPAExpansion
from tokinteract.reduction import resolve_count

PARTS = ("sft", "kd", "iva", "tpa")
TEACHER_PARTS = ("kd", "iva", "tpa")
BACKENDS = ("eager", "chunked", "fused", "liger")
"""How ``sum_r c_r * D_r`` is evaluated: autograd on the rows (``eager``), ``chunk_size`` rows
at a time over logits (``chunked``) or over hidden states and LM heads (``fused``), or KD and
TPA through Liger-Kernel's fused JSD and the rest as ``fused`` (``liger``)."""

UNIFORM_PARTS = ("sft", "kd", "tpa")
"""Parts whose coefficient is the same on every row they cover (a mean over their rows)."""


def resolve_weights(
    given: dict[str, Any], *, has_expansion: bool, has_visual_weights: bool
) -> dict[str, float]:
    """The weight of each part for one call: a weight left at ``None`` means 1, except that IVA
    and TPA are off (0) when their input (``visual_weights``, ``expansion``) is absent, so the
    defaults work on text-only data; an explicit weight is used as given."""
    out = {k: 1.0 if w is None else float(w) for k, w in given.items()}
    if given.get("iva") is None and not has_visual_weights:
        out["iva"] = 0.0
    if given.get("tpa") is None and not has_expansion:
        out["tpa"] = 0.0
    return out


def check_options(sft: Any, kd: Any, iva: Any, tpa: Any, kind: Any, temperature: Any, beta: Any, alpha: Any) -> dict[str, Any]:
    """The part weights as given (each ``None`` or a finite number >= 0), after checking the divergence options."""
    weights = {"sft": sft, "kd": kd, "iva": iva, "tpa": tpa}
    for name, w in weights.items():
        if w is not None:
            check_nonnegative(name, w)
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
    if not any(w > 0 for w in weights.values()):
        raise ValueError(
            "every part has weight 0 (or, left at its default, lacks its input); enable at least one of "
            f"sft, kd, iva, tpa, got weights {weights}"
        )
    needs_teacher = [k for k in TEACHER_PARTS if weights[k] > 0]
    if teacher_missing and needs_teacher:
        raise ValueError(f"{teacher_is} required when {needs_teacher} have non-zero weight, got None")
    if weights["tpa"] > 0 and expansion is None:
        raise ValueError("expansion is required when tpa > 0 (the TPAExpansion both forwards ran on), got None")
    if weights["iva"] > 0 and visual_weights is None:
        raise ValueError("visual_weights is required when iva > 0, got None")
    if expansion is not None:
        check_expansion(expansion)
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
    part to ``(on, coef)`` with ``on`` ``"div"`` or ``"ce"`` and the part's own,
    unweighted coefficients (so ``part = sum coef * value``).
    """

    rows: Tensor
    div_coef: Tensor | None
    ce_target: Tensor | None
    ce_coef: Tensor | None
    parts: dict[str, tuple[str, Tensor]]


def check_labels(
    labels: Tensor, batch: int, seq: int, vocab: int, ignore_index: int, checks: Deferred, *, name: str = "labels"
) -> Tensor:
    """Validate ``labels [B, T]`` and return the aligned targets (``shift_labels``); the range
    check (labels in ``[0, vocab)``) is deferred to ``checks``."""
    check_tensor(name, labels, ndim=2)
    check_integer(name, labels)
    if tuple(labels.shape) != (batch, seq):
        raise ValueError(f"{name} must have shape {(batch, seq)} (batch, ground-truth seq), got {tuple(labels.shape)}")
    from tokinteract.kd import shift_labels  # kd's losses are built on this module

    target = shift_labels(labels, ignore_index)
    check_target_range(name, target, vocab, ignore_index, checks)
    return target


def check_target_range(name: str, target: Tensor, vocab: int, ignore_index: int, checks: Deferred) -> Tensor:
    """``target != ignore_index``; that every other entry lies in ``[0, vocab)`` is checked by ``checks``."""
    valid = target != ignore_index

    def message(_: int) -> str:
        tv = target[valid]
        return (
            f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}, "
            f"got values in [{int(tv.min())}, {int(tv.max())}]"
        )

    checks.add(lambda: (valid & ((target < 0) | (target >= vocab))).sum(), message)
    return valid


def plan_align_ti(
    *,
    batch: int,
    length: int,
    labels: Tensor | None,
    student_vocab: int,
    weights: dict[str, float],
    ignore_index: int,
    expansion: TPAExpansion | None,
    visual_weights: Tensor | None,
    num_items: int | float | Tensor | None,
    num_sequences: int | float | Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
    checks: Deferred,
    visual_weights_name: str = "visual_weights",
) -> Plan:
    """Build the per-row coefficients of ``w_sft SFT + w_kd KD + w_iva IVA + w_tpa TPA`` (module docstring).

    ``length`` is the logits' sequence length: ``T`` without an expansion, ``T2`` with one
    (the ground truth is then the first ``T`` slots). ``dtype`` is the coefficients' dtype
    (the compute dtype of the student). Value checks go to ``checks``.
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
    N = batch * length
    cdt = dtype
    dense_div: dict[str, Tensor] = {}
    dense_ce: Tensor | None = None
    gt_flat = (torch.arange(batch, device=device)[:, None] * length + torch.arange(T, device=device)).reshape(-1)

    def dense_gt(values: Tensor) -> Tensor:
        out = torch.zeros(N, dtype=cdt, device=device)
        out[gt_flat] = values.reshape(-1).to(cdt)
        return out

    target = valid = None
    if weights.get("sft", 0.0) > 0 or weights.get("kd", 0.0) > 0:
        target = check_labels(labels, batch, T, student_vocab, ignore_index, checks)
        valid = target != ignore_index  # [B, T]
        per = valid.to(cdt) / resolve_count(valid, num_items).to(cdt)
        if weights.get("kd", 0.0) > 0:
            dense_div["kd"] = dense_gt(per)
        if weights.get("sft", 0.0) > 0:
            dense_ce = dense_gt(per)
    if weights.get("iva", 0.0) > 0:
        w = check_weights(visual_weights_name, visual_weights, (batch, T), "batch, ground-truth seq", checks)
        n = batch if num_sequences is None else num_sequences
        denom = resolve_count(torch.ones(batch, dtype=torch.bool, device=device), n)
        dense_div["iva"] = dense_gt(w.to(cdt) / denom.to(cdt))
    if weights.get("tpa", 0.0) > 0:
        if expansion is None:
            raise ValueError("expansion is required when tpa > 0 (the TPAExpansion both forwards ran on), got None")
        b, _, _, slot = expansion.candidate_slots()
        per_slot = 1.0 / (resolve_count(expansion.candidate_mask, num_items).to(cdt) * expansion.num_candidates)
        out = torch.zeros(N, dtype=cdt, device=device)
        out.index_put_((b.to(device) * length + slot.to(device),), per_slot.expand(b.shape[0]), accumulate=True)
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
        out[name] = (coef.to(values.dtype) * values.detach()).sum()
    return out


def run_align_ti(
    student: tuple[Tensor, Tensor | None, Tensor | None],
    teacher: tuple[Tensor, Tensor | None, Tensor | None] | None,
    *,
    backend: str,
    vocab: int,
    chunk_size: int | None,
    div_opts: dict[str, Any],
    checks: Deferred,
    student_name: str = "student_logits",
    teacher_name: str = "teacher_logits",
    liger_compiled: bool = True,
    **plan_args: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plan the rows and evaluate ``sum_r c_r * D_r + c'_r * CE_r`` with ``backend``.

    ``student``/``teacher`` are ``(src, weight, bias)`` over the flattened ``[batch * length]``
    positions: ``weight is None`` means ``src`` holds logits, otherwise hidden states for the
    LM head ``weight`` (see :func:`tokinteract._engine.run_terms`); ``teacher`` is None when no
    enabled part needs it. ``div_opts`` holds ``kind``, ``temperature``, ``beta``, ``alpha``;
    the names are for the error messages; ``plan_args`` are the keyword arguments of
    :func:`plan_align_ti` but ``device``, ``dtype`` and ``checks``. Returns ``(total, parts)``
    in :data:`PARTS` order; the caller resolves ``checks``.
    """
    src, weight, _ = student
    device, dtype = src.device, torch.promote_types((src if weight is None else weight).dtype, torch.float32)
    weights: dict[str, float] = plan_args.pop("weights")
    extra: dict[str, Tensor] = {}
    total_extra = None
    if backend == "liger":
        from tokinteract import liger  # optional dependency, imported on use

        liger.load()  # ImportError now, whatever the weights
        liger.check_liger_kind(div_opts["kind"], div_opts["beta"])
        on_liger = [k for k in ("kd", "tpa") if weights.get(k, 0.0) > 0 and teacher is not None]
        for name in on_liger:
            # a part with a uniform coefficient c over its rows is c * sum_r D_r: one Liger call
            part = plan_align_ti(**plan_args, weights={name: 1.0}, device=device, dtype=dtype, checks=checks)
            _, coef = part.parts[name]
            n = int(part.rows.shape[0])
            value = liger.liger_row_sum(
                (src[part.rows], weight, student[2]), (teacher[0][part.rows], teacher[1], teacher[2]),
                vocab=vocab, chunk_size=chunk_size, compiled=liger_compiled, checks=checks,
                kind=div_opts["kind"], temperature=div_opts["temperature"], beta=div_opts["beta"],
            ) * (coef.sum() / max(n, 1))
            extra[name] = value
            total_extra = weights[name] * value if total_extra is None else total_extra + weights[name] * value
        weights = dict(weights, **{k: 0.0 for k in on_liger})
        if weights.get("iva", 0.0) == 0:
            teacher = None
    if any(w > 0 for w in weights.values()):
        plan = plan_align_ti(**plan_args, weights=weights, device=device, dtype=dtype, checks=checks)
        total, div_all, ce_all = run_terms(
            student, teacher, plan.rows, int(plan.rows.shape[0]),
            div_coef=plan.div_coef if teacher is not None else None, ce_target=plan.ce_target,
            ce_coef=plan.ce_coef, vocab=vocab, chunk_size=chunk_size, student_name=student_name,
            teacher_name=teacher_name, checks=checks, eager=backend == "eager", **div_opts,
        )
        parts = parts_from_rows(plan, div_all, ce_all)
    else:
        total, parts = torch.zeros((), dtype=dtype, device=device), {}
    if total_extra is not None:
        total = total + total_extra
    parts.update({k: v.detach() for k, v in extra.items()})
    return total, {k: parts[k] for k in PARTS if k in parts}
