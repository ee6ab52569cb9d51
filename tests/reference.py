"""Naive reference implementations, written straight from the paper's formulas.

These are deliberately slow and simple (explicit softmax, explicit ``p * log(p / q)`` sums,
Python loops over batch and positions) and independent of the library code: they import
nothing from ``tokinteract``. Everything computes in float64 (inputs are upcast, autograd
still flows back to them), so tests can compare the library's fp32 results and gradients
against them.

Conventions (same as the library, see ``src/tokinteract/divergence.py``):

* ``logits[b, t]`` predicts token ``t + 1``; student first, teacher second.
* ``S = softmax(student / tau)``, ``T = softmax(teacher / tau)``; no ``tau**2`` factor.
* ``fkl = KL(T || S)``, ``rkl = KL(S || T)``,
  ``jsd = beta KL(T || M) + (1 - beta) KL(S || M)`` with ``M = beta T + (1 - beta) S``,
  except ``beta = 0`` -> ``KL(T || S)`` and ``beta = 1`` -> ``KL(S || T)`` (TRL's GKD endpoints),
  ``skew_fkl = KL(T || alpha T + (1 - alpha) S)``, ``skew_rkl = KL(S || alpha S + (1 - alpha) T)``,
  ``tvd = 0.5 sum |T - S|``.
* Teacher quantities are constants (detached).

Callables for :func:`ref_tpa_loss` take ``(input_ids [1, L], position_ids [1, L],
attn_mask bool [1, 1, L, L] True = attend)`` and return logits ``[1, L, V]`` (the signature of
:class:`tests.tiny_transformer.TinyTransformer`); the reference always passes a plain causal
mask and position ids ``0 .. L-1``. Wrap other models accordingly, e.g. an HF model:
``lambda ids, pos, mask: model(input_ids=ids, position_ids=pos).logits``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "REF_KINDS",
    "causal_mask",
    "ref_divergence",
    "ref_irs_score",
    "ref_iva_loss",
    "ref_kd_loss",
    "ref_nucleus_draw",
    "ref_position_ids",
    "ref_ribbon_layout",
    "ref_ribbon_mask",
    "ref_sft_loss",
    "ref_softmax",
    "ref_tpa_loss",
    "ref_tpa_position_values",
    "ref_uniform_visual_weights",
    "ref_visual_importance",
]

REF_KINDS = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- distributions


def ref_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``exp(x_v / tau - max) / sum_w exp(x_w / tau - max)`` in float64, over the last dim."""
    x = logits.double() / temperature
    x = x - x.max(dim=-1, keepdim=True).values.detach()
    e = torch.exp(x)
    return e / e.sum(dim=-1, keepdim=True)


def ref_nucleus_draw(probs: Tensor, top_p: float, d: int, generator: torch.Generator | None) -> Tensor:
    """Nucleus sampling by its definition: the whole row sorted descending (stable: equal
    probabilities by increasing token id), the tokens whose preceding mass is ``< top_p`` kept
    (the first always), ``d`` draws with replacement from the kept probabilities in one
    ``torch.multinomial`` call over all rows (``probs [R, V]``, the library's dtype, not float64:
    the draws themselves are compared). Returns token ids ``[R, d]``."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    keep[:, 0] = True
    kept = torch.where(keep, sorted_p, torch.zeros((), dtype=sorted_p.dtype))
    pos = torch.multinomial(kept, d, replacement=True, generator=generator)
    return order.gather(1, pos)


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """``KL(p || q) = sum_v p_v * log(p_v / q_v)``, with ``0 * log(0 / q) = 0``."""
    pos = p > 0
    safe_p = torch.where(pos, p, torch.ones_like(p))
    safe_q = torch.where(pos, q, torch.ones_like(q))
    terms = torch.where(pos, p * torch.log(safe_p / safe_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def _divergence_probs(S: Tensor, T: Tensor, kind: str, beta: float, alpha: float) -> Tensor:
    if kind == "fkl":
        return _kl(T, S)
    if kind == "rkl":
        return _kl(S, T)
    if kind == "jsd":
        if beta == 0.0:
            return _kl(T, S)
        if beta == 1.0:
            return _kl(S, T)
        M = beta * T + (1.0 - beta) * S
        return beta * _kl(T, M) + (1.0 - beta) * _kl(S, M)
    if kind == "skew_fkl":
        return _kl(T, alpha * T + (1.0 - alpha) * S)
    if kind == "skew_rkl":
        return _kl(S, alpha * S + (1.0 - alpha) * T)
    if kind == "tvd":
        return 0.5 * (T - S).abs().sum(dim=-1)
    raise ValueError(f"unknown kind {kind!r}")


def ref_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    detach_teacher: bool = False,
) -> Tensor:
    """Per-position divergence ``[...]`` (float64) for logits ``[..., V]``.

    Loops are unnecessary here: the formula is applied row-wise with explicit sums.
    ``detach_teacher=True`` treats the teacher as a constant (as the losses do);
    :func:`tokinteract.token_divergence` itself does not detach.
    """
    S = ref_softmax(student_logits, temperature)
    t_logits = teacher_logits.detach() if detach_teacher else teacher_logits
    T = ref_softmax(t_logits, temperature)
    return _divergence_probs(S, T, kind, beta, alpha)


# ----------------------------------------------------------------------------- SFT and KD


def ref_sft_loss(student_logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``mean over {(b,t): labels[b,t+1] != ignore}`` of ``-log S_{b,t}(labels[b,t+1])``; 0 if none."""
    B, L, _ = student_logits.shape
    total = student_logits.new_zeros((), dtype=torch.float64)
    count = 0
    for b in range(B):
        for t in range(L - 1):
            y = int(labels[b, t + 1])
            if y == ignore_index:
                continue
            p = ref_softmax(student_logits[b, t])
            total = total - torch.log(p[y])
            count += 1
    return total / max(count, 1)


def ref_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ignore_index: int = -100,
    num_items: float | None = None,
) -> Tensor:
    """``sum over {(b,t): labels[b,t+1] != ignore}`` of ``D(S_bt, T_bt)`` / ``max(count, 1)``.

    ``count`` is the number of such positions, or ``num_items`` when given. Teacher detached.
    """
    B, L, _ = student_logits.shape
    total = student_logits.new_zeros((), dtype=torch.float64)
    count = 0
    for b in range(B):
        for t in range(L - 1):
            if int(labels[b, t + 1]) == ignore_index:
                continue
            total = total + ref_divergence(
                student_logits[b, t], teacher_logits[b, t], kind,
                temperature=temperature, beta=beta, alpha=alpha, detach_teacher=True,
            )
            count += 1
    denom = count if num_items is None else num_items
    return total / max(denom, 1)


# ----------------------------------------------------------------------------- IVA and IRS


def ref_visual_importance(
    attn: Tensor, instruction_mask: Tensor, visual_mask: Tensor, *, normalize: bool = False,
    query_positions: Tensor | None = None,
) -> Tensor:
    """Eq. 4 weights: ``w[b,k] = (1/H) sum_h (1/N_i) sum_{u instr} A[b,h,u,k]`` at visual ``k``.

    ``attn`` is ``[B, H, Q, K]`` or head-averaged ``[B, Q, K]``. The rows ``u`` are the
    instruction rows whose position (``query_positions[b, u]``, default ``u``) lies after the
    sample's first visual token. ``w = 0`` at non-visual keys and for rows without such rows.
    ``normalize`` rescales each row to sum to 1 (rows summing to 0 stay 0). Returns float64 ``[B, K]``.
    """
    a = attn.double()
    if a.ndim == 3:
        a = a[:, None]
    B, H, Q, K = a.shape
    w = torch.zeros(B, K, dtype=torch.float64)
    for b in range(B):
        visual = [k for k in range(K) if bool(visual_mask[b, k])]
        first = visual[0] if visual else None
        rows = []
        for u in range(Q):
            pos = u if query_positions is None else int(query_positions[b, u])
            if bool(instruction_mask[b, u]) and first is not None and pos > first:
                rows.append(u)
        if not rows:
            continue
        for k in range(K):
            if not bool(visual_mask[b, k]):
                continue
            acc = 0.0
            for h in range(H):
                acc += sum(float(a[b, h, u, k]) for u in rows) / len(rows)
            w[b, k] = acc / H
        if normalize:
            s = float(w[b].sum())
            if s > 0:
                w[b] = w[b] / s
    return w


def ref_uniform_visual_weights(visual_mask: Tensor) -> Tensor:
    """``1 / N_v`` at visual positions of each row, 0 elsewhere (float64)."""
    B, L = visual_mask.shape
    w = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        n = int(visual_mask[b].sum())
        for t in range(L):
            if bool(visual_mask[b, t]):
                w[b, t] = 1.0 / n
    return w


def ref_iva_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Tensor,
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    num_sequences: float | None = None,
) -> Tensor:
    """``(1/B) sum_b sum_t w[b,t] * D(S_bt, T_bt)`` (``B`` or ``num_sequences``); weights constant."""
    B, L, _ = student_logits.shape
    total = student_logits.new_zeros((), dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            w = float(weights[b, t])
            if w == 0.0:
                continue
            total = total + w * ref_divergence(
                student_logits[b, t], teacher_logits[b, t], kind,
                temperature=temperature, beta=beta, alpha=alpha, detach_teacher=True,
            )
    denom = B if num_sequences is None else num_sequences
    return total / max(denom, 1)


def ref_irs_score(alpha_a: Tensor, alpha_b: Tensor) -> Tensor:
    """``1 - (1/N) sum_n cos(a_n, b_n)``; a zero vector has cosine 0 with anything."""
    N = alpha_a.shape[0]
    acc = 0.0
    for n in range(N):
        a, b = alpha_a[n].double(), alpha_b[n].double()
        na, nb = float(torch.sqrt((a * a).sum())), float(torch.sqrt((b * b).sum()))
        cos = 0.0 if na == 0.0 or nb == 0.0 else float((a * b).sum()) / (na * nb)
        acc += cos
    return torch.tensor(1.0 - acc / N, dtype=torch.float64)


# ----------------------------------------------------------------------------- TPA


def causal_mask(L: int, device: torch.device | str | None = None) -> Tensor:
    """Plain causal bool mask ``[1, 1, L, L]`` (True = may attend)."""
    return torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, None]


def _as_bool_mask(attention_mask: Tensor | None, shape: tuple[int, int]) -> Tensor:
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.bool)
    return attention_mask.bool()


def ref_position_ids(attention_mask: Tensor) -> Tensor:
    """HF convention, by loop: the count of real tokens before ``t``; 1 at pad positions."""
    am = attention_mask.bool()
    B, L = am.shape
    out = torch.ones(B, L, dtype=torch.long)
    for b in range(B):
        n = 0
        for t in range(L):
            if bool(am[b, t]):
                out[b, t] = n
                n += 1
    return out


def ref_ribbon_layout(candidate_mask: Tensor, d: int, attention_mask: Tensor | None = None) -> dict:
    """The documented packed layout, by loops.

    Returns a dict with ``T2``, ``slot_of`` (``{(b, t, u): slot}``), ``source`` (``[B][T2]``
    list: original position of each slot or -1 if unused), ``kind`` (``[B][T2]`` of
    ``"gt"``, ``"pad"``, ``"cand"``, ``"unused"``) and ``position_ids`` ``[B, T2]``.
    """
    B, T = candidate_mask.shape
    am = _as_bool_mask(attention_mask, (B, T))
    gt_pos = ref_position_ids(am)
    counts = [int(candidate_mask[b].sum()) for b in range(B)]
    T2 = T + (max(counts) if B else 0) * d
    slot_of: dict[tuple[int, int, int], int] = {}
    source = [[-1] * T2 for _ in range(B)]
    kind = [["unused"] * T2 for _ in range(B)]
    pos = torch.ones(B, T2, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            source[b][t] = t
            kind[b][t] = "gt" if bool(am[b, t]) else "pad"
            pos[b, t] = gt_pos[b, t]
        nxt = T
        for t in range(T):
            if not bool(candidate_mask[b, t]):
                continue
            for u in range(d):
                slot_of[(b, t, u)] = nxt
                source[b][nxt] = t
                kind[b][nxt] = "cand"
                # the candidate replaces token t+1: position id = #real tokens at <= t
                pos[b, nxt] = int(am[b, : t + 1].sum())
                nxt += 1
    return {"T2": T2, "slot_of": slot_of, "source": source, "kind": kind, "position_ids": pos}


def ref_ribbon_mask(candidate_mask: Tensor, d: int, attention_mask: Tensor | None = None) -> Tensor:
    """The ribbon mask ``[B, 1, T2, T2]`` from the contract, by loops over (query, key)."""
    lay = ref_ribbon_layout(candidate_mask, d, attention_mask)
    B, T2 = len(lay["kind"]), lay["T2"]
    src, kind = lay["source"], lay["kind"]
    m = torch.zeros(B, 1, T2, T2, dtype=torch.bool)
    for b in range(B):
        for q in range(T2):
            for k in range(T2):
                if kind[b][q] in ("pad", "unused"):
                    allowed = q == k
                elif kind[b][q] == "gt":
                    allowed = kind[b][k] == "gt" and src[b][k] <= src[b][q]
                else:  # candidate for position src[b][q]
                    allowed = q == k or (kind[b][k] == "gt" and src[b][k] <= src[b][q])
                m[b, 0, q, k] = allowed
    return m


def _run(fn: ModelFn, ids: list[int], device: torch.device | str | None) -> Tensor:
    L = len(ids)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None]
    pos = torch.arange(L, device=device)[None]
    return fn(x, pos, causal_mask(L, device))[0, -1]


def ref_tpa_position_values(
    model_fn: ModelFn,
    input_ids: Tensor,
    candidates: Tensor,
    candidate_mask: Tensor,
    attention_mask: Tensor | None,
    teacher_fn: ModelFn,
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Per-position Eq. 7 values ``[B, T]`` (float64), one separate sequence per candidate.

    For each ``(b, t)`` with ``candidate_mask[b, t]`` and each ``u``: the sequence is the
    non-pad ground-truth tokens at positions ``<= t`` followed by ``candidates[b, t, u]``,
    run alone (batch 1, causal, positions ``0 .. L-1``) through the student and the teacher;
    the next-token distributions after the candidate give ``D(S, T)``; the value is the mean
    over ``u``. Positions without candidates are 0. The teacher is detached.
    """
    B, T = input_ids.shape
    d = candidates.shape[2]
    am = _as_bool_mask(attention_mask, (B, T))
    device = input_ids.device
    values: list[list[Tensor]] = []
    for b in range(B):
        row: list[Tensor] = []
        for t in range(T):
            if not bool(candidate_mask[b, t]):
                row.append(torch.zeros((), dtype=torch.float64, device=device))
                continue
            prefix = [int(input_ids[b, j]) for j in range(t + 1) if bool(am[b, j])]
            acc = torch.zeros((), dtype=torch.float64, device=device)
            for u in range(d):
                seq = prefix + [int(candidates[b, t, u])]
                s = _run(model_fn, seq, device)
                with torch.no_grad():
                    tt = _run(teacher_fn, seq, device)
                acc = acc + ref_divergence(
                    s, tt, kind, temperature=temperature, beta=beta, alpha=alpha, detach_teacher=True
                )
            row.append(acc / d)
        values.append(row)
    return torch.stack([torch.stack(r) for r in values]) if B and T else torch.zeros(B, T, dtype=torch.float64)


def ref_tpa_loss(
    model_fn: ModelFn,
    input_ids: Tensor,
    candidates: Tensor,
    candidate_mask: Tensor,
    attention_mask: Tensor | None,
    teacher_fn: ModelFn,
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    num_items: float | None = None,
) -> Tensor:
    """Eq. 7: mean over candidate positions (``num_items`` if given) of the per-position values."""
    values = ref_tpa_position_values(
        model_fn, input_ids, candidates, candidate_mask, attention_mask, teacher_fn,
        kind=kind, temperature=temperature, beta=beta, alpha=alpha,
    )
    count = int(candidate_mask.sum()) if num_items is None else num_items
    total = values.new_zeros(())
    for b in range(values.shape[0]):
        for t in range(values.shape[1]):
            if bool(candidate_mask[b, t]):
                total = total + values[b, t]
    return total / max(count, 1)
