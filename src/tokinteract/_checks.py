"""Input validation shared by every public function.

Every check raises ``ValueError`` (bad value or shape) or ``TypeError`` (bad type) whose
message names the argument, what was expected and what was given. Nothing here uses
``assert``: checks must survive ``python -O``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

DIVERGENCE_KINDS = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")


def check_tensor(name: str, value: Any, *, ndim: int | tuple[int, ...] | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.ndim not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                f"got shape {tuple(value.shape)}"
            )
    return value


def check_float(name: str, value: Tensor) -> None:
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def check_bool(name: str, value: Tensor) -> None:
    if value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {value.dtype}")


def check_integer(name: str, value: Tensor) -> None:
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")


def check_finite(name: str, value: Tensor) -> None:
    bad = (~torch.isfinite(value.detach())).sum()
    n_bad = int(bad)
    if n_bad:
        raise ValueError(nonfinite_message(name, n_bad, value.numel()))


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_unit_interval(name: str, value: Any, *, open_low: bool, open_high: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (math.isfinite(value) and low_ok and high_ok):
        interval = ("(" if open_low else "[") + "0, 1" + (")" if open_high else "]")
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_leading_shape(
    name: str, value: Tensor, ref_name: str, ref: Tensor, ndim: int
) -> None:
    """``value.shape[:ndim]`` must equal ``ref.shape[:ndim]``."""
    if tuple(value.shape[:ndim]) != tuple(ref.shape[:ndim]):
        raise ValueError(
            f"{name} must match {ref_name} in its first {ndim} dimension(s) "
            f"{tuple(ref.shape[:ndim])}, got shape {tuple(value.shape)}"
        )


def resolve_vocab(
    student_logits: Tensor,
    teacher_logits: Tensor,
    vocab_size: int | None,
    *,
    student_name: str = "student_logits",
    teacher_name: str = "teacher_logits",
) -> tuple[Tensor, Tensor]:
    """Apply the vocabulary policy: equal sizes, or an explicit shared prefix ``vocab_size``.

    Qwen2.5-7B has 152,064 logits and Qwen2.5-0.5B 151,936; both only pad beyond the real
    tokenizer vocabulary, so comparing the first ``vocab_size`` entries is the usual policy.
    """
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    n = shared_vocab(student_name, vs, teacher_name, vt, vocab_size)
    if vocab_size is None:
        return student_logits, teacher_logits
    return student_logits[..., :n], teacher_logits[..., :n]


def shared_vocab(student_name: str, vs: int, teacher_name: str, vt: int, vocab_size: int | None) -> int:
    """The number of vocabulary entries compared: ``vs == vt``, or an explicit ``vocab_size <= min(vs, vt)``."""
    if vocab_size is None:
        if vs != vt:
            raise ValueError(
                f"{student_name} has vocabulary size {vs} but {teacher_name} has {vt}; "
                "pass vocab_size=N to compare only the shared first N entries"
            )
        return vs
    check_int("vocab_size", vocab_size, minimum=1)
    if vocab_size > min(vs, vt):
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the smaller vocabulary "
            f"({student_name}: {vs}, {teacher_name}: {vt})"
        )
    return vocab_size


def check_lm_head(
    hidden_name: str, hidden: Tensor, weight_name: str, weight: Tensor, bias_name: str, bias: Tensor | None
) -> None:
    """``hidden [..., H]`` and an LM head ``weight [V, H]`` (+ ``bias [V]``): float, same dtype and device."""
    check_tensor(weight_name, weight, ndim=2)
    check_float(hidden_name, hidden)
    check_float(weight_name, weight)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{hidden_name} has hidden size {hidden.shape[-1]} but {weight_name} expects "
            f"{weight.shape[1]} (weight is [vocab, hidden]), got {weight_name} shape {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{hidden_name} ({hidden.dtype}) and {weight_name} ({weight.dtype}) must have the same dtype")
    if hidden.device != weight.device:
        raise ValueError(f"{hidden_name} is on {hidden.device} but {weight_name} on {weight.device}")
    if bias is not None:
        check_tensor(bias_name, bias, ndim=1)
        check_float(bias_name, bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bias_name} must have {weight.shape[0]} entries (the vocabulary), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{bias_name} ({bias.dtype}) and {weight_name} ({weight.dtype}) must have the same dtype")
def check_logit_pair(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    lead: int,
    vocab_size: int | None,
    check_values: bool = True,
) -> tuple[Tensor, Tensor]:
    """Validate a student/teacher logits pair with ``lead`` leading dims before the vocab."""
    check_tensor("student_logits", student_logits, ndim=lead + 1)
    check_tensor("teacher_logits", teacher_logits, ndim=lead + 1)
    check_float("student_logits", student_logits)
    check_float("teacher_logits", teacher_logits)
    check_leading_shape("teacher_logits", teacher_logits, "student_logits", student_logits, lead)
    s, t = resolve_vocab(student_logits, teacher_logits, vocab_size)
    if check_values:
        check_finite("student_logits", s)
        check_finite("teacher_logits", t)
    return s, t


class Deferred:
    """Value checks of one call, resolved together with a single device-to-host read.

    A check is a count (a 0-d integer tensor, computed on the device, e.g. the number of
    non-finite entries) and a message built from it; :meth:`resolve` reads ``any(count != 0)``
    once and, only when some count is non-zero, raises the ``ValueError`` of the first such
    check. ``enabled=False`` (a loss built with ``validate=False``) records nothing: no count is
    computed and nothing is read back.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._items: list[tuple[Tensor, Callable[[int], str]]] = []

    def add(self, count: Callable[[], Tensor], message: Callable[[int], str]) -> None:
        """Record ``count()`` (not evaluated when disabled) and the message for a non-zero count."""
        if self.enabled:
            self._items.append((count(), message))

    def resolve(self) -> None:
        """Raise the first failed check's ``ValueError``; one device-to-host read when all pass."""
        items, self._items = self._items, []
        if not items:
            return
        dev = items[0][0].device
        counts = torch.stack([c.reshape(()).to(device=dev, dtype=torch.long) for c, _ in items])
        if not bool(counts.any()):
            return
        for n, (_, message) in zip(counts.tolist(), items):
            if n:
                raise ValueError(message(int(n)))


def check_weights(name: str, weights: Tensor, shape: tuple[int, ...], what: str, checks: Deferred) -> Tensor:
    """``weights`` of ``shape`` (``what`` names its dimensions), float and detached; that it is
    finite and >= 0 is checked through ``checks``."""
    check_tensor(name, weights, ndim=len(shape))
    check_float(name, weights)
    if tuple(weights.shape) != shape:
        if len(shape) == 1:
            raise ValueError(f"{name} must have one entry per row ({shape[0]}), got shape {tuple(weights.shape)}")
        raise ValueError(f"{name} must have shape {shape} ({what}), got {tuple(weights.shape)}")
    w = weights.detach()
    checks.add(lambda: (~torch.isfinite(w)).sum(), lambda n: nonfinite_message(name, n, w.numel()))
    checks.add(lambda: (w < 0).sum(), lambda n: f"{name} must be >= 0, got {n} negative value(s)")
    return w


def nonfinite_message(name: str, n: int, total: int) -> str:
    """The message for ``n`` non-finite values out of ``total`` in ``name``."""
    return (
        f"{name} has {n} non-finite value(s) (NaN or inf) out of {total}; "
        "tokinteract refuses non-finite inputs instead of returning NaN"
    )
