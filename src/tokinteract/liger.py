"""Optional Liger-Kernel backend for the fused divergences (off by default).

Liger-Kernel's ``LigerFusedLinearJSDLoss`` (``liger_kernel.chunked_loss``, the path TRL's
GKD trainer uses) fuses the LM head with a generalized JSD, chunk by chunk, like
:mod:`tokinteract.fused`. This module runs uniform-weight rows through its autograd function
``LigerFusedLinearJSDFunction`` and reduces the result by the project's convention
(:func:`tokinteract.reduction.resolve_count`)::

    loss = sum_r D(S_r, T_r) / max(num_items or rows, 1)
    S_r = softmax((h_s[r] @ W_s.T + b_s) / tau),  T_r = softmax((h_t[r] @ W_t.T + b_t) / tau)

with ``D`` one of

* ``"fkl"``: ``KL(T || S)`` (Liger ``beta = 0``);
* ``"rkl"``: ``KL(S || T)`` (Liger ``beta = 1``);
* ``"jsd"``: ``beta * KL(T || M) + (1 - beta) * KL(S || M)``, ``M = beta * T + (1 - beta) * S``
  (Liger's ``beta`` is the same number: its mixture is ``log(1 - beta) + log S`` and
  ``log(beta) + log T``), exactly :func:`tokinteract.token_divergence` with ``kind="jsd"``.

No ``tau**2`` factor, the teacher is a constant, gradients flow to the student's hidden rows,
head weight and bias. The other kinds (``skew_fkl``, ``skew_rkl``, ``tvd``) are not in Liger
and raise ``ValueError``.

**Precision.** Liger computes each chunk's logits in the input dtype (bf16 stays bf16:
``hidden @ weight.T``, then ``+= bias``). Plain Liger then also computes the log-softmaxes and
the divergence in that dtype; here Liger's per-chunk loss hook ``distillation_loss_fn`` is overridden to upcast
both chunks to fp32 and divide them by ``tau`` there before Liger's own formula, so
everything after the logits is fp32, as in the rest of tokinteract. Liger accumulates the
weight and bias gradients across chunks in the parameters' dtype. fp32 inputs agree with
:mod:`tokinteract.fused` to rounding; bf16 inputs agree within bf16 tolerance (the tolerances
and the measured errors are in ``tests/test_liger.py`` and the CHANGELOG).

Other differences from :mod:`tokinteract.fused`, all Liger's own behaviour:

* **chunks**: Liger splits the rows into ``max(1, rows // chunk_size)`` near-equal chunks
  (so a chunk may hold up to ``2 * chunk_size - 1`` rows);
* **memory**: each call allocates and returns its own ``[V, H]`` weight gradient (and the
  ``[rows, H]`` hidden gradient); in :func:`tokinteract.fused.fused_align_ti_terms` KD and TPA
  are one call each (each is a uniform-row part of the plan, see :mod:`tokinteract._plan`),
  added by autograd to the gradient of tokinteract's own SFT/IVA pass;
* ``compiled=True`` (Liger's default) wraps each chunk's step in ``torch.compile``; the first
  call compiles (tens of seconds on a CPU) and a new row count may recompile.

Liger is an optional dependency: ``pip install "tokinteract[liger]"``. Its ``chunked_loss``
package is pure PyTorch; on a machine without Triton install it with
``pip install --no-deps liger-kernel`` (the package itself pulls in Triton).
"""

from __future__ import annotations

import inspect
from typing import Any, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor

from tokinteract import compat
from tokinteract._checks import Deferred, check_lm_head, check_positive, check_tensor, check_unit_interval, shared_vocab
from tokinteract._engine import resolve_chunk_size
from tokinteract.reduction import compute_dtype, resolve_count

__all__ = ["LIGER_KINDS", "check_liger_kind", "liger_available", "liger_linear_divergence", "liger_row_sum", "load"]

LIGER_KINDS = ("fkl", "rkl", "jsd")
"""The divergence kinds Liger-Kernel's fused JSD loss computes."""

_INSTALL = (
    'pip install "tokinteract[liger]" (on a machine without Triton, e.g. CPU only: '
    "pip install --no-deps liger-kernel)"
)


def liger_available() -> bool:
    """Whether ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` can be imported."""
    try:
        load()
    except ImportError:
        return False
    return True


_FUNCTIONS: dict[float, Any] = {}


def load() -> Any:
    """``LigerFusedLinearJSDFunction`` (behind ``LigerFusedLinearJSDLoss``), imported on first use.

    ``ImportError`` saying how to install Liger-Kernel when it cannot be imported.
    """
    try:
        return compat.liger_fused_linear_jsd_function()
    except ImportError as exc:
        raise ImportError(
            f"the liger backend needs Liger-Kernel (liger_kernel.chunked_loss), which could not be "
            f"imported ({exc}); install it with {_INSTALL}"
        ) from exc


def _function(temperature: float) -> Any:
    """Liger's fused JSD function with the divergence in fp32 at ``temperature`` (cached per value).

    A subclass of ``LigerFusedLinearJSDFunction`` whose ``distillation_loss_fn`` (Liger's hook
    for the per-chunk loss) upcasts both chunks of logits to fp32 and divides them by
    ``temperature`` there, before Liger's own formula; Liger itself is called with
    temperature 1, so no division happens in the input dtype. This is tokinteract's
    convention (logits in the input dtype, everything after them in fp32).
    """
    if temperature not in _FUNCTIONS:
        liger_function = load()
        base = liger_function.distillation_loss_fn
        tau = float(temperature)

        @no_type_check  # traced by torch.compile inside Liger: keep it a plain function
        def fp32_loss(s: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return base(s.float() / tau, t.float() / tau, *args, **kwargs)

        _FUNCTIONS[tau] = type(
            "LigerFusedLinearJSDFunctionFP32", (liger_function,), {"distillation_loss_fn": staticmethod(fp32_loss)}
        )
    return _FUNCTIONS[temperature]


def check_liger_kind(kind: str, beta: float) -> float:
    """Liger's ``beta`` for ``kind`` (``fkl`` -> 0, ``rkl`` -> 1, ``jsd`` -> ``beta``); ValueError otherwise."""
    if kind not in LIGER_KINDS:
        raise ValueError(
            f"kind must be one of {LIGER_KINDS} with the liger backend (Liger-Kernel's fused JSD "
            f"loss computes only these), got {kind!r}"
        )
    if kind == "fkl":
        return 0.0
    if kind == "rkl":
        return 1.0
    return float(beta)


def _check_same_dtype(student_hidden: Tensor, teacher_hidden: Tensor) -> None:
    """Liger mixes both models' logits in one expression: their dtypes must agree."""
    if student_hidden.dtype != teacher_hidden.dtype:
        raise TypeError(
            f"student_hidden ({student_hidden.dtype}) and teacher_hidden ({teacher_hidden.dtype}) must have the "
            "same dtype with the liger backend"
        )


def _forward_params(function: Any) -> list[str]:
    """The parameter names of Liger's ``forward`` after ``ctx``, checked against what we pass."""
    names = list(inspect.signature(function.forward).parameters)[1:]  # drop ctx (cls is bound)
    known = {
        "student_input", "student_weight", "teacher_input", "teacher_weight", "true_labels", "student_bias",
        "teacher_bias", "weight_hard_loss", "weight_soft_loss", "beta", "ignore_index", "temperature",
        "compiled", "chunk_size", "return_soft_hard_loss",
    }
    if not set(names) <= known or not {"student_input", "true_labels", "beta", "temperature"} <= set(names):
        raise ImportError(
            f"this Liger-Kernel version's LigerFusedLinearJSDFunction.forward{tuple(names)} is not the one "
            f"tokinteract supports (tested with liger-kernel 0.8.5); install it with {_INSTALL}"
        )
    return names


def liger_row_sum(
    student: tuple[Tensor, Tensor, Tensor | None],
    teacher: tuple[Tensor, Tensor, Tensor | None],
    *,
    kind: str,
    temperature: float,
    beta: float,
    vocab: int,
    chunk_size: int | None,
    compiled: bool,
    checks: Deferred,
) -> Tensor:
    """``sum_r D_r`` over every row of ``student``/``teacher`` ``(hidden_rows, weight, bias)`` via Liger.

    The Liger evaluator of :mod:`tokinteract._plan` (inputs already validated, ``vocab`` the
    shared prefix). Liger returns the mean over the rows (its count clamped to >= 1);
    multiplying by ``max(rows, 1)`` gives the sum, which the callers scale by their own
    coefficient. A non-finite result is reported through ``checks``.
    """
    _check_same_dtype(student[0], teacher[0])
    function = _function(float(temperature))
    s_h, s_w, s_b = student
    t_h, t_w, t_b = teacher
    n = int(s_h.shape[0])

    def prefix(x: Tensor | None) -> Tensor | None:
        return x if x is None or x.shape[0] == vocab else x[:vocab]

    args = dict(
        student_input=s_h, student_weight=prefix(s_w), teacher_input=t_h.detach(),
        teacher_weight=prefix(t_w).detach(),
        true_labels=torch.zeros(n, dtype=torch.long, device=s_h.device),  # every row counts (none is ignore_index)
        student_bias=prefix(s_b), teacher_bias=None if t_b is None else prefix(t_b).detach(),
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=check_liger_kind(kind, beta), ignore_index=-100,
        temperature=1.0, compiled=bool(compiled) and n > 0,  # the temperature is applied in fp32 by _function
        chunk_size=resolve_chunk_size(chunk_size, vocab), return_soft_hard_loss=False,
    )
    # Function.apply takes positional arguments only (Liger's forward is a classmethod): order
    # them by the names of Liger's signature, so a reordering between versions cannot mix them up
    mean = function.apply(*[args[name] for name in _forward_params(function)])
    total = mean.to(compute_dtype(s_w)) * max(n, 1)
    checks.add(
        lambda: (~torch.isfinite(total.detach())).sum(),
        lambda _: (
            f"the liger backend produced a non-finite loss ({float(total.detach())}) over {n} rows: the "
            "hidden states, LM-head weights or biases hold NaN/inf (or the logits overflow); losses refuse "
            "non-finite values instead of returning NaN"
        ),
    )
    return total


def liger_linear_divergence(
    student_hidden: Float[Tensor, "rows hidden"],
    student_weight: Float[Tensor, "vocab hidden"],
    teacher_hidden: Float[Tensor, "rows feat"],
    teacher_weight: Float[Tensor, "tvocab feat"],
    *,
    student_bias: Float[Tensor, "vocab"] | None = None,
    teacher_bias: Float[Tensor, "tvocab"] | None = None,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    vocab_size: int | None = None,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    compiled: bool = True,
) -> Float[Tensor, ""]:
    """Mean divergence of ``hidden @ weight.T + bias`` rows through Liger-Kernel's fused JSD loss.

        loss = sum_r D(S_r, T_r) / max(num_items or rows, 1)
        S_r = softmax((h_s[r] @ W_s.T + b_s) / tau),  T_r = softmax((h_t[r] @ W_t.T + b_t) / tau)

    ``D`` is ``KL(T || S)`` for ``"fkl"``, ``KL(S || T)`` for ``"rkl"`` and the generalized JSD
    ``beta KL(T || M) + (1 - beta) KL(S || M)``, ``M = beta T + (1 - beta) S``, for ``"jsd"``
    (see the module docstring for the mapping to Liger's ``beta``); no ``tau**2``. Equal to
    :func:`tokinteract.fused.fused_linear_divergence` without ``row_weights`` and with
    ``normalizer=num_items``, within fp32 rounding (fp32 inputs) or bf16 tolerance (bf16
    inputs: Liger computes in the input dtype). Gradients flow to ``student_hidden``,
    ``student_weight`` and ``student_bias``; the teacher is a constant.

    Args:
        student_hidden: ``[rows, H]`` input of the student's LM head (only the rows to score).
        student_weight: ``[V, H]`` the student's LM head (the embedding when tied).
        teacher_hidden: ``[rows, H_t]`` input of the teacher's LM head.
        teacher_weight: ``[V_t, H_t]``.
        student_bias: optional ``[V]`` bias of the student's LM head.
        teacher_bias: optional ``[V_t]`` bias of the teacher's LM head.
        kind: ``"fkl"`` (default), ``"rkl"`` or ``"jsd"``.
        temperature: ``tau > 0``; both sides use ``softmax(logits / tau)``.
        beta: JSD mixing weight of the teacher, in [0, 1] (``"jsd"`` only).
        vocab_size: compare only the first ``vocab_size`` entries of both vocabularies.
        num_items: the denominator (e.g. a global count across ranks); default the number of rows.
        chunk_size: rows per Liger chunk; None = ``max(1, 2**24 // V)``.
        compiled: let Liger ``torch.compile`` its chunk step (Liger's default).

    Raises:
        ImportError: Liger-Kernel is not installed (``pip install "tokinteract[liger]"``).
    """
    check_liger_kind(kind, beta)
    check_positive("temperature", temperature)
    check_unit_interval("beta", beta, open_low=False, open_high=False)
    check_tensor("student_hidden", student_hidden, ndim=2)
    check_tensor("teacher_hidden", teacher_hidden, ndim=2)
    check_lm_head("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
    check_lm_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias)
    R = student_hidden.shape[0]
    if teacher_hidden.shape[0] != R:
        raise ValueError(f"teacher_hidden must have {R} rows like student_hidden, got shape {tuple(teacher_hidden.shape)}")
    _check_same_dtype(student_hidden, teacher_hidden)
    vocab = shared_vocab("student_weight", student_weight.shape[0], "teacher_weight", teacher_weight.shape[0], vocab_size)
    checks = Deferred()
    total = liger_row_sum(
        (student_hidden, student_weight, student_bias), (teacher_hidden, teacher_weight, teacher_bias),
        kind=kind, temperature=temperature, beta=beta, vocab=vocab, chunk_size=chunk_size, compiled=compiled,
        checks=checks,
    )
    checks.resolve()
    return total / resolve_count(torch.ones(R, dtype=torch.bool, device=student_hidden.device), num_items)
