"""The optional Liger-Kernel backend: equal to the loop references and to tokinteract's fused pass.

Tests that run Liger are skipped (with the reason) when ``liger_kernel`` cannot be imported;
the missing-dependency tests monkeypatch the import and always run.

Tolerances: fp32 inputs are held to the fp32 tolerances of ``tests/test_fused.py``. bf16
inputs (bf16 has an 8-bit significand, eps = 2**-7 = 7.8e-3): the loss within ``rtol = 2e-3``
and every gradient within ``5e-2 * max|reference gradient|`` of the fp64 reference and of
tokinteract's own bf16 pass. Liger rounds the logits twice in bf16 (matmul, then ``+= bias``)
and accumulates the weight and bias gradients across chunks in bf16; the largest gradient
error we saw on these shapes was 3.2e-2 of the max (tokinteract's own bf16 pass: 2.0e-2).
"""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokinteract as ti
import tokinteract.liger as liger
from reference import ref_divergence
from tensor_helpers import align_ti_batch, hidden_and_heads
from tensor_helpers import close_all as _close_all
from tensor_helpers import grads as _grads
from tensor_helpers import seeded_randn as _randn
from tokinteract.fused import FusedAlignTILoss, fused_align_ti_terms, fused_linear_divergence
from tokinteract.liger import LIGER_KINDS, liger_available, liger_linear_divergence

requires_liger = pytest.mark.skipif(
    not liger_available(),
    reason='liger_kernel (Liger-Kernel) is not importable; pip install "tokinteract[liger]" '
    "(without Triton: pip install --no-deps liger-kernel)",
)

B, T, V, H, HT = 3, 11, 37, 6, 5  # V prime: a multiple of nothing
KIND_BETAS = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0)]
NOT_IN_LIGER = [k for k in ti.DIVERGENCE_KINDS if k not in LIGER_KINDS]


def _head(seed, rows=13, dtype=torch.float32, bias=True, vocab=V, tvocab=V):
    hs = _randn((rows, H), seed, dtype=dtype).requires_grad_()
    W = _randn((vocab, H), seed + 1, dtype=dtype).requires_grad_()
    b = _randn((vocab,), seed + 2, dtype=dtype).requires_grad_() if bias else None
    ht = _randn((rows, HT), seed + 3, dtype=dtype)
    Wt = _randn((tvocab, HT), seed + 4, dtype=dtype)
    bt = _randn((tvocab,), seed + 5, dtype=dtype) if bias else None
    return hs, W, b, ht, Wt, bt


def _batch(seed, d=3, L_pad=2):
    return align_ti_batch(seed, B, T, V, d=d, l_pad=L_pad)


def _hidden(seed, L2, dtype=torch.float32, tvocab=V):
    return hidden_and_heads(seed, B, L2, H, HT, V, dtype=dtype, tvocab=tvocab)


# ----------------------------------------------------------------------------- the divergence


@requires_liger
@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS)
def test_divergence_matches_reference(kind, beta):
    hs, W, b, ht, Wt, bt = _head(0)
    loss = liger_linear_divergence(
        hs, W, ht, Wt, student_bias=b, teacher_bias=bt, kind=kind, beta=beta, temperature=1.4, chunk_size=4,
        compiled=False,
    )
    ref = ref_divergence(hs @ W.T + b, ht @ Wt.T + bt, kind, temperature=1.4, beta=beta, detach_teacher=True).mean()
    assert float(ref.detach()) > 1e-3
    torch.testing.assert_close(loss.double(), ref.detach(), atol=2e-6, rtol=1e-5)
    _close_all(_grads(loss, (hs, W, b)), _grads(ref, (hs, W, b)), atol=1e-6, rtol=1e-4)


@requires_liger
def test_jsd_beta_is_the_teacher_weight_not_its_complement():
    # generalized JSD is not symmetric in beta: a flipped mapping (1 - beta) would change the value
    hs, W, b, ht, Wt, bt = _head(5)
    kw = dict(student_bias=b, teacher_bias=bt, kind="jsd", compiled=False)
    got = liger_linear_divergence(hs, W, ht, Wt, beta=0.2, **kw)
    want = ti.token_divergence((hs @ W.T + b)[None], (ht @ Wt.T + bt)[None], kind="jsd", beta=0.2).mean()
    flipped = ti.token_divergence((hs @ W.T + b)[None], (ht @ Wt.T + bt)[None], kind="jsd", beta=0.8).mean()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert abs(float(flipped.detach()) - float(want.detach())) > 1e-3
    fkl = liger_linear_divergence(hs, W, ht, Wt, kind="fkl", **{k: v for k, v in kw.items() if k != "kind"})
    torch.testing.assert_close(liger_linear_divergence(hs, W, ht, Wt, beta=0.0, **kw), fkl)


@requires_liger
@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(0, 12), chunk=st.integers(1, 14), kind_beta=st.sampled_from(KIND_BETAS),
    num_items=st.sampled_from([None, 0, 5, 17.5]), bias=st.booleans(), prefix=st.booleans(),
    tau=st.sampled_from([1.0, 0.7, 2.0]), seed=st.integers(0, 2**16),
)
def test_divergence_equals_fused_backend(rows, chunk, kind_beta, num_items, bias, prefix, tau, seed):
    kind, beta = kind_beta
    tvocab = V + 4 if prefix else V  # a padded teacher vocabulary, compared on the shared prefix
    hs, W, b, ht, Wt, bt = _head(seed, rows=rows, bias=bias, tvocab=tvocab)
    kw = dict(student_bias=b, teacher_bias=bt, kind=kind, beta=beta, temperature=tau, chunk_size=chunk,
              vocab_size=V if prefix else None)
    got = liger_linear_divergence(hs, W, ht, Wt, num_items=num_items, compiled=False, **kw)
    want = fused_linear_divergence(hs, W, ht, Wt, normalizer=num_items, **kw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    params = (hs, W) if b is None else (hs, W, b)
    # fp32 vs fp32 through different arithmetic: tokinteract's closed-form rkl gradient
    # S (log S - log T - D) / tau loses ~1e-5 absolute to cancellation when D is large
    # (rows=1, rkl, tau=0.7, seed=0: D = 4.4, tokinteract 7.4e-6 and Liger 1.2e-6 from fp64)
    _close_all(_grads(got, params), _grads(want, params), atol=1e-5, rtol=1e-4)


@requires_liger
def test_divergence_num_items_tensor_and_teacher_constant():
    hs, W, b, ht, Wt, bt = _head(10)
    ht.requires_grad_()
    Wt.requires_grad_()
    mean = liger_linear_divergence(hs, W, ht, Wt, student_bias=b, teacher_bias=bt, compiled=False)
    glob = liger_linear_divergence(hs, W, ht, Wt, student_bias=b, teacher_bias=bt, num_items=torch.tensor(40.0),
                                   compiled=False)
    torch.testing.assert_close(glob, mean * 13 / 40, atol=1e-7, rtol=1e-6)
    glob.backward()
    assert ht.grad is None and Wt.grad is None
    assert hs.grad is not None and W.grad is not None and b.grad is not None


@requires_liger
@pytest.mark.parametrize(("kind", "beta"), [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3)])
def test_divergence_bf16_within_bf16_tolerance(kind, beta):
    def run(fn, dtype, **kw):
        x = [t.detach().to(dtype).requires_grad_(i < 3) for i, t in enumerate(_head(20, rows=40, vocab=1001, tvocab=1001))]
        loss = fn(x[0], x[1], x[3], x[4], student_bias=x[2], teacher_bias=x[5], kind=kind, beta=beta,
                  temperature=1.5, chunk_size=7, **kw)
        return loss, _grads(loss, x[:3])

    ref, ref_g = run(fused_linear_divergence, torch.float64)
    ours, ours_g = run(fused_linear_divergence, torch.bfloat16)
    got, got_g = run(liger_linear_divergence, torch.bfloat16, compiled=False)
    assert got.dtype == torch.float32
    for want, want_g in ((ref, ref_g), (ours, ours_g)):
        torch.testing.assert_close(got.double(), want.double(), atol=0.0, rtol=2e-3)
        for g, r in zip(got_g, want_g, strict=True):
            assert g.dtype == torch.bfloat16
            scale = float(r.double().abs().max())
            torch.testing.assert_close(g.double(), r.double(), atol=5e-2 * scale, rtol=0.0)


# ----------------------------------------------------------------------------- Align-TI




@requires_liger
def test_align_ti_bf16_within_bf16_tolerance():
    lab, ex, vw = _batch(60)

    def run(dtype, **kw):
        x = [t.detach().to(dtype).requires_grad_(i < 3) for i, t in enumerate(_hidden(61, ex.expanded_len))]
        total, parts = FusedAlignTILoss(chunk_size=4, temperature=1.2, **kw)(
            x[0], x[1], x[3], x[4], lab, student_bias=x[2], teacher_bias=x[5], expansion=ex, visual_weights=vw,
            num_items=12,
        )
        return total, parts, _grads(total, x[:3])

    ref = run(torch.float64)
    ours = run(torch.bfloat16)
    got = run(torch.bfloat16, backend="liger", liger_compiled=False)
    for want in (ref, ours):
        torch.testing.assert_close(got[0].double(), want[0].double(), atol=0.0, rtol=2e-3)
        for k in want[1]:
            torch.testing.assert_close(got[1][k].double(), want[1][k].double(), atol=0.0, rtol=2e-3)
        for g, r in zip(got[2], want[2], strict=True):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(g.double(), r.double(), atol=5e-2 * float(r.double().abs().max()), rtol=0.0)


@requires_liger
def test_errors_name_the_argument():
    lab, ex, vw = _batch(90)
    hs, W, b, ht, Wt, bt = _hidden(91, ex.expanded_len)
    for kind in NOT_IN_LIGER:
        with pytest.raises(ValueError, match=r"kind must be one of \('fkl', 'rkl', 'jsd'\).*" + kind):
            liger_linear_divergence(hs[0], W, ht[0], Wt, kind=kind)
        with pytest.raises(ValueError, match=r"kind must be one of \('fkl', 'rkl', 'jsd'\)"):
            fused_align_ti_terms(hs, W, ht, Wt, lab, expansion=ex, visual_weights=vw, kind=kind, backend="liger")
        with pytest.raises(ValueError, match=r"kind must be one of \('fkl', 'rkl', 'jsd'\)"):
            FusedAlignTILoss(kind=kind, backend="liger")
    with pytest.raises(ValueError, match="backend must be one of .*'triton'"):
        fused_align_ti_terms(hs, W, ht, Wt, lab, expansion=ex, visual_weights=vw, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedAlignTILoss(backend="Liger")
    with pytest.raises(TypeError, match="liger_compiled"):  # the runtime type checker may answer first
        FusedAlignTILoss(backend="liger", liger_compiled="no")
    with pytest.raises(TypeError, match="same dtype"):
        fused_align_ti_terms(hs, W, ht.double(), Wt.double(), lab, expansion=ex, visual_weights=vw, backend="liger")
    with pytest.raises(ValueError, match="temperature"):
        liger_linear_divergence(hs[0], W, ht[0], Wt, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        liger_linear_divergence(hs[0], W, ht[0], _randn((V + 2, HT), 92))
    bad = W.detach().clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        liger_linear_divergence(hs[0], bad, ht[0], Wt, compiled=False)


@requires_liger
def test_empty_divergence_is_zero_and_not_compiled():
    hs, W, b, ht, Wt, bt = _hidden(80, 4)
    empty = liger_linear_divergence(hs[0, :0], W, ht[0, :0], Wt, compiled=True)  # no rows: not compiled
    assert empty.item() == 0.0
    assert torch.equal(_grads(empty, (W,))[0], torch.zeros_like(W))


# ----------------------------------------------------------------------------- without Liger


def _hide_liger(monkeypatch):
    for name in ("liger_kernel", "liger_kernel.chunked_loss", "liger_kernel.chunked_loss.jsd_loss"):
        monkeypatch.setitem(sys.modules, name, None)  # ``import`` of a None entry raises ImportError
    monkeypatch.setattr(liger, "_FUNCTIONS", {})


def test_missing_liger_raises_import_error_saying_how_to_install(monkeypatch):
    _hide_liger(monkeypatch)
    assert not liger_available()
    lab, ex, vw = _batch(100)
    hs, W, b, ht, Wt, bt = _hidden(101, ex.expanded_len)
    how = r'pip install "tokinteract\[liger\]"'
    with pytest.raises(ImportError, match=how):
        liger_linear_divergence(hs[0], W, ht[0], Wt)
    with pytest.raises(ImportError, match=how):
        fused_align_ti_terms(hs, W, ht, Wt, lab, expansion=ex, visual_weights=vw, backend="liger")
    with pytest.raises(ImportError, match=how):
        FusedAlignTILoss(backend="liger")
    # the default backend never imports it
    total, _ = fused_align_ti_terms(hs, W, ht, Wt, lab, expansion=ex, visual_weights=vw)
    assert torch.isfinite(total)


# ----------------------------------------------------------------------------- torch.compile


@requires_liger
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's own use of torch.jit
def test_compiled_equals_eager_on_cpu():
    # Liger's default compiled=True wraps its chunk step in torch.compile (inductor on CPU here;
    # the first call compiles for about half a minute)
    hs, W, b, ht, Wt, bt = _head(110, rows=12)
    kw = dict(student_bias=b, teacher_bias=bt, kind="jsd", beta=0.3, temperature=1.3, chunk_size=4)
    got = liger_linear_divergence(hs, W, ht, Wt, compiled=True, **kw)
    want = liger_linear_divergence(hs, W, ht, Wt, compiled=False, **kw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    _close_all(_grads(got, (hs, W, b)), _grads(want, (hs, W, b)), atol=1e-6, rtol=1e-4)
