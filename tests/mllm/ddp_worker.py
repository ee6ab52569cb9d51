"""Worker for the 2-process DDP test: ``torchrun --nproc_per_node=2 ddp_worker.py CONFIG OUT``.

Trains with ``tokinteract.mllm.cli`` machinery, then every rank writes its own student
weights (and the teacher's) to ``OUT/rank{r}.pt`` so the test can compare ranks.
"""

from __future__ import annotations

import sys

import torch


def main() -> None:
    from tokinteract.mllm.cli import build_everything, parse_args

    config, out = sys.argv[1], sys.argv[2]
    margs, dargs, dcfg, targs = parse_args([config])
    trainer = build_everything(margs, dargs, dcfg, targs)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    rank = targs.process_index
    torch.save(
        {
            "before": before,
            "after": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "teacher": {k: v.detach().clone() for k, v in trainer.teacher.state_dict().items()},
            "world_size": targs.world_size,
            "log": trainer.state.log_history,
        },
        f"{out}/rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
