"""Worker for the distributed fault tests: ``torchrun --nproc_per_node=2 guard_worker.py OUT RUNS.json``.

``RUNS.json`` lists runs ``{"name", "config", "inject", "resume"}`` trained one after the other
in one process group (DDP, or FSDP2 when the config says ``fsdp``: the test-only CPU patch of
``fsdp_worker.py`` is applied). ``inject = {"rank", "steps", "kind"}`` makes that rank's loss
non-finite on those optimizer steps (1-based): ``"nan"`` multiplies it by NaN (every gradient
NaN), ``"inf"`` adds a constant infinity (the loss is infinite, its gradients stay finite:
only this rank can tell that the step is bad). ``resume`` is passed to ``train``; ``poison_optimizer_rank`` puts a NaN into that rank's
optimizer state after step 1's update (the next save must be refused on every rank).

Every rank writes ``OUT/{name}_rank{r}.pt``: the full student weights after each optimizer
step, how the run ended (``TrainingStopped`` message and checkpoint, or ``"ok"``), the guard's
messages, the skipped samples, the staging renames this process made and the steps it ran.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from fsdp_worker import _force_fsdp_on_cpu, _full

RENAMES: list[tuple[str, str]] = []
_rename = os.rename


def _recording_rename(src, dst):  # type: ignore[no-untyped-def]
    if "tmp-checkpoint-" in str(src):
        RENAMES.append((str(src), str(dst)))
    return _rename(src, dst)


def _inject(trainer, rank: int, steps: list[int], kind: str) -> None:  # type: ignore[no-untyped-def]
    if trainer.args.process_index != rank:
        return
    orig = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = orig(model, inputs, *args, **kwargs)
        if trainer.state.global_step + 1 not in steps:
            return out
        loss = out[0] if isinstance(out, tuple) else out
        loss = loss * float("nan") if kind == "nan" else loss + float("inf")
        return (loss, *out[1:]) if isinstance(out, tuple) else loss

    trainer.compute_loss = compute_loss


def _run(run: dict) -> dict:
    from transformers import TrainerCallback

    from tokinteract.mllm.cli import build_everything, parse_args
    from tokinteract.mllm.reliability import NonFiniteError, TrainingStopped

    trainer = build_everything(*parse_args([run["config"]]))
    snaps: dict[int, dict[str, torch.Tensor]] = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
            snaps[state.global_step] = {k: _full(v) for k, v in model.state_dict().items()}

    trainer.add_callback(Snap())
    poison = run.get("poison_optimizer_rank")

    class Poison(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if args.process_index == poison and state.global_step == 0:
                st = next(iter(trainer.optimizer.optimizer.state.values()))
                st["exp_avg"].view(-1)[0] = float("nan")

    if poison is not None:
        trainer.add_callback(Poison())
    if run.get("inject"):
        _inject(trainer, **run["inject"])
    n_renames = len(RENAMES)
    end: dict = {"outcome": "ok"}
    try:
        trainer.train(resume_from_checkpoint=run.get("resume"))
    except TrainingStopped as e:
        end = {"outcome": "stopped", "message": str(e), "checkpoint": e.checkpoint}
    except NonFiniteError as e:
        end = {"outcome": "refused", "message": str(e)}
    return {
        **end,
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "snaps": snaps,
        "steps_run": sorted(snaps),
        "global_step": trainer.state.global_step,
        "nonfinite_steps": list(trainer.nonfinite_steps),
        "skipped": dict(trainer.skipped_samples),
        "renames": RENAMES[n_renames:],
        "log": trainer.state.log_history,
    }


def main() -> None:
    out, runs = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    os.rename = _recording_rename
    _force_fsdp_on_cpu()  # acts only on an AcceleratorState handed an FSDP plugin
    for run in runs:
        os.environ.pop("ACCELERATE_USE_FSDP", None)  # see fsdp_worker.main
        res = _run(run)
        torch.save(res, f"{out}/{run['name']}_rank{res['rank']}.pt")


if __name__ == "__main__":
    main()
