"""Transition Probability Alignment (paper Eq. 5 and 7, Algorithm 1).

With ``C_{b,t}`` the ``d`` candidates for position ``t`` (alternatives to token ``t+1``
sampled from the student) and ``S``/``T`` the student/teacher next-token distributions
*after* the candidate (conditioned on the ground-truth prefix up to ``t`` and the
candidate), computed in one packed forward over a :class:`TPAExpansion`:

    L_tpa = sum_{(b,t) in candidate_mask} (1/d) sum_u D(S_{b,t,u}, T_{b,t,u})
            / max(num_items or #candidate positions, 1)

``D`` is the forward KL ``KL(T || S)`` by default. The teacher logits are detached.
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from tokinteract._checks import check_finite, check_logit_pair
from tokinteract._plan import check_expansion
from tokinteract.align_ti import align_ti_terms
from tokinteract.divergence import DivergenceModule, check_divergence_options, divergence_rows
from tokinteract.expansion import TPAExpansion

__all__ = ["TPALoss", "tpa_loss", "tpa_position_values"]


def tpa_position_values(
    student_logits: Float[Tensor, "batch xseq vocab"],
    teacher_logits: Float[Tensor, "batch xseq tvocab"],
    expansion: TPAExpansion,
    *,
    kind: str = "fkl",
    temperature: int | float = 1.0,
    beta: int | float = 0.5,
    alpha: int | float = 0.1,
    vocab_size: int | None = None,
) -> Float[Tensor, "batch seq"]:
    """Per-position TPA values ``(1/d) sum_u D(S_{b,t,u}, T_{b,t,u})``; 0 without candidates."""
    check_expansion(expansion)
    check_divergence_options(kind, temperature, beta, alpha)
    s, t = check_logit_pair(student_logits, teacher_logits, lead=2, vocab_size=vocab_size, check_values=False)
    expansion.check_logits(s)
    b, pos, _, slot = expansion.candidate_slots()
    s_rows, t_rows = s[b, slot], t[b, slot]
    check_finite("student_logits", s_rows)
    check_finite("teacher_logits", t_rows)
    per_cand = divergence_rows(s_rows, t_rows.detach(), kind=kind, temperature=temperature, beta=beta, alpha=alpha)
    B, T = expansion.candidate_mask.shape
    values = per_cand.new_zeros(B, T)
    return values.index_put((b, pos), per_cand / expansion.num_candidates, accumulate=True)


def tpa_loss(
    student_logits: Float[Tensor, "batch xseq vocab"],
    teacher_logits: Float[Tensor, "batch xseq tvocab"],
    expansion: TPAExpansion,
    *,
    kind: str = "fkl",
    temperature: int | float = 1.0,
    beta: int | float = 0.5,
    alpha: int | float = 0.1,
    vocab_size: int | None = None,
    num_items: int | float | Tensor | None = None,
) -> Float[Tensor, ""]:
    """TPA loss over the expanded forward's logits (Eq. 7): mean over ``d``, then positions.

    Args:
        student_logits: the student's logits over the expanded sequence ``[B, T2, V]``
            (packed forward, or ground-truth logits concatenated with the cached candidate
            pass: the layout is the same).
        teacher_logits: the teacher's logits over the same expanded sequence.
        expansion: the :class:`TPAExpansion` both forwards ran on.
        num_items: global count of candidate positions (gradient accumulation).
    """
    check_expansion(expansion)
    total, _ = align_ti_terms(
        student_logits, teacher_logits, None, sft=0.0, kd=0.0, iva=0.0, tpa=1.0, expansion=expansion,
        kind=kind, temperature=temperature, beta=beta, alpha=alpha, vocab_size=vocab_size, num_items=num_items,
    )
    return total


class TPALoss(DivergenceModule):
    """Module twin of :func:`tpa_loss`.

    ``TPALoss(**options)(s, t, expansion)`` equals ``tpa_loss(s, t, expansion, **options)``.

    Args:
        kind, temperature, beta, alpha, vocab_size: the divergence options of
            :func:`tokinteract.token_divergence` (default ``kind="fkl"``, KL(T||S)).
    """

    def forward(
        self,
        student_logits: Float[Tensor, "batch xseq vocab"],
        teacher_logits: Float[Tensor, "batch xseq tvocab"],
        expansion: TPAExpansion,
        *,
        num_items: int | float | Tensor | None = None,
    ) -> Float[Tensor, ""]:
        return tpa_loss(student_logits, teacher_logits, expansion, num_items=num_items, **self.options)
