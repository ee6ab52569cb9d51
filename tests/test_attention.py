"""The FlexAttention BlockMask of the ribbon mask (construction on CPU; training is GPU-only)."""

from __future__ import annotations

import warnings

import pytest
import torch

import tokinteract as ti
from tokinteract.attention import padded_ribbon_mask_mod, ribbon_block_mask


def _expansion(B=2, T=11, d=3, seed=0, left_pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.bool)
    if left_pad:
        am[1, :3] = False
    cm = (torch.rand(B, T, generator=g) < 0.5) & am
    cm[:, -1] = False
    cands = torch.randint(0, 50, (B, T, d), generator=g)
    return ti.tpa_expand(ids, cands, cm, am)


def _dense_from_mod(mod, B, n):
    q = torch.arange(n)[:, None].expand(n, n)
    k = torch.arange(n)[None, :].expand(n, n)
    return torch.stack([mod(torch.full_like(q, b), torch.zeros_like(q), q, k) for b in range(B)])


def test_padded_mask_mod_equals_dense_mask_and_pads_to_self_only():
    ex = _expansion()
    B, T2 = ex.input_ids.shape
    mod = padded_ribbon_mask_mod(ex, multiple=16)
    n = -(-T2 // 16) * 16
    assert n > T2  # the test exercises a real padded tail
    dense = _dense_from_mod(mod, B, n)
    assert torch.equal(dense[:, :T2, :T2], ex.attention_mask[:, 0])
    tail = dense[:, T2:, :]
    assert torch.equal(tail, torch.eye(n, dtype=torch.bool)[T2:].expand(B, -1, -1))
    assert not bool(dense[:, :T2, T2:].any())


@pytest.mark.parametrize("block", [4, 16])
def test_block_mask_blocks_cover_exactly_the_nonempty_blocks(block):
    ex = _expansion(T=13, d=2, seed=1)
    B, T2 = ex.input_ids.shape
    bm = ribbon_block_mask(ex, block_size=block)
    assert bm.seq_lengths == (T2, T2)
    n = -(-T2 // block)
    dense = torch.zeros(B, n * block, n * block, dtype=torch.bool)
    dense[:, :T2, :T2] = ex.attention_mask[:, 0]
    want = dense.reshape(B, n, block, n, block).any(4).any(2)
    got = bm.to_dense()[:, 0].bool()
    assert torch.equal(got, want)
    # the ribbon is sparse: some blocks are skipped at this size
    if block == 4:
        assert not bool(want.all())


def test_eager_flex_forward_matches_dense_sdpa_on_cpu():
    from torch.nn.attention.flex_attention import flex_attention

    ex = _expansion(T=9, d=2, seed=2)
    B, T2 = ex.input_ids.shape
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, 2, T2, 8, generator=g) for _ in range(3))
    bm = ribbon_block_mask(ex, block_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
        out = flex_attention(q, k, v, block_mask=bm)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ex.attention_mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_errors():
    ex = _expansion()
    with pytest.raises(TypeError, match="expansion"):
        ribbon_block_mask(ex.attention_mask)
    with pytest.raises(ValueError, match="block_size"):
        ribbon_block_mask(ex, block_size=0)
    with pytest.raises(ValueError, match="multiple"):
        padded_ribbon_mask_mod(ex, multiple=0)
