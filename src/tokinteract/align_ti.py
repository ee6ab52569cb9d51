"""The full Align-TI objective (paper Eq. 8), with every part switchable.

    L = w_sft * L_sft + w_kd * L_kd + w_iva * L_iva + w_tpa * L_tpa

The paper uses all weights equal to 1. A weight of 0 switches a part off (it is then not
computed at all). Baselines are configurations: SFT only (``kd = iva = tpa = 0``), Vanilla
KD (``iva = tpa = 0``), reverse KL / JSD / skew KL (``kind=``), uniform visual alignment
(``visual_weights=uniform_visual_weights(visual_mask)``).
"""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor, nn

from tokinteract._checks import check_nonnegative, check_tensor
from tokinteract._plan import check_expansion, check_part_inputs
from tokinteract.divergence import check_divergence_options
from tokinteract.expansion import TPAExpansion
from tokinteract.iva import iva_loss
from tokinteract.kd import kd_loss, sft_loss
from tokinteract.tpa import tpa_loss

__all__ = ["AlignTILoss"]


class AlignTILoss(nn.Module):
    """Sum of SFT, Vanilla KD, IVA and TPA with configurable weights.

    Args:
        sft: weight of the cross-entropy on the labels.
        kd: weight of Vanilla KD (Eq. 2) on response positions.
        iva: weight of IVA (Eq. 4) on visual positions.
        tpa: weight of TPA (Eq. 7) on candidate slots.
        kind: divergence for kd, iva and tpa (default forward KL ``KL(T || S)``).
        temperature: softmax temperature; see :func:`tokinteract.token_divergence`.
        beta: JSD mixing weight; see :func:`tokinteract.token_divergence`.
        alpha: skew weight; see :func:`tokinteract.token_divergence`.
        vocab_size: compare only the first ``vocab_size`` vocabulary entries.
        ignore_index: label value that marks unsupervised positions.
    """

    def __init__(
        self,
        *,
        sft: int | float = 1.0,
        kd: int | float = 1.0,
        iva: int | float = 1.0,
        tpa: int | float = 1.0,
        kind: str = "fkl",
        temperature: int | float = 1.0,
        beta: int | float = 0.5,
        alpha: int | float = 0.1,
        vocab_size: int | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        for name, w in (("sft", sft), ("kd", kd), ("iva", iva), ("tpa", tpa)):
            check_nonnegative(name, w)
        check_divergence_options(kind, temperature, beta, alpha)
        self.weights = {"sft": float(sft), "kd": float(kd), "iva": float(iva), "tpa": float(tpa)}
        self.kind, self.temperature, self.beta, self.alpha = kind, temperature, beta, alpha
        self.vocab_size, self.ignore_index = vocab_size, ignore_index

    @property
    def enabled(self) -> tuple[str, ...]:
        """Names of the parts with a non-zero weight."""
        return tuple(k for k, w in self.weights.items() if w > 0)

    def forward(
        self,
        student_logits: Float[Tensor, "batch len vocab"],
        teacher_logits: Float[Tensor, "batch len tvocab"] | None,
        labels: Int[Tensor, "batch seq"],
        *,
        expansion: TPAExpansion | None = None,
        visual_weights: Float[Tensor, "batch seq"] | None = None,
        num_items: int | float | Tensor | None = None,
        num_sequences: int | float | Tensor | None = None,
    ) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
        """Return ``(total, parts)``; ``parts`` maps each enabled part to its detached value.

        Args:
            student_logits: ``[B, T, V]`` on the ground truth, or ``[B, T2, V]`` over the
                TPA expansion when ``expansion`` is given (its first ``T`` slots are the
                ground truth, so KD, SFT and IVA read them from the same tensor).
            teacher_logits: same layout as ``student_logits``; may be None for SFT only.
            labels: ``[B, T]`` with ``ignore_index`` where unsupervised (unshifted, as in HF).
            expansion: required when ``tpa > 0``.
            visual_weights: ``[B, T]`` importance weights, required when ``iva > 0``.
            num_items: global count of supervised positions (sft, kd and tpa).
            num_sequences: global number of sequences (iva).
        """
        return self._compute(
            student_logits, teacher_logits, labels, expansion=expansion, visual_weights=visual_weights,
            num_items=num_items, num_sequences=num_sequences,
        )

    def _compute(  # the arguments of forward, type-checked there
        self, student_logits, teacher_logits, labels, *, expansion, visual_weights, num_items, num_sequences
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The computation behind :meth:`forward` (:class:`tokinteract.chunked.ChunkedAlignTILoss` replaces it)."""
        w = self.weights
        check_part_inputs(
            w, teacher_missing=teacher_logits is None, teacher_is="teacher_logits is",
            expansion=expansion, visual_weights=visual_weights,
        )
        check_tensor("student_logits", student_logits, ndim=3)
        if expansion is not None:
            expansion = check_expansion(expansion)
            s_gt = expansion.gather_gt(student_logits)
            t_gt = expansion.gather_gt(teacher_logits) if teacher_logits is not None else None
        else:
            s_gt, t_gt = student_logits, teacher_logits
        opts = dict(kind=self.kind, temperature=self.temperature, beta=self.beta, alpha=self.alpha,
                    vocab_size=self.vocab_size)
        parts: dict[str, Tensor] = {}
        if w["sft"] > 0:
            parts["sft"] = sft_loss(s_gt, labels, ignore_index=self.ignore_index, num_items=num_items)
        if w["kd"] > 0:
            parts["kd"] = kd_loss(s_gt, t_gt, labels, ignore_index=self.ignore_index, num_items=num_items, **opts)
        if w["iva"] > 0:
            parts["iva"] = iva_loss(s_gt, t_gt, visual_weights, num_sequences=num_sequences, **opts)
        if w["tpa"] > 0:
            parts["tpa"] = tpa_loss(student_logits, teacher_logits, expansion, num_items=num_items, **opts)
        if not parts:
            raise ValueError("every part has weight 0; enable at least one of sft, kd, iva, tpa")
        total = sum(w[k] * v for k, v in parts.items())
        return total, {k: v.detach() for k, v in parts.items()}

    def extra_repr(self) -> str:
        on = ", ".join(f"{k}={v}" for k, v in self.weights.items())
        return f"{on}, kind={self.kind!r}, temperature={self.temperature}"
