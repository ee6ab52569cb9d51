"""Worker for the 2-process DDP tests: ``torchrun --nproc_per_node=2 ddp_worker.py OUT NAME=CONFIG ...``.

Trains each ``CONFIG`` in turn (one process group, one launch for every run: the launch and
the imports are paid once) with ``tokinteract.mllm.cli`` machinery; after each run every rank
writes its student weights before and after training, the teacher's weights and the log to
``OUT/NAME/rank{r}.pt`` so the tests can compare ranks. Each run builds its own models and
trainer from its own config (own output folder); a run that raises writes its traceback
instead (``{"error": ...}``), so only the test reading that run fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def _run(config: str, out: Path) -> None:
    from tokinteract.mllm.cli import build_everything, parse_args

    margs, dargs, dcfg, targs = parse_args([config])
    trainer = build_everything(margs, dargs, dcfg, targs)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    rank = targs.process_index
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "before": before,
            "after": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "teacher": {k: v.detach().clone() for k, v in trainer.teacher.state_dict().items()},
            "world_size": targs.world_size,
            "log": trainer.state.log_history,
        },
        out / f"rank{rank}.pt",
    )


def main() -> None:
    import os
    import traceback

    out = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        name, config = spec.split("=", 1)
        try:
            _run(config, out / name)
        except Exception:  # noqa: BLE001 - recorded for this run's test; the next run still runs
            (out / name).mkdir(parents=True, exist_ok=True)
            torch.save({"error": traceback.format_exc()}, out / name / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main()
