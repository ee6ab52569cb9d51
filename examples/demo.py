"""`make demo`: Align-TI end to end on the study's synthetic visual-QA tasks, through the reference trainer.

data (seeded task, LLaVA JSON + PNG) -> vision tower pre-training (frozen for everyone) -> teacher
(SFT) -> students (SFT, Vanilla KD, Align-TI and ablations, all from one shared stage-1 checkpoint
with the same budget) -> evaluation (exact match per question type, POPE-style yes/no, held-out
KL, %ExAccErr, attention heat maps) -> Markdown pages, PNG plots and a JSON of every number.

    python examples/demo.py            # --quick (default): the digits task (its teacher is calibrated); the
                                       #   main comparison SFT / Vanilla KD / Align-TI (the runs Tables 3
                                       #   and 5 share), Table 4, Fig. 4/6/7 on those runs; 3 seeds
    python examples/demo.py --full     # scenes and digits, 5 seeds: every experiment (Tables 3-8, 14,
                                       #   18, Fig. 4-7, the end-of-turn TPA row) on scenes, all but the
                                       #   TPA sweeps (Table 14, Fig. 5, end-of-turn row) on digits
    python examples/demo.py --smoke    # tiny everything (CI), on digits
    python examples/demo.py --task shapes           # the earlier study (shapes task, no pre-trained tower)
    python examples/demo.py --estimate docs/results/costs-digits.json [--set student_steps=1400]
                                       # print the expected time from measured step times; train nothing
                                       #   (--full: also docs/results/calibration-scenes.json)

Resumable per experiment: the vision tower, the teacher, the stage-1 student, every timing row
and every student run (configuration, seed) are cached in ``--run-dir`` (default
``runs/demo/<preset>[-<tasks>]``) under a hash of the settings that affect them, so the same
command after a kill continues where it stopped (finished runs are not retrained), and a changed
setting never reuses a stale result. Progress: one line per finished unit (a bar on a terminal)
with the expected remaining time of the stage and of the study, on stderr.

Every step runs with the preset's torch thread count (1), whatever the machine has: on CPU
the same seed gives bit-identical weights only at the same thread count (see the trainer
guide's "Determinism on CPU"), so a run here repeats any other run of the same preset.
``--threads N`` trades that for speed on an idle machine (the count is recorded in the
results and is part of every cache key). ``--workers N`` (default: the idle cores, at most 2)
uses several cores without changing any result: once the teacher, the stage-1 student and the
timing pass (alone: its rows are step times) are done, the student runs go to N worker
processes, each at the preset's thread count, so every number equals the serial run's
(``--workers 1``) bit for bit.

Outputs: the report in ``<run dir>/report`` and, for quick/full runs, copied to ``docs/results/``
(``--no-docs`` to skip): the study's tasks to ``study-<preset>.md`` (+ one page per task), the
earlier shapes study to ``demo-<preset>.md``.
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

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["shapes", "scenes", "digits"]
#: the tasks each preset runs by default
DEFAULT_TASKS = {"smoke": ["digits"], "quick": ["digits"], "full": ["scenes", "digits"]}


#: one evaluation's seconds for an estimate from a study's results.json, which does not record it (the
#: calibrations' teacher evaluations on 300 test samples: 2.8-4 s)
_RESULTS_EVAL_S = 4.0


def _measured_costs(path: Path) -> tuple[str, dict[str, Any]]:
    """(task, measured costs) of one ``--estimate`` file: a study's ``results.json`` (step times of its
    teacher, SFT runs and timing pass: :func:`demo_study.costs_from_results`, one evaluation taken as
    :data:`_RESULTS_EVAL_S`), a calibration JSON (``calibrate.py``'s; its
    ``settings.task`` names the task; step times of ``training_step`` only), or a costs JSON (``task``,
    ``vision_s``, ``teacher_step_s``, ``student_step_s``, ``eval_s``, optionally ``ratio``: each method's
    step time / SFT's; e.g. ``docs/results/costs-digits.json``, each number with its source)."""
    cal = json.loads(path.read_text())
    if "runs" in cal and "timing" in cal:  # a study's results.json: eval_s is not recorded there
        from demo_study import costs_from_results

        costs = costs_from_results(cal, eval_s=_RESULTS_EVAL_S)
        return costs.pop("task"), costs
    if "teachers" in cal:
        teacher, sft = cal["teachers"][0], cal["sft"][0]
        return cal["settings"]["task"], {
            "vision_s": float(cal.get("vision", {}).get("wall_s", 0.0)),
            "vision_steps": cal["settings"].get("vision_pretrain_steps") or None,
            "teacher_step_s": float(teacher["train"]["step_time_s"]),
            "student_step_s": float(sft["train"]["step_time_s"]), "eval_s": float(teacher["eval_wall_s"])}
    need = ("task", "vision_s", "teacher_step_s", "student_step_s", "eval_s")
    if not all(k in cal for k in need):
        raise ValueError(f"--estimate takes a calibration JSON (with 'teachers') or a costs JSON with {list(need)}; "
                         f"{path} has keys {sorted(cal)}")
    return cal["task"], {k: cal[k] for k in (*need[1:], "ratio", "vision_steps") if k in cal}


def _estimate(paths: list[Path], settings_by_task: dict, ratios: Path | None, workers: int = 1) -> str:
    """The expected wall time of the study from the step times measured for each task (``--estimate``
    files: :func:`_measured_costs`), the student runs in ``workers`` worker processes."""
    from demo_study import estimate_study_s, timing_ratios

    measured_by_task = {}
    for path in paths:
        task, measured = _measured_costs(path)
        measured_by_task[task] = (path, measured)
    missing = [t for t in settings_by_task if t not in measured_by_task]
    if missing:
        raise ValueError(f"--estimate needs a calibration or costs JSON of every task; none for {missing} "
                         f"(got {sorted(measured_by_task)})")
    ratio: dict[str, float] = {}
    if ratios is not None:
        timing = json.loads(ratios.read_text())["timing"]
        ratio = timing_ratios(timing)
    lines = ["ESTIMATE (not a measurement): each task's steps times the step times measured for it, "
             + (f"each method's step time / SFT's from its costs file or else the timing pass of {ratios}" if ratios
                else "each method's step time / SFT's from its costs file or else as SFT")
             + f"; the student runs in {workers} worker(s), each on a free core; trainer and worker start-up, "
               "writing the data and the IRS pass not counted"]
    total = 0.0
    for task, s in settings_by_task.items():
        path, measured = measured_by_task[task]
        est = estimate_study_s(s, {**measured, "ratio": measured.get("ratio", ratio)}, workers=workers)
        total += est["total"]
        lines.append(f"  {task} ({path}: teacher step {measured['teacher_step_s']:.3f} s, student step "
                     f"{measured['student_step_s']:.3f} s, one evaluation {measured['eval_s']:.0f} s): "
                     + ", ".join(f"{k} {v / 60:.1f} min" for k, v in est.items()))
    lines.append(f"  all tasks: {total / 60:.1f} min")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the default: the digits task, main comparison, 3 seeds")
    g.add_argument("--full", action="store_true", help="scenes and digits, 5 seeds: every experiment on scenes, all but "
                   "Table 14, Fig. 5 and the end-of-turn row on digits")
    g.add_argument("--smoke", action="store_true", help="tiny everything, seconds (CI)")
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/demo/<preset>[-<tasks>]")
    p.add_argument("--docs-dir", type=Path, default=ROOT / "docs" / "results", help="where tables/plots/JSON are copied")
    p.add_argument("--no-docs", action="store_true", help="do not write into docs/results")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's student seeds")
    p.add_argument("--experiments", nargs="+", default=None,
                   help="override the preset's experiments (table5 table3 table6 table7 table8 table14 table18 "
                        "fig4 fig5 fig6 fig7 table4 eot)")
    p.add_argument("--task", nargs="+", default=None, choices=TASKS,
                   help="scenes / digits (examples/study/tasks.py) or shapes (the earlier study); "
                        "default: digits (quick, smoke), scenes digits (full)")
    p.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                   help="override scalar fields of the task's settings (as calibrate.py --set), e.g. "
                        "--set student_steps=1400; part of every cache key they affect")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the preset's, 1); results repeat bit for bit only at the same count")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes for the student runs (default: the idle cores, at most 2; --smoke: 1; "
                        "with --estimate: 2); 1: all in this process; results are the same bit for bit")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument("--only", nargs="+", default=None, metavar="KEY",
                   help="train only these student configurations (e.g. rkl jsd gkd iva@last tpa@d8)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing new: report the runs already saved in the run dir (a partial run)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N newly trained student runs (then run the same command again to resume)")
    p.add_argument("--estimate", type=Path, nargs="+", default=None, metavar="COSTS_JSON",
                   help="print the expected wall time from the step times measured for each task: a study's "
                        "results.json (docs/results/study/full/<task>/results.json), a calibration JSON "
                        "(docs/results/calibration-<task>.json) or a costs JSON (docs/results/costs-digits.json); "
                        "train nothing")
    p.add_argument("--ratios", type=Path, default=ROOT / "docs" / "results" / "study" / "full" / "scenes" / "results.json",
                   help="with --estimate: a results.json whose timing pass gives each method's step time / SFT's")
    a = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "examples" / "study"))
    from demo_study import (
        StudyStopped,
        StudyUnitFailed,
        default_workers,
        run_study,
        summary_markdown,
        task_settings,
        write_report,
        write_study_report,
    )

    preset = "full" if a.full else "smoke" if a.smoke else "quick"
    tasks = a.task or DEFAULT_TASKS[preset]
    if len(set(tasks)) != len(tasks):
        p.error(f"--task lists a task twice: {tasks}")
    if "shapes" in tasks and len(tasks) > 1:
        p.error("--task shapes (the earlier study) runs alone")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.workers is not None and a.workers < 1:
        p.error(f"--workers must be >= 1, got {a.workers}")
    if a.stop_after is not None and a.stop_after < 1:
        p.error(f"--stop-after must be >= 1, got {a.stop_after}")

    from calibrate import _parse_set

    def adjust(settings):
        settings = dataclasses.replace(settings, **_parse_set(a.set, settings))
        if a.seeds:
            settings = dataclasses.replace(settings, seeds=tuple(a.seeds))
        if a.experiments:
            settings = dataclasses.replace(settings, experiments=tuple(a.experiments))
        if a.threads is not None:
            settings = dataclasses.replace(settings, threads=a.threads)
        return settings

    try:
        adjust(task_settings(tasks[0], preset))  # a bad --set fails here, before anything runs
    except ValueError as e:
        p.error(str(e))
    if a.estimate is not None:
        try:
            print(_estimate(a.estimate, {t: adjust(task_settings(t, preset)) for t in tasks}, a.ratios,
                            workers=a.workers or 2))
        except ValueError as e:
            p.error(str(e))
        return 0
    name = preset if tasks == ["shapes"] else f"{preset}-{'-'.join(tasks)}"
    run_dir = a.run_dir or ROOT / "runs" / "demo" / name
    command = "python examples/demo.py" + ("".join(f" {shlex.quote(x)}" for x in (argv if argv is not None else sys.argv[1:])))
    t0 = time.perf_counter()
    # --smoke: 1 by default, since a worker's start-up (importing torch and the trainer, ~10 s) outweighs
    # the few seconds of its student runs
    workers = a.workers if a.workers is not None else 1 if preset == "smoke" else default_workers()
    print(f"tokinteract demo ({preset}, tasks {' '.join(tasks)}, {workers} worker(s)): run dir {run_dir}", flush=True)
    try:
        # the tasks' measured costs (docs/results/costs-<task>.json): expected times from the first progress line
        costs = {t: json.loads(f.read_text()) for t in tasks
                 if preset != "smoke" and (f := ROOT / "docs" / "results" / f"costs-{t}.json").exists()}
        results = run_study(tasks, preset, run_dir, adjust=adjust, costs_by_task=costs, progress=not a.no_progress,
                            skip_missing=a.report_only, only_keys=a.only, stop_after=a.stop_after,
                            workers=workers)
    except StudyStopped as e:
        print(f"\n{e} (after {(time.perf_counter() - t0) / 60:.1f} min)")
        return 3
    except StudyUnitFailed as e:
        print(f"\nthe study failed: {e}", file=sys.stderr)
        return 1
    if tasks == ["shapes"]:  # the earlier study: its own pages
        res = results["shapes"]
        page = write_report(res, run_dir / "report", command=command, title=f"Demo results ({name})")
        if not a.no_docs and preset != "smoke":
            write_report(res, a.docs_dir / preset, command=command, page=a.docs_dir / f"demo-{preset}.md",
                         title=f"Demo results ({preset}, earlier study: shapes task)")
            print(f"copied to {a.docs_dir / f'demo-{preset}.md'} and {a.docs_dir / preset}/")
    else:
        page = write_study_report(results, run_dir / "report", command=command, title=f"Study results ({name})")
        if not a.no_docs and preset != "smoke":
            docs_page = write_study_report(results, a.docs_dir / "study" / preset, command=command,
                                           page=a.docs_dir / f"study-{preset}.md", title=f"Study results ({preset})")
            print(f"copied to {docs_page} (+ one page per task) and {a.docs_dir / 'study' / preset}/")
    print(f"\nreport: {page}")
    for task, res in results.items():
        print(f"\n{task}:\n" + summary_markdown(res))
    print(f"\ntotal wall time {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
