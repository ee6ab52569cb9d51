"""Every backend of the Align-TI loss against the eager reference, one suite parametrised over backends.

The backends (``"chunked"``, ``"fused"``, ``"liger"``) differ from ``"eager"`` only in how they
evaluate ``sum_r c_r * D_r`` (see docs/architecture.md), so the same cases run for each: the
weighted total and every part equal the eager loss (and the fp64 loop references of
``tests/reference.py``) in value and gradient; rows no part uses are never read and get a
zero gradient; a batch with nothing to learn gives exactly 0 with zero gradients; errors name
the argument. The chunked backend gets the logits ``hidden @ W.T + b``; the fused backends get
the hidden states and heads. Backend-specific behaviour (chunk sizes, bf16, Liger's own
kernel, LM-head call counts) stays in ``test_chunked.py``, ``test_fused.py``, ``test_liger.py``.
Liger cases are skipped when ``liger_kernel`` cannot be imported.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tokinteract as ti
from reference import ref_divergence, ref_iva_loss, ref_kd_loss, ref_sft_loss
from tensor_helpers import align_ti_batch, hidden_and_heads
from tensor_helpers import close_all as _close_all
from tensor_helpers import grads as _grads
from tensor_helpers import seeded_randn as _randn
from tokinteract.chunked import ChunkedAlignTILoss, chunked_align_ti_terms
from tokinteract.fused import FusedAlignTILoss, fused_align_ti_terms
from tokinteract.liger import LIGER_KINDS, liger_available

B, T, V, H, HT = 3, 11, 37, 6, 5  # V prime: a multiple of nothing
OPTS = dict(beta=0.3, alpha=0.2)
TOL = dict(atol=2e-6, rtol=1e-5)  # fp32 against the fp64 references

_no_liger = pytest.mark.skipif(
    not liger_available(),
    reason='liger_kernel (Liger-Kernel) is not importable; pip install "tokinteract[liger]" '
    "(without Triton: pip install --no-deps liger-kernel)",
)
BACKENDS = ["chunked", "fused", pytest.param("liger", marks=_no_liger)]
FUSED = ["fused", pytest.param("liger", marks=_no_liger)]


def _batch(seed, d=3, L_pad=2):
    return align_ti_batch(seed, B, T, V, d=d, l_pad=L_pad, shared_row=True)


def _hidden(seed, L2, dtype=torch.float32, tvocab=V):
    return hidden_and_heads(seed, B, L2, H, HT, V, dtype=dtype, tvocab=tvocab)


def _terms(backend, hs, W, b, ht, Wt, bt, labels, **kw):
    """The backend's Align-TI function: logits for ``chunked``, hidden states and heads otherwise."""
    if backend == "chunked":
        teacher = None if ht is None else ht @ Wt.T + (0 if bt is None else bt)
        return chunked_align_ti_terms(hs @ W.T + (0 if b is None else b), teacher, labels, **kw)
    return fused_align_ti_terms(
        hs, W, ht, Wt, labels, student_bias=b, teacher_bias=bt,
        backend="liger" if backend == "liger" else "tokinteract", **({"liger_compiled": False} if backend == "liger" else {}), **kw,
    )


def _eager(hs, W, b, ht, Wt, bt, labels, **kw):
    teacher = None if ht is None else ht @ Wt.T + (0 if bt is None else bt)
    weights = {k: kw.pop(k, 1.0) for k in ("sft", "kd", "iva", "tpa")}
    kw.pop("chunk_size", None)
    call = {k: kw.pop(k) for k in ("expansion", "visual_weights", "num_items", "num_sequences") if k in kw}
    return ti.AlignTILoss(**weights, **kw)(hs @ W.T + (0 if b is None else b), teacher, labels, **call)


# (weights, kinds) of the cases that were spread over test_chunked.py, test_fused.py and test_liger.py
PART_CONFIGS = {
    "all": dict(),
    "weighted": dict(sft=0.5, kd=2.0, iva=0.7, tpa=1.5),
    "kd_only": dict(sft=0.0, iva=0.0, tpa=0.0),
    "tpa_only": dict(sft=0.0, kd=0.0, iva=0.0),
    "sft_iva": dict(kd=0.0, tpa=0.0),
    "no_iva": dict(iva=0.0),
    "kd_iva": dict(sft=0.0, kd=0.5, iva=2.0, tpa=0.0),
    "sft_tpa": dict(sft=1.0, kd=0.0, iva=0.0, tpa=0.3),
}
# every (config, kind) pair that one of the three former files ran, now for every backend
CASES = [
    *[("all", k) for k in ("fkl", "rkl", "jsd", "skew_fkl")],
    *[(c, k) for c in ("kd_iva", "sft_tpa") for k in ("fkl", "jsd")],
    *[("no_iva", k) for k in ("fkl", "rkl", "skew_fkl")],
    *[(c, k) for c in ("weighted", "kd_only", "tpa_only", "sft_iva") for k in ("fkl", "rkl", "jsd")],
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("config", "kind"), CASES)
def test_equals_eager(backend, kind, config):
    if backend == "liger" and kind not in LIGER_KINDS:
        pytest.skip(f"Liger-Kernel computes only {LIGER_KINDS}")
    lab, ex, vw = _batch(30)
    hs, W, b, ht, Wt, bt = _hidden(31, ex.expanded_len, tvocab=V + 3)  # a padded teacher vocabulary
    kw = dict(expansion=ex, visual_weights=vw, kind=kind, temperature=0.8, vocab_size=V, num_items=9,
              num_sequences=5, chunk_size=4, **OPTS, **PART_CONFIGS[config])
    a, pa = _eager(hs, W, b, ht, Wt, bt, lab, **dict(kw))
    f, pf = _terms(backend, hs, W, b, ht, Wt, bt, lab, **kw)
    torch.testing.assert_close(f, a, atol=1e-6, rtol=1e-6)
    assert list(pf) == list(pa)
    for k in pa:
        assert not pf[k].requires_grad
        torch.testing.assert_close(pf[k], pa[k], atol=1e-6, rtol=1e-6)
    # the closed-form rkl gradient S (log S - log T - D) / tau loses ~1e-5 absolute to cancellation
    # where D is large (see test_liger.py::test_divergence_equals_fused_backend)
    _close_all(_grads(f, (hs, W, b)), _grads(a, (hs, W, b)), atol=1e-5 if kind == "rkl" else 1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["chunked", "fused"])
@pytest.mark.parametrize("config", ["all", "weighted", "sft_iva", "sft_tpa"])
@pytest.mark.parametrize(("kind", "beta"), [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.0), ("jsd", 1.0)])
def test_cross_entropy_and_divergence_share_the_student_log_softmax(backend, config, kind, beta, monkeypatch):
    # at temperature 1 over one vocabulary, SFT's cross-entropy and an fkl/rkl divergence (also
    # jsd at beta 0 / 1) read one log_softmax of the student per chunk; the gradient
    # ce_coef * (S - onehot) + div_coef * dD/dz is formed in one buffer: equal to eager
    import tokinteract._engine as engine

    shared = []
    real = engine.divergence_and_grad

    def spy(*a, **kw):
        shared.append(kw["student_log_probs"])
        return real(*a, **kw)

    monkeypatch.setattr(engine, "divergence_and_grad", spy)
    lab, ex, vw = _batch(36)
    hs, W, b, ht, Wt, bt = _hidden(37, ex.expanded_len)
    kw = dict(expansion=ex, visual_weights=vw, kind=kind, beta=beta, num_items=9, num_sequences=5, chunk_size=4,
              **PART_CONFIGS[config])
    a, pa = _eager(hs, W, b, ht, Wt, bt, lab, **dict(kw))
    f, pf = _terms(backend, hs, W, b, ht, Wt, bt, lab, **kw)
    assert shared and all(shared)
    torch.testing.assert_close(f, a, atol=1e-6, rtol=1e-6)
    for k in pa:
        torch.testing.assert_close(pf[k], pa[k], atol=1e-6, rtol=1e-6)
    canonical_rkl = kind == "rkl" or beta == 1.0
    _close_all(_grads(f, (hs, W, b)), _grads(a, (hs, W, b)), atol=1e-5 if canonical_rkl else 1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sft_kd_iva_against_references(backend):
    # every part against the loop references (fp64), no expansion (tpa off)
    lab, _, vw = _batch(50)
    hs, W, b, ht, Wt, bt = _hidden(51, T)
    total, parts = _terms(backend, hs, W, b, ht, Wt, bt, lab, tpa=0.0, visual_weights=vw, chunk_size=2)
    s, t = hs @ W.T + b, ht @ Wt.T + bt
    ref_parts = {"sft": ref_sft_loss(s, lab), "kd": ref_kd_loss(s, t, lab), "iva": ref_iva_loss(s, t, vw)}
    ref_total = sum(ref_parts.values())
    for k, v in ref_parts.items():
        torch.testing.assert_close(parts[k].double(), v.detach(), **TOL)
    torch.testing.assert_close(total.double(), ref_total.detach(), **TOL)
    _close_all(_grads(total, (hs, W, b)), _grads(ref_total, (hs, W, b)), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_and_tpa_against_references(backend):
    lab, ex, _ = _batch(40, d=2)
    hs, W, b, ht, Wt, bt = _hidden(41, ex.expanded_len)
    n = torch.tensor(20.0)
    total, parts = _terms(
        backend, hs, W, b, ht, Wt, bt, lab, expansion=ex, sft=0.0, iva=0.0, kd=1.0, tpa=0.5,
        kind="rkl", temperature=1.3, num_items=n, chunk_size=3,
    )
    s, t = hs @ W.T + b, ht @ Wt.T + bt
    kd = ref_kd_loss(s[:, :T], t[:, :T], lab, kind="rkl", temperature=1.3, num_items=20.0)
    # Eq. 7 from the expansion's slot table: (1/d) sum_u D(slot) over candidate positions, / num_items
    tpa = s.new_zeros((), dtype=torch.float64)
    for bb in range(B):
        for tt in range(T):
            for u in range(ex.num_candidates):
                slot = int(ex.candidate_index[bb, tt, u])
                if slot >= 0:
                    tpa = tpa + ref_divergence(s[bb, slot], t[bb, slot], "rkl", temperature=1.3, detach_teacher=True) / 2
    tpa = tpa / 20.0
    torch.testing.assert_close(parts["kd"].double(), kd.detach(), **TOL)
    torch.testing.assert_close(parts["tpa"].double(), tpa.detach(), **TOL)
    ref = kd + 0.5 * tpa
    torch.testing.assert_close(total.double(), ref.detach(), **TOL)
    _close_all(_grads(total, (hs, W, b)), _grads(ref, (hs, W, b)), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["kd_tpa", "all", "sft_kd"])
def test_all_masked_is_exactly_zero_with_zero_grads(backend, config):
    lab = torch.full((B, T), -100)
    cm = torch.zeros(B, T, dtype=torch.bool)
    ex = ti.tpa_expand(torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, 2, dtype=torch.long), cm)
    hs, W, b, ht, Wt, bt = _hidden(80, ex.expanded_len)
    with torch.no_grad():
        hs[:, 0] = float("nan")  # nothing is read, so nothing can leak
    parts_on = {"kd_tpa": dict(sft=0.0, iva=0.0), "all": {}, "sft_kd": dict(iva=0.0, tpa=0.0)}[config]
    total, parts = _terms(
        backend, hs, W, b, ht, Wt, bt, lab, expansion=ex, visual_weights=torch.zeros(B, T), num_items=0, **parts_on,
    )
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in parts.values())
    assert set(parts) == {k for k in ("sft", "kd", "iva", "tpa") if parts_on.get(k, 1.0) > 0}
    if backend == "chunked":  # hidden @ W.T reads every row: check the logits' gradient instead
        s = (hs @ W.T + b).detach().requires_grad_()
        total, _ = chunked_align_ti_terms(s, ht @ Wt.T + bt, lab, expansion=ex, visual_weights=torch.zeros(B, T),
                                          num_items=0, **parts_on)
        (g,) = _grads(total, (s,))
        assert torch.equal(g, torch.zeros_like(g))
        return
    for g in _grads(total, (hs, W, b)):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_is_zero_not_a_reshape_error(backend):
    hs = torch.zeros(0, T, H, requires_grad=True)
    W = _randn((V, H), 94).requires_grad_()
    lab = torch.zeros(0, T, dtype=torch.long)
    total, parts = _terms(backend, hs, W, None, torch.zeros(0, T, HT), _randn((V, HT), 95), None, lab, iva=0.0, tpa=0.0)
    assert total.item() == 0.0 and set(parts) == {"sft", "kd"}
    (gW,) = _grads(total, (W,))
    assert torch.equal(gW, torch.zeros_like(gW))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iva", [0.0, 1.0])
def test_rows_no_part_uses_are_not_read_and_get_zero_gradient(backend, iva):
    lab, ex, vw = _batch(50)
    hs, W, b, ht, Wt, bt = _hidden(51, ex.expanded_len)
    used = torch.zeros(B, ex.expanded_len, dtype=torch.bool)
    used[:, :T] = (ti.shift_labels(lab) != -100) | ((vw > 0) if iva else False)
    bb, _, _, slot = ex.candidate_slots()
    used[bb, slot] = True
    kw = dict(expansion=ex, visual_weights=vw, iva=iva, kind="jsd", beta=0.4, chunk_size=5)
    want, _ = _eager(hs, W, b, ht, Wt, bt, lab, **dict(kw))
    ht = ht.clone()
    ht[~used] = float("nan")  # rows the loss never reads may hold anything
    total, _ = _terms(backend, hs, W, b, ht, Wt, bt, lab, **kw)
    assert torch.isfinite(total)
    torch.testing.assert_close(total, want, atol=1e-6, rtol=1e-6)
    (g,) = _grads(total, (hs,))
    assert torch.equal(g[~used], torch.zeros_like(g[~used]))
    assert bool((g[used].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("backend", FUSED)
def test_tied_embeddings_accumulate_into_one_parameter(backend):
    emb = nn.Embedding(V, H)
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(70))
    t_emb, ht = _randn((V, HT), 71), _randn((1, 8, HT), 72)
    lab = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(73))

    def hidden(e):
        return torch.tanh(e(ids)) * 1.5  # [1, 8, H]: a toy "model" reading the embedding

    # fused, with the embedding matrix as the LM head (tied)
    total, _ = _terms(backend, hidden(emb), emb.weight, None, ht, t_emb, None, lab, iva=0.0, tpa=0.0, chunk_size=3)
    total.backward()
    g_fused = emb.weight.grad.clone()
    emb.weight.grad = None
    # unfused: logits = hidden @ E.T, eager losses
    h = hidden(emb)
    ref, _ = ti.AlignTILoss(iva=0.0, tpa=0.0)(h @ emb.weight.T, ht @ t_emb.T, lab)
    ref.backward()
    torch.testing.assert_close(total, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_fused, emb.weight.grad, atol=1e-6, rtol=1e-5)
    # both the lookup and the head contribute: the head part alone differs from the total
    emb.weight.grad = None
    total2, _ = _terms(backend, hidden(emb).detach(), emb.weight, None, ht, t_emb, None, lab, iva=0.0, tpa=0.0)
    total2.backward()
    assert not torch.allclose(emb.weight.grad, g_fused, atol=1e-4)


TEACHER_NAME = {"chunked": "teacher_logits", "fused": "teacher_hidden and teacher_weight", "liger": "teacher_hidden and teacher_weight"}
NON_FINITE_TEACHER = {"chunked": "teacher_logits", "fused": "teacher logits", "liger": "non-finite"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    lab, ex, vw = _batch(90)
    hs, W, b, ht, Wt, bt = _hidden(91, ex.expanded_len)
    with pytest.raises(ValueError, match=TEACHER_NAME[backend]):
        _terms(backend, hs, W, b, None, None, None, lab, expansion=ex, visual_weights=vw)
    with pytest.raises(ValueError, match="expansion"):
        _terms(backend, hs[:, :T], W, b, ht[:, :T], Wt, bt, lab, visual_weights=vw)
    with pytest.raises(ValueError, match="visual_weights"):
        _terms(backend, hs, W, b, ht, Wt, bt, lab, expansion=ex)
    with pytest.raises(ValueError, match="every part"):
        _terms(backend, hs, W, b, ht, Wt, bt, lab, sft=0.0, kd=0.0, iva=0.0, tpa=0.0)
    with pytest.raises(ValueError, match="expanded sequence"):
        _terms(backend, hs[:, :-1], W, b, ht[:, :-1], Wt, bt, lab, expansion=ex, visual_weights=vw)
    with pytest.raises(ValueError, match="visual_weights"):
        _terms(backend, hs, W, b, ht, Wt, bt, lab, expansion=ex, visual_weights=-vw)
    bad = lab.clone()
    bad[0, 3] = V
    with pytest.raises(ValueError, match="labels"):
        _terms(backend, hs, W, b, ht, Wt, bt, bad, expansion=ex, visual_weights=vw)
    # a non-finite teacher value in a row KD uses
    bad_t = ht.detach().clone()
    b_k, t_k = (ti.shift_labels(lab) != -100).nonzero()[0].tolist()
    bad_t[b_k, t_k, 0] = float("inf")
    with pytest.raises(ValueError, match=NON_FINITE_TEACHER[backend]):
        _terms(backend, hs, W, b, bad_t, Wt, bt, lab, expansion=ex, visual_weights=vw)
    # SFT only needs no teacher
    total, parts = _terms(backend, hs[:, :T], W, b, None, None, None, lab, kd=0.0, iva=0.0, tpa=0.0)
    torch.testing.assert_close(parts["sft"], ti.sft_loss(hs[:, :T] @ W.T + b, lab), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_align_ti_loss_module_is_the_backend(backend):
    """``AlignTILoss(backend=...)`` and the named classes give the function's result."""
    lab, ex, vw = _batch(60)
    hs, W, b, ht, Wt, bt = _hidden(61, ex.expanded_len)
    kw = dict(kind="jsd", beta=0.4, chunk_size=5)
    want, pw = _terms(backend, hs, W, b, ht, Wt, bt, lab, expansion=ex, visual_weights=vw, **kw)
    if backend == "chunked":
        s, t = hs @ W.T + b, ht @ Wt.T + bt
        mods = [ti.AlignTILoss(backend="chunked", **kw), ChunkedAlignTILoss(**kw)]
        got = [m(s, t, lab, expansion=ex, visual_weights=vw) for m in mods]
        assert "backend='chunked'" in repr(mods[0]) and "chunk_size=5" in repr(mods[1])
    else:
        extra = {"liger_compiled": False} if backend == "liger" else {}
        mod = ti.AlignTILoss(backend=backend, **kw, **extra)
        named = FusedAlignTILoss(backend="liger" if backend == "liger" else "tokinteract", **kw, **extra)
        assert f"backend={named.backend!r}" in repr(named)
        got = [mod(ti.HiddenStates(hs, W, b), ti.HiddenStates(ht, Wt, bt), lab, expansion=ex, visual_weights=vw),
               named(hs, W, ht, Wt, lab, student_bias=b, teacher_bias=bt, expansion=ex, visual_weights=vw)]
        with pytest.raises(TypeError, match="HiddenStates"):
            mod(hs @ W.T + b, ht @ Wt.T + bt, lab, expansion=ex, visual_weights=vw)
    for total, parts in got:
        torch.testing.assert_close(total, want, atol=1e-6, rtol=1e-6)
        assert list(parts) == list(pw)
