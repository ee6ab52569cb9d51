"""Worker for the 2-process DeepSpeed test: ``torchrun --nproc_per_node=2 deepspeed_worker.py CONFIG OUT [INJECT]``.

``INJECT`` (JSON, optional): ``{"rank", "steps", "kind"}`` makes that rank's loss non-finite
on those steps (see ``guard_worker.py``); a ``TrainingStopped`` is then recorded, not raised.

``CONFIG`` is a CLI config with ``deepspeed:`` (ZeRO-2) and without ``use_cpu``. Trains with
``tokinteract.mllm.cli`` machinery, then every rank writes what the test checks to
``OUT/rank{r}.pt``.

On a machine without GPUs, accelerate 1.15 picks no process-group backend for DeepSpeed and
reports one process on every rank (DeepSpeed, which sees two, then stops at its batch-size
check). So the worker configures the distributed state itself (``gloo``, DeepSpeed on) and
the config passes ``accelerator_config: {use_configured_state: true}``; on GPUs neither is
needed. The trainer is not changed.

DeepSpeed's CPU accelerator also JIT-compiles a shared-memory all-reduce kernel when its
communication backend starts (about 70 s on 2 cores the first time, then cached in
``~/.cache/torch_extensions``). Only inference tensor parallelism uses that kernel
(``inference_all_reduce``), never ZeRO training, so the worker skips the build unless
``TOKINTERACT_DS_SHM=1`` (with it the run is the same, measured).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import TrainerCallback


class _Count(TrainerCallback):
    """Records the optimizer steps this process ran and the student's weights after each."""

    def __init__(self, steps: list[int], snaps: dict, trainer) -> None:  # type: ignore[no-untyped-def]
        self.steps, self.snaps, self.trainer = steps, snaps, trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        self.snaps[state.global_step] = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}


def main() -> None:
    from accelerate import PartialState

    from tokinteract.mllm.cli import build_everything, parse_args

    if os.environ.get("TOKINTERACT_DS_SHM") != "1":
        import importlib

        # not ``import deepspeed.comm.torch as m``: ``deepspeed.comm`` re-exports ``torch`` itself
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")  # deepspeed.comm.init_distributed on gloo (the CPU accelerator's fallback)
    config, out = sys.argv[1], sys.argv[2]
    margs, dargs, dcfg, targs = parse_args([config])
    trainer = build_everything(margs, dargs, dcfg, targs)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    steps_run: list[int] = []
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    trainer.add_callback(_Count(steps_run, snaps, trainer))
    end: dict = {"outcome": "ok"}
    if len(sys.argv) > 3:
        from guard_worker import _inject

        from tokinteract.mllm.reliability import TrainingStopped

        _inject(trainer, **json.loads(sys.argv[3]))
        try:
            trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
        except TrainingStopped as e:
            end = {"outcome": "stopped", "message": str(e), "checkpoint": e.checkpoint}
    else:
        trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
        trainer.save_model(targs.output_dir)  # as tokinteract.mllm.cli.main does
    engine = trainer.model_wrapped
    teacher = trainer.teacher
    from deepspeed.accelerator import get_accelerator

    rank = targs.process_index
    torch.save(
        {
            "before": before,
            "after": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "teacher": {k: v.detach().clone() for k, v in teacher.state_dict().items()},
            "world_size": targs.world_size,
            "log": trainer.state.log_history,
            "steps_run": steps_run,  # optimizer steps taken by this process (2 when resumed at step 2)
            "snaps": snaps,
            "nonfinite_steps": list(trainer.nonfinite_steps),
            **end,
            "engine": f"{type(engine).__module__}.{type(engine).__name__}",
            "zero_stage": engine.zero_optimization_stage(),
            "engine_world_size": engine.world_size,
            "engine_module_is_student": engine.module is trainer.model,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "comm_backend": torch.distributed.get_backend(),
            "ds_accelerator": get_accelerator().device_name(),
            "optimizer": type(engine.optimizer).__name__,
            "teacher_training": teacher.training,
            "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
            "teacher_in_engine": bool(
                {id(p) for p in teacher.parameters()} & {id(p) for p in engine.module.parameters()}
            ),
        },
        f"{out}/rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
