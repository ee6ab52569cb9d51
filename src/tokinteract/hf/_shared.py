"""One weight gradient per shared weight for the cached TPA path (private).

The cached path calls the student twice with gradients: the ground-truth pass, then the
candidate block over its KV cache. Every weight used by both calls would get two gradient
tensors that autograd then adds: for each linear layer two ``[out, in]`` products and one
add, for the input embedding two dense ``[V, H]`` gradients (each zero-filled, then
scattered into) and one add.

Here the decoder's ``nn.Linear`` and ``nn.Embedding`` modules run as two linked autograd
nodes instead. The ground-truth node also returns a *link*: a placeholder tensor of the
weight's shape (zero strides, one element) that the candidate node takes as input. In the
backward the candidate node returns its weight gradient as the link's gradient
(``gy_c^T x_c`` for a linear layer, the dense embedding gradient of the candidate tokens for
an embedding), and the ground-truth node adds its own contribution into that buffer in place
(``addmm_`` / ``index_add_``), so autograd receives one gradient per weight. The link edge
orders the two backwards (the ground-truth node waits for the candidate node). Values are the
same sums, in another order (matmul rounding).

Only exact ``nn.Linear`` / ``nn.Embedding`` modules of the text decoder (and the LM head)
whose weight is a plain tensor that requires a gradient take part (no subclass such as a
scaled embedding, no module with its own ``forward`` attribute, e.g. an accelerate hook,
no embedding with ``max_norm``, ``scale_grad_by_freq`` or ``sparse``), and only with grad
mode on and autocast off; every other module runs as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SharedTape"]

_AUTOCAST = ("cpu", "cuda")

ENABLED = True
"""Off: every module runs as before (two gradients per shared weight); for benchmarks and tests."""


def _link(w: Tensor) -> Tensor:
    """A placeholder with ``w``'s shape and dtype holding one element (zero strides)."""
    return torch.empty_strided(w.shape, (0,) * w.dim(), dtype=w.dtype, device=w.device)


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _weight_grad(gy: Tensor, x: Tensor) -> Tensor:
    """``gy^T x`` over all leading dims: the weight gradient of ``x @ W.T``."""
    return _rows(gy).t().mm(_rows(x))


class _LinearFirst(torch.autograd.Function):
    """Ground-truth call of a linear layer: ``y = x W^T + b`` and links for ``W`` and ``b``."""

    @staticmethod
    def forward(ctx, x, w, b):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        y = F.linear(x, w, b)
        links = [_link(w)] + ([_link(b)] if b is not None else [])
        return (y, *links)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, g_lw=None, g_lb=None):  # type: ignore[override]
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if gy is not None and ctx.needs_input_grad[0]:
            gx = gy.matmul(w)
        if ctx.needs_input_grad[1]:
            if g_lw is None:
                gw = _weight_grad(gy, x) if gy is not None else None
            else:
                gw = g_lw if gy is None else g_lw.addmm_(_rows(gy).t(), _rows(x))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            own = _rows(gy).sum(0) if gy is not None else None
            gb = own if g_lb is None else (g_lb if own is None else g_lb.add_(own))
        return gx, gw, gb


class _LinearSecond(torch.autograd.Function):
    """Candidate call of a linear layer: ``y = x W^T + b``; the weight (and bias) gradients
    go to the links of the ground-truth call."""

    @staticmethod
    def forward(ctx, x, w, b, lw, lb):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return F.linear(x, w, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # type: ignore[override]
        if gy is None:
            return None, None, None, None, None
        x, w = ctx.saved_tensors
        gx = gy.matmul(w) if ctx.needs_input_grad[0] else None
        g_lw = _weight_grad(gy, x) if ctx.needs_input_grad[3] else None
        g_lb = _rows(gy).sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return gx, None, None, g_lw, g_lb


def _embedding_grad(gy: Tensor, ids: Tensor, num: int, padding_idx: int | None) -> Tensor:
    return torch.ops.aten.embedding_dense_backward(
        gy, ids, num, -1 if padding_idx is None else padding_idx, False
    )


class _EmbeddingFirst(torch.autograd.Function):
    """Ground-truth lookup ``W[ids]`` and a link for ``W``."""

    @staticmethod
    def forward(ctx, ids, w, padding_idx):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(ids)
        ctx.num, ctx.padding_idx = w.shape[0], padding_idx
        return F.embedding(ids, w, padding_idx), _link(w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, g_lw=None):  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1] or gy is None:
            return None, g_lw if ctx.needs_input_grad[1] else None, None
        if g_lw is None:
            return None, _embedding_grad(gy, ids, ctx.num, ctx.padding_idx), None
        g_lw.index_add_(0, ids.reshape(-1), _rows(gy).to(g_lw.dtype))
        if ctx.padding_idx is not None:
            g_lw[ctx.padding_idx] = 0  # the padding row gets no gradient (zero in both calls)
        return None, g_lw, None


class _EmbeddingSecond(torch.autograd.Function):
    """Candidate lookup ``W[ids]``; its dense gradient goes to the ground-truth call's link."""

    @staticmethod
    def forward(ctx, ids, w, padding_idx, lw):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(ids)
        ctx.num, ctx.padding_idx = w.shape[0], padding_idx
        return F.embedding(ids, w, padding_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # type: ignore[override]
        if gy is None or not ctx.needs_input_grad[3]:
            return None, None, None, None
        (ids,) = ctx.saved_tensors
        return None, None, None, _embedding_grad(gy, ids, ctx.num, ctx.padding_idx)


def _plain(t: Tensor | None) -> bool:
    return t is None or type(t.data) is torch.Tensor


def _eligible(m: nn.Module) -> bool:
    if "forward" in m.__dict__:  # someone else (accelerate, a profiler) replaced forward
        return False
    if type(m) is nn.Linear:
        b = m.bias
        return m.weight.requires_grad and _plain(m.weight) and _plain(b) and (b is None or b.requires_grad)
    if type(m) is nn.Embedding:
        return (
            m.weight.requires_grad and _plain(m.weight) and m.max_norm is None
            and not m.scale_grad_by_freq and not m.sparse
        )
    return False


def _modules(model: nn.Module) -> list[nn.Module]:
    """The modules both calls use: the text decoder's (embedding included) and the LM head."""
    roots: list[nn.Module] = []
    try:
        dec = model.get_decoder() if hasattr(model, "get_decoder") else model
    except Exception:  # noqa: BLE001 - exotic wrappers without a decoder rule: every module
        dec = model
    roots.append(dec if isinstance(dec, nn.Module) else model)
    for get in ("get_input_embeddings", "get_output_embeddings"):
        try:
            m = getattr(model, get)() if hasattr(model, get) else None
        except Exception:  # noqa: BLE001 - not implemented by some models
            m = None
        if isinstance(m, nn.Module):
            roots.append(m)
    seen: dict[int, nn.Module] = {}
    for r in roots:
        for m in r.modules():
            if id(m) not in seen and _eligible(m):
                seen[id(m)] = m
    return list(seen.values())


class SharedTape:
    """The links of one ground-truth pass, by module, for the candidate pass over its cache."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = _modules(model)
        self.links: dict[int, tuple[Tensor, ...]] = {}

    @staticmethod
    def active() -> bool:
        return ENABLED and torch.is_grad_enabled() and not any(map(torch.is_autocast_enabled, _AUTOCAST))

    def _first(self, m: nn.Module, x: Tensor) -> Tensor:
        if not self.active():
            return type(m).forward(m, x)
        if type(m) is nn.Embedding:
            y, lw = _EmbeddingFirst.apply(x, m.weight, m.padding_idx)
            self.links[id(m)] = (lw,)
            return y
        y, *links = _LinearFirst.apply(x, m.weight, m.bias)
        self.links[id(m)] = tuple(links)
        return y

    def _second(self, m: nn.Module, x: Tensor) -> Tensor:
        links = self.links.get(id(m))
        if links is None or not self.active():
            return type(m).forward(m, x)
        if type(m) is nn.Embedding:
            return _EmbeddingSecond.apply(x, m.weight.detach(), m.padding_idx, links[0])
        b = m.bias.detach() if m.bias is not None else None
        return _LinearSecond.apply(x, m.weight.detach(), b, links[0], links[1] if b is not None else None)

    @contextmanager
    def _patched(self, fn: Any) -> Iterator[None]:
        done: list[nn.Module] = []
        try:
            for m in self.modules:
                if "forward" in m.__dict__:
                    continue
                m.forward = (lambda mod: (lambda x: fn(mod, x)))(m)
                done.append(m)
            yield
        finally:
            for m in done:
                m.__dict__.pop("forward", None)

    def ground_truth(self) -> Any:
        """Context for the ground-truth pass: records a link per module call."""
        self.links.clear()
        return self._patched(self._first)

    def candidates(self) -> Any:
        """Context for a candidate pass: its weight gradients go to the ground-truth links."""
        return self._patched(self._second)
