"""Tiny random VLMs per family, their real processors built offline, and the naive oracle.

For each family in :data:`FAMILIES`:

- :func:`make_model` builds a tiny random model from the family's transformers config (no download);
- :func:`make_processor` builds the family's real processor class from a small word-level tokenizer
  (every special token that processor needs, a chat template) and the family's image processor with small
  sizes, so that the image-token ids agree with the model config;
- :func:`make_batch` makes a batch of 2-3 chat samples exactly as the processor makes it
  (``processor(text=..., images=..., padding=True, return_tensors="pt")``);
- :func:`sample_inputs` / :func:`prefix_plus_token_inputs` cut one sample (or one prefix plus a token)
  out of that batch, unpadded, with only its own images;
- :func:`naive_logits` is the oracle: every real ground-truth row and every real candidate slot of a
  :class:`tokinteract.TPAExpansion`, recomputed by the model's own plain forward on its own sequence (no
  custom mask, no position ids: the model builds its own positions, multimodal RoPE, sliding windows,
  bidirectional image blocks).

The image processors are the PIL ones (``*ImageProcessorPil``): the torchvision backends need torchvision,
which this project does not install. Processors with a video slot (Qwen-VL, LLaVA-OneVision, SmolVLM,
InternVL) cannot be constructed without torchvision either (transformers resolves the video processor's base
class through a registry that does not exist then); :func:`make_processor` leaves that slot ``None`` and
skips only its class check, so image processing is the processor's own code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor
from transformers import PreTrainedTokenizerFast

WORDS = (
    "the", "a", "cat", "dog", "sat", "on", "mat", "red", "blue", "green", "see", "what", "is", "this", "picture",
    "yes", "no", "it", "here", "there", "and", "two", "user", "assistant", "left", "right",
)
VOCAB = 128
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"

# Per-token side inputs: sliced with input_ids; a token appended to a prefix gets the text value 0.
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
# Inputs with one row per sample (not per image, not per token).
SAMPLE_KEYS = ("pixel_attention_mask", "batch_num_images")


def _text(**kw: Any) -> dict[str, Any]:
    """A tiny text config shared by the families (head_dim 16, 2 layers, fp32)."""
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return base


def _siglip(**kw: Any) -> transformers.SiglipVisionConfig:
    base = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=8, num_channels=3,
    )
    base.update(kw)
    return transformers.SiglipVisionConfig(**base)


def _rgb(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@dataclass(frozen=True)
class Family:
    """What one family needs: tokens, configs, processor classes, batch layout.

    ``placeholder`` is what the chat template writes for one image (the processor expands it);
    ``image_tokens`` names the tokenizer tokens whose ids are the model's image-token id(s).
    ``units``: how pixel tensors are laid out: ``"rows"`` (``pixel_values`` concatenates each image's units
    along dim 0: patch rows for Qwen-VL, tiles for InternVL, one per image elsewhere), or ``"per_sample"``
    (``pixel_values[b]`` holds sample b's tiles, Idefics3 / SmolVLM).
    """

    name: str
    special: tuple[str, ...]
    attrs: dict[str, str]
    placeholder: str
    image_tokens: tuple[str, ...]
    config: Callable[[dict[str, int]], Any]
    model_cls: str
    processor_cls: str
    image_processor: Callable[[], Any]
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    has_video_slot: bool = False
    image_sizes: tuple[tuple[int, int], ...] = ((16, 16), (16, 16), (16, 16))
    images_per_sample: tuple[int, ...] = (1, 2, 0)
    units: str = "rows"


def _qwen_ip() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(
        patch_size=4, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 8 * 8, "longest_edge": 16 * 32}
    )


_QWEN_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_QWEN_ATTRS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
_QWEN_IMAGES = ((16, 24), (8, 16), (24, 16))


def _qwen_ids(ids: dict[str, int]) -> dict[str, int]:
    return dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def _qwen2_vl_config(ids: dict[str, int]) -> Any:
    vc = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
              temporal_patch_size=2)
    tc = _text(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    return transformers.Qwen2VLConfig(vision_config=vc, text_config=tc, **_qwen_ids(ids))


def _qwen2_5_vl_config(ids: dict[str, int]) -> Any:
    # window_size 16 px = 2x2 merged tokens per window: the first block attends within windows, the second fully
    vc = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    tc = _text(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    return transformers.Qwen2_5_VLConfig(vision_config=vc, text_config=tc, **_qwen_ids(ids))


def _qwen3_vl_config(ids: dict[str, int]) -> Any:
    vc = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    tc = _text(head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True,
    })
    tc.pop("tie_word_embeddings")
    return transformers.Qwen3VLConfig(vision_config=vc, text_config=tc, tie_word_embeddings=False, **_qwen_ids(ids))


def _llava_config(ids: dict[str, int]) -> Any:
    return transformers.LlavaConfig(
        vision_config=_siglip(), text_config=transformers.Qwen2Config(**_text()), image_token_id=ids["<image>"],
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )


def _llava_ip() -> Any:
    from transformers.models.siglip.image_processing_pil_siglip import (
        SiglipImageProcessorPil,
    )

    return SiglipImageProcessorPil(size={"height": 16, "width": 16})


GEMMA3_TOKENS_PER_IMAGE = 4  # 16 px / patch 4 = 4x4 patches, pooled 2x2


def _gemma3_config(ids: dict[str, int]) -> Any:
    tc = transformers.Gemma3TextConfig(**_text(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], num_hidden_layers=3,
    ))
    return transformers.Gemma3Config(
        vision_config=_siglip(patch_size=4), text_config=tc, mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"], tie_word_embeddings=False,
    )


def _gemma3_ip() -> Any:
    from transformers.models.gemma3.image_processing_pil_gemma3 import (
        Gemma3ImageProcessorPil,
    )

    return Gemma3ImageProcessorPil(size={"height": 16, "width": 16})


_REGISTRY: dict[str, Family] = {}


def _register(f: Family) -> None:
    _REGISTRY[f.name] = f


_register(Family(
    name="llava", special=("<image>",), attrs={"image_token": "<image>"}, placeholder="<image>",
    image_tokens=("<image>",), config=_llava_config, model_cls="LlavaForConditionalGeneration",
    processor_cls="LlavaProcessor", image_processor=_llava_ip,
    processor_kwargs=dict(patch_size=8, vision_feature_select_strategy="full", num_additional_image_tokens=0),
    image_sizes=((16, 16), (20, 12), (12, 24)),
))
for _name, _cfg, _cls, _pcls in (
    ("qwen2_vl", _qwen2_vl_config, "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    ("qwen2_5_vl", _qwen2_5_vl_config, "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    ("qwen3_vl", _qwen3_vl_config, "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
):
    _register(Family(
        name=_name, special=_QWEN_SPECIAL, attrs=_QWEN_ATTRS, placeholder="<|vision_start|><|image_pad|><|vision_end|>",
        image_tokens=("<|image_pad|>",), config=_cfg, model_cls=_cls, processor_cls=_pcls, image_processor=_qwen_ip,
        has_video_slot=True, image_sizes=_QWEN_IMAGES,
    ))
_register(Family(
    name="gemma3", special=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
    attrs={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    placeholder="<start_of_image>", image_tokens=("<image_soft_token>",), config=_gemma3_config,
    model_cls="Gemma3ForConditionalGeneration", processor_cls="Gemma3Processor", image_processor=_gemma3_ip,
    processor_kwargs=dict(image_seq_length=GEMMA3_TOKENS_PER_IMAGE), image_sizes=((16, 16), (20, 12), (12, 24)),
))


_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
_ANYRES_IMAGES = ((16, 32), (32, 16), (20, 20))


def _llava_next_config(ids: dict[str, int]) -> Any:
    return transformers.LlavaNextConfig(
        vision_config=_siglip(), text_config=transformers.Qwen2Config(**_text()), image_token_index=ids["<image>"],
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=_PINPOINTS,
    )


def _llava_next_ip() -> Any:
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=_PINPOINTS,
    )


def _llava_onevision_config(ids: dict[str, int]) -> Any:
    return transformers.LlavaOnevisionConfig(
        vision_config=_siglip(), text_config=transformers.Qwen2Config(**_text()), image_token_index=ids["<image>"],
        video_token_index=ids["<video>"], vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=_PINPOINTS,
    )


def _llava_onevision_ip() -> Any:
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    return LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=_PINPOINTS)


_IDEFICS_SPECIAL = (
    "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in (1, 2) for j in (1, 2)),
)
IDEFICS_TOKENS_PER_TILE = 4  # 16 px / patch 4 = 4x4 patches, pixel shuffle by 2


def _idefics_vision() -> dict[str, Any]:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                patch_size=4)


def _idefics3_config(ids: dict[str, int]) -> Any:
    return transformers.Idefics3Config(
        vision_config=_idefics_vision(), text_config=transformers.LlamaConfig(**_text()), scale_factor=2,
        image_token_id=ids["<image>"],
    )


def _smolvlm_config(ids: dict[str, int]) -> Any:
    return transformers.SmolVLMConfig(
        vision_config=_idefics_vision(), text_config=transformers.LlamaConfig(**_text()), scale_factor=2,
        image_token_id=ids["<image>"],
    )


def _idefics3_ip() -> Any:
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    return Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})


def _smolvlm_ip() -> Any:
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil,
    )

    return SmolVLMImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})


INTERNVL_TOKENS_PER_TILE = 4  # 16 px / patch 4 = 4x4 patches, downsample ratio 0.5


def _internvl_config(ids: dict[str, int]) -> Any:
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=[16, 16],
              patch_size=[4, 4])
    return transformers.InternVLConfig(
        vision_config=vc, text_config=transformers.Qwen2Config(**_text()), image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=INTERNVL_TOKENS_PER_TILE, downsample_ratio=0.5, tie_word_embeddings=False,
    )


def _internvl_ip() -> Any:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    return GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1,
                                    max_patches=4)


_register(Family(
    name="llava_next", special=("<image>",), attrs={"image_token": "<image>"}, placeholder="<image>",
    image_tokens=("<image>",), config=_llava_next_config, model_cls="LlavaNextForConditionalGeneration",
    processor_cls="LlavaNextProcessor", image_processor=_llava_next_ip,
    processor_kwargs=dict(patch_size=8, vision_feature_select_strategy="full", num_additional_image_tokens=0),
    image_sizes=_ANYRES_IMAGES,
))
_register(Family(
    name="llava_onevision", special=("<image>", "<video>"), attrs={"image_token": "<image>", "video_token": "<video>"},
    placeholder="<image>", image_tokens=("<image>",), config=_llava_onevision_config,
    model_cls="LlavaOnevisionForConditionalGeneration", processor_cls="LlavaOnevisionProcessor",
    image_processor=_llava_onevision_ip, has_video_slot=True,
    processor_kwargs=dict(num_image_tokens=4, vision_feature_select_strategy="full"), image_sizes=_ANYRES_IMAGES,
))
_register(Family(
    name="idefics3", special=_IDEFICS_SPECIAL, attrs={}, placeholder="<image>", image_tokens=("<image>",),
    config=_idefics3_config, model_cls="Idefics3ForConditionalGeneration", processor_cls="Idefics3Processor",
    image_processor=_idefics3_ip, processor_kwargs=dict(image_seq_len=IDEFICS_TOKENS_PER_TILE),
    image_sizes=((32, 32), (16, 16), (16, 32)), units="per_sample",
))
_register(Family(
    name="smolvlm", special=(*_IDEFICS_SPECIAL, "<video>"), attrs={"image_token": "<image>"}, placeholder="<image>",
    image_tokens=("<image>",), config=_smolvlm_config, model_cls="SmolVLMForConditionalGeneration",
    processor_cls="SmolVLMProcessor", image_processor=_smolvlm_ip, has_video_slot=True,
    processor_kwargs=dict(image_seq_len=IDEFICS_TOKENS_PER_TILE), image_sizes=((32, 32), (16, 16), (16, 32)),
    units="per_sample",
))
_register(Family(
    name="internvl", special=("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
    attrs={"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
           "video_token": "<video>"},
    placeholder="<IMG_CONTEXT>", image_tokens=("<IMG_CONTEXT>",), config=_internvl_config,
    model_cls="InternVLForConditionalGeneration", processor_cls="InternVLProcessor", image_processor=_internvl_ip,
    has_video_slot=True, processor_kwargs=dict(image_seq_length=INTERNVL_TOKENS_PER_TILE),
    image_sizes=((16, 32), (16, 16), (32, 32)),
))


FAMILIES = tuple(_REGISTRY)


def family(name: str) -> Family:
    """The registry entry of ``name``; ValueError naming the known families otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"family must be one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


# ----------------------------------------------------------------------------------------------- tokenizer


def make_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: pad 0, unk 1, chat markers, the family's special tokens, then :data:`WORDS`."""
    f = family(name)
    special = ["<pad>", "<unk>", CHAT_START, CHAT_END, *f.special]
    vocab = {t: i for i, t in enumerate([*special, *WORDS])}
    if len(vocab) > VOCAB:
        raise ValueError(f"{name}: {len(vocab)} tokens exceed VOCAB={VOCAB}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", extra_special_tokens=dict(f.attrs),
    )


def _token_ids(name: str) -> dict[str, int]:
    tok = make_tokenizer(name)
    return {t: tok.convert_tokens_to_ids(t) for t in (CHAT_START, CHAT_END, *family(name).special)}


def image_token_ids(name: str) -> tuple[int, ...]:
    """The id(s) the model config uses for image tokens (the rows the projector overwrites)."""
    ids = _token_ids(name)
    return tuple(ids[t] for t in family(name).image_tokens)


def word_ids(name: str) -> list[int]:
    """The ids of the plain words (:data:`WORDS`) in the family's tokenizer."""
    return make_tokenizer(name).convert_tokens_to_ids(list(WORDS))


def _chat_template(placeholder: str) -> str:
    return (
        "{% for m in messages %}" + CHAT_START + "{{ m['role'] }} "
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + placeholder + " "
        "{% else %}{{ c['text'] }} {% endif %}{% endfor %}" + CHAT_END + " {% endfor %}"
    )


# ------------------------------------------------------------------------------------------ model, processor


def make_model(name: str, attn: str = "sdpa", seed: int = 0, **overrides: Any) -> Any:
    """A tiny random fp32 model of the family, ``.eval()``; ``overrides`` are set on the text config."""
    f = family(name)
    cfg = f.config(_token_ids(name))
    for k, v in overrides.items():
        if not hasattr(cfg.get_text_config(), k):
            raise TypeError(f"overrides: the {name} text config has no attribute {k!r}")
        setattr(cfg.get_text_config(), k, v)
    torch.manual_seed(seed)
    cls = getattr(transformers, f.model_cls)
    impl = {"": attn, "text_config": attn, "vision_config": attn}
    model = cls._from_config(cfg, attn_implementation=impl, dtype=torch.float32)
    return model.eval()


def make_processor(name: str, image_processor: Any = None, **processor_kwargs: Any) -> Any:
    """The family's real processor class, offline (see the module docstring for the video slot).

    ``image_processor`` (default: the family's) and ``processor_kwargs`` (over the family's
    ``processor_kwargs``) make another resolution or image-token count of the same family.
    """
    f = family(name)
    cls = getattr(transformers, f.processor_cls)
    kwargs = dict(
        image_processor=image_processor if image_processor is not None else f.image_processor(),
        tokenizer=make_tokenizer(name), chat_template=_chat_template(f.placeholder),
        **{**f.processor_kwargs, **processor_kwargs},
    )
    if not f.has_video_slot:
        return cls(**kwargs)
    from tokinteract.compat import build_processor_with_video_slot

    return build_processor_with_video_slot(cls, None, **kwargs)  # the video slot left None


# ----------------------------------------------------------------------------------------------------- batch


@dataclass
class FamilyBatch:
    """A processor-made batch and what is needed to cut samples out of it.

    Attributes:
        inputs: exactly what ``processor(...)`` returned, as a plain dict of tensors (the model's inputs).
        image_token_ids: the model's image-token id(s).
        texts / images: the processor's text and image inputs, per sample.
        images_per_sample: number of images of each sample.
        image_tokens: image-token count of each image (in batch order).
        units: pixel units of each image (``Family.units``), in batch order.
        patches: anyres patches of each image (LLaVA-NeXT / OneVision ``pixel_values`` dim 1), else empty.
        padding: the tokenizer's padding side.
    """

    family: str
    inputs: dict[str, Tensor]
    image_token_ids: tuple[int, ...]
    texts: list[str]
    images: list[list[Image.Image]]
    images_per_sample: list[int]
    image_tokens: list[int]
    units: list[int]
    patches: list[int]
    padding: str


_PROMPTS = ("what is this picture", "see the red dog and the blue cat", "what is the dog")
_ANSWERS = ("a cat sat on the mat", "two red", "yes it is here")


def _messages(f: Family, b: int, n_images: int) -> list[dict[str, Any]]:
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": _PROMPTS[b % len(_PROMPTS)]})
    if n_images > 1:  # an image after the text too
        content = [content[0], content[-1], *content[1:-1]]
    return [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": _ANSWERS[b % len(_ANSWERS)]}]},
    ]


def run_processor(name: str, processor: Any, texts: list[str], images: list[list[Image.Image]], padding: str) -> dict[str, Tensor]:
    """``processor(text=texts, images=images, padding=True, return_tensors="pt")`` with that padding side."""
    processor.tokenizer.padding_side = padding
    flat = [im for ims in images for im in ims]
    # padding_side passed too: InternVLProcessor defaults to left padding whatever the tokenizer says
    kw: dict[str, Any] = dict(text=texts, padding=True, padding_side=padding, return_tensors="pt")
    if flat:
        kw["images"] = images
    out = processor(**kw)
    return {k: v for k, v in out.items() if isinstance(v, Tensor)}


def make_batch(
    name: str,
    processor: Any,
    *,
    padding: str = "right",
    seed: int = 0,
    images_per_sample: tuple[int, ...] | None = None,
    sizes: tuple[tuple[int, int], ...] | None = None,
) -> FamilyBatch:
    """A batch of chat samples made exactly as the processor makes it.

    Sample b has ``images_per_sample[b]`` images (default: 1, 2, 0 = one text-only sample) of the given
    ``sizes`` (cycled, in batch order), a user prompt and a short assistant answer at the end.
    """
    if padding not in ("right", "left"):
        raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
    f = family(name)
    per = list(images_per_sample if images_per_sample is not None else f.images_per_sample)
    sizes = sizes or f.image_sizes
    images: list[list[Image.Image]] = []
    k = 0
    for n in per:
        images.append([_rgb(*sizes[(k + i) % len(sizes)], seed=seed * 1000 + k + i) for i in range(n)])
        k += n
    # the processor's chat template, rendered by its tokenizer (SmolVLMProcessor.apply_chat_template reads
    # its video processor, which we leave None)
    texts = [
        processor.tokenizer.apply_chat_template(_messages(f, b, n), chat_template=processor.chat_template, tokenize=False)
        for b, n in enumerate(per)
    ]
    inputs = run_processor(name, processor, texts, images, padding)
    tokens, units, patches = [], [], []
    for b, ims in enumerate(images):
        alone = []
        for im in ims:  # the processor on one image alone: its token count and pixel layout
            one = run_processor(name, processor, [f.placeholder], [[im]], padding)
            alone.append(int(_image_positions(one["input_ids"][0], image_token_ids(name)).numel()))
            units.append(_units(f, one))
        tokens += _tokens_per_image(inputs["input_ids"][b], image_token_ids(name), alone, b)
    px = inputs.get("pixel_values")
    if f.units == "rows" and px is not None and px.ndim == 5:
        # anyres [images, patches, C, H, W]: the patches an image really has (the rest is zero padding;
        # an image of a multi-image LLaVA-OneVision sample keeps only its base patch)
        patches = (px.flatten(2) != 0).any(2).sum(1).tolist()
    return FamilyBatch(
        family=name, inputs=inputs, image_token_ids=image_token_ids(name), texts=texts, images=images,
        images_per_sample=per, image_tokens=tokens, units=units, patches=patches, padding=padding,
    )


def _tokens_per_image(ids: Tensor, image_ids: tuple[int, ...], alone: list[int], b: int) -> list[int]:
    """Image-token count of each image of one sample.

    An image's count alone is its count in the sample, except where the processor gives an image of a
    multi-image sample fewer tokens (LLaVA-OneVision: base features only); then each image is one run of
    image tokens (our chat template puts text between images).
    """
    pos = _image_positions(ids, image_ids)
    if sum(alone) == pos.numel():
        return alone
    runs = torch.tensor([0] + ((pos[1:] - pos[:-1]) != 1).nonzero().flatten().add(1).tolist() + [pos.numel()])
    if len(runs) - 1 != len(alone):
        raise ValueError(f"sample {b}: cannot split {pos.numel()} image tokens into {len(alone)} images")
    return (runs[1:] - runs[:-1]).tolist()


def _units(f: Family, one: dict[str, Tensor]) -> int:
    """Pixel units of a lone image: its tiles (dim 1 of a one-sample batch) or its rows (dim 0)."""
    return one["pixel_values"].shape[1 if f.units == "per_sample" else 0]


def _image_positions(ids: Tensor, image_ids: tuple[int, ...]) -> Tensor:
    return torch.isin(ids, torch.tensor(image_ids)).nonzero().flatten()


# ------------------------------------------------------------------------------------------ cutting samples


def _real(batch: FamilyBatch, b: int) -> Tensor:
    return batch.inputs["attention_mask"][b].bool().nonzero().flatten()


def _image_range(batch: FamilyBatch, b: int) -> tuple[int, int]:
    """Batch-order indexes [first, last) of sample b's images."""
    first = sum(batch.images_per_sample[:b])
    return first, first + batch.images_per_sample[b]


def _cut(batch: FamilyBatch, b: int, positions: Tensor, n_images: int) -> dict[str, Tensor]:
    """Sample b's tokens at ``positions`` (batch positions, increasing) and its first ``n_images`` images."""
    f = family(batch.family)
    out: dict[str, Tensor] = {}
    first, _ = _image_range(batch, b)
    for key, v in batch.inputs.items():
        if key in TOKEN_KEYS:
            out[key] = v[b, positions][None]
        elif key in SAMPLE_KEYS or f.units == "per_sample" and key == "pixel_values":
            if n_images == 0:
                continue
            if key == "batch_num_images":
                out[key] = torch.tensor([n_images], dtype=v.dtype)
                continue
            n = sum(batch.units[first : first + n_images])
            out[key] = v[b : b + 1, :n]
        elif n_images == 0:
            continue
        elif key == "pixel_values":
            start = sum(batch.units[:first])
            v = v[start : start + sum(batch.units[first : first + n_images])]
            if v.ndim == 5:  # anyres: the batch pads the patch dim to its largest image, a lone sample to its own
                v = v[:, : max(batch.patches[first : first + n_images])]
            out[key] = v
        else:  # one row per image: image_grid_thw, image_sizes, ...
            out[key] = v[first : first + n_images]
    return out


def sample_inputs(name: str, batch: FamilyBatch, b: int) -> dict[str, Tensor]:
    """The model inputs of sample b alone, unpadded, with only its own images."""
    _check_family(name, batch)
    return _cut(batch, b, _real(batch, b), batch.images_per_sample[b])


def prefix_plus_token_inputs(name: str, batch: FamilyBatch, b: int, t: int, token_id: int) -> dict[str, Tensor]:
    """Inputs of "the real tokens of sample b up to and including batch position t, then ``token_id``".

    Only the images whose tokens all lie in the prefix come along; a prefix that ends inside an image's
    tokens, or (LLaVA-OneVision) between the images of a multi-image sample, is refused (no valid input
    exists for it).
    """
    _check_family(name, batch)
    real = _real(batch, b)
    if t not in real.tolist():
        raise ValueError(f"t must be a real position of sample {b}, got {t}")
    prefix = real[real <= t]
    n_tok = int(torch.isin(batch.inputs["input_ids"][b, prefix], torch.tensor(batch.image_token_ids)).sum())
    first, last = _image_range(batch, b)
    counts = [0]
    for i in range(first, last):
        counts.append(counts[-1] + batch.image_tokens[i])
    if n_tok not in counts:
        raise ValueError(f"t={t} ends inside an image of sample {b} ({n_tok} image tokens, images end at {counts})")
    n_images = counts.index(n_tok)
    if name == "llava_onevision" and 0 < n_images < last - first:
        # a multi-image sample's images keep only their base patch; alone, an image would be tiled (anyres)
        raise ValueError(
            f"t={t} keeps {n_images} of the {last - first} images of LLaVA-OneVision sample {b}: no processor "
            "input has those tokens"
        )
    out = _cut(batch, b, prefix, n_images)
    for key in TOKEN_KEYS:
        if key in out:
            value = token_id if key == "input_ids" else (1 if key == "attention_mask" else 0)
            out[key] = torch.cat([out[key], torch.full((1, 1), value, dtype=out[key].dtype)], dim=1)
    return out


def processor_alone(name: str, processor: Any, batch: FamilyBatch, b: int) -> dict[str, Tensor]:
    """What the processor makes for sample b alone (the check for :func:`sample_inputs`)."""
    _check_family(name, batch)
    return run_processor(name, processor, [batch.texts[b]], [batch.images[b]], batch.padding)


def _check_family(name: str, batch: FamilyBatch) -> None:
    if batch.family != name:
        raise ValueError(f"batch was made for family {batch.family!r}, got name={name!r}")


# ---------------------------------------------------------------------------------------------------- oracle


def naive_logits(model: Any, name: str, batch: FamilyBatch, expansion: Any) -> tuple[Tensor, dict[tuple[int, int], Tensor]]:
    """The oracle: ``(gt [B, T, V] with zeros on pads, {(b, slot): [V]})`` from plain per-sequence forwards.

    Ground truth: the model's plain forward on :func:`sample_inputs`, scattered to the real positions.
    Candidate ``(b, t, u, slot)``: the last row of a plain forward on
    :func:`prefix_plus_token_inputs` with the token ``expansion.input_ids[b, slot]``. Runs under the
    caller's grad mode (wrap it in ``torch.no_grad()`` for logits only).
    """
    ids = batch.inputs["input_ids"]
    B, T = ids.shape
    gt = torch.zeros(B, T, model.config.get_text_config().vocab_size)
    for b in range(B):
        gt[b, _real(batch, b)] = model(**sample_inputs(name, batch, b)).logits[0].float()
    cand: dict[tuple[int, int], Tensor] = {}
    bb, tt, _, slot = expansion.candidate_slots()
    for b, t, s in zip(bb.tolist(), tt.tolist(), slot.tolist()):
        token = int(expansion.input_ids[b, s])
        cand[(b, s)] = model(**prefix_plus_token_inputs(name, batch, b, t, token)).logits[0, -1].float()
    return gt, cand


def candidate_mask_for(batch: FamilyBatch, *, seed: int = 0, p: float = 0.7) -> Tensor:
    """Random candidate positions on the assistant answer's tokens only (never image tokens, never the last
    real token), like ``tests/hf/conftest.py::candidate_mask``; each sample keeps at least one."""
    ids, am = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
    g = torch.Generator().manual_seed(seed)
    rank = am.long().cumsum(1) - 1
    allowed = response_mask(batch) & (rank < am.sum(1, keepdim=True) - 1)
    allowed &= ~torch.isin(ids, torch.tensor(batch.image_token_ids))
    cm = (torch.rand(ids.shape, generator=g) < p) & allowed
    first = allowed.long().argmax(1)  # every sample keeps at least its first allowed position
    cm[torch.arange(len(cm)), first] |= allowed[torch.arange(len(cm)), first]
    return cm


def response_mask(batch: FamilyBatch) -> Tensor:
    """True on the tokens of the last assistant turn (after its role word, up to its end marker included)."""
    ids, am = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
    tok_start = int(_token_ids(batch.family)[CHAT_START])
    out = torch.zeros_like(am)
    for b in range(ids.shape[0]):
        starts = ((ids[b] == tok_start) & am[b]).nonzero().flatten()
        begin = int(starts[-1]) + 2  # the marker, then the role word
        out[b, begin:] = am[b, begin:]
    return out
