"""FlexAttention forward on CPU: the BlockMask path of packed_forward, without a GPU.

CPU FlexAttention has no backward pass, so only the forward is checked here; the GPU test in
test_hf_packed.py covers the same path on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from test_hf_packed import _build

from tokinteract import tpa_expand
from tokinteract.hf import _attn, packed_forward


@torch.no_grad()
@pytest.mark.parametrize("padding", ["left", "right"])
def test_flex_attention_forward_matches_sdpa_on_cpu(tiny, padding):
    model, ids, am, cm, cands, _ = _build(tiny, "qwen2", "sdpa", padding, lengths=(30, 17), T=32)
    exp = tpa_expand(ids, cands, cm, am)
    want = packed_forward(model, exp)
    # the ribbon matters: plain causal attention over the packed sequence gives other candidate logits
    causal = model(input_ids=exp.input_ids, position_ids=exp.position_ids).logits
    assert (causal[:, exp.seq_len :] - want[:, exp.seq_len :]).abs().max() > 1e-3
    model.set_attn_implementation("flex_attention")
    assert _attn.mask_format(model) == "block"
    got = packed_forward(model, exp)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@torch.no_grad()
def test_packed_forward_takes_a_shared_block_mask(tiny):
    """One ``ribbon_block_mask`` serves several packed forwards (e.g. student and teacher); a mask
    of another shape, or one given to a non-flex model, is refused with the argument's name."""
    from tokinteract.attention import ribbon_block_mask

    model, ids, am, cm, cands, _ = _build(tiny, "qwen2", "sdpa", "right", lengths=(30, 17), T=32)
    exp = tpa_expand(ids, cands, cm, am)
    want = packed_forward(model, exp)
    bm = ribbon_block_mask(exp)
    with pytest.raises(ValueError, match="block_mask is only used by flex_attention"):
        packed_forward(model, exp, block_mask=bm)
    model.set_attn_implementation("flex_attention")
    torch.testing.assert_close(packed_forward(model, exp, block_mask=bm), want, atol=1e-4, rtol=0)
    other = tpa_expand(ids[:1], cands[:1], cm[:1], am[:1])  # another batch size
    with pytest.raises(ValueError, match="block_mask must be a BlockMask of shape"):
        packed_forward(model, exp, block_mask=ribbon_block_mask(other))
    with pytest.raises(ValueError, match="block_mask must be a BlockMask"):
        packed_forward(model, exp, block_mask=exp.attention_mask)


@torch.no_grad()
@pytest.mark.parametrize("name", ["gemma3"])
def test_flex_attention_forward_per_family_on_cpu(name):
    """One BlockMask per layer type (Gemma 3: sliding windows, image blocks) reaches FlexAttention;
    a shared plain-ribbon block_mask is refused where the family adds rules to it. (transformers 5.24
    refuses flex_attention for the Qwen-VL text models itself.)"""
    from test_hf_families import _setup

    from tokinteract.attention import ribbon_block_mask

    model, batch, exp, extra = _setup(name, "sdpa", "left")
    want = packed_forward(model, exp, **extra)
    model.set_attn_implementation({"text_config": "flex_attention"})
    assert _attn.mask_format(model) == "block"
    got = packed_forward(model, exp, **extra)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    if name == "gemma3":
        with pytest.raises(ValueError, match="sliding windows or image blocks"):
            packed_forward(model, exp, block_mask=ribbon_block_mask(exp), **extra)
