"""IVA (Eq. 4): visual_importance weights and iva_loss against loop references."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokinteract as ti
from reference import REF_KINDS, ref_iva_loss, ref_uniform_visual_weights, ref_visual_importance


def _attn(B, H, Q, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, H, Q, K, generator=g) * 2, dim=-1)


def _masks(B, Q, K, seed, rows_subset):
    """Disjoint instruction / visual masks; with ``rows_subset`` the ``Q`` rows sit at sorted
    random positions (``query_positions``), else row ``u`` is position ``u``. The last position is
    an instruction token (so most samples have a row after their image; ``K == 1`` has none)."""
    g = torch.Generator().manual_seed(seed)
    vis = torch.rand(B, K, generator=g) < 0.5
    vis[0, 0] = True
    if K > 1:
        vis[:, -1] = False
    pos = None
    if rows_subset:
        pos = torch.stack([torch.sort(torch.randperm(K, generator=g)[:Q]).values for _ in range(B)])
        pos[:, -1] = K - 1
        pos = torch.stack([torch.sort(torch.unique(p, sorted=True).repeat(2)[:Q]).values for p in pos])
    at = torch.arange(Q).expand(B, Q) if pos is None else pos
    instr = (torch.rand(B, Q, generator=g) < 0.5) & ~vis.gather(1, at)
    if K > 1:
        instr[:, -1] = True
    return instr, vis, pos


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    K=st.integers(1, 9),
    rows_subset=st.booleans(),
    normalize=st.booleans(),
)
def test_visual_importance_matches_reference(seed, B, H, K, rows_subset, normalize):
    Q = max(1, K // 2) if rows_subset else K  # captured rows: a subset of queries
    a = _attn(B, H, Q, K, seed)
    instr, vis, pos = _masks(B, Q, K, seed + 1, rows_subset)
    rows = ti.instruction_rows(instr, vis, pos)
    at = torch.arange(Q).expand(B, Q) if pos is None else pos
    first = torch.where(vis.any(1), vis.float().argmax(1), K)
    assert torch.equal(rows, instr & (at > first[:, None]))  # the rule, written out
    missing = vis.any(1) & ~rows.any(1)
    if bool(missing.any()):  # an image and no instruction after it: no Eq. 4 weights
        with pytest.raises(ValueError, match=re.escape(f"samples {missing.nonzero().flatten().tolist()} ") + ".*no instruction token"):
            ti.visual_importance(a, instr, vis, normalize=normalize, query_positions=pos)
        return
    w = ti.visual_importance(a, instr, vis, normalize=normalize, query_positions=pos)
    assert w.dtype == torch.float32 and w.shape == (B, K)
    ref = ref_visual_importance(a, instr, vis, normalize=normalize, query_positions=pos)
    torch.testing.assert_close(w.double(), ref, atol=1e-6, rtol=1e-5)
    # head-averaged 3D input gives the same weights
    w3 = ti.visual_importance(a.mean(1), instr, vis, normalize=normalize, query_positions=pos)
    torch.testing.assert_close(w3, w, atol=1e-6, rtol=1e-5)
    assert torch.equal(w[~vis], torch.zeros_like(w[~vis]))
    if normalize:
        has = vis.any(1)
        torch.testing.assert_close(w[has].sum(1), torch.ones(int(has.sum())), atol=1e-5, rtol=0)


def test_instruction_rows_after_the_image_only():
    """A question before and after the image: only the copy after it are IVA's rows; under causal
    attention the rows before carry no attention to the image, so counting them would halve the
    weights (the mean's denominator), and a question only before the image is refused."""
    T = 8
    vis = torch.zeros(1, T, dtype=torch.bool)
    vis[0, 3:5] = True  # [q q sys | v v | q q answer]
    before = torch.zeros(1, T, dtype=torch.bool)
    before[0, 0:2] = True
    after = torch.zeros(1, T, dtype=torch.bool)
    after[0, 5:7] = True
    assert torch.equal(ti.instruction_rows(before | after, vis), after)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    g = torch.Generator().manual_seed(3)
    a = torch.softmax((torch.randn(1, 2, T, T, generator=g)).masked_fill(~causal, float("-inf")), -1)
    assert float(a[0, :, :2][..., vis[0]].abs().sum()) == 0.0  # rows before the image see no visual key
    w_both = ti.visual_importance(a, before | after, vis)
    w_after = ti.visual_importance(a, after, vis)
    torch.testing.assert_close(w_both, w_after, atol=0, rtol=0)
    by_hand = a[0].mean(0)[5:7, 3:5].mean(0)  # mean over heads and the two rows after the image
    torch.testing.assert_close(w_after[0, 3:5], by_hand)
    with pytest.raises(ValueError, match=r"samples \[0\] .*no instruction token after the first one"):
        ti.visual_importance(a, before, vis)
    # a text-only sample beside it: no visual token, no weights, no error
    vis2 = torch.cat([vis, torch.zeros_like(vis)])
    w2 = ti.visual_importance(a.expand(2, -1, -1, -1), torch.cat([after, before]), vis2)
    torch.testing.assert_close(w2[0], w_after[0], atol=0, rtol=0)
    assert torch.equal(w2[1], torch.zeros(T))
    # captured rows: the same rule through query_positions; required when Q != K
    pos = torch.tensor([[0, 1, 5, 6]])
    rows_a = a[:, :, pos[0]]
    w_cap = ti.visual_importance(rows_a, torch.ones(1, 4, dtype=torch.bool), vis, query_positions=pos)
    torch.testing.assert_close(w_cap, w_after, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="query_positions"):
        ti.visual_importance(rows_a, torch.ones(1, 4, dtype=torch.bool), vis)
    with pytest.raises((IndexError, RuntimeError)):  # a position outside the keys is an error, never clamped
        ti.instruction_rows(torch.ones(1, 4, dtype=torch.bool), vis, torch.tensor([[0, 1, 5, T]]))


def test_visual_importance_by_hand():
    # one head, 2 instruction rows, keys 0,1 visual
    a = torch.tensor([[[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]]])
    instr = torch.tensor([[False, True, True]])
    vis = torch.tensor([[True, True, False]])
    w = ti.visual_importance(a, instr, vis)
    torch.testing.assert_close(w, torch.tensor([[0.15, 0.4, 0.0]]))
    wn = ti.visual_importance(a, instr, vis, normalize=True)
    torch.testing.assert_close(wn, torch.tensor([[0.15 / 0.55, 0.4 / 0.55, 0.0]]))


def test_visual_importance_bf16_and_shape_errors():
    a = _attn(2, 2, 4, 4, 0)
    instr, vis, _ = _masks(2, 4, 4, 1, False)
    w = ti.visual_importance(a.bfloat16(), instr, vis)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), ref_visual_importance(a.bfloat16(), instr, vis), atol=1e-6, rtol=1e-5)
    with pytest.raises((ValueError, TypeError), match="instruction_mask|jaxtyping|Type-check"):
        ti.visual_importance(a, instr[:, :3], vis)


def test_uniform_weights():
    vis = torch.tensor([[True, False, True, True], [False, False, False, False]])
    w = ti.uniform_visual_weights(vis)
    torch.testing.assert_close(w.double(), ref_uniform_visual_weights(vis))
    assert w[0].sum().item() == pytest.approx(1.0) and w[1].sum().item() == 0.0


@pytest.mark.parametrize("kind", REF_KINDS)
def test_iva_loss_matches_reference_with_gradients(kind):
    B, T, V = 3, 6, 11
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(B, T, V, generator=g) * 2).requires_grad_()
    t = torch.randn(B, T, V, generator=g) * 2
    a = _attn(B, 2, T, T, 3)
    instr, vis, _ = _masks(B, T, T, 4, False)
    w = ti.visual_importance(a, instr, vis, normalize=True)
    loss = ti.iva_loss(s, t, w, kind=kind, beta=0.3, alpha=0.2)
    loss.backward()
    gs = s.grad.clone()
    s.grad = None
    ref = ref_iva_loss(s, t, w, kind=kind, beta=0.3, alpha=0.2)
    ref.backward()
    assert float(ref.detach()) > 1e-3
    torch.testing.assert_close(loss.detach().double(), ref.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(gs.double(), s.grad.double(), atol=1e-7, rtol=1e-4)
    # zero-weight positions get zero gradient and are never read
    zero = w == 0
    assert torch.equal(gs[zero], torch.zeros_like(gs[zero]))
    assert ti.IVALoss(kind=kind, beta=0.3, alpha=0.2)(s, t, w).item() == loss.item()


def test_iva_loss_num_sequences_and_uniform_baseline():
    B, T, V = 4, 5, 7
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    vis = torch.rand(B, T, generator=g) < 0.6
    w = ti.uniform_visual_weights(vis)
    full = ti.iva_loss(s, t, w)
    torch.testing.assert_close(full.double(), ref_iva_loss(s, t, w), atol=2e-6, rtol=1e-5)
    halves = ti.iva_loss(s[:2], t[:2], w[:2], num_sequences=B) + ti.iva_loss(s[2:], t[2:], w[2:], num_sequences=B)
    torch.testing.assert_close(halves, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ti.iva_loss(s, t, w, num_sequences=8), full / 2)
    # all-zero weights: exactly 0, zero grad
    s2 = s.clone().requires_grad_()
    z = ti.iva_loss(s2, t, torch.zeros(B, T))
    z.backward()
    assert z.item() == 0.0 and torch.equal(s2.grad, torch.zeros_like(s2))


def test_weights_are_detached_and_validated():
    B, T, V = 2, 4, 5
    s, t = torch.randn(B, T, V), torch.randn(B, T, V)
    w = torch.rand(B, T, requires_grad=True)
    ti.iva_loss(s.requires_grad_(), t, w).backward()
    assert w.grad is None
    with pytest.raises(ValueError, match="weights.*>= 0"):
        ti.iva_loss(s, t, torch.full((B, T), -0.1))
    with pytest.raises(ValueError, match="weights.*non-finite"):
        ti.iva_loss(s, t, torch.full((B, T), float("nan")))
    with pytest.raises(TypeError, match="weights"):
        ti.iva_loss(s, t, torch.ones(B, T, dtype=torch.long))  # type: ignore[arg-type]
    # non-finite logits where the weight is 0 are never read
    s_bad = s.detach().clone()
    s_bad[0, 0] = float("nan")
    w0 = torch.ones(B, T)
    w0[0, 0] = 0.0
    assert torch.isfinite(ti.iva_loss(s_bad, t, w0))
