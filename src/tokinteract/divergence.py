"""Per-position divergences between a student and a teacher next-token distribution.

Notation: ``S = softmax(student_logits / tau)``, ``T = softmax(teacher_logits / tau)``, both in
fp32 for fp32/bf16/fp16 inputs (fp64 inputs compute in fp64, so ``gradcheck`` works). Every
``kind`` returns one value per position (shape ``[batch, seq]``); reduction happens in :func:`tokinteract.reduction.masked_reduce`.

============  =====================================================================
``kind``      value at one position
============  =====================================================================
``"fkl"``     forward KL, ``KL(T || S) = sum_v T_v (log T_v - log S_v)`` (the paper's
              ``D_KL``; mode-covering)
``"rkl"``     reverse KL, ``KL(S || T)`` (MiniLLM; mode-seeking)
``"jsd"``     generalized JSD, ``beta * KL(T || M) + (1 - beta) * KL(S || M)`` with
              ``M = beta * T + (1 - beta) * S``. ``beta = 0.5`` is the symmetric JSD.
              Endpoints (as in TRL's GKD): ``beta = 0`` returns exactly ``KL(T || S)``
              and ``beta = 1`` exactly ``KL(S || T)``. Inside (0, 1) the endpoints are
              limits after scaling: ``JSD_beta / beta -> KL(T || S)`` as ``beta -> 0``
              and ``JSD_beta / (1 - beta) -> KL(S || T)`` as ``beta -> 1``.
``"skew_fkl"`` DistiLLM skew forward KL, ``KL(T || alpha * T + (1 - alpha) * S)``;
              ``alpha = 0`` is ``"fkl"``.
``"skew_rkl"`` DistiLLM skew reverse KL, ``KL(S || alpha * S + (1 - alpha) * T)``;
              ``alpha = 0`` is ``"rkl"``.
``"tvd"``     total variation, ``0.5 * sum_v |T_v - S_v|``.
============  =====================================================================

Temperature: both distributions are ``softmax(logits / tau)``; the result is **not**
multiplied by ``tau**2`` (multiply it yourself for Hinton-style gradient scaling).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tokinteract.reduction import compute_dtype
from tokinteract._checks import (
    DIVERGENCE_KINDS,
    check_choice,
    check_logit_pair,
    check_positive,
    check_unit_interval,
)

__all__ = [
    "DIVERGENCE_KINDS",
    "DivergenceModule",
    "TokenDivergence",
    "canonical_kind",
    "divergence_and_grad",
    "divergence_from_logprobs",
    "token_divergence",
]


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p || q) = sum p (log p - log q)`` over the last dim; exact 0 where p underflows."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), p.new_zeros(())).sum(-1)


def _mix(logp: Tensor, logq: Tensor, w: int | float) -> Tensor:
    """``log(w * p + (1 - w) * q)`` computed stably."""
    if w <= 0.0:
        return logq
    if w >= 1.0:
        return logp
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def canonical_kind(kind: str, beta: int | float, alpha: int | float) -> str:
    """``kind``, or ``"fkl"``/``"rkl"`` where its options make it exactly one of them.

    ``jsd`` with ``beta = 0`` is ``KL(T || S)`` and with ``beta = 1`` ``KL(S || T)`` (TRL's GKD
    endpoints); ``skew_fkl``/``skew_rkl`` with ``alpha = 0`` are ``fkl``/``rkl``. Every
    evaluator (eager formula, analytic gradients) branches on this one mapping.
    """
    if (kind == "jsd" and beta == 0.0) or (kind == "skew_fkl" and alpha == 0.0):
        return "fkl"
    if (kind == "jsd" and beta == 1.0) or (kind == "skew_rkl" and alpha == 0.0):
        return "rkl"
    return kind


def divergence_from_logprobs(
    student_logp: Float[Tensor, "*lead vocab"],
    teacher_logp: Float[Tensor, "*lead vocab"],
    *,
    kind: str = "fkl",
    beta: int | float = 0.5,
    alpha: int | float = 0.1,
) -> Float[Tensor, "*lead"]:
    """The divergence of ``kind`` from fp32 log-probabilities (no validation; internal use).

    This is the one definition of every divergence's value; see the module docstring.
    """
    s, t = student_logp, teacher_logp
    kind = canonical_kind(kind, beta, alpha)
    if kind == "fkl":
        return _kl(t, s)
    if kind == "rkl":
        return _kl(s, t)
    if kind == "jsd":
        m = _mix(t, s, beta)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    if kind == "skew_fkl":
        return _kl(t, _mix(t, s, alpha))
    if kind == "skew_rkl":
        return _kl(s, _mix(s, t, alpha))
    if kind == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    raise ValueError(f"kind must be one of {DIVERGENCE_KINDS}, got {kind!r}")


def divergence_and_grad(
    student: Float[Tensor, "rows vocab"],
    teacher: Float[Tensor, "rows vocab"],
    *,
    kind: str,
    temperature: float,
    beta: float,
    alpha: float,
    need_grad: bool,
    coef: Float[Tensor, "rows"] | None = None,
    softmax_coef: Float[Tensor, "rows"] | None = None,
    student_log_probs: bool = False,
    scratch: Callable[[str], Tensor | None] | None = None,
) -> tuple[Float[Tensor, "rows"], Float[Tensor, "rows vocab"] | None]:
    """Per-row ``D(S, T)`` of logits rows and the gradient ``coef * dD/dz_s + softmax_coef * S`` (or None).

    Both inputs are in the compute dtype; ``teacher`` holds logits and is consumed (the caller
    must not read it afterwards). Values come from :func:`divergence_from_logprobs`; the
    gradients are analytic where that keeps memory at a few ``[rows, V]`` buffers:

    * ``"fkl"`` (``KL(T || S)``): ``dD/dz_s = (S - T) / tau``;
    * ``"rkl"`` (``KL(S || T)``): ``dD/dz_s = S * (log S - log T - D) / tau``;
    * every other kind: autograd through :func:`divergence_from_logprobs` on these rows only.

    Args:
        coef: per-row factor of ``dD/dz_s`` (default 1).
        softmax_coef: per-row factor of ``S`` added to the gradient: the softmax part of a
            cross-entropy's gradient on the same rows (``CE = -log S[target]``,
            ``dCE/dz_s = S - onehot``; the caller subtracts the one-hot part), so that one
            ``log_softmax`` of the student serves both. Needs ``temperature == 1`` and
            ``kind`` ``"fkl"`` or ``"rkl"`` after :func:`canonical_kind`.
        student_log_probs: ``student`` already holds ``log_softmax`` of the student's logits
            (temperature 1); it is consumed.
        scratch: ``name -> [rows, V]`` buffer in the compute dtype that this call may
            overwrite (or None: allocate): the chunk loops hand the same buffers to every chunk,
            since a fresh ``[rows, V]`` tensor costs its page faults again on every chunk.
    """
    tau = temperature
    kind = canonical_kind(kind, beta, alpha)
    if (softmax_coef is not None or student_log_probs) and (tau != 1.0 or kind not in ("fkl", "rkl")):
        raise ValueError(
            f"softmax_coef and student_log_probs need temperature 1 and an fkl/rkl divergence, got "
            f"temperature={tau}, kind={kind!r}"
        )
    buf = scratch if scratch is not None else (lambda name: None)

    def log_softmax(x: Tensor, name: str) -> Tensor:
        return torch.log_softmax(x / tau if tau != 1.0 else x, dim=-1, out=buf(name))

    lp_t = log_softmax(teacher, "log_t")
    del teacher
    if kind in ("fkl", "rkl"):
        lp_s = student if student_log_probs else log_softmax(student, "log_s")
        if kind == "fkl":
            diff = torch.sub(lp_t, lp_s, out=buf("diff"))
            t = lp_t.exp_()
            d = diff.mul_(t).sum(-1)
            del diff
            if not need_grad:
                return d, None
            if softmax_coef is not None:  # coef * (S - T) + softmax_coef * S (tau = 1)
                c = torch.ones_like(d) if coef is None else coef
                return d, lp_s.exp_().mul_((c + softmax_coef)[:, None]).addcmul_(t, c[:, None], value=-1.0)
            g = lp_s.exp_().sub_(t)
        else:
            s = torch.exp(lp_s, out=buf("probs_s"))
            diff = lp_s.sub_(lp_t)  # log S - log T, in the log S buffer
            del lp_t, lp_s
            d = torch.bmm(s[:, None, :], diff[:, :, None]).reshape(-1)
            if not need_grad:
                return d, None
            g = diff.sub_(d[:, None])
            if softmax_coef is not None:  # S * (coef * (log S - log T - D) + softmax_coef) (tau = 1)
                if coef is not None:
                    g.mul_(coef[:, None])
                return d, g.add_(softmax_coef[:, None]).mul_(s)
            g.mul_(s)
        if tau != 1.0:
            g.div_(tau)
        return d, (g if coef is None else g.mul_(coef[:, None]))
    if not need_grad:
        lp_s = log_softmax(student, "log_s")
        return divergence_from_logprobs(lp_s, lp_t, kind=kind, beta=beta, alpha=alpha), None
    with torch.enable_grad():
        xr = student.detach().requires_grad_(True)
        lp_s = torch.log_softmax(xr / tau if tau != 1.0 else xr, dim=-1)
        d = divergence_from_logprobs(lp_s, lp_t, kind=kind, beta=beta, alpha=alpha)
        (g,) = torch.autograd.grad(d, xr, grad_outputs=torch.ones_like(d))
    return d.detach(), (g if coef is None else g.mul_(coef[:, None]))


def check_divergence_options(kind: str, temperature: int | float, beta: int | float, alpha: int | float) -> None:
    check_choice("kind", kind, DIVERGENCE_KINDS)
    check_positive("temperature", temperature)
    check_unit_interval("beta", beta, open_low=False, open_high=False)
    check_unit_interval("alpha", alpha, open_low=False, open_high=True)


def log_probs(logits: Tensor, temperature: int | float) -> Tensor:
    """``log_softmax(logits / temperature)`` in fp32 (fp64 when the logits are fp64)."""
    x = logits.to(compute_dtype(logits))
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def token_divergence(
    student_logits: Float[Tensor, "batch seq vocab"],
    teacher_logits: Float[Tensor, "batch seq tvocab"],
    *,
    kind: str = "fkl",
    temperature: int | float = 1.0,
    beta: int | float = 0.5,
    alpha: int | float = 0.1,
    vocab_size: int | None = None,
) -> Float[Tensor, "batch seq"]:
    """Per-position divergence between student and teacher next-token distributions.

    See the module docstring for the exact formula of each ``kind`` and the direction of
    each KL. Computed in fp32 (fp64 for fp64 inputs); returns that dtype.

    Args:
        student_logits: the student's logits (student first, always).
        teacher_logits: the teacher's logits; its vocabulary must equal the student's
            unless ``vocab_size`` is given.
        kind: ``"fkl"``, ``"rkl"``, ``"jsd"``, ``"skew_fkl"``, ``"skew_rkl"`` or ``"tvd"``.
        temperature: ``tau > 0``; both sides use ``softmax(logits / tau)``; no ``tau**2``.
        beta: JSD mixing weight of the teacher, in [0, 1].
        alpha: skew weight, in [0, 1).
        vocab_size: compare only the first ``vocab_size`` entries of both vocabularies.

    Raises:
        ValueError: mismatched shapes or vocabularies, bad options, non-finite logits.
    """
    check_divergence_options(kind, temperature, beta, alpha)
    s, t = check_logit_pair(student_logits, teacher_logits, lead=2, vocab_size=vocab_size)
    return divergence_from_logprobs(
        log_probs(s, temperature), log_probs(t, temperature), kind=kind, beta=beta, alpha=alpha
    )


class DivergenceModule(nn.Module):
    """Base of the loss modules: holds and validates the divergence options.

    Args:
        kind: ``"fkl"``, ``"rkl"``, ``"jsd"``, ``"skew_fkl"``, ``"skew_rkl"`` or ``"tvd"``.
        temperature: ``tau > 0``; both sides use ``softmax(logits / tau)``; no ``tau**2``.
        beta: JSD mixing weight of the teacher, in [0, 1].
        alpha: skew weight, in [0, 1).
        vocab_size: compare only the first ``vocab_size`` entries of both vocabularies.
    """

    def __init__(
        self,
        *,
        kind: str = "fkl",
        temperature: int | float = 1.0,
        beta: int | float = 0.5,
        alpha: int | float = 0.1,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        check_divergence_options(kind, temperature, beta, alpha)
        self.kind, self.temperature, self.beta, self.alpha = kind, temperature, beta, alpha
        self.vocab_size = vocab_size

    @property
    def options(self) -> dict[str, object]:
        """The keyword options every loss function of the family takes."""
        return dict(kind=self.kind, temperature=self.temperature, beta=self.beta, alpha=self.alpha,
                    vocab_size=self.vocab_size)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, temperature={self.temperature}"


class TokenDivergence(DivergenceModule):
    """Module twin of :func:`token_divergence` (per-position values, no reduction).

    ``TokenDivergence(**options)(s, t)`` equals ``token_divergence(s, t, **options)``.

    Args:
        kind, temperature, beta, alpha, vocab_size: the divergence options of
            :func:`tokinteract.token_divergence` (default ``kind="fkl"``, KL(T||S)).
    """

    def forward(
        self,
        student_logits: Float[Tensor, "batch seq vocab"],
        teacher_logits: Float[Tensor, "batch seq tvocab"],
    ) -> Float[Tensor, "batch seq"]:
        return token_divergence(student_logits, teacher_logits, **self.options)


def divergence_rows(
    student_rows: Float[Tensor, "rows vocab"],
    teacher_rows: Float[Tensor, "rows vocab"],
    *,
    kind: str,
    temperature: int | float,
    beta: int | float = 0.5,
    alpha: int | float = 0.1,
) -> Float[Tensor, "rows"]:
    """Divergence of already-validated, vocabulary-aligned rows (internal fast path)."""
    return divergence_from_logprobs(
        log_probs(student_rows, temperature),
        log_probs(teacher_rows, temperature),
        kind=kind,
        beta=beta,
        alpha=alpha,
    )
