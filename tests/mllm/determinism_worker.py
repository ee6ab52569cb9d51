"""Train the tiny CLI config for a few steps with a given thread count and save the student's weights.

Usage: python determinism_worker.py CONFIG.yaml OUT.pt THREADS
"""

from __future__ import annotations

import sys

import torch

from tokinteract.mllm.cli import build_everything, parse_args

if __name__ == "__main__":
    cfg, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    trainer = build_everything(*parse_args([cfg]))
    trainer.train()
    torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, out)
