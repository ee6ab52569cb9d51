"""An image-only processor for the families whose video processor needs torchvision.

transformers 5.x ``AutoProcessor.from_pretrained`` always builds the processor's video
processor for Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, SmolVLM and InternVL, and
every video processor class has a torchvision backend only: without torchvision the whole
processor fails to load, although its image processor (the PIL class) and tokenizer load.

:func:`load_image_only_processor` builds what ``AutoProcessor`` would build, minus the video
processor, the way ``ProcessorMixin.from_pretrained`` builds it:

1. the processor class: ``processor_class`` of the checkpoint's ``processor_config.json``,
   then of its image processor config, then of ``tokenizer_config.json``, then of its model
   config, then transformers' processor mapping for the config's ``model_type``
   (``AutoProcessor``'s order). Only the classes in :data:`IMAGE_ONLY_PROCESSORS` are built
   (each is tested token for token against the processor built in memory); any other class,
   or remote code, keeps the ImportError.
2. ``AutoImageProcessor.from_pretrained`` and ``AutoTokenizer.from_pretrained`` of the
   checkpoint (what ``ProcessorMixin`` loads for its ``image_processor`` and ``tokenizer``).
3. ``ProcessorMixin.get_processor_dict``: the chat template and the processor's saved
   arguments (``image_seq_len``, ``num_image_tokens``, ``vision_feature_select_strategy``,
   ...), passed to the class's ``__init__`` exactly as ``from_args_and_dict`` passes them
   (only the arguments its ``__init__`` names).
4. the video slot holds a :class:`NoVideoProcessor`: calling it, or reading any of its
   settings, raises a clear error (videos are not supported without torchvision). It keeps
   the video processor's saved configuration (``BaseVideoProcessor.get_video_processor_dict``)
   and writes it back on ``save_pretrained``, so a checkpoint saved from this processor loads
   its real video processor wherever torchvision is installed.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, ClassVar

from transformers.utils import PushToHubMixin

__all__ = ["IMAGE_ONLY_PROCESSORS", "NoVideoProcessor", "load_image_only_processor", "resolve_processor_class"]

logger = logging.getLogger("tokinteract.mllm")

IMAGE_ONLY_PROCESSORS = (
    "Qwen2VLProcessor",
    "Qwen2_5_VLProcessor",
    "Qwen3VLProcessor",
    "LlavaOnevisionProcessor",
    "SmolVLMProcessor",
    "InternVLProcessor",
)
"""Processor classes built without their video processor (``tests/mllm/test_mllm_image_only.py``
compares each with the processor built in memory, token for token)."""

_warned: set[str] = set()


def _video_error(checkpoint: str, processor_class: str) -> str:
    return (
        f"{checkpoint!r}: this {processor_class} was built without its video processor (transformers' video "
        "processors need torchvision, which is not installed): videos are not supported. Install the torchvision "
        "release built for this torch to process videos."
    )


class NoVideoProcessor(PushToHubMixin):
    """Stand-in for the video processor of an image-only processor (module docstring).

    Calling it, or reading any attribute it does not define, raises (``ValueError`` /
    ``AttributeError``) with :func:`_video_error`'s message. ``to_dict`` returns the
    checkpoint's saved video processor configuration (None if it has none), which
    ``ProcessorMixin.save_pretrained`` writes into ``processor_config.json`` (it serialises the
    sub-processors that are ``PushToHubMixin`` instances with their ``to_dict``).

    Args:
        checkpoint: the checkpoint the processor was loaded from (named in the errors).
        processor_class: the processor's class name (named in the errors).
        saved: the checkpoint's video processor configuration (None: it has none).
    """

    _auto_class = None
    valid_kwargs = None  # ProcessorMixin._merge_kwargs reads it: no video keyword is routed here
    model_input_names: ClassVar[list[str]] = []  # it makes no model input

    def __init__(self, checkpoint: str, processor_class: str, saved: dict[str, Any] | None) -> None:
        self.__dict__.update(checkpoint=checkpoint, processor_class=processor_class, saved=saved)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(_video_error(self.checkpoint, self.processor_class))

    def __getattr__(self, name: str) -> Any:  # only for names not found normally
        raise AttributeError(f"{_video_error(self.checkpoint, self.processor_class)} (no video setting {name!r})")

    def __deepcopy__(self, memo: dict[int, Any]) -> NoVideoProcessor:
        return NoVideoProcessor(self.checkpoint, self.processor_class, copy.deepcopy(self.saved, memo))

    def __repr__(self) -> str:
        return f"NoVideoProcessor({self.checkpoint!r}: videos unsupported without torchvision)"

    def to_dict(self) -> dict[str, Any] | None:
        return copy.deepcopy(self.saved)


def _named_class(src: dict[str, Any]) -> tuple[str | None, bool]:
    """``(processor_class, remote code)`` named by one configuration dict."""
    if "AutoProcessor" in (src.get("auto_map") or {}):
        return None, True
    return (str(src["processor_class"]) if src.get("processor_class") else None), False


def resolve_processor_class(checkpoint: str | Path, processor_dict: dict[str, Any], tokenizer: Any) -> str | None:
    """The processor class ``AutoProcessor`` would build for ``checkpoint``, in its order:
    ``processor_config.json``, the image processor config, ``tokenizer_config.json``, the model
    config, then transformers' processor mapping for the config's ``model_type``. None: remote
    code (never built here) or nothing found."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        image_dict, _ = ImageProcessingMixin.get_image_processor_dict(str(checkpoint))
    except OSError:
        image_dict = {}
    for src in (processor_dict, image_dict, getattr(tokenizer, "init_kwargs", None) or {}):
        name, remote = _named_class(src)
        if remote:
            return None
        if name:
            return name
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    config = AutoConfig.from_pretrained(checkpoint)
    name, remote = _named_class({"processor_class": getattr(config, "processor_class", None),
                                 "auto_map": getattr(config, "auto_map", None) or {}})
    if remote:
        return None
    return name or PROCESSOR_MAPPING_NAMES.get(config.model_type)


def load_image_only_processor(checkpoint: str | Path, *, role: str = "student") -> Any:
    """The checkpoint's own processor class, built without its video processor (module docstring).

    Call it only where ``AutoProcessor.from_pretrained`` failed because torchvision is missing.
    Warns once per process (logging) that videos are unsupported.

    Raises:
        ImportError: the processor class is not one of :data:`IMAGE_ONLY_PROCESSORS` (or is
            remote code): no exact image-only build is known for it.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin
    from transformers.video_processing_utils import BaseVideoProcessor

    from tokinteract.compat import build_processor_with_video_slot

    ckpt = str(checkpoint)
    processor_dict, _ = ProcessorMixin.get_processor_dict(ckpt)
    image_processor = AutoImageProcessor.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    name = resolve_processor_class(ckpt, processor_dict, tokenizer)
    if name not in IMAGE_ONLY_PROCESSORS:
        raise ImportError(
            f"{role}_checkpoint {ckpt!r}: its processor class {name or '(remote code)'} has no image-only build "
            f"(known: {', '.join(IMAGE_ONLY_PROCESSORS)})"
        )
    cls = getattr(transformers, name)
    try:
        saved_video, _ = BaseVideoProcessor.get_video_processor_dict(ckpt)
    except OSError:
        saved_video = None  # AutoProcessor would not find one either; saved back as null
    # ProcessorMixin.from_args_and_dict: drop the sub-processors' entries, pass only what __init__ names
    code = cls.__init__.__code__
    accepted = set(code.co_varnames[1 : code.co_argcount]) - set(cls.get_attributes())
    drop = {*cls.get_attributes(), "auto_map", "processor_class"}
    kwargs = {k: v for k, v in processor_dict.items() if k in accepted and k not in drop}
    ignored = sorted(k for k in processor_dict if k not in accepted and k not in drop)
    if ignored:
        logger.info("%s_checkpoint %r: processor_config.json keys %s are not %s arguments (ignored, as "
                    "AutoProcessor ignores them)", role, ckpt, ignored, name)
    proc = build_processor_with_video_slot(
        cls, NoVideoProcessor(ckpt, name, saved_video), image_processor=image_processor, tokenizer=tokenizer, **kwargs
    )
    if not _warned:
        logger.warning(
            "%s_checkpoint %r: torchvision is missing, so its %s is built without its video processor (images and "
            "text only); videos are refused. Install the torchvision release built for this torch to process videos.",
            role, ckpt, name,
        )
    _warned.add(ckpt)
    return proc
