"""Does a study teacher train to the same weights at two torch thread counts? (issue 15, item 6)

    python examples/study/thread_check.py --task digits --steps 200 --n-train 512

The task's quick setting (``demo_study.task_settings(task, "quick")``) on a smaller training split:
the vision tower is pre-trained once at 1 thread (``--vision-steps`` steps on ``--vision-images``
images) and frozen, as in the study; then the teacher is trained ``--steps`` steps through
``Demo.fit`` at each count of ``--threads`` (and the first count again, which must repeat bit for
bit), from the same seed, and the trained weights are compared tensor by tensor. Prints the
tensors that differ and their largest absolute difference. Step times are printed too, but they
mean nothing on a shared machine. Nothing is cached or written outside ``--run-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import demo_study as dm  # noqa: E402


def compare(task: str, run_dir: Path, *, steps: int, n_train: int, threads: tuple[int, int], vision_steps: int,
            vision_images: int) -> tuple[int, dict[str, float]]:
    """Train the teacher at ``threads[0]``, ``threads[1]`` and ``threads[0]`` again; returns the number of
    tensors compared and ``{tensor name: max |difference|}`` of those that differ between the two counts.

    Raises:
        RuntimeError: the repeat at ``threads[0]`` differs from the first run (then nothing can be said
            about thread counts).
    """
    base = dataclasses.replace(dm.task_settings(task, "quick"), n_train=n_train, n_test=16, n_eval=16,
                               n_captions=16, vision_pretrain_steps=vision_steps, vision_images=vision_images)
    got: dict[int, dict[str, torch.Tensor]] = {}
    for n in (threads[0], threads[1], threads[0]):
        d = dm.Demo(dataclasses.replace(base, threads=n), run_dir, progress=False, log=lambda *_: None)
        d.prepare()
        with dm.torch_threads(1):  # one tower for every count, frozen as in the study
            tower = d.vision_tower()
        teacher = d.build_model(base.teacher, seed=base.teacher_seed)
        teacher.model.vision_tower.load_state_dict(tower)
        t0 = time.perf_counter()
        info = d.fit(teacher, d.train, steps=steps, lr=base.teacher_lr, seed=base.teacher_seed, tag=f"teacher_t{n}",
                     threads=n)
        weights = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        print(f"{n} thread(s): {steps} steps in {time.perf_counter() - t0:.1f} s (median step "
              f"{1e3 * info['step_time_s']:.0f} ms), last logged loss {info['log'][-1]['loss'] if info['log'] else 'n/a'}",
              flush=True)
        if n in got:
            same = sum(torch.equal(weights[k], got[n][k]) for k in weights)
            if same != len(weights):
                raise RuntimeError(f"the repeat at {n} thread(s) differs in {len(weights) - same} tensors: "
                                   "the run does not repeat even at one thread count")
            print(f"repeat at {n} thread(s): {same}/{len(weights)} tensors bit-identical")
        else:
            got[n] = weights
    a, b = got[threads[0]], got[threads[1]]
    return len(a), {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits", choices=sorted(dm.TASK_SETTINGS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--threads", type=int, nargs=2, default=(1, 2), metavar=("A", "B"))
    p.add_argument("--vision-steps", type=int, default=20)
    p.add_argument("--vision-images", type=int, default=200)
    p.add_argument("--run-dir", type=Path, default=Path("runs") / "thread_check")
    a = p.parse_args(argv)
    if a.steps < 1 or a.n_train < 1 or min(a.threads) < 1 or a.threads[0] == a.threads[1]:
        p.error(f"--steps and --n-train must be >= 1 and --threads two different counts >= 1, got {a.steps}, "
                f"{a.n_train}, {a.threads}")
    total, diff = compare(a.task, a.run_dir, steps=a.steps, n_train=a.n_train, threads=tuple(a.threads),
                   vision_steps=a.vision_steps, vision_images=a.vision_images)
    print(f"{a.threads[0]} vs {a.threads[1]} threads: {len(diff)} of {total} tensors differ"
          + (": " + ", ".join(f"{k} ({v:.1e})" for k, v in sorted(diff.items(), key=lambda x: -x[1])[:6]) if diff else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
