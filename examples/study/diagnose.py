"""Fast diagnosis of what makes a study task learnable (issue 15, calibration): a teacher trained
with a plain loop, greedy exact match per question type every ``--eval-every`` steps.

    python examples/study/diagnose.py --task scenes --types color --steps 400 --eval-every 100
    python examples/study/diagnose.py --task scenes --types color --set vision_position=true --lr 3e-3

Same data, model, vision tower and loss as the calibration (``demo_study.Demo``); only the
training loop is a plain AdamW loop (warm-up then cosine or constant learning rate) so that
accuracy can be measured during training. One JSON line per evaluation goes to
``--out`` (appended) with the command, so every experiment of the calibration log is
reproducible. Not the calibration: numbers here are for choosing its setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import calibrate as cal  # noqa: E402
import demo_study as dm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(dm.TASK_SETTINGS), required=True)
    p.add_argument("--preset", default="quick", choices=sorted(dm.PRESETS),
                   help="the data scale (default quick; smoke: tiny, for tests)")
    p.add_argument("--types", nargs="+", default=None, help="question types (default: the task's)")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="their training frequencies")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a DemoSettings field")
    p.add_argument("--teacher-size", type=int, nargs=2, default=None, metavar=("HIDDEN", "LAYERS"))
    p.add_argument("--teacher-heads", type=int, nargs=2, default=None, metavar=("HEADS", "KV_HEADS"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.0,
                   help="AdamW weight decay on the matrices (ndim >= 2; norms and biases never); default 0, "
                        "as the study's teachers and students")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--n-eval", type=int, default=120)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--first-types", nargs="+", default=None,
                   help="curriculum: the first --first-steps steps draw only training samples of these types")
    p.add_argument("--first-steps", type=int, default=0)
    p.add_argument("--stage", action="append", default=[], metavar="TYPES:STEPS",
                   help="curriculum stage after --first-*, in order: STEPS steps drawing only the comma-separated "
                        "TYPES (e.g. shape:300 or color,shape:200); the remaining steps draw from every sample")
    p.add_argument("--irs", action="store_true", help="also the IRS curve at the end")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="at the end, print up to N wrong greedy answers per question type (question, reference, answer)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this saved model (e.g. a calibration's student_stage1) instead of a fresh one; "
                        "its vision tower is replaced by the run dir's pre-trained tower")
    p.add_argument("--trainer", action="store_true",
                   help="train through the study's DistillationTrainer (Demo.fit: epochs of the training set, "
                        "warm-up then cosine) instead of the plain loop; evaluates once at the end")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "diagnose.jsonl")
    a = p.parse_args(argv)
    if a.wd < 0 or not math.isfinite(a.wd):  # before any data or model is made
        raise ValueError(f"--wd must be a finite number >= 0, got {a.wd!r}")
    torch.set_num_threads(1)
    s = dm.task_settings(a.task, a.preset)
    s = dataclasses.replace(s, **cal._parse_set(a.set, s))
    if a.types:  # the setting's weights are for its own types: uniform unless --weights
        s = dataclasses.replace(s, question_types=tuple(a.types), question_weights=())
    if a.weights:
        s = dataclasses.replace(s, question_weights=tuple(a.weights))
    if a.teacher_size:
        s = dataclasses.replace(s, teacher=dataclasses.replace(s.teacher, hidden=a.teacher_size[0],
                                                               layers=a.teacher_size[1]))
    if a.teacher_heads:
        s = dataclasses.replace(s, teacher=dataclasses.replace(s.teacher, heads=a.teacher_heads[0],
                                                               kv_heads=a.teacher_heads[1]))
    command = "python examples/study/diagnose.py" + "".join(
        f" {shlex.quote(x)}" for x in (argv if argv is not None else sys.argv[1:]))
    from transformers.utils import logging as hf_logging

    from tokinteract.mllm import set_trainable

    hf_logging.set_verbosity_error()
    demo = dm.Demo(s, a.run_dir, progress=False)
    demo.prepare()
    tower = demo.vision_tower()
    print("task", demo.results["task"], "\nvision", demo.results.get("vision"), flush=True)
    if a.init is not None:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(a.init, attn_implementation="sdpa")
    else:
        model = demo.build_model(s.teacher, seed=a.seed)
    if tower is not None:
        model.model.vision_tower.load_state_dict(tower)
    set_trainable(model, "finetune")
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW([{"params": [q for q in params if q.ndim >= 2], "weight_decay": a.wd},
                             {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0}], lr=a.lr)
    warm = max(1, a.steps // 20)

    def lr_at(step: int) -> float:
        w = min(1.0, (step + 1) / warm)
        return w if a.schedule == "constant" else w * 0.5 * (1 + math.cos(math.pi * step / a.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(a.seed)
    items, n = demo.train.items, len(demo.train.items)
    types = [m.get("type") for m in dm._meta(demo.dir / "data" / "train.json")]
    stages = ([(tuple(a.first_types or ()), a.first_steps)] if a.first_steps else []) + [
        (tuple(x.rpartition(":")[0].split(",")), int(x.rpartition(":")[2])) for x in a.stage]
    pools, ends, end = [], [], 0
    for want, k in stages:  # (sample indices, last step) per stage
        pool = [i for i, t in enumerate(types) if t in want]
        if not pool or k < 1:
            raise ValueError(f"a curriculum stage needs known types and steps >= 1, got {want!r}:{k!r} "
                             f"(types: {sorted(set(types))})")
        end += k
        pools.append(pool)
        ends.append(end)
    test, meta = demo.test.items[: a.n_eval], demo.test_meta[: a.n_eval]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    t0, losses = time.perf_counter(), []

    def emit(rec: dict) -> None:  # one JSON line: printed and appended to --out
        print(json.dumps(rec), flush=True)
        with a.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    if a.trainer:
        if stages:
            raise ValueError("--trainer trains on every sample: no curriculum (--first-*, --stage) with it")
        tr = demo.fit(model, demo.train, steps=a.steps, lr=a.lr, seed=a.seed, batch=a.batch, threads=1,
                      tag="diagnose")
        ev = dm.evaluate_generation(model, test, meta, eos=demo.eos, pad=demo.pad)
        rec = {"command": command, "step": a.steps, "train_s": round(tr["wall_s"], 1),
               "loss": round(tr["log"][-1]["loss"], 4) if tr["log"] else None,
               "em": {k: round(v, 3) for k, v in ev["exact_match"].items()}, "overall": round(ev["overall"], 3),
               "wall_s": round(time.perf_counter() - t0, 1)}
        emit(rec)
    for step in range(1, 0 if a.trainer else a.steps + 1):  # the plain loop, unless --trainer trained
        model.train()
        model.model.vision_tower.eval()
        stage = next((k for k, e in enumerate(ends) if step <= e), None)
        if stage is not None:
            pool = pools[stage]
            idx = [pool[j] for j in torch.randint(0, len(pool), (a.batch,), generator=gen).tolist()]
        else:
            idx = torch.randint(0, n, (a.batch,), generator=gen).tolist()
        b = demo.collator([items[i] for i in idx])
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                    labels=b["labels"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        if step % a.eval_every == 0 or step == a.steps:
            train_s = time.perf_counter() - t0
            ev = dm.evaluate_generation(model, test, meta, eos=demo.eos, pad=demo.pad)
            rec = {"command": command, "step": step, "train_s": round(train_s, 1),
                   "loss": round(sum(losses[-a.eval_every:]) / len(losses[-a.eval_every:]), 4),
                   "em": {k: round(v, 3) for k, v in ev["exact_match"].items()}, "overall": round(ev["overall"], 3)}
            if step == a.steps and a.irs:
                curve = demo.irs(model)
                rec["irs"] = [round(float(x), 4) for x in curve.scores.tolist()]
                rec["irs_ratio"] = round(cal.irs_ratio(rec["irs"]), 2)
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            emit(rec)
    if a.show:
        show_wrong(model, test, meta, demo, a.show)
    return 0


@torch.no_grad()
def show_wrong(model: torch.nn.Module, items: list, metas: list, demo: dm.Demo, n: int) -> None:
    """Print up to ``n`` wrong greedy answers per question type: what the model says instead."""
    from tokinteract.mllm.eval import _left_pad, _prompt_and_answer, _strip, greedy_generate

    shown: dict[str, int] = {}
    for i in range(0, len(items), 32):
        chunk = items[i:i + 32]
        pa = [_prompt_and_answer(it) for it in chunk]
        ids, att = _left_pad([p for p, _ in pa], demo.pad)
        out = greedy_generate(model, ids, att, torch.cat([it["pixel_values"] for it in chunk], 0),
                              max_new_tokens=max(len(x) for _, x in pa) + 2, eos=demo.eos)
        for b, (p, ref) in enumerate(pa):
            pred, t = _strip(out[b].tolist(), demo.eos), metas[i + b].get("type")
            if pred != ref.tolist() and shown.get(t, 0) < n:
                shown[t] = shown.get(t, 0) + 1
                q = demo.tok.decode([x for x in p.tolist() if x != demo.image_token_id][-12:])
                print(f"{t}: {q!r} ref {demo.tok.decode(ref.tolist())!r} got {demo.tok.decode(pred)!r}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
