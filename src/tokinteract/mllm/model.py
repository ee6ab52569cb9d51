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

Any other family the adapter runs exactly (:mod:`tokinteract.hf.families`: Qwen2/2.5/3-VL,
Gemma 3, LLaVA-NeXT/OneVision, Idefics3, SmolVLM, InternVL) loads from a checkpoint with
:func:`load_pretrained` (``AutoModelForImageTextToText`` + ``AutoProcessor``);
:func:`check_pair` then refuses, before any training, a family or option the adapter cannot
run exactly and a teacher whose tokenizer or chat template differs from the student's.
:func:`set_trainable_parts` chooses which parts train, by parameter name
(:func:`model_parts`).
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
    "check_pair",
    "check_same_tokenizer",
    "check_teacher_student",
    "count_trainable",
    "load_pretrained",
    "load_processor",
    "model_parts",
    "num_image_tokens",
    "save_pretrained_student",
    "set_trainable",
    "set_trainable_parts",
    "teacher_needs_own_inputs",
]

MODEL_FAMILIES = ("qwen2", "qwen3")


def num_image_tokens(model_or_config: Any) -> int:
    """Visual tokens per image the vision tower yields after feature selection.

    SigLIP with ``"full"``: ``(image_size // patch_size) ** 2``.
    """
    cfg = getattr(model_or_config, "config", model_or_config)
    if getattr(cfg, "model_type", None) != "llava":
        raise ValueError(
            f"num_image_tokens: a fixed number of visual tokens per image is defined only for LLaVA "
            f"(model_type 'llava'), got model_type {getattr(cfg, 'model_type', None)!r}; this family's image-token "
            "count comes from its processor, which the LLaVA data pipeline of tokinteract.mllm does not use yet"
        )
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


PARTS = ("vision_tower", "projector", "language_model")
"""The trainable parts of a vision-language model, as :func:`model_parts` names them."""

# parameter-name prefixes per part, first match wins (Qwen-VL's merger lives inside ``model.visual``)
_PART_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("projector", ("model.multi_modal_projector.", "model.connector.", "model.visual.merger.",
                   "model.visual.deepstack_merger_list.", "model.image_newline")),
    ("vision_tower", ("model.vision_tower.", "model.vision_model.", "model.visual.")),
    ("language_model", ("model.language_model.", "model.text_model.", "lm_head.")),
)


def model_parts(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names of ``model`` per part: ``vision_tower``, ``projector``, ``language_model``.

    By name, the same way for every supported family: the projector is
    ``multi_modal_projector`` (LLaVA, Gemma 3, InternVL), ``connector`` (Idefics3, SmolVLM),
    ``visual.merger`` / ``visual.deepstack_merger_list`` (Qwen-VL) and ``image_newline``
    (LLaVA-NeXT/OneVision); the vision tower is ``vision_tower`` / ``vision_model`` /
    the rest of ``visual``; the language model is ``language_model`` / ``text_model`` and
    the LM head.

    Raises:
        ValueError: a parameter that belongs to no part (an unknown layout: choosing what
            trains would be a guess), naming it.
    """
    out: dict[str, list[str]] = {p: [] for p in PARTS}
    unknown = []
    for name, _ in model.named_parameters():
        part = next((p for p, prefixes in _PART_PREFIXES if name.startswith(prefixes)), None)
        if part is None:
            unknown.append(name)
        else:
            out[part].append(name)
    if unknown:
        raise ValueError(
            f"{type(model).__name__}: parameters {unknown[:5]}{' ...' if len(unknown) > 5 else ''} belong to no part "
            f"of {PARTS}; tokinteract.mllm knows the layouts of LLaVA, LLaVA-NeXT/OneVision, Qwen2/2.5/3-VL, Gemma 3, "
            "Idefics3, SmolVLM and InternVL"
        )
    return out


def set_trainable_parts(
    model: nn.Module, *, vision_tower: bool = False, projector: bool = True, language_model: bool = True
) -> dict[str, list[str]]:
    """Train exactly the chosen parts of ``model`` (:func:`model_parts`); freeze the rest.

    A frozen vision tower is also put in ``eval()`` mode. Returns the parts.

    Raises:
        TypeError: a flag that is not a bool.
        ValueError: nothing left to train, or an unknown parameter layout.
    """
    flags = {"vision_tower": vision_tower, "projector": projector, "language_model": language_model}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise TypeError(f"{k} must be a bool, got {v!r}")
    if not any(flags.values()):
        raise ValueError("set_trainable_parts: vision_tower, projector and language_model are all False; nothing trains")
    parts = model_parts(model)
    train = {n for k, names in parts.items() if flags[k] for n in names}
    for name, p in model.named_parameters():
        p.requires_grad_(name in train)
    if not vision_tower:
        for prefix in ("model.vision_tower", "model.vision_model", "model.visual"):
            try:
                model.get_submodule(prefix).eval()
            except AttributeError:
                pass
    return parts


def set_trainable(model: nn.Module, stage: str) -> None:
    """Freeze the vision tower always; ``"pretrain"`` trains only the projector,
    ``"finetune"`` the projector and the language model (LM head included)."""
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage must be 'pretrain' or 'finetune', got {stage!r}")
    set_trainable_parts(model, vision_tower=False, projector=True, language_model=stage == "finetune")


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# config keys (top level, then vision config) that decide how an image becomes visual tokens
_VISION_GEOMETRY = (
    "mm_tokens_per_image", "image_seq_length", "scale_factor", "downsample_ratio", "vision_feature_select_strategy",
    "vision_feature_layer", "image_grid_pinpoints", "vision_aspect_ratio",
)
_VISION_IGNORED = {
    "_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version", "_attn_implementation",
    "_attn_implementation_autoset", "attn_implementation", "out_hidden_size",
}


def _check_same_vision(student: nn.Module, teacher: nn.Module) -> None:
    """Teacher and student of one family, with the same vision tower and visual-token layout.

    Both read the same processor output (one ``input_ids`` with its visual tokens, one
    ``pixel_values``), so the families, the visual token ids, the vision configs (all keys
    but the output width ``out_hidden_size``, which follows each language model) and the
    projector geometry (:data:`_VISION_GEOMETRY`) must be equal. Different towers or token
    counts (e.g. a teacher at a higher resolution) need the teacher to read its own batch
    (``check_teacher_student(own_inputs=True)``).

    Raises:
        ValueError: naming the first difference.
    """
    from tokinteract.hf.families import visual_token_ids

    sc, tc = student.config, teacher.config
    if sc.model_type != tc.model_type:
        raise ValueError(
            f"teacher and student are of different families (student model_type {sc.model_type!r}, teacher "
            f"{tc.model_type!r}); tokinteract.mllm distills within one family for now"
        )
    sv, tv = visual_token_ids(student), visual_token_ids(teacher)
    if sv != tv:
        raise ValueError(f"teacher and student use different visual token ids (student {sv}, teacher {tv})")
    for k in _VISION_GEOMETRY:
        a, b = getattr(sc, k, None), getattr(tc, k, None)
        if a != b:
            raise ValueError(
                f"teacher and student turn images into visual tokens differently ({k}: student {a!r}, teacher {b!r}); "
                "a different vision tower or image-token count is not supported with one shared batch: give the "
                "teacher its own processor (ProcessorCollator(teacher_processor=...))"
            )
    svc, tvc = getattr(sc, "vision_config", None), getattr(tc, "vision_config", None)
    sd = {k: v for k, v in (svc.to_dict() if svc is not None else {}).items() if k not in _VISION_IGNORED}
    td = {k: v for k, v in (tvc.to_dict() if tvc is not None else {}).items() if k not in _VISION_IGNORED}
    if sd != td:
        diff = {k: (sd.get(k), td.get(k)) for k in sorted(set(sd) | set(td)) if sd.get(k) != td.get(k)}
        raise ValueError(
            f"teacher and student have different vision towers ((student, teacher): {diff}); with one shared batch "
            "both read the same pixel_values and visual tokens: give the teacher its own processor "
            "(ProcessorCollator(teacher_processor=...))"
        )


def check_teacher_student(
    student: nn.Module,
    teacher: nn.Module,
    *,
    vocab_policy: str = "error",
    image_token_policy: str = "error",
    tokenizer: Any = None,
    own_inputs: bool = False,
) -> int | None:
    """Refuse teacher/student pairs that cannot be distilled token by token.

    With ``own_inputs`` (the teacher reads its own processor's batch:
    :class:`tokinteract.mllm.processor_data.ProcessorCollator` with a ``teacher_processor``),
    vision towers, image-token ids and counts may differ: only the family (``model_type``) and
    the vocabulary are checked; the shared tokenizer is checked by the collator.

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
            image-token id that is an ordinary text token of ``tokenizer``. Beyond LLaVA:
            teacher and student of different families, or with vision towers, projector
            geometry or visual token ids that differ (:func:`_check_same_vision`).
    """
    if vocab_policy not in ("error", "shared_prefix"):
        raise ValueError(f"vocab_policy must be 'error' or 'shared_prefix', got {vocab_policy!r}")
    if image_token_policy not in ("error", "remap"):
        raise ValueError(f"image_token_policy must be 'error' or 'remap', got {image_token_policy!r}")
    sc, tc = student.config, teacher.config
    if own_inputs:
        if sc.model_type != tc.model_type:
            raise ValueError(
                f"teacher and student are of different families (student model_type {sc.model_type!r}, teacher "
                f"{tc.model_type!r}); with their own processors tokinteract.mllm distills within one family for now"
            )
    elif sc.model_type != "llava" or tc.model_type != "llava":
        _check_same_vision(student, teacher)
    vs, vt = sc.get_text_config().vocab_size, tc.get_text_config().vocab_size
    vocab_size = None
    if vs != vt:
        if vocab_policy == "error":
            raise ValueError(
                f"teacher and student have different vocabularies (student vocab_size={vs}, teacher={vt}); "
                "set vocab_policy='shared_prefix' to compare only the first min(V_s, V_t) logits "
                "(valid only if both share one tokenizer)"
            )
        vocab_size = min(vs, vt)
    if sc.image_token_id != tc.image_token_id and not own_inputs:
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
    if sc.model_type != "llava" or own_inputs:
        return vocab_size  # same vision side (checked by _check_same_vision), or each model its own inputs
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


_TORCHVISION_HINT = (
    "transformers needs torchvision for this processor's video processor, which it always builds (Qwen2-VL, "
    "Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, SmolVLM and InternVL); tokinteract builds those six processor classes "
    "without it (images and text only), no other. Install the torchvision release built for this torch ({torch}), "
    "of the same build (CPU or the same CUDA version): a CUDA build of torchvision does not import beside a CPU-only "
    "torch (its compiled ops need libtorch_cuda.so)."
)


def load_processor(checkpoint: str | Path, *, role: str = "student") -> Any:
    """The processor of a vision-language checkpoint, as :func:`load_pretrained` loads it:
    ``AutoProcessor.from_pretrained``, or its image-only build when that fails for a missing
    torchvision (see :func:`load_pretrained`).

    Raises:
        ImportError: a missing torchvision and no image-only build for the processor class.
        ValueError: the processor has no tokenizer (not a multimodal processor).
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(checkpoint)
    except (ImportError, ValueError) as e:
        # a missing optional package surfaces as ImportError, or as ValueError for some video processors
        # (InternVL: with torchvision absent its video-processor class resolves to None)
        text = str(e).strip()
        from transformers.utils import is_torchvision_available

        if not ("torchvision" in text.lower() or ("video processor" in text.lower() and not is_torchvision_available())):
            raise
        from tokinteract.mllm.image_only import load_image_only_processor

        try:
            processor = load_image_only_processor(checkpoint, role=role)
        except ImportError as no_build:
            raise ImportError(
                f"{role}_checkpoint {str(checkpoint)!r}: its processor cannot be built here: {text}\n"
                f"{_TORCHVISION_HINT.format(torch=torch.__version__)}\n({no_build})"
            ) from e
    if getattr(processor, "tokenizer", None) is None:
        raise ValueError(
            f"{role}_checkpoint {str(checkpoint)!r}: AutoProcessor gave {type(processor).__name__}, which has no "
            "tokenizer; expected a vision-language processor (tokenizer + image processor)"
        )
    return processor


def load_pretrained(
    checkpoint: str | Path,
    *,
    role: str = "student",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[nn.Module, Any]:
    """``(model, processor)`` of a vision-language checkpoint (Hub name or local folder).

    ``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained``:
    any family transformers maps there (LLaVA included). ``role`` names the checkpoint in
    errors (``"student"`` / ``"teacher"``). ``dtype`` None keeps transformers' default.

    Processors with a video slot (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, SmolVLM,
    InternVL) need torchvision for ``AutoProcessor.from_pretrained``: it always builds the
    processor's ``video_processor`` through ``AutoVideoProcessor``, whose classes have a
    torchvision backend only (``use_fast=False`` / ``backend="pil"`` choose the *image*
    processor's backend, not the video one's, and no argument skips the slot). When
    ``AutoProcessor`` fails for that reason only, the same processor class is built without
    its video processor (:func:`tokinteract.mllm.image_only.load_image_only_processor`: the
    checkpoint's image processor, tokenizer, chat template and saved processor arguments;
    videos are refused, with a warning logged once).

    Raises:
        ImportError: the family's processor cannot be built in this environment (a missing
            torchvision and no image-only build for its class), naming the checkpoint and
            what to install.
        ValueError: the processor has no tokenizer (not a multimodal processor).
    """
    from transformers import AutoModelForImageTextToText

    processor = load_processor(checkpoint, role=role)
    kw: dict[str, Any] = {"attn_implementation": attn_implementation}
    if dtype is not None:
        kw["dtype"] = dtype
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, **kw)
    return model, processor


def _tokenizer_summary(proc: Any) -> tuple[dict[str, int], dict[str, Any], Any]:
    tok = getattr(proc, "tokenizer", proc)
    special = {
        "all_special_tokens": sorted(tok.all_special_tokens),
        **{k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
    }
    template = getattr(proc, "chat_template", None) or getattr(tok, "chat_template", None)
    return tok.get_vocab(), special, template


def check_same_tokenizer(student: Any, teacher: Any, *, student_name: str = "student", teacher_name: str = "teacher") -> None:
    """Refuse a teacher whose tokenizer or chat template differs from the student's.

    Teacher and student read the same token ids (KD, IVA and TPA compare them position by
    position), so the vocabularies (token -> id, added tokens included), the special
    tokens and the chat templates must be equal. ``student`` / ``teacher``: processors or
    tokenizers; ``*_name``: how errors name them (e.g. the checkpoints).

    Raises:
        ValueError: naming both and the first differences.
    """
    sv, ss, st = _tokenizer_summary(student)
    tv, ts, tt = _tokenizer_summary(teacher)
    both = f"student {student_name!r} and teacher {teacher_name!r}"
    if sv != tv:
        diff = sorted(k for k in set(sv) | set(tv) if sv.get(k) != tv.get(k))
        shown = {k: (sv.get(k), tv.get(k)) for k in diff[:5]}
        raise ValueError(
            f"{both} have different tokenizers: {len(sv)} vs {len(tv)} tokens, {len(diff)} differ "
            f"(token: (student id, teacher id)) {shown}; distillation needs one shared tokenizer"
        )
    if ss != ts:
        diff = {k: (ss[k], ts[k]) for k in ss if ss[k] != ts[k]}
        raise ValueError(f"{both} have different special tokens (student, teacher): {diff}")
    if st != tt:
        raise ValueError(
            f"{both} have different chat templates; both must render a conversation to the same tokens"
        )


def teacher_needs_own_inputs(student: nn.Module, teacher: nn.Module, processor: Any, teacher_processor: Any) -> bool:
    """Whether the teacher must read its own processor's batch: both of one family, with image
    processors that differ (another resolution, ``min_pixels`` / ``max_pixels``, ...) or vision
    sides that :func:`_check_same_vision` tells apart (another tower, image-token count). False
    for different families (refused later, naming both)."""
    sp, tp = getattr(processor, "image_processor", None), getattr(teacher_processor, "image_processor", None)
    if student.config.model_type != teacher.config.model_type:
        return False
    if (sp.to_dict() if sp is not None else None) != (tp.to_dict() if tp is not None else None):
        return True
    try:
        _check_same_vision(student, teacher)
    except ValueError:
        return True
    return False


def check_pair(student: nn.Module, teacher: nn.Module | None, *, output: str = "logits") -> None:
    """The adapter's family check on student and teacher, before any training.

    :func:`tokinteract.hf.families.check_options` with ``output`` (``"hidden"`` for the
    fused losses); errors are re-raised naming the model (student or teacher).

    Raises:
        ValueError: a family or an option the adapter cannot run exactly.
    """
    from tokinteract.hf.families import check_options

    for role, m in (("student", student), ("teacher", teacher)):
        if m is None:
            continue
        try:
            check_options(m, output=output)
        except ValueError as e:
            raise ValueError(f"{role} ({type(m).__name__}): {e}") from e


def save_pretrained_student(model: nn.Module, processor: Any, out_dir: str | Path) -> Path:
    """Save ``model`` and ``processor`` (tokenizer + image processor) as one checkpoint."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
