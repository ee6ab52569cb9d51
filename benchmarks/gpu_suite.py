"""Everything that needs a GPU, in one run of at most 8 minutes: ``gpu_suite.py OUTDIR``.

A GPU is lent only now and then, for minutes; this script is what to run the moment one is.
Each step is a separate process with its own time box (``--budget-s`` in all, 470 s by default,
so a step that hangs or fails costs its own box and nothing else), in this order:

===================  ==========================================================================
step                 what it runs
===================  ==========================================================================
tests_gpu            ``pytest -m gpu``: the FlexAttention forward + backward test (skipped on CPU)
tests_bf16           ``pytest -k "bf16 or bfloat16"``: the bf16 tests
losses_8192          ``bench_losses.py`` naive vs fused (Align-TI and Vanilla KD) at 8,192 rows x
                     151,936 in bf16: the ratio that does not fit in CPU memory
step_<s>_<t>_<attn>  ``bench_step.py`` in bf16, Qwen2-<s>-shaped student against a Qwen2-<t>-shaped
                     teacher, ``attn`` = ``sdpa`` (dense ribbon mask) or ``flex`` (the ribbon
                     ``BlockMask`` in the packed passes), for (0.5b, 1.5b), (0.5b, 7b), (1.5b, 7b)
syncs                ``bench_step.py --count-syncs``: device->host synchronisations per step
losses_peers         ``bench_losses.py --peers``: ours vs TRL's chunked loss vs Liger's fused-linear JSD
                     (compiled), bf16, 2,048 and 8,192 rows
===================  ==========================================================================

Writes into OUTDIR: each benchmark's own CSV + Markdown (``<step>.csv`` / ``<step>.md``), each
step's log (``logs/<step>.log``), and the suite's ``suite.csv`` + ``SUMMARY.md`` (one row per
step: status ``ok`` / ``failed`` / ``timeout`` / ``skipped``, seconds, return code, outputs),
rewritten after every step so an interrupted run keeps what it measured.

``--dry-run`` runs every step at toy sizes on CPU (CI's check that the suite works; its numbers
mean nothing): the flex steps then run with ``sdpa`` (FlexAttention has no CPU backward), the
peers with Liger eager, and the sync counts are ``n/a``. To fit CI's minute, the dry run forks
each step from a process that has already imported torch and transformers (the same command
line, run by ``runpy`` / ``pytest.main``; same time box, same process-group kill) instead of
starting a fresh interpreter; the GPU run starts a fresh one per step (CUDA and fork do not mix).

    .venv/bin/python benchmarks/gpu_suite.py results/gpu            # on a machine with a GPU
    .venv/bin/python benchmarks/gpu_suite.py /tmp/suite --dry-run   # CPU, toy sizes
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SUITE_FIELDS = ["step", "status", "seconds", "returncode", "timeout_s", "outputs", "note"]

MIN_STEP_S = 10.0  # a step is started only with at least this much of the budget left

# (student, teacher) shape pairs of the step benchmark
PAIRS = (("0.5b", "1.5b"), ("0.5b", "7b"), ("1.5b", "7b"))


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    outputs: list[str] = field(default_factory=list)  # files the step must write into OUTDIR
    note: str = ""


def _losses(out: Path, name: str, dry: bool, extra: list[str]) -> list[str]:
    sizes = (["--positions", "64", "--vocab", "512", "--hidden", "16", "--teacher-hidden", "16", "--repeats", "1"]
             if dry else ["--device", "cuda", "--dtype", "bf16", "--hidden", "896", "--teacher-hidden", "1536",
                          "--repeats", "3"])
    return [sys.executable, str(HERE / "bench_losses.py"), *sizes, *extra, "--name", str(out / name)]


def _step(out: Path, name: str, dry: bool, extra: list[str]) -> list[str]:
    sizes = (["--quick", "--vocab", "512", "--visual", "16", "--instruction", "8", "--response", "8", "--batch", "1",
              "--rounds", "1", "--threads", "1"]
             if dry else ["--device", "cuda", "--dtype", "bf16", "--rounds", "2"])
    return [sys.executable, str(HERE / "bench_step.py"), *sizes, *extra, "--name", str(out / name)]


def steps(out: Path, dry: bool) -> list[Step]:
    """The suite, in order of priority (the budget runs out at the end, not the beginning)."""
    py = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    s = [
        Step("tests_gpu", [*py, "-m", "gpu", "tests/hf/test_hf_packed.py" if dry else "tests"], 90),
        Step("tests_bf16", [*py, "-k", "bf16 or bfloat16", "tests/test_chunked.py" if dry else "tests"], 120),
        Step("losses_8192", _losses(out, "losses_8192", dry, [] if dry else ["--positions", "8192"])
             + ["--variants", "naive", "fused"] + ([] if dry else ["naive_kd", "fused_kd"]), 90, ["losses_8192.csv", "losses_8192.md"]),
    ]
    for student, teacher in PAIRS:
        for attn in ("sdpa", "flex"):
            name = f"step_{student}_{teacher}_{attn}"
            variants = ["kd", "iva", "align_ti", "align_ti_packed", "kd_trl"] if attn == "sdpa" else [
                "kd", "tpa_packed", "align_ti_packed"]
            use_flex = attn == "flex" and not dry
            extra = ["--student", student, "--teacher", teacher, "--attn", "flex_attention" if use_flex else "sdpa",
                     "--variants", *variants]
            note = "dry run: sdpa (FlexAttention has no CPU backward)" if attn == "flex" and dry else ""
            s.append(Step(name, _step(out, name, dry, extra), 75, [f"{name}.csv", f"{name}.md"], note))
    s.append(Step("syncs", _step(out, "syncs", dry, ["--count-syncs", "--student", "0.5b", "--teacher", "1.5b",
                                                     "--variants", "kd", "iva", "align_ti", "align_ti_packed",
                                                     "kd_trl"]), 75, ["syncs.csv", "syncs.md"]))
    peers = ["--peers"] + ([] if dry else ["--positions", "2048", "8192", "--liger-compiled"])
    s.append(Step("losses_peers", _losses(out, "losses_peers", dry, peers), 120, ["losses_peers.csv", "losses_peers.md"],
                  "dry run: Liger eager" if dry else ""))
    return s


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))


def _child(argv: list[str], log_fd: int) -> None:
    """In a forked child: run ``argv`` (``python -m pytest ...`` or ``python script ...``) in this process."""
    code = 1
    try:
        os.setsid()  # own process group: the time box kills the step and the workers it starts
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # not the parent's (possibly captured) streams
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(ROOT)
        os.environ.update(_env())
        os.environ["TOKINTERACT_BENCH_FORK_WORKERS"] = "1"  # _common.run_worker: fork, not a fresh interpreter
        # one intra-op thread: a step that runs torch ops and then forks a worker (_common._forked)
        # deadlocks in the worker when the parent's OpenMP pool had threads (libgomp is not fork-safe;
        # seen on a 2-core machine). Dry-run times mean nothing anyway.
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)
        sys.path.insert(0, str(ROOT / "src"))
        if argv[1:3] == ["-m", "pytest"]:
            import pytest

            code = int(pytest.main(argv[3:]))
        else:
            import runpy

            sys.argv = argv[1:]
            sys.path.insert(0, str(Path(argv[1]).parent))
            try:
                runpy.run_path(argv[1], run_name="__main__")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child reports and exits, never returns into the suite
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout_s: float) -> int | None:
    """Exit status of ``pid``, or None after killing its process group at ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    return None


def run_step(st: Step, out: Path, timeout_s: float, fork: bool = False) -> dict:
    """Run one step in its own process group, killed at ``timeout_s``; its row of ``suite.csv``."""
    log = out / "logs" / f"{st.name}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(st.argv) + "\n")
        f.flush()
        if fork:
            pid = os.fork()
            if pid == 0:
                _child(st.argv, f.fileno())
            rc = _wait(pid, timeout_s)
        else:
            proc = subprocess.Popen(st.argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env(),
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the step and the workers it started
                proc.wait()
                rc = None
    status = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
    missing = [o for o in st.outputs if not (out / o).exists()]
    note = st.note
    if status == "ok" and missing:
        status, note = "failed", f"missing outputs: {', '.join(missing)}"
    return dict(step=st.name, status=status, seconds=round(time.perf_counter() - t0, 1), returncode=rc,
                timeout_s=round(timeout_s), outputs=" ".join(st.outputs), note=note)


def write_summary(out: Path, rows: list[dict], header: dict[str, str]) -> None:
    with (out / "suite.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUITE_FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = ["# GPU suite", ""] + [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "| " + " | ".join(SUITE_FIELDS) + " |", "|" + "---|" * len(SUITE_FIELDS)]
    lines += ["| " + " | ".join(str(r[k] if r[k] is not None else "") for k in SUITE_FIELDS) + " |" for r in rows]
    for r in rows:
        md = out / f"{r['step']}.md"
        if md.exists():
            text = md.read_text().strip()
            lines += ["", "---", "", "#" + text if text.startswith("# ") else text]  # a section of the summary
    (out / "SUMMARY.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="every step at toy sizes on CPU")
    ap.add_argument("--budget-s", type=float, default=470.0, help="time for all the steps together (default 470)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these steps (names as in suite.csv)")
    a = ap.parse_args()
    out = a.outdir.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    plan = steps(out, a.dry_run)
    if a.only:
        unknown = sorted(set(a.only) - {s.name for s in plan})
        if unknown:
            raise SystemExit(f"--only: unknown steps {unknown}; known: {[s.name for s in plan]}")
        plan = [s for s in plan if s.name in a.only]
    header = {"mode": "dry run (CPU, toy sizes: the numbers mean nothing)" if a.dry_run else "GPU",
              "command": "python " + " ".join(sys.argv), "budget": f"{a.budget_s:.0f} s",
              "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    if not a.dry_run:
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            gpu = "nvidia-smi not available"
        header["gpu"] = gpu or "none found"
    # imported once here, then forked into every step (see the module docstring); not when the
    # budget cannot start the first step (then it starts none: below, ``left`` only decreases)
    if a.dry_run and a.budget_s >= MIN_STEP_S:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import Trainer, TrainingArguments  # noqa: F401
    t_start = time.perf_counter()
    rows: list[dict] = []
    for st in plan:
        left = a.budget_s - (time.perf_counter() - t_start)
        if left < MIN_STEP_S:
            rows.append(dict(step=st.name, status="skipped", seconds=0, returncode=None, timeout_s=0,
                             outputs=" ".join(st.outputs), note="budget spent"))
        else:
            rows.append(run_step(st, out, min(st.timeout_s, left), fork=a.dry_run))
        r = rows[-1]
        print(f"{r['step']:>22}: {r['status']:<8} {r['seconds']:>6} s  {r['note']}", flush=True)
        header["elapsed"] = f"{time.perf_counter() - t_start:.0f} s"
        write_summary(out, rows, header)
    failed = [r["step"] for r in rows if r["status"] != "ok"]
    print(f"wrote {out / 'suite.csv'} and {out / 'SUMMARY.md'}; not ok: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
