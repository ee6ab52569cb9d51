"""capture_attention: rows of attention probabilities equal eager output_attentions."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from tokinteract import tpa_expand, visual_importance
from tokinteract.hf import capture_attention, packed_forward

ATOL = 1e-5


def _inputs(tiny, kind, padding, lengths=(10, 7), T=11):
    if kind == "llava":
        ids, am, px = tiny.image_batch(lengths, T, padding=padding)
        extra = {"pixel_values": px}
    else:
        ids, am = tiny.text_batch(lengths, T, padding=padding)
        extra = {}
    g = torch.Generator().manual_seed(4)
    qm = am & (torch.rand(am.shape, generator=g) < 0.5)
    qm[:, -1] = am[:, -1]
    return ids, am, extra, qm


def _eager_rows(model, ids, am, extra, layer):
    impl = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids, attention_mask=am, output_attentions=True, **extra)
    finally:
        model.set_attn_implementation(impl)
    return out.attentions[layer]


@pytest.mark.parametrize("heads", ["all", "mean"])
@pytest.mark.parametrize(
    "kind,attn,padding",
    [("qwen2", "sdpa", "left"), ("qwen2", "eager", "right"), ("qwen2", "sdpa", "none"),
     ("qwen3", "sdpa", "right"), ("llava", "sdpa", "left"), ("llava", "eager", "right")],
)
@torch.no_grad()
def test_capture_equals_eager_output_attentions(tiny, kind, attn, padding, heads):
    model = getattr(tiny, kind)(attn)
    lengths = (11, 11) if padding == "none" else (10, 7)
    ids, am, extra, qm = _inputs(tiny, kind, "right" if padding == "none" else padding, lengths=lengths)
    want_logits = model(input_ids=ids, attention_mask=am, **extra).logits
    layer = 1
    with capture_attention(model, layer=layer, query_mask=qm, heads=heads) as cap:
        logits = model(input_ids=ids, attention_mask=am, **extra).logits
    # every layer still runs its original attention: outputs are unchanged
    torch.testing.assert_close(logits, want_logits, atol=0, rtol=0)
    full = _eager_rows(model, ids, am, extra, layer)  # [B, H, T, T]
    B, H, T, _ = full.shape
    a = cap.attn
    assert a.shape == ((B, H, cap.row_index.shape[1], T) if heads == "all" else (B, cap.row_index.shape[1], T))
    for b in range(B):
        rows = qm[b].nonzero().flatten()
        n = rows.numel()
        assert torch.equal(cap.row_index[b, :n], rows) and bool(cap.row_mask[b, :n].all())
        want = full[b, :, rows]
        got = a[b, :, :n] if heads == "all" else a[b, :n]
        if heads == "mean":
            want = want.mean(0)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert bool((a[b, ..., n:, :] == 0).all()) if heads == "all" else bool((a[b, n:] == 0).all())
    # directly usable by visual_importance
    vm = torch.zeros_like(am)
    vm[:, 2:6] = True
    w = cap.visual_importance(vm)
    torch.testing.assert_close(w, visual_importance(full, qm, vm), atol=ATOL, rtol=0)
    torch.testing.assert_close(visual_importance(cap.attn, cap.row_mask, vm, query_positions=cap.row_index), w, atol=0, rtol=0)


@torch.no_grad()
def test_capture_all_layers_in_one_forward_and_gqa(tiny):
    model = tiny.qwen2("sdpa", num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1)
    ids, am, extra, qm = _inputs(tiny, "qwen2", "left")
    with capture_attention(model, layer=None, query_mask=qm) as cap:
        model(input_ids=ids, attention_mask=am)
    assert sorted(cap.attns) == [0, 1, 2]
    for layer in range(3):
        full = _eager_rows(model, ids, am, extra, layer)
        for b in range(2):
            rows = qm[b].nonzero().flatten()
            torch.testing.assert_close(cap.attns[layer][b, :, : rows.numel()], full[b, :, rows], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="layer must be given"):
        cap.attn


@torch.no_grad()
def test_capture_during_packed_tpa_forward(tiny):
    """Instruction rows of a packed pass see only ground-truth keys: same rows, zeros after T."""
    model = tiny.qwen2("eager")
    ids, am, extra, qm = _inputs(tiny, "qwen2", "right")
    cm = tiny.candidate_mask(am)
    cands = torch.randint(10, tiny.VOCAB, (*ids.shape, 2))
    exp = tpa_expand(ids, cands, cm, am)
    with capture_attention(model, layer=-1, query_mask=qm) as cap:
        packed_forward(model, exp)
    T = ids.shape[1]
    full = _eager_rows(model, ids, am, extra, 1)
    assert cap.attn.shape[-1] == exp.expanded_len
    assert bool((cap.attn[..., T:] == 0).all())
    for b in range(2):
        rows = qm[b].nonzero().flatten()
        torch.testing.assert_close(cap.attn[b, :, : rows.numel(), :T], full[b, :, rows], atol=ATOL, rtol=0)
    vm = torch.zeros_like(am)
    vm[:, 1:4] = True
    torch.testing.assert_close(cap.visual_importance(vm)[:, :T], visual_importance(full, qm, vm), atol=ATOL, rtol=0)


def test_capture_restores_implementation_on_exception(tiny):
    model = tiny.llava("sdpa")
    ids, am, extra, qm = _inputs(tiny, "llava", "right")
    before_mask = set(AttentionMaskInterface._global_mapping)
    before_attn = set(AttentionInterface._global_mapping)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(model, layer=0, query_mask=qm):
            assert model.config.text_config._attn_implementation.startswith("tokinteract_capture")
            assert model.config.vision_config._attn_implementation == "sdpa"
            raise RuntimeError("boom")
    assert model.config.text_config._attn_implementation == "sdpa"
    assert set(AttentionInterface._global_mapping) == before_attn
    assert set(AttentionMaskInterface._global_mapping) == before_mask


def test_capture_checks_arguments(tiny):
    model = tiny.qwen2("sdpa")
    ids, am, extra, qm = _inputs(tiny, "qwen2", "right")
    with pytest.raises(ValueError, match="layer must lie"):
        with capture_attention(model, layer=5, query_mask=qm):
            pass
    with pytest.raises(ValueError, match="heads"):
        with capture_attention(model, layer=0, query_mask=qm, heads="max"):
            pass
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="eager' or 'sdpa"):
        with capture_attention(model, layer=0, query_mask=qm):
            pass


@torch.no_grad()
def test_capture_composes_with_a_cached_teacher_forward(tiny):
    """The ground-truth pass is captured; the candidate pass that follows is ignored."""
    from tokinteract.hf import tpa_forward

    model = tiny.llava("sdpa")
    ids, am, extra, qm = _inputs(tiny, "llava", "left")
    cm = tiny.candidate_mask(am, skip_first=1 + tiny.PATCHES)
    exp = tpa_expand(ids, torch.randint(10, tiny.VOCAB, (*ids.shape, 2)), cm, am)
    for attention in ("dense", "prefix_self"):
        with capture_attention(model, layer=1, query_mask=qm) as cap:
            logits = tpa_forward(model, exp, mode="cached", attention=attention, **extra)
        torch.testing.assert_close(logits, packed_forward(model, exp, **extra), atol=ATOL, rtol=0)
        with capture_attention(model, layer=1, query_mask=qm) as ref:
            model(input_ids=ids, attention_mask=am, **extra)
        assert cap.attn.shape[-1] == ids.shape[1]
        for b in range(2):
            n = int(qm[b].sum())
            torch.testing.assert_close(cap.attn[b, :, :n], ref.attn[b, :, :n], atol=ATOL, rtol=0)
    assert model.config.text_config._attn_implementation == "sdpa"
