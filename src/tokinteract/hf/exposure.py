"""Exposure-bias metrics (paper Appendix B.4, Eq. 9-13).

With ``D_t(x, y_<t) = KL(P_T || P_S)(y_t | x, y_<t)`` the forward KL between the teacher's
and the student's next-token distributions at generation step ``t`` (``t = 1..l``):

    E_train(l) = sum_{t<=l} E_{(x,y) ~ D}            [ D_t(x, y_<t) ]     (Eq. 9, ground-truth prefixes)
    E_test(l)  = sum_{t<=l} E_{x, y_<t ~ P_S}        [ D_t(x, y_<t) ]     (Eq. 10, student prefixes)
    R(l)       = E_test(l)                                                 (Eq. 12, the same quantity)
    E(l)       = sum_{t<=l} E_{x, y_<t ~ P_T}        [ D_t(x, y_<t) ]     (Eq. 13, teacher prefixes)
    %ExAccErr(l) = (R(l) - E(l)) / E(l) * 100                             (Eq. 11)

Each expectation is the mean over the prompts still generating at step ``t`` (all of them
unless ``eos_token_id`` is given: a sequence stops counting after the step that produced
EOS). Prefixes are generated batched, greedy or sampled with a fixed seed, by a KV-cached
loop; then one teacher-forced forward of each model over prompt + prefix gives every
step's ``D_t`` at once. Where ``E(l) = 0``, ``%ExAccErr(l)`` is 0 if ``R(l) = 0`` too and
``+inf`` otherwise (never NaN).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tokinteract._checks import check_int, check_integer, check_positive, check_tensor
from tokinteract.divergence import token_divergence
from tokinteract.hf import families
from tokinteract.hf.packed import (
    _padding_mask,
    _run,
    ground_truth_attention_mask,
    ground_truth_position_ids,
)

__all__ = ["ExposureBias", "exposure_bias", "generate_tokens"]


@dataclass(frozen=True, eq=False)
class ExposureBias:
    """Accumulated errors over generation steps ``l = 1..L`` (index ``l - 1``).

    Attributes:
        e_train: ``E_train(l)`` (Eq. 9); ``None`` when no ground-truth responses were given.
        e_test: ``E_test(l)`` (Eq. 10), identical to ``r``.
        r: ``R(l)`` (Eq. 12), student-generated prefixes.
        e: ``E(l)`` (Eq. 13), teacher-generated prefixes.
        ex_acc_err: ``%ExAccErr(l) = (R - E) / E * 100`` (Eq. 11).
        step_r, step_e, step_train: per-step mean KL (before accumulation).
        count_r, count_e, count_train: sequences that counted at each step.
    """

    e_train: Float[Tensor, "len"] | None
    e_test: Float[Tensor, "len"]
    r: Float[Tensor, "len"]
    e: Float[Tensor, "len"]
    ex_acc_err: Float[Tensor, "len"]
    step_r: Float[Tensor, "len"]
    step_e: Float[Tensor, "len"]
    step_train: Float[Tensor, "len"] | None
    count_r: Int[Tensor, "len"]
    count_e: Int[Tensor, "len"]
    count_train: Int[Tensor, "len"] | None


def _check_plain(role: str, model: nn.Module) -> None:
    """Exposure bias decodes with one sequential row of positions and plain causal masks."""
    fam = families.check_options(model)
    windows = families.layer_windows(model)
    if fam.positions != "sequential" or fam.image_blocks or any(w is not None for w in windows.values()):
        raise ValueError(
            f"exposure_bias: the {role} is a {fam.name} model (multimodal RoPE, sliding windows or bidirectional "
            "image blocks), which its decoding loop does not reproduce yet; it supports families with one "
            "sequential row of positions and full causal attention (Qwen2/Qwen3, LLaVA, LLaVA-NeXT/OneVision, "
            "Idefics3/SmolVLM, InternVL)"
        )


def _left_align(ids: Tensor, am: Tensor) -> tuple[Tensor, Tensor]:
    """Move every row's pads to the left (order of real tokens kept)."""
    order = torch.argsort(am.to(torch.int8), dim=1, stable=True)
    return ids.gather(1, order), am.gather(1, order)


def _dev(model: nn.Module) -> torch.device:
    from tokinteract.hf._attn import model_device

    return model_device(model)


@torch.no_grad()
def _generate(
    model: nn.Module,
    ids: Tensor,
    am: Tensor,
    extra: dict[str, Any],
    steps: int,
    *,
    do_sample: bool,
    temperature: float,
    generator: torch.Generator | None,
) -> Tensor:
    """``steps`` new tokens per row after a left-aligned prompt, with the model's KV cache."""
    dev = _dev(model)
    ids, am = ids.to(dev), am.to(dev)
    out = _run(model, ids, ground_truth_attention_mask(am), ground_truth_position_ids(am), use_cache=True, **extra)
    cache = out.cache
    logits = out.logits[:, -1]
    mask = am
    pos = am.long().sum(1, keepdim=True)
    toks = []
    for t in range(steps):
        if do_sample:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        toks.append(nxt)
        if t == steps - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = _run(model, nxt, mask[:, None, None, :], pos, cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1]
        pos = pos + 1
    return torch.cat(toks, dim=1)


def generate_tokens(
    model: nn.Module,
    input_ids: Int[Tensor, "batch prompt"],
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    **model_inputs: Any,
) -> Int[Tensor, "batch new"]:
    """``max_new_tokens`` tokens after each prompt (greedy, or sampled from ``softmax(logits / T)``).

    The decoding loop of :func:`exposure_bias`: prompts are left-aligned, the KV cache is reused,
    and no token stops a row early (cut at your end-of-sequence token afterwards). Families with
    multimodal RoPE, sliding windows or image blocks are refused (see :func:`exposure_bias`).
    """
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_positive("temperature", temperature)
    _check_plain("model", model)
    ids, am = _left_align(input_ids, _padding_mask(attention_mask, input_ids))
    return _generate(
        model, ids, am, model_inputs, max_new_tokens, do_sample=do_sample, temperature=temperature, generator=generator
    )


@torch.no_grad()
def _step_kl(
    teacher: nn.Module,
    student: nn.Module,
    ids: Tensor,
    am: Tensor,
    extra: dict[str, Any],
    prefix: Tensor,
    prefix_mask: Tensor,
    vocab_size: int | None,
) -> Tensor:
    """``[B, L]`` KL(P_T || P_S) at each of the ``L`` steps that produce ``prefix``."""
    seq = torch.cat([ids, prefix.to(ids.device)], dim=1)
    full = torch.cat([am, prefix_mask.to(am.device)], dim=1)
    mask, pos = ground_truth_attention_mask(full), ground_truth_position_ids(full)
    P, L = ids.shape[1], prefix.shape[1]
    out = []
    for model in (teacher, student):
        dev = _dev(model)
        x = {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in extra.items()}
        out.append(_run(model, seq, mask, pos, use_cache=False, **x).logits[:, P - 1 : P - 1 + L])
    lt, ls = out
    return token_divergence(ls.float().cpu(), lt.float().cpu(), kind="fkl", vocab_size=vocab_size)


def _alive(tokens: Tensor, eos: int | None) -> Tensor:
    if eos is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    hit = (tokens == eos).long().cumsum(1)
    return (hit - (tokens == eos).long()) == 0  # the EOS step itself still counts


_META = ("response_ids", "response_mask")


def exposure_bias(
    teacher: nn.Module,
    student: nn.Module,
    prompts: Iterable[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    vocab_size: int | None = None,
) -> ExposureBias:
    """``E_train``, ``E_test``, ``R``, ``E`` and ``%ExAccErr`` for a teacher and a student.

    Args:
        teacher: frozen teacher (``P_T``); causal LM or ``LlavaForConditionalGeneration``,
            eager or sdpa attention. Put both models in eval mode.
        student: the student (``P_S``), same tokenizer.
        prompts: batches (a loader or a list) of mappings with ``input_ids`` ``[B, P]``,
            optional ``attention_mask`` (left or right padding), extra model inputs such as
            ``pixel_values``, and optionally ``response_ids`` ``[B, L']`` with
            ``response_mask`` (True = real token) for ``E_train``.
        max_new_tokens: ``L``, the number of generation steps.
        do_sample: sample prefixes (``softmax(logits / temperature)``) instead of greedy.
        temperature: sampling temperature.
        seed: seed of the sampling generators (one for the student, one for the teacher,
            both starting from ``seed``), for reproducible prefixes.
        eos_token_id: if given, a sequence stops counting after the step that produced it.
        vocab_size: compare only the first ``vocab_size`` logits (padded vocabularies).

    Returns:
        an :class:`ExposureBias` with ``[L]`` curves.
    """
    L = check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_positive("temperature", temperature)
    for role, model in (("teacher", teacher), ("student", student)):
        _check_plain(role, model)
    sums = {k: torch.zeros(L, dtype=torch.float64) for k in ("r", "e", "train")}
    counts = {k: torch.zeros(L, dtype=torch.long) for k in ("r", "e", "train")}
    gens = {}
    for name, model in (("r", student), ("e", teacher)):
        dev = _dev(model)
        gens[name] = torch.Generator(device=dev).manual_seed(seed) if do_sample else None
    have_train = None
    n_batches = 0
    for batch in prompts:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError("each prompt batch must be a mapping with at least 'input_ids'")
        n_batches += 1
        ids = batch["input_ids"]
        check_tensor("input_ids", ids, ndim=2)
        check_integer("input_ids", ids)
        am = _padding_mask(batch.get("attention_mask"), ids)
        extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", *_META)}
        train = "response_ids" in batch
        if have_train is None:
            have_train = train
        elif have_train != train:
            raise ValueError("either every prompt batch has 'response_ids' or none does")
        lids, lam = _left_align(ids, am)  # prompt + continuation must be contiguous
        if train:
            resp = batch["response_ids"]
            check_tensor("response_ids", resp, ndim=2)
            check_integer("response_ids", resp)
            rm = _padding_mask(batch.get("response_mask"), resp)
            resp, rm = resp[:, :L], rm[:, :L]
            kl = _step_kl(teacher, student, lids, lam, extra, resp, rm, vocab_size)
            live = rm.cpu()
            n = resp.shape[1]
            sums["train"][:n] += (kl * live).sum(0).double()
            counts["train"][:n] += live.sum(0)
        for name, model in (("r", student), ("e", teacher)):
            dev = _dev(model)
            lx = {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in extra.items()}
            toks = _generate(model, lids, lam, lx, L, do_sample=do_sample, temperature=temperature, generator=gens[name])
            live = _alive(toks, eos_token_id)
            kl = _step_kl(teacher, student, lids, lam, extra, toks, torch.ones_like(toks, dtype=torch.bool), vocab_size)
            sums[name] += (kl * live.cpu()).sum(0).double()
            counts[name] += live.cpu().sum(0)
    if n_batches == 0:
        raise ValueError("prompts must yield at least one batch, got none")

    def curve(k: str) -> tuple[Tensor, Tensor]:
        step = torch.where(counts[k] > 0, sums[k] / counts[k].clamp(min=1), torch.zeros_like(sums[k]))
        return step.float(), step.cumsum(0).float()

    step_r, r = curve("r")
    step_e, e = curve("e")
    ratio = (r - e) / torch.where(e > 0, e, torch.ones_like(e)) * 100.0
    ex = torch.where(e > 0, ratio, torch.where(r == e, torch.zeros_like(r), torch.full_like(r, float("inf"))))
    step_t, e_train = curve("train") if have_train else (None, None)
    return ExposureBias(
        e_train=e_train, e_test=r, r=r, e=e, ex_acc_err=ex, step_r=step_r, step_e=step_e, step_train=step_t,
        count_r=counts["r"], count_e=counts["e"], count_train=counts["train"] if have_train else None,
    )
