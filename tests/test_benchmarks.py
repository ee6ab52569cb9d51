"""The GPU suite (``benchmarks/gpu_suite.py``): its dry run on CPU, and its time boxes.

The dry run runs every step of the suite at toy sizes; the test checks that it finishes, that
``suite.csv`` has exactly one ``ok`` row per step of the plan, and that every step wrote its
CSV + Markdown with the rows the step promises (the peer variants and the TRL-style step
included: their reference checks run inside the benchmarks, which exit non-zero on a mismatch).
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", BENCH / "gpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
def test_dry_run_writes_one_ok_row_per_step(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), str(out), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    plan = [s.name for s in _suite().steps(out, dry=True)]
    rows = _rows(out / "suite.csv")
    assert [r["step"] for r in rows] == plan, proc.stdout + proc.stderr
    bad = {r["step"]: (r["status"], (out / "logs" / f"{r['step']}.log").read_text()[-1500:])
           for r in rows if r["status"] != "ok"}
    assert not bad, bad
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "SUMMARY.md").read_text()
    assert all(f"| {name} | ok |" in summary for name in plan)
    for st in _suite().steps(out, dry=True):
        for o in st.outputs:
            assert (out / o).stat().st_size > 0, o
    for name in plan:
        if name.startswith("step_"):
            variants = {r["variant"] for r in _rows(out / f"{name}.csv")}
            want = {"kd", "align_ti_packed"} | ({"kd_trl"} if name.endswith("sdpa") and _have("trl") else set())
            assert want <= variants, (name, variants)
            assert all(float(r["time_s"]) > 0 for r in _rows(out / f"{name}.csv"))
    syncs = _rows(out / "syncs.csv")
    assert [r["variant"] for r in syncs][:3] == ["kd", "iva", "align_ti"]
    assert {r["syncs_per_step"] for r in syncs} == {"n/a"}  # CPU: no CUDA syncs to count, never a made-up 0
    peers = {r["variant"]: r for r in _rows(out / "losses_peers.csv")}
    want = {"peer_ours"} | ({"peer_trl"} if _have("trl") else set()) | ({"peer_liger"} if _have("liger_kernel") else set())
    assert set(peers) == want
    assert all(r["baseline"] == "peer_ours" for r in peers.values())
    assert float(peers["peer_ours"]["time_ratio"]) == 1.0
    losses = {(r["variant"], r["baseline"]) for r in _rows(out / "losses_8192.csv")}
    assert ("fused", "naive") in losses


@pytest.mark.parametrize("fork", [False, True])
def test_steps_are_time_boxed_and_failures_recorded(tmp_path, fork):
    suite = _suite()
    (tmp_path / "logs").mkdir()
    py = sys.executable
    sleeper = tmp_path / "sleep.py"
    pid_file = tmp_path / "worker.pid"
    sleeper.write_text("import pathlib, subprocess, sys, time\n"
                       "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                       f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid))\n"
                       "time.sleep(60)\n")
    slow = suite.run_step(suite.Step("slow", [py, str(sleeper)], 60), tmp_path, timeout_s=3, fork=fork)
    assert slow["status"] == "timeout" and slow["returncode"] is None and slow["seconds"] < 20
    worker = Path("/proc") / pid_file.read_text() / "stat"
    deadline = time.monotonic() + 10
    while worker.exists() and worker.read_text().split(") ")[-1][0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.1)  # the kill is asynchronous
    assert not worker.exists() or worker.read_text().split(") ")[-1][0] == "Z"  # the step's worker died with it
    failing = tmp_path / "fail.py"
    failing.write_text("raise SystemExit(3)\n")
    fail = suite.run_step(suite.Step("fail", [py, str(failing)], 60), tmp_path, timeout_s=30, fork=fork)
    assert (fail["status"], fail["returncode"]) == ("failed", 3)
    quiet = tmp_path / "quiet.py"
    quiet.write_text("print('no outputs')\n")
    missing = suite.run_step(suite.Step("quiet", [py, str(quiet)], 60, ["quiet.csv"]), tmp_path, timeout_s=30, fork=fork)
    assert missing["status"] == "failed" and "quiet.csv" in missing["note"]
    assert "no outputs" in (tmp_path / "logs" / "quiet.log").read_text()


def test_budget_skips_the_steps_it_cannot_start(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), str(tmp_path), "--dry-run", "--budget-s", "5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    rows = _rows(tmp_path / "suite.csv")
    assert [r["step"] for r in rows] == [s.name for s in _suite().steps(tmp_path, dry=True)]
    assert {r["status"] for r in rows} == {"skipped"} and proc.returncode == 1


def test_shared_grads_benchmark_runs_at_toy_sizes(tmp_path):
    """bench_shared_grads.py: three variants timed in one run, results written."""
    name = tmp_path / "sg"
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_shared_grads.py"), "--vocab", "512", "--shape", "32,2,4,2,64",
         "--gt", "20", "--positions", "5", "--d", "2", "--rounds", "1", "--plain", "--name", str(name)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _rows(name.with_suffix(".csv"))
    assert [r["variant"] for r in rows] == ["plain", "unshared", "shared"]
    assert all(float(r["time_s"]) > 0 for r in rows)
    assert "shared / unshared" in name.with_suffix(".md").read_text()
