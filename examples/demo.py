"""`make demo`: Align-TI end to end on a synthetic visual-QA task, through the reference trainer.

data (seeded shapes task, LLaVA JSON + PNG) -> teacher (SFT) -> students (SFT, Vanilla KD,
Align-TI and ablations, all from one shared stage-1 checkpoint with the same budget) ->
evaluation (exact match per question type, POPE-style yes/no, held-out KL, %ExAccErr) ->
Markdown tables, PNG plots and a JSON of every number.

    python examples/demo.py            # --quick (default): Tables 5/6, Fig. 4/6, Table 4; 3 seeds
                                       #   (3.5 min measured with --threads 2 on 2 idle CPU cores, 15 min under load)
    python examples/demo.py --full     # every experiment, 5 seeds (measured: ~25 min wall, 3 processes
                                       #   sharing 2 busy cores; see docs/results/demo-full.md)
    python examples/demo.py --smoke    # seconds; what CI runs
    python examples/demo.py --task scenes   # the study's tasks (issue 15): scenes or digits, with a
                                            #   pre-trained frozen vision tower; not calibrated yet
                                            #   (examples/study/calibrate.py), so not the default

Every step runs with the preset's torch thread count (1), whatever the machine has: on CPU
the same seed gives bit-identical weights only at the same thread count (see the trainer
guide's "Determinism on CPU"), so a run here repeats any other run of the same preset.
``--threads N`` trades that for speed on an idle machine (the count is recorded in the
results); on cores busy with other work more threads thrash (two threads per process on a
shared core: steps ~90x slower, measured).

Outputs go to ``--run-dir`` (default ``runs/demo/<preset>``; the teacher and the stage-1
student are cached there and reused, so an interrupted run resumes) and the tables, plots
and JSON are copied to ``docs/results/`` (``--no-docs`` to skip).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the default: Tables 5/6, Fig. 4/6, Table 4, 3 seeds")
    g.add_argument("--full", action="store_true", help="every experiment, 5 seeds")
    g.add_argument("--smoke", action="store_true", help="tiny everything, seconds (CI)")
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/demo/<preset>")
    p.add_argument("--docs-dir", type=Path, default=ROOT / "docs" / "results", help="where tables/plots/JSON are copied")
    p.add_argument("--no-docs", action="store_true", help="do not write into docs/results")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's student seeds")
    p.add_argument("--experiments", nargs="+", default=None,
                   help="override the preset's experiments (table5 table3 table6 table7 table8 fig4 fig5 fig6 table4)")
    p.add_argument("--task", default="shapes", choices=["shapes", "scenes", "digits"],
                   help="shapes (default: the earlier study); scenes / digits: examples/study/tasks.py (issue 15)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the preset's, 1); results repeat bit for bit only at the same count")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--only", nargs="+", default=None, metavar="KEY",
                   help="train only these student configurations (e.g. rkl jsd gkd iva@last tpa@d8)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing new: report the runs already saved in the run dir (a partial run)")
    a = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "examples" / "study"))
    from demo_study import run_demo, summary_markdown, task_settings, write_report

    preset = "full" if a.full else "smoke" if a.smoke else "quick"
    settings = task_settings(a.task, preset)
    if a.seeds:
        settings = dataclasses.replace(settings, seeds=tuple(a.seeds))
    if a.experiments:
        settings = dataclasses.replace(settings, experiments=tuple(a.experiments))
    if a.threads is not None:
        if a.threads < 1:
            p.error(f"--threads must be >= 1, got {a.threads}")
        settings = dataclasses.replace(settings, threads=a.threads)
    name = preset if a.task == "shapes" else f"{preset}-{a.task}"
    run_dir = a.run_dir or ROOT / "runs" / "demo" / name
    command = "python examples/demo.py" + ("".join(f" {shlex.quote(x)}" for x in (argv if argv is not None else sys.argv[1:])))
    t0 = time.perf_counter()
    print(f"tokinteract demo ({preset}): run dir {run_dir}", flush=True)
    if len(settings.seeds) == 1 and preset != "smoke":
        print("note: one student seed only (3 seeds do not fit the quick budget); use --full for mean ± std", flush=True)
    res = run_demo(settings, run_dir, progress=not a.no_progress, skip_missing=a.report_only,
                   only_keys=a.only)
    page = write_report(res, run_dir / "report", command=command, title=f"Demo results ({name})")
    print(f"\nreport: {page}")
    if not a.no_docs and preset != "smoke" and a.task == "shapes":  # uncalibrated tasks stay out of the docs
        page = write_report(res, a.docs_dir / preset, command=command, page=a.docs_dir / f"demo-{preset}.md",
                            title=f"Demo results ({preset})")
        print(f"copied to {page} and {a.docs_dir / preset}/")
    print("\n" + summary_markdown(res))
    print(f"\ntotal wall time {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
