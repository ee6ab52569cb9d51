"""The full Align-TI objective (paper Eq. 8), with every part switchable, on any backend.

    L = w_sft * L_sft + w_kd * L_kd + w_iva * L_iva + w_tpa * L_tpa

The paper uses all weights equal to 1. A weight of 0 switches a part off (it is then not
computed at all); a weight left at its default (``None``) is 1, except that IVA and TPA are
off when their input (``visual_weights``, ``expansion``) is not passed, so the defaults work
on text-only data. Baselines are configurations: SFT only (``kd = iva = tpa = 0``), Vanilla
KD (``iva = tpa = 0``), reverse KL / JSD / skew KL (``kind=``), uniform visual alignment
(``visual_weights=uniform_visual_weights(visual_mask)``).

Every part is ``sum_r c_r * D_r`` (or ``c_r * CE_r``) over rows of logits with coefficients
defined once in :mod:`tokinteract._plan`. ``backend`` only chooses how that sum is evaluated:

* ``"eager"``: the rows' logits at once, autograd (the reference);
* ``"chunked"``: ``chunk_size`` rows at a time, gradient computed in forward
  (:mod:`tokinteract.chunked`, memory ``O(chunk_size x V)``);
* ``"fused"``: from the hidden states and the LM heads (:class:`HiddenStates`), logits never
  materialised beyond one chunk (:mod:`tokinteract.fused`);
* ``"liger"``: as ``"fused"``, with KD and TPA through Liger-Kernel (:mod:`tokinteract.liger`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor, nn

from tokinteract._checks import (
    Deferred,
    check_choice,
    check_float,
    check_int,
    check_lm_head,
    check_logit_pair,
    check_tensor,
    shared_vocab,
)
from tokinteract._plan import BACKENDS, TERMS, check_options, check_part_inputs, resolve_weights, run_align_ti
from tokinteract.expansion import TPAExpansion

__all__ = ["BACKENDS", "AlignTILoss", "HiddenStates", "align_ti_terms"]

HIDDEN_LOGITS_NAMES = dict(  # the logits rows of HiddenStates, as error messages name them
    student_name="student logits (student_hidden @ student_weight.T)",
    teacher_name="teacher logits (teacher_hidden @ teacher_weight.T)",
)


@dataclass(frozen=True)
class HiddenStates:
    """One model's LM-head input and head, for the ``"fused"`` and ``"liger"`` backends.

    The logits are ``hidden @ weight.T + bias``; only the rows a loss needs are ever computed.

    Attributes:
        hidden: ``[B, L, H]`` input of the LM head (after the final norm).
        weight: ``[V, H]`` the LM-head weight (the embedding matrix when tied).
        bias: optional ``[V]`` LM-head bias.
    """

    hidden: Float[Tensor, "batch len hidden"]
    weight: Float[Tensor, "vocab hidden"]
    bias: Float[Tensor, "vocab"] | None = None


def align_ti_terms(
    student: Tensor | HiddenStates,
    teacher: Tensor | HiddenStates | None,
    labels: Int[Tensor, "batch seq"] | None,
    *,
    sft: int | float | None = None,
    kd: int | float | None = None,
    iva: int | float | None = None,
    tpa: int | float | None = None,
    expansion: TPAExpansion | None = None,
    visual_weights: Float[Tensor, "batch seq"] | None = None,
    kind: str = "fkl",
    temperature: int | float = 1.0,
    beta: int | float = 0.5,
    alpha: int | float = 0.1,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    num_items: int | float | Tensor | None = None,
    num_sequences: int | float | Tensor | None = None,
    backend: str = "eager",
    chunk_size: int | None = None,
    liger_compiled: bool = True,
    validate: bool = True,
    visual_weights_name: str = "visual_weights",
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """``w_sft SFT + w_kd KD + w_iva IVA + w_tpa TPA`` (paper Eq. 8): the function behind every loss.

    Args:
        student: logits ``[B, L, V]`` (``"eager"``, ``"chunked"``) or :class:`HiddenStates`
            (``"fused"``, ``"liger"``), on the ground truth (``L = T``) or over the TPA
            expansion (``L = T2``, the ground truth is its first ``T`` slots).
        teacher: same form as ``student``; may be None when no teacher part is enabled.
        labels: ``[B, T]`` unshifted labels (``ignore_index`` where unsupervised); may be None
            when SFT and KD are off.
        sft, kd, iva, tpa: part weights (``None``: the default, see the module docstring).
        expansion: the :class:`tokinteract.TPAExpansion` both forwards ran on (TPA).
        visual_weights: ``[B, T]`` detached IVA weights, finite and >= 0.
        kind, temperature, beta, alpha: the divergence (:func:`tokinteract.token_divergence`).
        vocab_size: compare only the first ``vocab_size`` vocabulary entries.
        num_items: global count of supervised positions (SFT, KD, TPA).
        num_sequences: global number of sequences (IVA).
        backend: one of :data:`BACKENDS` (module docstring).
        chunk_size: rows per chunk (``"chunked"``, ``"fused"``, ``"liger"``); None = ``2**24 // V``.
        liger_compiled: ``"liger"`` only: let Liger ``torch.compile`` its chunk step.
        validate: check values (non-finite logits and weights, labels out of range, negative
            weights) with one device-to-host read per call; ``False`` reads nothing back.

    Returns:
        ``(total, parts)``; ``parts`` maps each computed part to its detached, unweighted value.
    """
    given = check_options(dict(sft=sft, kd=kd, iva=iva, tpa=tpa), kind, temperature, beta, alpha)
    check_choice("backend", backend, BACKENDS)
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    if not isinstance(liger_compiled, bool):
        raise TypeError(f"liger_compiled must be a bool, got {type(liger_compiled).__name__}")
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, minimum=1)
    weights = resolve_weights(given, has_expansion=expansion is not None, has_visual_weights=visual_weights is not None)
    hidden = backend in ("fused", "liger")
    if hidden:
        s_side, names = _hidden_side("student", student), HIDDEN_LOGITS_NAMES
        teacher_is = "teacher_hidden and teacher_weight are"
    else:
        check_tensor("student_logits", student, ndim=3)
        check_float("student_logits", student)
        s_side, names = (student.reshape(-1, student.shape[-1]), None, None), {}
        teacher_is = "teacher_logits is"
    needs_teacher = check_part_inputs(
        weights, teacher_missing=teacher is None, teacher_is=teacher_is, expansion=expansion,
        visual_weights=visual_weights,
    )
    if expansion is not None and not hidden:
        expansion.check_logits(student)
    B, L = (student.hidden if hidden else student).shape[:2]
    V = s_side[1].shape[0] if hidden else student.shape[-1]
    vocab, t_side = V, None
    if needs_teacher:
        if hidden:
            t_side = _hidden_side("teacher", teacher)
            if tuple(teacher.hidden.shape[:2]) != (B, L):
                raise ValueError(
                    f"teacher_hidden must match student_hidden in its first 2 dimension(s) {(B, L)}, "
                    f"got shape {tuple(teacher.hidden.shape)}"
                )
            vocab = shared_vocab("student_weight", V, "teacher_weight", t_side[1].shape[0], vocab_size)
        else:
            s, _ = check_logit_pair(student, teacher, lead=2, vocab_size=vocab_size, check_values=False)
            vocab, t_side = s.shape[-1], (teacher.reshape(-1, teacher.shape[-1]), None, None)
    on_labels = [k for k, t in TERMS.items() if t.needs == "labels" and weights[k] > 0]
    if labels is None and on_labels:
        raise ValueError(f"labels is required when {' or '.join(on_labels)} has non-zero weight, got None")
    checks = Deferred(validate)
    total, parts = run_align_ti(
        s_side, t_side, backend=backend, vocab=vocab, chunk_size=chunk_size, liger_compiled=liger_compiled,
        div_opts=dict(kind=kind, temperature=temperature, beta=beta, alpha=alpha), checks=checks, batch=B,
        length=L, student_vocab=V, labels=labels, weights=weights, ignore_index=ignore_index, expansion=expansion,
        visual_weights=visual_weights, num_items=num_items, num_sequences=num_sequences,
        visual_weights_name=visual_weights_name, **names,
    )
    checks.resolve()
    return total, parts


def _hidden_side(who: str, side: object) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(hidden [B * L, H], weight, bias)`` of a validated :class:`HiddenStates`."""
    if not isinstance(side, HiddenStates):
        raise TypeError(
            f"{who} must be a HiddenStates(hidden, weight, bias) with the fused and liger backends, "
            f"got {type(side).__name__}"
        )
    h = f"{who}_hidden"
    check_tensor(h, side.hidden, ndim=3)
    check_lm_head(h, side.hidden, f"{who}_weight", side.weight, f"{who}_bias", side.bias)
    return side.hidden.reshape(-1, side.hidden.shape[-1]), side.weight, side.bias


class AlignTILoss(nn.Module):
    """Sum of SFT, Vanilla KD, IVA and TPA with configurable weights, on one of :data:`BACKENDS`.

    Args:
        sft: weight of the cross-entropy on the labels (default 1).
        kd: weight of Vanilla KD (Eq. 2) on response positions (default 1).
        iva: weight of IVA (Eq. 4) on visual positions (default 1 when ``visual_weights`` is
            passed, else off).
        tpa: weight of TPA (Eq. 7) on candidate slots (default 1 when ``expansion`` is passed,
            else off). An explicit weight > 0 requires its input.
        kind: divergence for kd, iva and tpa (default forward KL ``KL(T || S)``).
        temperature: softmax temperature; see :func:`tokinteract.token_divergence`.
        beta: JSD mixing weight; see :func:`tokinteract.token_divergence`.
        alpha: skew weight; see :func:`tokinteract.token_divergence`.
        vocab_size: compare only the first ``vocab_size`` vocabulary entries.
        ignore_index: label value that marks unsupervised positions.
        backend: ``"eager"`` (default), ``"chunked"``, ``"fused"`` or ``"liger"``; with the last
            two, ``forward`` takes :class:`HiddenStates` instead of logits.
        chunk_size: rows per chunk for the chunked backends (None = ``2**24 // V``).
        liger_compiled: ``backend="liger"``: let Liger ``torch.compile`` its chunk step.
        validate: check input values (one device-to-host read per call); ``False`` skips them.
    """

    def __init__(
        self,
        *,
        sft: int | float | None = None,
        kd: int | float | None = None,
        iva: int | float | None = None,
        tpa: int | float | None = None,
        kind: str = "fkl",
        temperature: int | float = 1.0,
        beta: int | float = 0.5,
        alpha: int | float = 0.1,
        vocab_size: int | None = None,
        ignore_index: int = -100,
        backend: str = "eager",
        chunk_size: int | None = None,
        liger_compiled: bool = True,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self._given = check_options(dict(sft=sft, kd=kd, iva=iva, tpa=tpa), kind, temperature, beta, alpha)
        check_choice("backend", backend, BACKENDS)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, minimum=1)
        for name, flag in (("liger_compiled", liger_compiled), ("validate", validate)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if backend == "liger":
            from tokinteract import liger  # optional dependency: ImportError now, not at the first batch

            liger.check_liger_kind(kind, beta)
            liger.load()
        self.kind, self.temperature, self.beta, self.alpha = kind, temperature, beta, alpha
        self.vocab_size, self.ignore_index = vocab_size, ignore_index
        self.backend, self.chunk_size, self.liger_compiled, self.validate = backend, chunk_size, liger_compiled, validate

    @property
    def weights(self) -> dict[str, float]:
        """The weight of each part when its input is present (a default counts as 1)."""
        return {k: 1.0 if w is None else float(w) for k, w in self._given.items()}

    @property
    def enabled(self) -> tuple[str, ...]:
        """Names of the parts with a non-zero weight (IVA and TPA at their default: when their input is passed)."""
        return tuple(k for k, w in self.weights.items() if w > 0)

    def forward(
        self,
        student: Float[Tensor, "batch len vocab"] | HiddenStates,
        teacher: Float[Tensor, "batch len tvocab"] | HiddenStates | None,
        labels: Int[Tensor, "batch seq"] | None,
        *,
        expansion: TPAExpansion | None = None,
        visual_weights: Float[Tensor, "batch seq"] | None = None,
        num_items: int | float | Tensor | None = None,
        num_sequences: int | float | Tensor | None = None,
    ) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
        """Return ``(total, parts)``; ``parts`` maps each computed part to its detached value.

        Args:
            student: the student's logits ``[B, T, V]`` on the ground truth, or ``[B, T2, V]``
                over the TPA expansion when ``expansion`` is given (its first ``T`` slots are
                the ground truth, so KD, SFT and IVA read them from the same tensor); a
                :class:`HiddenStates` with the fused backends.
            teacher: same layout as ``student``; may be None for SFT only.
            labels: ``[B, T]`` with ``ignore_index`` where unsupervised (unshifted, as in HF).
            expansion: required when ``tpa > 0`` was set.
            visual_weights: ``[B, T]`` importance weights, required when ``iva > 0`` was set.
            num_items: global count of supervised positions (sft, kd and tpa).
            num_sequences: global number of sequences (iva).
        """
        return align_ti_terms(
            student, teacher, labels, expansion=expansion, visual_weights=visual_weights, num_items=num_items,
            num_sequences=num_sequences, **self.options(),
        )

    def options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`align_ti_terms` this module holds."""
        return dict(
            **self._given, kind=self.kind, temperature=self.temperature, beta=self.beta, alpha=self.alpha,
            vocab_size=self.vocab_size, ignore_index=self.ignore_index, backend=self.backend,
            chunk_size=self.chunk_size, liger_compiled=self.liger_compiled, validate=self.validate,
        )

    def extra_repr(self) -> str:
        on = ", ".join(f"{k}={'default' if v is None else v}" for k, v in self._given.items())
        out = f"{on}, kind={self.kind!r}, temperature={self.temperature}, backend={self.backend!r}"
        if self.backend != "eager":
            out += f", chunk_size={self.chunk_size}"
        return out

