"""Naive vs chunked vs fused Align-TI loss (and Vanilla KD): time and peak memory.

Workload (one sample, batch 1), for ``P`` positions per model (the rows the Align-TI loss
supervises, issue 5's "about 1,250 rows" for 729 visual tokens, 100 response tokens, d = 4):
``r = round(P / (7.29 + 1 + d))`` response positions (KD + SFT, and TPA with ``d`` candidates
each), ``v = P - (1 + d) r`` visual positions (IVA), so the expanded sequence has ``P + 1``
slots and exactly ``P`` rows reach the loss. Hidden states ``[1, P + 1, H]`` and LM-head
weights ``[V, H]`` (teacher ``[V, H_t]``) are the inputs; every variant includes the LM head:

* ``naive``: logits of both models materialised over the expansion, core
  :class:`tokinteract.AlignTILoss`;
* ``chunked``: the same logits, :class:`tokinteract.chunked.ChunkedAlignTILoss`;
* ``fused``: :class:`tokinteract.fused.FusedAlignTILoss` from the hidden states;
* ``liger``: ``FusedAlignTILoss(backend="liger")``: KD and TPA through Liger-Kernel's
  ``LigerFusedLinearJSDFunction`` (:mod:`tokinteract.liger`), SFT and IVA on tokinteract's
  pass; eager unless ``--liger-compiled`` (Liger's ``torch.compile``); needs ``liger_kernel``;
* ``naive_kd`` / ``chunked_kd`` / ``fused_kd`` / ``liger_kd``: Vanilla KD (SFT + KD, paper Eq. 2)
  on the same sample's ground truth (``r`` supervised rows), the same implementations.

Peers (``--peers``; one distillation divergence, forward KL ``KL(T || S)`` mean over rows, on the
same ``P`` rows of the same hidden states and LM heads, each implementation at its own default
chunk size; ratios against ``peer_ours``):

* ``peer_ours``: :func:`tokinteract.fused.fused_linear_divergence`;
* ``peer_trl``: TRL's chunked distillation loss (``DistillationTrainer``'s
  ``_chunked_divergence_loss``, ``beta=0``; needs ``trl``, see ``_peers.py``);
* ``peer_liger``: Liger's ``LigerFusedLinearJSDLoss`` (``beta=0``, soft loss only; eager unless
  ``--liger-compiled``; needs ``liger_kernel``).

Each measurement is forward + backward (gradients to the student's hidden states and LM-head
weight), median of ``--repeats`` after one warm-up, each variant in a fresh process (see
``_common.py`` for the memory method). Before timing, chunked and fused are checked against
the naive loop references of ``tests/reference.py`` on a small problem (the liger backend too,
when ``liger_kernel`` is installed; the liger variants are then in the default set).

    .venv/bin/python benchmarks/bench_losses.py --quick           # CPU, ~minutes
    .venv/bin/python benchmarks/bench_losses.py --quick --variants fused liger fused_kd liger_kd
    .venv/bin/python benchmarks/bench_losses.py --peers --positions 512 2048 --hidden 896 --teacher-hidden 1536
    .venv/bin/python benchmarks/bench_losses.py --device cuda --dtype bf16 \
        --positions 1024 2048 4096 8192 --hidden 896 --teacher-hidden 3584 --liger-compiled
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers  # noqa: E402
from _peers import liger_jsd, package_version, trl_available, trl_chunked_divergence  # noqa: E402
from _common import (  # noqa: E402
    DTYPES,
    machine_info,
    measure,
    memory_method,
    print_table,
    ratio,
    run_worker,
    write_results,
)

VISUAL_PER_RESPONSE = 7.29  # 729 visual tokens per 100 response tokens (issue 5)
VARIANTS = ("naive", "chunked", "fused", "liger", "naive_kd", "chunked_kd", "fused_kd", "liger_kd")
PEERS = ("peer_ours", "peer_trl", "peer_liger")


def geometry(P: int, d: int) -> tuple[int, int, int]:
    """(visual v, response r, ground-truth length T) with ``v + r + d r = P`` rows."""
    r = max(1, round(P / (VISUAL_PER_RESPONSE + 1 + d)))
    v = P - (1 + d) * r
    if v < 0:
        raise SystemExit(f"positions={P} too small for d={d}")
    return v, r, v + r + 1


def build(job: dict):
    import tokinteract as ti

    P, V, d, H, F = job["positions"], job["vocab"], job["d"], job["hidden"], job["teacher_hidden"]
    dtype, device = DTYPES[job["dtype"]], torch.device(job["device"])
    g = torch.Generator().manual_seed(job.get("seed", 0))
    v, r, T = geometry(P, d)
    labels = torch.full((1, T), -100, dtype=torch.long)
    labels[0, v + 1 : v + r + 1] = torch.randint(0, V, (r,), generator=g)
    cm = ti.shift_labels(labels) != -100
    ids = torch.randint(0, V, (1, T), generator=g)
    cands = torch.randint(0, V, (1, T, d), generator=g)
    ex = ti.tpa_expand(ids, cands, cm).to(device)
    T2 = ex.expanded_len
    vis = torch.zeros(1, T, dtype=torch.bool)
    vis[0, :v] = True
    vw = (ti.uniform_visual_weights(vis) * 2 * torch.rand(1, T, generator=g)).to(device)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    hs = rnd(1, T2, H).requires_grad_()
    W = rnd(V, H, scale=2.0 / H**0.5).requires_grad_()
    ht = rnd(1, T2, F)
    Wt = rnd(V, F, scale=2.0 / F**0.5)
    return dict(hs=hs, W=W, ht=ht, Wt=Wt, labels=labels.to(device), ex=ex, vw=vw, T=T, T2=T2, v=v, r=r, P=P)


def make_step(variant: str, x: dict, chunk_size: int | None, liger_compiled: bool = False):
    import tokinteract as ti
    from tokinteract.chunked import ChunkedAlignTILoss
    from tokinteract.fused import FusedAlignTILoss

    hs, W, ht, Wt, labels, ex, vw, T = x["hs"], x["W"], x["ht"], x["Wt"], x["labels"], x["ex"], x["vw"], x["T"]
    if variant in PEERS:
        return make_peer_step(variant, x, chunk_size, liger_compiled)
    kd_only = variant.endswith("_kd")
    parts = dict(iva=0.0, tpa=0.0) if kd_only else {}
    extra = {} if kd_only else dict(expansion=ex, visual_weights=vw)
    out: dict[str, float] = {}

    def step() -> None:
        hs.grad = None
        W.grad = None
        h_s = hs[:, :T] if kd_only else hs
        h_t = ht[:, :T] if kd_only else ht
        if variant.startswith(("fused", "liger")):
            backend = dict(backend="liger", liger_compiled=liger_compiled) if variant.startswith("liger") else {}
            loss, _ = FusedAlignTILoss(chunk_size=chunk_size, **backend, **parts)(h_s, W, h_t, Wt, x["labels"], **extra)
        else:
            s_logits = h_s @ W.T
            with torch.no_grad():
                t_logits = h_t @ Wt.T
            mod = ti.AlignTILoss(**parts) if variant.startswith("naive") else ChunkedAlignTILoss(chunk_size=chunk_size, **parts)
            loss, _ = mod(s_logits, t_logits, labels, **extra)
            del s_logits, t_logits
        loss.backward()
        out["loss"] = float(loss.detach())
        del loss

    return step, out


def make_peer_step(variant: str, x: dict, chunk_size: int | None, liger_compiled: bool):
    """Forward KL over the first ``P`` rows (``x["P"]``) by ours, TRL's or Liger's implementation."""
    from tokinteract.fused import fused_linear_divergence

    hs, W, ht, Wt, P = x["hs"], x["W"], x["ht"], x["Wt"], x["P"]
    out: dict[str, float] = {}

    def step() -> None:
        hs.grad = None
        W.grad = None
        if variant == "peer_ours":
            loss = fused_linear_divergence(hs[0, :P], W, ht[0, :P], Wt, chunk_size=chunk_size)
        elif variant == "peer_trl":
            loss = trl_chunked_divergence(hs[:, :P], W, ht[:, :P], Wt, torch.ones(1, P, device=hs.device))
        else:
            labels = torch.zeros(P, dtype=torch.long, device=hs.device)  # all rows scored
            loss = liger_jsd(hs[0, :P], W, ht[0, :P], Wt, labels, compiled=liger_compiled)
        loss.backward()
        out["loss"] = float(loss.detach())

    return step, out


def worker(job: dict) -> dict:
    torch.manual_seed(0)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    # warm the code paths on a tiny problem first, so lazily loaded kernels and library pages
    # are not counted as the step's memory
    tiny = dict(job, positions=64, vocab=512, hidden=16, teacher_hidden=16)
    compiled = bool(job.get("liger_compiled"))
    tiny_step, _ = make_step(job["variant"], build(tiny), job.get("chunk_size"), compiled)
    tiny_step()
    del tiny_step
    x = build(job)
    step, out = make_step(job["variant"], x, job.get("chunk_size"), compiled)
    cpu_times: list[float] = []

    def timed_step() -> None:
        # the process's CPU seconds (all its threads): unlike wall time, not stretched by other processes
        c0 = time.process_time()
        step()
        cpu_times.append(time.process_time() - c0)

    t, peak = measure(timed_step, job["device"], repeats=job["repeats"])
    gn = float(x["W"].grad.float().norm()) if x["W"].grad is not None else float("nan")
    return {"time_s": t, "cpu_s": min(cpu_times[1:]), "peak_mem_mb": peak, "loss": out["loss"], "grad_w_norm": gn, "rows": x["v"] + x["r"] * (1 + job["d"])}


def peer_reference_check() -> float:
    """TRL's and Liger's forward KL (the peer variants' calls) vs ``tests/reference.py`` (fp64); max |diff|.

    Checks the loaded peer code computes the divergence the peer variants claim, on the same
    kind of inputs (rows of hidden states, two LM heads), loss and student gradients.
    """
    from reference import ref_divergence

    g = torch.Generator().manual_seed(2)
    R, V, H, F = 20, 50, 8, 6
    hs, W = torch.randn(R, H, generator=g), torch.randn(V, H, generator=g)
    ht, Wt = torch.randn(R, F, generator=g), torch.randn(V, F, generator=g)
    hs64, W64 = hs.double().requires_grad_(), W.double().requires_grad_()
    ref = ref_divergence(hs64 @ W64.T, (ht @ Wt.T).double(), "fkl").mean()
    ref_grads = torch.autograd.grad(ref, (hs64, W64))
    calls = []
    if trl_available():
        calls.append(lambda a, b: trl_chunked_divergence(a[None], b, ht[None], Wt, torch.ones(1, R), chunk_size=7))
    if _have_liger():
        calls.append(lambda a, b: liger_jsd(a, b, ht, Wt, torch.zeros(R, dtype=torch.long), chunk_size=7))
    diffs = [0.0]
    for call in calls:
        a, b = hs.clone().requires_grad_(), W.clone().requires_grad_()
        loss = call(a, b)
        grads = torch.autograd.grad(loss, (a, b))
        diffs.append(abs(float(loss.detach()) - float(ref.detach())))
        diffs += [float((x.double() - y).abs().max()) for x, y in zip(grads, ref_grads)]
    return max(diffs)


def reference_check() -> float:
    """Chunked and fused vs the loop references (fp64) on a small problem; returns max |diff|."""
    from reference import ref_iva_loss, ref_kd_loss, ref_sft_loss

    from tokinteract.chunked import chunked_align_ti_terms
    from tokinteract.fused import fused_align_ti_terms
    import tokinteract as ti

    g = torch.Generator().manual_seed(1)
    B, T, V, H = 2, 12, 40, 8
    hs, W, ht, Wt = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g), torch.randn(B, T, 6, generator=g), torch.randn(V, 6, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :5] = -100
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, 1:5] = True
    vw = ti.uniform_visual_weights(vis)
    s, t = hs @ W.T, ht @ Wt.T
    ref = ref_sft_loss(s, labels) + ref_kd_loss(s, t, labels) + ref_iva_loss(s, t, vw)
    a, _ = chunked_align_ti_terms(s, t, labels, tpa=0.0, visual_weights=vw, chunk_size=5)
    b, _ = fused_align_ti_terms(hs, W, ht, Wt, labels, tpa=0.0, visual_weights=vw, chunk_size=5)
    diffs = [abs(float(a) - float(ref)), abs(float(b) - float(ref))]
    if _have_liger():
        c, _ = fused_align_ti_terms(hs, W, ht, Wt, labels, tpa=0.0, visual_weights=vw, chunk_size=5,
                                    backend="liger", liger_compiled=False)
        diffs.append(abs(float(c) - float(ref)))
    return max(diffs)


def _liger_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("liger-kernel")
    except PackageNotFoundError:
        return "(not installed)"


def _have_liger() -> bool:
    from tokinteract.liger import liger_available

    return liger_available()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="CPU-sized run: positions 256 512 1024, H=256, teacher H=512")
    ap.add_argument("--positions", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=896, help="student hidden size (Qwen2.5-0.5B: 896)")
    ap.add_argument("--teacher-hidden", type=int, default=3584, help="teacher hidden size (Qwen2.5-7B: 3584)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every variant this many times, interleaved (a fresh process each), keeping each "
                         "variant's fastest round: load from other processes then hits all variants alike")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS + PEERS,
                    help="default: all, the liger ones only when liger_kernel is installed")
    ap.add_argument("--liger-compiled", action="store_true",
                    help="liger variants: let Liger torch.compile its chunk step (its default; compile time "
                         "and memory fall into the warm-up, the first step)")
    ap.add_argument("--peers", action="store_true",
                    help="run the peer variants (peer_ours, and peer_trl / peer_liger where installed) instead of the default set")
    ap.add_argument("--name", default=None, help="results file stem (default bench_losses_<device>)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.positions, args.hidden, args.teacher_hidden, args.repeats = [256, 512, 1024], 256, 512, 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    if args.variants is None and args.peers:
        args.variants = ["peer_ours"] + (["peer_trl"] if trl_available() else []) + (["peer_liger"] if _have_liger() else [])
    elif args.variants is None:
        args.variants = [v for v in VARIANTS if _have_liger() or not v.startswith("liger")]
    if any(v in PEERS for v in args.variants):
        pdiff = peer_reference_check()
        print(f"peer reference check (TRL / Liger forward KL vs tests/reference.py, loss and gradients): max |diff| = {pdiff:.2e}")
        if pdiff > 1e-4:
            raise SystemExit("peer reference check failed")
    diff = reference_check()
    checked = "chunked, fused and liger" if _have_liger() else "chunked and fused"
    print(f"reference check ({checked} vs tests/reference.py, fp32 vs fp64): max |diff| = {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("reference check failed")
    load0 = tuple(round(x, 2) for x in os.getloadavg())
    results: dict[tuple[str, int], dict] = {}
    for P in args.positions:
        for rnd in range(args.rounds):
            for variant in args.variants:
                job = dict(variant=variant, positions=P, vocab=args.vocab, d=args.d, hidden=args.hidden,
                           teacher_hidden=args.teacher_hidden, dtype=args.dtype, device=args.device,
                           repeats=args.repeats, chunk_size=args.chunk_size, liger_compiled=args.liger_compiled)
                res = run_worker(Path(__file__), job, worker)
                if "error" in res:
                    print(f"{variant} P={P}: FAILED\n{res['error']}", file=sys.stderr)
                    continue
                prev = results.get((variant, P))
                if prev is not None:  # fastest round's time; the peak is the round's own (memory is not load-bound)
                    res["peak_mem_mb"] = min(res["peak_mem_mb"], prev["peak_mem_mb"])
                    res["time_s"] = min(res["time_s"], prev["time_s"])
                    res["cpu_s"] = min(res["cpu_s"], prev["cpu_s"])
                results[(variant, P)] = res
                print(f"{variant:>11} P={P:>5} round {rnd + 1}: {res['time_s']:.3f} s (best so far), "
                      f"peak {res['peak_mem_mb']:.0f} MiB, loss {res['loss']:.6f}", flush=True)
    rows = []
    comparisons = [(v, "naive") for v in args.variants if v not in PEERS] + [
        ("peer_ours", "peer_ours"), ("peer_trl", "peer_ours"), ("peer_liger", "peer_ours"),
    ] + [
        ("naive", "naive_kd"), ("chunked", "chunked_kd"), ("fused", "fused_kd"), ("liger", "liger_kd"),
        ("liger", "fused"), ("liger_kd", "fused_kd"),
    ]
    for P in args.positions:
        for variant, base in comparisons:
            if (variant, P) not in results or (base, P) not in results:
                continue
            a, b = results[(variant, P)], results[(base, P)]
            rows.append(dict(bench="losses", variant=variant, positions=P, vocab=args.vocab, d=args.d, dtype=args.dtype,
                             device=args.device, time_s=a["time_s"], peak_mem_mb=a["peak_mem_mb"],
                             time_ratio=ratio(a["time_s"], b["time_s"]), mem_ratio=ratio(a["peak_mem_mb"], b["peak_mem_mb"]),
                             baseline=base))
    print_table(rows)
    notes = []
    for P in args.positions:
        if ("naive", P) in results:
            base = results[("naive", P)]
            for v in ("chunked", "fused", "liger"):
                if (v, P) in results:
                    notes.append(f"P={P}: |loss({v}) - loss(naive)| = {abs(results[(v, P)]['loss'] - base['loss']):.2e}, "
                                 f"|grad_W| {results[(v, P)]['grad_w_norm']:.6g} vs {base['grad_w_norm']:.6g}")
        if ("peer_ours", P) in results:
            base = results[("peer_ours", P)]
            for v in ("peer_trl", "peer_liger"):
                if (v, P) in results:
                    notes.append(f"P={P}: |loss({v}) - loss(peer_ours)| = {abs(results[(v, P)]['loss'] - base['loss']):.2e}, "
                                 f"|grad_W| {results[(v, P)]['grad_w_norm']:.6g} vs {base['grad_w_norm']:.6g}")
    for (v, P), res in results.items():  # CPU seconds: robust to other processes on a shared machine
        if args.device == "cpu":
            base = results.get(("peer_ours" if v in PEERS else "naive", P))
            notes.append(f"P={P}: {v} process CPU time {res['cpu_s']:.3f} s (best run)"
                         + (f", {res['cpu_s'] / base['cpu_s']:.3f}x {'peer_ours' if v in PEERS else 'naive'}" if base else ""))
    v, r, T = geometry(args.positions[-1], args.d)
    header = machine_info(args.device)
    header.update({
        "command": "benchmarks/bench_losses.py " + " ".join(sys.argv[1:]),
        "memory method": memory_method(args.device),
        "time": f"forward + backward, best (minimum) of {args.repeats} after 1 warm-up (the machine is shared; the minimum is the least disturbed run)"
                + (f", and of {args.rounds} interleaved rounds (a fresh process per variant and round; peak memory: the lowest round's)"
                   if args.rounds > 1 else ""),
        "workload": f"batch 1, hidden {args.hidden}, teacher hidden {args.teacher_hidden}, d={args.d}; "
                    f"e.g. P={args.positions[-1]}: {v} visual (IVA) + {r} response (SFT+KD) + {r * args.d} candidate (TPA) rows; "
                    "*_kd variants: SFT + KD on the same sample's ground truth only",
        "chunk_size": str(args.chunk_size or "auto (2**24 // V rows)"),
        "liger": ("liger-kernel " + _liger_version() + (", compiled=True" if args.liger_compiled else ", compiled=False (eager)"))
                 if any(v.startswith("liger") for v in args.variants) else "not run",
        "reference check": f"max |diff| vs tests/reference.py = {diff:.2e}",
        "load average (1/5/15 min) at start / end": f"{load0} / {tuple(round(x, 2) for x in os.getloadavg())}",
    })
    if any(v in PEERS for v in args.variants):
        header["peers"] = (f"forward KL KL(T || S), mean over all P rows (the workload line does not apply), fwd + bwd; peer_ours chunk "
                           f"{args.chunk_size or 'auto (2**24 // V rows)'}, TRL {_peers.TRL_SOURCE} (chunk 256, checkpointed), "
                           f"liger-kernel {package_version('liger-kernel')} (chunk 1024, "
                           f"{'compiled' if args.liger_compiled else 'eager'}); peer reference check max |diff| = {pdiff:.2e}")
    name = args.name or f"bench_losses_{args.device.split(':')[0]}"
    csv_path, md_path = write_results(name, rows, header, notes)
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
