"""Candidate tokens for TPA, drawn from the (detached) student distribution.

``candidates[b, t, u]`` is an alternative to token ``t + 1``, drawn from
``softmax(student_logits[b, t] / temperature)`` (paper Eq. 7, Algorithm 1 line 12).

Strategies:

* ``"nucleus"``: restrict to the top-p set (the smallest prefix of the sorted distribution
  whose mass reaches ``top_p``; the most likely token is always in it), renormalise, draw
  ``d`` tokens **with replacement** (i.i.d.), so the mean over candidates is an unbiased
  Monte-Carlo estimate of the expectation in Eq. 5 over the truncated distribution.
* ``"multinomial"``: ``d`` i.i.d. draws **with replacement** from the full distribution.
* ``"greedy"``: the ``d`` most likely tokens, distinct (no randomness; ``d <= vocab``).

Deterministic for a given ``torch.Generator``. Gradients never flow through sampling.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tokinteract._checks import (
    check_bool,
    check_choice,
    check_finite,
    check_float,
    check_int,
    check_leading_shape,
    check_positive,
    check_tensor,
    check_unit_interval,
)

__all__ = ["SAMPLING_STRATEGIES", "sample_candidates"]

SAMPLING_STRATEGIES = ("nucleus", "multinomial", "greedy")


def _nucleus_probs(probs: Tensor, top_p: int | float) -> Tensor:
    """Zero every token outside the top-p set of each row (the argmax always stays)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.where(keep, probs, probs.new_zeros(()))


def sample_candidates(
    student_logits: Float[Tensor, "batch seq vocab"],
    num_candidates: int,
    *,
    strategy: str = "nucleus",
    top_p: int | float = 0.95,
    temperature: int | float = 1.0,
    generator: torch.Generator | None = None,
    mask: Bool[Tensor, "batch seq"] | None = None,
) -> Int[Tensor, "batch seq cand"]:
    """Draw ``num_candidates`` alternatives to token ``t + 1`` at every position ``t``.

    Args:
        student_logits: the student's logits on the ground-truth sequence (detached here).
        num_candidates: ``d >= 1``.
        strategy: ``"nucleus"``, ``"multinomial"`` or ``"greedy"`` (see module docstring).
        top_p: nucleus mass in (0, 1].
        temperature: sampling temperature > 0.
        generator: a ``torch.Generator`` on the logits' device, for reproducible draws.
        mask: sample only where True (e.g. the TPA candidate mask); elsewhere the result
            is 0. Saves the sort/softmax over the vocabulary at unused positions.

    Returns:
        ``int64`` token ids ``[batch, seq, d]``.
    """
    check_tensor("student_logits", student_logits, ndim=3)
    check_float("student_logits", student_logits)
    d = check_int("num_candidates", num_candidates, minimum=1)
    check_choice("strategy", strategy, SAMPLING_STRATEGIES)
    check_unit_interval("top_p", top_p, open_low=True, open_high=False)
    check_positive("temperature", temperature)
    B, T, V = student_logits.shape
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=student_logits.device)
    check_tensor("mask", mask, ndim=2)
    check_bool("mask", mask)
    check_leading_shape("mask", mask, "student_logits", student_logits, 2)
    if strategy == "greedy" and d > V:
        raise ValueError(f"num_candidates={d} exceeds the vocabulary size {V} for strategy='greedy'")
    out = torch.zeros(B, T, d, dtype=torch.long, device=student_logits.device)
    rows = student_logits.detach()[mask]
    if rows.shape[0] == 0:
        return out
    check_finite("student_logits", rows)
    logits = rows.float() / temperature
    if strategy == "greedy":
        picked = logits.topk(d, dim=-1).indices
    else:
        probs = torch.softmax(logits, dim=-1)
        if strategy == "nucleus":
            probs = _nucleus_probs(probs, top_p)
        picked = torch.multinomial(probs, d, replacement=True, generator=generator)
    out[mask] = picked
    return out
