"""token_divergence against the naive float64 reference, plus its mathematical properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokinteract as ti
from reference import REF_KINDS, ref_divergence

# The library upcasts bf16/fp16 exactly to fp32 and computes there, so the error against the
# float64 reference is fp32 rounding of the *same* input values for every low-precision dtype.
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6, torch.float64: 1e-12}


def _logits(shape, *, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("kind", REF_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_reference(kind, dtype):
    s = _logits((3, 7, 13), seed=1, dtype=dtype)
    t = _logits((3, 7, 13), seed=2, dtype=dtype)
    out = ti.token_divergence(s, t, kind=kind, beta=0.3, alpha=0.2)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == expected_dtype
    assert out.shape == (3, 7)
    ref = ref_divergence(s, t, kind, beta=0.3, alpha=0.2)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    # the values are not trivially small: the comparison has teeth
    assert float(ref.min()) > 1e-3


@pytest.mark.parametrize("kind", REF_KINDS)
def test_gradients_match_reference(kind):
    s = _logits((2, 5, 11), seed=3).requires_grad_()
    t = _logits((2, 5, 11), seed=4).requires_grad_()
    up = _logits((2, 5), seed=5, scale=1.0)
    (ti.token_divergence(s, t, kind=kind, beta=0.3, alpha=0.2) * up).sum().backward()
    gs, gt = s.grad.clone(), t.grad.clone()
    s.grad = t.grad = None
    (ref_divergence(s, t, kind, beta=0.3, alpha=0.2) * up.double()).sum().backward()
    torch.testing.assert_close(gs.double(), s.grad.double(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gt.double(), t.grad.double(), atol=1e-6, rtol=1e-5)
    assert float(gs.abs().max()) > 1e-3


@pytest.mark.parametrize(
    ("kind", "beta"), [(k, 0.5) for k in REF_KINDS] + [("jsd", 0.0), ("jsd", 1.0), ("jsd", 0.05)]
)
def test_gradcheck_float64(kind, beta):
    s = _logits((1, 2, 5), seed=6, dtype=torch.float64).requires_grad_()
    t = _logits((1, 2, 5), seed=7, dtype=torch.float64).requires_grad_()
    fn = lambda a, b: ti.token_divergence(a, b, kind=kind, beta=beta, alpha=0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7, rtol=1e-5)


@settings(max_examples=25)
@given(
    kind=st.sampled_from(REF_KINDS),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.01, 30.0),
    vocab=st.integers(2, 40),
    beta=st.floats(0.0, 1.0),
    alpha=st.floats(0.0, 0.99),
    temperature=st.floats(0.25, 4.0),
)
def test_properties_nonnegative_and_zero_on_equal(kind, seed, scale, vocab, beta, alpha, temperature):
    s = _logits((2, 3, vocab), seed=seed, scale=scale)
    t = _logits((2, 3, vocab), seed=seed + 1, scale=scale)
    opts = dict(kind=kind, beta=beta, alpha=alpha, temperature=temperature)
    d = ti.token_divergence(s, t, **opts)
    assert torch.isfinite(d).all()
    assert float(d.min()) >= -1e-6
    same = ti.token_divergence(s, s.clone(), **opts)
    assert float(same.abs().max()) <= 1e-6
    ref = ref_divergence(s, t, kind, beta=beta, alpha=alpha, temperature=temperature)
    torch.testing.assert_close(d.double(), ref, atol=5e-6, rtol=5e-5)


def test_jsd_endpoints_are_exact():
    s, t = _logits((2, 4, 9), seed=8), _logits((2, 4, 9), seed=9)
    fkl = ti.token_divergence(s, t, kind="fkl")
    rkl = ti.token_divergence(s, t, kind="rkl")
    assert torch.equal(ti.token_divergence(s, t, kind="jsd", beta=0.0), fkl)
    assert torch.equal(ti.token_divergence(s, t, kind="jsd", beta=1.0), rkl)
    assert not torch.allclose(fkl, rkl)


def test_jsd_scaled_limits():
    # JSD_beta / beta -> KL(T||S) as beta -> 0 and JSD_beta / (1 - beta) -> KL(S||T) as beta -> 1,
    # with an O(beta) error: the error must shrink ~10x per decade of beta.
    # (scale 1: bounded probability ratios, so the O(beta) constant is moderate)
    s = _logits((2, 3, 7), seed=10, scale=1.0, dtype=torch.float64)
    t = _logits((2, 3, 7), seed=11, scale=1.0, dtype=torch.float64)
    fkl = ti.token_divergence(s, t, kind="fkl")
    rkl = ti.token_divergence(s, t, kind="rkl")
    errs_f, errs_r = [], []
    for eps in (1e-2, 1e-3, 1e-4):
        low = ti.token_divergence(s, t, kind="jsd", beta=eps) / eps
        high = ti.token_divergence(s, t, kind="jsd", beta=1.0 - eps) / eps
        errs_f.append(float(((low - fkl) / fkl).abs().max()))
        errs_r.append(float(((high - rkl) / rkl).abs().max()))
    assert errs_f[-1] < 1e-3 and errs_r[-1] < 1e-3, (errs_f, errs_r)
    for errs in (errs_f, errs_r):
        assert errs[1] < errs[0] / 5 and errs[2] < errs[1] / 5
    # and the unscaled JSD at the inner points is NOT the KL (the endpoints are a convention)
    mid = ti.token_divergence(s, t, kind="jsd", beta=1e-3)
    assert float((mid - fkl).abs().min()) > 1e-3 * float(fkl.min())


def test_skew_alpha_zero_is_plain_kl():
    s, t = _logits((2, 4, 9), seed=12), _logits((2, 4, 9), seed=13)
    assert torch.equal(ti.token_divergence(s, t, kind="skew_fkl", alpha=0.0), ti.token_divergence(s, t, kind="fkl"))
    assert torch.equal(ti.token_divergence(s, t, kind="skew_rkl", alpha=0.0), ti.token_divergence(s, t, kind="rkl"))
    # alpha > 0 really skews (and is bounded by the plain KL, by convexity)
    sk = ti.token_divergence(s, t, kind="skew_fkl", alpha=0.5)
    assert (sk < ti.token_divergence(s, t, kind="fkl")).all()


@pytest.mark.parametrize("kind", REF_KINDS)
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_temperature_convention_no_tau_squared(kind, tau):
    s, t = _logits((2, 4, 9), seed=14), _logits((2, 4, 9), seed=15)
    out = ti.token_divergence(s, t, kind=kind, temperature=tau)
    # softmax(logits / tau) on both sides, nothing else
    torch.testing.assert_close(out, ti.token_divergence(s / tau, t / tau, kind=kind), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref_divergence(s, t, kind, temperature=tau), atol=2e-6, rtol=1e-5)
    # and the temperature changes the value (so the test above can fail)
    assert not torch.allclose(out, ti.token_divergence(s, t, kind=kind), atol=1e-4)


def test_large_logit_spread_is_finite_with_finite_gradients():
    # probabilities that underflow to exactly 0 in fp32 must not create NaN (0 * log 0)
    s = torch.tensor([[[0.0, -200.0, 5.0, -150.0]]], requires_grad=True)
    t = torch.tensor([[[-300.0, 0.0, 1.0, 2.0]]], requires_grad=True)
    for kind in REF_KINDS:
        out = ti.token_divergence(s, t, kind=kind)
        out.sum().backward()
        assert torch.isfinite(out).all(), kind
        assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all(), kind
        s.grad = t.grad = None


def test_vocab_size_prefix():
    s, t = _logits((2, 3, 13), seed=16), _logits((2, 3, 17), seed=17)
    with pytest.raises(ValueError, match=r"13.*17"):
        ti.token_divergence(s, t)
    out = ti.token_divergence(s, t, vocab_size=11)
    torch.testing.assert_close(out.double(), ref_divergence(s[..., :11], t[..., :11], "fkl"), atol=2e-6, rtol=1e-5)


def test_module_twin():
    s, t = _logits((2, 3, 9), seed=18), _logits((2, 3, 9), seed=19)
    mod = ti.TokenDivergence(kind="jsd", beta=0.2, temperature=1.5)
    assert torch.equal(mod(s, t), ti.token_divergence(s, t, kind="jsd", beta=0.2, temperature=1.5))
    assert "jsd" in repr(mod)


def test_int_options_pass_the_annotations():
    # ints are valid numbers for float options (the runtime type checker must not refuse them)
    s, t = _logits((2, 3, 9), seed=20), _logits((2, 3, 9), seed=21)
    assert torch.equal(ti.token_divergence(s, t, temperature=2), ti.token_divergence(s, t, temperature=2.0))
    assert torch.equal(ti.token_divergence(s, t, kind="jsd", beta=1), ti.token_divergence(s, t, kind="rkl"))
    assert torch.equal(ti.token_divergence(s, t, kind="skew_fkl", alpha=0), ti.token_divergence(s, t, kind="fkl"))
    ti.sample_candidates(s, 2, top_p=1, temperature=1)
    ti.AlignTILoss(sft=1, kd=0, iva=0, tpa=0, temperature=2)
    with pytest.raises(TypeError, match="temperature"):
        ti.token_divergence(s, t, temperature=True)
