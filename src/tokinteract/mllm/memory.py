"""A computed (not measured) estimate of the GPU memory one rank needs to distill a pair.

:func:`model_size` counts a model's parameters per part from its transformers config, on the
``meta`` device (nothing is allocated or downloaded). :func:`estimate_memory` adds up, per
rank, the bytes of

* **weights**: student (sharded over the ranks under FSDP2, replicated under DDP and
  ZeRO-2) and teacher (always whole on every rank: the trainer never shards it);
* **gradients** of the trainable parameters, in the weights' dtype (partitioned under
  ZeRO-2 and FSDP2);
* **optimizer** state of AdamW: two moments in the weights' dtype under DDP / FSDP2
  (``torch.optim.AdamW`` keeps its state in the parameter dtype); under DeepSpeed ZeRO-2
  with bf16 an fp32 master copy plus two fp32 moments (12 bytes per trainable parameter),
  partitioned;
* **activations** the student keeps for backward: ``34 * s * b * h`` bytes per decoder
  layer in 16-bit (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", Table 2, without the ``5 a s^2 b`` attention-score term, which
  memory-efficient SDPA / FlashAttention do not store); with gradient checkpointing each
  layer keeps only its input (``2 * s * b * h``) plus one layer recomputed at a time.
  ``s`` counts the ground-truth tokens plus, with TPA, ``d`` candidates per response token
  (``response_fraction`` of the sequence);
* **logits**: with ``loss_impl="fused"`` one chunk of ``chunk_rows`` rows per model in
  fp32 (logits, probabilities, gradient); with ``"logits"`` the full ``[b, s, V]`` logits
  of both models (16-bit) plus their fp32 copies for the loss and the student's gradient;
* the teacher's KV cache of the ground-truth pass (TPA with ``tpa_forward="cached"``).

Not counted: the CUDA context and allocator fragmentation (often 1-3 GiB), communication
buckets, the vision towers' transient activations (frozen towers keep none for backward),
the data loader. It is an estimate to choose a strategy and a batch size, not a guarantee.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["STRATEGIES", "MemoryEstimate", "ModelSize", "estimate_memory", "model_size"]

STRATEGIES = ("ddp", "zero2", "fsdp2")
GiB = 1024**3


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of one model per part and the dimensions the estimate needs.

    Attributes:
        total: all parameters (tied weights once).
        vision_tower: parameters of the vision tower.
        projector: parameters of the projector.
        language_model: parameters of the language model and its LM head.
        hidden_size: the language model's hidden size.
        num_layers: the language model's decoder layers.
        vocab_size: the LM head's rows.
        num_kv_heads: key/value heads per layer (for the KV cache).
        head_dim: width of one head.
        lora_per_rank: parameters one LoRA rank adds on the default targets
            (:data:`tokinteract.mllm.lora.DEFAULT_TARGET_MODULES`): ``sum(in + out)`` over them.
    """

    total: int
    vision_tower: int
    projector: int
    language_model: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_kv_heads: int
    head_dim: int
    lora_per_rank: int

    def trainable(
        self, *, vision_tower: bool = False, projector: bool = True, language_model: bool = True, lora_r: int = 0
    ) -> int:
        """Trainable parameters: the chosen parts, or with ``lora_r`` the adapters and the projector."""
        if lora_r:
            return lora_r * self.lora_per_rank + (self.projector if projector else 0)
        return (
            (self.vision_tower if vision_tower else 0) + (self.projector if projector else 0)
            + (self.language_model if language_model else 0)
        )


def model_size(config: Any) -> ModelSize:
    """:class:`ModelSize` of the ``AutoModelForImageTextToText`` model of ``config``, built on
    the ``meta`` device (no memory, no download). Tied weights count once.

    Raises:
        ValueError: a layout :func:`tokinteract.mllm.model.model_parts` does not know.
    """
    from transformers import AutoModelForImageTextToText

    from tokinteract.mllm.lora import DEFAULT_TARGET_MODULES, lora_target_regex
    from tokinteract.mllm.model import model_parts

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    numel = dict((n, p.numel()) for n, p in model.named_parameters())
    parts = {k: sum(numel[n] for n in names) for k, names in model_parts(model).items()}
    regex = lora_target_regex(model, DEFAULT_TARGET_MODULES)
    lora = sum(
        m.in_features + m.out_features for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and re.fullmatch(regex, n)
    )
    tc = config.get_text_config()
    heads = tc.num_attention_heads
    return ModelSize(
        total=sum(numel.values()), lora_per_rank=lora, hidden_size=tc.hidden_size, num_layers=tc.num_hidden_layers,
        vocab_size=tc.vocab_size, num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads, **parts,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank, by kind (see the module docstring for how each is counted).

    Attributes:
        student_weights: the student's weights on this rank.
        teacher_weights: the teacher's weights (whole on every rank).
        gradients: gradients of the trainable parameters on this rank.
        optimizer: AdamW state (and ZeRO-2's fp32 master copy) on this rank.
        activations: what the student's decoder keeps for backward.
        logits: the logits the loss materialises (one chunk with the fused loss).
        teacher_cache: the teacher's KV cache of the ground-truth pass (cached TPA).
    """

    student_weights: int
    teacher_weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    teacher_cache: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def gib(self) -> dict[str, float]:
        """Every entry and the total in GiB, rounded to 0.1."""
        out = {k: round(v / GiB, 1) for k, v in asdict(self).items()}
        out["total"] = round(self.total / GiB, 1)
        return out


def _positive_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def estimate_memory(
    student: ModelSize,
    teacher: ModelSize | None,
    *,
    trainable: int,
    micro_batch: int,
    seq_len: int,
    strategy: str = "zero2",
    world_size: int = 8,
    param_bytes: int = 2,
    gradient_checkpointing: bool = False,
    tpa_candidates: int = 0,
    tpa_forward: str = "cached",
    response_fraction: float = 0.5,
    loss_impl: str = "fused",
    chunk_rows: int | None = None,
) -> MemoryEstimate:
    """Bytes one rank needs (see the module docstring for each term and what is left out).

    Args:
        student, teacher: :func:`model_size` of each (``teacher`` None: SFT only).
        trainable: trainable student parameters (:meth:`ModelSize.trainable`).
        micro_batch, seq_len: ``per_device_train_batch_size`` and the padded length
            (``max_length`` for a worst case).
        strategy: ``"ddp"``, ``"zero2"`` (DeepSpeed ZeRO-2, bf16) or ``"fsdp2"`` (full shard).
        param_bytes: bytes per weight (2: bf16).
        tpa_candidates: ``d`` (0: no TPA); ``response_fraction`` of the tokens carry them.
        loss_impl: ``"fused"`` or ``"logits"``; ``chunk_rows`` the fused chunk (default
            ``2**24 // vocab``, the trainer's).

    Raises:
        ValueError: an unknown strategy or loss_impl, or a size that is not a positive int.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if loss_impl not in ("fused", "logits"):
        raise ValueError(f"loss_impl must be 'fused' or 'logits', got {loss_impl!r}")
    if tpa_forward not in ("cached", "packed"):
        raise ValueError(f"tpa_forward must be 'cached' or 'packed', got {tpa_forward!r}")
    if not 0.0 <= response_fraction <= 1.0:
        raise ValueError(f"response_fraction must lie in [0, 1], got {response_fraction!r}")
    for name, v in (("micro_batch", micro_batch), ("seq_len", seq_len), ("world_size", world_size),
                    ("param_bytes", param_bytes)):
        _positive_int(name, v)
    _positive_int("trainable", trainable, 0)
    _positive_int("tpa_candidates", tpa_candidates, 0)
    n = world_size
    pb = param_bytes
    shard = n if strategy == "fsdp2" else 1
    student_weights = student.total * pb // shard
    teacher_weights = teacher.total * pb if teacher is not None else 0
    gradients = trainable * pb // (1 if strategy == "ddp" else n)
    optimizer = trainable * 12 // n if strategy == "zero2" else trainable * 2 * pb // shard
    b, h = micro_batch, student.hidden_size
    cand = int(tpa_candidates * response_fraction * seq_len)
    s = seq_len + cand  # ground truth + candidate block (cached) or the packed expansion
    per_layer = 34 * s * b * h * pb // 2  # Korthikanti et al.'s 16-bit count, scaled to param_bytes
    if gradient_checkpointing:
        activations = student.num_layers * 2 * s * b * h * pb // 2 + per_layer
    else:
        activations = student.num_layers * per_layer
    vocab = student.vocab_size
    if loss_impl == "fused":
        rows = chunk_rows or max(1, 2**24 // vocab)
        logits = (2 if teacher is not None else 1) * 3 * rows * vocab * 4
    else:
        logits = b * s * vocab * (pb + 4 * 3)  # student: 16-bit logits, fp32 log-probs, probs, gradient
        if teacher is not None:
            logits += b * s * teacher.vocab_size * (pb + 4)
    teacher_cache = 0
    if teacher is not None and tpa_candidates and tpa_forward == "cached":
        teacher_cache = 2 * teacher.num_layers * teacher.num_kv_heads * teacher.head_dim * seq_len * b * pb
    return MemoryEstimate(
        student_weights=student_weights, teacher_weights=teacher_weights, gradients=gradients, optimizer=optimizer,
        activations=activations, logits=logits, teacher_cache=teacher_cache,
    )
