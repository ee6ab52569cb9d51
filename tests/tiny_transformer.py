"""A tiny causal transformer in plain torch, for exact TPA proofs.

``forward(input_ids [B, L], position_ids [B, L], attn_mask bool [B, 1, L, L]) -> logits [B, L, V]``
with ``attn_mask`` True = may attend. Rotary embeddings are applied from the explicit
``position_ids`` (so a token's output depends only on the set of keys it may attend to, their
tokens and their position ids: exactly what the ribbon mask must preserve). Attention is
computed explicitly (scores, ``masked_fill`` with ``-inf``, softmax); every row must allow at
least one key. Pre-norm blocks (LayerNorm), GELU MLP, untied LM head. Deterministic for a seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TinyTransformer", "rope"]


def rope(x: Tensor, position_ids: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate ``x [B, H, L, D]`` (D even) by angles ``position * base^(-2i/D)`` (half-split RoPE)."""
    D = x.shape[-1]
    half = D // 2
    dt = torch.promote_types(x.dtype, torch.float32)  # fp64 models get fp64 angles
    inv_freq = base ** (-torch.arange(half, dtype=dt, device=x.device) / half)
    ang = position_ids.to(dt)[:, None, :, None] * inv_freq  # [B, 1, L, half]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, position_ids: Tensor, attn_mask: Tensor) -> Tensor:
        B, L, C = x.shape
        H = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (z.reshape(B, L, H, C // H).transpose(1, 2) for z in (q, k, v))
        q, k = rope(q, position_ids), rope(k, position_ids)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(C // H)
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        att = torch.softmax(scores, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, L, C)
        x = x + self.out(y)
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Embedding, ``layers`` pre-norm attention+MLP blocks with RoPE, final norm, LM head."""

    def __init__(
        self, vocab: int = 17, dim: int = 32, heads: int = 4, layers: int = 2, *, seed: int = 0
    ) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim={dim} must split into {heads} heads of even size")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, dim)
            self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
            self.ln_f = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab)
        self.vocab = vocab

    def forward(self, input_ids: Tensor, position_ids: Tensor, attn_mask: Tensor) -> Tensor:
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be bool (True = attend), got {attn_mask.dtype}")
        if not bool(attn_mask.any(-1).all()):
            raise ValueError("every attention row must allow at least one key")
        x = self.embed(input_ids)
        for blk in self.blocks:
            x = blk(x, position_ids, attn_mask)
        return self.head(self.ln_f(x))
