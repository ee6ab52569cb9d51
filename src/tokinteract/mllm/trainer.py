"""``DistillationTrainer``: a ``transformers.Trainer`` that distills a LLaVA teacher into a student.

One training step (``compute_loss``), for a right-padded batch from
:class:`tokinteract.mllm.data.LlavaCollator`:

1. **Student** (with gradients, through the DDP/FSDP/DeepSpeed wrapper as *one* forward
   call): the ground-truth pass. With TPA, ``d`` candidates per supervised position are
   sampled from its detached logits (``tokinteract.sample_candidates``; the image token and
   ids beyond a shared vocabulary prefix are never drawn), packed with
   ``tokinteract.tpa_expand``, and the candidate block runs over the ground-truth KV cache
   (``tpa_forward="cached"``, default) or the whole expansion runs once more with the
   ribbon mask (``"packed"``, the paper's Algorithm 1).
2. **Teacher** (frozen, ``eval()``, under ``torch.no_grad()``, never wrapped for
   gradients): the same passes on the same expansion. With IVA, its instruction-to-vision
   attention rows at layer ``l*`` are captured during the ground-truth pass
   (``tokinteract.hf.capture_attention``); ``l*`` is ``iva_layer`` or, if unset, the
   argmax of ``tokinteract.hf.irs_curve`` over pairs of training samples.
3. ``tokinteract.AlignTILoss`` composes SFT, KD, IVA and TPA; each part is logged as
   ``loss_sft``, ``loss_kd``, ``loss_iva``, ``loss_tpa``.

``loss_impl`` (``DistillationConfig``) picks how the logits are handled:

* ``"logits"``: both models return full ``[B, T(2), V]`` logits and
  ``tokinteract.AlignTILoss`` runs on them (``tokinteract.sample_candidates`` on the
  student's ground-truth logits).
* ``"fused"``: both models return the hidden states entering their LM heads
  (``tokinteract.hf`` forwards with ``output="hidden"``; the LM head never runs inside the
  model), and ``tokinteract.fused.FusedAlignTILoss`` applies each LM head (student: with
  gradients, tied embeddings included; teacher: under no grad) to only the rows some part
  needs, one chunk at a time; TPA candidates come from
  ``tokinteract.fused.fused_sample_candidates`` on the candidate positions only. Same loss,
  parts and gradients as ``"logits"`` up to fp32 matmul rounding. The whole step (student,
  teacher, loss) runs inside the one wrapper forward, so the LM head's parameters are used
  inside it. GKD's on-policy batches (generation) keep using logits.

**A teacher with its own inputs** (the collator is a
:class:`tokinteract.mllm.processor_data.ProcessorCollator` with a ``teacher_processor``: another
vision tower or image resolution, hence other image-token counts and positions): the teacher
runs on the batch's ``teacher_*`` tensors and its outputs are carried onto the student's layout
by :mod:`tokinteract.rowmap` before the loss. SFT and KD compare the rows that predict the same
response token; TPA's candidates, sampled by the student at its response row ``t``, are placed
at the teacher's row of the same token (the teacher's own ribbon expansion) and its candidate
slots come in the student's order; IVA needs both families to show each image as one grid
(:func:`tokinteract.hf.families.image_grids`): the teacher's logits at the student's visual
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
                 student's own sampled responses and only the divergence (JSD by default)
                 is applied to them; otherwise SFT + KD on the data
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
      writes a ``from_pretrained`` checkpoint; not run on GPUs (bf16, NCCL). FSDP2 does not
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
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from tokinteract import compat

from tokinteract import (
    AlignTILoss,
    sample_candidates,
    shift_labels,
    tpa_expand,
    uniform_visual_weights,
)
from tokinteract.hf.families import visual_token_ids
from tokinteract.mllm.model import check_teacher_student, num_image_tokens
from tokinteract.mllm.reliability import ReliableTrainerMixin

__all__ = ["LOSS_IMPLS", "METHODS", "DistillationConfig", "DistillationTrainer", "run_through_wrapper"]

LOSS_IMPLS = ("fused", "logits")

logger = logging.getLogger(__name__)

METHODS: dict[str, dict[str, Any]] = {
    "sft": dict(sft=1.0, kd=0.0, iva=0.0, tpa=0.0),
    "kd": dict(sft=1.0, kd=1.0, iva=0.0, tpa=0.0),
    "iva": dict(sft=1.0, kd=1.0, iva=1.0, tpa=0.0),
    "tpa": dict(sft=1.0, kd=1.0, iva=0.0, tpa=1.0),
    "align_ti": dict(sft=1.0, kd=1.0, iva=1.0, tpa=1.0),
    "uniform_va": dict(sft=1.0, kd=1.0, iva=1.0, tpa=0.0, iva_weights="uniform"),
    "rkl": dict(sft=1.0, kd=1.0, iva=0.0, tpa=0.0, divergence="rkl"),
    "jsd": dict(sft=1.0, kd=1.0, iva=0.0, tpa=0.0, divergence="jsd"),
    "skew_kl": dict(sft=1.0, kd=1.0, iva=0.0, tpa=0.0, divergence="skew_fkl"),
    "gkd": dict(sft=1.0, kd=1.0, iva=0.0, tpa=0.0, divergence="jsd", on_policy=True),
}


@dataclass
class DistillationConfig:
    """What to distill and how (also a ``HfArgumentParser`` dataclass for the CLI).

    ``None`` fields take the value of the ``method`` preset (see the module docstring).
    """

    method: str = field(default="align_ti", metadata={"help": f"preset: one of {sorted(METHODS)}"})
    sft_weight: float | None = field(default=None, metadata={"help": "weight of SFT (None: preset)"})
    kd_weight: float | None = field(default=None, metadata={"help": "weight of Vanilla KD (None: preset)"})
    iva_weight: float | None = field(default=None, metadata={"help": "weight of IVA (None: preset)"})
    tpa_weight: float | None = field(default=None, metadata={"help": "weight of TPA (None: preset)"})
    divergence: str | None = field(default=None, metadata={"help": "fkl, rkl, jsd, skew_fkl, skew_rkl, tvd (None: preset, fkl)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the divergences"})
    jsd_beta: float = field(default=0.5, metadata={"help": "beta of the generalized JSD"})
    skew_alpha: float = field(default=0.1, metadata={"help": "alpha of the skew KLs"})
    iva_layer: int | None = field(default=None, metadata={"help": "teacher layer l* for IVA (None: argmax IRS)"})
    iva_weights: str | None = field(default=None, metadata={"help": "teacher, student or uniform (None: preset, teacher)"})
    iva_student_layer: int | None = field(default=None, metadata={"help": "student layer for iva_weights=student (None: l* scaled by depth)"})
    irs_num_pairs: int = field(default=16, metadata={"help": "sample pairs used to compute IRS when iva_layer is None"})
    tpa_num_candidates: int = field(default=4, metadata={"help": "d, candidates per position"})
    tpa_sampling: str = field(default="nucleus", metadata={"help": "nucleus, multinomial or greedy"})
    tpa_top_p: float = field(default=0.95, metadata={"help": "nucleus mass"})
    tpa_temperature: float = field(default=1.0, metadata={"help": "candidate sampling temperature"})
    tpa_forward: str = field(default="cached", metadata={"help": "cached (KV cache reuse) or packed (Algorithm 1)"})
    tpa_skip_token_ids: list[int] | None = field(
        default=None,
        metadata={"help": "beyond the paper: no TPA slot at positions whose ground-truth next token is one of "
                          "these ids (e.g. the end-of-turn id <|im_end|>); None: every supervised position (Eq. 7)"},
    )
    on_policy: bool | None = field(default=None, metadata={"help": "GKD on-policy batches (None: preset)"})
    gkd_lambda: float = field(default=0.5, metadata={"help": "probability of an on-policy batch (GKD)"})
    gkd_max_new_tokens: int = field(default=32, metadata={"help": "length of student-generated responses (GKD)"})
    gkd_temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the responses (GKD)"})
    vocab_policy: str = field(default="error", metadata={"help": "error or shared_prefix (different vocab sizes)"})
    image_token_policy: str = field(default="error", metadata={"help": "error or remap (different image-token ids)"})
    sampling_seed: int = field(default=0, metadata={"help": "seed of candidate sampling and GKD coin flips"})
    loss_impl: str = field(
        default="fused",
        metadata={"help": "fused (hidden states + LM head, logits only per chunk of supervised rows) or logits"},
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "rows per LM-head chunk with loss_impl=fused (None: 2**24 // vocab)"}
    )
    loss_backend: str = field(
        default="tokinteract",
        metadata={"help": "tokinteract or liger (loss_impl=fused only: KD and TPA through Liger-Kernel's fused "
                          "linear JSD, divergence fkl/rkl/jsd; pip install 'tokinteract[liger]')"},
    )
    loss_liger_compiled: bool = field(
        default=True, metadata={"help": "loss_backend=liger: let Liger torch.compile its chunk step (its default)"}
    )
    # faults (tokinteract.mllm.reliability; the trainer guide's "Faults" section)
    bad_sample_limit: float = field(
        default=0.01,
        metadata={"help": "fraction of the data file's samples that may be skipped as bad (preflight and mid-run) "
                          "before the run saves a checkpoint and stops"},
    )
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "stop (after saving a checkpoint) after this many non-finite steps in a row"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "delete an earlier run's checkpoints and final model in output_dir and start again"}
    )

    def resolved(self) -> dict[str, Any]:
        """The effective settings after applying the preset."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        p = METHODS[self.method]
        out = {
            "sft": p["sft"] if self.sft_weight is None else self.sft_weight,
            "kd": p["kd"] if self.kd_weight is None else self.kd_weight,
            "iva": p["iva"] if self.iva_weight is None else self.iva_weight,
            "tpa": p["tpa"] if self.tpa_weight is None else self.tpa_weight,
            "divergence": self.divergence or p.get("divergence", "fkl"),
            "iva_weights": self.iva_weights or p.get("iva_weights", "teacher"),
            "on_policy": p.get("on_policy", False) if self.on_policy is None else self.on_policy,
        }
        for k in ("sft", "kd", "iva", "tpa"):
            if not (isinstance(out[k], (int, float)) and math.isfinite(out[k]) and out[k] >= 0):
                raise ValueError(f"{k}_weight must be a finite number >= 0, got {out[k]!r}")
        if out["iva_weights"] not in ("teacher", "student", "uniform"):
            raise ValueError(f"iva_weights must be teacher, student or uniform, got {out['iva_weights']!r}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.loss_chunk_size is not None and (
            isinstance(self.loss_chunk_size, bool) or not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 1
        ):
            raise ValueError(f"loss_chunk_size must be None or an int >= 1, got {self.loss_chunk_size!r}")
        from tokinteract.fused import BACKENDS

        if self.loss_backend not in BACKENDS:
            raise ValueError(f"loss_backend must be one of {BACKENDS}, got {self.loss_backend!r}")
        if self.loss_backend != "tokinteract" and self.loss_impl != "fused":
            raise ValueError(f"loss_backend={self.loss_backend!r} needs loss_impl='fused', got {self.loss_impl!r}")
        if self.tpa_forward not in ("cached", "packed"):
            raise ValueError(f"tpa_forward must be 'cached' or 'packed', got {self.tpa_forward!r}")
        from tokinteract import SAMPLING_STRATEGIES

        if self.tpa_sampling not in SAMPLING_STRATEGIES:
            raise ValueError(f"tpa_sampling must be one of {SAMPLING_STRATEGIES}, got {self.tpa_sampling!r}")
        if isinstance(self.tpa_num_candidates, bool) or not isinstance(self.tpa_num_candidates, int) or self.tpa_num_candidates < 1:
            raise ValueError(f"tpa_num_candidates must be an int >= 1, got {self.tpa_num_candidates!r}")
        skip = self.tpa_skip_token_ids
        if skip is not None and (
            not isinstance(skip, (list, tuple))
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in skip)
        ):
            raise ValueError(f"tpa_skip_token_ids must be None or a list of token ids (ints >= 0), got {skip!r}")
        for name in ("temperature", "tpa_temperature", "gkd_temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (isinstance(self.bad_sample_limit, (int, float)) and 0.0 <= self.bad_sample_limit <= 1.0):
            raise ValueError(f"bad_sample_limit must be a fraction in [0, 1], got {self.bad_sample_limit!r}")
        m = self.max_nonfinite_steps
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"max_nonfinite_steps must be an int >= 1, got {m!r}")
        if not 0.0 < self.tpa_top_p <= 1.0:
            raise ValueError(f"tpa_top_p must lie in (0, 1], got {self.tpa_top_p!r}")
        if self.iva_layer is not None and self.iva_layer < 0:
            raise ValueError(f"iva_layer must be >= 0, got {self.iva_layer!r}")
        if self.gkd_max_new_tokens < 1:
            raise ValueError(f"gkd_max_new_tokens must be >= 1, got {self.gkd_max_new_tokens!r}")
        if not 0.0 <= self.gkd_lambda <= 1.0:
            raise ValueError(f"gkd_lambda must lie in [0, 1], got {self.gkd_lambda!r}")
        if out["on_policy"] and out["kd"] <= 0:
            raise ValueError("on_policy (GKD) needs kd_weight > 0: the on-policy loss is the KD divergence")
        if out["on_policy"] and out["tpa"] > 0:
            raise ValueError("on_policy (GKD) cannot be combined with TPA in this trainer; set tpa_weight=0")
        if not any(out[k] > 0 for k in ("sft", "kd", "iva", "tpa")):
            raise ValueError("every loss weight is 0; enable at least one of sft, kd, iva, tpa")
        return out


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
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
            teacher.to(device=self.args.device, **({"dtype": dtype} if dtype is not None else {}))
        loss_kwargs = dict(
            sft=s["sft"], kd=s["kd"], iva=s["iva"], tpa=s["tpa"], kind=s["divergence"],
            temperature=self.distill.temperature, beta=self.distill.jsd_beta, alpha=self.distill.skew_alpha,
            vocab_size=self.vocab_size,
        )
        self.fused = self.distill.loss_impl == "fused"
        if self.fused:
            from tokinteract.fused import FusedAlignTILoss

            self.loss_fn: AlignTILoss = FusedAlignTILoss(
                chunk_size=self.distill.loss_chunk_size, backend=self.distill.loss_backend,
                liger_compiled=self.distill.loss_liger_compiled, **loss_kwargs,
            )
        else:
            self.loss_fn = AlignTILoss(**loss_kwargs)
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

    def _pop_teacher_batch(
        self, inputs: dict[str, Any], model: nn.Module, labels: Tensor, visual: Tensor, model_inputs: dict[str, Tensor]
    ) -> Any:
        """The teacher's own batch (the ``teacher_*`` keys, popped from ``inputs``) and the row maps
        that carry its outputs onto the student's layout (:mod:`tokinteract.rowmap`); None when the
        teacher reads the student's batch."""
        from types import SimpleNamespace

        from tokinteract.rowmap import response_row_map, visual_row_map

        t = {k[len("teacher_"):]: inputs.pop(k) for k in [k for k in inputs if k.startswith("teacher_")]}
        if self.teacher is None:
            return None  # SFT only: nothing reads the teacher's batch
        if bool(t) != self.teacher_own_inputs:
            raise ValueError(
                "the batch has teacher_* inputs but the trainer's data_collator has no teacher processor"
                if t else "the data_collator has a teacher processor but the batch has no teacher_* inputs"
            )
        if not t:
            return None
        tb = SimpleNamespace(
            ids=t.pop("input_ids"), att=t.pop("attention_mask"), labels=t.pop("labels"),
            instr=t.pop("instruction_mask").bool(), visual=t.pop("visual_mask").bool(),
        )
        t.pop("response_mask", None)
        tb.model_inputs = {k: v for k, v in t.items() if isinstance(v, Tensor)}
        tb.rmap = response_row_map(labels, tb.labels)
        tb.omap, tb.wmap = tb.rmap, None
        if self.settings["iva"] > 0:
            from tokinteract.hf.families import image_grids

            s_grids = image_grids(model, model_inputs, visual)
            t_grids = image_grids(self.teacher, tb.model_inputs, tb.visual)
            vmean, tb.wmap = visual_row_map(visual, tb.visual, s_grids, t_grids)
            tb.omap = tb.rmap + vmean
        return tb

    def _teacher_expansion(self, exp: Any, tb: Any) -> Any:
        """The student's TPA candidates placed after the teacher's own prefix: the candidates at
        the student's row ``t`` go to the teacher's row predicting the same response token."""
        rmap = tb.rmap
        B, Ts, d = exp.candidate_index.shape
        dev = exp.input_ids.device
        s2t = torch.full((B, Ts), -1, dtype=torch.long, device=dev)
        s2t[rmap.b.to(dev), rmap.dst.to(dev)] = rmap.src.to(dev)
        b, t = exp.candidate_mask.nonzero(as_tuple=True)
        tt = s2t[b, t]
        if bool((tt < 0).any()):
            raise ValueError("a TPA candidate position of the student has no supervised teacher row")
        cands = exp.input_ids.gather(1, exp.candidate_index.clamp(min=0).reshape(B, -1)).reshape(B, Ts, d)
        Tt = tb.ids.shape[1]
        cm = torch.zeros((B, Tt), dtype=torch.bool, device=dev)
        cm[b, tt] = True
        ct = torch.zeros((B, Tt, d), dtype=exp.input_ids.dtype, device=dev)
        ct[b, tt] = cands[b, t]
        return tpa_expand(tb.ids, ct, cm, tb.att.bool(), pad_token_id=self.pad_token_id)

    def _teacher_outputs(
        self, tb: Any, ids: Tensor, att: Tensor, instr: Tensor, visual: Tensor, exp: Any,
        model_inputs: dict[str, Tensor], layer: int | None, output: str = "logits",
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`_teacher_pass` on the student's batch, or on the teacher's own batch ``tb`` with
        its outputs (ground truth through ``tb.omap``; the candidate block, whose slots follow the
        same order, as is) and IVA weights (``tb.wmap``) carried onto the student's layout."""
        if tb is None:
            return self._teacher_pass(ids, att, instr, visual, exp, model_inputs, layer, output=output)
        t_exp = self._teacher_expansion(exp, tb) if exp is not None else None
        out, w = self._teacher_pass(tb.ids, tb.att, tb.instr, tb.visual, t_exp, tb.model_inputs, layer, output=output)
        Tt = tb.ids.shape[1]
        mapped = tb.omap.apply(out[:, :Tt])
        if exp is not None:
            if out.shape[1] - Tt != exp.expanded_len - exp.seq_len:  # same candidate counts per row
                raise RuntimeError("the teacher's candidate block does not match the student's")
            mapped = torch.cat([mapped, out[:, Tt:]], 1)
        if w is not None:
            w = tb.wmap.apply(w[..., None])[..., 0]
        return mapped, w

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

    def _generator(self, device: torch.device) -> torch.Generator:
        # reseeded per micro-batch from (seed, step, micro-batch, rank): exact on resume
        step = self.state.global_step
        if step != self._micro_step:
            self._micro_step, self._micro = step, 0
        self._micro += 1
        g = torch.Generator(device=device)
        g.manual_seed(self._seed(self.args.process_index))
        return g

    def _seed(self, rank: int) -> int:
        """The current micro-batch's seed on ``rank`` (set by :meth:`_generator`)."""
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

    def _teacher_ids(self, ids: Tensor) -> Tensor:
        t_img = self.teacher_image_token_id
        if t_img is None or t_img == self.image_token_id or self.teacher_own_inputs:
            return ids
        return torch.where(ids == self.image_token_id, torch.full_like(ids, t_img), ids)

    # ---------------------------------------------------------------- the loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        visual = inputs.pop("visual_mask").bool()
        instr = inputs.pop("instruction_mask").bool()
        inputs.pop("response_mask", None)
        ids, att = inputs.pop("input_ids"), inputs.pop("attention_mask")
        t_keys = {k: inputs.pop(k) for k in [k for k in inputs if k.startswith("teacher_")]}
        # every other tensor the collator made is a model input (pixel_values, image_grid_thw,
        # mm_token_type_ids, token_type_ids, image_sizes, pixel_attention_mask, ...)
        model_inputs = {k: v for k, v in inputs.items() if isinstance(v, Tensor)}
        tb = self._pop_teacher_batch(t_keys, self.accelerator.unwrap_model(model), labels, visual.bool(), model_inputs)
        px = model_inputs.get("pixel_values")
        s = self.settings
        training = self.model.training
        gen = self._generator(ids.device) if training else torch.Generator(device=ids.device).manual_seed(0)
        if training and s["on_policy"]:
            # one coin for all ranks (rank 0's seed): under FSDP every rank must run the same
            # forwards (generation all-gathers the shards), so all go on-policy or none does
            shared = torch.Generator(device=ids.device)
            shared.manual_seed(self._seed(0))
            coin = float(torch.rand((), generator=shared, device=ids.device))
            if coin < self.distill.gkd_lambda:
                return self._on_policy_loss(model, ids, att, labels, visual, px, return_outputs)
        counts = self._counts if training else None
        num_items = counts[0] if counts is not None else None
        num_seqs = counts[1] if counts is not None else None
        unwrapped = self.accelerator.unwrap_model(model)
        hf = _hf()
        use_tpa = s["tpa"] > 0
        next_ids = shift_labels(labels)  # [b, t]: the ground-truth token t + 1 that TPA's candidates at t replace
        cmask = next_ids != -100
        if self.distill.tpa_skip_token_ids:  # beyond the paper (opt-in): drop these slots, keep num_items
            cmask &= ~torch.isin(next_ids, torch.tensor(self.distill.tpa_skip_token_ids, device=next_ids.device))
        w_src = s["iva_weights"] if s["iva"] > 0 else None
        layer = self._weights_layer() if w_src in ("teacher", "student") else None
        if self.fused:
            return self._fused_loss(
                model, unwrapped, ids, att, labels, visual, instr, model_inputs, cmask, gen, layer, w_src, counts,
                return_outputs, tb,
            )

        def student_pass() -> dict[str, Any]:
            out: dict[str, Any] = {}
            capture = w_src == "student"
            if use_tpa:
                packed = self.distill.tpa_forward == "packed"
                with _maybe_capture(unwrapped, layer if capture else None, instr) as cap:
                    with torch.no_grad() if packed else _null():
                        gt = hf.ground_truth_forward(unwrapped, ids, att, use_cache=not packed, **model_inputs)
                cand = sample_candidates(
                    self._sampling_logits(gt.logits), self.distill.tpa_num_candidates,
                    strategy=self.distill.tpa_sampling, top_p=self.distill.tpa_top_p,
                    temperature=self.distill.tpa_temperature, generator=gen, mask=cmask,
                )
                exp = tpa_expand(ids, cand, cmask, att.bool(), pad_token_id=self.pad_token_id)
                if packed:
                    out["logits"] = hf.packed_forward(
                        unwrapped, exp, block_mask=self._block_mask(unwrapped, exp), **model_inputs
                    )
                else:
                    out["logits"] = torch.cat([gt.logits, hf.cached_candidate_forward(unwrapped, gt, exp)], 1)
                out["expansion"] = exp
            else:
                with _maybe_capture(unwrapped, layer if capture else None, instr) as cap:
                    o = unwrapped(input_ids=ids, attention_mask=att, **_plain_positions(unwrapped, att), **model_inputs)
                out["logits"] = o.logits
            if capture:
                out["weights"] = cap.visual_importance(visual)[:, : ids.shape[1]].detach()
            return out

        so = run_through_wrapper(model, unwrapped, student_pass)
        s_logits, exp = so["logits"], so.get("expansion")
        t_logits = None
        t_weights = None
        if self.teacher is not None and (s["kd"] > 0 or s["iva"] > 0 or use_tpa):
            t_logits, t_weights = self._teacher_outputs(
                tb, ids, att, instr, visual, exp, model_inputs, layer if w_src == "teacher" else None
            )
        weights = None
        if s["iva"] > 0:
            if w_src == "uniform":
                weights = uniform_visual_weights(visual)
            else:
                weights = t_weights if w_src == "teacher" else so["weights"]
        loss, parts = self.loss_fn(
            s_logits, t_logits, labels, expansion=exp, visual_weights=weights,
            num_items=num_items, num_sequences=num_seqs,
        )
        loss = self._finish(loss, parts, counts)
        if return_outputs:
            gt_logits = exp.gather_gt(s_logits) if exp is not None else s_logits
            return loss, {"logits": gt_logits}
        return loss

    def _finish(self, loss: Tensor, parts: dict[str, Tensor], counts: Any) -> Tensor:
        """Scale for data parallelism and log the parts (shared by both loss implementations)."""
        scale = 1.0
        if counts is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            scale = float(self.accelerator.num_processes)
        self.loss_is_scaled_for_ga = counts is not None
        loss = loss * scale
        if self.model.training:
            share = scale if counts is not None else scale / max(self.current_gradient_accumulation_steps, 1)
            self._add_parts(parts, share)
        return loss

    def _fused_loss(
        self, model: nn.Module, unwrapped: nn.Module, ids: Tensor, att: Tensor, labels: Tensor, visual: Tensor,
        instr: Tensor, model_inputs: dict[str, Tensor], cmask: Tensor, gen: torch.Generator, layer: int | None,
        w_src: str | None, counts: Any, return_outputs: bool, t_batch: Any = None,
    ) -> Any:
        """``loss_impl="fused"``: hidden states from both models, LM heads applied per chunk in the loss.

        Runs the student pass, the teacher pass and the loss inside one forward call of the
        wrapper (the LM head's parameters are used there, which sharded wrappers need).
        """
        from tokinteract.fused import fused_sample_candidates
        from tokinteract.hf.packed import _base_model, lm_head_parameters

        hf = _hf()
        s = self.settings
        d = self.distill
        use_tpa = s["tpa"] > 0
        num_items = counts[0] if counts is not None else None
        num_seqs = counts[1] if counts is not None else None

        unsharded: list[nn.Module] = []

        def step() -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor, Tensor | None, Any]:
            owner = _unshard_lm_head(unwrapped)  # FSDP2: the head's forward hook never runs here
            if owner is not None:
                unsharded.append(owner)
            capture = w_src == "student"
            exp = None
            with _maybe_capture(unwrapped, layer if capture else None, instr) as cap:
                if use_tpa:
                    packed = d.tpa_forward == "packed"
                    with torch.no_grad() if packed else _null():
                        gt = hf.ground_truth_forward(
                            unwrapped, ids, att, use_cache=not packed, output="hidden", **model_inputs
                        )
                else:
                    s_hidden = _base_model(unwrapped)(
                        input_ids=ids, attention_mask=att, **_plain_positions(unwrapped, att), **model_inputs
                    ).last_hidden_state
            s_weights = cap.visual_importance(visual)[:, : ids.shape[1]].detach() if capture else None
            sw, sb = lm_head_parameters(unwrapped)
            if use_tpa:
                hw, hb = self._sampling_head(unwrapped)
                cand = fused_sample_candidates(
                    gt.hidden_states.detach().to(hw.dtype), hw, d.tpa_num_candidates, mask=cmask, student_bias=hb,
                    strategy=d.tpa_sampling, top_p=d.tpa_top_p, temperature=d.tpa_temperature, generator=gen,
                    chunk_size=d.loss_chunk_size,
                )
                exp = tpa_expand(ids, cand, cmask, att.bool(), pad_token_id=self.pad_token_id)
                if d.tpa_forward == "packed":
                    s_hidden = hf.packed_forward(
                        unwrapped, exp, output="hidden", block_mask=self._block_mask(unwrapped, exp), **model_inputs
                    )
                else:
                    s_hidden = torch.cat([gt.hidden_states, hf.cached_candidate_forward(unwrapped, gt, exp)], 1)
            t_hidden = tw = tb = None
            t_weights = None
            if self.teacher is not None and (s["kd"] > 0 or s["iva"] > 0 or use_tpa):
                t_hidden, t_weights = self._teacher_outputs(
                    t_batch, ids, att, instr, visual, exp, model_inputs, layer if w_src == "teacher" else None,
                    output="hidden",
                )
                tw, tb = lm_head_parameters(self.teacher)
                t_hidden = t_hidden.to(tw.dtype)
            weights = None
            if s["iva"] > 0:
                if w_src == "uniform":
                    weights = uniform_visual_weights(visual)
                else:
                    weights = t_weights if w_src == "teacher" else s_weights
            s_hidden = s_hidden.to(sw.dtype)
            loss, parts = self.loss_fn(
                s_hidden, sw, t_hidden, tw, labels, student_bias=sb, teacher_bias=tb, expansion=exp,
                visual_weights=weights, num_items=num_items, num_sequences=num_seqs,
            )
            return loss, parts, s_hidden, sw, sb, exp

        loss, parts, s_hidden, sw, sb, exp = run_through_wrapper(model, unwrapped, step)
        loss = self._finish(loss, parts, counts)
        gt_logits = None
        if return_outputs:
            gt_hidden = s_hidden[:, : exp.seq_len] if exp is not None else s_hidden
            with torch.no_grad():
                gt_logits = torch.nn.functional.linear(gt_hidden, sw, sb)
        if unsharded and not loss.requires_grad:  # no backward will reshard the head (eval)
            for owner in unsharded:
                owner.reshard()
        if return_outputs:
            return loss, {"logits": gt_logits}
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

    def _teacher_pass(
        self, ids: Tensor, att: Tensor, instr: Tensor, visual: Tensor, exp: Any, model_inputs: dict[str, Tensor],
        layer: int | None, output: str = "logits",
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher logits (same layout as the student's; with ``output="hidden"`` the LM head's
        input instead) and, with ``layer``, IVA weights ``[B, T]``."""
        hf = _hf()
        teacher = self.teacher
        if teacher.training:
            teacher.eval()
        t_ids = self._teacher_ids(ids)
        dtype = next(teacher.parameters()).dtype  # pixel values follow the teacher's dtype; ids and masks stay
        mi = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model_inputs.items()}
        with _maybe_capture(teacher, layer, instr) as cap:
            # only the first forward at the captured layer is recorded: the ground-truth
            # (cached) or packed pass, never the candidate block
            if exp is not None:
                t_exp = dataclasses.replace(exp, input_ids=self._teacher_ids(exp.input_ids))
                if self.distill.tpa_forward == "packed":
                    bm = self._block_mask(teacher, exp)  # the student's, when both use flex_attention
                    logits = hf.packed_forward(teacher, t_exp, output=output, block_mask=bm, **mi)
                else:
                    gt = hf.ground_truth_forward(teacher, t_ids, att, output=output, **mi)
                    first = gt.hidden_states if output == "hidden" else gt.logits
                    logits = torch.cat([first, hf.cached_candidate_forward(teacher, gt, t_exp)], 1)
            elif output == "hidden":
                from tokinteract.hf.packed import _base_model

                logits = _base_model(teacher)(
                    input_ids=t_ids, attention_mask=att, **_plain_positions(teacher, att), **mi
                ).last_hidden_state
            else:
                logits = teacher(input_ids=t_ids, attention_mask=att, **_plain_positions(teacher, att), **mi).logits
        weights = cap.visual_importance(visual)[:, : ids.shape[1]] if layer is not None else None
        return logits, weights

    def _on_policy_loss(
        self, model: nn.Module, ids: Tensor, att: Tensor, labels: Tensor, visual: Tensor,
        px: Tensor | None, return_outputs: bool,
    ) -> Any:
        """GKD: sample responses from the student for each sample's first prompt, then
        apply the KD divergence (JSD by default) on the generated tokens."""
        unwrapped = self.accelerator.unwrap_model(model)
        seq, gatt, glabels, gpx = self._generate(unwrapped, ids, att, labels, visual, px)
        mi = {"pixel_values": gpx} if gpx is not None else {}

        def student_pass() -> Tensor:
            return unwrapped(input_ids=seq, attention_mask=gatt, position_ids=_position_ids(gatt), **mi).logits

        s_logits = run_through_wrapper(model, unwrapped, student_pass)
        with torch.no_grad():
            tmi = {"pixel_values": gpx.to(next(self.teacher.parameters()).dtype)} if gpx is not None else {}
            t_logits = self.teacher(
                input_ids=self._teacher_ids(seq), attention_mask=gatt, position_ids=_position_ids(gatt), **tmi
            ).logits
        from tokinteract import kd_loss

        kd = kd_loss(
            s_logits, t_logits, glabels, kind=self.settings["divergence"], temperature=self.distill.temperature,
            beta=self.distill.jsd_beta, alpha=self.distill.skew_alpha, vocab_size=self.vocab_size,
        )
        loss = self.settings["kd"] * kd
        self.loss_is_scaled_for_ga = False  # local mean: the Trainer divides by the accumulation steps
        self._on_policy_batches += 1
        self._add_parts({"kd_on_policy": kd.detach()}, 1.0 / max(self.current_gradient_accumulation_steps, 1))
        if return_outputs:
            return loss, {"logits": s_logits}
        return loss

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


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


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
