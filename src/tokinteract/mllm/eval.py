"""Evaluation helpers for a distilled LLaVA student: generation accuracy, held-out KL, exposure bias.

* :func:`evaluate_generation`: exact match per question type and POPE-style yes/no metrics of
  greedy answers;
* :func:`heldout_kl`: teacher-forced ``KL(P_T || P_S)`` per supervised answer token;
* :func:`exposure_curve`: :func:`tokinteract.hf.exposure_bias` (%ExAccErr, Eq. 11) on the
  prompts of a held-out set;
* :func:`teacher_irs`: :func:`tokinteract.hf.irs_curve` over pairs of instructions per image.

Items are single-turn samples of a :class:`tokinteract.mllm.data.LlavaJsonDataset`
(``input_ids``, ``labels`` with ``-100`` on the prompt, optional ``pixel_values``); ``metas``
carry the question ``type`` and, for existence probes, the reference ``answer``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tokinteract import shift_labels, token_divergence
from tokinteract.hf import exposure_bias, generate_tokens, ground_truth_position_ids, irs_curve

__all__ = ["IGNORE_INDEX", "evaluate_generation", "exposure_curve", "greedy_generate", "heldout_kl", "teacher_irs"]

IGNORE_INDEX = -100


def _prompt_and_answer(item: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Split one single-turn item into its prompt ids and its supervised answer ids (with EOS)."""
    labels = item["labels"]
    sup = (labels != IGNORE_INDEX).nonzero().flatten()
    first = int(sup[0])
    return item["input_ids"][:first], labels[sup]


def _left_pad(seqs: Sequence[Tensor], pad: int) -> tuple[Tensor, Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, n - len(s):] = s
        att[b, n - len(s):] = 1
    return ids, att


@torch.no_grad()
def greedy_generate(
    model: nn.Module, ids: Tensor, att: Tensor, pixel_values: Tensor | None, *, max_new_tokens: int, eos: int
) -> Tensor:
    """Greedy continuation ``[B, max_new_tokens]`` of left-padded prompts (KV-cached loop of
    ``tokinteract.hf``, the one :func:`tokinteract.hf.exposure_bias` uses)."""
    extra = {"pixel_values": pixel_values} if pixel_values is not None else {}
    return generate_tokens(model, ids, att.bool(), max_new_tokens=max_new_tokens, **extra)


def _strip(seq: Sequence[int], eos: int) -> list[int]:
    out = []
    for t in seq:
        out.append(int(t))
        if t == eos:
            break
    return out


@torch.no_grad()
def evaluate_generation(
    model: nn.Module,
    items: Sequence[dict[str, Any]],
    metas: Sequence[dict[str, Any]],
    *,
    eos: int,
    pad: int,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Exact match per question type, overall, and POPE-style accuracy on ``exist`` probes.

    The answer is decoded greedily from the prompt (everything before the first supervised
    token) until EOS; it is correct when its token ids equal the reference answer's, EOS
    included. POPE: accuracy, precision, recall and F1 of "yes" over the existence
    probes (half of them about absent objects), plus the rate of "yes" answers.
    """
    model.eval()
    prompts, answers, pix = [], [], []
    for it in items:
        p, a = _prompt_and_answer(it)
        prompts.append(p)
        answers.append(a.tolist())
        pix.append(it.get("pixel_values"))
    L = max_new_tokens or max(len(a) for a in answers) + 2
    correct: list[bool] = []
    preds: list[list[int]] = []
    for i in range(0, len(items), batch_size):
        ids, att = _left_pad(prompts[i:i + batch_size], pad)
        pv = [p for p in pix[i:i + batch_size] if p is not None]
        px = torch.cat(pv, 0) if pv else None
        out = greedy_generate(model, ids, att, px, max_new_tokens=L, eos=eos)
        for b in range(out.shape[0]):
            pred = _strip(out[b].tolist(), eos)
            preds.append(pred)
            correct.append(pred == answers[i + b])
    by_type: dict[str, list[bool]] = {}
    for m, c in zip(metas, correct):
        by_type.setdefault(m.get("type", "?"), []).append(c)
    res: dict[str, Any] = {
        "exact_match": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        "counts": {k: len(v) for k, v in sorted(by_type.items())},
        "overall": sum(correct) / max(len(correct), 1),
    }
    # POPE-style yes/no
    yes_tp = yes_fp = yes_fn = n = acc = n_yes = 0
    for m, p, a in zip(metas, preds, answers):
        if m.get("type") != "exist":
            continue
        n += 1
        # decode the yes/no decision by comparing with the reference: a correct answer to a
        # "no" probe is "no"; anything else counts as "yes" (a hallucination)
        truth_yes = m.get("answer") == "yes"
        pred_yes = (p == a) if truth_yes else (p != a)
        acc += int(p == a)
        n_yes += int(pred_yes)
        yes_tp += int(pred_yes and truth_yes)
        yes_fp += int(pred_yes and not truth_yes)
        yes_fn += int(not pred_yes and truth_yes)
    if n:
        prec = yes_tp / max(yes_tp + yes_fp, 1)
        rec = yes_tp / max(yes_tp + yes_fn, 1)
        res["pope"] = {
            "accuracy": acc / n, "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / max(prec + rec, 1e-12), "yes_rate": n_yes / n, "n": n,
        }
    return res


def _batches(items: Sequence[dict[str, Any]], collator: Callable, bs: int):
    for i in range(0, len(items), bs):
        yield collator(list(items[i:i + bs]))


@torch.no_grad()
def heldout_kl(
    student: nn.Module, teacher: nn.Module, items: Sequence[dict[str, Any]], collator: Callable, *, batch_size: int = 32
) -> float:
    """Mean forward KL(P_T || P_S) per supervised answer token, teacher-forced on held-out items."""
    student.eval()
    teacher.eval()
    total, count = 0.0, 0
    for batch in _batches(items, collator, batch_size):
        ids, att = batch["input_ids"], batch["attention_mask"]
        kw = dict(input_ids=ids, attention_mask=att, position_ids=ground_truth_position_ids(att.bool()))
        if "pixel_values" in batch:
            kw["pixel_values"] = batch["pixel_values"]
        s, t = student(**kw).logits.float(), teacher(**kw).logits.float()
        m = shift_labels(batch["labels"]) != IGNORE_INDEX
        kl = token_divergence(s, t, kind="fkl")
        total += float(kl[m].sum())
        count += int(m.sum())
    return total / max(count, 1)


def exposure_curve(
    student: nn.Module,
    teacher: nn.Module,
    items: Sequence[dict[str, Any]],
    *,
    steps: int,
    pad: int,
    eos: int,
    batch_size: int = 16,
) -> dict[str, list[float]]:
    """``tokinteract.hf.exposure_bias`` on the prompts of ``items`` (greedy prefixes).

    Returns the per-``l`` curves ``ex_acc_err`` (%ExAccErr, Eq. 11), ``r`` (R(l)),
    ``e`` (E(l)) and ``e_train`` (E_train(l) on the reference answers).
    """
    student.eval()
    teacher.eval()
    batches = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        pa = [_prompt_and_answer(it) for it in chunk]
        ids, att = _left_pad([p for p, _ in pa], pad)
        n = max(len(a) for _, a in pa)
        resp = torch.full((len(chunk), n), pad, dtype=torch.long)
        rmask = torch.zeros((len(chunk), n), dtype=torch.bool)
        for b, (_, a) in enumerate(pa):
            resp[b, :len(a)] = a
            rmask[b, :len(a)] = True
        batch = {"input_ids": ids, "attention_mask": att, "response_ids": resp, "response_mask": rmask}
        pv = [it["pixel_values"] for it in chunk if it.get("pixel_values") is not None]
        if pv:
            batch["pixel_values"] = torch.cat(pv, 0)
        batches.append(batch)
    eb = exposure_bias(teacher, student, batches, max_new_tokens=steps, eos_token_id=eos)
    out = {k: [float(x) for x in getattr(eb, k).tolist()] for k in ("ex_acc_err", "r", "e")}
    out["e_train"] = [float(x) for x in eb.e_train.tolist()] if eb.e_train is not None else []
    return out


@torch.no_grad()
def teacher_irs(teacher: nn.Module, pairs: Sequence[tuple[dict, dict]], collator: Callable, *, batch_size: int = 16):
    """``tokinteract.hf.irs_curve`` of ``teacher`` over (same image, two instructions) item pairs."""
    teacher.eval()

    def model_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
        b = collator(items)
        b.pop("labels", None)
        b.pop("response_mask", None)
        b["position_ids"] = ground_truth_position_ids(b["attention_mask"].bool())
        return b

    batches = [
        (model_batch([p[0] for p in pairs[i:i + batch_size]]), model_batch([p[1] for p in pairs[i:i + batch_size]]))
        for i in range(0, len(pairs), batch_size)
    ]
    return irs_curve(teacher, batches)
