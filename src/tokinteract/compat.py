"""Every touch of a private API of transformers, torch, accelerate or Liger-Kernel, in one place.

tokinteract needs a few internals that have no public equivalent (switching a config's attention
implementation for one forward, removing a registered attention function, reading whether a
checkpointed layer keeps its KV cache, finding a model's own eager attention function). Each
lives here, behind a function that checks the installed version against the range it was
written for and the attribute it needs, and raises :class:`CompatError` naming the library,
the version and the missing piece instead of misbehaving. ``tests/test_compat.py`` exercises
every touch against the pinned versions, so a changed behaviour fails loudly there.

Libraries are imported lazily: the core package never imports transformers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import lru_cache
from typing import Any

__all__ = [
    "TESTED",
    "CompatError",
    "TRAINER_OVERRIDES",
    "attention_function",
    "bnb_4bit_cpu_repacked",
    "bnb_4bit_cpu_exact",
    "build_processor_with_video_slot",
    "check_trainer_overrides",
    "liger_fused_linear_jsd_function",
    "checkpointing_drops_cache",
    "eager_attention_function",
    "get_attn_implementation",
    "is_attention_registered",
    "set_attn_implementation",
    "unregister_attention",
]

TESTED: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    # library: (lowest tested (major, minor), first untested major.minor) - half-open range
    "transformers": ((5, 0), (6, 0)),
    "liger-kernel": ((0, 8), (0, 9)),
    "bitsandbytes": ((0, 50), (0, 51)),
}
"""Version ranges each private touch was written and tested for."""


class CompatError(RuntimeError):
    """A private API tokinteract relies on is missing or changed in the installed version."""


def _version(lib: str) -> tuple[int, int]:
    from importlib.metadata import version

    parts = version(lib).split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


@lru_cache(maxsize=None)
def _check_range(lib: str) -> None:
    lo, hi = TESTED[lib]
    v = _version(lib)
    if not lo <= v < hi:
        raise CompatError(
            f"tokinteract touches private APIs of {lib} tested for versions [{lo[0]}.{lo[1]}, {hi[0]}.{hi[1]}); "
            f"{lib} {v[0]}.{v[1]} is installed. Install a tested version (see pyproject.toml)."
        )


def _need(obj: Any, attr: str, lib: str, what: str) -> Any:
    _check_range(lib)
    if not hasattr(obj, attr):
        raise CompatError(f"{lib} {_version(lib)[0]}.{_version(lib)[1]}: {what} ({type(obj).__name__}.{attr}) is gone")
    return getattr(obj, attr)


# --- transformers: attention implementation of one config ------------------------------------


def get_attn_implementation(config: Any) -> Any:
    """The raw ``_attn_implementation_internal`` of a config (None = default)."""
    return _need(config, "_attn_implementation_internal", "transformers", "the config's attention implementation")


def set_attn_implementation(config: Any, name: Any) -> None:
    """Set one config's attention implementation without re-dispatching the model.

    ``model.set_attn_implementation`` re-checks and rewrites every sub-config; the adapter
    switches only the text config, for one forward, to a function it registered.
    """
    get_attn_implementation(config)
    config._attn_implementation_internal = name


# --- transformers: the attention-function registries -----------------------------------------


def _mappings() -> tuple[Any, Any]:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    return (
        _need(AttentionInterface, "_global_mapping", "transformers", "the attention function registry"),
        _need(AttentionMaskInterface, "_global_mapping", "transformers", "the attention mask registry"),
    )


def is_attention_registered(name: str) -> bool:
    """Whether ``name`` is a registered attention function."""
    return name in _mappings()[0]


def attention_function(name: str) -> Callable[..., Any]:
    """The attention function registered as ``name`` (KeyError if none)."""
    return _mappings()[0][name]


def unregister_attention(name: str) -> None:
    """Remove ``name`` from the attention and mask registries (no public ``unregister`` exists)."""
    for mapping in _mappings():
        mapping.pop(name, None)


# --- transformers: gradient checkpointing and the KV cache -----------------------------------


def checkpointing_drops_cache(module: Any) -> bool:
    """True if ``module`` is a gradient-checkpointed layer that drops the KV cache while training."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not isinstance(module, GradientCheckpointingLayer) or not module.gradient_checkpointing:
        return False
    return not _need(module, "_can_checkpoint_with_cache", "transformers", "the checkpointed layer's cache flag")


# --- transformers: a model's own eager attention -----------------------------------------------


def eager_attention_function(module: Any) -> Callable[..., Any] | None:
    """The ``eager_attention_forward`` of the modeling file that defines ``module`` (None if absent).

    Each modeling file defines its own (softcapping, sinks, scaling differ), and the
    ``"eager"`` implementation is not in the public registry.
    """
    _check_range("transformers")
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if callable(fn) else None


# --- Liger-Kernel: the autograd Function behind LigerFusedLinearJSDLoss -------------------------


def liger_fused_linear_jsd_function() -> Any:
    """``liger_kernel.chunked_loss.jsd_loss.LigerFusedLinearJSDFunction`` (ImportError if absent).

    tokinteract subclasses it to override ``distillation_loss_fn``, Liger's per-chunk loss hook
    (to compute the divergence in fp32), and calls ``apply`` with the positional arguments of
    its ``forward``: neither is a public API of Liger-Kernel.
    """
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

    fn = _need(LigerFusedLinearJSDFunction, "distillation_loss_fn", "liger-kernel", "the per-chunk loss hook")
    if not callable(fn):
        raise CompatError("liger-kernel: LigerFusedLinearJSDFunction.distillation_loss_fn is no longer callable")
    return LigerFusedLinearJSDFunction


# --- transformers: private Trainer methods the reference trainer overrides ----------------------

TRAINER_OVERRIDES: dict[str, tuple[str, ...]] = {
    "_get_grad_norm": ("self", "model", "grad_norm"),  # non-finite guard
    "_get_output_dir": ("self", "trial"),  # atomic checkpoints
    "_save_checkpoint": ("self", "model", "trial"),  # atomic checkpoints, no non-finite tensor saved
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),  # strict reload (LLaVA)
    "_load_best_model": ("self",),
}
"""Private ``transformers.Trainer`` methods that ``tokinteract.mllm`` overrides, with their parameters."""


def check_trainer_overrides() -> None:
    """Raise :class:`CompatError` if a private ``Trainer`` method we override is gone or changed.

    An override of a renamed method would silently never run (no guard, no atomic save), so the
    reference trainer calls this before training.
    """
    import inspect

    from transformers import Trainer

    for name, params in TRAINER_OVERRIDES.items():
        fn = _need(Trainer, name, "transformers", "a Trainer method the reference trainer overrides")
        got = tuple(inspect.signature(fn).parameters)
        if got != params:
            raise CompatError(
                f"transformers {_version('transformers')[0]}.{_version('transformers')[1]}: Trainer.{name}"
                f"{got} changed (tokinteract overrides it as {params})"
            )


# --- bitsandbytes: the CPU bf16 inference path of 4-bit layers ----------------------------------


def bnb_4bit_cpu_exact(layer: Any) -> None:
    """Turn off a ``bitsandbytes.nn.Linear4bit``'s bf16 CPU inference kernel (its private
    ``support_avx512bf16_for_cpu`` flag, set in ``__init__``): the layer then dequantises and
    multiplies in its compute dtype in every mode (see ``tokinteract.mllm.lora.exact_4bit_layers``)."""
    _need(layer, "support_avx512bf16_for_cpu", "bitsandbytes", "Linear4bit's bf16 CPU kernel switch")
    layer.support_avx512bf16_for_cpu = False


def bnb_4bit_cpu_repacked(layer: Any) -> bool:
    """Whether a ``Linear4bit``'s weight was repacked for the bf16 CPU kernel (its private
    ``quant_state.packing_format_for_cpu``)."""
    _check_range("bitsandbytes")
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


# --- transformers: a processor whose video slot holds a stand-in -------------------------------


def build_processor_with_video_slot(cls: type, video_processor: Any, /, **kwargs: Any) -> Any:
    """``cls(video_processor=video_processor, **kwargs)`` without the class check of that one slot.

    ``ProcessorMixin.__init__`` checks every sub-processor with its private
    ``check_argument_for_proper_class``, which for ``video_processor`` resolves the video
    processors' base class through a registry that exists only with torchvision (and refuses
    anything that is not a real video processor). Here, for this one instance, the check is
    skipped for exactly the object ``video_processor`` in the ``video_processor`` slot; every
    other slot is checked as usual, and the instance keeps the class's own method afterwards.

    Raises:
        CompatError: ``cls`` has no ``video_processor`` slot, the check method is gone, or
            ``__init__`` did not store the stand-in.
    """
    from transformers.processing_utils import ProcessorMixin

    _need(ProcessorMixin, "check_argument_for_proper_class", "transformers", "the processor's sub-processor class check")
    if "video_processor" not in cls.get_attributes():
        raise CompatError(f"transformers: {cls.__name__} has no video_processor slot (its slots: {cls.get_attributes()})")
    proc = cls.__new__(cls)
    check = proc.check_argument_for_proper_class
    proc.check_argument_for_proper_class = lambda name, arg: (
        None if name == "video_processor" and arg is video_processor else check(name, arg)
    )
    try:
        cls.__init__(proc, video_processor=video_processor, **kwargs)
    finally:
        del proc.check_argument_for_proper_class
    if getattr(proc, "video_processor", None) is not video_processor:
        raise CompatError(f"transformers: {cls.__name__}.__init__ no longer stores its video_processor argument")
    return proc
