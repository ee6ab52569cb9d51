"""The chunk loop shared by :mod:`tokinteract.chunked` and :mod:`tokinteract.fused` (private).

:func:`run_terms` computes ``total = sum_r div_coef[r] * D_r + ce_coef[r] * CE_r`` over rows of
logits (or of ``hidden @ weight.T + bias``), ``chunk_size`` rows at a time, with the gradient
accumulated in forward; see :mod:`tokinteract.chunked` for the memory model and the per-chunk
gradients. Inputs are validated by the callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokinteract._checks import check_finite, check_float, check_int, check_tensor
from tokinteract.divergence import divergence_from_logprobs
from tokinteract.reduction import compute_dtype, resolve_count

_AUTO_CHUNK_ELEMENTS = 2**24


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


def check_row_weights(name: str, weights: Tensor, n: int) -> Tensor:
    """``weights [n]``, float, finite and >= 0, detached."""
    check_tensor(name, weights, ndim=1)
    check_float(name, weights)
    if weights.shape[0] != n:
        raise ValueError(f"{name} must have one entry per row ({n}), got shape {tuple(weights.shape)}")
    w = weights.detach()
    check_finite(name, w)
    if bool((w < 0).any()):
        raise ValueError(f"{name} must be >= 0, got {int((w < 0).sum())} negative value(s)")
    return w


def mean_row_divergence(
    student: tuple[Tensor, Tensor | None, Tensor | None],
    teacher: tuple[Tensor, Tensor | None, Tensor | None],
    row_weights: Tensor | None,
    *,
    normalizer: int | float | Tensor | None,
    vocab: int,
    chunk_size: int | None,
    div_opts: dict[str, Any],
    student_name: str,
    teacher_name: str,
) -> Tensor:
    """``sum_r w_r * D_r / max(normalizer or rows, 1)`` over all rows of ``student``/``teacher``.

    ``w_r`` = ``row_weights`` (validated here) or 1; ``div_opts`` holds ``kind``,
    ``temperature``, ``beta`` and ``alpha``.
    """
    src, weight, _ = student
    n_rows = src.shape[0]
    cdt = compute_dtype(src if weight is None else weight)
    if row_weights is None:
        w = torch.ones(n_rows, dtype=cdt, device=src.device)
    else:
        w = check_row_weights("row_weights", row_weights, n_rows).to(cdt)
    total, _, _ = run_terms(
        student, teacher, None, n_rows, div_coef=w, ce_target=None, ce_coef=None, vocab=vocab,
        chunk_size=chunk_size, student_name=student_name, teacher_name=teacher_name, **div_opts,
    )
    count = resolve_count(torch.ones(n_rows, dtype=torch.bool, device=src.device), normalizer)
    return total / count
