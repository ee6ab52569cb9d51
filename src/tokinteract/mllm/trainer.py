"""``DistillationTrainer``: a ``transformers.Trainer`` that distills a vision-language teacher into a student.

One training step is one pipeline (:meth:`DistillationTrainer.compute_loss`), for a batch from
:class:`tokinteract.mllm.data.LlavaCollator` or :class:`tokinteract.mllm.processor_data.ProcessorCollator`::

    batch -> student pass -> candidates -> (student candidate block) -> teacher pass -> loss

1. **Batch** (:func:`split_batch`): the model inputs (``input_ids``, ``attention_mask`` and every
   other tensor of the collator: ``pixel_values``, ``image_grid_thw``, ...), the labels and the
   visual / instruction masks.
2. **Student pass** (:meth:`~DistillationTrainer.student_pass`, with gradients, through the
   DDP/FSDP/DeepSpeed wrapper as *one* forward call): the ground-truth pass. With
   ``iva_weights="student"`` its attention at the IVA layer is captured.
3. **Candidates** (:meth:`~DistillationTrainer.candidates`, TPA only): ``d`` candidates per
   supervised position drawn from the student's detached ground-truth distribution (the image
   token and ids beyond a shared vocabulary prefix are never drawn), packed with
   ``tokinteract.tpa_expand``; then :meth:`~DistillationTrainer.expanded_pass` runs the
   candidate block over the ground-truth KV cache (``tpa_forward="cached"``, default) or the
   whole expansion once more with the ribbon mask (``"packed"``, the paper's Algorithm 1).
4. **Teacher pass** (:meth:`~DistillationTrainer.teacher_pass`; frozen, ``eval()``, under
   ``torch.inference_mode``, never wrapped for gradients): the same passes on the same
   expansion, on its own inputs (by default the student's, see
   :meth:`~DistillationTrainer.teacher_inputs`). With IVA, its instruction-to-vision attention
   rows at layer ``l*`` are captured (``tokinteract.hf.capture_attention``); ``l*`` is
   ``iva_layer`` or, if unset, the argmax of ``tokinteract.hf.irs_curve`` over pairs of
   training samples.
5. **Loss** (:meth:`~DistillationTrainer.distill_loss`): ``tokinteract.AlignTILoss`` composes
   SFT, KD, IVA and TPA; each part is logged as ``loss_sft``, ``loss_kd``, ``loss_iva``,
   ``loss_tpa``.

``loss_impl`` (:class:`~tokinteract.mllm.config.LossConfig`) is one parameter of these parts,
the models' ``output``:

* ``"fused"`` (default): both models return the hidden states entering their LM heads
  (``output="hidden"``; the LM head never runs inside the model), and
  ``AlignTILoss(backend="fused")`` (or ``"liger"``) applies each LM head (student: with
  gradients, tied embeddings included; teacher: under no grad) to only the rows some part
  needs, one chunk at a time; TPA candidates come from
  ``tokinteract.fused.fused_sample_candidates`` on the candidate positions only. The whole
  step (student, teacher, loss) runs inside the one wrapper forward, so the LM head's
  parameters are used inside it.
* ``"logits"``: the student returns full ``[B, T(2), V]`` logits and
  ``AlignTILoss(backend="eager")`` runs on them (``tokinteract.sample_candidates`` on the
  student's ground-truth logits); the teacher's LM head is applied to the rows the loss reads
  only (:func:`head_rows`). Same loss, parts and gradients as ``"fused"`` up to fp32 matmul
  rounding: it is the reference the tests compare the fused path with.

**A teacher with its own inputs** (the collator is a
:class:`tokinteract.mllm.processor_data.ProcessorCollator` with a ``teacher_processor``: another
vision tower or image resolution, hence other image-token counts and positions): the batch's
``teacher_*`` tensors become :attr:`Batch.teacher`, the teacher runs on them, and its outputs are
carried onto the student's layout by :mod:`tokinteract.rowmap` before the loss
(:meth:`~DistillationTrainer.teacher_pass`). SFT and KD compare the rows that predict the same
response token; TPA's candidates, sampled by the student at its response row ``t``, are placed
at the teacher's row of the same token (the teacher's own ribbon expansion) and its candidate
slots come in the student's order; IVA needs both families to show each image as one grid
(:func:`tokinteract.hf.families.image_grids`): the teacher's outputs at the student's visual
tokens are the area-weighted mean over the teacher's overlapping cells, its weights the
area-split attention mass. Refused there: IRS layer selection (give ``iva_layer``), GKD,
teachers of another family, IVA on non-grid families.

Normalisation under gradient accumulation and data parallelism: the trainer counts the
supervised positions (``labels[:, 1:] != -100``) and the sequences of the whole
accumulation window, summed over ranks when ``average_tokens_across_devices`` (the
default), and passes them as ``num_items`` / ``num_sequences``; so the loss of a window
equals the loss of one big batch.

Methods (``DistillationConfig.method``, each weight overridable):

==============  ====================================================================
``sft``          SFT only (no teacher)
``kd``           Vanilla KD: SFT + forward-KL KD on responses (Eq. 2)
``iva``          SFT + KD + IVA (teacher attention at ``l*``)
``tpa``          SFT + KD + TPA
``align_ti``     SFT + KD + IVA + TPA (Eq. 8)
``uniform_va``   SFT + KD + visual alignment with uniform weights (Table 6, LLaVA-KD)
``rkl``          SFT + reverse-KL KD (MiniLLM, Table 3)
``jsd``          SFT + JSD KD (``jsd_beta``, Table 3)
``skew_kl``      SFT + skew forward-KL KD (DistiLLM, ``skew_alpha``, Table 3)
``gkd``          GKD (Table 3): with probability ``gkd_lambda`` a batch is replaced by the
                 student's own sampled responses (:meth:`~DistillationTrainer.training_step`,
                 as TRL's ``GKDTrainer``) and only the divergence (JSD by default) is applied
                 to them; otherwise SFT + KD on the data
==============  ====================================================================

``iva_weights="student"`` takes the IVA weights from the student's own (detached)
attention at ``iva_student_layer`` (Table 8; default: ``l*`` scaled to the student's depth).

``tpa_skip_token_ids`` (opt-in, beyond the paper; default off): TPA places no candidates at
positions whose ground-truth next token is one of these ids. With the end-of-turn id, the
slot that asks both models for the token *after* the answer has ended is dropped (an SFT
teacher never saw that position; see ``docs/results/verdict.md``). In training dropped slots
count as 0 (the TPA denominator stays the window's supervised-token count, like KD's);
evaluation losses average over the kept slots.

Notes:
    * GKD on-policy batches are normalised by their own generated-token count and divided
      by the accumulation steps (the window's count cannot be known before generating);
      off-policy batches use the window count, which then includes the on-policy batch's
      labels. With ``gkd_lambda`` in {0, 1} this is exact.
    * Resuming restores the weights through ``from_pretrained`` (see
      :meth:`DistillationTrainer._load_from_checkpoint`); TPA candidates are reseeded from
      ``(sampling_seed, step, micro-batch, rank)``, so a resumed run redraws the same ones.
    * Distributed: DDP is tested (2 CPU processes, gloo). DeepSpeed ZeRO-2 is tested with
      ``examples/configs/ds_zero2.json`` on 2 CPU processes (DeepSpeed's CPU accelerator,
      gloo, fp32, 2 accumulation steps; ``tests/mllm/test_mllm_deepspeed.py``): per-step
      losses and final weights equal a one-process run, and DeepSpeed checkpoints resume;
      not run on GPUs (bf16, NCCL). FSDP2 (accelerate's ``fully_shard`` path, ``fsdp_config``
      of ``examples/configs/stage2_fsdp_override.yaml``) is tested on 2 CPU processes (gloo,
      fp32; accelerate only enables FSDP on GPU-type devices, so the test forces its CPU gate;
      ``tests/mllm/test_mllm_fsdp.py``): align_ti with the fused loss (LM head tied or not)
      and GKD give the DDP run's per-step losses and final weights, and ``save_model``
      writes a ``from_pretrained`` checkpoint; a LoRA (``peft``) student trains to the weights
      of one process and its saved adapter loads with ``PeftModel.from_pretrained``; not run
      on GPUs (bf16, NCCL). FSDP2 does not
      wrap the model, so :func:`run_through_wrapper` still calls the root module to run its
      hooks, and the fused loss unshards the LM head's FSDP2 unit (its forward never runs;
      FSDP2 reduce-scatters the head's gradient after backward). FSDP1 was not run. The
      teacher is a plain module on every device (ZeRO-3 / sharding the teacher is not
      supported). GKD's on-policy coin is the same on every rank (sharded generation needs
      all ranks to run it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from tokinteract import (
    AlignTILoss,
    HiddenStates,
    TPAExpansion,
    compat,
    sample_candidates,
    shift_labels,
    tpa_expand,
    uniform_visual_weights,
)
from tokinteract.hf.families import visual_token_ids
from tokinteract.mllm.config import LOSS_IMPLS, METHODS, DistillationConfig  # re-exported: their earlier home
from tokinteract.mllm.lora import check_4bit_layers, exact_4bit_layers, is_quantised, unwrap_peft
from tokinteract.mllm.model import check_teacher_student, num_image_tokens
from tokinteract.mllm.reliability import ReliableTrainerMixin

__all__ = [
    "LOSS_IMPLS",
    "METHODS",
    "ON_POLICY",
    "Batch",
    "DistillationConfig",
    "DistillationTrainer",
    "ModelInputs",
    "PassOutput",
    "head_rows",
    "run_through_wrapper",
    "split_batch",
]

logger = logging.getLogger(__name__)

ON_POLICY = "on_policy"
"""Key of a batch replaced by student-generated responses (:meth:`DistillationTrainer.training_step`
sets it to ``True``); :meth:`DistillationTrainer.compute_loss` then applies only the KD term."""

_BATCH_KEYS = ("input_ids", "attention_mask", "labels", "visual_mask", "instruction_mask")
_NOT_MODEL_INPUTS = frozenset((*_BATCH_KEYS, "response_mask", ON_POLICY))
TEACHER_PREFIX = "teacher_"
"""Prefix of the teacher's own batch in a collated dict (``ProcessorCollator(teacher_processor=...)``)."""


@dataclass(frozen=True)
class ModelInputs:
    """What one model reads in a pass: ``input_ids`` ``[B, T]``, the padding ``attention_mask``
    ``[B, T]`` and every other model input of the collator (``pixel_values``,
    ``image_grid_thw``, ``mm_token_type_ids``, ``token_type_ids``, ``image_sizes``, ...).

    Attributes:
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` padding mask (1 = real token).
        extra: the other model inputs, by keyword.
    """

    input_ids: Tensor
    attention_mask: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    """A collated batch split into what the parts of the step read (:func:`split_batch`).

    ``labels`` ``[B, T]`` are unshifted (``-100`` where unsupervised); ``visual_mask`` and
    ``instruction_mask`` are bool ``[B, T]``; ``on_policy`` marks a batch of student-generated
    responses (KD only, see :meth:`DistillationTrainer.training_step`).

    Attributes:
        inputs: the student's model inputs.
        labels: ``[B, T]`` unshifted labels.
        visual_mask: bool ``[B, T]``, True on visual tokens.
        instruction_mask: bool ``[B, T]``, True on instruction tokens (the user's words; IVA's
            query rows are those after the image, ``tokinteract.instruction_rows``).
        on_policy: whether the batch holds student-generated responses.
        teacher: the teacher's own batch of the same samples (its ``teacher_*`` keys), None
            when the teacher reads the student's.
    """

    inputs: ModelInputs
    labels: Tensor
    visual_mask: Tensor
    instruction_mask: Tensor
    on_policy: bool = False
    teacher: "Batch | None" = None


def split_batch(inputs: Mapping[str, Any]) -> Batch:
    """The :class:`Batch` of a collator's dict: its five named tensors, and every other tensor
    (but ``response_mask``) as a model input; the ``teacher_*`` keys, without their prefix, as
    :attr:`Batch.teacher`.

    Raises:
        ValueError: a named tensor is missing.
    """
    own = {k[len(TEACHER_PREFIX):]: v for k, v in inputs.items() if k.startswith(TEACHER_PREFIX)}
    inputs = {k: v for k, v in inputs.items() if not k.startswith(TEACHER_PREFIX)}
    missing = [k for k in _BATCH_KEYS if k not in inputs]
    if missing:
        raise ValueError(
            f"the batch must hold {list(_BATCH_KEYS)} (as LlavaCollator and ProcessorCollator make them); "
            f"missing {missing}, got keys {sorted(inputs)}"
        )
    extra = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS and isinstance(v, Tensor)}
    return Batch(
        inputs=ModelInputs(inputs["input_ids"], inputs["attention_mask"], extra),
        labels=inputs["labels"],
        visual_mask=inputs["visual_mask"].bool(),
        instruction_mask=inputs["instruction_mask"].bool(),
        on_policy=inputs.get(ON_POLICY, False) is True,
        teacher=split_batch(own) if own else None,
    )


@dataclass
class PassOutput:
    """One model's pass: ``states`` are ``[B, L, V]`` logits (``output="logits"``) or the
    ``[B, L, H]`` hidden states entering the LM head (``"hidden"``), over the ground truth
    (``L = T``) or the TPA expansion (``L = T2``, the ground truth first).

    ``weights``: ``[B, T]`` IVA weights read at the captured layer (None when none was
    captured). ``ground_truth``: the ``tokinteract.hf.GroundTruthOutput`` a cached candidate
    block continues from (cached TPA only).

    Attributes:
        states: logits or hidden states, ``[B, L, V]`` or ``[B, L, H]``.
        output: ``"logits"`` or ``"hidden"``.
        weights: IVA weights ``[B, T]`` or None.
        ground_truth: the cached pass's ``GroundTruthOutput`` or None.
    """

    states: Tensor
    output: str
    weights: Tensor | None = None
    ground_truth: Any = None


def head_rows(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor) -> Tensor:
    """``[B, L, V]`` logits ``hidden @ weight.T + bias``, computed on the ``rows`` (bool ``[B, L]``).

    When ``rows`` cover fewer than half of the positions, only they reach the head and the
    other rows are NaN: a row the loss reads but ``rows`` missed makes the loss raise (it
    refuses non-finite rows) instead of giving a wrong number. Otherwise every row is computed
    (one matmul over all rows costs less than gathering most of them and scattering the result
    back). Runs under no grad (the teacher's head).
    """
    if rows.shape != hidden.shape[:2]:
        raise ValueError(f"rows must have shape {tuple(hidden.shape[:2])} (batch, len), got {tuple(rows.shape)}")
    with torch.no_grad():
        if 2 * int(rows.sum()) >= rows.numel():
            return torch.nn.functional.linear(hidden, weight, bias)
        values = torch.nn.functional.linear(hidden[rows], weight, bias)
        out = values.new_full((*rows.shape, weight.shape[0]), float("nan"))
        out[rows] = values
    return out


def _from_inference(x: Tensor | None) -> Tensor | None:
    """A normal tensor with ``x``'s values (``x`` itself unless it was made under ``inference_mode``)."""
    return x.clone() if x is not None and x.is_inference() else x


def run_through_wrapper(wrapped: nn.Module, unwrapped: nn.Module, fn: Any) -> Any:
    """Run ``fn()`` (which calls ``unwrapped`` any number of times) inside *one* forward
    call of ``wrapped`` (DDP, FSDP, DeepSpeed engine, or ``unwrapped`` itself).

    Distributed wrappers prepare gradient synchronisation in their ``forward``; calling the
    inner module directly would silently skip it (DDP then never all-reduces). The inner
    module's ``forward`` is swapped for a shim for the duration of the call and restored
    (also on errors), including an instance-level ``forward`` set by Accelerate's autocast.

    FSDP2 (``fully_shard``) does not wrap: ``wrapped is unwrapped``, and its root
    forward hooks (lazy init, unsharding the root's own parameters -- vision embeddings,
    projector, ...) must still run, so such a module also goes through the shim.
    """
    if wrapped is unwrapped and not _is_fsdp2_module(wrapped):
        return fn()
    had = "forward" in unwrapped.__dict__
    saved = unwrapped.__dict__.get("forward")

    def shim(*args: Any, **kwargs: Any) -> Any:
        if had:
            unwrapped.forward = saved
        else:
            del unwrapped.forward
        return fn()

    unwrapped.forward = shim
    try:
        return wrapped()
    finally:
        if had:
            unwrapped.forward = saved
        else:
            unwrapped.__dict__.pop("forward", None)


def _is_fsdp2_module(module: nn.Module) -> bool:
    """Whether ``module`` was sharded in place by FSDP2's ``fully_shard`` (torch >= 2.6)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def _unshard_lm_head(model: nn.Module) -> nn.Module | None:
    """Make ``model``'s LM head weight a full tensor when FSDP2 left it sharded; return the
    FSDP2 module that was unsharded (None when nothing had to be done).

    The fused loss uses the LM head's weight directly, so the head's own forward (whose
    FSDP2 hook would all-gather it) never runs; Accelerate puts the head in its own FSDP2
    unit (with the final norm, which LLaVA's layout hides from it), so the weight would stay
    a sharded ``DTensor``. ``FSDPModule.unshard()`` on the unit owning the head all-gathers
    it; the gradients that autograd then accumulates on the full weight are reduce-scattered
    to the shards, and the unit resharded, by FSDP2's end-of-backward callback (it runs
    ``post_backward`` for every unit whose forward hooks did not). Without a backward (eval)
    the caller reshards.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without FSDP2
        return None
    if head is None or not isinstance(weight, DTensor):
        return None
    names = {m: n for n, m in model.named_modules()}
    name = names.get(head)
    owner = None
    while name is not None:  # the innermost FSDP2 unit holding the head (itself, then its parents)
        m = model.get_submodule(name)
        if isinstance(m, FSDPModule):
            owner = m
            break
        name = name.rpartition(".")[0] if name else None
    if owner is None:
        raise RuntimeError("the LM head's weight is a sharded DTensor but no FSDP2 module owns it")
    owner.unshard()
    if isinstance(getattr(head, "weight", None), DTensor):
        raise RuntimeError(f"FSDP2 unshard of {type(owner).__name__} left the LM head's weight sharded")
    return owner


def _position_ids(attention_mask: Tensor) -> Tensor:
    pos = attention_mask.long().cumsum(1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _plain_positions(model: nn.Module, attention_mask: Tensor) -> dict[str, Tensor]:
    """``position_ids`` for a plain forward of ``model``: the padding-aware sequential rule
    (:func:`_position_ids`) for families that number tokens sequentially; none for
    multimodal-RoPE families (Qwen-VL), whose forward builds its own position rows from
    ``attention_mask``, ``mm_token_type_ids`` and ``image_grid_thw`` (one sequential row
    would be silently wrong there)."""
    from tokinteract.hf.families import family_of

    if family_of(model).positions == "sequential":
        return {"position_ids": _position_ids(attention_mask)}
    return {}


def _hf():
    """The ``tokinteract.hf`` adapter (imported lazily: it needs transformers)."""
    import tokinteract.hf as hf

    return hf



class DistillationTrainer(ReliableTrainerMixin, Trainer):
    """A ``Trainer`` whose ``compute_loss`` is tokinteract's ``AlignTILoss`` against a frozen teacher.

    Args:
        model: the student ``LlavaForConditionalGeneration`` (vision tower frozen by
            :func:`tokinteract.mllm.model.set_trainable`).
        args: ``transformers.TrainingArguments`` (``remove_unused_columns`` is forced
            to False: the collator's masks must reach ``compute_loss``).
        teacher: the teacher LLaVA; required when KD, IVA (teacher weights), TPA or
            GKD are on. Frozen, put in ``eval()`` mode and moved to the training device
            here; it is never handed to the optimizer or a distributed wrapper.
        distill: a :class:`DistillationConfig`.
        irs_dataset: samples for IRS pairs when ``iva_layer`` is None (default: the
            training dataset).
        **kwargs: passed to ``transformers.Trainer`` (``train_dataset``,
            ``data_collator``, ``processing_class``, ...).

    Raises:
        ValueError: before training, for a missing teacher, mismatched vocabularies or
            image-token ids (unless a policy is set), different visual-token counts (unless the
            collator gives the teacher its own batch), or a dataset whose ``num_image_tokens``
            differs from the student's vision tower; with a teacher on its own batch, what it
            does not support (module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        args: Any,
        *,
        teacher: nn.Module | None = None,
        distill: DistillationConfig | None = None,
        irs_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        compat.check_trainer_overrides()  # our overrides of private Trainer methods must still run
        self.distill = distill or DistillationConfig()
        self.settings = self.distill.resolved()
        s = self.settings
        # IVA with student weights still aligns the student's logits with the teacher's
        needs_teacher = any(s[k] > 0 for k in ("kd", "iva", "tpa")) or s["on_policy"]
        if needs_teacher and teacher is None:
            raise ValueError(
                f"method {self.distill.method!r} with weights {({k: s[k] for k in ('sft', 'kd', 'iva', 'tpa')})} "
                "needs a teacher model, got teacher=None"
            )
        self.vocab_size: int | None = None
        # the collator makes the teacher its own batch (teacher_* keys): another processor/vision tower
        self.teacher_own_inputs = teacher is not None and getattr(kwargs.get("data_collator"), "teacher", None) is not None
        if teacher is not None:
            self.vocab_size = check_teacher_student(
                model, teacher, vocab_policy=self.distill.vocab_policy,
                image_token_policy=self.distill.image_token_policy,
                tokenizer=getattr(kwargs.get("processing_class"), "tokenizer", kwargs.get("processing_class")),
                own_inputs=self.teacher_own_inputs,
            )
        if self.teacher_own_inputs:
            self._check_own_inputs(model, teacher)
        if s["on_policy"] and model.config.model_type != "llava":
            raise ValueError(
                f"on_policy (GKD) generation supports only LLaVA students for now, got model_type "
                f"{model.config.model_type!r}"
            )
        for name in ("train_dataset", "eval_dataset"):
            ds = kwargs.get(name)
            got = getattr(ds, "num_image_tokens", None)
            n_vis = num_image_tokens(model) if got is not None else None  # a LLaVA-only dataset: LLaVA-only check
            if got is not None and got != n_vis:
                raise ValueError(
                    f"{name} expands each image to {got} image tokens but the student's vision tower "
                    f"yields {n_vis} visual tokens per image; build the dataset with num_image_tokens={n_vis}"
                )
            skipped = getattr(ds, "skipped", None)
            if skipped:
                logger.warning("%s: %d sample(s) skipped for bad images", name, len(skipped))
        if getattr(args, "remove_unused_columns", False):
            args.remove_unused_columns = False
        super().__init__(model=model, args=args, **kwargs)
        # bitsandbytes 4-bit layers (QLoRA): off their bf16 CPU inference kernel, which passes no gradient
        self._student_4bit = exact_4bit_layers(model, "student")
        if teacher is not None:
            exact_4bit_layers(teacher, "teacher")
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
            if is_quantised(teacher):  # transformers refuses to cast it: it keeps the dtypes it was loaded with
                dtype = None
            teacher.to(device=self.args.device, **({"dtype": dtype} if dtype is not None else {}))
        self.output = "hidden" if self.distill.loss_impl == "fused" else "logits"
        """What the student's passes return: ``"hidden"`` (``loss_impl="fused"``) or ``"logits"``."""
        self.teacher_output = "hidden" if teacher is None or _head_is_last(teacher) else "logits"
        """What the teacher's pass returns: hidden states, unless its logits are more than its LM head's output."""
        self.loss_fn = self._build_loss(sft=s["sft"], kd=s["kd"], iva=s["iva"], tpa=s["tpa"])
        self.on_policy_loss_fn = self._build_loss(sft=0.0, kd=s["kd"], iva=0.0, tpa=0.0) if s["on_policy"] else None
        self.image_token_id = int(model.config.image_token_id)
        self.teacher_image_token_id = int(teacher.config.image_token_id) if teacher is not None else None
        # never sampled as TPA candidates: every visual placeholder id of both models
        self.no_sample_ids = {self.image_token_id, *visual_token_ids(model)}
        if teacher is not None:
            self.no_sample_ids |= {int(self.teacher_image_token_id), *visual_token_ids(teacher)}
        self.pad_token_id = self._pad_id(model, kwargs.get("processing_class"))
        self._counts: tuple[Tensor, Tensor] | None = None
        self._block_mask_cache: tuple[Any, torch.device, Any] | None = None  # (expansion, device, BlockMask)
        self._part_sums: dict[str, Tensor] = {}
        self._last_part_log_step = 0
        self._micro = 0
        self._micro_step = -1
        self._on_policy_batches = 0
        self.iva_layer: int | None = self.distill.iva_layer
        student_layer_given = s["iva_weights"] == "student" and self.distill.iva_student_layer is not None
        if s["iva"] > 0 and s["iva_weights"] != "uniform" and self.iva_layer is None and not student_layer_given:
            self.iva_layer = self._select_layer(irs_dataset if irs_dataset is not None else self.train_dataset)
        if s["iva"] > 0 and s["iva_weights"] != "uniform":
            src = teacher if s["iva_weights"] == "teacher" else model
            n_layers = src.config.text_config.num_hidden_layers
            layer = self._weights_layer()
            if not 0 <= layer < n_layers:
                raise ValueError(f"IVA layer must lie in [0, {n_layers}) for the {s['iva_weights']}, got {layer}")

    # ---------------------------------------------------------------- helpers
    def _check_own_inputs(self, model: nn.Module, teacher: nn.Module) -> None:
        """Refuse, before training, what a teacher reading its own batch does not support (module
        docstring, "A teacher with its own inputs")."""
        from tokinteract.hf.families import GRID_MODEL_TYPES

        s = self.settings
        if s["on_policy"]:
            raise ValueError("on_policy (GKD) is not supported with a teacher that reads its own processor's batch")
        if s["iva"] > 0:
            both = {"student": model.config.model_type, "teacher": teacher.config.model_type}
            if any(mt not in GRID_MODEL_TYPES for mt in both.values()):
                raise ValueError(
                    f"IVA with a teacher on its own visual tokens needs both models to show each image as one grid "
                    f"(model types {list(GRID_MODEL_TYPES)}), got {both}; set iva_weight=0"
                )
            student_layer_given = s["iva_weights"] == "student" and self.distill.iva_student_layer is not None
            if s["iva_weights"] != "uniform" and self.distill.iva_layer is None and not student_layer_given:
                raise ValueError(
                    "iva_layer is None: IRS layer selection on the teacher's own batches is not supported; set iva_layer"
                )

    @staticmethod
    def _pad_id(model: nn.Module, processing_class: Any) -> int:
        tok = getattr(processing_class, "tokenizer", processing_class)
        pid = getattr(tok, "pad_token_id", None)
        if pid is None:
            pid = model.generation_config.pad_token_id if model.generation_config is not None else None
        if pid is None:
            pid = 0
        if pid == int(model.config.image_token_id):
            raise ValueError("the pad token id equals the image token id; use a different pad token")
        return int(pid)

    def _weights_layer(self) -> int:
        """The layer whose attention gives the IVA weights (teacher's l*, or the student's layer)."""
        if self.settings["iva_weights"] == "student" and self.distill.iva_student_layer is not None:
            return self.distill.iva_student_layer
        if self.iva_layer is None:
            raise ValueError("iva_layer is None: set it, or let the trainer compute it from IRS pairs")
        if self.settings["iva_weights"] == "teacher":
            return self.iva_layer
        nt = self.teacher.config.text_config.num_hidden_layers
        ns = self.model.config.text_config.num_hidden_layers
        return min(ns - 1, round(self.iva_layer * (ns - 1) / max(nt - 1, 1)))

    def _select_layer(self, dataset: Any) -> int:
        """``l* = argmax IRS`` of the teacher over pairs (same image, two instructions)."""
        hf = _hf()
        if not hasattr(hf, "irs_curve"):
            raise ValueError("iva_layer is None and tokinteract.hf.irs_curve is unavailable; set iva_layer")
        pairs = _irs_pairs(dataset, self.distill.irs_num_pairs)
        if not pairs:
            raise ValueError(
                "iva_layer is None but the dataset holds no two samples with the same image and different "
                "instructions to compute IRS from; set iva_layer explicitly"
            )
        dev = self.args.device

        def model_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
            batch = self.data_collator(items)
            batch.pop("labels", None)
            batch.pop("response_mask", None)
            batch["position_ids"] = _position_ids(batch["attention_mask"])
            return {k: v.to(dev) for k, v in batch.items()}

        bs = max(1, self.args.per_device_train_batch_size)
        batches = [
            (model_batch([p[0] for p in pairs[i : i + bs]]), model_batch([p[1] for p in pairs[i : i + bs]]))
            for i in range(0, len(pairs), bs)
        ]
        if self.teacher.training:
            self.teacher.eval()
        curve = hf.irs_curve(self.teacher, batches)
        logger.info("IRS over %d pairs: %s -> l* = %d", curve.num_pairs,
                    [round(float(x), 4) for x in curve.scores], curve.best_layer)
        self.irs_scores = curve.scores.detach().cpu()
        return int(curve.best_layer)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._check_remap_collision(batch_samples)
        items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batch_samples)
        seqs = sum(int(b["labels"].shape[0]) for b in batch_samples)
        t = torch.tensor([[float(items), float(seqs)]], device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            t = self.accelerator.gather(t).sum(0, keepdim=True)
        self._counts = (t[0, 0], t[0, 1])
        return batch_samples, num_items

    def _check_remap_collision(self, batch_samples: list[dict[str, Any]]) -> None:
        """With ``image_token_policy="remap"``, a batch whose text holds the teacher's image-token
        id would give the teacher more image tokens than images: refuse it before its forward."""
        t_img = self.teacher_image_token_id
        if t_img is None or t_img == self.image_token_id or self.teacher_own_inputs:
            return
        for b in batch_samples:
            hit = b["input_ids"] == t_img
            if bool(hit.any()):
                row = int(hit.any(1).nonzero()[0])
                self._stop_run(
                    f"image_token_policy='remap': a training sequence (batch row {row}) holds the teacher's "
                    f"image-token id {t_img} as a text token; the teacher would see more image tokens than images. "
                    "Give the teacher an image-token id that the student's tokenizer never produces"
                )

    def _next_micro_batch(self) -> None:
        """Count one training micro-batch (:meth:`training_step`): its seeds are reseeded from
        ``(sampling_seed, step, micro-batch, rank)``, so a resumed run redraws the same ones."""
        step = self.state.global_step
        if step != self._micro_step:
            self._micro_step, self._micro = step, 0
        self._micro += 1

    def _generator(self, device: torch.device) -> torch.Generator:
        """The current micro-batch's generator on this rank (TPA candidates)."""
        g = torch.Generator(device=device)
        g.manual_seed(self._seed(self.args.process_index))
        return g

    def _seed(self, rank: int) -> int:
        """The current micro-batch's seed on ``rank`` (counted by :meth:`_next_micro_batch`)."""
        return (self.distill.sampling_seed * 1_000_003 + self._micro_step * 4099 + self._micro * 131 + rank) % (
            2**63 - 1
        )

    def _sampling_logits(self, logits: Tensor) -> Tensor:
        lg = logits.detach()
        if self.vocab_size is not None:
            lg = lg[..., : self.vocab_size]
        lg = lg.clone()
        for i in self.no_sample_ids:
            if i < lg.shape[-1]:
                lg[..., i] = torch.finfo(lg.dtype).min
        return lg

    def _sampling_head(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """The student's LM head for fused candidate sampling, detached: ``weight[:vocab]`` and a
        bias that is ``finfo.min`` at the image-token id(s), as :meth:`_sampling_logits` does."""
        from tokinteract.hf.packed import lm_head_parameters

        w, b = lm_head_parameters(model)
        w = w.detach()
        b = b.detach() if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        if self.vocab_size is not None:
            w, b = w[: self.vocab_size], b[: self.vocab_size]
        b = b.clone()
        for i in self.no_sample_ids:
            if i < b.shape[0]:
                b[i] = torch.finfo(b.dtype).min
        return w, b

    def _build_loss(self, **weights: float) -> AlignTILoss:
        """The ``AlignTILoss`` with these part weights and the configured divergence and backend
        (``"eager"`` on logits; ``"fused"`` or ``"liger"`` on hidden states)."""
        d, s = self.distill, self.settings
        backend = "eager" if self.output == "logits" else "fused" if d.loss_backend == "tokinteract" else "liger"
        return AlignTILoss(
            **weights, kind=s["divergence"], temperature=d.temperature, beta=d.jsd_beta, alpha=d.skew_alpha,
            vocab_size=self.vocab_size, backend=backend,
            chunk_size=d.loss_chunk_size if self.output == "hidden" else None, liger_compiled=d.loss_liger_compiled,
        )

    def _teacher_ids(self, ids: Tensor) -> Tensor:
        t_img = self.teacher_image_token_id
        if t_img is None or t_img == self.image_token_id or self.teacher_own_inputs:
            return ids
        return torch.where(ids == self.image_token_id, torch.full_like(ids, t_img), ids)

    # ---------------------------------------------------------------- the parts of a step
    def batch_weights(self, batch: Batch) -> dict[str, float]:
        """The part weights for ``batch``: the method's, or KD alone on an on-policy batch."""
        s = self.settings
        if batch.on_policy:
            return {"sft": 0.0, "kd": s["kd"], "iva": 0.0, "tpa": 0.0}
        return {k: s[k] for k in ("sft", "kd", "iva", "tpa")}

    def _capture_layer(self, role: str, weights: dict[str, float]) -> int | None:
        """The layer whose attention ``role`` ("student" or "teacher") gives the IVA weights, or None."""
        if weights["iva"] > 0 and self.settings["iva_weights"] == role:
            return self._weights_layer()
        return None

    def candidate_mask(self, batch: Batch) -> Tensor:
        """Bool ``[B, T]``: the positions that get TPA candidates (supervised next token, not in
        ``tpa_skip_token_ids``)."""
        next_ids = shift_labels(batch.labels)  # [b, t]: the ground-truth token t + 1 that TPA's candidates at t replace
        cmask = next_ids != -100
        if self.distill.tpa_skip_token_ids:  # beyond the paper (opt-in): drop these slots, keep num_items
            cmask &= ~torch.isin(next_ids, torch.tensor(self.distill.tpa_skip_token_ids, device=next_ids.device))
        return cmask

    def ground_truth_pass(self, model: nn.Module, inputs: ModelInputs, *, output: str, tpa: bool) -> PassOutput:
        """``model``'s forward on the ground truth, returning ``output`` (``"logits"`` or ``"hidden"``).

        Without TPA, the model's own forward (sequential position ids for plain families).
        With TPA, ``tokinteract.hf.ground_truth_forward``: keeping its KV cache for the
        candidate block (``tpa_forward="cached"``), or without cache and without gradients
        (``"packed"``: only the candidates are drawn from it; the packed pass recomputes the
        ground truth with gradients).
        """
        ids, att, extra = inputs.input_ids, inputs.attention_mask, inputs.extra
        if not tpa:
            kw = dict(input_ids=ids, attention_mask=att, **_plain_positions(model, att), **extra)
            if output == "hidden":
                from tokinteract.hf.packed import _base_model

                return PassOutput(_base_model(model)(**kw).last_hidden_state, output)
            return PassOutput(model(**kw).logits, output)
        packed = self.distill.tpa_forward == "packed"
        with torch.no_grad() if packed else nullcontext():
            gt = _hf().ground_truth_forward(model, ids, att, use_cache=not packed, output=output, **extra)
        return PassOutput(gt.hidden_states if output == "hidden" else gt.logits, output, ground_truth=gt)

    def student_pass(self, model: nn.Module, batch: Batch, weights: dict[str, float]) -> PassOutput:
        """The student's ground-truth pass (:meth:`ground_truth_pass`, with gradients), with its
        detached attention at the IVA layer when ``iva_weights="student"``."""
        layer = self._capture_layer("student", weights)
        with _maybe_capture(model, layer, batch.instruction_mask) as cap:
            out = self.ground_truth_pass(model, batch.inputs, output=self.output, tpa=weights["tpa"] > 0)
        if layer is not None:
            out.weights = cap.visual_importance(batch.visual_mask)[:, : batch.labels.shape[1]].detach()
        return out

    def candidates(
        self, model: nn.Module, student: PassOutput, batch: Batch, generator: torch.Generator
    ) -> TPAExpansion:
        """TPA's expansion: ``tpa_num_candidates`` candidates per position of :meth:`candidate_mask`,
        drawn from the student's detached ground-truth distribution (never an image token, never an
        id beyond the shared vocabulary), packed by ``tokinteract.tpa_expand``.

        From logits: ``tokinteract.sample_candidates``; from hidden states:
        ``tokinteract.fused.fused_sample_candidates``, which applies the LM head to the
        candidate positions only.
        """
        d = self.distill
        cmask = self.candidate_mask(batch)
        opts = dict(strategy=d.tpa_sampling, top_p=d.tpa_top_p, temperature=d.tpa_temperature, generator=generator)
        if student.output == "hidden":
            from tokinteract.fused import fused_sample_candidates

            hw, hb = self._sampling_head(model)
            gt = student.states[:, : batch.labels.shape[1]].detach().to(hw.dtype)
            cand = fused_sample_candidates(
                gt, hw, d.tpa_num_candidates, mask=cmask, student_bias=hb, chunk_size=d.loss_chunk_size, **opts
            )
        else:
            cand = sample_candidates(self._sampling_logits(student.states), d.tpa_num_candidates, mask=cmask, **opts)
        inputs = batch.inputs
        return tpa_expand(inputs.input_ids, cand, cmask, inputs.attention_mask.bool(), pad_token_id=self.pad_token_id)

    def expanded_pass(
        self, model: nn.Module, expansion: TPAExpansion, inputs: ModelInputs, *, output: str,
        ground_truth: PassOutput | None = None, mask_of: TPAExpansion | None = None,
    ) -> Tensor:
        """``model``'s ``[B, T2, *]`` states over the whole expansion: the ground truth's states
        followed by the candidate block run over its KV cache (``tpa_forward="cached"``;
        ``ground_truth`` from :meth:`ground_truth_pass`), or one packed pass with the ribbon mask
        (``"packed"``; the FlexAttention ``BlockMask`` of ``mask_of``, default ``expansion``, is
        built once per batch: the teacher passes the student's expansion, whose layout its copy
        with remapped ids shares)."""
        hf = _hf()
        if self.distill.tpa_forward == "packed":
            bm = self._block_mask(model, expansion if mask_of is None else mask_of)
            return hf.packed_forward(model, expansion, output=output, block_mask=bm, **inputs.extra)
        if ground_truth is None or ground_truth.ground_truth is None:
            raise ValueError("tpa_forward='cached' needs the ground-truth pass (ground_truth_pass with tpa=True)")
        block = hf.cached_candidate_forward(model, ground_truth.ground_truth, expansion)
        return torch.cat([ground_truth.states, block], 1)

    def teacher_inputs(self, batch: Batch) -> ModelInputs:
        """The teacher's inputs by default: the student's, with the image-token id remapped
        (``image_token_policy="remap"``) and floating tensors (pixel values) in the teacher's dtype."""
        dtype = next(self.teacher.parameters()).dtype
        inputs = batch.inputs
        extra = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.extra.items()}
        return ModelInputs(self._teacher_ids(inputs.input_ids), inputs.attention_mask, extra)

    def teacher_pass(
        self, batch: Batch, expansion: TPAExpansion | None, weights: dict[str, float],
        inputs: ModelInputs | None = None,
    ) -> PassOutput:
        """The frozen teacher's pass on ``inputs`` (default :meth:`teacher_inputs`) and the
        student's expansion, with its attention at ``l*`` when the IVA weights are the teacher's.

        Returns the hidden states entering the teacher's LM head (the loss applies the head to
        the rows it needs), or full logits when the teacher's family transforms its logits after
        the head (final-logit softcapping; ``loss_impl="logits"`` only).

        Runs under ``torch.inference_mode`` (no autograd bookkeeping, no version counters). The
        hidden states and the IVA weights leave it as normal tensors (a copy of ``[B, L, H]`` and
        ``[B, T]``): an inference tensor cannot be saved for the student's backward. The
        full-logits case runs under ``torch.no_grad`` instead, where no ``[B, L, V]`` copy is needed.

        With the teacher's own batch (``batch.teacher``) and ``inputs`` None: the pass runs on that
        batch and its states and weights are carried onto the student's layout
        (:meth:`teacher_row_maps`, :meth:`teacher_expansion`).
        """
        if inputs is None and (batch.teacher is not None or self.teacher_own_inputs):
            return self._teacher_pass_own(batch, expansion, weights)
        teacher = self.teacher
        if teacher.training:
            teacher.eval()
        inputs = self.teacher_inputs(batch) if inputs is None else inputs
        output = self.teacher_output
        layer = self._capture_layer("teacher", weights)
        t_exp = None
        if expansion is not None:
            t_exp = dataclasses.replace(expansion, input_ids=self._teacher_ids(expansion.input_ids))
            if self.distill.tpa_forward == "packed":
                self._block_mask(teacher, expansion)  # built outside inference mode (the student's, when both use flex)
        mode = torch.inference_mode() if output == "hidden" else torch.no_grad()
        with mode, _maybe_capture(teacher, layer, batch.instruction_mask) as cap:
            # only the first forward at the captured layer is recorded: the ground-truth
            # (cached) or packed pass, never the candidate block
            packed = t_exp is not None and self.distill.tpa_forward == "packed"
            gt = None if packed else self.ground_truth_pass(teacher, inputs, output=output, tpa=t_exp is not None)
            if t_exp is None:
                states = gt.states
            else:
                states = self.expanded_pass(
                    teacher, t_exp, inputs, output=output, ground_truth=gt, mask_of=expansion
                )
            w = cap.visual_importance(batch.visual_mask)[:, : batch.labels.shape[1]] if layer is not None else None
        return PassOutput(_from_inference(states), output, weights=_from_inference(w))

    def teacher_row_maps(self, batch: Batch, weights: dict[str, float]) -> tuple[Any, Any, Any]:
        """``(responses, outputs, iva_weights)``: the :class:`tokinteract.rowmap.RowMap` s from the
        teacher's own batch onto the student's rows: the supervised rows (same tokens, in order);
        those plus, with IVA, the visual rows resampled by area (mean); the IVA weights (mass)."""
        from tokinteract.rowmap import response_row_map, visual_row_map

        own = batch.teacher
        rmap = response_row_map(batch.labels, own.labels)
        if weights["iva"] <= 0:
            return rmap, rmap, None
        from tokinteract.hf.families import image_grids

        s_grids = image_grids(self.accelerator.unwrap_model(self.model), batch.inputs.extra, batch.visual_mask)
        t_grids = image_grids(self.teacher, own.inputs.extra, own.visual_mask)
        vmean, vmass = visual_row_map(batch.visual_mask, own.visual_mask, s_grids, t_grids)
        return rmap, rmap + vmean, vmass

    def teacher_expansion(self, expansion: TPAExpansion, teacher_batch: Batch, responses: Any) -> TPAExpansion:
        """The student's TPA candidates after the teacher's own prefix: the candidates at the
        student's row ``t`` go to the teacher's row predicting the same response token
        (``responses``, :meth:`teacher_row_maps`); the ranks of the rows, hence the candidate
        slots after the ground truth, keep the student's order."""
        B, Ts, d = expansion.candidate_index.shape
        dev = expansion.input_ids.device
        s2t = torch.full((B, Ts), -1, dtype=torch.long, device=dev)
        s2t[responses.b.to(dev), responses.dst.to(dev)] = responses.src.to(dev)
        b, t = expansion.candidate_mask.nonzero(as_tuple=True)
        tt = s2t[b, t]
        if bool((tt < 0).any()):
            raise ValueError("a TPA candidate position of the student has no supervised teacher row")
        cands = expansion.input_ids.gather(1, expansion.candidate_index.clamp(min=0).reshape(B, -1)).reshape(B, Ts, d)
        ids = teacher_batch.inputs.input_ids
        cm = torch.zeros(ids.shape, dtype=torch.bool, device=dev)
        cm[b, tt] = True
        ct = torch.zeros((*ids.shape, d), dtype=expansion.input_ids.dtype, device=dev)
        ct[b, tt] = cands[b, t]
        return tpa_expand(ids, ct, cm, teacher_batch.inputs.attention_mask.bool(), pad_token_id=self.pad_token_id)

    def _teacher_pass_own(self, batch: Batch, expansion: TPAExpansion | None, weights: dict[str, float]) -> PassOutput:
        """:meth:`teacher_pass` on the teacher's own batch (``batch.teacher``), its states and IVA
        weights carried onto the student's layout (the module docstring)."""
        own = batch.teacher
        if own is None or not self.teacher_own_inputs:
            raise ValueError(
                "the batch has teacher_* inputs but the trainer's data_collator has no teacher processor"
                if own is not None else "the data_collator has a teacher processor but the batch has no teacher_* inputs"
            )
        responses, outputs, iva_weights = self.teacher_row_maps(batch, weights)
        t_exp = self.teacher_expansion(expansion, own, responses) if expansion is not None else None
        out = self.teacher_pass(own, t_exp, weights, inputs=self.teacher_inputs(own))
        Tt = own.labels.shape[1]
        states = outputs.apply(out.states[:, :Tt])
        if expansion is not None:
            if out.states.shape[1] - Tt != expansion.expanded_len - expansion.seq_len:  # same counts per row
                raise RuntimeError("the teacher's candidate block does not match the student's")
            states = torch.cat([states, out.states[:, Tt:]], 1)
        w = iva_weights.apply(out.weights[..., None])[..., 0] if out.weights is not None else None
        return PassOutput(states, out.output, weights=w)

    def teacher_rows(self, batch: Batch, expansion: TPAExpansion | None, weights: dict[str, float]) -> Tensor:
        """Bool ``[B, L]``: the rows of the teacher's logits the loss reads (KD: supervised positions;
        IVA: visual positions; TPA: the candidate slots)."""
        B, T = batch.labels.shape
        L = T if expansion is None else expansion.expanded_len
        rows = torch.zeros((B, L), dtype=torch.bool, device=batch.labels.device)
        if weights["kd"] > 0:
            rows[:, :T] |= shift_labels(batch.labels) != -100
        if weights["iva"] > 0:
            rows[:, :T] |= batch.visual_mask
        if weights["tpa"] > 0 and expansion is not None:
            b, _, _, slot = expansion.candidate_slots()
            rows[b.to(rows.device), slot.to(rows.device)] = True
        return rows

    def distill_loss(
        self, model: nn.Module, student: PassOutput, teacher: PassOutput | None, batch: Batch,
        expansion: TPAExpansion | None, weights: dict[str, float], counts: Any,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``AlignTILoss`` on both passes (on-policy batches: the KD-only loss).

        Hidden states go in as ``HiddenStates`` with their LM head's weight and bias (student:
        the parameters, with gradients); a teacher's hidden states meet full student logits
        through :func:`head_rows` on :meth:`teacher_rows`. The IVA weights are the teacher's,
        the student's (captured in their passes) or uniform over the visual tokens.
        """
        from tokinteract.hf.packed import lm_head_parameters

        s_in: Tensor | HiddenStates = student.states
        if student.output == "hidden":
            sw, sb = lm_head_parameters(model)
            s_in = HiddenStates(student.states.to(sw.dtype), sw, sb)
        t_in: Tensor | HiddenStates | None = None
        if teacher is not None:
            t_in = teacher.states
            if teacher.output == "hidden":
                tw, tb = lm_head_parameters(self.teacher)
                if student.output == "hidden":
                    t_in = HiddenStates(teacher.states.to(tw.dtype), tw, tb)
                else:
                    t_in = head_rows(teacher.states, tw, tb, self.teacher_rows(batch, expansion, weights))
        visual = None
        if weights["iva"] > 0:
            src = self.settings["iva_weights"]
            if src == "uniform":
                visual = uniform_visual_weights(batch.visual_mask)
            else:
                visual = (teacher if src == "teacher" else student).weights
        loss_fn = self.on_policy_loss_fn if batch.on_policy else self.loss_fn
        return loss_fn(
            s_in, t_in, batch.labels, expansion=expansion, visual_weights=visual,
            num_items=counts[0] if counts is not None else None,
            num_sequences=counts[1] if counts is not None else None,
        )

    # ---------------------------------------------------------------- the step
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """batch -> student pass -> candidates -> teacher pass -> loss (the module docstring).

        The student's passes, the teacher's pass and the loss run inside one forward call of the
        distributed wrapper (:func:`run_through_wrapper`). ``return_outputs`` adds the student's
        ground-truth logits.
        """
        check_4bit_layers(self._student_4bit, "student")
        batch = split_batch(inputs)
        training = self.model.training
        ids = batch.inputs.input_ids
        gen = self._generator(ids.device) if training else torch.Generator(device=ids.device).manual_seed(0)
        counts = self._counts if training and not batch.on_policy else None
        weights = self.batch_weights(batch)
        unwrapped = unwrap_peft(self.accelerator.unwrap_model(model))  # LoRA: the adapted model inside
        needs_teacher = self.teacher is not None and any(weights[k] > 0 for k in ("kd", "iva", "tpa"))
        unsharded: list[nn.Module] = []

        def step() -> tuple[Tensor, dict[str, Tensor], PassOutput]:
            if self.output == "hidden":
                owner = _unshard_lm_head(unwrapped)  # FSDP2: the head's forward hook never runs here
                if owner is not None:
                    unsharded.append(owner)
            student = self.student_pass(unwrapped, batch, weights)
            exp = None
            if weights["tpa"] > 0:
                exp = self.candidates(unwrapped, student, batch, gen)
                student.states = self.expanded_pass(
                    unwrapped, exp, batch.inputs, output=self.output, ground_truth=student
                )
            teacher = self.teacher_pass(batch, exp, weights) if needs_teacher else None
            loss, parts = self.distill_loss(unwrapped, student, teacher, batch, exp, weights, counts)
            return loss, parts, student

        loss, parts, student = run_through_wrapper(model, unwrapped, step)
        if batch.on_policy:
            loss = self._finish_on_policy(loss, parts)
        else:
            loss = self._finish(loss, parts, counts)
        # before resharding: from hidden states the logits need the LM head's full (FSDP2-unsharded) weight
        logits = self._ground_truth_logits(unwrapped, student, batch) if return_outputs else None
        if unsharded and not loss.requires_grad:  # no backward will reshard the head (eval)
            for owner in unsharded:
                owner.reshard()
        if return_outputs:
            return loss, {"logits": logits}
        return loss

    def _ground_truth_logits(self, model: nn.Module, student: PassOutput, batch: Batch) -> Tensor:
        """The student's ``[B, T, V]`` logits on the ground truth (from hidden states: under no grad)."""
        gt = student.states[:, : batch.labels.shape[1]]
        if student.output == "logits":
            return gt
        from tokinteract.hf.packed import lm_head_parameters

        sw, sb = lm_head_parameters(model)
        with torch.no_grad():
            return torch.nn.functional.linear(gt.to(sw.dtype), sw, sb)

    def _finish(self, loss: Tensor, parts: dict[str, Tensor], counts: Any) -> Tensor:
        """Scale for data parallelism and log the parts."""
        scale = 1.0
        if counts is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            scale = float(self.accelerator.num_processes)
        self.loss_is_scaled_for_ga = counts is not None
        loss = loss * scale
        if self.model.training:
            share = scale if counts is not None else scale / max(self.current_gradient_accumulation_steps, 1)
            self._add_parts(parts, share)
        return loss

    def _finish_on_policy(self, loss: Tensor, parts: dict[str, Tensor]) -> Tensor:
        """An on-policy batch's loss: its own mean over the generated tokens (the Trainer divides
        by the accumulation steps), ``kd_weight * KD``; logged as ``loss_kd_on_policy``."""
        self.loss_is_scaled_for_ga = False
        self._on_policy_batches += 1
        self._add_parts({"kd_on_policy": parts["kd"]}, 1.0 / max(self.current_gradient_accumulation_steps, 1))
        return loss

    @torch.no_grad()
    def _block_mask(self, model: nn.Module, exp: Any) -> Any:
        """The batch's FlexAttention ``BlockMask`` for ``model``'s packed pass (None unless it runs
        ``flex_attention``): built once per expansion and shared by the student's and the
        teacher's packed passes and all their layers (the ribbon depends only on the layout)."""
        from tokinteract.attention import ribbon_block_mask
        from tokinteract.hf import _attn

        if _attn.mask_format(model) != "block":
            return None
        dev = _attn.model_device(model)
        cached = self._block_mask_cache
        if cached is None or cached[0] is not exp or cached[1] != dev:
            cached = self._block_mask_cache = (exp, dev, ribbon_block_mask(exp, device=dev))
        return cached[2]


    # ---------------------------------------------------------------- GKD's on-policy batches
    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Tensor:
        """One training micro-batch. GKD (``on_policy``): with probability ``gkd_lambda`` the batch is
        first replaced by the student's own responses (:meth:`on_policy_batch`), as TRL's
        ``GKDTrainer`` does; the Trainer's step then runs :meth:`compute_loss` on it."""
        self._next_micro_batch()
        if self.settings["on_policy"] and self._on_policy_coin(self.args.device):  # where the batch will be
            inputs = self.on_policy_batch(model, inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def _on_policy_coin(self, device: torch.device) -> bool:
        """Whether this micro-batch goes on-policy. One coin for all ranks (rank 0's seed): under
        FSDP every rank must run the same forwards (generation all-gathers the shards), so all go
        on-policy or none does."""
        shared = torch.Generator(device=device)
        shared.manual_seed(self._seed(0))
        return float(torch.rand((), generator=shared, device=device)) < self.distill.gkd_lambda

    def on_policy_batch(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` replaced by the student's sampled responses (:meth:`_generate`): each sample's
        first prompt (left-padded) and up to ``gkd_max_new_tokens`` generated tokens, labelled
        only on the generated tokens, marked with :data:`ON_POLICY`."""
        inputs = self._prepare_inputs(inputs)
        unwrapped = unwrap_peft(self.accelerator.unwrap_model(model))  # LoRA: the adapted model inside
        with self.compute_loss_context_manager():  # the autocast the loss runs under
            seq, gatt, glabels, gpx = self._generate(
                unwrapped, inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                inputs["visual_mask"].bool(), inputs.get("pixel_values"),
            )
        out: dict[str, Any] = {
            "input_ids": seq, "attention_mask": gatt, "labels": glabels, "visual_mask": seq == self.image_token_id,
            "instruction_mask": torch.zeros_like(seq, dtype=torch.bool), ON_POLICY: True,
        }
        if gpx is not None:
            out["pixel_values"] = gpx
        return out

    @torch.no_grad()
    def _generate(
        self, unwrapped: nn.Module, ids: Tensor, att: Tensor, labels: Tensor, visual: Tensor, px: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        B = ids.shape[0]
        n_vis = num_image_tokens(unwrapped)
        first = []
        for b in range(B):
            sup = (labels[b] != -100).nonzero()
            first.append(int(sup[0]) if len(sup) else int(att[b].sum()))
        L = max(first)
        prompt = torch.full((B, L), self.pad_token_id, dtype=ids.dtype, device=ids.device)
        patt = torch.zeros((B, L), dtype=att.dtype, device=ids.device)
        keep_imgs = []
        img_offset = 0
        for b in range(B):
            n = first[b]
            prompt[b, L - n :] = ids[b, :n]
            patt[b, L - n :] = 1
            n_img_total = int(visual[b].sum()) // n_vis
            n_img_prompt = int(visual[b, :n].sum()) // n_vis
            keep_imgs += list(range(img_offset, img_offset + n_img_prompt))
            img_offset += n_img_total
        gpx = px[keep_imgs] if (px is not None and keep_imgs) else None
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            eos = unwrapped.generation_config.eos_token_id
            out = unwrapped.generate(
                input_ids=prompt, attention_mask=patt, **({"pixel_values": gpx} if gpx is not None else {}),
                max_new_tokens=self.distill.gkd_max_new_tokens, do_sample=True,
                temperature=self.distill.gkd_temperature, top_k=0, top_p=1.0,
                pad_token_id=self.pad_token_id, eos_token_id=eos,
                suppress_tokens=[self.image_token_id],  # a sampled image token would break the image-token count
            )
        finally:
            unwrapped.train(was_training)
        new = out[:, L:]
        eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos] if eos is not None else [], device=ids.device)
        is_eos = torch.isin(new, eos_ids) if eos_ids.numel() else torch.zeros_like(new, dtype=torch.bool)
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        gen_att = (~after_eos).long()
        seq = torch.cat([prompt, new], 1)
        gatt = torch.cat([patt, gen_att], 1)
        glabels = torch.full_like(seq, -100)
        glabels[:, L:] = torch.where(after_eos, torch.full_like(new, -100), new)
        return seq, gatt, glabels, gpx

    # ---------------------------------------------------------------- checkpoints
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume weights through ``from_pretrained`` (fixes a transformers 5.24 Trainer gap).

        ``save_pretrained`` writes LLaVA checkpoints with the legacy key names
        (``language_model.model.*``, ``vision_tower.*``); the stock Trainer resume loads that
        file with ``load_state_dict(strict=False)`` under the current names, so *no* weight
        is restored and only a warning is printed. ``from_pretrained`` applies the
        key conversion; its state dict is then loaded strictly. DeepSpeed, FSDP and PEFT
        checkpoints keep the stock path (they store the runtime names).
        """
        from transformers import PreTrainedModel

        target = self.model if model is None else model
        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        has_weights = any(
            os.path.isfile(os.path.join(resume_from_checkpoint, f))
            for f in ("model.safetensors", "model.safetensors.index.json")
        )
        if plain and has_weights and isinstance(target, PreTrainedModel) and not hasattr(target, "peft_config"):
            dtype = next(target.parameters()).dtype
            fresh = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype)
            target.load_state_dict(fresh.state_dict(), strict=True)
            del fresh
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        ckpt = self.state.best_model_checkpoint
        if ckpt is not None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            logger.info("Loading best model from %s (score: %s).", ckpt, self.state.best_metric)
            self._load_from_checkpoint(ckpt)
            return
        super()._load_best_model()

    # ---------------------------------------------------------------- logging
    def _add_parts(self, parts: dict[str, Tensor], share: float) -> None:
        for k, v in parts.items():
            v = v.detach().float() * share
            self._part_sums[k] = self._part_sums.get(k, torch.zeros((), device=v.device)) + v

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            start = getattr(self, "_initial_global_step", 0)  # where this train() call began (resume)
            if not start <= self._last_part_log_step <= self.state.global_step:
                self._last_part_log_step = start
            steps = max(self.state.global_step - self._last_part_log_step, 1)
            # the same names on every rank (they are gathered below): GKD's coin flips differ per
            # rank, so a rank without an on-policy batch must still send kd_on_policy
            fixed = {f for f in ("sft", "kd", "iva", "tpa") if self.settings[f] > 0}
            names = sorted(set(self._part_sums) | fixed | ({"kd_on_policy"} if self.settings["on_policy"] else set()))
            dev = self.args.device
            vals = torch.stack([self._part_sums.get(k, torch.zeros((), device=dev)).to(dev) for k in names])
            if self.args.world_size > 1:
                vals = self.accelerator.gather(vals[None]).mean(0)
            for k, v in zip(names, vals.tolist()):
                logs[f"loss_{k}"] = round(v / steps, 6)
            if self.settings["on_policy"]:
                logs["on_policy_batches"] = self._on_policy_batches
            self._part_sums = {}
            self._last_part_log_step = self.state.global_step
        super().log(logs, *args, **kwargs)


class _NoCapture:
    attention = None

    def __enter__(self) -> "_NoCapture":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _maybe_capture(model: nn.Module, layer: int | None, query_mask: Tensor) -> Any:
    """``tokinteract.hf.capture_attention`` at ``layer``, or a no-op when ``layer`` is None."""
    if layer is None:
        return _NoCapture()
    return _hf().capture_attention(model, layer, query_mask, heads="mean")


def _irs_pairs(dataset: Any, n: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Up to ``n`` (same image, different instruction) item pairs from ``dataset``."""
    finder = getattr(dataset, "instruction_pairs", None)
    return finder(n) if callable(finder) else []


def _head_is_last(model: nn.Module) -> bool:
    """Whether ``model``'s logits are its LM head's output on the hidden states ``output="hidden"``
    returns (no final-logit softcapping after the head)."""
    from tokinteract.hf.families import check_options

    try:
        check_options(model, output="hidden")
    except ValueError:
        return False
    return True
