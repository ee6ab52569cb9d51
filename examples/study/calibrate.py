"""Calibration of a study task (issue 15): teacher(s) and SFT student only, before any distillation run.

    python examples/study/calibrate.py --task scenes                  # the task's quick setting
    python examples/study/calibrate.py --task digits --teacher-seeds 1000 1001 --student-seeds 0
    python examples/study/calibrate.py --task scenes --set teacher_steps=3000 --set n_train=12000

Steps (each cached in ``--run-dir``, so a killed calibration resumes): write the task,
pre-train and freeze the vision tower (probe accuracy recorded), train the first teacher of
``--teacher-seeds`` (exact match per question type, POPE per split, the IRS curve), the
shared stage-1 student, one SFT student per ``--student-seeds`` (and, with ``--kd-seeds``, one
Vanilla KD student per seed: whether KD leaves a gap below the teacher), then the replicate
teachers (IRS stability). ``calibration.json`` is rewritten after every stage, so a killed
run leaves what it measured (``--page-only`` writes its page). The targets of issue 15
are checked and written to ``--page`` with every number and the command (a target not
measured is reported as not met):

* the first teacher >= 85 % exact match on each short question type (and pooled);
* the teacher >= 15 points above the SFT student (mean over seeds) in overall exact match;
* every teacher's IRS curve with max/min >= 3, and the same l* (or neighbouring layers)
  across teachers.

Nothing here picks a distillation method: only teacher and SFT numbers decide the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import demo_study as dm  # noqa: E402

TARGET_SHORT_EM = 0.85
TARGET_GAP = 0.15
TARGET_IRS_RATIO = 3.0


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _parse_set(items: list[str], settings: dm.DemoSettings) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(settings)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields or name in ("teacher", "student", "seeds", "experiments"):
            raise ValueError(f"--set takes NAME=VALUE with NAME a scalar field of DemoSettings (or question_types / "
                             f"question_weights, comma-separated), got {item!r}")
        old = getattr(settings, name)
        if isinstance(old, tuple):  # comma-separated, typed by the field (question_types: str, weights: float)
            kind = float if name == "question_weights" else str
            out[name] = tuple(kind(x) for x in value.split(",") if x)
        elif isinstance(old, bool) or name == "question_first":  # a yes/no word; question_first also "both"
            word = value.lower()
            if word in _TRUE + _FALSE or (name == "question_first" and word == "both"):
                out[name] = "both" if word == "both" else word in _TRUE
            else:
                raise ValueError(f"--set {name} takes one of {_TRUE + _FALSE}"
                                 + (" or both" if name == "question_first" else "") + f", got {value!r}")
        else:
            out[name] = type(old)(value)
    return out


def irs_ratio(scores: list[float]) -> float:
    """max / min of an IRS curve (inf when the minimum is <= 0: no finite ratio)."""
    lo, hi = min(scores), max(scores)
    return hi / lo if lo > 0 else float("inf")


def check_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The calibration targets of issue 15, each with its measured value and whether it is met."""
    rows: list[dict[str, Any]] = []
    teachers = res["teachers"]
    t0 = teachers[0]["eval"]
    for t in res["task"]["short_types"]:
        name = f"teacher EM on '{t}' >= {TARGET_SHORT_EM:.0%}"
        if t in t0["exact_match"]:
            v = t0["exact_match"][t]
            rows.append({"target": name, "value": v, "met": v >= TARGET_SHORT_EM})
        else:  # not measured is not met
            rows.append({"target": name, "value": "no such question in the test set", "met": False})
    if "short_overall" in t0:
        v = t0["short_overall"]
        rows.append({"target": f"teacher EM on the short types, pooled, >= {TARGET_SHORT_EM:.0%}", "value": v,
                     "met": v >= TARGET_SHORT_EM})
    sft = [r["eval"]["overall"] for r in res.get("sft", [])]
    name = f"teacher - SFT student overall EM >= {TARGET_GAP * 100:.0f} points"
    if sft:
        gap = t0["overall"] - sum(sft) / len(sft)
        rows.append({"target": name, "value": gap, "met": gap >= TARGET_GAP})
    else:
        rows.append({"target": name, "value": "not measured (no SFT student)", "met": False})
    for k, t in enumerate(teachers):
        r = irs_ratio(t["irs"]["scores"])
        rows.append({"target": f"teacher {k} (seed {t['seed']}) IRS max/min >= {TARGET_IRS_RATIO:.0f}", "value": r,
                     "met": r >= TARGET_IRS_RATIO})
    ls = [t["irs"]["best_layer"] for t in teachers]
    rows.append({"target": "same l* (or neighbouring layers) across teachers",
                 "value": ls if len(ls) > 1 else "not measured (one teacher)", "met": len(ls) > 1 and max(ls) - min(ls) <= 1})
    return rows


def student_line(res: dict[str, Any], rec: dict[str, Any], *, command: str) -> dict[str, Any]:
    """One JSON line of the calibration log for the student ``rec`` (SFT or Vanilla KD) of the calibration ``res``:
    the student's recipe (size, stage-1 and SFT steps, learning rate and schedule), its training time and loss
    curve, its exact match, and the gap below the first teacher (``teacher - student`` overall)."""
    s, t0 = res["settings"], res["teachers"][0]
    ev, tr = rec["eval"], rec["train"]
    return dm._jsonable({
        "command": command, "kind": f"{rec['method']}_student", "seed": rec["seed"], "student": s["student"],
        "stage1_steps": s["stage1_steps"], "student_steps": s["student_steps"], "student_lr": s["student_lr"],
        "student_stable": s.get("student_stable", 0.0),
        "threads": tr.get("threads"), "train_s": round(tr["wall_s"], 1), "step_s": round(tr["step_time_s"], 4),
        "loss": [round(h["loss"], 4) for h in tr["log"]],
        "em": {k: round(v, 3) for k, v in ev["exact_match"].items()}, "overall": round(ev["overall"], 3),
        "short_overall": round(ev["short_overall"], 3) if "short_overall" in ev else None,
        "teacher_seed": t0["seed"], "teacher_overall": round(t0["eval"]["overall"], 3),
        "gap": round(t0["eval"]["overall"] - ev["overall"], 3)})


def calibrate(settings: dm.DemoSettings, run_dir: Path, *, teacher_seeds: list[int], student_seeds: list[int],
              progress: bool = False, log=print, command: str = "", jsonl: Path | None = None,
              kd_seeds: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
    """Run the calibration (module docstring); returns every number (also written to ``run_dir/calibration.json``).
    ``kd_seeds``: also a Vanilla KD student per seed (same recipe as the SFT students, the first teacher):
    whether the student still leaves a gap after KD. ``jsonl``: append one :func:`student_line` per
    student trained here (not for cached ones)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    settings = dataclasses.replace(settings, teacher_seed=teacher_seeds[0])
    demo = dm.Demo(settings, run_dir, progress=progress, log=log)
    res = demo.results
    res["machine_start"] = dm.machine_info()
    res["command"] = command
    demo.prepare()
    log(f"task: {res['task']}")
    if settings.vision_pretrain_steps:
        demo.vision_tower()
        log(f"vision tower: {res['vision']}")
    out_json = demo.dir / "calibration.json"

    def save() -> None:  # after every stage: a killed calibration leaves what it measured
        res["targets"] = check_targets(res)
        res["wall_s"] = time.perf_counter() - t_start
        res["machine_end"] = dm.machine_info()
        out_json.write_text(json.dumps(dm._jsonable(res), indent=1))

    def teacher_record(seed: int) -> tuple[Any, dict[str, Any]]:
        teacher = demo.teacher_model(seed)
        train = res.pop("teacher_train")
        cached = demo.dir / f"teacher_eval_seed{seed}.json"
        # reused only for this very teacher on this evaluation split (a teacher trained again, e.g. with other
        # steps in a copied run dir, is evaluated again: its record names the checkpoint it measured)
        key = dm.cache_key([teacher.study_cache_key, settings.n_eval, settings.n_irs])
        rec = json.loads(cached.read_text()) if cached.exists() else None
        if rec is not None and rec.get("cache_key") == key:
            return teacher, rec
        if rec is not None:
            log(f"{cached} holds the evaluation of another teacher: evaluated again")
        t0 = time.perf_counter()
        ev = demo.evaluate(teacher, None)
        curve = demo.irs(teacher)
        rec = dm._jsonable({"seed": seed, "eval": ev, "train": train, "irs": {
            "scores": [float(x) for x in curve.scores.tolist()], "best_layer": int(curve.best_layer),
            "num_pairs": curve.num_pairs}, "eval_wall_s": time.perf_counter() - t0, "cache_key": key})
        cached.write_text(json.dumps(rec, indent=1))
        return teacher, rec

    res["teachers"], res["sft"], res["kd"] = [], [], []
    first, rec = teacher_record(teacher_seeds[0])
    res["teachers"].append(rec)
    log(f"teacher seed {rec['seed']}: {rec['eval']['exact_match']} IRS {rec['irs']['scores']}")
    save()
    demo.stage1_student(first)
    stage1 = demo.load_stage1()
    res["stage1"] = demo.evaluate(stage1, first)
    del stage1
    for method, seeds in (("sft", student_seeds), ("kd", kd_seeds)):  # kd: Vanilla KD from the first teacher
        for seed in seeds:
            out = demo.dir / "runs" / f"{method}_seed{seed}.json"
            # reused only if trained with this recipe from this stage-1 checkpoint (and, for KD, this teacher)
            key = dm.cache_key({"stage1": demo.stage1_key, "method": method, "seed": seed,
                                "steps": settings.student_steps, "lr": settings.student_lr,
                                "teacher": getattr(first, "study_cache_key", None) if method == "kd" else None,
                                **dm.student_schedule_key(settings)})
            rec = json.loads(out.read_text()) if out.exists() else None
            if rec is not None and rec.get("cache_key") != key:
                log(f"{out} holds a student of another recipe: trained again")
                rec = None
            if rec is None:
                log(f"{method.upper()} student seed {seed} ({settings.student_steps} steps)")
                model = demo.load_stage1()
                torch.manual_seed(seed)
                tr = demo.fit(model, demo.train, steps=settings.student_steps, lr=settings.student_lr, seed=seed,
                              method=method, teacher=first if method == "kd" else None, tag=f"{method}_{seed}",
                              stable=settings.student_stable, batch=demo.student_batch)
                rec = dm._jsonable({"key": method, "seed": seed, "method": method, "overrides": {}, "train": tr,
                                    "eval": demo.evaluate(model, first), "cache_key": key})
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rec, indent=1))
                if jsonl is not None:
                    jsonl.parent.mkdir(parents=True, exist_ok=True)
                    with jsonl.open("a") as f:
                        f.write(json.dumps(student_line(res, rec, command=command)) + "\n")
            res[method].append(rec)
            log(f"{method.upper()} seed {seed}: overall {rec['eval']['overall']:.3f} {rec['eval']['exact_match']}")
            save()
    for seed in teacher_seeds[1:]:  # replicate teachers: IRS stability
        teacher, rec = teacher_record(seed)
        del teacher
        res["teachers"].append(rec)
        log(f"teacher seed {seed}: {rec['eval']['exact_match']} IRS {rec['irs']['scores']}")
        save()
    return res


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


#: answer / question format options of the task, as the calibration page names them when set
_FORMAT_FLAGS = (
    ("grounded_answers", "short answers restate their key first ('r2c3 red')"),
    ("aligned_questions", "shape questions in the colour question's layout ('what shape is the object at r2c3 ?')"),
    ("object_tokens", "position and existence questions name the object with one token ('red_circle')"),
    ("exist_cells", "existence answers name the object's cell or none first ('r2c3 yes', 'none no')"),
    ("describe_cells", "describe walks every cell ('r1c1 red circle , r1c2 none , ...')"),
    ("question_first", "the question before the image"),  # "both": "... and after it"
)


def calibration_markdown(res: dict[str, Any], *, command: str) -> str:
    """The calibration page: setting, vision tower, teachers, SFT students, targets."""
    s, task = res["settings"], res["task"]
    types = task["question_types"]
    ms = res.get("machine_start", {})
    md = [f"# Calibration: the `{task['name']}` task", "",
          f"Command: `{command}`. Wall time {res['wall_s'] / 60:.1f} min on {ms.get('cpu_count')} CPU(s), torch "
          f"{ms.get('torch')} with {ms.get('torch_threads')} thread(s), load average at start "
          f"{dm._fmt_load(ms)} (a shared machine). Every number is in `calibration.json` of the run dir.", "",
          "## Setting", "",
          f"* Task `{task['name']}`: {s['grid']}x{s['grid']} grid, {s['image_size']} px, patch {s['patch_size']} -> "
          f"{task['visual_tokens']} visual tokens; {s['n_train']} training samples, {s['n_captions']} captions "
          f"(stage 1), {task['test_eval']} held-out test samples; question types {', '.join(types)} (short: "
          f"{', '.join(task['short_types'])}); answers {task['answer_tokens_mean']:.1f} tokens on average, "
          f"'{task['long_type']}' {task['describe_tokens_mean']:.1f}, max {task['answer_tokens_max']}; positions "
          + ("one token ('r2c3')" if s.get("compact_positions") else "in words ('row two column three')")
          + "".join(f"; {text}" + (" and after it" if s.get(flag) == "both" else "")
                    for flag, text in _FORMAT_FLAGS if s.get(flag))
          + "; training question weights "
          + (", ".join(f"{t} {w:g}" for t, w in zip(types, s["question_weights"])) if s.get("question_weights")
             else "uniform") + " (test split uniform).",
          f"* Teacher: hidden {s['teacher']['hidden']}, {s['teacher']['layers']} layers; "
          + (f"first {s['teacher_first_steps']} steps on the {', '.join(s['teacher_first_types'])} samples only, "
             "then " if s.get("teacher_first_steps") else "")
          + f"SFT {s['teacher_steps']} steps, batch {s['batch_size']}, lr {s['teacher_lr']}.",
          f"* Student: hidden {s['student']['hidden']}, {s['student']['layers']} layers; stage 1 {s['stage1_steps']} "
          f"steps on {dm.stage1_words(s)}; SFT {s['student_steps']} steps, batch "
          f"{dm.student_batch(s)}, lr {s['student_lr']}, "
          f"{dm._schedule_words(s.get('student_stable', 0.0))}.", ""]
    v = res.get("vision")
    if v:
        md += ["## Vision tower (stand-in for a pretrained SigLIP)", "",
               f"SigLIP {s['vision_hidden']}-d x {s['vision_layers']} layers, pre-trained {v['steps']} steps on "
               f"{v['images']} task images (per-cell attribute classification"
               + (", plus each patch's cell index" if v.get("position_head") else "")
               + (f"; each batch shifted by a random offset of up to ±{v['shift']} px" if v.get("shift") else "")
               + f"), then frozen for teacher and students "
               f"(loss {v['loss_first']:.3f} -> {v['loss_last']:.3f}). Linear probe per cell on the frozen features, "
               f"{v['probe_test_images']} held-out images:", "",
               "| tower | " + " | ".join(f"probe {k} %" for k in v["probe"]) + " | position probe % | image-signal fraction |",
               "|---|" + "---|" * (len(v["probe"]) + 2),
               "| random (before) | " + " | ".join(_pct(v["random_probe"][k]) for k in v["probe"])
               + f" | {_pct(v['random_position_probe']) if 'random_position_probe' in v else 'n/a'}"
               + f" | {v['random_signal_fraction']:.3f} |",
               "| pre-trained (used) | " + " | ".join(_pct(v["probe"][k]) for k in v["probe"])
               + f" | {_pct(v['position_probe']) if 'position_probe' in v else 'n/a'} | {v['signal_fraction']:.3f} |", "",
               "Position probe: a fresh linear probe naming, from each patch's own feature, the grid cell holding the "
               "patch. Image-signal fraction: the standard deviation across images of the features the projector reads "
               "over their RMS (near 0: a component common to all images dominates).", ""]
    md += ["## Teachers and SFT students (exact match %, held-out)", "",
           "| model | overall | short pooled | " + " | ".join(types) + " | POPE acc | IRS per layer | l* | max/min |",
           "|---|---|---|" + "---|" * len(types) + "---|---|---|---|"]
    for t in res["teachers"]:
        ev = t["eval"]
        pope = ev.get("pope", {})
        md.append(f"| teacher seed {t['seed']} | {_pct(ev['overall'])} | {_pct(ev.get('short_overall', float('nan')))} | "
                  + " | ".join(_pct(ev["exact_match"][k]) if k in ev["exact_match"] else "n/a" for k in types)
                  + f" | {_pct(pope['accuracy']) if pope else 'n/a'} | "
                  + ", ".join(f"{x:.4f}" for x in t["irs"]["scores"])
                  + f" | {t['irs']['best_layer']} | {irs_ratio(t['irs']['scores']):.2f} |")
    students = ([("student stage 1", res["stage1"])] if "stage1" in res else []) + [
        (f"SFT student seed {r['seed']}", r["eval"]) for r in res["sft"]] + [
        (f"Vanilla KD student seed {r['seed']}", r["eval"]) for r in res.get("kd", [])]
    for label, ev in students:
        pope = ev.get("pope", {})
        md.append(f"| {label} | {_pct(ev['overall'])} | {_pct(ev.get('short_overall', float('nan')))} | "
                  + " | ".join(_pct(ev["exact_match"][k]) if k in ev["exact_match"] else "n/a" for k in types)
                  + f" | {_pct(pope['accuracy']) if pope else 'n/a'} | — | — | — |")
    splits = res["teachers"][0]["eval"].get("pope_by_split")
    if splits:
        md += ["", "POPE per split (first teacher): " + "; ".join(
            f"{k}: acc {_pct(p['accuracy'])}, F1 {_pct(p['f1'])}, yes-rate {_pct(p['yes_rate'])} (n={p['n']})"
            for k, p in splits.items()) + "."]
    if res.get("kd"):  # not a target of the list: whether KD leaves room below the teacher
        t_all = res["teachers"][0]["eval"]["overall"]
        md += ["", "Gap left after Vanilla KD (first teacher - KD student, overall EM): " + ", ".join(
            f"seed {r['seed']}: {100 * (t_all - r['eval']['overall']):.1f} points" for r in res["kd"]) + "."]
    md += ["", "## Targets (issue 15)", "", "| target | measured | met |", "|---|---|---|"]
    for r in res["targets"]:
        val = r["value"]
        shown = (f"{val:.2f}" if "max/min" in r["target"] else _pct(val)) if isinstance(val, float) else str(val)
        md.append(f"| {r['target']} | {shown} | {'yes' if r['met'] else '**no**'} |")
    md += ["", "Teacher SFT wall time (cached checkpoints are not retrained; the wall time above is this process's): "
           + ", ".join(f"seed {t['seed']}: {t['train']['wall_s'] / 60:.1f} min" for t in res["teachers"]) + "."]
    md += ["", "Teacher training loss (logged): " + ", ".join(
        f"seed {t['seed']}: " + " -> ".join(f"{h['loss']:.3f}" if isinstance(h['loss'], float) else str(h['loss'])
                                      for h in t["train"]["log"]) for t in res["teachers"]) + "."]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(dm.TASK_SETTINGS), required=True)
    p.add_argument("--preset", default="quick", choices=sorted(dm.PRESETS))
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a DemoSettings field")
    p.add_argument("--teacher-size", type=int, nargs=2, default=None, metavar=("HIDDEN", "LAYERS"))
    p.add_argument("--student-size", type=int, nargs=2, default=None, metavar=("HIDDEN", "LAYERS"))
    p.add_argument("--student-heads", type=int, nargs=2, default=None, metavar=("HEADS", "KV_HEADS"),
                   help="attention heads of the student (default: the setting's, 4 and 2)")
    p.add_argument("--teacher-seeds", type=int, nargs="+", default=[1000, 1001])
    p.add_argument("--student-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--kd-seeds", type=int, nargs="*", default=[],
                   help="also a Vanilla KD student per seed (the SFT students' recipe): the gap left after KD")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/calibration/<task>")
    p.add_argument("--page", type=Path, default=None, help="write the Markdown page here (default: run dir)")
    p.add_argument("--page-only", action="store_true", help="train nothing: write the page of the saved calibration.json")
    p.add_argument("--jsonl", type=Path, default=None,
                   help="append one JSON line per student trained (recipe, time, exact match, gap) to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    settings = dm.task_settings(a.task, a.preset)
    settings = dataclasses.replace(settings, **_parse_set(a.set, settings))
    if a.teacher_size:
        settings = dataclasses.replace(settings, teacher=dm.ModelSize(*a.teacher_size))
    if a.student_size:
        settings = dataclasses.replace(settings, student=dm.ModelSize(*a.student_size))
    if a.student_heads:
        settings = dataclasses.replace(settings, student=dataclasses.replace(settings.student, heads=a.student_heads[0],
                                                                             kv_heads=a.student_heads[1]))
    run_dir = a.run_dir or ROOT / "runs" / "calibration" / a.task
    command = "python examples/study/calibrate.py" + "".join(
        f" {shlex.quote(x)}" for x in (argv if argv is not None else sys.argv[1:]))
    page = a.page or run_dir / "calibration.md"
    if a.page_only:  # the page of what a (killed or running) calibration has saved so far
        res = json.loads((run_dir / "calibration.json").read_text())
    else:
        res = calibrate(settings, run_dir, teacher_seeds=a.teacher_seeds, student_seeds=a.student_seeds, command=command,
                        jsonl=a.jsonl, kd_seeds=a.kd_seeds)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(calibration_markdown(res, command=res.get("command") or command))
    print(f"\n{page}\n")
    for r in res["targets"]:
        print(f"{'MET ' if r['met'] else 'MISS'} {r['target']}: {r['value']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
