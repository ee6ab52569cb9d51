"""Attention probabilities of selected query rows at selected layers, without ``output_attentions``.

Inside ``with capture_attention(model, layer=l, query_mask=m) as cap:`` the text model runs
a registered attention function (``AttentionInterface.register`` plus
``AttentionMaskInterface.register``, so it receives the same masks as before). At every
layer it calls the model's original function (``eager`` or ``sdpa``) unchanged, so the
model's outputs do not change; only at the chosen layer(s) it first computes, from the
post-RoPE query ``q`` ``[B, Hq, L_q, D]`` and key ``k`` ``[B, Hkv, L_k, D]`` it receives
(GQA: query head ``h`` uses key head ``h // (Hq / Hkv)``), for the selected rows ``r``
only:

    A[b, h, r, k] = softmax_k( scale * q[b, h, r] . k[b, h // G, k] + mask[b, r, k] )

where ``mask`` is the additive (eager) or boolean (sdpa) mask the layer receives, or the
causal rule ``k <= r + (L_k - L_q)`` when sdpa skips the mask for a plain causal batch.
This equals eager ``output_attentions`` on those rows (before attention dropout) and costs
``O(B * H * rows * keys)`` memory at the captured layers only.

Only the first forward call at each captured layer is recorded (the ground-truth or packed
pass of a trainer step; a later candidate pass or decoding step is ignored). The text
config's attention implementation is restored on exit, also on exceptions, and the
registered names are removed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tokinteract import compat
from tokinteract._checks import check_bool, check_choice, check_tensor
from tokinteract.hf import _attn
from tokinteract.iva import visual_importance as _visual_importance

__all__ = ["AttentionCapture", "capture_attention"]


@dataclass(eq=False)
class AttentionCapture:
    """Rows of attention probabilities captured by :func:`capture_attention`.

    Attributes:
        layers: the captured layer indexes.
        heads: ``"all"`` (``[B, H, R, K]`` per layer) or ``"mean"`` (``[B, R, K]``).
        row_index: ``[B, R]`` query position of each captured row (0 in padding rows).
        row_mask: ``[B, R]`` True for a real captured row; ``R`` is the largest number of
            selected rows in a sequence.
        attns: layer -> fp32 probabilities; padding rows are all zero. Keys cover the whole
            key length of the captured forward (``T`` for a ground-truth pass, ``T2`` for a
            packed TPA pass, where instruction rows give the candidate slots 0).
    """

    layers: tuple[int, ...]
    heads: str
    row_index: Int[Tensor, "batch rows"]
    row_mask: Bool[Tensor, "batch rows"]
    attns: dict[int, Tensor] = field(default_factory=dict)

    def _layer(self, layer: int | None) -> int:
        if layer is None:
            if len(self.layers) != 1:
                raise ValueError(f"layer must be given when several layers were captured {self.layers}, got None")
            layer = self.layers[0]
        if layer not in self.attns:
            raise ValueError(
                f"layer {layer} was not captured (captured: {sorted(self.attns)} of requested {self.layers}); "
                "run the model inside the with-block"
            )
        return layer

    @property
    def attn(self) -> Tensor:
        """The captured probabilities of the single captured layer (``[B, H, R, K]`` or ``[B, R, K]``)."""
        return self.attns[self._layer(None)]

    def head_mean(self, layer: int | None = None) -> Float[Tensor, "batch rows keys"]:
        """Head-averaged probabilities ``(1/H) sum_h A[b, h, r, k]``."""
        a = self.attns[self._layer(layer)]
        return a.mean(1) if a.ndim == 4 else a

    def visual_importance(
        self,
        visual_mask: Bool[Tensor, "batch seq"],
        layer: int | None = None,
        *,
        normalize: bool = False,
    ) -> Float[Tensor, "batch keys"]:
        """:func:`tokinteract.visual_importance` of the captured rows: of those, the instruction
        rows after the sample's first visual token (:func:`tokinteract.instruction_rows`).

        ``visual_mask`` ``[B, T]`` may be shorter than the captured key length (a packed pass
        over ``T2`` keys); it is padded with False. Returns ``[B, K]``.
        """
        a = self.attns[self._layer(layer)]
        K = a.shape[-1]
        check_tensor("visual_mask", visual_mask, ndim=2)
        check_bool("visual_mask", visual_mask)
        if visual_mask.shape[1] > K:
            raise ValueError(f"visual_mask covers {visual_mask.shape[1]} positions but only {K} keys were captured")
        vm = visual_mask.to(a.device)
        if vm.shape[1] < K:
            vm = torch.cat([vm, vm.new_zeros(vm.shape[0], K - vm.shape[1])], dim=1)
        return _visual_importance(
            a, self.row_mask.to(a.device), vm, normalize=normalize, query_positions=self.row_index.to(a.device)
        )


def _rows(query_mask: Tensor) -> tuple[Tensor, Tensor]:
    counts = query_mask.sum(1)
    R = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort((~query_mask).to(torch.int8), dim=1, stable=True)[:, :R]
    row_mask = torch.arange(R, device=query_mask.device)[None, :] < counts[:, None]
    row_index = torch.where(row_mask, order, torch.zeros_like(order))
    return row_index, row_mask


def _record(
    cap: AttentionCapture,
    layer: int,
    query: Tensor,
    key: Tensor,
    attention_mask: Any,
    scaling: float | None,
    qlen_needed: int,
    detach: bool,
    softcap: float | None = None,
) -> None:
    B, Hq, Lq, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    if Lq < qlen_needed:
        raise ValueError(
            f"query_mask covers {qlen_needed} query positions but the first forward at layer {layer} has only {Lq}"
        )
    if cap.row_index.shape[0] != B:
        raise ValueError(f"query_mask has batch size {cap.row_index.shape[0]} but the forward has {B}")
    dev = query.device
    ri, rm = cap.row_index.to(dev), cap.row_mask.to(dev)
    R = ri.shape[1]
    G = Hq // Hkv
    scale = D**-0.5 if scaling is None else scaling
    qr = query.gather(2, ri[:, None, :, None].expand(B, Hq, R, D))
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        s = torch.einsum("bhgrd,bhkd->bhgrk", qr.reshape(B, Hkv, G, R, D), key).reshape(B, Hq, R, K) * scale
        s = s.float()
        if softcap is not None:  # attention-logit softcapping (Gemma-style), before the mask as in eager
            s = torch.tanh(s / softcap) * softcap
        if attention_mask is None:
            kpos = torch.arange(K, device=dev)
            allowed = kpos[None, None, :] <= (ri + (K - Lq))[:, :, None]
            s = s.masked_fill(~allowed[:, None], torch.finfo(s.dtype).min)
        elif isinstance(attention_mask, Tensor):
            m = attention_mask[..., :K].to(dev)
            m = m.expand(B, m.shape[1], m.shape[2], K)
            m = m.gather(2, ri[:, None, :, None].expand(B, m.shape[1], R, K))
            if m.dtype == torch.bool:
                s = s.masked_fill(~m, torch.finfo(s.dtype).min)
            else:
                s = s + m.float()
        else:
            raise ValueError(
                f"capture_attention needs a tensor mask (eager or sdpa), got {type(attention_mask).__name__}"
            )
        p = torch.softmax(s, dim=-1) * rm[:, None, :, None]
        if cap.heads == "mean":
            p = p.mean(1)
    cap.attns[layer] = p.detach() if detach else p


@contextmanager
def capture_attention(
    model: nn.Module,
    layer: int | Sequence[int] | None,
    query_mask: Bool[Tensor, "batch queries"],
    *,
    heads: str = "all",
    detach: bool = True,
) -> Iterator[AttentionCapture]:
    """Capture attention probabilities of the ``query_mask`` rows at ``layer`` (context manager).

    Example (the teacher's instruction-to-vision importance at ``l*`` for IVA)::

        with capture_attention(teacher, layer=l_star, query_mask=instruction_mask) as cap:
            t_out = teacher(input_ids=ids, attention_mask=am, pixel_values=px)
        weights = cap.visual_importance(visual_mask)            # [B, T] for tokinteract.iva_loss
        # or: tokinteract.visual_importance(cap.attn, cap.row_mask, visual_mask, query_positions=cap.row_index)

    Args:
        model: a Hugging Face causal LM or ``LlavaForConditionalGeneration`` whose text
            model uses ``eager`` or ``sdpa`` attention (the captured function delegates to it).
        layer: a text-layer index (negative counts from the end), a sequence of them, or
            ``None`` for every layer (one forward captures all, rows only).
        query_mask: ``[B, Q]`` True at the query rows to keep (e.g. instruction tokens),
            indexing the first ``Q`` query positions of the forward. For IVA, the user's words:
            :meth:`AttentionCapture.visual_importance` keeps those after the image.
        heads: ``"all"`` keeps ``[B, H, R, K]``; ``"mean"`` keeps the head average ``[B, R, K]``.
        detach: store detached probabilities (default); ``False`` keeps the graph.

    Yields:
        an :class:`AttentionCapture`, filled by the first forward inside the block.

    Raises:
        ValueError: if the text model's attention implementation is neither ``eager`` nor
            ``sdpa`` (nor another registered tokinteract function delegating to them), or
            ``layer`` is out of range.
    """
    check_tensor("query_mask", query_mask, ndim=2)
    check_bool("query_mask", query_mask)
    check_choice("heads", heads, ("all", "mean"))
    cfg = _attn.text_config(model)
    n_layers = int(cfg.num_hidden_layers)
    if layer is None:
        layers = tuple(range(n_layers))
    else:
        raw = (layer,) if isinstance(layer, int) else tuple(layer)
        if not raw or any(isinstance(x, bool) or not isinstance(x, int) for x in raw):
            raise TypeError(f"layer must be an int, a non-empty sequence of ints or None, got {layer!r}")
        bad = [x for x in raw if not -n_layers <= x < n_layers]
        if bad:
            raise ValueError(f"layer must lie in [-{n_layers}, {n_layers}) for a {n_layers}-layer text model, got {bad}")
        layers = tuple(sorted({x % n_layers for x in raw}))
    orig = _attn.attn_implementation(model)
    if orig in ("eager", "sdpa"):
        delegate = orig
        fixed_fn = None
    elif orig in _attn._DELEGATES:
        delegate = _attn._DELEGATES[orig]
        fixed_fn = compat.attention_function(orig)
    else:
        raise ValueError(
            f"capture_attention needs the text model to run 'eager' or 'sdpa' attention, got {orig!r}; "
            "switch with model.set_attn_implementation('sdpa')"
        )
    row_index, row_mask = _rows(query_mask)
    cap = AttentionCapture(layers=layers, heads=heads, row_index=row_index, row_mask=row_mask)
    wanted = set(layers)
    qlen = query_mask.shape[1]

    def capturing_attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Any,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> Any:
        idx = getattr(module, "layer_idx", None)
        if idx in wanted and idx not in cap.attns:
            _record(cap, idx, query, key, attention_mask, scaling, qlen, detach, kwargs.get("softcap"))
        fn = fixed_fn if fixed_fn is not None else _attn.original_function(module, delegate)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    name = _attn.unique_name("tokinteract_capture")
    _attn.register(name, capturing_attention, delegate)
    try:
        with _attn.use_attn_implementation(model, name):
            yield cap
    finally:
        _attn.unregister(name)
