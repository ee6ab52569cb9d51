"""The student's part of the cached TPA step, with and without one gradient per shared weight.

The cached path calls the student twice with gradients (the ground-truth pass with its KV
cache, then the candidate block over it). ``tokinteract.hf._shared`` links the two calls of
every decoder ``nn.Linear`` / ``nn.Embedding`` so that autograd receives one gradient per
weight (``shared``); ``unshared`` is the previous behaviour (``_shared.ENABLED = False``): two
gradients per weight that autograd adds, and two dense ``[V, H]`` embedding gradients.

Measured here without the teacher, the vision tower and the LM head (``output="hidden"``, loss
``mean(h^2)`` over every row) so that it fits a loaded machine's memory: a Qwen2-0.5B-shaped
text model (random weights, V = 151,936), ``T`` ground-truth tokens and ``N`` candidate slots
(default 894 and 440, the token counts of ``bench_step.py --real-shapes --batch 1``). One step =
ground-truth forward + candidate forward + backward + ``zero_grad``; the two variants are
interleaved round by round, the best round kept; time is the process's CPU time
(``time.process_time``, all threads), steadier than wall time on a shared machine.

    .venv/bin/python benchmarks/bench_shared_grads.py --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, ratio, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt", type=int, default=894, help="ground-truth tokens T")
    ap.add_argument("--positions", type=int, default=110, help="candidate positions (d candidates each)")
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--shape", default="896,24,14,2,4864", help="hidden,layers,heads,kv_heads,intermediate")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="bench_shared_grads_cpu")
    ap.add_argument("--plain", action="store_true",
                    help="also time the ground truth alone (one plain pass, no cache: the student's part of a KD "
                         "step); the cached steps' ratio to it compares with the token ratio (T + N) / T")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tokinteract import tpa_expand
    from tokinteract.hf import _shared, cached_candidate_forward, ground_truth_forward

    h, n, heads, kv, inter = map(int, a.shape.split(","))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=a.vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=8192,
                      pad_token_id=0, tie_word_embeddings=False)
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa").train()
    g = torch.Generator().manual_seed(1)
    T = a.gt
    ids = torch.randint(3, a.vocab, (1, T), generator=g)
    am = torch.ones(1, T, dtype=torch.bool)
    cm = torch.zeros(1, T, dtype=torch.bool)
    cm[0, T - 1 - a.positions : T - 1] = True  # the last positions before the final token (the response)
    cands = torch.randint(3, a.vocab, (1, T, a.d), generator=g)
    exp = tpa_expand(ids, cands, cm, am)
    N = exp.expanded_len - T

    def step(v: str) -> float:
        _shared.ENABLED = v == "shared"
        try:
            t0 = time.process_time()
            if v == "plain":  # the ground truth alone, as a KD step runs the student (no cache)
                model.model(input_ids=ids, attention_mask=am.long()).last_hidden_state.square().mean().backward()
                model.zero_grad(set_to_none=True)
                return time.process_time() - t0
            gt = ground_truth_forward(model, ids, am, output="hidden")
            cand = cached_candidate_forward(model, gt, exp)
            loss = torch.cat([gt.hidden_states, cand], 1).square().mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            return time.process_time() - t0
        finally:
            _shared.ENABLED = True

    names = ["plain", "unshared", "shared"] if a.plain else ["unshared", "shared"]
    load0 = tuple(round(x, 2) for x in os.getloadavg())
    best = {v: float("inf") for v in names}
    for r in range(a.rounds + 1):
        for v in names:
            dt = step(v)
            if r > 0:
                best[v] = min(best[v], dt)
        if r > 0:
            print(f"round {r}: " + " ".join(f"{v}={best[v]:.3f}" for v in names), flush=True)
    rows = [{"bench": "student_cached_step", "variant": v, "positions": T + N, "vocab": a.vocab, "d": a.d,
             "dtype": "float32", "device": "cpu", "time_s": best[v], "time_ratio": ratio(best[v], best["unshared"]),
             "baseline": "unshared"} for v in names]
    print_table(rows)
    saved = best["unshared"] - best["shared"]
    notes = [f"shared / unshared = {best['shared'] / best['unshared']:.3f}: {saved:.2f} s of CPU time less per step"]
    if a.plain:
        notes += [f"{v} / plain = {best[v] / best['plain']:.3f} (token ratio (T + N) / T = {(T + N) / T:.3f})"
                  for v in ("unshared", "shared")]
    print("\n".join(notes))
    header = {**machine_info("cpu"), "command": "python " + " ".join(sys.argv),
              "model": f"Qwen2 H={h} L={n} heads={heads}/{kv} I={inter}, vocab {a.vocab}, random weights, fp32",
              "step": f"ground_truth_forward (T={T}) + cached_candidate_forward (N={N}) with output='hidden', "
                      "loss mean(h^2), backward, zero_grad; best of interleaved rounds",
              "time": "process CPU time (time.process_time, all threads)",
              "load average (1/5/15 min) at start / end": f"{load0} / {tuple(round(x, 2) for x in os.getloadavg())}"}
    paths = write_results(a.name, rows, header, notes)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
