"""``tokinteract-train``: the two-stage LLaVA distillation trainer from the command line.

Usage::

    tokinteract-train CONFIG.yaml [--key value ...]      # YAML or JSON config, CLI overrides
    tokinteract-train --data_path ... --output_dir ...    # flags only
    torchrun --nproc_per_node=8 -m tokinteract.mllm.cli CONFIG.yaml   # DDP, unchanged

The config's keys are the fields of :class:`ModelArguments`, :class:`DataArguments`, the
distillation groups of :mod:`tokinteract.mllm.config` (method, IVA, TPA, on-policy, loss,
teacher/student pair, faults: together :class:`tokinteract.mllm.config.DistillationConfig`)
and ``transformers.TrainingArguments``
(``deepspeed: ds_zero2.json``, ``fsdp: true`` with an ``fsdp_config`` mapping, etc.: values
keep their YAML types).
Flags given after the config file override it. Progress bars, logging, checkpointing and
``resume_from_checkpoint`` are the Trainer's.

Stages (paper, Table 11): ``stage: pretrain`` trains the projector on captions with SFT
(``method: sft``); ``stage: finetune`` trains projector and language model with
distillation, starting from the stage-1 checkpoint (``student_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["DataArguments", "ModelArguments", "build_everything", "main", "parse_args"]

logger = logging.getLogger("tokinteract.mllm")


@dataclass
class ModelArguments:
    """Which student and teacher to build.

    Exactly one student source: ``student_checkpoint`` (a saved LLaVA, e.g. stage 1's
    output, or any vision-language checkpoint of a family the adapter supports, loaded with
    ``AutoModelForImageTextToText`` + ``AutoProcessor``), ``student_language_model`` +
    ``vision_tower`` (pretrained parts of the paper's LLaVA), or ``tiny`` (random tiny
    models and the offline word-level tokenizer of the synthetic task). ``teacher_checkpoint``
    loads the same way and must share the student's tokenizer and chat template.

    Trainable parts (:func:`tokinteract.mllm.model.set_trainable_parts`): the vision tower
    is frozen unless ``train_vision_tower``; ``train_projector`` (default: true) and
    ``train_language_model`` (default: ``stage == "finetune"``) override the stage.

    LoRA (``lora_r > 0``, :mod:`tokinteract.mllm.lora`): adapters on the language model's
    ``lora_target_modules``; the language model and the vision tower stay frozen (setting
    ``train_language_model`` or ``train_vision_tower`` is an error), the projector trains in
    full unless ``train_projector: false``. ``output_dir`` then holds the adapter;
    ``lora_merge_on_save`` also writes the merged standard checkpoint to ``output_dir/merged``.
    """

    stage: str = field(default="finetune", metadata={"help": "pretrain (projector only) or finetune (projector + LLM)"})
    student_checkpoint: str | None = field(
        default=None, metadata={"help": "student checkpoint of any supported family (AutoModelForImageTextToText), "
                                        "e.g. a stage-1 output or Qwen/Qwen2.5-VL-3B-Instruct"}
    )
    student_language_model: str | None = field(default=None, metadata={"help": "pretrained Qwen2/2.5/3 LM name or path"})
    vision_tower: str | None = field(default=None, metadata={"help": "pretrained SigLIP name or path"})
    projector_checkpoint: str | None = field(default=None, metadata={"help": "stage-1 LLaVA whose projector to load"})
    teacher_checkpoint: str | None = field(
        default=None, metadata={"help": "teacher checkpoint of any supported family (name or path), same tokenizer"}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flex_attention (GPU)"})
    model_dtype: str | None = field(default=None, metadata={"help": "bfloat16, float16 or float32 for loading"})
    train_vision_tower: bool = field(default=False, metadata={"help": "train the vision tower (frozen by default)"})
    train_projector: bool | None = field(default=None, metadata={"help": "train the projector (None: true)"})
    train_language_model: bool | None = field(
        default=None, metadata={"help": "train the language model and LM head (None: stage == finetune)"}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank of the student's language-model adapters (0: no LoRA, "
                                                     "full training of the chosen parts; needs peft)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is alpha / r * B A x)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA adapters' input"})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "last names of the language model's linear layers to adapt (None: q_proj k_proj "
                                        "v_proj o_proj gate_proj up_proj down_proj); never the vision tower"}
    )
    lora_merge_on_save: bool = field(
        default=False, metadata={"help": "after training, also save the merged student (adapters folded in) to "
                                         "output_dir/merged, a standard checkpoint"}
    )
    tiny: bool = field(default=False, metadata={"help": "random tiny models + synthetic-task tokenizer (tests, demo)"})
    tiny_family: str = field(default="qwen2", metadata={"help": "qwen2 or qwen3"})
    tiny_hidden_size: int = 64
    """Hidden size of the tiny student's language model."""
    tiny_layers: int = 2
    """Layers of the tiny student's language model."""
    tiny_teacher_hidden_size: int = 96
    """Hidden size of the tiny teacher's language model."""
    tiny_teacher_layers: int = 3
    """Layers of the tiny teacher's language model."""
    tiny_image_size: int = 32
    """Image side in pixels of the tiny SigLIP towers."""
    tiny_patch_size: int = 8
    """Patch side in pixels of the tiny SigLIP towers."""
    tiny_grid: int = field(default=2, metadata={"help": "grid of the synthetic task (vocabulary)"})
    tiny_seed: int = 0
    """Seed of the tiny models' random initialisation."""


@dataclass
class DataArguments:
    """The LLaVA-format training data."""

    data_path: str = field(default="", metadata={"help": "LLaVA JSON / JSON Lines file"})
    image_folder: str | None = field(default=None, metadata={"help": "image paths are relative to it"})
    eval_data_path: str | None = None
    """LLaVA JSON / JSON Lines file evaluated during training (None: no evaluation)."""
    max_length: int = field(default=2048, metadata={"help": "truncation length (never through an image)"})
    system_prompt: str | None = None
    """System message prepended to every sample that has none (None: no system message)."""
    on_bad_image: str = field(default="error", metadata={"help": "error or skip (counted and reported)"})
    preflight: bool = field(
        default=True,
        metadata={"help": "check paths, output_dir, disk and the whole dataset before any model loads "
                          "(tokinteract.mllm.preflight)"},
    )
    preflight_workers: int = field(default=0, metadata={"help": "processes of the dataset scan (0: min(cpus, 8))"})
    preflight_cache_dir: str | None = field(
        default=None, metadata={"help": "cache of the dataset scan (None: $TOKINTERACT_CACHE_DIR/preflight or "
                                        "~/.cache/tokinteract/preflight; empty: no cache)"}
    )


def _parser() -> Any:
    from transformers import HfArgumentParser, TrainingArguments

    from tokinteract.mllm.config import GROUPS

    # one dataclass (and one --help section) per concern; parse_args joins them into a DistillationConfig
    parser = HfArgumentParser((ModelArguments, DataArguments, *GROUPS, TrainingArguments))
    parser.allow_abbrev = False  # --learning_rat must not silently mean --learning_rate
    return parser


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config (a flat mapping of argument names to values)."""
    p = Path(path)
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config {str(p)!r} must be a mapping of argument names to values, got {type(data).__name__}")
    return data


def parse_args(argv: list[str] | None = None) -> tuple[Any, Any, Any, Any]:
    """``(model_args, data_args, distill_config, training_args)`` from a config file and flags
    (``distill_config``: the :class:`tokinteract.mllm.config.DistillationConfig` of the parsed groups)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        config = load_config(argv[0])
        known = {f.name for dc in parser.dataclass_types for f in fields(dc)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"config {argv[0]!r} has unknown keys {unknown}")
        # config values become the parser's defaults (typed values such as ``fsdp: true`` or a
        # ``fsdp_config`` mapping stay as they are); flags after the file override them
        parser.set_defaults(**config)
        argv = argv[1:]
    from tokinteract.mllm.config import DistillationConfig

    margs, dargs, *groups, targs = parser.parse_args_into_dataclasses(args=argv)
    return margs, dargs, DistillationConfig.from_groups(*groups), targs


def _dtype(name: str | None) -> Any:
    import torch

    if name is None:
        return None
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"model_dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def build_everything(margs: Any, dargs: Any, dcfg: Any, targs: Any, *, check_existing_run: bool = False) -> Any:
    """Build student, teacher, processor, datasets and the trainer from parsed arguments.

    Configuration, paths, the output directory and the whole dataset are checked first,
    before any model loads (:func:`tokinteract.mllm.preflight.preflight`, unless
    ``dargs.preflight`` is off); the training dataset then skips bad samples mid-run
    (``skip_bad``) under ``dcfg.bad_sample_limit``. ``check_existing_run``: preflight also
    refuses an output directory holding an earlier run unless ``targs.resume_from_checkpoint``
    or ``dcfg.overwrite_output_dir`` is set (:func:`main` sets it; otherwise
    ``DistillationTrainer.train``, which knows whether it resumes, checks it).
    """
    from transformers import AutoTokenizer

    from tokinteract.mllm import model as mm
    from tokinteract.mllm.data import LlavaCollator, LlavaJsonDataset
    from tokinteract.mllm.lora import check_lora_arguments, unwrap_peft
    from tokinteract.mllm.trainer import DistillationTrainer

    check_lora_arguments(margs, targs)  # before any model loads
    sources = [bool(margs.student_checkpoint), bool(margs.student_language_model), bool(margs.tiny)]
    if sum(sources) != 1:
        raise ValueError(
            "give exactly one student source: student_checkpoint, student_language_model (+ vision_tower), or tiny"
        )
    if not dargs.data_path:
        raise ValueError("data_path is required")
    dtype = _dtype(margs.model_dtype)
    settings = dcfg.resolved()
    report = None
    if dargs.preflight:
        from tokinteract.mllm.preflight import preflight

        report = preflight(margs, dargs, dcfg, targs, existing_run=check_existing_run)
    load = dict(dtype=dtype, attn_implementation=margs.attn_implementation)
    if margs.student_checkpoint:
        student, processor = mm.load_pretrained(margs.student_checkpoint, role="student", **load)
        from tokinteract.mllm.lora import check_quantised_student

        check_quantised_student(student, margs.student_checkpoint, margs.lora_r, margs.lora_merge_on_save)
    elif margs.tiny:
        from tokinteract.mllm.synthetic import vocabulary
        from tokinteract.mllm.tokenizer import build_word_tokenizer

        tok = build_word_tokenizer(vocabulary(margs.tiny_grid), model_max_length=dargs.max_length)
        student = mm.build_tiny_llava(
            vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"), family=margs.tiny_family,
            hidden_size=margs.tiny_hidden_size, num_layers=margs.tiny_layers, image_size=margs.tiny_image_size,
            patch_size=margs.tiny_patch_size, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            attn_implementation=margs.attn_implementation, seed=margs.tiny_seed,
        )
        processor = mm.build_processor(tok, student)
    else:
        if not margs.vision_tower:
            raise ValueError("student_language_model needs vision_tower (a SigLIP name or path)")
        tok = AutoTokenizer.from_pretrained(margs.student_language_model)
        student = mm.build_llava_from_pretrained(
            margs.student_language_model, margs.vision_tower, tokenizer=tok, torch_dtype=dtype,
            attn_implementation=margs.attn_implementation, projector=margs.projector_checkpoint,
        )
        processor = mm.build_processor(tok, student)
    if margs.stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage must be 'pretrain' or 'finetune', got {margs.stage!r}")
    projector = True if margs.train_projector is None else margs.train_projector
    if margs.lora_r:
        from tokinteract.mllm.lora import apply_lora

        student = apply_lora(
            student, r=margs.lora_r, alpha=margs.lora_alpha, dropout=margs.lora_dropout,
            target_modules=margs.lora_target_modules, train_projector=projector, seed=targs.seed,
        )
    else:
        mm.set_trainable_parts(
            student, vision_tower=margs.train_vision_tower, projector=projector,
            language_model=margs.stage == "finetune" if margs.train_language_model is None else margs.train_language_model,
        )
    logger.info("student: %d trainable parameters (stage %s)", mm.count_trainable(student), margs.stage)
    needs_teacher = any(settings[k] > 0 for k in ("kd", "iva", "tpa")) or settings["on_policy"]
    teacher = t_processor = None
    if needs_teacher:
        if margs.teacher_checkpoint:
            teacher, t_processor = mm.load_pretrained(margs.teacher_checkpoint, role="teacher", **load)
            student_name = margs.student_checkpoint or margs.student_language_model or "tiny"
            mm.check_same_tokenizer(
                processor, t_processor, student_name=student_name, teacher_name=margs.teacher_checkpoint
            )
        elif margs.tiny:
            logger.warning("tiny mode without teacher_checkpoint: distilling from a RANDOM tiny teacher (smoke test only)")
            teacher = mm.build_tiny_llava(
                vocab_size=student.config.text_config.vocab_size, image_token_id=student.config.image_token_id,
                family=margs.tiny_family, hidden_size=margs.tiny_teacher_hidden_size,
                num_layers=margs.tiny_teacher_layers, image_size=margs.tiny_image_size,
                patch_size=margs.tiny_patch_size, attn_implementation=margs.attn_implementation,
                seed=margs.tiny_seed + 1,
            )
        else:
            raise ValueError(f"method {dcfg.method!r} needs teacher_checkpoint")
    mm.check_pair(unwrap_peft(student), teacher, output="hidden" if dcfg.loss_impl == "fused" else "logits")
    if t_processor is not None and mm.teacher_needs_own_inputs(unwrap_peft(student), teacher, processor, t_processor):
        logger.info("the teacher reads its own processor's batch (another image processor or vision tower)")
        return _processor_trainer(student, teacher, processor, dargs, dcfg, targs, teacher_processor=t_processor)
    if student.config.model_type != "llava":
        return _processor_trainer(student, teacher, processor, dargs, dcfg, targs)
    tok = processor.tokenizer
    n_vis = mm.num_image_tokens(student)
    common = dict(
        num_image_tokens=n_vis, max_length=dargs.max_length, system_prompt=dargs.system_prompt,
        on_bad_image=dargs.on_bad_image,
    )
    train = LlavaJsonDataset(
        dargs.data_path, dargs.image_folder, tok, processor.image_processor, skip_bad=True,
        exclude=report.bad if report is not None else None, **common,
    )
    evald = (
        LlavaJsonDataset(dargs.eval_data_path, dargs.image_folder, tok, processor.image_processor, **common)
        if dargs.eval_data_path else None
    )
    collator = LlavaCollator(tok.pad_token_id, int(student.config.image_token_id), n_vis)
    return DistillationTrainer(
        student, targs, teacher=teacher, distill=dcfg, train_dataset=train, eval_dataset=evald,
        data_collator=collator, processing_class=processor,
    )


def _processor_trainer(
    student: Any, teacher: Any, processor: Any, dargs: Any, dcfg: Any, targs: Any, teacher_processor: Any = None
) -> Any:
    """The trainer of a non-LLaVA family, or of a teacher with its own processor: data through the
    family's own processor (:mod:`tokinteract.mllm.processor_data`)."""
    from tokinteract.hf.families import visual_token_ids
    from tokinteract.mllm.processor_data import ProcessorCollator, ProcessorDataset
    from tokinteract.mllm.trainer import DistillationTrainer

    if dargs.on_bad_image != "error":
        raise ValueError(
            f"on_bad_image={dargs.on_bad_image!r}: skipping bad samples is supported only with a LLaVA student "
            f"reading the teacher's inputs for now (student model_type {student.config.model_type!r}); use "
            "on_bad_image='error'"
        )
    train = ProcessorDataset(dargs.data_path, dargs.image_folder, processor, system_prompt=dargs.system_prompt)
    evald = (
        ProcessorDataset(dargs.eval_data_path, dargs.image_folder, processor, system_prompt=dargs.system_prompt)
        if dargs.eval_data_path else None
    )
    teacher_kw = {} if teacher_processor is None else dict(
        teacher_processor=teacher_processor, teacher_visual_token_ids=visual_token_ids(teacher)
    )
    collator = ProcessorCollator(processor, visual_token_ids(student), max_length=dargs.max_length, **teacher_kw)
    return DistillationTrainer(
        student, targs, teacher=teacher, distill=dcfg, train_dataset=train, eval_dataset=evald,
        data_collator=collator, processing_class=processor,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tokinteract-train``; returns the process exit code."""
    margs, dargs, dcfg, targs = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if targs.process_index == 0 else logging.WARNING,
    )
    trainer = build_everything(margs, dargs, dcfg, targs, check_existing_run=True)
    resume: Any = targs.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True  # the newest checkpoint-* under output_dir
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(targs.output_dir)
    trainer.save_state()
    if margs.lora_r and margs.lora_merge_on_save and trainer.is_world_process_zero():
        from tokinteract.mllm.lora import merge_and_save

        out = merge_and_save(trainer.model, Path(targs.output_dir) / "merged", trainer.processing_class)
        logger.info("merged student (LoRA folded in): %s", out)
    skipped = len(getattr(trainer.train_dataset, "skipped", [])) + len(trainer.skipped_samples)
    if skipped and trainer.is_world_process_zero():
        logger.warning("skipped %d bad sample(s) (see the preflight report and the warnings above)", skipped)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
