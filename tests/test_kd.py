"""sft_loss and kd_loss (Eq. 2) against loop references: values, gradients, masking, policies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokinteract as ti
from reference import REF_KINDS, ref_kd_loss, ref_sft_loss

B, T, V = 3, 7, 13


def _logits(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _labels(seed, b=B, t=T, v=V, p_ignore=0.35):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, v, (b, t), generator=g)
    drop = torch.rand(b, t, generator=g) < p_ignore
    lab[drop] = -100
    lab[:, 0] = -100  # a prompt token; nothing predicts position 0 anyway
    return lab


def test_shift_labels():
    lab = torch.tensor([[1, 2, 3], [4, -100, 6]])
    assert torch.equal(ti.shift_labels(lab), torch.tensor([[2, 3, -100], [-100, 6, -100]]))
    assert torch.equal(ti.shift_labels(lab, ignore_index=-1)[:, -1], torch.tensor([-1, -1]))


def test_sft_matches_reference_loss_and_grad():
    s = _logits((B, T, V), 0).requires_grad_()
    lab = _labels(1)
    loss = ti.sft_loss(s, lab)
    loss.backward()
    g = s.grad.clone()
    s.grad = None
    ref = ref_sft_loss(s, lab)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g.double(), s.grad.double(), atol=1e-7, rtol=1e-5)
    # positions whose next label is ignored get exactly zero gradient
    unsup = ti.shift_labels(lab) == -100
    assert torch.equal(g[unsup], torch.zeros_like(g[unsup]))
    assert ti.SFTLoss()(s, lab).item() == loss.item()


@pytest.mark.parametrize("kind", REF_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_matches_reference_loss_and_grad(kind, temperature):
    s = _logits((B, T, V), 2).requires_grad_()
    t = _logits((B, T, V), 3).requires_grad_()
    lab = _labels(4)
    opts = dict(kind=kind, temperature=temperature, beta=0.3, alpha=0.2)
    loss = ti.kd_loss(s, t, lab, **opts)
    loss.backward()
    g = s.grad.clone()
    assert t.grad is None or torch.equal(t.grad, torch.zeros_like(t.grad))  # teacher detached
    s.grad = None
    ref = ref_kd_loss(s, t, lab, **opts)
    ref.backward()
    assert float(ref.detach()) > 1e-3
    torch.testing.assert_close(loss.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(g.double(), s.grad.double(), atol=1e-7, rtol=1e-4)
    mod = ti.KDLoss(**opts)
    assert mod(s, t, lab).item() == loss.item()


def test_kd_bf16_inputs_compute_in_fp32():
    s, t, lab = _logits((B, T, V), 5).bfloat16(), _logits((B, T, V), 6).bfloat16(), _labels(7)
    loss = ti.kd_loss(s, t, lab)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_kd_loss(s, t, lab), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("fn", ["sft", "kd"])
def test_all_masked_is_exact_zero_with_zero_grad(fn):
    s = _logits((B, T, V), 8).requires_grad_()
    t = _logits((B, T, V), 9)
    lab = torch.full((B, T), -100)
    lab[:, 0] = 3  # only position 0 is labelled, and nothing predicts it
    loss = ti.sft_loss(s, lab) if fn == "sft" else ti.kd_loss(s, t, lab)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.equal(s.grad, torch.zeros_like(s.grad))
    ref = ref_sft_loss(s, lab) if fn == "sft" else ref_kd_loss(s, t, lab)
    assert ref.item() == 0.0


def test_masked_positions_may_hold_nonfinite_logits():
    # padding rows are never read: inf/NaN there neither raises nor leaks
    s, t, lab = _logits((B, T, V), 10).requires_grad_(), _logits((B, T, V), 11), _labels(12)
    unsup = ti.shift_labels(lab) == -100
    s_bad = torch.where(unsup[..., None], torch.full_like(s, float("nan")), s)
    t_bad = torch.where(unsup[..., None], torch.full_like(t, float("inf")), t)
    loss = ti.kd_loss(s_bad, t_bad, lab)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(loss.double(), ref_kd_loss(s, t, lab), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ti.sft_loss(s_bad, lab).double(), ref_sft_loss(s, lab), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fn", ["sft", "kd"])
def test_num_items_normalisation_and_accumulation(fn):
    s, t, lab = _logits((4, T, V), 13), _logits((4, T, V), 14), _labels(15, b=4)
    call = (lambda a, b, l, **k: ti.sft_loss(a, l, **k)) if fn == "sft" else ti.kd_loss
    n_valid = int((ti.shift_labels(lab) != -100).sum())
    full = call(s, t, lab)
    # explicit count equals the default
    torch.testing.assert_close(call(s, t, lab, num_items=n_valid), full)
    torch.testing.assert_close(call(s, t, lab, num_items=torch.tensor(n_valid)), full)
    # a global count: sum over micro-batches of loss(num_items=global) == full-batch loss
    parts = [call(s[i : i + 2], t[i : i + 2], lab[i : i + 2], num_items=n_valid) for i in (0, 2)]
    torch.testing.assert_close(parts[0] + parts[1], full, atol=1e-6, rtol=1e-6)
    # a different count rescales exactly
    torch.testing.assert_close(call(s, t, lab, num_items=2 * n_valid), full / 2)
    if fn == "kd":
        torch.testing.assert_close(call(s, t, lab, num_items=7).double(), ref_kd_loss(s, t, lab, num_items=7), atol=2e-6, rtol=1e-5)


def test_vocab_size_policy():
    s, t, lab = _logits((B, T, V), 16), _logits((B, T, V + 4), 17), _labels(18)
    with pytest.raises(ValueError) as info:
        ti.kd_loss(s, t, lab)
    assert str(V) in str(info.value) and str(V + 4) in str(info.value)
    out = ti.kd_loss(s, t, lab, vocab_size=V)
    torch.testing.assert_close(out.double(), ref_kd_loss(s, t[..., :V], lab), atol=2e-6, rtol=1e-5)
    out = ti.kd_loss(s, t, lab, vocab_size=V - 3)
    torch.testing.assert_close(out.double(), ref_kd_loss(s[..., : V - 3], t[..., : V - 3], lab), atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="vocab_size"):
        ti.kd_loss(s, t, lab, vocab_size=V + 1)


def test_ignore_index_option():
    s, t = _logits((B, T, V), 19), _logits((B, T, V), 20)
    lab = _labels(21)
    lab2 = lab.masked_fill(lab == -100, -1)
    torch.testing.assert_close(ti.kd_loss(s, t, lab2, ignore_index=-1), ti.kd_loss(s, t, lab))
    torch.testing.assert_close(ti.sft_loss(s, lab2, ignore_index=-1), ti.sft_loss(s, lab))


@settings(max_examples=20)
@given(
    seed=st.integers(0, 2**31 - 1),
    left=st.integers(0, 3),
    right=st.integers(0, 3),
    kind=st.sampled_from(REF_KINDS),
)
def test_padding_invariance(seed, left, right, kind):
    """Adding pad positions (arbitrary logits, ignored labels) on either side never changes the loss."""
    s, t, lab = _logits((2, 5, 7), seed), _logits((2, 5, 7), seed + 1), _labels(seed + 2, b=2, t=5, v=7)
    base_kd = ti.kd_loss(s, t, lab, kind=kind)
    base_sft = ti.sft_loss(s, lab)
    g = torch.Generator().manual_seed(seed + 3)

    def pad(x, fill=None):
        shape_l = (x.shape[0], left) + tuple(x.shape[2:])
        shape_r = (x.shape[0], right) + tuple(x.shape[2:])
        if fill is None:
            pl, pr = torch.randn(*shape_l, generator=g) * 50, torch.randn(*shape_r, generator=g) * 50
        else:
            pl, pr = torch.full(shape_l, fill), torch.full(shape_r, fill)
        return torch.cat([pl.to(x.dtype), x, pr.to(x.dtype)], dim=1)

    s2, t2, lab2 = pad(s), pad(t), pad(lab, -100)
    torch.testing.assert_close(ti.kd_loss(s2, t2, lab2, kind=kind), base_kd, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ti.sft_loss(s2, lab2), base_sft, atol=1e-6, rtol=1e-6)


def test_sft_label_out_of_range():
    s = _logits((B, T, V), 22)
    lab = _labels(23)
    lab[0, 3] = V
    with pytest.raises(ValueError, match="labels"):
        ti.sft_loss(s, lab)


def test_empty_sequence_gives_zero_not_an_index_error():
    s = torch.randn(2, 0, 7, requires_grad=True)
    t = torch.randn(2, 0, 7)
    lab = torch.zeros(2, 0, dtype=torch.long)
    assert ti.shift_labels(lab).shape == (2, 0)
    assert ti.kd_loss(s, t, lab).item() == 0.0
    assert ti.sft_loss(s, lab).item() == 0.0
