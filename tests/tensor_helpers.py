"""Small tensor helpers shared by the core tests (a uniquely named module: tests are not a package)."""

from __future__ import annotations

import torch


def seeded_randn(shape, seed, scale=1.0, dtype=torch.float32) -> torch.Tensor:
    """``scale * randn(shape)`` from its own generator, cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def grads(loss, xs):
    return torch.autograd.grad(loss, xs)


def close_all(got, want, **tol) -> None:
    """``assert_close`` pairwise, compared in float64."""
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), **tol)


def align_ti_batch(seed, batch, seq, vocab, *, d=3, l_pad=2, shared_row=False):
    """Ragged, right-padded labels (different supervised spans per row), their TPA expansion
    (``d`` candidates per supervised position) and non-uniform IVA weights on positions 1..3
    (and on supervised position 6 of row 0 with ``shared_row``, a row KD and IVA share)."""
    import tokinteract as ti

    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, vocab, (batch, seq), generator=g)
    lab[torch.rand(batch, seq, generator=g) < 0.3] = -100
    lab[:, :2] = -100
    lab[0, 5:] = -100  # a short row
    attn = torch.ones(batch, seq, dtype=torch.bool)
    attn[1, seq - l_pad :] = False  # right padding
    lab[~attn] = -100
    cm = ti.shift_labels(lab) != -100
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    cands = torch.randint(0, vocab, (batch, seq, d), generator=g)
    ex = ti.tpa_expand(ids, cands, cm, attn)
    vis = torch.zeros(batch, seq, dtype=torch.bool)
    vis[:, 1:4] = True
    if shared_row:
        vis[0, 6] = True
    vw = ti.uniform_visual_weights(vis) * (0.5 + torch.rand(batch, seq, generator=g))  # non-uniform IVA rows
    return lab, ex, vw


def hidden_and_heads(seed, batch, length, hidden, teacher_hidden, vocab, *, dtype=torch.float32, tvocab=None):
    """Student hidden states, LM-head weight and bias (with gradients) and the teacher's (without)."""
    tvocab = vocab if tvocab is None else tvocab
    hs = seeded_randn((batch, length, hidden), seed, dtype=dtype).requires_grad_()
    W = seeded_randn((vocab, hidden), seed + 1, dtype=dtype).requires_grad_()
    b = seeded_randn((vocab,), seed + 2, dtype=dtype).requires_grad_()
    ht = seeded_randn((batch, length, teacher_hidden), seed + 3, dtype=dtype)
    Wt = seeded_randn((tvocab, teacher_hidden), seed + 4, dtype=dtype)
    bt = seeded_randn((tvocab,), seed + 5, dtype=dtype)
    return hs, W, b, ht, Wt, bt
