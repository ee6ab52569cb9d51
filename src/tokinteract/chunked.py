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

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tokinteract._checks import (
    check_finite,
    check_float,
    check_int,
    check_integer,
    check_leading_shape,
    check_logit_pair,
    check_tensor,
)
from tokinteract.align_ti import AlignTILoss
from tokinteract.divergence import check_divergence_options, divergence_from_logprobs
from tokinteract.expansion import TPAExpansion
from tokinteract.kd import shift_labels
from tokinteract.reduction import compute_dtype, resolve_count

__all__ = [
    "ChunkedAlignTILoss",
    "chunked_align_ti_terms",
    "chunked_divergence",
    "chunked_iva_loss",
    "chunked_kd_loss",
    "chunked_sft_loss",
    "chunked_tpa_loss",
]

_AUTO_CHUNK_ELEMENTS = 2**24


# --------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class _Config:
    kind: str
    temperature: float
    beta: float
    alpha: float
    vocab: int  # columns compared by the divergence (shared prefix)
    chunk_size: int
    has_div: bool
    has_ce: bool
    student_name: str
    teacher_name: str


@dataclass
class _Side:
    """Where one model's logits rows come from: a logits tensor, or hidden @ weight.T + bias."""

    src: Tensor  # [N, V] logits or [N, H] hidden
    weight: Tensor | None = None  # [V, H]
    bias: Tensor | None = None  # [V]

    def logits(self, idx: Tensor | slice, ncols: int) -> Tensor:
        rows = self.src[idx]
        if self.weight is None:
            return rows[:, :ncols]
        b = None if self.bias is None else self.bias[:ncols]
        return torch.nn.functional.linear(rows, self.weight[:ncols], b)


def resolve_chunk_size(chunk_size: int | None, vocab: int) -> int:
    """``chunk_size`` validated, or the automatic choice ``max(1, 2**24 // vocab)``."""
    if chunk_size is None:
        return max(1, _AUTO_CHUNK_ELEMENTS // max(vocab, 1))
    return check_int("chunk_size", chunk_size, minimum=1)


def _bad_rows(x: Tensor) -> Tensor:
    """Number of rows holding a NaN or an inf (two reductions, no ``[rows, V]`` temporary)."""
    return (~(torch.isfinite(x.amax(-1)) & torch.isfinite(x.amin(-1)))).sum()


def _div_and_grad(
    x: Tensor, y: Tensor, cfg: _Config, need_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-row divergence of one chunk, ``dD/dx`` (or None) and the teacher's bad-row count.

    ``x``: the student's logits in the compute dtype; ``y``: the teacher's (consumed: the
    caller must hold no other reference, so its buffer is reused in place). fkl and rkl use
    the analytic gradient with at most four ``[chunk, V]`` buffers alive; the other kinds
    run autograd through the core formula on this chunk only.
    """
    kind, tau, beta, alpha = cfg.kind, cfg.temperature, cfg.beta, cfg.alpha
    bad_t = _bad_rows(y)
    lp_t = torch.log_softmax(y / tau if tau != 1.0 else y, dim=-1)
    del y
    # endpoints that are exactly fkl / rkl (same branches as the core formula)
    if (kind == "jsd" and beta == 0.0) or (kind == "skew_fkl" and alpha == 0.0):
        kind = "fkl"
    elif (kind == "jsd" and beta == 1.0) or (kind == "skew_rkl" and alpha == 0.0):
        kind = "rkl"
    if kind == "fkl":
        # KL(T || S) = sum_v T_v (log T_v - log S_v); dD/dx = (S - T) / tau
        lp_s = torch.log_softmax(x / tau if tau != 1.0 else x, dim=-1)
        diff = lp_t - lp_s
        t = lp_t.exp_()
        d = diff.mul_(t).sum(-1)
        del diff
        if not need_grad:
            return d, None, bad_t
        g = lp_s.exp_().sub_(t)
        return d, (g.div_(tau) if tau != 1.0 else g), bad_t
    if kind == "rkl":
        # KL(S || T) = sum_v S_v (log S_v - log T_v); dD/dx = S * (log S - log T - D) / tau
        lp_s = torch.log_softmax(x / tau if tau != 1.0 else x, dim=-1)
        s = lp_s.exp()
        diff = lp_s.sub_(lp_t)  # log S - log T, in the log S buffer
        del lp_t, lp_s
        d = torch.bmm(s[:, None, :], diff[:, :, None]).reshape(-1)
        if not need_grad:
            return d, None, bad_t
        g = diff.sub_(d[:, None]).mul_(s)
        return d, (g.div_(tau) if tau != 1.0 else g), bad_t
    if not need_grad:
        lp_s = torch.log_softmax(x / tau if tau != 1.0 else x, dim=-1)
        return divergence_from_logprobs(lp_s, lp_t, kind=kind, beta=beta, alpha=alpha), None, bad_t
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        lp_s = torch.log_softmax(xr / tau if tau != 1.0 else xr, dim=-1)
        d = divergence_from_logprobs(lp_s, lp_t, kind=kind, beta=beta, alpha=alpha)
        (g,) = torch.autograd.grad(d, xr, grad_outputs=torch.ones_like(d))
    return d.detach(), g, bad_t


def _run(
    student: _Side,
    teacher: _Side | None,
    rows: Tensor | None,
    n_rows: int,
    div_coef: Tensor | None,
    ce_target: Tensor | None,
    ce_coef: Tensor | None,
    cfg: _Config,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loop over chunks; return total, per-row divergence, per-row CE and the gradients."""
    src = student.src
    dev = src.device
    acc_dtype = compute_dtype(src if student.weight is None else student.weight)
    fused = student.weight is not None
    n_student_cols = (student.weight.shape[0] if fused else src.shape[1]) if cfg.has_ce else cfg.vocab
    need_src, need_w, need_b = need
    g_src = torch.zeros_like(src) if need_src else None
    g_w = g_b = None
    if fused and need_w:
        g_w = torch.zeros(student.weight.shape, dtype=acc_dtype, device=dev)
    if fused and need_b and student.bias is not None:
        g_b = torch.zeros(student.bias.shape, dtype=acc_dtype, device=dev)
    total = torch.zeros((), dtype=acc_dtype, device=dev)
    div_all = torch.zeros(n_rows, dtype=acc_dtype, device=dev)
    ce_all = torch.zeros(n_rows, dtype=acc_dtype, device=dev)
    bad_s = torch.zeros((), dtype=torch.long, device=dev)
    bad_t = torch.zeros((), dtype=torch.long, device=dev)
    need_grad = need_src or need_w or need_b
    for start in range(0, n_rows, cfg.chunk_size):
        stop = min(start + cfg.chunk_size, n_rows)
        idx: Tensor | slice = slice(start, stop) if rows is None else rows[start:stop]
        x = student.logits(idx, n_student_cols).to(acc_dtype)
        bad_s += _bad_rows(x)
        g = None
        if cfg.has_ce:
            # cross-entropy at temperature 1 over the full student vocabulary
            tgt = ce_target[start:stop]
            has = tgt >= 0
            safe = tgt.clamp(min=0)[:, None]
            coef = ce_coef[start:stop]
            lp1 = torch.log_softmax(x, dim=-1)
            ce = torch.where(has, -lp1.gather(1, safe)[:, 0], lp1.new_zeros(()))
            ce_all[start:stop] = ce
            total = total + (coef * ce).sum()
            if need_grad:  # softmax(x) - onehot(target)
                g = lp1.exp_()
                g.scatter_add_(1, safe, torch.where(has, -1.0, 0.0).to(g.dtype)[:, None])
                g.mul_(coef[:, None])
            del lp1
        if cfg.has_div:
            d, gd, bad = _div_and_grad(
                x[:, : cfg.vocab], teacher.logits(idx, cfg.vocab).to(acc_dtype), cfg, need_grad
            )
            bad_t += bad
            coef = div_coef[start:stop]
            div_all[start:stop] = d
            total = total + (coef * d).sum()
            if gd is not None:
                gd.mul_(coef[:, None])
                if g is None and gd.shape[1] == x.shape[1]:
                    g = gd
                else:
                    if g is None:
                        g = torch.zeros_like(x)
                    g[:, : cfg.vocab] += gd
            del gd
        ncols = x.shape[1]
        del x
        if need_grad:
            if g is None:  # no term touched this chunk
                g = torch.zeros(stop - start, ncols, dtype=acc_dtype, device=dev)
            if not fused:
                if rows is None:
                    g_src[idx, :ncols] = g.to(g_src.dtype)
                else:
                    g_src[:, :ncols].index_add_(0, idx, g.to(g_src.dtype))
            else:
                w = student.weight[:ncols]
                if need_src:
                    gh = g.to(w.dtype) @ w
                    if rows is None:
                        g_src[idx] += gh.to(g_src.dtype)
                    else:
                        g_src.index_add_(0, idx, gh.to(g_src.dtype))
                    del gh
                if g_w is not None:
                    g_w[:ncols].addmm_(g.t(), src[idx].to(acc_dtype))
                if g_b is not None:
                    g_b[:ncols] += g.sum(0)
        del g
    if int(bad_s):
        raise ValueError(
            f"{cfg.student_name} has non-finite values (NaN or inf) in {int(bad_s)} of the rows the "
            "loss uses; losses refuse non-finite logits instead of returning NaN"
        )
    if int(bad_t):
        raise ValueError(
            f"{cfg.teacher_name} has non-finite values (NaN or inf) in {int(bad_t)} of the rows the "
            "loss uses; losses refuse non-finite logits instead of returning NaN"
        )
    if g_w is not None:
        g_w = g_w.to(student.weight.dtype)
    if g_b is not None:
        g_b = g_b.to(student.bias.dtype)
    return total, div_all, ce_all, g_src, g_w, g_b


class _ChunkedTerms(torch.autograd.Function):
    """``total = sum_r div_coef[r] * D_r + ce_coef[r] * CE_r`` computed chunk by chunk.

    Inputs are (student src, weight, bias, teacher src, weight, bias); the remaining
    arguments are constants. Outputs ``(total, per-row D, per-row CE)``; only ``total`` is
    differentiable, and its gradient was computed in forward. Backward hands that gradient
    over (scaled in place), so it can run only once per forward (no ``retain_graph``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, s_src, s_w, s_b, t_src, t_w, t_b, rows, n_rows, div_coef, ce_target, ce_coef, cfg, need
    ):
        student = _Side(s_src, s_w, s_b)
        teacher = None if t_src is None else _Side(t_src, t_w, t_b)
        total, div_all, ce_all, g_src, g_w, g_b = _run(
            student, teacher, rows, n_rows, div_coef, ce_target, ce_coef, cfg, need
        )
        ctx.grads = (g_src, g_w, g_b)
        ctx.mark_non_differentiable(div_all, ce_all)
        return total, div_all, ce_all

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_total, _g_div, _g_ce):  # type: ignore[override]
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "backward through a chunked/fused loss ran twice; its gradient was computed once in "
                "forward and handed over on the first backward (recompute the loss instead of retain_graph)"
            )
        # hand the buffers over (no copy: AccumulateGrad can steal them into ``.grad``), scaled
        # in place by the upstream gradient (e.g. 1 / accumulation steps)
        ctx.grads = None
        if not bool(g_total == 1):
            for g in grads:
                if g is not None:
                    g.mul_(g_total.to(g.dtype))
        g_src, g_w, g_b = grads
        return g_src, g_w, g_b, None, None, None, None, None, None, None, None, None, None


def run_terms(
    student: tuple[Tensor, Tensor | None, Tensor | None],
    teacher: tuple[Tensor, Tensor | None, Tensor | None] | None,
    rows: Tensor | None,
    n_rows: int,
    *,
    div_coef: Tensor | None,
    ce_target: Tensor | None,
    ce_coef: Tensor | None,
    kind: str,
    temperature: float,
    beta: float,
    alpha: float,
    vocab: int,
    chunk_size: int | None,
    student_name: str = "student_logits",
    teacher_name: str = "teacher_logits",
) -> tuple[Tensor, Tensor, Tensor]:
    """Internal entry point shared by the chunked and fused APIs (inputs already validated).

    ``student``/``teacher`` are ``(src, weight, bias)``: ``weight is None`` means ``src`` holds
    logits ``[N, V]``, otherwise hidden states ``[N, H]`` for the LM head ``weight [V, H]``.
    ``rows`` indexes ``src`` (``None`` = the first ``n_rows`` rows in order).
    """
    s_src, s_w, s_b = student
    t_src, t_w, t_b = teacher if teacher is not None else (None, None, None)
    has_div = div_coef is not None and teacher is not None
    has_ce = ce_target is not None
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and s_src.requires_grad,
        grad_on and s_w is not None and s_w.requires_grad,
        grad_on and s_b is not None and s_b.requires_grad,
    )
    n_cols = s_w.shape[0] if s_w is not None else s_src.shape[-1]
    cfg = _Config(
        kind=kind, temperature=float(temperature), beta=float(beta), alpha=float(alpha), vocab=vocab,
        chunk_size=resolve_chunk_size(chunk_size, n_cols), has_div=has_div, has_ce=has_ce,
        student_name=student_name, teacher_name=teacher_name,
    )
    t_args = (None, None, None) if not has_div else (t_src.detach(), _det(t_w), _det(t_b))
    return _ChunkedTerms.apply(
        s_src, s_w, s_b, *t_args, rows, n_rows, div_coef, ce_target, ce_coef, cfg, need
    )


def _det(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach()


# --------------------------------------------------------------------------- public: rows


def _normalizer(n_default: int, normalizer: int | float | Tensor | None, device: torch.device) -> Tensor:
    mask = torch.ones(n_default, dtype=torch.bool, device=device)
    return resolve_count(mask, normalizer)


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
    s, t = check_logit_pair(student_rows, teacher_rows, lead=1, vocab_size=vocab_size, check_values=False)
    R = s.shape[0]
    if row_weights is None:
        w = torch.ones(R, dtype=compute_dtype(s), device=s.device)
    else:
        w = _check_weights("row_weights", row_weights, R).to(compute_dtype(s))
    resolve_chunk_size(chunk_size, s.shape[1])
    total, _, _ = run_terms(
        (student_rows, None, None), (teacher_rows, None, None), None, R,
        div_coef=w, ce_target=None, ce_coef=None, kind=kind, temperature=temperature, beta=beta,
        alpha=alpha, vocab=s.shape[1], chunk_size=chunk_size,
        student_name="student_rows", teacher_name="teacher_rows",
    )
    return total / _normalizer(R, normalizer, s.device)


def _check_weights(name: str, weights: Tensor, n: int) -> Tensor:
    check_tensor(name, weights, ndim=1)
    check_float(name, weights)
    if weights.shape[0] != n:
        raise ValueError(f"{name} must have one entry per row ({n}), got shape {tuple(weights.shape)}")
    w = weights.detach()
    check_finite(name, w)
    if bool((w < 0).any()):
        raise ValueError(f"{name} must be >= 0, got {int((w < 0).sum())} negative value(s)")
    return w


# --------------------------------------------------------------------------- Align-TI planning


@dataclass
class Plan:
    """Which flattened rows the Align-TI terms need, with per-row coefficients.

    ``rows`` index the flattened ``[B * L]`` positions of the (possibly expanded) logits.
    ``div_coef[r]`` is the coefficient of ``D_r`` in the weighted total and ``ce_coef[r]``
    that of the cross-entropy (``ce_target[r] = -1``: none). ``parts`` maps each enabled
    part to ``(kind, coef)`` with ``kind`` ``"div"`` or ``"ce"`` and the part's own,
    unweighted coefficients (so ``part = sum coef * value``).
    """

    rows: Tensor
    div_coef: Tensor | None
    ce_target: Tensor | None
    ce_coef: Tensor | None
    parts: dict[str, tuple[str, Tensor]]


def check_labels(labels: Tensor, batch: int, seq: int, vocab: int, ignore_index: int) -> Tensor:
    """Validate ``labels [B, T]`` and return the aligned targets (``shift_labels``)."""
    check_tensor("labels", labels, ndim=2)
    check_integer("labels", labels)
    if tuple(labels.shape) != (batch, seq):
        raise ValueError(f"labels must have shape {(batch, seq)} (batch, ground-truth seq), got {tuple(labels.shape)}")
    target = shift_labels(labels, ignore_index)
    valid = target != ignore_index
    tv = target[valid]
    if tv.numel() and (int(tv.min()) < 0 or int(tv.max()) >= vocab):
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, "
            f"got values in [{int(tv.min())}, {int(tv.max())}]"
        )
    return target


def plan_align_ti(
    *,
    batch: int,
    length: int,
    labels: Tensor,
    student_vocab: int,
    weights: dict[str, float],
    ignore_index: int,
    expansion: TPAExpansion | None,
    visual_weights: Tensor | None,
    num_items: int | float | Tensor | None,
    num_sequences: int | float | Tensor | None,
    device: torch.device,
) -> Plan:
    """Build the per-row coefficients of ``w_sft SFT + w_kd KD + w_iva IVA + w_tpa TPA``.

    ``length`` is the logits' sequence length: ``T`` without an expansion, ``T2`` with one
    (the ground truth is then the first ``T`` slots). Normalisers follow the core losses:
    sft/kd/tpa divide by ``max(num_items or #positions, 1)``, iva by ``max(num_sequences or B, 1)``.
    """
    if expansion is not None:
        if tuple(expansion.input_ids.shape) != (batch, length):
            raise ValueError(
                f"the logits must cover the expanded sequence {tuple(expansion.input_ids.shape)} in their "
                f"first two dimensions, got {(batch, length)}"
            )
        T = expansion.seq_len
    else:
        T = length
    target = check_labels(labels, batch, T, student_vocab, ignore_index)
    valid = target != ignore_index  # [B, T]
    N = batch * length
    cdt = torch.float32
    dense_div: dict[str, Tensor] = {}
    dense_ce: Tensor | None = None
    gt_flat = (torch.arange(batch, device=device)[:, None] * length + torch.arange(T, device=device)).reshape(-1)

    def dense_gt(values: Tensor) -> Tensor:
        out = torch.zeros(N, dtype=cdt, device=device)
        out[gt_flat] = values.reshape(-1).to(cdt)
        return out

    if weights.get("sft", 0.0) > 0 or weights.get("kd", 0.0) > 0:
        inv = 1.0 / resolve_count(valid, num_items)
        per = valid.to(cdt) * inv
        if weights.get("kd", 0.0) > 0:
            dense_div["kd"] = dense_gt(per)
        if weights.get("sft", 0.0) > 0:
            dense_ce = dense_gt(per)
    if weights.get("iva", 0.0) > 0:
        vw = visual_weights
        check_tensor("visual_weights", vw, ndim=2)
        check_float("visual_weights", vw)
        if tuple(vw.shape) != (batch, T):
            raise ValueError(f"visual_weights must have shape {(batch, T)} (batch, ground-truth seq), got {tuple(vw.shape)}")
        w = vw.detach().to(cdt)
        check_finite("visual_weights", w)
        if bool((w < 0).any()):
            raise ValueError(f"visual_weights must be >= 0, got {int((w < 0).sum())} negative value(s)")
        n = batch if num_sequences is None else num_sequences
        denom = resolve_count(torch.ones(batch, dtype=torch.bool, device=device), n)
        dense_div["iva"] = dense_gt(w / denom)
    if weights.get("tpa", 0.0) > 0:
        if expansion is None:
            raise ValueError("expansion is required when tpa > 0 (the TPAExpansion both forwards ran on), got None")
        b, _, _, slot = expansion.candidate_slots()
        inv = 1.0 / resolve_count(expansion.candidate_mask, num_items)
        out = torch.zeros(N, dtype=cdt, device=device)
        out.index_put_((b.to(device) * length + slot.to(device),), (inv / expansion.num_candidates).expand(b.shape[0]).to(cdt), accumulate=True)
        dense_div["tpa"] = out
    need = torch.zeros(N, dtype=torch.bool, device=device)
    div_total = None
    for name, vec in dense_div.items():
        need |= vec != 0
        div_total = weights[name] * vec if div_total is None else div_total + weights[name] * vec
    ce_target_dense = None
    if dense_ce is not None:
        need |= dense_ce != 0
        ce_target_dense = torch.full((N,), -1, dtype=torch.long, device=device)
        ce_target_dense[gt_flat] = torch.where(valid, target, torch.full_like(target, -1)).reshape(-1).long()
    rows = need.nonzero().reshape(-1)
    parts: dict[str, tuple[str, Tensor]] = {}
    if dense_ce is not None:
        parts["sft"] = ("ce", dense_ce[rows])
    for name, vec in dense_div.items():
        parts[name] = ("div", vec[rows])
    return Plan(
        rows=rows,
        div_coef=None if div_total is None else div_total[rows],
        ce_target=None if ce_target_dense is None else ce_target_dense[rows],
        ce_coef=None if dense_ce is None else weights["sft"] * dense_ce[rows],
        parts=parts,
    )


def parts_from_rows(plan: Plan, div_all: Tensor, ce_all: Tensor) -> dict[str, Tensor]:
    """Each part's (unweighted, detached) value from the per-row values of one pass."""
    out: dict[str, Tensor] = {}
    for name, (which, coef) in plan.parts.items():
        values = div_all if which == "div" else ce_all
        out[name] = (coef.to(values.dtype) * values).sum().detach()
    return out


_ORDER = ("sft", "kd", "iva", "tpa")


def _ordered(parts: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: parts[k] for k in _ORDER if k in parts}


# --------------------------------------------------------------------------- public: logits


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2])


def chunked_align_ti_terms(
    student_logits: Float[Tensor, "batch len vocab"],
    teacher_logits: Float[Tensor, "batch len tvocab"] | None,
    labels: Int[Tensor, "batch seq"],
    *,
    sft: float = 1.0,
    kd: float = 1.0,
    iva: float = 1.0,
    tpa: float = 1.0,
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
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """``w_sft SFT + w_kd KD + w_iva IVA + w_tpa TPA`` (paper Eq. 8) in one chunked pass.

    Same semantics as :class:`tokinteract.AlignTILoss` (``student_logits`` are ``[B, T, V]``
    on the ground truth, or ``[B, T2, V]`` over the TPA expansion whose first ``T`` slots are
    the ground truth), but every row the enabled parts need (response positions, positions
    with a non-zero visual weight, candidate slots) is visited once, with the per-row
    coefficient ``w_kd/n_kd + w_iva * v_{b,t}/n_seq + w_tpa/(d * n_tpa)`` on ``D`` and
    ``w_sft/n_kd`` on the cross-entropy, so a row shared by several parts costs one softmax.

    Returns:
        ``(total, parts)``; ``parts`` maps each enabled part to its detached, unweighted value.
    """
    weights = {"sft": float(sft), "kd": float(kd), "iva": float(iva), "tpa": float(tpa)}
    for name, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
    if not any(w > 0 for w in weights.values()):
        raise ValueError("every part has weight 0; enable at least one of sft, kd, iva, tpa")
    check_divergence_options(kind, temperature, beta, alpha)
    check_tensor("student_logits", student_logits, ndim=3)
    check_float("student_logits", student_logits)
    needs_teacher = [k for k in ("kd", "iva", "tpa") if weights[k] > 0]
    if teacher_logits is None and needs_teacher:
        raise ValueError(f"teacher_logits is required when {needs_teacher} have non-zero weight, got None")
    if weights["tpa"] > 0 and expansion is None:
        raise ValueError("expansion is required when tpa > 0 (the TPAExpansion both forwards ran on), got None")
    if weights["iva"] > 0 and visual_weights is None:
        raise ValueError("visual_weights is required when iva > 0, got None")
    if expansion is not None and not isinstance(expansion, TPAExpansion):
        raise TypeError(f"expansion must be a TPAExpansion, got {type(expansion).__name__}")
    B, L, V = student_logits.shape
    vocab = V
    if teacher_logits is not None and needs_teacher:
        s, _ = check_logit_pair(student_logits, teacher_logits, lead=2, vocab_size=vocab_size, check_values=False)
        vocab = s.shape[-1]
    plan = plan_align_ti(
        batch=B, length=L, labels=labels, student_vocab=V, weights=weights, ignore_index=ignore_index,
        expansion=expansion, visual_weights=visual_weights, num_items=num_items,
        num_sequences=num_sequences, device=student_logits.device,
    )
    teacher = None if not needs_teacher else (_flat(teacher_logits), None, None)
    total, div_all, ce_all = run_terms(
        (_flat(student_logits), None, None), teacher, plan.rows, int(plan.rows.shape[0]),
        div_coef=plan.div_coef if needs_teacher else None, ce_target=plan.ce_target, ce_coef=plan.ce_coef,
        kind=kind, temperature=temperature, beta=beta, alpha=alpha, vocab=vocab, chunk_size=chunk_size,
    )
    return total, _ordered(parts_from_rows(plan, div_all, ce_all))


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
    check_tensor("student_logits", student_logits, ndim=3)
    check_tensor("weights", weights, ndim=2)
    check_leading_shape("weights", weights, "student_logits", student_logits, 2)
    B, T = weights.shape
    labels = torch.full((B, T), -100, dtype=torch.long, device=student_logits.device)
    total, _ = chunked_align_ti_terms(
        student_logits, teacher_logits, labels, sft=0.0, kd=0.0, iva=1.0, tpa=0.0,
        visual_weights=weights, kind=kind, temperature=temperature, beta=beta, alpha=alpha,
        vocab_size=vocab_size, num_sequences=num_sequences, chunk_size=chunk_size,
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
    if not isinstance(expansion, TPAExpansion):
        raise TypeError(f"expansion must be a TPAExpansion, got {type(expansion).__name__}")
    B, T = expansion.candidate_mask.shape
    labels = torch.full((B, T), -100, dtype=torch.long, device=expansion.candidate_mask.device)
    total, _ = chunked_align_ti_terms(
        student_logits, teacher_logits, labels, sft=0.0, kd=0.0, iva=0.0, tpa=1.0, expansion=expansion,
        kind=kind, temperature=temperature, beta=beta, alpha=alpha, vocab_size=vocab_size,
        num_items=num_items, chunk_size=chunk_size,
    )
    return total


class ChunkedAlignTILoss(AlignTILoss):
    """:class:`tokinteract.AlignTILoss` computed by :func:`chunked_align_ti_terms`.

    Same constructor (plus ``chunk_size``) and the same ``forward`` contract; the result
    equals :class:`tokinteract.AlignTILoss` in value and gradient.
    """

    def __init__(self, *, chunk_size: int | None = None, **kwargs: float | int | str | None) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, minimum=1)
        self.chunk_size = chunk_size

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
        """Return ``(total, parts)`` like :meth:`tokinteract.AlignTILoss.forward`."""
        return chunked_align_ti_terms(
            student_logits, teacher_logits, labels, **self.weights, expansion=expansion,
            visual_weights=visual_weights, kind=self.kind, temperature=self.temperature, beta=self.beta,
            alpha=self.alpha, vocab_size=self.vocab_size, ignore_index=self.ignore_index,
            num_items=num_items, num_sequences=num_sequences, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"

