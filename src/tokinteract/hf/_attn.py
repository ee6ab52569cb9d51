"""Attention-implementation plumbing shared by the Hugging Face adapter.

What each implementation honours for a custom 4D mask (transformers 5.x):

* ``eager``: an additive float mask (0 = attend, ``finfo(dtype).min`` = masked). A bool mask
  would silently be added as 0/1, so we always convert.
* ``sdpa``: a bool mask (True = attend).
* ``flex_attention``: a ``BlockMask`` built from the ribbon ``mask_mod`` (GPU; on CPU
  FlexAttention has no backward pass).
* ``flash_attention_*`` and unknown custom functions ignore or reinterpret a 4D mask:
  refused with an error that lists the implementations that work.

This module also owns the registered attention functions of the adapter: the
prefix-plus-self attention of the cached candidate pass and the row-capturing function of
:func:`tokinteract.hf.capture_attention`. Each is registered in both
``AttentionInterface`` and ``AttentionMaskInterface`` and is switched on only for the
duration of one forward, on the text model's config only, and restored in ``finally``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from tokinteract import compat

SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")
"""Attention implementations whose custom-mask handling the adapter knows to be exact."""

PREFIX_SELF = "tokinteract_prefix_self"

# registered name -> the implementation whose mask format it consumes ("eager" or "sdpa")
_DELEGATES: dict[str, str] = {}
_counter = itertools.count()


def text_config(model: nn.Module) -> Any:
    """The config whose ``_attn_implementation`` the language model reads.

    ``model.config.get_text_config()`` for composite models (``LlavaConfig.text_config``),
    the config itself for a bare causal LM.
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"model must be a Hugging Face PreTrainedModel with a .config, got {type(model).__name__}")
    getter = getattr(cfg, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else cfg


def attn_implementation(model: nn.Module) -> str:
    """The text model's attention implementation name (``None`` is reported as eager)."""
    impl = getattr(text_config(model), "_attn_implementation", None)
    return "eager" if impl is None else str(impl)


def mask_format(model: nn.Module) -> str:
    """``"float"``, ``"bool"`` or ``"block"``: the custom-mask format the text model honours.

    Raises:
        ValueError: for an implementation that cannot honour an arbitrary 4D mask
            (``flash_attention_2/3/4``, kernels from the hub, unknown custom functions).
            Layer types (sliding windows) are the family registry's concern
            (:mod:`tokinteract.hf.families`).
    """
    impl = attn_implementation(model)
    base = _DELEGATES.get(impl, impl)
    if base == "eager":
        return "float"
    if base == "sdpa":
        return "bool"
    if base == "flex_attention":
        return "block"
    raise ValueError(
        f"the model's attention implementation {impl!r} cannot honour the TPA ribbon mask "
        "(flash attention ignores custom 4D masks and treats non-increasing position ids as packed "
        "documents, so the logits would be silently wrong); supported implementations: "
        f"{list(SUPPORTED_IMPLEMENTATIONS)}. Switch with model.set_attn_implementation('sdpa') "
        "(or set it on the text config for a composite model)."
    )


def model_dtype(model: nn.Module) -> torch.dtype:
    """dtype of the text embeddings (the dtype the attention scores are computed in)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and hasattr(emb, "weight"):
        return emb.weight.dtype
    return next(model.parameters()).dtype


def model_device(model: nn.Module) -> torch.device:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and hasattr(emb, "weight"):
        return emb.weight.device
    return next(model.parameters()).device


def convert_mask(
    mask: Tensor,
    fmt: str,
    dtype: torch.dtype,
    mask_mod: Callable[..., Tensor] | None = None,
) -> Any:
    """Convert a bool ``[B, 1, Q, K]`` mask (True = attend) to ``fmt``.

    ``"float"``: additive with ``finfo(dtype).min`` (never ``-inf``: a row with no allowed
    key stays finite). ``"bool"``: as is. ``"block"``: a FlexAttention ``BlockMask`` from
    ``mask_mod`` (required), ``Q_LEN``/``KV_LEN`` from the mask's shape.
    """
    if fmt == "bool":
        return mask
    if fmt == "float":
        return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)
    if fmt == "block":
        if mask_mod is None:
            raise ValueError("flex_attention needs a mask_mod to build its BlockMask, got None")
        from torch.nn.attention.flex_attention import create_block_mask

        B, _, Q, K = mask.shape
        return create_block_mask(mask_mod, B=B, H=None, Q_LEN=Q, KV_LEN=K, device=mask.device)
    raise ValueError(f"fmt must be one of ('float', 'bool', 'block'), got {fmt!r}")


@contextmanager
def use_attn_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Temporarily set the text config's attention implementation to ``name``.

    Only the text config changes (a LLaVA vision tower keeps its own implementation); the
    previous value is restored on exit, also on exceptions.
    """
    cfg = text_config(model)
    old = compat.get_attn_implementation(cfg)
    compat.set_attn_implementation(cfg, name)
    try:
        yield
    finally:
        compat.set_attn_implementation(cfg, old)


def register(name: str, fn: Callable[..., Any], delegate: str) -> None:
    """Register ``fn`` as attention implementation ``name`` consuming ``delegate``'s masks."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[delegate])
    _DELEGATES[name] = delegate


def unregister(name: str) -> None:
    compat.unregister_attention(name)
    _DELEGATES.pop(name, None)


def unique_name(prefix: str) -> str:
    return f"{prefix}_{next(_counter)}"


def _generic_eager(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """``softmax(q k^T * scale + mask) v`` with GQA, softmax in fp32 (HF's eager recipe)."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    w = torch.matmul(query, k.transpose(2, 3)) * scale
    if attention_mask is not None:
        w = w + attention_mask[..., : k.shape[-2]]
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, v).transpose(1, 2).contiguous()
    return out, w


def original_function(module: nn.Module, impl: str) -> Callable[..., Any]:
    """The attention function ``module`` would call under implementation ``impl``."""
    if impl == "eager":
        fn = compat.eager_attention_function(module)
        return fn if fn is not None else _generic_eager
    return ALL_ATTENTION_FUNCTIONS[impl]


def prefix_self_attention(
    module: nn.Module,
    query: Float[Tensor, "batch heads queries hidden"],
    key: Float[Tensor, "batch _ keys hidden"],
    value: Float[Tensor, "batch _ keys hidden"],
    attention_mask: Bool[Tensor, "#batch 1 queries _"] | Float[Tensor, "#batch 1 queries _"] | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Float[Tensor, "batch queries heads hidden"], None]:
    """Attention of a candidate block over a cached prefix plus each query's own key.

    ``query`` holds ``N`` candidate tokens ``[B, Hq, N, D]``; ``key``/``value`` hold the
    ``P`` cached prefix tokens followed by the ``N`` candidates ``[B, Hkv, P + N, D]``
    (GQA not expanded: ``Hq = G * Hkv``). ``attention_mask`` covers the prefix only,
    ``[B, 1, N, P]`` (bool True = attend, or additive float). For query ``n`` and head
    ``h`` (kv head ``h // G``), with ``s = scale``:

        a_{n,p} = s * q_n . k_p + mask_{n,p}     (p < P)
        a_{n,*} = s * q_n . k_{P+n}              (its own key; always allowed)
        o_n = sum_p softmax(a)_{n,p} v_p + softmax(a)_{n,*} v_{P+n}

    One softmax over the ``P + 1`` logits; the ``N x N`` candidate block is never formed.
    This equals dense masked attention over ``P + N`` keys when each candidate may see
    only prefix keys and itself (the TPA ribbon rule).
    """
    B, Hq, N, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    P = K - N
    if P < 0 or Hq % Hkv:
        raise ValueError(
            f"prefix_self_attention expects key length >= query length and Hq divisible by Hkv, "
            f"got query {tuple(query.shape)}, key {tuple(key.shape)}"
        )
    if attention_mask is None or attention_mask.shape[-1] != P or attention_mask.shape[-2] != N:
        got = None if attention_mask is None else tuple(attention_mask.shape)
        raise ValueError(
            f"prefix_self_attention needs the prefix mask [B, 1, {N}, {P}] (candidate queries x cached "
            f"keys), got {got}; run it through tokinteract.hf.cached_candidate_forward"
        )
    G = Hq // Hkv
    scale = D**-0.5 if scaling is None else scaling
    sm_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.reshape(B, Hkv, G * N, D)
    kp, vp = key[:, :, :P], value[:, :, :P]
    ks, vs = key[:, :, P:], value[:, :, P:]
    # scores against the prefix [B, Hkv, G*N, P] and against its own key [B, Hkv, G, N, 1]
    s_prefix = (torch.matmul(q, kp.transpose(-1, -2)) * scale).to(sm_dtype).view(B, Hkv, G, N, P)
    s_self = ((query.reshape(B, Hkv, G, N, D) * ks[:, :, None]).sum(-1, keepdim=True) * scale).to(sm_dtype)
    m = attention_mask[:, :, None]  # [B, 1, 1, N, P]
    if m.dtype == torch.bool:
        s_prefix = s_prefix.masked_fill(~m, torch.finfo(sm_dtype).min)
    else:
        s_prefix = s_prefix + m.to(sm_dtype)
    # one softmax over the P + 1 logits, without concatenating them
    top = torch.maximum(s_prefix.amax(-1, keepdim=True), s_self).detach()
    e_prefix = torch.exp(s_prefix - top)
    e_self = torch.exp(s_self - top)
    z = e_prefix.sum(-1, keepdim=True) + e_self
    p_prefix = (e_prefix / z).to(query.dtype)
    p_self = (e_self / z).to(query.dtype)
    if dropout > 0.0 and module.training:
        keep = 1.0 - dropout
        p_prefix = p_prefix * (torch.rand_like(p_prefix) < keep) / keep
        p_self = p_self * (torch.rand_like(p_self) < keep) / keep
    out = torch.matmul(p_prefix.view(B, Hkv, G * N, P), vp).view(B, Hkv, G, N, D) + p_self * vs[:, :, None]
    out = out.reshape(B, Hq, N, D).transpose(1, 2).contiguous()
    return out, None


def ensure_prefix_self_registered() -> None:
    if not compat.is_attention_registered(PREFIX_SELF):
        register(PREFIX_SELF, prefix_self_attention, "sdpa")
