"""Shared hypothesis building blocks for the TPA tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


def padded_masks(draw: st.DrawFn, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A padding mask (left, right or none; every row keeps >= 1 real token) and a random
    candidate mask on real positions other than the last one: ``(attention_mask, candidate_mask)``."""
    side = draw(st.sampled_from(["left", "right", "none"]))
    am = torch.ones(B, T, dtype=torch.bool)
    cm = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        n = T if side == "none" else draw(st.integers(1, T))
        if side == "left":
            am[b, : T - n] = False
        elif side == "right":
            am[b, n:] = False
        for t in range(T - 1):
            if am[b, t]:
                cm[b, t] = draw(st.booleans())
    return am, cm
