"""Candidate tokens for TPA, drawn from the (detached) student distribution.

``candidates[b, t, u]`` is an alternative to token ``t + 1``, drawn from
``softmax(student_logits[b, t] / temperature)`` (paper Eq. 7, Algorithm 1 line 12).

Strategies:

* ``"nucleus"``: restrict to the top-p set (the smallest prefix of the sorted distribution
  whose mass reaches ``top_p``, equal probabilities in increasing token id order; the most
  likely token is always in it), renormalise, draw
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


# Rows are first restricted to their top-k tokens (k = 256, then a k bounded below by the mass
# still missing over the k-th probability); a row whose top-p set needs more than V / 8 tokens
# (a flat distribution) is sorted in full, where a partial selection costs as much as a sort.
_NUCLEUS_TOPK = 256
_FULL_SORT_FRACTION = 8
_KEY_SORT = True  # off: the full sort is the float sort on CPU too (for benchmarks)
_KEY_SORT_MIN = 32_768  # the CPU kernel sorts a 1-D integer tensor by radix from this length (its grain size)


def _nucleus_keep(sorted_p: Tensor, top_p: int | float) -> Tensor:
    """Keep mask over a row sorted descending: tokens whose preceding mass is < top_p."""
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    keep[..., 0] = True
    return keep


def _sort_descending(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Probabilities ``[R, V]`` (``>= 0``, softmax outputs: no ``-0.0``, no NaN) sorted
    descending: ``(values, ids)``.

    On CPU with fp32 and at least 32,768 columns, each row is sorted as one 1-D ``int32`` tensor
    of keys ``INT32_MAX - bits(p)``: the bit pattern of a non-negative float is monotone in its
    value, so ascending keys are descending probabilities, and a stable sort orders equal
    probabilities by increasing token id, exactly as ``sort(descending=True, stable=True)``. A 1-D
    integer sort of that length is the kernel's radix sort, where a float sort compares. The
    values are gathered back (the same floats). Elsewhere (CUDA sorts by radix already; other
    dtypes; short rows) the float sort itself, unstable (the values are the same;
    :func:`_stable_ids` orders the ids of equal values).
    """
    cpu_fp32 = probs.device.type == "cpu" and probs.dtype == torch.float32
    if not (_KEY_SORT and cpu_fp32 and probs.shape[1] >= _KEY_SORT_MIN):
        return probs.sort(dim=-1, descending=True)  # unstable: _stable_ids orders equal values
    keys = torch.iinfo(torch.int32).max - probs.contiguous().view(torch.int32)
    idx = torch.stack([row.sort(stable=True).indices for row in keys]) if keys.shape[0] else keys.long()
    return probs.gather(1, idx), idx


def _sorted_prefixes(probs: Tensor, top_p: float, full_width: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(S, order, length)``: per row the shortest prefix of the descending order that holds the
    top-p set: ``S [R, W]`` its values then zeros, ``order [R, W]`` its token ids then zeros,
    ``length [R]`` its length; ``W`` is the longest prefix (``V`` with ``full_width``).

    A prefix of ``k < V`` tokens comes from ``topk`` and is used only when its mass exceeds
    ``top_p`` by a margin of 4 float eps (the last kept token is then inside it, whatever the
    rounding of the full row's cumulative sum). The values of a prefix are exactly those of the
    full descending sort; only the order of equal values may differ (see :func:`_stable_ids`).
    """
    R, V = probs.shape
    dev = probs.device
    margin = 1.0 - 4 * torch.finfo(probs.dtype).eps
    pieces: list[tuple[Tensor, Tensor, Tensor, int]] = []
    pending = [(torch.arange(R, device=dev), min(V, _NUCLEUS_TOPK))]
    to_sort: list[Tensor] = []
    while pending:
        rows, k = pending.pop()
        if k * _FULL_SORT_FRACTION > V:
            to_sort.append(rows)
            continue
        sub = probs if rows.numel() == R else probs[rows]
        vals, idx = sub.topk(k, dim=-1)
        mass = vals.cumsum(-1)[:, -1]
        done = mass * margin >= top_p
        pieces.append((rows[done], vals[done], idx[done], k))
        rest = ~done
        if not bool(rest.any()):
            continue
        # every token outside the prefix has probability <= the k-th one: a lower bound on k
        last = vals[rest, -1]
        missing = (top_p - mass[rest]).clamp_min(0)
        need = torch.where(last > 0, (missing / last.clamp_min(torch.finfo(probs.dtype).tiny)).ceil(), float("inf"))
        need = torch.maximum(need + k + 1, torch.full_like(need, 4.0 * k))
        flat = need * _FULL_SORT_FRACTION > V
        if bool(flat.any()):
            to_sort.append(rows[rest][flat])
        if not bool(flat.all()):
            pending.append((rows[rest][~flat], int(need[~flat].max())))
    if to_sort:
        # in increasing order: rows from several rounds may hold every row, permuted, and the shortcut
        # below (all R rows -> ``probs`` itself) needs them in row order
        rows = torch.cat(to_sort).sort().values
        vals, idx = _sort_descending(probs if rows.numel() == R else probs[rows])
        pieces.append((rows, vals, idx, V))
    W = V if full_width else max(k_ for *_, k_ in pieces)
    pieces = [piece for piece in pieces if piece[0].numel()]
    if len(pieces) == 1 and pieces[0][3] == W and torch.equal(pieces[0][0], torch.arange(R, device=dev)):
        _, vals, idx, _ = pieces[0]  # one prefix length for every row, in row order: no copy
        return vals, idx, torch.full((R,), W, dtype=torch.long, device=dev)
    S = probs.new_zeros(R, W)
    order = torch.zeros(R, W, dtype=torch.long, device=dev)
    length = torch.empty(R, dtype=torch.long, device=dev)
    for r, vals, idx, k_ in pieces:
        S[r, :k_] = vals
        order[r, :k_] = idx
        length[r] = k_
    return S, order, length


def _stable_ids(probs: Tensor, S: Tensor, order: Tensor, length: Tensor, pos: Tensor) -> Tensor:
    """Token ids of the drawn positions ``pos [R, d]`` in the *stable* descending order (equal
    probabilities by increasing token id), as ``probs.sort(descending=True, stable=True)`` gives.

    ``topk`` and an unstable sort may order equal values differently; the values at every
    position are the same, so only a drawn value that occurs more than once in its row needs
    its id recomputed: the ``r``-th smallest id among the tokens of that value, with ``r`` the
    position minus the number of larger values.
    """
    V, W = probs.shape[1], S.shape[1]
    ids = order.gather(1, pos)
    v = S.gather(1, pos)
    n = length[:, None].expand_as(pos)
    left = (pos > 0) & (S.gather(1, (pos - 1).clamp_min(0)) == v)
    right = (pos + 1 < n) & (S.gather(1, (pos + 1).clamp_max(W - 1)) == v)
    edge = (n < V) & (S.gather(1, n - 1) == v)  # ties may continue outside a top-k prefix
    tied = left | right | edge
    if not bool(tied.any()):
        return ids
    # a tie group inside the prefix: its ids are order[first:last] (adjacent in S); sort them
    inner = tied & ~edge
    if bool(inner.any()):
        neg = S.neg()
        first = torch.searchsorted(neg, -v, right=False)
        last = torch.searchsorted(neg, -v, right=True)
        b, j = inner.nonzero(as_tuple=True)
        lo, hi = first[b, j], last[b, j]
        G = int((hi - lo).max())
        slots = lo[:, None] + torch.arange(G, device=S.device)
        group = order[b[:, None], slots.clamp_max(W - 1)]
        group = torch.where(slots < hi[:, None], group, torch.full_like(group, V))
        ids[b, j] = group.sort(dim=-1).values.gather(1, (pos[b, j] - lo)[:, None])[:, 0]
    if bool(edge.any()):  # the group may continue outside a top-k prefix: search the whole row
        b, j = edge.nonzero(as_tuple=True)
        row, val = probs[b], v[b, j][:, None]
        eq = row == val
        rank = pos[b, j] - (row > val).sum(-1)
        counts = eq.sum(-1)
        cols = eq.nonzero()[:, 1]
        ids[b, j] = cols[counts.cumsum(0) - counts + rank]
    return ids


def _nucleus_draw(probs: Tensor, top_p: int | float, d: int, generator: torch.Generator | None) -> Tensor:
    """``d`` i.i.d. draws per row from the renormalised top-p set of ``probs`` ``[rows, V]``.

    Exactly the draws of the sort-based definition (``tests/reference.py``,
    ``ref_nucleus_draw``): stable descending sort, keep the tokens whose preceding mass is
    ``< top_p``, one ``torch.multinomial`` call over all rows for the same generator. Rows are
    not sorted in full when a top-k prefix holds their top-p set (:func:`_sorted_prefixes`);
    the kept-probability matrix given to ``multinomial`` is the same tensor (on CPU with
    ``d >= 2`` without its trailing zero columns), and the ids of equal probabilities follow the
    stable order (:func:`_stable_ids`).
    """
    if top_p >= 1.0:
        return torch.multinomial(probs, d, replacement=True, generator=generator)
    # a narrower matrix (zeros cut off) makes the same draws with the CPU kernel for d >= 2 (tested);
    # elsewhere the matrix keeps the full width, so the call is literally the reference's
    full_width = d == 1 or probs.device.type != "cpu"
    S, order, length = _sorted_prefixes(probs, float(top_p), full_width)
    p = torch.where(_nucleus_keep(S, top_p), S, S.new_zeros(()))
    pos = torch.multinomial(p, d, replacement=True, generator=generator)
    return _stable_ids(probs, S, order, length, pos)


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
