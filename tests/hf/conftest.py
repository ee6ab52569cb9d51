"""Tiny random Hugging Face models built from configs (no downloads) and batch helpers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)

VOCAB = 96
IMAGE_TOKEN = 7
PATCHES = 4  # 16x16 image, 8x8 patches


def qwen2_config(**kw):
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return Qwen2Config(**base)


def make_qwen2(attn: str = "sdpa", seed: int = 0, **kw) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM._from_config(qwen2_config(**kw), attn_implementation=attn).eval()


def make_qwen3(attn: str = "sdpa", seed: int = 0, **kw) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        pad_token_id=0, tie_word_embeddings=False,
    )
    base.update(kw)
    return Qwen3ForCausalLM._from_config(Qwen3Config(**base), attn_implementation=attn).eval()


def make_llama(attn: str = "sdpa", seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaForCausalLM._from_config(LlamaConfig(**base), attn_implementation=attn).eval()


def make_llava(attn: str = "sdpa", seed: int = 0, layers: int = 2) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vc = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=8, num_channels=3,
    )
    cfg = LlavaConfig(
        vision_config=vc, text_config=qwen2_config(num_hidden_layers=layers), image_token_id=IMAGE_TOKEN,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


def text_batch(lengths, T, *, padding="right", seed=0, low=10):
    """Random ids [B, T] with the given real lengths, padded with 0 on ``padding`` side."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.zeros(B, T, dtype=torch.long)
    am = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        toks = torch.randint(low, VOCAB, (n,), generator=g)
        sl = slice(0, n) if padding == "right" else slice(T - n, T)
        ids[b, sl] = toks
        am[b, sl] = True
    return ids, am


def image_batch(lengths, T, *, padding="right", seed=0):
    """Like ``text_batch`` with the PATCHES image tokens right after a first text token."""
    ids, am = text_batch(lengths, T, padding=padding, seed=seed)
    for b in range(len(lengths)):
        first = int(am[b].nonzero()[0])
        ids[b, first + 1 : first + 1 + PATCHES] = IMAGE_TOKEN
    g = torch.Generator().manual_seed(seed + 1)
    px = torch.randn(len(lengths), 3, 16, 16, generator=g)
    return ids, am, px


def candidate_mask(am, *, skip_first=0, seed=0, p=0.7):
    """Random candidate positions: real tokens, not the last real one, after ``skip_first`` reals."""
    g = torch.Generator().manual_seed(seed)
    cm = torch.rand(am.shape, generator=g) < p
    rank = am.long().cumsum(1) - 1
    n = am.sum(1, keepdim=True)
    cm &= am & (rank >= skip_first) & (rank < n - 1)
    cm[:, -1] = False
    return cm


@pytest.fixture
def tiny():
    return SimpleNamespace(
        qwen2=make_qwen2, qwen3=make_qwen3, llama=make_llama, llava=make_llava, text_batch=text_batch,
        image_batch=image_batch, candidate_mask=candidate_mask, VOCAB=VOCAB, IMAGE_TOKEN=IMAGE_TOKEN,
        PATCHES=PATCHES,
    )
