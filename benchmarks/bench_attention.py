"""Attention over the TPA expansion: dense ribbon mask vs causal vs FlexAttention.

One attention layer (batch 1, ``--heads`` heads of ``--head-dim``) over the packed TPA
sequence of ``bench_losses.py``'s workload (``P`` rows, ``d`` candidates per response token;
the expansion has ``T2 = P + 1`` slots). Variants:

* ``dense_sdpa`` (baseline): ``scaled_dot_product_attention`` with the dense bool ribbon
  mask ``[1, 1, T2, T2]``, forward + backward;
* ``causal_sdpa``: ``is_causal=True`` over the same ``T2`` (the cost of an ordinary sequence
  of that length, forward + backward);
* ``causal_sdpa_gt``: ``is_causal=True`` over the ground truth only (``T`` tokens: what the
  forward pass of Vanilla KD pays), forward + backward;
* ``dense_sdpa_fwd``: the baseline's forward only, no grad (the baseline of the ``*_fwd`` rows);
* ``flex_eager_fwd``: uncompiled FlexAttention with :func:`tokinteract.attention.ribbon_block_mask`,
  forward only (CPU has no flex backward; eager flex materialises the scores, so this only
  checks the mask and shows the eager cost);
* ``flex_compiled_fwd`` (``--flex-compiled``): compiled flex, forward only; its output is
  compared with the dense-mask SDPA output and the run is marked failed on a mismatch.

Not measurable here (GPU-only TODO): compiled flex forward + backward with the block mask,
and an SDPA "prefix + self" formulation (the HF adapter does not provide one yet).

    .venv/bin/python benchmarks/bench_attention.py --quick
    .venv/bin/python benchmarks/bench_attention.py --device cuda --dtype bf16 --positions 2048 4096 8192 --flex-compiled
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
from bench_losses import geometry  # noqa: E402

VARIANTS = ("dense_sdpa", "causal_sdpa", "causal_sdpa_gt", "dense_sdpa_fwd", "flex_eager_fwd", "flex_compiled_fwd")


def build(job: dict):
    import tokinteract as ti

    P, d = job["positions"], job["d"]
    dtype, device = DTYPES[job["dtype"]], torch.device(job["device"])
    g = torch.Generator().manual_seed(0)
    v, r, T = geometry(P, d)
    labels = torch.full((1, T), -100, dtype=torch.long)
    labels[0, v + 1 : v + r + 1] = 1
    cm = ti.shift_labels(labels) != -100
    ex = ti.tpa_expand(torch.zeros(1, T, dtype=torch.long), torch.zeros(1, T, d, dtype=torch.long), cm).to(device)
    T2 = ex.expanded_len
    n = T if job["variant"] == "causal_sdpa_gt" else T2

    grad = not job["variant"].endswith("_fwd")  # CPU flex refuses inputs that require grad

    def rnd():
        return torch.randn(1, job["heads"], n, job["head_dim"], generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    return ex, rnd(), rnd(), rnd(), T, T2


def make_step(job: dict):
    from torch.nn.attention.flex_attention import flex_attention

    from tokinteract.attention import ribbon_block_mask

    sdpa = torch.nn.functional.scaled_dot_product_attention
    ex, q, k, v, T, T2 = build(job)
    variant = job["variant"]
    extra: dict = {}
    if variant.startswith("flex"):
        bm = ribbon_block_mask(ex, block_size=128)
        fn = torch.compile(flex_attention) if variant == "flex_compiled_fwd" else flex_attention
        with torch.no_grad():
            ref = sdpa(q, k, v, attn_mask=ex.attention_mask)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                out = fn(q, k, v, block_mask=bm)
        extra["max_abs_diff_vs_dense"] = float((out.float() - ref.float()).abs().max())
        del ref, out

    def step() -> None:
        for x in (q, k, v):
            x.grad = None
        if variant == "dense_sdpa":
            sdpa(q, k, v, attn_mask=ex.attention_mask).sum().backward()
        elif variant.startswith("causal_sdpa"):
            sdpa(q, k, v, is_causal=True).sum().backward()
        elif variant == "dense_sdpa_fwd":
            with torch.no_grad():
                sdpa(q, k, v, attn_mask=ex.attention_mask)
        else:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                fn(q, k, v, block_mask=bm)

    return step, extra, T2


def worker(job: dict) -> dict:
    step, extra, T2 = make_step(job)
    t, peak = measure(step, job["device"], repeats=job["repeats"])
    return {"time_s": t, "peak_mem_mb": peak, "T2": T2, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="CPU-sized run: positions 1024 2048 4096")
    ap.add_argument("--positions", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--heads", type=int, default=14, help="Qwen2.5-0.5B: 14 query heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flex-compiled", action="store_true", help="also time compiled flex (forward only on CPU)")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.positions = [1024, 2048, 4096]
    variants = [v for v in VARIANTS if v != "flex_compiled_fwd" or args.flex_compiled]
    results: dict[tuple[str, int], dict] = {}
    failures: list[str] = []
    for P in args.positions:
        for variant in variants:
            job = dict(variant=variant, positions=P, d=args.d, heads=args.heads, head_dim=args.head_dim,
                       dtype=args.dtype, device=args.device, repeats=args.repeats)
            res = run_worker(Path(__file__), job, worker)
            if "error" in res:
                failures.append(f"{variant} P={P}: failed: {res['error'].strip().splitlines()[-1]}")
                print(failures[-1], file=sys.stderr)
                continue
            diff = res.get("max_abs_diff_vs_dense")
            if diff is not None and diff > 1e-3:
                failures.append(f"{variant} P={P}: output differs from dense-mask SDPA by {diff:.3g}; not reported")
                print(failures[-1], file=sys.stderr)
                continue
            results[(variant, P)] = res
            print(f"{variant:>18} P={P:>5}: {res['time_s']:.4f} s, peak {res['peak_mem_mb']:.0f} MiB"
                  + (f", max|diff| vs dense {diff:.1e}" if diff is not None else ""), flush=True)
    rows = []
    for P in args.positions:
        for variant in variants:
            base = "dense_sdpa_fwd" if variant.endswith("_fwd") and variant != "dense_sdpa_fwd" else "dense_sdpa"
            if (variant, P) not in results or (base, P) not in results:
                continue
            a, b = results[(variant, P)], results[(base, P)]
            rows.append(dict(bench="attention", variant=variant, positions=a["T2"], vocab="", d=args.d,
                             dtype=args.dtype, device=args.device, time_s=a["time_s"], peak_mem_mb=a["peak_mem_mb"],
                             time_ratio=ratio(a["time_s"], b["time_s"]), mem_ratio=ratio(a["peak_mem_mb"], b["peak_mem_mb"]),
                             baseline=base))
    print_table(rows)
    header = machine_info(args.device)
    header.update({
        "command": "benchmarks/bench_attention.py " + " ".join(sys.argv[1:]),
        "memory method": memory_method(args.device),
        "time": f"best (minimum) of {args.repeats} after 1 warm-up; *_fwd variants forward only, others forward + backward",
        "workload": f"batch 1, {args.heads} heads x {args.head_dim}, d={args.d}; positions = T2 (expanded slots); "
                    "causal_sdpa_gt runs on the ground-truth length T only",
    })
    notes = failures + [
        "GPU-only TODO: compiled flex forward + backward with ribbon_block_mask; SDPA prefix+self formulation.",
    ]
    name = args.name or f"bench_attention_{args.device.split(':')[0]}"
    csv_path, md_path = write_results(name, rows, header, notes)
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
