"""Memory-bounded (chunked) divergences and the Align-TI terms in one pass over rows.

With Qwen's 151,936-entry vocabulary one fp32 logits row is 0.6 MB; the naive losses hold
several ``[rows, V]`` fp32 buffers (upcast copy, two log-softmaxes, probabilities, the KL
terms and their gradients) for every supervised row at once. The functions here produce the
same values and gradients while their extra memory is ``O(chunk_size x V)``:

* the rows are processed ``chunk_size`` at a time; each chunk's fp32 log-softmaxes, its
  divergence and **its gradient** are computed together and the fp32 buffers are freed
  before the next chunk;
* the gradient with respect to the student's logits (or, in :mod:`tokinteract.fused`, with
  respect to the student's hidden states and LM-head weight) is accumulated during the forward
  pass and stored for the backward pass, which only scales it by the incoming gradient.

Because every row weight is a constant (label masks, detached IVA weights, normalisers), the
loss is linear in the per-row divergences, so the gradient can be computed in the same pass as
the loss and nothing needs to be recomputed in backward (one pass instead of two). What is kept
between forward and backward is exactly the gradient the backward pass returns: ``[N, V]`` in
the logits' dtype here (autograd would allocate it in backward anyway), ``[N, H]`` plus the
LM-head weight's shape in the fused variant. Double backward is not supported.

Gradients of each chunk:

* ``"fkl"`` (``KL(T || S)``): ``d/dz_s = (S - T) / tau``;
* ``"rkl"`` (``KL(S || T)``): ``d/dz_s = S * (log S - log T - KL(S || T)) / tau``;
* every other kind (``"jsd"``, ``"skew_fkl"``, ``"skew_rkl"``, ``"tvd"``): autograd through
  the core formula (:func:`tokinteract.divergence.divergence_from_logprobs`) on the chunk only;
* cross-entropy (the SFT term, always at temperature 1): ``softmax(z) - onehot(label)``.

The values are computed by the same core formula as :func:`tokinteract.token_divergence`, so
they match the unchunked losses up to fp32 summation order. The teacher is always a constant.

``chunk_size=None`` picks ``max(1, 2**24 // V)`` rows (110 rows, 64 MiB per fp32 buffer, at
V = 151,936); a chunk keeps at most about five such buffers alive (fkl, rkl; the other kinds
run autograd on the chunk and keep a few more). Much smaller chunks are slower in the fused
variant because the LM-head weight gradient ``[V, H]`` is read and written once per chunk.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Float, Int
from torch import Tensor

from tokinteract._checks import check_logit_pair
from tokinteract._engine import mean_row_divergence
from tokinteract._engine import resolve_chunk_size as resolve_chunk_size  # re-exported
from tokinteract._plan import check_expansion
from tokinteract.align_ti import AlignTILoss, align_ti_terms
from tokinteract.divergence import check_divergence_options
from tokinteract.expansion import TPAExpansion

__all__ = [
    "ChunkedAlignTILoss",
    "chunked_align_ti_terms",
    "chunked_divergence",
    "chunked_iva_loss",
    "chunked_kd_loss",
    "chunked_sft_loss",
    "chunked_tpa_loss",
]

def chunked_divergence(
    student_rows: Float[Tensor, "rows vocab"],
    teacher_rows: Float[Tensor, "rows tvocab"],
    row_weights: Float[Tensor, "rows"] | None = None,
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    normalizer: int | float | Tensor | None = None,
    chunk_size: int | None = None,
) -> Float[Tensor, ""]:
    """Weighted mean of per-row divergences, computed ``chunk_size`` rows at a time.

        loss = sum_r w_r * D(S_r, T_r) / max(normalizer or rows, 1)

    with ``D`` as in :func:`tokinteract.token_divergence` (default forward KL
    ``KL(T || S)``, ``S = softmax(student / tau)``, no ``tau**2``), ``w_r = 1`` when
    ``row_weights`` is None. Equal to
    ``masked_reduce(token_divergence(s[None], t[None])[0], weights=w, num_items=normalizer)``
    in value and gradient, with extra memory ``O(chunk_size x V)`` (fp32) beyond the
    gradient itself. The teacher and the weights are constants (no gradient).

    Args:
        student_rows: ``[rows, V]`` student logits, any float dtype (computed in fp32).
        teacher_rows: ``[rows, V_t]`` teacher logits.
        row_weights: ``[rows]`` finite, >= 0 weights (detached).
        kind: ``"fkl"`` (default), ``"rkl"``, ``"jsd"``, ``"skew_fkl"``, ``"skew_rkl"`` or ``"tvd"``.
        temperature: ``tau > 0``; both sides use ``softmax(logits / tau)``; no ``tau**2``.
        beta: JSD mixing weight of the teacher, in [0, 1].
        alpha: skew weight, in [0, 1).
        vocab_size: compare only the first ``vocab_size`` entries of both vocabularies.
        normalizer: the denominator (e.g. a global count); default the number of rows.
        chunk_size: rows per chunk; None = ``max(1, 2**24 // V)``.

    Raises:
        ValueError: bad shapes, options or weights, non-finite logits.
    """
    check_divergence_options(kind, temperature, beta, alpha)
    s, _ = check_logit_pair(student_rows, teacher_rows, lead=1, vocab_size=vocab_size, check_values=False)
    return mean_row_divergence(
        (student_rows, None, None), (teacher_rows, None, None), row_weights, normalizer=normalizer,
        vocab=s.shape[1], chunk_size=chunk_size,
        div_opts=dict(kind=kind, temperature=temperature, beta=beta, alpha=alpha),
        student_name="student_rows", teacher_name="teacher_rows",
    )


def chunked_align_ti_terms(
    student_logits: Float[Tensor, "batch len vocab"],
    teacher_logits: Float[Tensor, "batch len tvocab"] | None,
    labels: Int[Tensor, "batch seq"] | None,
    *,
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
    validate: bool = True,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """``w_sft SFT + w_kd KD + w_iva IVA + w_tpa TPA`` (paper Eq. 8) in one chunked pass.

    :func:`tokinteract.align_ti.align_ti_terms` with ``backend="chunked"``: same semantics as
    :class:`tokinteract.AlignTILoss` except that every weight defaults to 1 and then requires its
    input (``expansion`` for TPA, ``visual_weights`` for IVA). Every row the enabled parts need (response positions,
    positions with a non-zero visual weight, candidate slots) is visited once, with the per-row
    coefficient ``w_kd/n_kd + w_iva * v_{b,t}/n_seq + w_tpa/(d * n_tpa)`` on ``D`` and
    ``w_sft/n_kd`` on the cross-entropy, so a row shared by several parts costs one softmax.

    Returns:
        ``(total, parts)``; ``parts`` maps each computed part to its detached, unweighted value.
    """
    return align_ti_terms(
        student_logits, teacher_logits, labels, sft=sft, kd=kd, iva=iva, tpa=tpa, expansion=expansion,
        visual_weights=visual_weights, kind=kind, temperature=temperature, beta=beta, alpha=alpha,
        vocab_size=vocab_size, ignore_index=ignore_index, num_items=num_items, num_sequences=num_sequences,
        backend="chunked", chunk_size=chunk_size, validate=validate,
    )


def chunked_kd_loss(
    student_logits: Float[Tensor, "batch seq vocab"],
    teacher_logits: Float[Tensor, "batch seq tvocab"],
    labels: Int[Tensor, "batch seq"],
    *,
    ignore_index: int = -100,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
) -> Float[Tensor, ""]:
    """Chunked twin of :func:`tokinteract.kd_loss` (Vanilla KD, Eq. 2), equal in value and gradient.

        L_kd = sum_{b,t valid} D(S_{b,t}, T_{b,t}) / max(num_items or #valid, 1)

    ``D`` defaults to the forward KL ``KL(T || S)``. Extra memory ``O(chunk_size x V)``.
    """
    total, _ = chunked_align_ti_terms(
        student_logits, teacher_logits, labels, sft=0.0, kd=1.0, iva=0.0, tpa=0.0, kind=kind,
        temperature=temperature, beta=beta, alpha=alpha, vocab_size=vocab_size,
        ignore_index=ignore_index, num_items=num_items, chunk_size=chunk_size,
    )
    return total


def chunked_sft_loss(
    student_logits: Float[Tensor, "batch seq vocab"],
    labels: Int[Tensor, "batch seq"],
    *,
    ignore_index: int = -100,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
) -> Float[Tensor, ""]:
    """Chunked twin of :func:`tokinteract.sft_loss`: ``-log S_{b,t}(labels[b, t+1])``, mean over supervised positions."""
    total, _ = chunked_align_ti_terms(
        student_logits, None, labels, sft=1.0, kd=0.0, iva=0.0, tpa=0.0,
        ignore_index=ignore_index, num_items=num_items, chunk_size=chunk_size,
    )
    return total


def chunked_iva_loss(
    student_logits: Float[Tensor, "batch seq vocab"],
    teacher_logits: Float[Tensor, "batch seq tvocab"],
    weights: Float[Tensor, "batch seq"],
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    num_sequences: int | float | Tensor | None = None,
    chunk_size: int | None = None,
) -> Float[Tensor, ""]:
    """Chunked twin of :func:`tokinteract.iva_loss` (IVA, Eq. 4), equal in value and gradient.

        L_iva = sum_b sum_t w[b, t] * D(S_{b,t}, T_{b,t}) / max(num_sequences or B, 1)
    """
    total, _ = align_ti_terms(
        student_logits, teacher_logits, None, sft=0.0, kd=0.0, iva=1.0, tpa=0.0, visual_weights=weights,
        kind=kind, temperature=temperature, beta=beta, alpha=alpha,
        vocab_size=vocab_size, num_sequences=num_sequences, backend="chunked", chunk_size=chunk_size,
    )
    return total


def chunked_tpa_loss(
    student_logits: Float[Tensor, "batch xseq vocab"],
    teacher_logits: Float[Tensor, "batch xseq tvocab"],
    expansion: TPAExpansion,
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
) -> Float[Tensor, ""]:
    """Chunked twin of :func:`tokinteract.tpa_loss` (TPA, Eq. 7), equal in value and gradient.

        L_tpa = sum_{(b,t) in candidate_mask} (1/d) sum_u D(S_{b,t,u}, T_{b,t,u})
                / max(num_items or #candidate positions, 1)
    """
    check_expansion(expansion)
    total, _ = chunked_align_ti_terms(
        student_logits, teacher_logits, None, sft=0.0, kd=0.0, iva=0.0, tpa=1.0, expansion=expansion,
        kind=kind, temperature=temperature, beta=beta, alpha=alpha, vocab_size=vocab_size,
        num_items=num_items, chunk_size=chunk_size,
    )
    return total


class ChunkedAlignTILoss(AlignTILoss):
    """:class:`tokinteract.AlignTILoss` with ``backend="chunked"`` (same constructor and ``forward``).

    The result equals :class:`tokinteract.AlignTILoss` in value and gradient.

    Args:
        chunk_size: rows per chunk; None = ``max(1, 2**24 // V)``.
        validate: check the inputs' values (one device read per call); see :class:`tokinteract.AlignTILoss`.
        **kwargs: every other constructor argument of :class:`tokinteract.AlignTILoss` (term
            weights, divergence options, ``vocab_size``, ...), with the same meaning.
    """

    def __init__(self, *, chunk_size: int | None = None, validate: bool = True, **kwargs: Any) -> None:
        super().__init__(backend="chunked", chunk_size=chunk_size, validate=validate, **kwargs)
