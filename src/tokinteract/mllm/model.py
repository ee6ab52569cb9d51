"""Building, freezing, checking and saving the LLaVA-style students and teachers.

The architecture is transformers' ``LlavaForConditionalGeneration``: a SigLIP vision
tower, a 2-layer GELU MLP projector (``LlavaMultiModalProjector``) and a Qwen2 / Qwen2.5 /
Qwen3 language model. Two ways to build one:

* :func:`build_llava_from_pretrained`: real users. ``from_pretrained`` of the language
  model and of the vision tower, composed into a ``LlavaConfig``; the projector starts
  random (stage 1 trains it).
* :func:`build_tiny_llava`: random tiny models from configs (tests, the demo); nothing is
  downloaded.

SigLIP has no CLS token, so ``vision_feature_select_strategy="full"``: an image yields
``(image_size // patch_size) ** 2`` visual tokens, and ``input_ids`` must already hold that
many image-token ids per image (the model does not expand ``<image>``).

A saved student (:func:`save_pretrained_student`) is a standard checkpoint that
``LlavaForConditionalGeneration.from_pretrained`` and ``LlavaProcessor.from_pretrained``
load, tokenizer and image processor included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODEL_FAMILIES",
    "build_llava_from_pretrained",
    "build_processor",
    "build_tiny_llava",
    "check_teacher_student",
    "count_trainable",
    "num_image_tokens",
    "save_pretrained_student",
    "set_trainable",
]

MODEL_FAMILIES = ("qwen2", "qwen3")


def num_image_tokens(model_or_config: Any) -> int:
    """Visual tokens per image the vision tower yields after feature selection.

    SigLIP with ``"full"``: ``(image_size // patch_size) ** 2``.
    """
    cfg = getattr(model_or_config, "config", model_or_config)
    vc = cfg.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    has_cls = vc.model_type != "siglip_vision_model"  # CLIP-style towers prepend a CLS token
    tokens = patches + int(has_cls)
    if cfg.vision_feature_select_strategy == "default":
        tokens -= 1  # "default" drops the first token (a real patch for SigLIP, see stack-facts)
    return tokens


def _text_config(family: str, **kw: Any):
    from transformers import Qwen2Config, Qwen3Config

    if family == "qwen2":
        return Qwen2Config(**kw)
    if family == "qwen3":
        return Qwen3Config(head_dim=kw["hidden_size"] // kw["num_attention_heads"], **kw)
    raise ValueError(f"family must be one of {MODEL_FAMILIES}, got {family!r}")


def build_tiny_llava(
    *,
    vocab_size: int,
    image_token_id: int,
    family: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    max_position_embeddings: int = 1024,
    pad_token_id: int | None = 0,
    eos_token_id: int | None = None,
    attn_implementation: str = "sdpa",
    seed: int | None = 0,
):  # -> LlavaForConditionalGeneration
    """A random LLaVA (SigLIP + 2-layer GELU MLP + Qwen2/Qwen3) built from configs, offline.

    Args:
        vocab_size: the language model's vocabulary (>= the tokenizer's ``len``).
        image_token_id: id of ``<image>`` in the tokenizer.
        family: ``"qwen2"`` (also Qwen2.5) or ``"qwen3"``.
        seed: seeds ``torch`` before initialisation (None: leave the RNG alone).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    if not 0 <= image_token_id < vocab_size:
        raise ValueError(f"image_token_id must lie in [0, vocab_size={vocab_size}), got {image_token_id}")
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    text = _text_config(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    if eos_token_id is not None:
        model.generation_config.eos_token_id = eos_token_id
    if pad_token_id is not None:
        model.generation_config.pad_token_id = pad_token_id
    return model


def build_llava_from_pretrained(
    language_model: str,
    vision_tower: str,
    *,
    tokenizer: Any,
    image_token: str = "<image>",
    vision_feature_layer: int = -2,
    torch_dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    projector: str | None = None,
):  # -> LlavaForConditionalGeneration
    """Compose a LLaVA from a pretrained language model and a pretrained SigLIP tower.

    ``AutoModelForCausalLM.from_pretrained(language_model)`` and
    ``SiglipVisionModel.from_pretrained(vision_tower)`` are loaded, their configs composed
    into a ``LlavaConfig`` (``vision_feature_select_strategy="full"``, GELU projector) and
    their weights copied into a ``LlavaForConditionalGeneration``. ``image_token`` is added
    to ``tokenizer`` if missing; the embeddings are resized only if its id does not fit
    (Qwen checkpoints have spare rows).

    Args:
        language_model: Hub name or local path of a Qwen2 / Qwen2.5 / Qwen3 causal LM.
        vision_tower: Hub name or local path of a SigLIP model (its vision part is used).
        tokenizer: the language model's tokenizer (modified in place: ``<image>`` added).
        projector: optional path of a stage-1 LLaVA checkpoint whose projector weights to load.
    """
    from transformers import (
        AutoModelForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionModel,
    )

    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    lm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch_dtype)
    vt = SiglipVisionModel.from_pretrained(vision_tower, dtype=torch_dtype)
    vc = vt.config
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=lm.config,
        image_token_index=image_token_id,
        image_seq_length=(vc.image_size // vc.patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_feature_layer=vision_feature_layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation, dtype=torch_dtype)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.model.vision_tower.load_state_dict(vt.state_dict())
    if image_token_id >= model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    if projector is not None:
        stage1 = LlavaForConditionalGeneration.from_pretrained(projector, dtype=torch_dtype)
        model.model.multi_modal_projector.load_state_dict(stage1.model.multi_modal_projector.state_dict())
        del stage1
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    del lm, vt
    return model


def build_processor(tokenizer: Any, model_or_config: Any):  # -> LlavaProcessor
    """A ``LlavaProcessor`` (SigLIP image processor + ``tokenizer``) matching the model."""
    from transformers import LlavaProcessor

    try:
        from transformers import SiglipImageProcessorPil as _IP
    except ImportError:  # pragma: no cover - older transformers
        from transformers import SiglipImageProcessor as _IP
    cfg = getattr(model_or_config, "config", model_or_config)
    vc = cfg.vision_config
    ip = _IP(size={"height": vc.image_size, "width": vc.image_size})
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=vc.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=0,
        chat_template=tokenizer.chat_template,
    )


def set_trainable(model: nn.Module, stage: str) -> None:
    """Freeze the vision tower always; ``"pretrain"`` trains only the projector,
    ``"finetune"`` the projector and the language model (LM head included)."""
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage must be 'pretrain' or 'finetune', got {stage!r}")
    inner = model.model
    for p in model.parameters():
        p.requires_grad_(False)
    for p in inner.multi_modal_projector.parameters():
        p.requires_grad_(True)
    if stage == "finetune":
        for p in inner.language_model.parameters():
            p.requires_grad_(True)
        for p in model.lm_head.parameters():
            p.requires_grad_(True)
    inner.vision_tower.eval()


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_teacher_student(
    student: nn.Module,
    teacher: nn.Module,
    *,
    vocab_policy: str = "error",
    image_token_policy: str = "error",
    tokenizer: Any = None,
) -> int | None:
    """Refuse teacher/student pairs that cannot be distilled token by token.

    Args:
        vocab_policy: ``"error"`` (vocabulary sizes must be equal) or ``"shared_prefix"``
            (compare only the first ``min(V_s, V_t)`` logits; the usual choice for
            Qwen2.5-7B (152,064) vs 0.5B (151,936), which only pad beyond the tokenizer).
        image_token_policy: ``"error"`` (image-token ids must be equal) or ``"remap"``
            (the trainer rewrites the student's image-token id to the teacher's in the
            teacher's input).
        tokenizer: the student's tokenizer; with ``"remap"``, the teacher's image-token id
            must not be one of its ordinary (non-special) tokens, which any text can produce
            (the teacher would then see more image tokens than images). Special tokens are
            checked per batch by the trainer.

    Returns:
        ``vocab_size`` to pass to the losses (None when the sizes are equal).

    Raises:
        ValueError: different vocabularies or image-token ids without a policy, or a
            different number of visual tokens per image (always an error), or a remapped
            image-token id that is an ordinary text token of ``tokenizer``.
    """
    if vocab_policy not in ("error", "shared_prefix"):
        raise ValueError(f"vocab_policy must be 'error' or 'shared_prefix', got {vocab_policy!r}")
    if image_token_policy not in ("error", "remap"):
        raise ValueError(f"image_token_policy must be 'error' or 'remap', got {image_token_policy!r}")
    sc, tc = student.config, teacher.config
    vs, vt = sc.text_config.vocab_size, tc.text_config.vocab_size
    vocab_size = None
    if vs != vt:
        if vocab_policy == "error":
            raise ValueError(
                f"teacher and student have different vocabularies (student vocab_size={vs}, teacher={vt}); "
                "set vocab_policy='shared_prefix' to compare only the first min(V_s, V_t) logits "
                "(valid only if both share one tokenizer)"
            )
        vocab_size = min(vs, vt)
    if sc.image_token_id != tc.image_token_id:
        if image_token_policy == "error":
            raise ValueError(
                f"teacher and student use different image-token ids (student {sc.image_token_id}, teacher "
                f"{tc.image_token_id}); set image_token_policy='remap' to rewrite them in the teacher's input"
            )
        t_img = int(tc.image_token_id)
        if tokenizer is not None and t_img < len(tokenizer) and t_img not in set(tokenizer.all_special_ids):
            raise ValueError(
                f"image_token_policy='remap': the teacher's image-token id {t_img} is the student tokenizer's text "
                f"token {tokenizer.convert_ids_to_tokens(t_img)!r}; text holding it would reach the teacher as an "
                "image token. Give the teacher an image-token id the student's tokenizer never produces"
            )
    if vocab_size is not None and max(sc.image_token_id, tc.image_token_id) >= vocab_size:
        pass  # image positions are never supervised: the token itself is never a KD target
    ns, nt = num_image_tokens(student), num_image_tokens(teacher)
    if ns != nt:
        raise ValueError(
            f"teacher yields {nt} visual tokens per image but the student yields {ns}; IVA and KD align "
            "position by position, so both vision towers must give the same number of tokens"
        )
    ss, ts = sc.vision_config.image_size, tc.vision_config.image_size
    if ss != ts:
        raise ValueError(
            f"teacher and student vision towers expect different image sizes (student {ss}, teacher {ts}); "
            "both read the same pixel_values"
        )
    return vocab_size


def save_pretrained_student(model: nn.Module, processor: Any, out_dir: str | Path) -> Path:
    """Save ``model`` and ``processor`` (tokenizer + image processor) as one checkpoint."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
