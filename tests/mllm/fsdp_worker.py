"""Worker for the 2-process FSDP2 test: ``torchrun --nproc_per_node=2 fsdp_worker.py OUT RUNS.json``.

``RUNS.json`` lists runs ``{"name", "config", "tie", "save", "resume"}``, trained
one after the other in the same process group (FSDP2 ones and their DDP references: the
config decides). Each builds and trains with ``tokinteract.mllm.cli`` machinery (the
``DistillationTrainer`` unchanged); every rank then writes ``OUT/{name}_rank{r}.pt``: the
full (gathered) student weights before and after training, the teacher's weights, the log
history, and what it saw of the sharding. ``tie`` ties the student's LM head to its input
embedding (as Qwen2.5-0.5B does) before training; ``save`` (a folder) saves the final
student with ``trainer.save_model``; ``resume`` (a checkpoint folder) resumes from it.

TEST-ONLY PATCH (:func:`_force_fsdp_on_cpu`). On CPU, accelerate 1.15's ``AcceleratorState``
selects ``DistributedType.FSDP`` only for accelerator device types (MULTI_GPU, MULTI_XPU,
...; not MULTI_CPU), so ``fsdp: true`` silently trains as DDP on a CPU machine.
``AcceleratorState.__init__`` is wrapped so that, after accelerate's own initialisation, a
MULTI_CPU state that was handed an FSDP plugin (DDP runs hand none) is set the way
accelerate's GPU branch sets it (``distributed_type = FSDP``, ``fsdp_plugin``, and the
mirrored ``PartialState`` field). Everything after that -- accelerate's
``fsdp2_prepare_model`` (``fully_shard`` of the decoder/encoder layers, the embedding, the
LM head, the root), the Trainer's FSDP paths (optimizer, gradient clipping, FULL_STATE_DICT
saving) and the ``DistillationTrainer`` -- is the unpatched code, with gloo instead of NCCL.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def _force_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # what accelerate's GPU branch does (accelerate/state.py: "self.distributed_type =
            # DistributedType.FSDP", "self.fsdp_plugin = fsdp_plugin", PartialState mirror)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _sharding(model: torch.nn.Module) -> dict[str, tuple[list[int], list[int]]]:
    """``name -> (local shard shape on this rank, full shape)`` of the DTensor parameters."""
    from torch.distributed.tensor import DTensor

    return {n: (list(p.to_local().shape), list(p.shape)) for n, p in model.named_parameters() if isinstance(p, DTensor)}


def _run(config: str, tie: bool, save: str | None, resume: str | None) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback

    from tokinteract.mllm.cli import build_everything, parse_args

    seen: dict[str, dict] = {}

    class RecordSharding(TrainerCallback):
        """The student's parameters after the first optimizer step of this run (after an
        evaluation, FSDP2 leaves the root unit unsharded until the next backward: look here)."""

        def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
            if "sharding" not in seen:
                seen["sharding"] = _sharding(model)

    margs, dargs, dcfg, targs = parse_args([config])
    trainer = build_everything(margs, dargs, dcfg, targs)
    if tie:  # before accelerate sees the model (it shards tied weights as one unit)
        trainer.model.lm_head.weight = trainer.model.get_input_embeddings().weight
        trainer.model.config.text_config.tie_word_embeddings = True
    trainer.add_callback(RecordSharding())
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    info = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "fsdp_version": getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", None),
        "is_fsdp_module": isinstance(model, FSDPModule),
        "fsdp_units": sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule)),
        "sharding": seen["sharding"],
        "params": [n for n, _ in model.named_parameters()],
        "teacher_type": type(trainer.teacher).__name__,
        "teacher_is_fsdp_module": any(isinstance(m, FSDPModule) for m in trainer.teacher.modules()),
        "teacher_dtensors": [n for n, p in trainer.teacher.named_parameters() if isinstance(p, DTensor)],
    }
    if save is not None:
        trainer.save_model(save)
    return {
        "before": before,  # taken before accelerate prepared (sharded) the model
        "after": {k: _full(v) for k, v in model.state_dict().items()},
        "teacher": {k: v.detach().clone() for k, v in trainer.teacher.state_dict().items()},
        "world_size": targs.world_size,
        "rank": targs.process_index,
        "log": trainer.state.log_history,
        "info": info,
    }


def main() -> None:
    out, runs = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    _force_fsdp_on_cpu()  # acts only on an AcceleratorState that is handed an FSDP plugin
    for run in runs:  # one process group; TrainingArguments resets accelerate's state per run
        # an Accelerator given an FSDP plugin sets ACCELERATE_USE_FSDP=true, from which a later
        # Accelerator without one would build a default (FSDP1) plugin: each run starts clean
        os.environ.pop("ACCELERATE_USE_FSDP", None)
        res = _run(run["config"], run.get("tie", False), run.get("save"), run.get("resume"))
        torch.save(res, f"{out}/{run['name']}_rank{res['rank']}.pt")


if __name__ == "__main__":
    main()
