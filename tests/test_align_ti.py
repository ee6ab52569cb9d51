"""AlignTILoss (Eq. 8): parts, switches, required inputs, and totals equal to the references."""

from __future__ import annotations

import pytest
import torch

import tokinteract as ti
from reference import ref_iva_loss, ref_kd_loss, ref_sft_loss, ref_tpa_loss
from tiny_transformer import TinyTransformer

V = 17


def _setup(seed=0, d=2):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 8
    ids = torch.randint(1, V, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.bool)
    am[0, :3] = False  # left padding
    am[2, :1] = False
    ids = ids.masked_fill(~am, 0)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt (and image) part
    labels[~am] = -100
    labels[1, 6] = -100  # a hole in the response
    cm = ti.shift_labels(labels) != -100
    cand = torch.randint(1, V, (B, T, d), generator=g)
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, 1:4] = True
    vis &= am
    attn = torch.softmax(torch.randn(B, 2, T, T, generator=g), -1)
    instr = torch.zeros(B, T, dtype=torch.bool)
    instr[:, 3] = True
    w = ti.visual_importance(attn, instr, vis, normalize=True)
    return ids, am, labels, cm, cand, w


def _plain_mask(am):
    T = am.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    m = causal & am[:, None, :] & am[:, :, None]
    return (m | torch.eye(T, dtype=torch.bool))[:, None]


def _plain_positions(am):
    return (am.long().cumsum(1) - 1).masked_fill(~am, 1)


def test_full_objective_with_expansion_equals_sum_of_references():
    student, teacher = TinyTransformer(vocab=V, seed=0), TinyTransformer(vocab=V, seed=1)
    ids, am, labels, cm, cand, w = _setup()
    e = ti.tpa_expand(ids, cand, cm, am)
    s = student(e.input_ids, e.position_ids, e.attention_mask)
    with torch.no_grad():
        t = teacher(e.input_ids, e.position_ids, e.attention_mask)
    loss_fn = ti.AlignTILoss()
    total, parts = loss_fn(s, t, labels, expansion=e, visual_weights=w)
    assert set(parts) == {"sft", "kd", "iva", "tpa"}
    assert all(not p.requires_grad for p in parts.values())
    total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    # references: a plain padded forward for sft/kd/iva, separate sequences for tpa
    s_plain = student(ids, _plain_positions(am), _plain_mask(am))
    with torch.no_grad():
        t_plain = teacher(ids, _plain_positions(am), _plain_mask(am))
    refs = {
        "sft": ref_sft_loss(s_plain, labels),
        "kd": ref_kd_loss(s_plain, t_plain, labels),
        "iva": ref_iva_loss(s_plain, t_plain, w),
        "tpa": ref_tpa_loss(student, ids, cand, cm, am, teacher),
    }
    for k, r in refs.items():
        assert abs(float(parts[k]) - float(r.detach())) <= 1e-5, k
        assert float(r.detach()) > 1e-3, k
    ref_total = sum(refs.values())
    assert abs(float(total.detach()) - float(ref_total.detach())) <= 2e-5
    ref_total.backward()
    for n, p in student.named_parameters():
        assert float((grads[n] - p.grad).abs().max()) <= 1e-5, n


def test_weights_scale_and_switch_parts_off():
    g = torch.Generator().manual_seed(1)
    B, T = 2, 6
    s, t = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    w = ti.uniform_visual_weights(torch.tensor([[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool))
    total, parts = ti.AlignTILoss(sft=0.5, kd=2.0, iva=3.0, tpa=0.0)(s, t, labels, visual_weights=w)
    assert set(parts) == {"sft", "kd", "iva"}
    expect = 0.5 * ref_sft_loss(s, labels) + 2.0 * ref_kd_loss(s, t, labels) + 3.0 * ref_iva_loss(s, t, w)
    assert float(total) == pytest.approx(float(expect), abs=1e-5)
    # SFT only: no teacher needed
    total, parts = ti.AlignTILoss(kd=0, iva=0, tpa=0)(s, None, labels)
    assert set(parts) == {"sft"} and float(total) == pytest.approx(float(ref_sft_loss(s, labels)), abs=1e-6)
    # KD with another divergence kind
    total, parts = ti.AlignTILoss(sft=0, iva=0, tpa=0, kind="rkl", temperature=2.0)(s, t, labels)
    assert float(total) == pytest.approx(float(ref_kd_loss(s, t, labels, kind="rkl", temperature=2.0)), abs=1e-5)
    assert ti.AlignTILoss(iva=0, tpa=0).enabled == ("sft", "kd")


def test_required_inputs_and_bad_weights():
    s, t = torch.randn(2, 5, V), torch.randn(2, 5, V)
    labels = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match="teacher_logits"):
        ti.AlignTILoss(iva=0, tpa=0)(s, None, labels)
    # an explicit weight requires its input ...
    with pytest.raises(ValueError, match="expansion"):
        ti.AlignTILoss(iva=0, tpa=1)(s, t, labels)
    with pytest.raises(ValueError, match="visual_weights"):
        ti.AlignTILoss(tpa=0, iva=1)(s, t, labels)
    with pytest.raises(ValueError, match="expansion"):
        ti.AlignTILoss(iva=0, tpa=0.5, backend="chunked")(s, t, labels)
    with pytest.raises(ValueError, match="weight 0|at least one"):
        ti.AlignTILoss(sft=0, kd=0, iva=0, tpa=0)(s, t, labels)
    with pytest.raises(ValueError, match="kd"):
        ti.AlignTILoss(kd=-1.0)
    with pytest.raises(TypeError, match="sft"):
        ti.AlignTILoss(sft="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        ti.AlignTILoss(kind="kl")


def test_num_items_reaches_sft_kd_tpa_and_num_sequences_iva():
    student, teacher = TinyTransformer(vocab=V, seed=0), TinyTransformer(vocab=V, seed=1)
    ids, am, labels, cm, cand, w = _setup(seed=2)
    e = ti.tpa_expand(ids, cand, cm, am)
    with torch.no_grad():
        s = student(e.input_ids, e.position_ids, e.attention_mask)
        t = teacher(e.input_ids, e.position_ids, e.attention_mask)
    _, base = ti.AlignTILoss()(s, t, labels, expansion=e, visual_weights=w)
    n = int(cm.sum())
    _, scaled = ti.AlignTILoss()(s, t, labels, expansion=e, visual_weights=w, num_items=4 * n, num_sequences=6)
    for k in ("sft", "kd", "tpa"):
        torch.testing.assert_close(scaled[k], base[k] / 4)
    torch.testing.assert_close(scaled["iva"], base["iva"] * 3 / 6)


def test_defaults_work_on_text_only_data():
    """IVA and TPA left at their default are off without their input; SFT + KD remain."""
    s, t = torch.randn(2, 5, V), torch.randn(2, 5, V)
    labels = torch.randint(0, V, (2, 5))
    labels[:, :2] = -100
    for backend in ("eager", "chunked"):
        total, parts = ti.AlignTILoss(backend=backend)(s, t, labels)
        assert set(parts) == {"sft", "kd"}
        expect = ref_sft_loss(s, labels) + ref_kd_loss(s, t, labels)
        assert float(total) == pytest.approx(float(expect), abs=1e-5)
    # the teacher stays required while KD is on, default or not
    with pytest.raises(ValueError, match="teacher_logits"):
        ti.AlignTILoss()(s, None, labels)
    # a visual weight given turns IVA on at its default weight
    w = torch.rand(2, 5)
    _, parts = ti.AlignTILoss()(s, t, labels, visual_weights=w)
    assert set(parts) == {"sft", "kd", "iva"}
