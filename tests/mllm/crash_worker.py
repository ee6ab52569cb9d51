"""Run ``tokinteract-train CONFIG`` and SIGKILL the process at one point of the save of checkpoint-STEP.

Usage: python crash_worker.py CONFIG.yaml POINT STEP, POINT one of
``weights`` (the model written, nothing else), ``optimizer`` (everything but trainer_state.json),
``rename`` (every file written, just before the staging folder is renamed).
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import Trainer

from tokinteract.mllm.cli import main

cfg, point, step = sys.argv[1], sys.argv[2], int(sys.argv[3])


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if point == "weights":
    _orig_opt = Trainer._save_optimizer_and_scheduler

    def _opt(self, output_dir):  # type: ignore[no-untyped-def]
        if self.state.global_step == step:
            _kill()
        return _orig_opt(self, output_dir)

    Trainer._save_optimizer_and_scheduler = _opt
elif point == "optimizer":
    _orig_rng = Trainer._save_rng_state

    def _rng(self, output_dir):  # type: ignore[no-untyped-def]
        _orig_rng(self, output_dir)
        if self.state.global_step == step:
            _kill()

    Trainer._save_rng_state = _rng
elif point == "rename":
    _orig_rename = os.rename

    def _rename(src, dst):  # type: ignore[no-untyped-def]
        if f"tmp-checkpoint-{step}" in str(src):
            _kill()
        return _orig_rename(src, dst)

    os.rename = _rename
else:
    raise SystemExit(f"unknown POINT {point!r}")

raise SystemExit(main([cfg]))
