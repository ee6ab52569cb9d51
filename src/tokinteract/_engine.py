"""The evaluators of ``total = sum_r div_coef[r] * D_r + ce_coef[r] * CE_r`` (private).

The rows and coefficients come from :mod:`tokinteract._plan`; ``D_r`` and its gradient from
:mod:`tokinteract.divergence`. Two evaluators, same signature and result:

* ``run_terms(..., eager=True)``: gathers the rows, computes their logits and lets autograd
  differentiate (the reference, and the ``backend="eager"`` path);
* ``run_terms(...)``: ``chunk_size`` rows at a time over logits or ``hidden @ weight.T + bias``,
  with the gradient accumulated in forward; see :mod:`tokinteract.chunked` for the memory model.

Inputs are validated by the callers; value checks (non-finite rows) go to a
:class:`tokinteract._checks.Deferred`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokinteract._checks import Deferred, check_int, check_weights, nonfinite_message
from tokinteract.divergence import canonical_kind, divergence_and_grad, divergence_rows
from tokinteract.reduction import compute_dtype, resolve_count

_AUTO_CHUNK_ELEMENTS = 2**24
_REUSE = True  # benchmarks only (bench_step.py's *_prev variants): False = a fresh buffer per chunk, no shared log_softmax


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
    validate: bool


@dataclass
class _Side:
    """Where one model's logits rows come from: a logits tensor, or hidden @ weight.T + bias."""

    src: Tensor  # [N, V] logits or [N, H] hidden
    weight: Tensor | None = None  # [V, H]
    bias: Tensor | None = None  # [V]

    def logits(self, idx: Tensor | slice, ncols: int, out: Tensor | None = None) -> Tensor:
        """The rows' logits (first ``ncols`` columns); from hidden states into ``out`` when it has
        the rows' dtype (the same ``mm``/``addmm`` that ``linear`` runs)."""
        rows = self.src[idx]
        if self.weight is None:
            return rows[:, :ncols]
        b = None if self.bias is None else self.bias[:ncols]
        if out is None or out.dtype != rows.dtype:
            return torch.nn.functional.linear(rows, self.weight[:ncols], b)
        w = self.weight[:ncols].t()
        return torch.mm(rows, w, out=out) if b is None else torch.addmm(b, rows, w, out=out)


class _Scratch:
    """The ``[chunk, cols]`` buffers of the chunk loop, allocated on first use and handed to every
    chunk (sliced to its rows). A fresh tensor per chunk would pay its page faults again each time
    (on CPU ~30 ms of a 110 x 151,936 fp32 buffer's ~40 ms first pass)."""

    def __init__(self, chunk: int, dtype: torch.dtype, device: torch.device) -> None:
        self.chunk, self.dtype, self.device = chunk, dtype, device
        self.n, self.cols = chunk, 0
        self._bufs: dict[tuple[str, int], Tensor] = {}

    def at(self, n: int, cols: int) -> "_Scratch":
        """Set the rows and columns that :meth:`__call__` hands out next."""
        self.n, self.cols = n, cols
        return self

    def __call__(self, name: str) -> Tensor | None:
        if not _REUSE:
            return None
        key = (name, self.cols)
        if key not in self._bufs:
            self._bufs[key] = torch.empty(self.chunk, self.cols, dtype=self.dtype, device=self.device)
        return self._bufs[key][: self.n]


def resolve_chunk_size(chunk_size: int | None, vocab: int) -> int:
    """``chunk_size`` validated, or the automatic choice ``max(1, 2**24 // vocab)``."""
    if chunk_size is None:
        return max(1, _AUTO_CHUNK_ELEMENTS // max(vocab, 1))
    return check_int("chunk_size", chunk_size, minimum=1)


def _bad_rows(x: Tensor) -> Tensor:
    """Number of rows holding a NaN or an inf (two reductions, no ``[rows, V]`` temporary)."""
    return (~(torch.isfinite(x.amax(-1)) & torch.isfinite(x.amin(-1)))).sum()


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loop over chunks; return total, per-row divergence, per-row CE, the non-finite row
    counts ``[student, teacher]`` and the gradients."""
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
    scratch = _Scratch(cfg.chunk_size, acc_dtype, dev)
    # CE and an fkl/rkl divergence over the same columns at temperature 1 share the student's log_softmax
    shared = (
        _REUSE and cfg.has_ce and cfg.has_div and cfg.temperature == 1.0 and n_student_cols == cfg.vocab
        and canonical_kind(cfg.kind, cfg.beta, cfg.alpha) in ("fkl", "rkl")
    )
    for start in range(0, n_rows, cfg.chunk_size):
        stop = min(start + cfg.chunk_size, n_rows)
        n = stop - start
        idx: Tensor | slice = slice(start, stop) if rows is None else rows[start:stop]
        x = student.logits(idx, n_student_cols, out=scratch.at(n, n_student_cols)("logits_s") if fused else None)
        x = x.to(acc_dtype)
        if cfg.validate:
            bad_s += _bad_rows(x)
        g = None
        lp_shared = None
        if cfg.has_ce:
            # cross-entropy at temperature 1 over the full student vocabulary
            tgt = ce_target[start:stop]
            has = tgt >= 0
            safe = tgt.clamp(min=0, max=x.shape[1] - 1)[:, None]  # out-of-range labels raise after the pass
            coef = ce_coef[start:stop]
            lp1 = torch.log_softmax(x, dim=-1, out=scratch.at(n, x.shape[1])("log_s" if shared else "ce"))
            ce = torch.where(has, -lp1.gather(1, safe)[:, 0], lp1.new_zeros(()))
            ce_all[start:stop] = ce
            total = total + (coef * ce).sum()
            if shared:
                lp_shared = lp1
                one_hot = torch.where(has, -coef, 0.0).to(lp1.dtype)[:, None]  # -ce_coef * onehot(target)
            elif need_grad:  # softmax(x) - onehot(target)
                g = lp1.exp_()
                g.scatter_add_(1, safe, torch.where(has, -1.0, 0.0).to(g.dtype)[:, None])
                g.mul_(coef[:, None])
            del lp1
        if cfg.has_div:
            t_out = scratch.at(n, cfg.vocab)("logits_t") if teacher.weight is not None else None
            y = teacher.logits(idx, cfg.vocab, out=t_out).to(acc_dtype)
            if cfg.validate:
                bad_t += _bad_rows(y)
            coef = div_coef[start:stop]
            d, gd = divergence_and_grad(
                x[:, : cfg.vocab] if lp_shared is None else lp_shared, y, kind=cfg.kind, temperature=cfg.temperature,
                beta=cfg.beta, alpha=cfg.alpha, need_grad=need_grad, coef=coef,
                softmax_coef=ce_coef[start:stop] if lp_shared is not None and need_grad else None,
                student_log_probs=lp_shared is not None, scratch=scratch.at(n, cfg.vocab),
            )
            del y, lp_shared
            div_all[start:stop] = d
            total = total + (coef * d).sum()
            if gd is not None:
                if shared:  # gd holds coef * dD/dz + ce_coef * softmax(x): add the CE's one-hot part
                    gd.scatter_add_(1, safe, one_hot)
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
                g = torch.zeros(n, ncols, dtype=acc_dtype, device=dev)
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
    if g_w is not None:
        g_w = g_w.to(student.weight.dtype)
    if g_b is not None:
        g_b = g_b.to(student.bias.dtype)
    return total, div_all, ce_all, torch.stack([bad_s, bad_t]), g_src, g_w, g_b


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
        total, div_all, ce_all, bad, g_src, g_w, g_b = _run(
            student, teacher, rows, n_rows, div_coef, ce_target, ce_coef, cfg, need
        )
        ctx.grads = (g_src, g_w, g_b)
        ctx.mark_non_differentiable(div_all, ce_all, bad)
        return total, div_all, ce_all, bad

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_total, _g_div, _g_ce, _g_bad):  # type: ignore[override]
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "backward through a chunked/fused loss ran twice; its gradient was computed once in "
                "forward and handed over on the first backward (recompute the loss instead of retain_graph)"
            )
        # hand the buffers over (no copy: AccumulateGrad can steal them into ``.grad``), scaled
        # in place by the upstream gradient (e.g. 1 / accumulation steps); always scaled, since
        # testing ``g_total == 1`` first would read the device
        ctx.grads = None
        for g in grads:
            if g is not None:
                g.mul_(g_total.to(g.dtype))
        g_src, g_w, g_b = grads
        return g_src, g_w, g_b, None, None, None, None, None, None, None, None, None, None


def _row_message(name: str) -> Callable[[int], str]:
    return lambda n: (
        f"{name} has non-finite values (NaN or inf) in {n} of the rows the loss uses; "
        "losses refuse non-finite logits instead of returning NaN"
    )


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
    checks: Deferred,
    student_name: str = "student_logits",
    teacher_name: str = "teacher_logits",
    eager: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The evaluator: ``(total, per-row D, per-row CE)``, ``chunk_size`` rows at a time, or every
    row at once through autograd with ``eager`` (:func:`_run_eager`, ``chunk_size`` ignored).

    ``student``/``teacher`` are ``(src, weight, bias)``: ``weight is None`` means ``src`` holds
    logits ``[N, V]``, otherwise hidden states ``[N, H]`` for the LM head ``weight [V, H]``.
    ``rows`` indexes ``src`` (``None`` = the first ``n_rows`` rows in order). ``vocab`` is the
    number of leading columns the divergence compares; the cross-entropy uses every column.
    """
    if eager:
        return _run_eager(
            student, teacher, rows, n_rows, div_coef, ce_target, ce_coef,
            dict(kind=kind, temperature=temperature, beta=beta, alpha=alpha), vocab, checks, student_name, teacher_name,
        )
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
        student_name=student_name, teacher_name=teacher_name, validate=checks.enabled,
    )
    t_args = (None, None, None) if not has_div else (t_src.detach(), _det(t_w), _det(t_b))
    total, div_all, ce_all, bad = _ChunkedTerms.apply(
        s_src, s_w, s_b, *t_args, rows, n_rows, div_coef, ce_target, ce_coef, cfg, need
    )
    checks.add(lambda: bad[0], _row_message(student_name))
    checks.add(lambda: bad[1], _row_message(teacher_name))
    return total, div_all, ce_all


def _run_eager(
    student: tuple[Tensor, Tensor | None, Tensor | None],
    teacher: tuple[Tensor, Tensor | None, Tensor | None] | None,
    rows: Tensor | None,
    n_rows: int,
    div_coef: Tensor | None,
    ce_target: Tensor | None,
    ce_coef: Tensor | None,
    opts: dict[str, Any],
    vocab: int,
    checks: Deferred,
    student_name: str,
    teacher_name: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The eager evaluator: :func:`run_terms`'s result with every row at once and autograd.

    The logits rows are computed in the compute dtype (fp32, or fp64 for fp64 inputs); the
    teacher is detached. ``opts`` holds ``kind``, ``temperature``, ``beta``, ``alpha``.
    """
    has_div = div_coef is not None and teacher is not None
    has_ce = ce_target is not None
    idx: Tensor | slice = slice(0, n_rows) if rows is None else rows
    x = _Side(*student).logits(idx, _columns(student) if has_ce else vocab)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    checks.add(lambda: (~torch.isfinite(x.detach())).sum(), lambda n: nonfinite_message(student_name, n, x.numel()))
    total = x.new_zeros(())
    div_all = ce_all = x.new_zeros(n_rows)
    if has_ce:
        lp = torch.log_softmax(x, dim=-1)
        has = ce_target >= 0
        safe = ce_target.clamp(min=0, max=x.shape[1] - 1)[:, None]  # out-of-range labels raise after the pass
        ce = torch.where(has, -lp.gather(1, safe)[:, 0], lp.new_zeros(()))
        total = total + (ce_coef.to(ce.dtype) * ce).sum()
        ce_all = ce.detach()
    if has_div:
        y = _Side(*teacher).logits(idx, vocab).detach()
        checks.add(lambda: (~torch.isfinite(y)).sum(), lambda n: nonfinite_message(teacher_name, n, y.numel()))
        d = divergence_rows(x[:, :vocab], y, **opts)
        total = total + (div_coef.to(d.dtype) * d).sum()
        div_all = d.detach()
    return total, div_all, ce_all


def _columns(side: tuple[Tensor, Tensor | None, Tensor | None]) -> int:
    src, weight, _ = side
    return src.shape[-1] if weight is None else weight.shape[0]


def _det(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach()


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
    ``temperature``, ``beta`` and ``alpha``. Value checks are resolved before returning.
    """
    src, weight, _ = student
    n_rows = src.shape[0]
    cdt = compute_dtype(src if weight is None else weight)
    checks = Deferred()
    if row_weights is None:
        w = torch.ones(n_rows, dtype=cdt, device=src.device)
    else:
        w = check_weights("row_weights", row_weights, (n_rows,), "rows", checks).to(cdt)
    total, _, _ = run_terms(
        student, teacher, None, n_rows, div_coef=w, ce_target=None, ce_coef=None, vocab=vocab,
        chunk_size=chunk_size, student_name=student_name, teacher_name=teacher_name, checks=checks, **div_opts,
    )
    checks.resolve()
    count = resolve_count(torch.ones(n_rows, dtype=torch.bool, device=src.device), normalizer)
    return total / count
