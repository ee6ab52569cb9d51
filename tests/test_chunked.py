"""Chunked divergences and Align-TI terms: equal to the references in loss and gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokinteract as ti
from reference import REF_KINDS, ref_divergence, ref_iva_loss, ref_kd_loss, ref_sft_loss
from tokinteract.chunked import (
    ChunkedAlignTILoss,
    chunked_divergence,
    chunked_iva_loss,
    chunked_kd_loss,
    chunked_sft_loss,
    chunked_tpa_loss,
    resolve_chunk_size,
)

B, T, V = 2, 9, 13
OPTS = dict(beta=0.3, alpha=0.2)
# per-dtype tolerances for comparing against the fp64 reference
TOL = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1.6e-2)}


def _randn(shape, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _labels(seed, b=B, t=T, v=V, p_ignore=0.35):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, v, (b, t), generator=g)
    lab[torch.rand(b, t, generator=g) < p_ignore] = -100
    lab[:, 0] = -100
    return lab


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# --------------------------------------------------------------------------- chunked_divergence


@pytest.mark.parametrize("kind", REF_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_chunked_divergence_matches_reference(kind, temperature):
    R = 11
    s = _randn((R, V), 0).requires_grad_()
    t = _randn((R, V), 1)
    w = torch.rand(R, generator=torch.Generator().manual_seed(2))
    w[3] = 0.0
    loss = chunked_divergence(s, t, w, kind=kind, temperature=temperature, normalizer=7, chunk_size=4, **OPTS)
    ref = (w.double() * ref_divergence(s, t, kind, temperature=temperature, detach_teacher=True, **OPTS)).sum() / 7
    assert float(ref.detach()) > 1e-3
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[torch.float32])
    torch.testing.assert_close(_grad(loss, s).double(), _grad(ref, s).double(), atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("kind", REF_KINDS)
def test_gradient_matches_finite_differences_fp64(kind):
    # fp64 inputs compute in fp64: the analytic (fkl, rkl) and per-chunk autograd gradients
    # are checked against central differences along random directions (gradcheck itself
    # needs a second backward, which the hand-over design refuses)
    s = _randn((5, 6), 3, dtype=torch.float64).requires_grad_()
    t = _randn((5, 6), 4, dtype=torch.float64)
    w = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def f(x):
        return chunked_divergence(x, t, w, kind=kind, temperature=1.3, chunk_size=2, **OPTS)

    loss = f(s)
    assert loss.dtype == torch.float64
    g = _grad(loss, s)
    eps = 1e-6
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):
        u = torch.randn(5, 6, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            fd = (f(s + eps * u) - f(s - eps * u)) / (2 * eps)
        torch.testing.assert_close((g * u).sum(), fd, atol=1e-8, rtol=1e-6)


def test_default_weights_and_normalizer_is_mean():
    s, t = _randn((6, V), 5).requires_grad_(), _randn((6, V), 6)
    loss = chunked_divergence(s, t)
    ref = ref_divergence(s, t, "fkl", detach_teacher=True).mean()
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[torch.float32])
    # the default chunk size covers all 6 rows; the same with 1-row chunks
    torch.testing.assert_close(chunked_divergence(s, t, chunk_size=1), loss)


def test_vocab_size_prefix():
    s, t = _randn((4, V), 7).requires_grad_(), _randn((4, V + 3), 8)
    loss = chunked_divergence(s, t, vocab_size=V - 2, chunk_size=3)
    ref = ref_divergence(s[:, : V - 2], t[:, : V - 2], "fkl", detach_teacher=True).mean()
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[torch.float32])
    g = _grad(loss, s)
    assert torch.equal(g[:, V - 2 :], torch.zeros(4, 2))
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_divergence(s, t)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(0, 12),
    vocab=st.integers(2, 9),
    chunk=st.integers(1, 14),
    kind=st.sampled_from(REF_KINDS),
    seed=st.integers(0, 2**16),
)
def test_chunk_size_invariance(rows, vocab, chunk, kind, seed):
    s = _randn((rows, vocab), seed).requires_grad_()
    t = _randn((rows, vocab), seed + 1)
    w = torch.rand(rows, generator=torch.Generator().manual_seed(seed + 2))
    one = chunked_divergence(s, t, w, kind=kind, chunk_size=max(rows, 1), **OPTS)
    many = chunked_divergence(s, t, w, kind=kind, chunk_size=chunk, **OPTS)
    torch.testing.assert_close(many, one, atol=1e-6, rtol=1e-5)
    if rows:
        torch.testing.assert_close(_grad(many, s), _grad(one, s), atol=1e-7, rtol=1e-5)


def test_bf16_inputs():
    s = _randn((8, V), 9, dtype=torch.bfloat16).requires_grad_()
    t = _randn((8, V), 10, dtype=torch.bfloat16)
    loss = chunked_divergence(s, t, chunk_size=3)
    assert loss.dtype == torch.float32
    ref = ref_divergence(s, t, "fkl", detach_teacher=True).mean()
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[torch.float32])  # same bf16 values, fp32 math
    g = _grad(loss, s)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.double(), _grad(ref, s).double(), **TOL[torch.bfloat16])


def test_non_finite_and_bad_options_raise():
    s, t = _randn((4, V), 11), _randn((4, V), 12)
    bad = s.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="student_rows"):
        chunked_divergence(bad, t)
    with pytest.raises(ValueError, match="teacher_rows"):
        chunked_divergence(s, bad)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence(s, t, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        chunked_divergence(s, t, chunk_size=2.0)
    with pytest.raises(ValueError, match="row_weights"):
        chunked_divergence(s, t, -torch.ones(4))
    with pytest.raises((TypeError, ValueError)):  # jaxtyping binds "rows" before our own check
        chunked_divergence(s, t, torch.ones(3))
    with pytest.raises(ValueError, match="kind"):
        chunked_divergence(s, t, kind="kl")


def test_zero_rows_is_zero_with_zero_grad():
    s = torch.zeros(0, V, requires_grad=True)
    loss = chunked_divergence(s, torch.zeros(0, V))
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None and s.grad.shape == (0, V)


def test_backward_scales_by_upstream_gradient_and_no_grad_works():
    s, t = _randn((5, V), 13).requires_grad_(), _randn((5, V), 14)
    g1 = _grad(chunked_divergence(s, t, chunk_size=2), s)
    g3 = _grad(3.0 * chunked_divergence(s, t, chunk_size=2), s)
    torch.testing.assert_close(g3, 3.0 * g1)
    loss = chunked_divergence(s, t, chunk_size=2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
    with torch.no_grad():
        v = chunked_divergence(s, t, chunk_size=2)
    assert not v.requires_grad
    torch.testing.assert_close(v, chunked_divergence(s, t).detach())


# --------------------------------------------------------------------------- kd / sft / iva / tpa


@pytest.mark.parametrize("kind", REF_KINDS)
def test_chunked_kd_matches_reference(kind):
    s = _randn((B, T, V), 20).requires_grad_()
    t = _randn((B, T, V), 21)
    lab = _labels(22)
    loss = chunked_kd_loss(s, t, lab, kind=kind, temperature=1.5, chunk_size=3, **OPTS)
    ref = ref_kd_loss(s, t, lab, kind=kind, temperature=1.5, **OPTS)
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[torch.float32])
    g = _grad(loss, s)
    torch.testing.assert_close(g.double(), _grad(ref, s).double(), atol=1e-7, rtol=1e-4)
    unsup = ti.shift_labels(lab) == -100
    assert torch.equal(g[unsup], torch.zeros_like(g[unsup]))


def test_chunked_kd_num_items_and_all_masked():
    s, t, lab = _randn((B, T, V), 23).requires_grad_(), _randn((B, T, V), 24), _labels(25)
    loss = chunked_kd_loss(s, t, lab, num_items=40, chunk_size=2)
    torch.testing.assert_close(loss.double(), ref_kd_loss(s, t, lab, num_items=40).detach(), **TOL[torch.float32])
    masked = torch.full_like(lab, -100)
    zero = chunked_kd_loss(s, t, masked)
    assert zero.item() == 0.0
    g = _grad(zero, s)
    assert torch.equal(g, torch.zeros_like(g))


def test_chunked_sft_matches_reference():
    s, lab = _randn((B, T, V), 26).requires_grad_(), _labels(27)
    loss = chunked_sft_loss(s, lab, chunk_size=4)
    ref = ref_sft_loss(s, lab)
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[torch.float32])
    torch.testing.assert_close(_grad(loss, s).double(), _grad(ref, s).double(), atol=1e-7, rtol=1e-4)
    bad = lab.clone()
    bad[0, 3] = V
    with pytest.raises(ValueError, match="labels"):
        chunked_sft_loss(s, bad)


@pytest.mark.parametrize("kind", ["fkl", "jsd", "tvd"])
def test_chunked_iva_matches_reference(kind):
    s, t = _randn((B, T, V), 28).requires_grad_(), _randn((B, T, V), 29)
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, 1:5] = True
    w = ti.uniform_visual_weights(vis) * torch.rand(B, T, generator=torch.Generator().manual_seed(30))
    loss = chunked_iva_loss(s, t, w, kind=kind, chunk_size=3, num_sequences=5, **OPTS)
    ref = ref_iva_loss(s, t, w, kind=kind, num_sequences=5, **OPTS)
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[torch.float32])
    torch.testing.assert_close(_grad(loss, s).double(), _grad(ref, s).double(), atol=1e-7, rtol=1e-4)
    with pytest.raises(ValueError, match="visual_weights"):
        chunked_iva_loss(s, t, -w)


def _expansion(seed, d=3, b=B, t=T, v=V):
    lab = _labels(seed, b, t, v)
    cm = ti.shift_labels(lab) != -100
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, v, (b, t), generator=g)
    cands = torch.randint(0, v, (b, t, d), generator=g)
    return lab, ti.tpa_expand(ids, cands, cm)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "skew_rkl"])
def test_chunked_tpa_matches_core_and_reference_rows(kind):
    lab, ex = _expansion(31)
    L2 = ex.expanded_len
    s, t = _randn((B, L2, V), 32).requires_grad_(), _randn((B, L2, V), 33)
    loss = chunked_tpa_loss(s, t, ex, kind=kind, chunk_size=5, **OPTS)
    core = ti.tpa_loss(s, t, ex, kind=kind, **OPTS)
    torch.testing.assert_close(loss, core, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_grad(loss, s), _grad(core, s), atol=1e-7, rtol=1e-5)
    # the same sum written from the reference divergence on the candidate slots
    b, _, _, slot = ex.candidate_slots()
    ref = ref_divergence(s[b, slot], t[b, slot], kind, detach_teacher=True, **OPTS).sum()
    ref = ref / ex.num_candidates / int(ex.candidate_mask.sum())
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[torch.float32])


# --------------------------------------------------------------------------- Align-TI in one pass


def _align_inputs(seed, dtype=torch.float32, vocab_t=V):
    lab, ex = _expansion(seed)
    L2 = ex.expanded_len
    s = _randn((B, L2, V), seed + 2, dtype=dtype).requires_grad_()
    t = _randn((B, L2, vocab_t), seed + 3, dtype=dtype)
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, 1:4] = True
    vis[0, 6] = True  # a visual weight on a supervised position: the row is shared by kd and iva
    w = ti.uniform_visual_weights(vis)
    return s, t, lab, ex, w


def test_chunked_align_ti_bf16_and_vocab_size():
    s, t, lab, ex, w = _align_inputs(60, dtype=torch.bfloat16, vocab_t=V + 4)
    core = ti.AlignTILoss(vocab_size=V)
    mine = ChunkedAlignTILoss(vocab_size=V, chunk_size=3)
    a, _ = core(s, t, lab, expansion=ex, visual_weights=w)
    b, _ = mine(s, t, lab, expansion=ex, visual_weights=w)
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)  # same bf16 values, both fp32 math
    ga, gb = _grad(a, s), _grad(b, s)
    assert gb.dtype == torch.bfloat16
    torch.testing.assert_close(gb.float(), ga.float(), **TOL[torch.bfloat16])


def test_resolve_chunk_size():
    assert resolve_chunk_size(None, 151_936) == 110  # the documented default at Qwen's vocabulary
    assert resolve_chunk_size(None, 10) == 2**24 // 10
    assert resolve_chunk_size(7, 10) == 7
