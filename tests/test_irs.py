"""IRS (Def. 3.1, Eq. 3) and the layer selection l* = argmax IRS."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokinteract as ti
from reference import ref_irs_score


def test_identical_pairs_score_zero():
    a = torch.rand(5, 12) + 0.01
    assert abs(float(ti.irs_score(a, a.clone()))) <= 1e-6
    # scale invariant: cosine ignores the norm
    assert abs(float(ti.irs_score(a, 3.0 * a))) <= 1e-6


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), log_ca=st.floats(-6, 6), log_cb=st.floats(-6, 6))
def test_scale_invariance_including_small_vectors(seed, log_ca, log_cb):
    # attention weights can be small; the cosine must not depend on their magnitude
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(4, 7, generator=g) + 0.01, torch.rand(4, 7, generator=g) + 0.01
    base = float(ti.irs_score(a, b))
    scaled = float(ti.irs_score(a * 10.0**log_ca, b * 10.0**log_cb))
    assert abs(scaled - base) <= 1e-5
    assert abs(float(ti.irs_score(a * 10.0**log_ca, a * 10.0**log_cb))) <= 1e-5


def test_tiny_identical_vectors_score_zero():
    a = torch.tensor([[1e-7, 0.0], [3e-9, 4e-9]])
    assert abs(float(ti.irs_score(a, a.clone()))) <= 1e-6


def test_orthogonal_pairs_score_one():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    b = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    assert float(ti.irs_score(a, b)) == pytest.approx(1.0, abs=1e-7)
    assert float(ti.irs_score(a, -a)) == pytest.approx(2.0, abs=1e-6)


def test_zero_vector_counts_as_cosine_zero():
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    out = ti.irs_score(a, b)
    assert torch.isfinite(out)
    assert float(out) == pytest.approx(float(ref_irs_score(a, b)), abs=1e-6) == pytest.approx(0.5)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), f=st.integers(1, 20))
def test_matches_reference(seed, n, f):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, f, generator=g), torch.rand(n, f, generator=g)
    out = ti.irs_score(a, b)
    assert out.dtype == torch.float32 and out.shape == ()
    torch.testing.assert_close(out.double(), ref_irs_score(a, b), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ti.irs_score(a.bfloat16(), b.bfloat16()).double(),
                               ref_irs_score(a.bfloat16(), b.bfloat16()), atol=1e-6, rtol=1e-6)


def test_irs_from_visual_importance_pipeline():
    # two instructions over the same image: weights that move score higher than weights that don't
    B, Q, K = 3, 4, 6
    g = torch.Generator().manual_seed(0)
    vis = torch.zeros(B, K, dtype=torch.bool)
    vis[:, :4] = True
    instr = torch.ones(B, Q, dtype=torch.bool)
    a1 = torch.softmax(torch.randn(B, Q, K, generator=g) * 3, -1)
    a2 = torch.softmax(torch.randn(B, Q, K, generator=g) * 3, -1)
    pos = torch.arange(2, 6).expand(B, Q)  # the captured rows: positions 2..5, after the image's start
    w1 = ti.visual_importance(a1, instr, vis, query_positions=pos)[:, :4]
    w2 = ti.visual_importance(a2, instr, vis, query_positions=pos)[:, :4]
    moving = ti.irs_score(w1, w2)
    static = ti.irs_score(w1, w1 * 2)
    assert float(moving) > float(static) + 1e-3


def test_select_layer_argmax_first_on_ties():
    assert ti.select_layer(torch.tensor([0.1, 0.5, 0.3])) == 1
    assert ti.select_layer(torch.tensor([0.2, 0.7, 0.7, 0.1])) == 1
    assert ti.select_layer(torch.tensor([0.4])) == 0
    with pytest.raises(ValueError, match="scores"):
        ti.select_layer(torch.tensor([0.1, float("nan")]))


def test_irs_errors():
    with pytest.raises((ValueError, TypeError), match="alpha_b|jaxtyping|Type-check"):
        ti.irs_score(torch.rand(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match="alpha_b has 6 non-finite"):
        ti.irs_score(torch.rand(2, 3), torch.full((2, 3), float("inf")))
