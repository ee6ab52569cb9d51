"""Train, then save the weights, for the determinism tests (one process per thread count).

Usage:
    python determinism_worker.py CONFIG.yaml OUT.pt THREADS [RUN_DIR DEMO_OUT.pt STEPS]
        the tiny CLI config for its ``max_steps``, with ``torch.set_num_threads(THREADS)``
        (OUT: the student's weights); then, with the three optional arguments, the demo run
        below (one process for both, so the pair of processes pays the imports once). Each part
        that raises writes ``{"error": traceback}`` to its OUT instead, so only its test fails;
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


def cli(cfg: str, out: str, threads: int) -> None:
    from tokinteract.mllm.cli import build_everything, parse_args

    torch.set_num_threads(threads)
    trainer = build_everything(*parse_args([cfg]))
    trainer.train()
    torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, out)


def _recorded(fn, out: str, *args) -> None:  # type: ignore[no-untyped-def]
    import traceback

    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the test reading OUT reports it; the other part still runs
        torch.save({"error": traceback.format_exc()}, out)


if __name__ == "__main__":
    if sys.argv[1] == "--demo":
        demo(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        _recorded(cli, sys.argv[2], sys.argv[1], sys.argv[2], int(sys.argv[3]))
        if len(sys.argv) > 4:
            _recorded(demo, sys.argv[5], sys.argv[4], sys.argv[5], int(sys.argv[6]))
