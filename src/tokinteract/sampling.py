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
    check_float,
    check_int,
    check_leading_shape,
    check_positive,
    check_tensor,
    check_unit_interval,
)

__all__ = ["SAMPLING_STRATEGIES", "sample_candidates"]

SAMPLING_STRATEGIES = ("nucleus", "multinomial", "greedy")


# Rows are first restricted to their top-k tokens; only a row whose top-k mass is below top_p
# (a flat distribution) pays for a full-vocabulary sort, which costs far more than top-k at
# a 152k vocabulary (benchmarks/ and the CHANGELOG have the numbers).
_NUCLEUS_TOPK = 256


def _nucleus_keep(sorted_p: Tensor, top_p: int | float) -> Tensor:
    """Keep mask over a row sorted descending: tokens whose preceding mass is < top_p."""
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    keep[..., 0] = True
    return keep


def _nucleus_draw(probs: Tensor, top_p: int | float, d: int, generator: torch.Generator | None) -> Tensor:
    """``d`` i.i.d. draws per row from the renormalised top-p set of ``probs`` ``[rows, V]``.

    Exact: the top-p set is a prefix of the sorted row, so when the top-k tokens already
    hold ``top_p`` of the mass the set lies inside them (ties at the boundary may resolve
    to a different, equally likely token than a full sort would pick).
    """
    if top_p >= 1.0:
        return torch.multinomial(probs, d, replacement=True, generator=generator)
    V = probs.shape[-1]
    k = min(V, _NUCLEUS_TOPK)
    top_p_vals, top_idx = probs.topk(k, dim=-1)
    covered = top_p_vals.sum(-1) >= top_p
    if k == V:
        covered = torch.ones_like(covered)
    out = torch.empty(probs.shape[0], d, dtype=torch.long, device=probs.device)
    if bool(covered.any()):
        vals = top_p_vals[covered]
        p = torch.where(_nucleus_keep(vals, top_p), vals, vals.new_zeros(()))
        draws = torch.multinomial(p, d, replacement=True, generator=generator)
        out[covered] = top_idx[covered].gather(1, draws)
    if not bool(covered.all()):
        flat = probs[~covered]
        sorted_p, order = flat.sort(dim=-1, descending=True)
        p = torch.where(_nucleus_keep(sorted_p, top_p), sorted_p, sorted_p.new_zeros(()))
        draws = torch.multinomial(p, d, replacement=True, generator=generator)
        out[~covered] = order.gather(1, draws)
    return out


def _check_masked_logits(rows: Tensor, need: int) -> None:
    """Logits may be ``-inf`` (a masked token: probability 0), never NaN or ``+inf``; every row
    keeps at least ``need`` finite logits (``d`` for ``"greedy"``, which returns distinct tokens)."""
    bad = int((torch.isnan(rows) | (rows == float("inf"))).sum())
    if bad:
        raise ValueError(
            f"student_logits has {bad} non-finite value(s) (NaN or +inf) out of {rows.numel()} in the sampled "
            "rows; only -inf (a masked token) is accepted"
        )
    short = int((torch.isfinite(rows).sum(-1) < need).sum())
    if short:
        raise ValueError(
            f"student_logits has {short} sampled row(s) with fewer than {need} finite logit(s); masking (-inf) "
            f"must leave at least {need} token(s) to draw from"
        )


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

    Logits may be ``-inf`` (masked tokens, e.g. image placeholders: never drawn); NaN and
    ``+inf`` are refused, and every sampled row must keep a finite logit (``d`` of them for
    ``"greedy"``).

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
    _check_masked_logits(rows, d if strategy == "greedy" else 1)
    logits = rows.float() / temperature
    if strategy == "greedy":
        picked = logits.topk(d, dim=-1).indices
    else:
        probs = torch.softmax(logits, dim=-1)
        if strategy == "nucleus":
            picked = _nucleus_draw(probs, top_p, d, generator)
        else:
            picked = torch.multinomial(probs, d, replacement=True, generator=generator)
    out[mask] = picked
    return out
