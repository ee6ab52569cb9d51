"""Worker of the 2-process DDP test on a non-LLaVA family:
``torchrun --nproc_per_node=2 family_ddp_worker.py FAMILY DATA OUT``.

Builds the tiny family pair of ``tests/hf/families.py`` (student seed 1, teacher seed 2) and its real
processor (offline, no checkpoint: the Qwen-VL processors cannot be loaded with ``AutoProcessor``
without torchvision), trains with :func:`make_trainer`, then writes the rank's student weights before
and after, its teacher weights and its log to ``OUT/rank{r}.pt``. The test calls :func:`make_trainer`
itself for the one-process reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import families as fx  # noqa: E402


def make_trainer(name: str, data: Path, out: Path, *, per_device_batch: int, ddp: bool) -> object:
    """align_ti with greedy (deterministic) candidates and plain SGD: every rank split of a global batch
    must give the same update, so DDP can be compared with one process."""
    from transformers import TrainingArguments

    from tokinteract.hf.families import visual_token_ids
    from tokinteract.mllm import DistillationConfig, DistillationTrainer
    from tokinteract.mllm.model import set_trainable_parts
    from tokinteract.mllm.processor_data import ProcessorCollator, ProcessorDataset

    student, teacher = fx.make_model(name, seed=1), fx.make_model(name, seed=2)
    proc = fx.make_processor(name)
    set_trainable_parts(student)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=per_device_batch, max_steps=2, logging_steps=1,
        learning_rate=0.5, optim="sgd", report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        seed=0, **(dict(ddp_backend="gloo") if ddp else {}),
    )
    cfg = DistillationConfig(method="align_ti", iva_layer=1, tpa_sampling="greedy", tpa_num_candidates=2)
    return DistillationTrainer(
        student, args, teacher=teacher, distill=cfg, train_dataset=ProcessorDataset(data, data.parent, proc),
        data_collator=ProcessorCollator(proc, visual_token_ids(student)), processing_class=proc,
    )


def main() -> None:
    name, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    trainer = make_trainer(name, data, out / "run", per_device_batch=2, ddp=True)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    torch.save(
        {
            "before": before,
            "after": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "teacher": {k: v.detach().clone() for k, v in trainer.teacher.state_dict().items()},
            "world_size": trainer.args.world_size,
            "log": trainer.state.log_history,
        },
        out / f"rank{trainer.args.process_index}.pt",
    )


if __name__ == "__main__":
    main()
