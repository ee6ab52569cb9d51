"""Instruction-Relevance Score (paper Def. 3.1, Eq. 3; Appendix B.5).

For a layer ``l`` and ``N`` input pairs ``(x1_n, x2_n)`` (same image, two different
instructions), with ``alpha(x)`` the vectorised instruction-to-vision attention weights
(e.g. :func:`tokinteract.visual_importance` restricted to the visual tokens):

    IRS(l) = 1 - (1/N) sum_n cos(alpha_l(x1_n), alpha_l(x2_n))

A layer whose visual focus changes with the instruction scores high; ``l* = argmax IRS``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from tokinteract._checks import check_finite, check_float, check_tensor

__all__ = ["irs_score", "select_layer"]


def irs_score(
    alpha_a: Float[Tensor, "pairs feat"],
    alpha_b: Float[Tensor, "pairs feat"],
    *,
    eps: int | float = 1e-12,
) -> Float[Tensor, ""]:
    """``1 - mean_n cos(alpha_a[n], alpha_b[n])`` in fp32.

    The cosine is ``a.b / (max(|a|, eps) * max(|b|, eps))``: a zero vector has cosine 0 with
    anything (so it counts as maximally unrelated), and the score does not depend on the
    scale of a vector whose norm exceeds ``eps``.
    Identical pairs score exactly 0 (up to rounding).
    """
    check_tensor("alpha_a", alpha_a, ndim=2)
    check_tensor("alpha_b", alpha_b, ndim=2)
    check_float("alpha_a", alpha_a)
    check_float("alpha_b", alpha_b)
    if alpha_a.shape != alpha_b.shape:
        raise ValueError(f"alpha_b must have the shape of alpha_a {tuple(alpha_a.shape)}, got {tuple(alpha_b.shape)}")
    if alpha_a.shape[0] == 0:
        raise ValueError("alpha_a must hold at least one pair, got 0")
    a, b = alpha_a.float(), alpha_b.float()
    check_finite("alpha_a", a)
    check_finite("alpha_b", b)
    # normalise each vector first: clamping the *product* of the norms instead would shrink
    # the cosine of small-but-valid vectors (two norms of 1e-7 gave IRS 0.99 for a == b)
    a_hat = torch.nn.functional.normalize(a, dim=1, eps=eps)
    b_hat = torch.nn.functional.normalize(b, dim=1, eps=eps)
    cos = (a_hat * b_hat).sum(1)
    return 1.0 - cos.mean()


def select_layer(scores: Float[Tensor, "layers"]) -> int:
    """``l* = argmax_l IRS(l)`` (the first one on ties)."""
    check_tensor("scores", scores, ndim=1)
    check_float("scores", scores)
    if scores.shape[0] == 0:
        raise ValueError("scores must hold at least one layer, got 0")
    check_finite("scores", scores)
    return int(torch.argmax(scores))
