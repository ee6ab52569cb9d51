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
from typing import Any, Callable

import torch
from torch import Tensor

from tokinteract._checks import Deferred, check_integer, check_nonnegative, check_tensor, check_weights
from tokinteract._engine import run_terms
from tokinteract.divergence import check_divergence_options
from tokinteract.expansion import TPAExpansion
from tokinteract.reduction import resolve_count

BACKENDS = ("eager", "chunked", "fused", "liger")
"""How ``sum_r c_r * D_r`` is evaluated: autograd on the rows (``eager``), ``chunk_size`` rows
at a time over logits (``chunked``) or over hidden states and LM heads (``fused``), or KD and
TPA through Liger-Kernel's fused JSD and the rest as ``fused`` (``liger``)."""


@dataclass(frozen=True)
class Term:
    """One part of the objective: what it is computed on and its per-row coefficients.

    Attributes:
        name: the part's name (its weight keyword and its key in the returned parts).
        on: ``"ce"`` (cross-entropy of the student to the label) or ``"div"`` (the divergence
            ``D_r`` between the student's and the teacher's row, so it needs the teacher).
        needs: the input the coefficients read besides the shapes: ``"labels"``,
            ``"visual_weights"`` or ``"expansion"``.
        uniform: the coefficient is the same on every row it covers (a mean over its rows),
            so a kernel that only computes a plain mean (Liger) can evaluate it.
        coefficients: ``(ctx) -> [B * L]`` the dense coefficient vector, zero off the term's rows.
    """

    name: str
    on: str
    needs: str
    uniform: bool
    coefficients: Callable[["_Context"], Tensor]

    @property
    def optional(self) -> bool:
        """Left at its default weight, the term is off when its input is absent (text-only data)."""
        return self.needs != "labels"


class _Context:
    """What a term's coefficients are computed from (shapes, inputs, counts), with the
    aligned targets computed once on first use."""

    def __init__(
        self, *, batch: int, length: int, labels: Tensor | None, student_vocab: int, ignore_index: int,
        expansion: TPAExpansion | None, visual_weights: Tensor | None, visual_weights_name: str,
        num_items: Any, num_sequences: Any, device: torch.device, dtype: torch.dtype, checks: Deferred,
    ) -> None:
        if expansion is not None:
            if tuple(expansion.input_ids.shape) != (batch, length):
                raise ValueError(
                    f"the logits must cover the expanded sequence {tuple(expansion.input_ids.shape)} in their "
                    f"first two dimensions, got {(batch, length)}"
                )
            self.seq = expansion.seq_len
        else:
            self.seq = length
        self.batch, self.length, self.rows = batch, length, batch * length
        self.labels, self.vocab, self.ignore_index = labels, student_vocab, ignore_index
        self.expansion, self.visual_weights, self.visual_weights_name = expansion, visual_weights, visual_weights_name
        self.num_items, self.num_sequences = num_items, num_sequences
        self.device, self.dtype, self.checks = device, dtype, checks
        ar = torch.arange(self.seq, device=device)
        self.gt_flat = (torch.arange(batch, device=device)[:, None] * length + ar).reshape(-1)
        self._target: Tensor | None = None

    @property
    def target(self) -> Tensor:
        """``[B, T]`` the aligned targets (:func:`tokinteract.shift_labels`), checked once."""
        if self._target is None:
            self._target = check_labels(
                self.labels, self.batch, self.seq, self.vocab, self.ignore_index, self.checks
            )
        return self._target

    @property
    def valid(self) -> Tensor:
        """``[B, T]`` the supervised positions."""
        return self.target != self.ignore_index

    def on_ground_truth(self, values: Tensor) -> Tensor:
        """A dense ``[B * L]`` vector holding ``values [B, T]`` on the ground-truth slots."""
        out = torch.zeros(self.rows, dtype=self.dtype, device=self.device)
        out[self.gt_flat] = values.reshape(-1).to(self.dtype)
        return out


def _per_supervised(ctx: _Context) -> Tensor:
    """``valid[r] / max(num_items or #valid, 1)``: SFT's and KD's coefficient."""
    valid = ctx.valid
    return ctx.on_ground_truth(valid.to(ctx.dtype) / resolve_count(valid, ctx.num_items).to(ctx.dtype))


def _iva_coefficients(ctx: _Context) -> Tensor:
    """``w[b, t] / max(num_sequences or B, 1)`` on the ground-truth slots."""
    w = check_weights(
        ctx.visual_weights_name, ctx.visual_weights, (ctx.batch, ctx.seq), "batch, ground-truth seq", ctx.checks
    )
    n = ctx.batch if ctx.num_sequences is None else ctx.num_sequences
    denom = resolve_count(torch.ones(ctx.batch, dtype=torch.bool, device=ctx.device), n)
    return ctx.on_ground_truth(w.to(ctx.dtype) / denom.to(ctx.dtype))


def _tpa_coefficients(ctx: _Context) -> Tensor:
    """``1 / (d * max(num_items or #candidate positions, 1))`` on every candidate slot."""
    exp = ctx.expansion
    b, _, _, slot = exp.candidate_slots()
    per_slot = 1.0 / (resolve_count(exp.candidate_mask, ctx.num_items).to(ctx.dtype) * exp.num_candidates)
    out = torch.zeros(ctx.rows, dtype=ctx.dtype, device=ctx.device)
    idx = b.to(ctx.device) * ctx.length + slot.to(ctx.device)
    out.index_put_((idx,), per_slot.expand(b.shape[0]), accumulate=True)
    return out


TERMS: dict[str, Term] = {
    t.name: t
    for t in (
        Term("sft", on="ce", needs="labels", uniform=True, coefficients=_per_supervised),
        Term("kd", on="div", needs="labels", uniform=True, coefficients=_per_supervised),
        Term("iva", on="div", needs="visual_weights", uniform=False, coefficients=_iva_coefficients),
        Term("tpa", on="div", needs="expansion", uniform=True, coefficients=_tpa_coefficients),
    )
}
"""The terms of paper Eq. 8, in order: the one place a term is defined (module docstring)."""

PARTS = tuple(TERMS)
TEACHER_PARTS = tuple(k for k, t in TERMS.items() if t.on == "div")
UNIFORM_PARTS = tuple(k for k, t in TERMS.items() if t.uniform)
"""Parts whose coefficient is the same on every row they cover (a mean over their rows)."""


def resolve_weights(given: dict[str, Any], *, has_expansion: bool, has_visual_weights: bool) -> dict[str, float]:
    """The weight of each part for one call: a weight left at ``None`` means 1, except that a
    term whose input (``visual_weights``, ``expansion``) is absent is off (0), so the defaults
    work on text-only data; an explicit weight is used as given."""
    present = {"labels": True, "visual_weights": has_visual_weights, "expansion": has_expansion}
    out = {}
    for k, w in given.items():
        out[k] = (1.0 if present[TERMS[k].needs] else 0.0) if w is None else float(w)
    return out


def check_options(weights: dict[str, Any], kind: Any, temperature: Any, beta: Any, alpha: Any) -> dict[str, Any]:
    """The part weights as given (each ``None`` or a finite number >= 0, one per term of
    :data:`TERMS`), after checking the divergence options."""
    if set(weights) != set(TERMS):
        raise ValueError(f"weights must name exactly the parts {PARTS}, got {tuple(weights)}")
    for name, w in weights.items():
        if w is not None:
            check_nonnegative(name, w)
    check_divergence_options(kind, temperature, beta, alpha)
    return {k: weights[k] for k in PARTS}


_INPUT_ERRORS = {
    "expansion": "expansion is required when {name} > 0 (the TPAExpansion both forwards ran on), got None",
    "visual_weights": "visual_weights is required when {name} > 0, got None",
}


def check_term_inputs(weights: dict[str, float], *, expansion: object, visual_weights: object) -> None:
    """A ``ValueError`` naming the input of the first enabled term whose input is absent."""
    given = {"expansion": expansion, "visual_weights": visual_weights}
    for name, term in TERMS.items():
        if weights.get(name, 0.0) > 0 and term.needs in given and given[term.needs] is None:
            raise ValueError(_INPUT_ERRORS[term.needs].format(name=name))


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
            f"{', '.join(PARTS)}, got weights {weights}"
        )
    needs_teacher = [k for k, t in TERMS.items() if t.on == "div" and weights.get(k, 0.0) > 0]
    if teacher_missing and needs_teacher:
        raise ValueError(f"{teacher_is} required when {needs_teacher} have non-zero weight, got None")
    check_term_inputs(weights, expansion=expansion, visual_weights=visual_weights)
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
    ctx = _Context(
        batch=batch, length=length, labels=labels, student_vocab=student_vocab, ignore_index=ignore_index,
        expansion=expansion, visual_weights=visual_weights, visual_weights_name=visual_weights_name,
        num_items=num_items, num_sequences=num_sequences, device=device, dtype=dtype, checks=checks,
    )
    check_term_inputs(weights, expansion=expansion, visual_weights=visual_weights)
    dense = {name: term.coefficients(ctx) for name, term in TERMS.items() if weights.get(name, 0.0) > 0}
    need = torch.zeros(ctx.rows, dtype=torch.bool, device=device)
    div_total = ce_total = ce_target_dense = None
    for name, vec in dense.items():
        need |= vec != 0
        if TERMS[name].on == "div":
            div_total = weights[name] * vec if div_total is None else div_total + weights[name] * vec
        else:
            ce_total = weights[name] * vec if ce_total is None else ce_total + weights[name] * vec
    if ce_total is not None:
        target = ctx.target
        ce_target_dense = torch.full((ctx.rows,), -1, dtype=torch.long, device=device)
        ce_target_dense[ctx.gt_flat] = torch.where(ctx.valid, target, torch.full_like(target, -1)).reshape(-1).long()
    rows = need.nonzero().reshape(-1)
    return Plan(
        rows=rows,
        div_coef=None if div_total is None else div_total[rows],
        ce_target=None if ce_target_dense is None else ce_target_dense[rows],
        ce_coef=None if ce_total is None else ce_total[rows],
        parts={name: (TERMS[name].on, vec[rows]) for name, vec in dense.items()},
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
        on_liger = [k for k, t in TERMS.items() if t.on == "div" and t.uniform and weights.get(k, 0.0) > 0 and teacher is not None]
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
        if not any(TERMS[k].on == "div" and w > 0 for k, w in weights.items()):
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
    return total, {k: parts[k] for k in TERMS if k in parts}
