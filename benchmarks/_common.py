"""Shared benchmark plumbing: machine description, peak-memory probes, one CSV schema.

Peak memory, measured the same way for every variant of one run:

* CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around the measured step
  (after ``reset_peak_memory_stats``), i.e. the step's own peak allocation.
* CPU: each variant runs in a **fresh subprocess**. After the inputs are built, the kernel's
  resident-set high-water mark is reset (``echo 5 > /proc/self/clear_refs``), the step runs,
  and the figure is ``VmHWM - VmRSS_before`` from ``/proc/self/status``: the extra resident
  memory the step touched at its peak (tensors, allocator and library buffers alike).
  ``tracemalloc`` cannot see torch's allocations, so it is not used.

Every figure is also given as a ratio against a baseline measured in the same run.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
for p in (ROOT, ROOT / "src"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

CSV_FIELDS = [
    "bench", "variant", "positions", "vocab", "d", "dtype", "device",
    "time_s", "peak_mem_mb", "time_ratio", "mem_ratio", "baseline",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def machine_info(device: str) -> dict[str, str]:
    """CPU model, cores, memory, torch version and (on CUDA) the GPU name."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, AttributeError):
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "memory": mem,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _status_mb(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024.0


def memory_method(device: str) -> str:
    if device.startswith("cuda"):
        return "torch.cuda.max_memory_allocated() - memory_allocated() around the step"
    return (
        "fresh subprocess per variant; VmHWM reset via /proc/self/clear_refs after the inputs "
        "are built; peak = VmHWM - VmRSS_before (resident MiB the step added at its peak)"
    )


def measure(step: Callable[[], None], device: str, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Run ``step`` ``warmup + repeats`` times; return (minimum seconds, peak extra MiB)."""
    import gc

    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_mb("VmRSS")
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        gc.collect()
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _status_mb("VmHWM") - base
    return min(times), peak


FORK_ENV = "TOKINTERACT_BENCH_FORK_WORKERS"
"""With this variable set to ``1`` (``gpu_suite.py --dry-run`` sets it), :func:`run_worker` forks
this process instead of starting a fresh interpreter: the imports are paid once. The peak
memory then includes what the parent had touched, so the figures mean nothing (as everything
in the dry run); fork is also unsafe once CUDA is initialised, hence never on the GPU run."""


def run_worker(script: Path, job: dict, fn: Callable[[dict], dict], timeout: float = 3600.0) -> dict:
    """``fn(job)`` (``script``'s worker) in a fresh interpreter (``script --worker JSON``, its last
    stdout line parsed; ``timeout`` applies to it), or in a forked child with :data:`FORK_ENV` set;
    ``{"error": ...}`` if it failed."""
    if os.environ.get(FORK_ENV) == "1":
        return _forked(fn, job)
    cmd = [sys.executable, str(script), "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _forked(fn: Callable[[dict], dict], job: dict) -> dict:
    import traceback

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the job, write its JSON result (or the traceback), never return
        code = 1
        try:
            os.close(r)
            try:
                out, code = fn(job), 0
            except BaseException:  # noqa: BLE001 - reported to the parent as the worker's error
                out = {"error": traceback.format_exc()[-2000:]}
            with os.fdopen(w, "w") as f:
                f.write(json.dumps(out))
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:  # until the child exits (a hung child: the dry run's step time box kills both)
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if not text:
        return {"error": f"forked worker exited with status {os.waitstatus_to_exitcode(status)} and no result"}
    return json.loads(text)


def ratio(x: float, base: float) -> float:
    return float("nan") if not base else x / base


def write_results(name: str, rows: list[dict], header: dict[str, str], notes: list[str]) -> tuple[Path, Path]:
    """Write ``results/<name>.csv`` (CSV_FIELDS) and ``results/<name>.md`` (machine + table + notes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = RESULTS / f"{name}.csv", RESULTS / f"{name}.md"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in CSV_FIELDS})
    lines = [f"# {name}", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "| " + " | ".join(CSV_FIELDS) + " |", "|" + "---|" * len(CSV_FIELDS)]
    for r in rows:
        lines.append("| " + " | ".join(str(_fmt(r.get(k, ""))) for k in CSV_FIELDS) + " |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _fmt(v: object) -> object:
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


def print_table(rows: list[dict]) -> None:
    cols = ["variant", "positions", "baseline", "time_s", "peak_mem_mb", "time_ratio", "mem_ratio"]
    print(" ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" ".join(f"{str(_fmt(r.get(c, ''))):>12}" for c in cols))
