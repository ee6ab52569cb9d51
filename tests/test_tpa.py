"""THE TPA PROOF: one packed forward over the ribbon expansion equals running every candidate
as its own sequence (paper Eq. 7), for the loss and for every student parameter gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokinteract as ti
from reference import REF_KINDS, ref_tpa_loss, ref_tpa_position_values
from tiny_transformer import TinyTransformer
from strategies import padded_masks

V = 19


def _models():
    return TinyTransformer(vocab=V, seed=0), TinyTransformer(vocab=V, seed=1)


def _batch(padding: str, seed: int = 0, d: int = 3):
    """B=3, T=7; ragged candidate counts per row (incl. one row with none when padding='ragged')."""
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 7
    ids = torch.randint(1, V, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.bool)
    if padding == "left":
        am[0, :2] = False
        am[2, :4] = False
    elif padding == "right":
        am[0, 5:] = False
        am[1, 6:] = False
    ids = ids.masked_fill(~am, 0)
    cm = torch.zeros(B, T, dtype=torch.bool)
    if padding == "left":
        cm[0, [2, 3, 5]] = True
        cm[1, [0, 1, 2, 3, 4, 5]] = True
        cm[2, [4]] = True
    elif padding == "right":
        cm[0, [0, 2, 3]] = True
        cm[1, [1, 4]] = True
        cm[2, [0, 1, 2, 3, 4, 5]] = True
    else:  # no padding; ragged, one row without candidates
        cm[0, [1, 2, 3, 4, 5]] = True
        cm[2, [3]] = True
    cand = torch.randint(1, V, (B, T, d), generator=g)
    return ids, am, cm, cand


def _packed(student, teacher, ids, am, cm, cand, **opts):
    e = ti.tpa_expand(ids, cand, cm, am)
    s = student(e.input_ids, e.position_ids, e.attention_mask)
    with torch.no_grad():
        t = teacher(e.input_ids, e.position_ids, e.attention_mask)
    return e, s, t


@pytest.mark.parametrize("padding", ["left", "right", "ragged"])
def test_packed_forward_equals_separate_sequences(padding):
    student, teacher = _models()
    ids, am, cm, cand = _batch(padding)
    e, s, t = _packed(student, teacher, ids, am, cm, cand)
    loss = ti.tpa_loss(s, t, e)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    ref = ref_tpa_loss(student, ids, cand, cm, am, teacher)
    ref.backward()
    assert float(ref.detach()) > 1e-2  # the two models really differ
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-5
    for n, p in student.named_parameters():
        diff = float((grads[n] - p.grad).abs().max())
        assert diff <= 1e-5, (n, diff)
    # the proof has teeth: at least most parameters get a non-trivial gradient
    assert sum(float(g.abs().max()) > 1e-4 for g in grads.values()) >= len(grads) - 2

    # per-position values too
    vals = ti.tpa_position_values(s, t, e)
    ref_vals = ref_tpa_position_values(student, ids, cand, cm, am, teacher)
    assert float((vals.detach().double() - ref_vals.detach()).abs().max()) <= 1e-5
    assert torch.equal(vals[~cm], torch.zeros_like(vals[~cm]))


def test_packed_equals_separate_in_float64():
    # in fp64 the two computations agree to ~1e-12: the equality is exact, not approximate
    student, teacher = (m.double() for m in _models())
    for padding in ("left", "right"):
        ids, am, cm, cand = _batch(padding, seed=7)
        e, s, t = _packed(student, teacher, ids, am, cm, cand)
        assert s.dtype == torch.float64
        loss = ti.tpa_loss(s, t, e, kind="jsd")
        assert loss.dtype == torch.float64
        loss.backward()
        grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        ref = ref_tpa_loss(student, ids, cand, cm, am, teacher, kind="jsd")
        ref.backward()
        assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-12
        for g_lib, p in zip(grads, student.parameters()):
            assert float((g_lib - p.grad).abs().max()) <= 1e-11
        student.zero_grad()


@pytest.mark.parametrize("kind", ["rkl", "jsd", "skew_fkl", "tvd"])
def test_other_kinds_left_padding(kind):
    student, teacher = _models()
    ids, am, cm, cand = _batch("left", seed=1, d=2)
    e, s, t = _packed(student, teacher, ids, am, cm, cand)
    loss = ti.tpa_loss(s, t, e, kind=kind, temperature=1.5, beta=0.3, alpha=0.2)
    ref = ref_tpa_loss(student, ids, cand, cm, am, teacher, kind=kind, temperature=1.5, beta=0.3, alpha=0.2)
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-5
    assert float(ref.detach()) > 1e-3


def test_ground_truth_slots_equal_plain_forward():
    # the first T outputs of the packed forward are the plain padded causal forward's outputs
    student, _ = _models()
    ids, am, cm, cand = _batch("left", seed=2)
    e = ti.tpa_expand(ids, cand, cm, am)
    plain_e = ti.tpa_expand(ids, cand, torch.zeros_like(cm), am)
    with torch.no_grad():
        packed = student(e.input_ids, e.position_ids, e.attention_mask)
        plain = student(plain_e.input_ids, plain_e.position_ids, plain_e.attention_mask)
    real = am
    assert float((e.gather_gt(packed) - plain)[real].abs().max()) <= 1e-5


def test_concatenated_layout_equals_packed():
    # gt logits concatenated with a candidate-block tensor is the same layout
    student, teacher = _models()
    ids, am, cm, cand = _batch("right", seed=3)
    e, s, t = _packed(student, teacher, ids, am, cm, cand)
    T = ids.shape[1]
    s2 = torch.cat([e.gather_gt(s), s[:, T:]], dim=1)
    assert torch.equal(ti.tpa_loss(s2, t, e), ti.tpa_loss(s, t, e))


def test_num_items_and_no_candidates():
    student, teacher = _models()
    ids, am, cm, cand = _batch("ragged", seed=4)
    e, s, t = _packed(student, teacher, ids, am, cm, cand)
    n = int(cm.sum())
    full = ti.tpa_loss(s, t, e)
    torch.testing.assert_close(ti.tpa_loss(s, t, e, num_items=2 * n), full / 2)
    ref = ref_tpa_loss(student, ids, cand, cm, am, teacher, num_items=2 * n)
    assert abs(float(ti.tpa_loss(s, t, e, num_items=2 * n).detach()) - float(ref.detach())) <= 1e-5
    # no candidate at all: exactly 0 with zero gradients
    e0, s0, t0 = _packed(student, teacher, ids, am, torch.zeros_like(cm), cand)
    student.zero_grad()
    loss0 = ti.tpa_loss(s0, t0, e0)
    loss0.backward()
    assert loss0.item() == 0.0
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in student.parameters())
    assert ti.TPALoss()(s, t, e).item() == full.item()


def test_teacher_is_detached_and_expansion_type_checked():
    student, teacher = _models()
    ids, am, cm, cand = _batch("left", seed=5)
    e = ti.tpa_expand(ids, cand, cm, am)
    s = student(e.input_ids, e.position_ids, e.attention_mask)
    t = teacher(e.input_ids, e.position_ids, e.attention_mask)
    ti.tpa_loss(s, t, e).backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(TypeError, match="expansion"):
        ti.tpa_loss(s, t, "not an expansion")  # type: ignore[arg-type]


def test_vocab_policy():
    student, teacher = _models()
    ids, am, cm, cand = _batch("left", seed=6)
    e, s, t = _packed(student, teacher, ids, am, cm, cand)
    t_big = torch.cat([t, torch.randn(*t.shape[:2], 4)], dim=-1)
    with pytest.raises(ValueError, match=rf"{V}.*{V + 4}"):
        ti.tpa_loss(s, t_big, e)
    assert torch.equal(ti.tpa_loss(s, t_big, e, vocab_size=V), ti.tpa_loss(s, t, e))



@st.composite
def _configs(draw):
    B, T, d = draw(st.integers(1, 3)), draw(st.integers(2, 7)), draw(st.integers(1, 3))
    am, cm = padded_masks(draw, B, T)
    kind = draw(st.sampled_from(REF_KINDS))
    return B, T, d, am, cm, kind, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=10)
@given(_configs())
def test_packed_equals_separate_property(cfg):
    B, T, d, am, cm, kind, seed = cfg
    student, teacher = _models()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g).masked_fill(~am, 0)
    cand = torch.randint(1, V, (B, T, d), generator=g)
    e, s, t = _packed(student, teacher, ids, am, cm, cand)
    loss = ti.tpa_loss(s, t, e, kind=kind)
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    ref = ref_tpa_loss(student, ids, cand, cm, am, teacher, kind=kind)
    if not bool(cm.any()):
        assert loss.item() == 0.0 and ref.item() == 0.0
        return
    ref.backward()
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-5
    for g_lib, p in zip(grads, student.parameters()):
        assert float((g_lib - p.grad).abs().max()) <= 1e-5
