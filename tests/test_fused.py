"""Fused LM head + divergence: equal to the unfused losses on materialised logits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokinteract as ti
from reference import REF_KINDS, ref_divergence, ref_sft_loss
from tensor_helpers import close_all as _close_all
from tensor_helpers import grads as _grads
from tensor_helpers import seeded_randn as _randn
from tokinteract.fused import (
    fused_linear_cross_entropy,
    fused_linear_divergence,
)

B, T, V, H, HT = 2, 9, 17, 6, 5
OPTS = dict(beta=0.3, alpha=0.2)


def _head(seed, rows=7, dtype=torch.float32, bias=True):
    hs = _randn((rows, H), seed, dtype=dtype).requires_grad_()
    W = _randn((V, H), seed + 1, dtype=dtype).requires_grad_()
    b = _randn((V,), seed + 2, dtype=dtype).requires_grad_() if bias else None
    ht = _randn((rows, HT), seed + 3, dtype=dtype)
    Wt = _randn((V, HT), seed + 4, dtype=dtype)
    bt = _randn((V,), seed + 5, dtype=dtype) if bias else None
    return hs, W, b, ht, Wt, bt


@pytest.mark.parametrize("kind", REF_KINDS)
def test_fused_divergence_matches_reference(kind):
    hs, W, b, ht, Wt, bt = _head(0)
    w = torch.rand(7, generator=torch.Generator().manual_seed(9))
    loss = fused_linear_divergence(
        hs, W, ht, Wt, w, student_bias=b, teacher_bias=bt, kind=kind, temperature=1.4, chunk_size=3, **OPTS
    )
    s_logits = hs @ W.T + b
    t_logits = ht @ Wt.T + bt
    ref = (w.double() * ref_divergence(s_logits, t_logits, kind, temperature=1.4, detach_teacher=True, **OPTS)).mean()
    assert float(ref.detach()) > 1e-3
    torch.testing.assert_close(loss.double(), ref.detach(), atol=2e-6, rtol=1e-5)
    _close_all(_grads(loss, (hs, W, b)), _grads(ref, (hs, W, b)), atol=1e-6, rtol=1e-4)


def test_fused_equals_chunked_on_materialised_logits_without_bias():
    from tokinteract.chunked import chunked_divergence

    hs, W, _, ht, Wt, _ = _head(10, bias=False)
    loss = fused_linear_divergence(hs, W, ht, Wt, chunk_size=2, normalizer=4)
    ref = chunked_divergence(hs @ W.T, ht @ Wt.T, normalizer=4)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    _close_all(_grads(loss, (hs, W)), _grads(ref, (hs, W)), atol=1e-6, rtol=1e-5)


def test_teacher_gets_no_gradient():
    hs, W, b, ht, Wt, bt = _head(20)
    ht.requires_grad_()
    Wt.requires_grad_()
    loss = fused_linear_divergence(hs, W, ht, Wt)
    loss.backward()
    assert ht.grad is None and Wt.grad is None
    assert W.grad is not None and hs.grad is not None


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(0, 10), chunk=st.integers(1, 12), kind=st.sampled_from(REF_KINDS), seed=st.integers(0, 2**16))
def test_fused_chunk_size_invariance(rows, chunk, kind, seed):
    hs, W, b, ht, Wt, bt = _head(seed, rows=rows)
    kw = dict(student_bias=b, teacher_bias=bt, kind=kind, **OPTS)
    one = fused_linear_divergence(hs, W, ht, Wt, chunk_size=max(rows, 1), **kw)
    many = fused_linear_divergence(hs, W, ht, Wt, chunk_size=chunk, **kw)
    torch.testing.assert_close(many, one, atol=1e-6, rtol=1e-5)
    _close_all(_grads(many, (hs, W, b)), _grads(one, (hs, W, b)), atol=1e-6, rtol=1e-5)


def test_fused_vocab_size_prefix():
    hs, W, b, ht, _, _ = _head(30)
    Wt = _randn((V + 5, HT), 31)
    loss = fused_linear_divergence(hs, W, ht, Wt, student_bias=b, vocab_size=V - 3, chunk_size=4)
    ref = ref_divergence((hs @ W.T + b)[:, : V - 3], (ht @ Wt.T)[:, : V - 3], "fkl", detach_teacher=True).mean()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=2e-6, rtol=1e-5)
    gW = _grads(loss, (W,))[0]
    assert torch.equal(gW[V - 3 :], torch.zeros(3, H))
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_divergence(hs, W, ht, Wt)


def test_fused_bf16_within_bf16_tolerance():
    hs, W, b, ht, Wt, bt = _head(40, rows=12, dtype=torch.bfloat16)
    loss = fused_linear_divergence(hs, W, ht, Wt, student_bias=b, teacher_bias=bt, chunk_size=5)
    assert loss.dtype == torch.float32
    # unfused bf16 path: bf16 logits, core divergence in fp32
    s_logits = torch.nn.functional.linear(hs, W, b)
    t_logits = torch.nn.functional.linear(ht, Wt, bt)
    ref = ti.token_divergence(s_logits[None], t_logits.detach()[None]).mean()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1.6e-2)
    got, want = _grads(loss, (hs, W, b)), _grads(ref, (hs, W, b))
    for g, r in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        scale = float(r.float().abs().max())
        torch.testing.assert_close(g.float(), r.float(), atol=1.6e-2 * scale, rtol=1.6e-2)


def test_fused_cross_entropy_matches_reference():
    hs, W, b, _, _, _ = _head(60, rows=B * T)
    lab = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(61))
    lab[0, :4] = -100
    targets = ti.shift_labels(lab).reshape(-1)
    loss = fused_linear_cross_entropy(hs, W, targets, bias=b, chunk_size=4)
    ref = ref_sft_loss((hs @ W.T + b).reshape(B, T, V), lab)
    torch.testing.assert_close(loss.double(), ref.detach(), atol=2e-6, rtol=1e-5)
    _close_all(_grads(loss, (hs, W, b)), _grads(ref, (hs, W, b)), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(
        fused_linear_cross_entropy(hs, W, targets, bias=b, num_items=100),
        loss * (targets != -100).sum() / 100, atol=1e-6, rtol=1e-6,
    )
    with pytest.raises(ValueError, match="targets"):
        fused_linear_cross_entropy(hs, W, torch.full_like(targets, V))


def test_fused_errors():
    hs, W, b, ht, Wt, bt = _head(100)
    with pytest.raises((TypeError, ValueError)):  # jaxtyping binds "hidden" first
        fused_linear_divergence(hs, W[:, :-1], ht, Wt)
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_divergence(hs.double(), W, ht, Wt)
    bad = W.detach().clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="student logits"):
        fused_linear_divergence(hs, bad, ht, Wt)
    # the Align-TI errors (missing teacher, SFT without one): tests/test_backends.py::test_errors


def test_lm_head_sees_at_most_one_chunk_of_rows(monkeypatch):
    # the logits are never materialised for more than chunk_size rows, in forward or backward
    # (the head runs as linear, or as mm / addmm into a reused buffer: every way is spied on)
    calls = []
    real_linear, real_mm, real_addmm = torch.nn.functional.linear, torch.mm, torch.addmm

    def spy(x, w, b=None):
        calls.append(tuple(x.shape))
        return real_linear(x, w, b)

    def spy_mm(x, w, **kw):
        calls.append(tuple(x.shape))
        return real_mm(x, w, **kw)

    def spy_addmm(b, x, w, **kw):
        calls.append(tuple(x.shape))
        return real_addmm(b, x, w, **kw)

    hs, W, b, ht, Wt, bt = _head(110, rows=10)
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    monkeypatch.setattr(torch, "mm", spy_mm)
    monkeypatch.setattr(torch, "addmm", spy_addmm)
    loss = fused_linear_divergence(hs, W, ht, Wt, student_bias=b, teacher_bias=bt, chunk_size=3)
    loss.backward()
    assert len(calls) == 2 * 4  # student and teacher, ceil(10 / 3) chunks, nothing in backward
    assert max(rows for rows, _ in calls) == 3


def test_fused_sample_candidates():
    from tokinteract.fused import fused_sample_candidates

    hs, W, b = _randn((B, T, H), 120), _randn((V, H), 121, scale=2.0), _randn((V,), 122)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(123)) < 0.6
    logits = hs @ W.T + b
    for chunk in (1, 4, 100):
        got = fused_sample_candidates(hs, W, 3, mask=mask, student_bias=b, strategy="greedy", chunk_size=chunk)
        assert torch.equal(got, ti.sample_candidates(logits, 3, strategy="greedy", mask=mask))
    # one chunk over every row: the same draws as the unfused sampler for the same generator
    kw = dict(strategy="nucleus", top_p=0.8, temperature=1.3)
    got = fused_sample_candidates(hs, W, 4, mask=mask, student_bias=b, generator=torch.Generator().manual_seed(5), chunk_size=100, **kw)
    want = ti.sample_candidates(logits, 4, mask=mask, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(got, want)
    # several chunks: every draw lies in its row's nucleus, unmasked positions stay 0
    got = fused_sample_candidates(hs, W, 4, mask=mask, student_bias=b, chunk_size=2, **kw)
    p = torch.softmax(logits / 1.3, -1)
    sp, order = p.sort(-1, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, (sp.cumsum(-1) - sp) < 0.8)
    assert bool(keep.gather(-1, got)[mask].all())
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    with pytest.raises((TypeError, ValueError)):
        fused_sample_candidates(hs, W, 2, mask=mask[:, :-1])

