"""Model families the adapter runs exactly, and how each builds its positions and masks.

Every TPA pass of :mod:`tokinteract.hf` must reproduce, for every row, what the model itself
computes on the sequence "ground-truth prefix up to ``t``, then the candidate". Plain causal
attention and one sequential row of position ids are not what every model uses; a family
entry says what its model adds:

* ``positions``: how the model numbers the ground truth. ``"sequential"``: ``cumsum(mask) -
  1`` (one row). ``"rope_index"``: the model's own ``get_rope_index`` (the multimodal RoPE
  rows of Qwen-VL models, from ``image_grid_thw`` / ``video_grid_thw`` /
  ``mm_token_type_ids`` / ``second_per_grid_ts``, whatever the installed version takes).
  Candidates then take positions by :func:`tokinteract.positions.next_position_ids`.
* ``sliding_window``: layers of type ``sliding_attention`` see a key only when
  ``position(q) - position(k) < sliding_window`` (in sequence positions, as in an unpadded
  sequence), on top of the ribbon rule.
* ``image_blocks``: ground-truth tokens of one image attend to each other bidirectionally
  (Gemma 3, from ``token_type_ids == 1``); a candidate never splits such a block.
* ``consumed``: per-token inputs the adapter reads to build positions or masks and does not
  forward (they describe the ground truth, not the packed sequence).

A model whose ``config.model_type`` is not registered is refused, and so is any option a
family entry cannot honour (flash attention, chunked attention layers, logit softcapping in
the attention, bidirectional text attention). Adding a family is one :class:`Family` entry in
:data:`FAMILIES` plus its tests (``tests/hf/test_hf_families.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "FAMILIES", "Family", "check_options", "family_of", "image_grids", "supported_model_types", "visual_token_ids",
]


@dataclass(frozen=True)
class Family:
    """How one model family builds positions and attention masks.

    Attributes:
        name: display name, e.g. ``"Qwen2.5-VL"``.
        model_types: the ``config.model_type`` values of the family (top-level config).
        positions: ``"sequential"`` or ``"rope_index"`` (see the module docstring).
        image_blocks: ground-truth image tokens attend bidirectionally within one image,
            marked by ``token_type_ids == 1`` (honoured only when ``token_type_ids`` is given,
            as the model itself does).
        consumed: model inputs read by the adapter and not forwarded to the model.
        visual_token_attrs: config attributes holding visual placeholder token ids.
    """

    name: str
    model_types: tuple[str, ...]
    positions: str = "sequential"
    image_blocks: bool = False
    consumed: tuple[str, ...] = ()
    visual_token_attrs: tuple[str, ...] = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


FAMILIES: tuple[Family, ...] = (
    Family("Qwen2 / Qwen3 / Llama (text)", ("qwen2", "qwen3", "llama")),
    Family("Gemma 3 (text)", ("gemma3_text",)),
    Family("LLaVA", ("llava",)),
    Family("LLaVA-NeXT", ("llava_next",)),
    Family("LLaVA-OneVision", ("llava_onevision",)),
    Family("Idefics3", ("idefics3",)),
    Family("SmolVLM", ("smolvlm",)),
    Family("InternVL", ("internvl",)),
    Family("Qwen2-VL", ("qwen2_vl",), positions="rope_index", consumed=("mm_token_type_ids",)),
    Family("Qwen2.5-VL", ("qwen2_5_vl",), positions="rope_index", consumed=("mm_token_type_ids",)),
    Family("Qwen3-VL", ("qwen3_vl",), positions="rope_index", consumed=("mm_token_type_ids",)),
    Family("Gemma 3", ("gemma3",), image_blocks=True, consumed=("token_type_ids",)),
)
"""The registry: one entry per family the adapter runs exactly (tested per family)."""


def supported_model_types() -> tuple[str, ...]:
    """Every ``config.model_type`` the adapter accepts."""
    return tuple(t for f in FAMILIES for t in f.model_types)


def family_of(model: nn.Module) -> Family:
    """The registered :class:`Family` of ``model`` (by ``config.model_type``).

    Raises:
        ValueError: for a model type that is not registered, naming it and listing the
            supported ones.
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"model must be a Hugging Face PreTrainedModel with a .config, got {type(model).__name__}")
    mt = getattr(cfg, "model_type", None)
    for fam in FAMILIES:
        if mt in fam.model_types:
            return fam
    raise ValueError(
        f"tokinteract.hf does not know the model family {mt!r} ({type(model).__name__}): its positions or "
        "masks may differ from plain causal attention, so its TPA passes could be silently wrong. Supported "
        f"model types: {list(supported_model_types())}. Adding a family is one entry in "
        "tokinteract.hf.families.FAMILIES plus its tests."
    )


def visual_token_ids(model: nn.Module) -> tuple[int, ...]:
    """The visual placeholder token ids of ``model`` (image and video), from its config."""
    fam = family_of(model)
    cfg = model.config
    ids = []
    for attr in fam.visual_token_attrs:
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v >= 0 and v not in ids:
            ids.append(v)
    return tuple(ids)


# --- positions -----------------------------------------------------------------------------


def _rope_index_fn(model: nn.Module) -> Callable[..., Any]:
    for m in (model, getattr(model, "model", None)):
        fn = getattr(m, "get_rope_index", None)
        if callable(fn):
            return fn
    raise ValueError(f"{type(model).__name__} has no get_rope_index; cannot build its multimodal RoPE positions")


def _mm_token_types(model: nn.Module, input_ids: Tensor, inputs: Mapping[str, Any]) -> Tensor:
    tt = inputs.get("mm_token_type_ids")
    if tt is not None:
        if not isinstance(tt, Tensor) or tuple(tt.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"mm_token_type_ids must be a tensor of the ground truth's shape {tuple(input_ids.shape)}, "
                f"got {tuple(tt.shape) if isinstance(tt, Tensor) else type(tt).__name__}"
            )
        return tt.to(input_ids.device)
    vis = visual_token_ids(model)
    if vis and bool(torch.isin(input_ids, torch.tensor(vis, device=input_ids.device)).any()):
        raise ValueError(
            f"{type(model).__name__} numbers image/video tokens with multimodal RoPE from mm_token_type_ids: pass "
            "the processor's mm_token_type_ids (text 0, image 1, video 2) with the batch"
        )
    return torch.zeros_like(input_ids)


def text_mask(model: nn.Module, input_ids: Tensor, inputs: Mapping[str, Any]) -> Tensor | None:
    """Bool ``[B, T]``: which ground-truth tokens are text (None: one sequential row, all alike)."""
    if family_of(model).positions != "rope_index":
        return None
    return _mm_token_types(model, input_ids, inputs) == 0


def ground_truth_positions(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, inputs: Mapping[str, Any]
) -> Tensor:
    """``[R, B, T]`` position ids the model gives the (padded) ground truth on its real tokens.

    ``"sequential"``: one row, ``cumsum(mask) - 1`` (1 on pads). ``"rope_index"``: the
    model's ``get_rope_index`` with the inputs its installed signature takes.
    """
    am = attention_mask.bool()
    seq = am.long().cumsum(1) - 1
    seq = seq.masked_fill(~am, 1)
    fam = family_of(model)
    if fam.positions == "sequential":
        return seq[None]
    fn = _rope_index_fn(model)
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = {"mm_token_type_ids": _mm_token_types(model, input_ids, inputs), "attention_mask": am.long()}
    for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
        if inputs.get(name) is not None:
            if name not in params:
                raise ValueError(
                    f"{type(model).__name__}.get_rope_index of this transformers version does not take {name}; "
                    "tokinteract.hf cannot reproduce its positions for these inputs"
                )
            kw[name] = inputs[name]
    kw = {k: v for k, v in kw.items() if k in params or any(p.kind is p.VAR_KEYWORD for p in params.values())}
    pos, _ = fn(input_ids, **kw)
    if not isinstance(pos, Tensor) or pos.ndim != 3 or tuple(pos.shape[1:]) != tuple(input_ids.shape):
        raise ValueError(
            f"{type(model).__name__}.get_rope_index returned {getattr(pos, 'shape', type(pos))}; expected "
            f"[rows, {input_ids.shape[0]}, {input_ids.shape[1]}]"
        )
    return pos.to(input_ids.device)


# --- masks ---------------------------------------------------------------------------------


def image_blocks(model: nn.Module, inputs: Mapping[str, Any], shape: tuple[int, int]) -> Tensor | None:
    """``[B, T]`` id of the image each ground-truth token belongs to (-1: none), or None.

    As Gemma 3 builds it from ``token_type_ids``: a block starts at an image token whose
    predecessor is not one. None when the family has no bidirectional image blocks or no
    ``token_type_ids`` was given (the model is then causal too).
    """
    if not family_of(model).image_blocks:
        return None
    tt = inputs.get("token_type_ids")
    if tt is None:
        return None
    if not isinstance(tt, Tensor) or tuple(tt.shape) != tuple(shape):
        raise ValueError(
            f"token_type_ids must be a tensor of the ground truth's shape {tuple(shape)}, "
            f"got {tuple(tt.shape) if isinstance(tt, Tensor) else type(tt).__name__}"
        )
    img = tt == 1
    prev = torch.nn.functional.pad(img, (1, 0), value=False)[:, :-1]
    group = (img & ~prev).long().cumsum(1) - 1
    return torch.where(img, group, torch.full_like(group, -1))


def layer_windows(model: nn.Module) -> dict[str, int | None]:
    """Layer type -> sliding window (None: full attention) of the text model.

    Raises:
        ValueError: for layer types other than full and sliding attention, or options the
            adapter cannot honour.
    """
    from tokinteract.hf import _attn

    cfg = _attn.text_config(model)
    types = tuple(getattr(cfg, "layer_types", None) or ("full_attention",))
    out: dict[str, int | None] = {}
    for t in dict.fromkeys(types):
        if t == "full_attention":
            out[t] = None
        elif t == "sliding_attention":
            w = getattr(cfg, "sliding_window", None)
            if not isinstance(w, int) or w < 1:
                raise ValueError(f"the text model has sliding_attention layers but sliding_window={w!r}")
            out[t] = w
        else:
            raise ValueError(
                f"the text model has {t!r} layers; tokinteract.hf reproduces only 'full_attention' and "
                "'sliding_attention' layers exactly"
            )
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True (a bidirectional text model) cannot run the TPA ribbon mask")
    return out


def check_options(model: nn.Module, *, output: str = "logits", attention: str | None = None) -> Family:
    """The family of ``model`` after checking every option the adapter must honour.

    Raises:
        ValueError: unknown family; final-logit softcapping with ``output="hidden"`` (the
            fused losses apply the LM head themselves); attention-logit softcapping with the
            ``prefix_self`` candidate attention.
    """
    from tokinteract.hf import _attn

    fam = family_of(model)
    layer_windows(model)
    cfg = _attn.text_config(model)
    if output == "hidden" and getattr(cfg, "final_logit_softcapping", None) is not None:
        raise ValueError(
            f"{fam.name}: final_logit_softcapping={cfg.final_logit_softcapping} is applied by the model after its "
            "LM head; output='hidden' (the fused losses) would skip it. Use output='logits'."
        )
    if attention == "prefix_self" and getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"{fam.name}: attn_logit_softcapping={cfg.attn_logit_softcapping} is not implemented by the "
            "prefix_self candidate attention; use attention='dense'"
        )
    return fam


# --- visual grids ------------------------------------------------------------------------------

GRID_MODEL_TYPES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
"""Families whose images are each one grid of visual tokens, row-major (:func:`image_grids`)."""


def image_grids(model: nn.Module, inputs: Mapping[str, Any], visual_mask: Tensor) -> list[list[tuple[int, int]]]:
    """``(height, width)`` of the visual-token grid of each image of each sample, in sequence order.

    * LLaVA: every image is the vision tower's square patch grid ``(image_size // patch_size)``
      squared (SigLIP with ``vision_feature_select_strategy="full"``, or a CLS tower with
      ``"default"``, which drops the CLS token); the images of a sample are its consecutive runs
      of that many visual tokens.
    * Qwen2-VL / Qwen2.5-VL / Qwen3-VL: image ``i`` is ``image_grid_thw[i] = (t, h, w)`` in
      patches, ``(h / m, w / m)`` tokens after the ``m x m`` spatial merge (``t`` must be 1).

    Raises:
        ValueError: any other family (anyres tiles, pooled or cropped layouts), videos, another
            CLS / feature-selection layout, or visual-token counts the grids do not account for,
            naming the family and the sample.
    """
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    fam = family_of(model).name
    if mt not in GRID_MODEL_TYPES:
        raise ValueError(
            f"{fam} (model_type {mt!r}) does not show each image as one grid of visual tokens to tokinteract; "
            f"resampling a teacher's visual map needs one of {list(GRID_MODEL_TYPES)}"
        )
    vm = visual_mask.bool()
    counts = [int(c) for c in vm.sum(1).tolist()]
    out: list[list[tuple[int, int]]] = []
    if mt == "llava":
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        has_cls = vc.model_type != "siglip_vision_model"
        if (vc.image_size % vc.patch_size) or has_cls != (cfg.vision_feature_select_strategy == "default"):
            raise ValueError(
                f"{fam}: vision tower {vc.model_type!r} (image_size {vc.image_size}, patch_size {vc.patch_size}) with "
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} does not yield a square "
                "patch grid per image"
            )
        for b, n in enumerate(counts):
            if n % (side * side):
                raise ValueError(f"{fam}: sample {b} has {n} visual tokens, not a multiple of the {side}x{side} grid")
            out.append([(side, side)] * (n // (side * side)))
        return out
    if inputs.get("video_grid_thw") is not None or inputs.get("pixel_values_videos") is not None:
        raise ValueError(f"{fam}: videos are not resampled onto another grid (only single images)")
    grid = inputs.get("image_grid_thw")
    m = int(cfg.vision_config.spatial_merge_size)
    rows = [] if grid is None else [tuple(int(v) for v in r) for r in grid.tolist()]
    k = 0
    for b, n in enumerate(counts):
        mine: list[tuple[int, int]] = []
        while n > 0 and k < len(rows):
            t, h, w = rows[k]
            if t != 1 or h % m or w % m:
                raise ValueError(f"{fam}: image {k} has grid (t, h, w) = {(t, h, w)}; only single images (t = 1) "
                                 f"with sides divisible by the merge size {m} are resampled")
            mine.append((h // m, w // m))
            n -= (h // m) * (w // m)
            k += 1
        if n != 0:
            raise ValueError(f"{fam}: sample {b}'s visual tokens do not match image_grid_thw {rows}")
        out.append(mine)
    if k != len(rows):
        raise ValueError(f"{fam}: image_grid_thw holds {len(rows)} images but the batch's visual tokens cover {k}")
    return out
