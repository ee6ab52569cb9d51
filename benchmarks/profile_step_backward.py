"""Profile the backward of one trainer step per method, grouped by op and input shape (CPU).

Uses ``bench_step.py``'s models and batch at ``--real-shapes`` (Qwen2-0.5B-shaped student,
Qwen2-1.5B-shaped teacher, V = 151,936, 729 visual tokens, B = 1). For each method: one
``compute_loss`` + ``backward`` warm-up, then ``backward`` of a second step under
``torch.profiler`` (so the printed times include the profiler's overhead; compare methods
with each other, not with ``bench_step.py``).

    .venv/bin/python benchmarks/profile_step_backward.py kd align_ti
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step as bs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", choices=list(bs.VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25, help="rows of each table")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainingArguments

    from tokinteract.mllm import set_trainable

    vocab, vision = 151_936, dict(bs.GPU_VISION)
    student = bs.build_model(vocab, vocab - 1, bs.SHAPES["0.5b"], vision, 1, torch.float32, "cpu")
    teacher = bs.build_model(vocab, vocab - 1, bs.SHAPES["1.5b"], vision, 2, torch.float32, "cpu")
    set_trainable(student, "finetune")
    batch = bs.build_batch(1, 729, 60, 100, vocab, vocab - 1, vision["image_size"], 0, "cpu", torch.float32)
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="profile_step_"), use_cpu=True, report_to=[],
                              per_device_train_batch_size=1, save_strategy="no", disable_tqdm=True)
    student.train()
    for v in a.variants:
        tr = bs.make_trainer(student, teacher, *bs.VARIANTS[v], targs, bs.SHAPES["1.5b"][1] // 2, 4)
        for it in range(2):
            loss = tr.compute_loss(student, dict(batch))
            t0 = time.perf_counter()
            if it == 0:
                loss.backward()
            else:
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    loss.backward()
            print(f"{v}: backward {time.perf_counter() - t0:.2f} s ({'profiled' if it else 'warm-up'})", flush=True)
            student.zero_grad(set_to_none=True)
            tr._part_sums = {}
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=40, max_shapes_column_width=90))


if __name__ == "__main__":
    main()
