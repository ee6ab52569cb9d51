"""LoRA students (``peft``): adapters on the language model, saving, merging and exporting.

:func:`apply_lora` wraps a student (any family of :mod:`tokinteract.mllm.model`) in a
``peft.PeftModel`` whose LoRA adapters sit on the language model's linear projections
(by default the attention and MLP projections ``q_proj k_proj v_proj o_proj gate_proj
up_proj down_proj``; never the vision tower, the projector or the LM head). Everything else
is frozen, except the projector when ``train_projector``: it then trains in full as one of
peft's ``modules_to_save``, so the saved adapter holds it too.

The trainer runs its passes (fused or logits loss, cached or packed TPA, attention capture)
on the model *inside* the wrapper (:func:`unwrap_peft`): peft injects the LoRA layers into
that model's modules in place, so its forward is the adapted model's forward, and the
adapter's parameters are the ones that receive gradients. Distributed wrappers still wrap
the ``PeftModel`` (``run_through_wrapper`` calls it once per step; ``PeftModel.forward``
calls the inner model's forward).

Saving: ``Trainer.save_model`` writes the adapter (``adapter_config.json``,
``adapter_model.safetensors``) and the processor; ``peft.PeftModel.from_pretrained(base,
folder)`` loads it on the base checkpoint. :func:`merge_and_save` (or
``python -m tokinteract.mllm.lora merge ADAPTER OUT``) folds the adapters into the weights
(``merge_and_unload``) and saves a standard checkpoint that
``AutoModelForImageTextToText.from_pretrained`` loads without peft.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "apply_lora",
    "check_4bit_layers",
    "check_lora_arguments",
    "check_mergeable",
    "check_quantised_student",
    "exact_4bit_layers",
    "is_peft_model",
    "is_quantised",
    "lora_target_regex",
    "merge_and_save",
    "projector_modules",
    "unwrap_peft",
]

logger = logging.getLogger("tokinteract.mllm")

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The language model's attention and MLP projections (Qwen2/2.5/3, Gemma 3, Llama/SmolLM names)."""


@functools.cache
def _peft_model_class() -> type | None:
    """``peft.PeftModel``, or None when peft is not installed (looked up once: this runs every step)."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return PeftModel


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (False when peft is not installed)."""
    cls = _peft_model_class()
    return cls is not None and isinstance(model, cls)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft.PeftModel`` (its LoRA layers injected in place);
    any other module unchanged.

    The adapter code of :mod:`tokinteract.hf` reads ``model.model``, the LM head, the config's
    family and module paths: a ``PeftModel`` forwards attribute lookups to the model it wraps
    one level down, so ``peft_model.model`` would be the whole ``*ForConditionalGeneration``
    instead of its base, silently. Every pass therefore runs on this inner model.
    """
    return model.get_base_model() if is_peft_model(model) else model


def is_quantised(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside a ``PeftModel``) was loaded quantised by transformers
    (``hf_quantizer`` set: bitsandbytes 4-bit / 8-bit, ...)."""
    return getattr(unwrap_peft(model), "hf_quantizer", None) is not None


def _language_model_prefixes(model: nn.Module) -> list[str]:
    """Module paths of the language model's decoder (without the LM head), as
    :func:`tokinteract.mllm.model.model_parts` finds them."""
    from tokinteract.mllm.model import model_parts

    names = model_parts(model)["language_model"]
    out: list[str] = []
    for prefix in ("model.language_model.", "model.text_model."):
        if any(n.startswith(prefix) for n in names):
            out.append(prefix[:-1])
    if not out:
        raise ValueError(f"{type(model).__name__}: no language-model module (model.language_model / model.text_model) found")
    return out


def lora_target_regex(model: nn.Module, target_modules: list[str] | tuple[str, ...] | None = None) -> str:
    """The ``LoraConfig.target_modules`` regex: the ``nn.Linear`` modules of ``model``'s language
    model whose last name is one of ``target_modules`` (default :data:`DEFAULT_TARGET_MODULES`).

    Raises:
        TypeError: ``target_modules`` not a list of strings.
        ValueError: a name that matches no linear layer of the language model (a typo, or a
            name of the vision tower), naming it and the names that exist.
    """
    names = list(DEFAULT_TARGET_MODULES if target_modules is None else target_modules)
    if not names or not all(isinstance(n, str) and re.fullmatch(r"[A-Za-z0-9_]+", n) for n in names):
        raise TypeError(f"lora_target_modules must be a non-empty list of module names (e.g. q_proj), got {target_modules!r}")
    prefixes = _language_model_prefixes(model)
    regex = rf"(?:{'|'.join(re.escape(p) for p in prefixes)})\..*\.(?:{'|'.join(names)})"
    found = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(regex, n)}
    missing = [n for n in names if n not in found]
    if missing:
        available = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.startswith(tuple(p + "." for p in prefixes))}
        )
        raise ValueError(
            f"lora_target_modules {missing} match no linear layer of {type(model).__name__}'s language model "
            f"({', '.join(prefixes)}); its linear layers are named {available}"
        )
    return regex


def projector_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(modules, loose_parameters)`` of ``model``'s projector part: the module paths peft can
    train as ``modules_to_save``, and projector parameters that belong to no projector module
    (LLaVA-NeXT/OneVision's ``image_newline``), which a LoRA run leaves frozen."""
    from tokinteract.mllm.model import _PART_PREFIXES, model_parts

    params = model_parts(model)["projector"]
    prefixes = dict(_PART_PREFIXES)["projector"]
    modules, loose = [], []
    for prefix in prefixes:
        mine = [n for n in params if n.startswith(prefix)]
        if not mine:
            continue
        path = prefix.rstrip(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            loose.extend(mine)
            continue
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # peft wraps callable modules only (Qwen3-VL's deepstack list)
            modules.extend(f"{path}.{child}" for child, _ in module.named_children())
        else:
            modules.append(path)
    return modules, loose


def apply_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: list[str] | tuple[str, ...] | None = None,
    train_projector: bool = True,
    seed: int | None = 0,
) -> nn.Module:
    """Wrap ``model`` in a ``peft.PeftModel`` with LoRA adapters on its language model.

    Args:
        r: LoRA rank (>= 1).
        alpha: LoRA scaling numerator (the update is ``alpha / r * B A x``).
        dropout: dropout on the adapters' input (0: deterministic steps).
        target_modules: last names of the language model's linear layers to adapt
            (default :data:`DEFAULT_TARGET_MODULES`); never matched in the vision tower.
        train_projector: also train the projector in full (peft ``modules_to_save``, saved
            with the adapter).
        seed: seeds the adapters' random initialisation (``A``; ``B`` starts at 0) on a forked
            CPU RNG, leaving the global one alone, so a run (and a restart) is reproducible
            (None: draw from the global RNG).

    Returns:
        The ``PeftModel``: only the adapters (and the projector) have ``requires_grad``.

    Raises:
        ImportError: peft is not installed (``pip install 'tokinteract[peft]'``).
        TypeError / ValueError: a bad ``r``, ``alpha``, ``dropout`` or ``target_modules``.
    """
    import math

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r must be an int >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora_alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout must lie in [0, 1), got {dropout!r}")
    if not isinstance(train_projector, bool):
        raise TypeError(f"train_projector must be a bool, got {train_projector!r}")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("LoRA students need peft: pip install 'tokinteract[peft]'") from e
    if is_peft_model(model):
        raise ValueError(f"model is already a {type(model).__name__}; apply_lora wraps a transformers model once")
    regex = lora_target_regex(model, target_modules)
    to_save = None
    if train_projector:
        to_save, loose = projector_modules(model)
        if loose:
            logger.warning("LoRA: projector parameters outside a projector module stay frozen: %s", loose)
        to_save = to_save or None
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=regex, modules_to_save=to_save, bias="none",
    )
    if seed is None:
        return get_peft_model(model, config)
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def check_lora_arguments(margs: Any, targs: Any = None) -> None:
    """Refuse CLI settings that contradict a LoRA student (``margs.lora_r > 0``).

    Raises:
        ValueError: ``lora_r`` not an int >= 0; ``train_language_model: true`` or
            ``train_vision_tower: true`` with LoRA (the adapters train the language model,
            its base weights and the vision tower stay frozen); ``lora_merge_on_save``
            without LoRA or under FSDP (its parameters are sharded at save time: merge the
            saved adapter with ``python -m tokinteract.mllm.lora merge`` instead).
    """
    r = margs.lora_r
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"lora_r must be an int >= 0 (0: no LoRA), got {r!r}")
    if not r:
        if margs.lora_merge_on_save:
            raise ValueError("lora_merge_on_save needs a LoRA student (lora_r >= 1), got lora_r=0")
        return
    if margs.train_language_model:
        raise ValueError(
            "train_language_model=True with lora_r > 0: a LoRA student trains adapters on a frozen language model; "
            "leave train_language_model unset (or false), or set lora_r=0 for full training"
        )
    if margs.train_vision_tower:
        raise ValueError("train_vision_tower=True with lora_r > 0: the LoRA adapters never touch the vision tower")
    if margs.lora_merge_on_save and targs is not None and getattr(targs, "fsdp", None):
        raise ValueError(
            "lora_merge_on_save with FSDP: the student's parameters are sharded when it is saved; save the adapter and "
            "merge it afterwards with `python -m tokinteract.mllm.lora merge OUTPUT_DIR OUTPUT_DIR/merged`"
        )


def check_mergeable(model: nn.Module, checkpoint: str | Path | None = None) -> None:
    """Refuse merging adapters into a quantised (QLoRA) base: folding them into 4-bit / 8-bit
    weights re-quantises those, so the merged model would not compute what was trained.
    ``checkpoint`` names the student in the error (the CLI checks ``lora_merge_on_save``
    before training).

    Raises:
        ValueError: ``model`` is quantised.
    """
    if not is_quantised(model):
        return
    who = f"student_checkpoint {str(checkpoint)!r} (lora_merge_on_save)" if checkpoint is not None else "model"
    raise ValueError(
        f"{who}: cannot merge LoRA adapters into the quantised {type(unwrap_peft(model)).__name__}: the merged "
        "weights would be re-quantised and the model would no longer compute what was trained; keep the adapter "
        "(PeftModel.from_pretrained on the same quantised base), or merge it into an unquantised base knowing "
        "that this model differs from the trained one"
    )


def exact_4bit_layers(model: nn.Module, role: str) -> dict[str, nn.Module]:
    """Keep ``model``'s bitsandbytes 4-bit layers on their exact CPU path; return them by name.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight at the layer's first
    eval-mode, no-grad forward and from then on multiplies it with a bf16 kernel that ignores
    ``bnb_4bit_compute_dtype`` and has no backward: in training mode too, no gradient flows
    through that layer to the adapters below it, silently. This turns that path off on every
    4-bit layer (``support_avx512bf16_for_cpu = False``: the layer then dequantises its weight
    and multiplies in the compute dtype, in every mode). A layer already repacked (a no-grad
    eval forward before training) is refused. GPU kernels are not affected.

    Raises:
        ValueError: a layer already repacked, naming it and ``role`` ("student" / "teacher").
    """
    import sys

    bnb = sys.modules.get("bitsandbytes")  # never imported here: a 4-bit model has imported it
    if bnb is None:
        return {}
    layers = {n: m for n, m in unwrap_peft(model).named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    check_4bit_layers(layers, role)
    from tokinteract import compat

    for m in layers.values():
        compat.bnb_4bit_cpu_exact(m)
    return layers


def check_4bit_layers(layers: dict[str, nn.Module], role: str) -> None:
    """Refuse 4-bit layers (by name) whose weight bitsandbytes repacked for its bf16 CPU inference
    kernel (see :func:`exact_4bit_layers`): their outputs are bf16-rounded and they pass no gradient.

    Raises:
        ValueError: naming the first such layer and ``role``.
    """
    from tokinteract import compat

    for name, m in layers.items():
        if compat.bnb_4bit_cpu_repacked(m):
            raise ValueError(
                f"{role}: the 4-bit layer {name} was repacked by bitsandbytes for its bf16 CPU "
                "inference kernel (an eval-mode forward without gradients ran on it), which computes in bf16 and "
                "passes no gradient; reload the model and build the trainer before running it"
            )


def check_quantised_student(model: nn.Module, checkpoint: str | Path, lora_r: int, merge_on_save: bool) -> None:
    """The CLI's check of a student loaded quantised (a QLoRA base), before training: it trains only
    through LoRA adapters (its 4-bit / 8-bit weights take no gradient), and its adapters cannot be
    merged on save (:func:`check_mergeable`). Nothing for an unquantised student.

    Raises:
        ValueError: ``lora_r`` 0 or ``merge_on_save`` with a quantised student, naming the checkpoint.
    """
    if not is_quantised(model):
        return
    if not lora_r:
        raise ValueError(
            f"student_checkpoint {str(checkpoint)!r} is quantised ({type(model).__name__}); its quantised weights "
            "cannot be trained: set lora_r >= 1 to train LoRA adapters on it (QLoRA), or load an unquantised student"
        )
    if merge_on_save:
        check_mergeable(model, checkpoint)


def merge_and_save(model: nn.Module, out_dir: str | Path, processor: Any = None) -> Path:
    """Fold the LoRA adapters of the ``PeftModel`` ``model`` into its weights
    (``merge_and_unload``) and save a standard checkpoint (with ``processor``) to ``out_dir``.

    ``model`` is consumed: peft merges in place, so the wrapper must not be used afterwards.

    Raises:
        TypeError: ``model`` is not a ``PeftModel``.
        ValueError: its base is quantised (QLoRA): folding the adapters into 4-bit / 8-bit
            weights re-quantises them, so the merged model would not compute what was trained.
    """
    if not is_peft_model(model):
        raise TypeError(f"model must be a peft.PeftModel to merge, got {type(model).__name__}")
    check_mergeable(model)
    from tokinteract.mllm.model import save_pretrained_student

    merged = model.merge_and_unload()
    if processor is None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(out)
        return out
    return save_pretrained_student(merged, processor, out_dir)


def _merge_command(adapter_dir: str, out_dir: str, base: str | None, dtype: str | None) -> Path:
    """Load ``base`` (default: the adapter's ``base_model_name_or_path``) and the adapter, merge, save."""
    from peft import PeftModel

    from tokinteract.mllm.cli import _dtype
    from tokinteract.mllm.model import load_pretrained, load_processor

    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"adapter_dir {adapter_dir!r} holds no adapter_config.json (not a saved peft adapter)")
    base = base or json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg_path} names no base_model_name_or_path; pass --base")
    model, processor = load_pretrained(base, role="base", dtype=_dtype(dtype))
    try:  # the trainer saves it beside the adapter (image-only where the base's was: missing torchvision)
        processor = load_processor(adapter_dir, role="adapter")
    except (OSError, ValueError):
        pass
    return merge_and_save(PeftModel.from_pretrained(model, adapter_dir), out_dir, processor)


def main(argv: list[str] | None = None) -> int:
    """``python -m tokinteract.mllm.lora merge ADAPTER_DIR OUT_DIR [--base CKPT] [--dtype bfloat16]``."""
    p = argparse.ArgumentParser(prog="python -m tokinteract.mllm.lora", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge a saved LoRA adapter into its base and save a standard checkpoint")
    m.add_argument("adapter_dir")
    m.add_argument("out_dir")
    m.add_argument("--base", default=None, help="base checkpoint (default: the adapter's base_model_name_or_path)")
    m.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 for loading the base")
    a = p.parse_args(argv)
    out = _merge_command(a.adapter_dir, a.out_dir, a.base, a.dtype)
    print(f"merged checkpoint: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
