"""Train, then save the student's weights, for the determinism tests (one process per call).

Usage:
    python determinism_worker.py CONFIG.yaml OUT.pt THREADS
        the tiny CLI config for its ``max_steps``, with ``torch.set_num_threads(THREADS)``;
    python determinism_worker.py --demo RUN_DIR OUT.pt STEPS
        the demo (``examples/study/demo_study.py``) at its quick preset's model sizes, batch and
        learning rates on a small copy of its task: the teacher's SFT (vision tower trained)
        for STEPS steps, then an Align-TI student (IVA + TPA) from a fresh student for STEPS
        steps with that teacher, through ``Demo.fit`` (which fixes the thread count); OUT holds
        both models' weights. The caller's thread count is left as the environment sets it.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch


def demo(run_dir: str, out: str, steps: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "study"))
    from demo_study import PRESETS, Demo, run_specs

    s = dataclasses.replace(PRESETS["quick"], n_train=64, n_test=8, n_captions=8, n_eval=8)
    d = Demo(s, run_dir, progress=False, log=lambda *_: None)
    d.prepare()
    teacher = d.build_model(s.teacher, seed=1000)
    d.fit(teacher, d.train, steps=steps, lr=s.teacher_lr, seed=1000, tag="teacher", train_vision=True)
    teacher.requires_grad_(False)
    student = d.build_model(s.student, seed=2000)
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    spec = run_specs(s, l_star=s.teacher.layers // 2)["align_ti"]
    d.fit(student, d.train, steps=steps, lr=s.student_lr, seed=0, method=spec.method, teacher=teacher,
          overrides=spec.overrides, tag="align_ti")
    torch.save({"threads_in_env": torch.get_num_threads(),
                "teacher": {k: v.detach().clone() for k, v in teacher.state_dict().items()},
                "student": {k: v.detach().clone() for k, v in student.state_dict().items()}}, out)


if __name__ == "__main__":
    if sys.argv[1] == "--demo":
        demo(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        from tokinteract.mllm.cli import build_everything, parse_args

        cfg, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
        torch.set_num_threads(threads)
        trainer = build_everything(*parse_args([cfg]))
        trainer.train()
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, out)
