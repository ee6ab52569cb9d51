"""One distillation training step: SFT, Vanilla KD, +IVA, +TPA, Align-TI (``DistillationTrainer``).

Each measured step is ``DistillationTrainer.compute_loss`` (student pass with gradients,
candidate sampling, teacher pass under inference mode, loss) followed by ``loss.backward()`` and
``zero_grad`` on a fixed LLaVA-style batch; no optimizer update (it is the same for every
method). Models are random LLaVAs (SigLIP + projector + Qwen2) built from configs; the vision
tower is frozen (``set_trainable(..., "finetune")``) as in training.

Token mix per sample: ``1`` BOS + ``--visual`` image tokens + ~``--instruction`` instruction
tokens + ~``--response`` response tokens (lengths vary by +-10% across the batch, right
padding); only the response is supervised, TPA draws ``--d`` candidates at every response
position.

Variants (``DistillationConfig.method``; suffix ``_logits``: ``loss_impl="logits"``, i.e. full
logits and the unfused loss; ``_packed``: ``tpa_forward="packed"``, the paper's Algorithm 1 with
the student's second full pass; no suffix: the trainer defaults, ``loss_impl="fused"`` and
``tpa_forward="cached"``):

    sft, kd, iva, tpa, align_ti, kd_logits, iva_logits, tpa_logits, align_ti_logits, tpa_packed,
    align_ti_packed

``align_ti_unshared`` (the cached path without one gradient per shared weight) and ``align_ti_prev``
(the ground-truth pass with the dense ribbon-block mask, the float sort for flat nucleus rows and
the fused loss's chunk loop without reused buffers, as before issue 16 item 1's changes), ``kd_prev``
and ``iva_prev`` (that chunk loop only: a fresh ``[chunk, V]`` tensor per buffer and chunk, SFT's
cross-entropy with its own student ``log_softmax``) switch library behaviour off for comparison;
and ``kd_trl``, a TRL-style KD step outside ``DistillationTrainer``, as TRL's GKD trainer computes
it without Liger (``GKDTrainer.compute_loss``): the student's and the teacher's full logits at
every position (teacher under ``no_grad``), then TRL's own ``generalized_jsd_loss`` with
``beta=0`` (forward KL, the mean over the supervised positions; no SFT term) and the backward.
Its ratio is against ``kd`` (our default fused step); needs ``trl`` (``benchmarks/_peers.py``).

Every time is also given as a ratio against the Vanilla KD step of the same ``loss_impl``
measured in the same run (``kd`` = 1.0, or ``kd_logits`` for ``*_logits``). Variants are
interleaved round by round (each round runs every variant once, after one warm-up round) and
the best round is kept, so load from other processes hits all of them alike.

``est_ratio`` (printed, and in the notes): a compute model of each step (see
:func:`estimated_macs`: parameters x tokens, attention scores, and the LM-head rows each loss
needs), to tell work the method adds from overhead. With ``kd`` and ``iva`` in the run, the notes
also give IVA's method-inclusive ratio: the model's plus the seconds of the work IVA needs that the
MAC count leaves out, measured in the same run (the attention capture at ``l*`` with the
instruction->vision weights, :func:`timed_method_work`; the vocabulary-wide softmax work of the
visual rows, :func:`softmax_work_seconds`), over KD's measured step; with ``kd`` and ``align_ti``,
Align-TI's: the same plus TPA's candidate sampling (the student's head at the candidate rows,
softmax, top-p selection, draws) and the softmax work of the candidate rows.

Token work: ``token_ratio = (T + N) / T`` with ``T`` the real ground-truth tokens of the batch
and ``N`` the candidate slots (``d`` x supervised positions): what TPA adds to each model's
forward in the cached path (the student's second full pass of Algorithm 1 removed). Targets
(issue 5): ``align_ti / kd <= 1.05 x token_ratio`` and ``iva / kd <= 1.03``.

    .venv/bin/python benchmarks/bench_step.py --quick                # CPU, tiny-but-not-trivial shapes
    .venv/bin/python benchmarks/bench_step.py --quick --profile tpa  # where the TPA step's time goes
    .venv/bin/python benchmarks/bench_step.py --quick --breakdown    # seconds per part of each step
    .venv/bin/python benchmarks/bench_step.py --device cuda --teacher 7b --estimate  # compute model only
    # CPU at the realistic shapes within ~11 GiB (frozen layers share weights), issue 16 item 1:
    .venv/bin/python benchmarks/bench_step.py --real-shapes --batch 1 --share-frozen-layers --max-rss-gb 11 \
        --rounds 1 --threads 1 --cpu-time --breakdown --variants kd iva align_ti align_ti_prev
    .venv/bin/python benchmarks/bench_step.py --real-shapes --batch 1 --sampling-cost --cpu-time --threads 1
    # GPU (not run here: no GPU on this machine): Qwen2-0.5B-shaped student, Qwen2-1.5B / 7B-shaped teacher
    .venv/bin/python benchmarks/bench_step.py --device cuda --dtype bf16 --teacher 1.5b
    .venv/bin/python benchmarks/bench_step.py --device cuda --dtype bf16 --teacher 7b
    # 1.5B-shaped student, the ribbon BlockMask for the packed passes, device->host syncs per step
    .venv/bin/python benchmarks/bench_step.py --device cuda --student 1.5b --teacher 7b --attn flex_attention
    .venv/bin/python benchmarks/bench_step.py --device cuda --count-syncs --variants kd iva align_ti kd_trl

``--attn flex_attention`` runs both text models under FlexAttention, so the packed passes
(``*_packed`` variants) use the ribbon ``BlockMask`` (``tokinteract.attention.ribbon_block_mask``)
instead of the dense SDPA mask; CUDA only (no flex backward on CPU). ``--count-syncs`` runs one
step per variant under ``torch.cuda.set_sync_debug_mode("warn")`` and counts the device->host
synchronisation warnings (CUDA only; on CPU the count is written as ``n/a``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers  # noqa: E402
from _common import DTYPES, machine_info, print_table, ratio, write_results  # noqa: E402

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sft": ("sft", {}),
    "kd": ("kd", {}),
    "iva": ("iva", {}),
    "tpa": ("tpa", {}),
    "align_ti": ("align_ti", {}),
    "uniform_va": ("uniform_va", {}),
    "kd_logits": ("kd", {"loss_impl": "logits"}),
    "iva_logits": ("iva", {"loss_impl": "logits"}),
    "tpa_logits": ("tpa", {"loss_impl": "logits"}),
    "align_ti_logits": ("align_ti", {"loss_impl": "logits"}),
    "tpa_packed": ("tpa", {"tpa_forward": "packed"}),
    "align_ti_packed": ("align_ti", {"tpa_forward": "packed"}),
    # not a DistillationTrainer variant: TRL's GKD step (see the module docstring); the entry gives its
    # compute model (full logits at every slot of both models, like kd_logits)
    "kd_trl": ("kd", {"loss_impl": "logits"}),
    # the cached path as before the one-gradient-per-weight links (tokinteract.hf._shared off):
    # the student's two calls give every shared weight two gradients that autograd adds
    "align_ti_unshared": ("align_ti", {}),
    "tpa_unshared": ("tpa", {}),
    # Align-TI as before issue 16 item 1's last changes: the ground-truth pass always with the dense
    # ribbon-block mask (tokinteract.hf.packed.CAUSAL_GROUND_TRUTH off) and the float sort for flat
    # nucleus rows (tokinteract.sampling._KEY_SORT off)
    "align_ti_prev": ("align_ti", {}),
    # KD and IVA with the fused loss's chunk loop as before issue 16 item 1's IVA change: a fresh [chunk, V]
    # tensor per buffer and chunk, and SFT's cross-entropy with its own student log_softmax
    # (tokinteract._engine._REUSE off; align_ti_prev has it off too)
    "kd_prev": ("kd", {}),
    "iva_prev": ("iva", {}),
}
PEER_STEPS = ("kd_trl",)
UNSHARED = ("align_ti_unshared", "tpa_unshared")
PREVIOUS = ("align_ti_prev", "kd_prev", "iva_prev")

# Qwen2 / Qwen2.5 shapes (hidden, layers, heads, kv heads, intermediate); SigLIP-so400m/14 at 384 px
SHAPES = {
    "0.5b": (896, 24, 14, 2, 4864),
    "1.5b": (1536, 28, 12, 2, 8960),
    "7b": (3584, 28, 28, 4, 18944),
}
GPU_VISION = dict(vision_hidden_size=1152, vision_layers=27, vision_heads=16, image_size=378, patch_size=14)  # 729 tokens
# CPU --quick: tiny but not trivial
CPU_STUDENT = (128, 2, 4, 2, 256)
CPU_TEACHER = (256, 4, 8, 2, 512)
CPU_VISION = dict(vision_hidden_size=64, vision_layers=2, vision_heads=2, image_size=112, patch_size=8)  # 196 tokens

PAD, BOS, EOS = 0, 1, 2


def build_model(vocab: int, image_token: int, shape: tuple[int, ...], vision: dict, seed: int, dtype, device):
    from tokinteract.mllm import build_tiny_llava

    h, n, heads, kv, inter = shape
    m = build_tiny_llava(
        vocab_size=vocab, image_token_id=image_token, hidden_size=h, num_layers=n, num_heads=heads,
        num_kv_heads=kv, intermediate_size=inter, max_position_embeddings=8192, pad_token_id=PAD,
        eos_token_id=EOS, seed=seed, **vision,
    )
    return m.to(device=device, dtype=dtype)


def _repeat_first_layer(layers: torch.nn.ModuleList, n: int) -> None:
    """Grow ``layers`` (holding one layer) to ``n`` layers that all use the first layer's parameter
    tensors (module copies with their own ``layer_idx``; no parameter is copied)."""
    import copy

    first = layers[0]
    keep = {id(p): p for p in first.parameters()}  # shared, not copied: the weights and the configs (the
    keep.update({id(m.config): m.config for m in first.modules() if hasattr(m, "config")})  # attention switch)
    for i in range(1, n):
        layer = copy.deepcopy(first, memo=dict(keep))
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i
        layers.append(layer)


def _vision_layers(tower: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(tower, "vision_model", tower)
    return inner.encoder.layers


def build_model_shared(vocab: int, image_token: int, shape: tuple[int, ...], vision: dict, seed: int, dtype, device,
                       share_text: bool):
    """``build_model`` with the frozen parts' layers sharing one set of weights (``--share-frozen-layers``).

    The vision tower's ``vision_layers`` layers (frozen in every variant) and, with ``share_text``
    (the teacher), the language model's decoder layers are built once and repeated: every layer
    runs the same shapes and the same work as an independent one, with its own ``layer_idx`` (KV
    cache, attention capture), but the weights of only one layer are resident. Timings are those
    of independent layers as long as one layer's matrices do not stay in cache from one layer to
    the next (a Qwen2-1.5B layer holds 188 MB of fp32 weights); a layer's weight gradients would
    not be (shared tensors accumulate), hence never the student's decoder.
    """
    h, n, heads, kv, inter = shape
    m = build_model(vocab, image_token, (h, 1 if share_text else n, heads, kv, inter), {**vision, "vision_layers": 1},
                    seed, dtype, device)
    _repeat_first_layer(_vision_layers(m.model.vision_tower), vision["vision_layers"])
    m.config.vision_config.num_hidden_layers = vision["vision_layers"]
    if share_text:
        lm = m.model.language_model
        _repeat_first_layer(lm.layers, n)
        lm.embed_tokens.weight = m.lm_head.weight  # tied, as Qwen2-0.5B/1.5B are: the teacher only looks rows up
        for cfg in {id(c): c for c in (m.config.text_config, lm.config)}.values():
            cfg.num_hidden_layers = n
            if getattr(cfg, "layer_types", None):
                cfg.layer_types = [cfg.layer_types[0]] * n
    return m


def peak_rss_gb() -> float:
    """The process's resident-set high-water mark (``VmHWM``), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def rss_guard(limit_gb: float) -> None:
    """Exit the process (status 3) as soon as its resident set exceeds ``limit_gb`` GiB (checked
    every 0.2 s in a daemon thread): a benchmark on a shared machine must not push others out."""
    import threading

    def watch() -> None:
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:") and int(line.split()[1]) / 2**20 > limit_gb:
                    print(f"resident set over --max-rss-gb {limit_gb}: stopping", file=sys.stderr, flush=True)
                    os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


@contextlib.contextmanager
def variant_switches(v: str):
    """The library's switches for variant ``v`` (``*_unshared``, ``*_prev``), restored afterwards."""
    from tokinteract import _engine, sampling
    from tokinteract.hf import _shared, packed

    _shared.ENABLED = v not in UNSHARED
    packed.CAUSAL_GROUND_TRUTH = sampling._KEY_SORT = _engine._REUSE = v not in PREVIOUS
    try:
        yield
    finally:
        _shared.ENABLED = packed.CAUSAL_GROUND_TRUTH = sampling._KEY_SORT = _engine._REUSE = True


def build_batch(B: int, n_vis: int, n_instr: int, n_resp: int, vocab: int, image_token: int, image_size: int,
                seed: int, device, dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for b in range(B):
        ni = max(1, round(n_instr * (0.9 + 0.2 * b / max(B - 1, 1))))
        nr = max(1, round(n_resp * (1.1 - 0.2 * b / max(B - 1, 1))))
        instr = torch.randint(3, image_token, (ni,), generator=g)
        resp = torch.randint(3, image_token, (nr,), generator=g)
        ids = torch.cat([torch.tensor([BOS]), torch.full((n_vis,), image_token), instr, resp])
        kind = torch.cat([torch.zeros(1 + n_vis), torch.ones(ni), 2 * torch.ones(nr)]).long()
        kind[1 : 1 + n_vis] = 3
        seqs.append((ids, kind))
    T = max(len(s[0]) for s in seqs)
    out = {k: torch.zeros(B, T, dtype=torch.long) for k in ("input_ids", "attention_mask", "kind")}
    for b, (ids, kind) in enumerate(seqs):
        out["input_ids"][b, : len(ids)] = ids
        out["attention_mask"][b, : len(ids)] = 1
        out["kind"][b, : len(ids)] = kind + 1
    kind = out.pop("kind")
    batch = {
        "input_ids": out["input_ids"],
        "attention_mask": out["attention_mask"],
        "labels": torch.where(kind == 3, out["input_ids"], torch.full_like(out["input_ids"], -100)),
        "visual_mask": (kind == 4).long(),
        "instruction_mask": (kind == 2).long(),
        "response_mask": (kind == 3).long(),
        "pixel_values": torch.randn(B, 3, image_size, image_size, generator=g),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def make_trainer(student, teacher, method: str, extra: dict, args: Any, iva_layer: int, d: int):
    from tokinteract.mllm import DistillationConfig, DistillationTrainer

    cfg = DistillationConfig(method=method, iva_layer=iva_layer, tpa_num_candidates=d, **extra)
    tr = DistillationTrainer(student, args, teacher=teacher if method != "sft" else None, distill=cfg)
    tr.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    return tr


def token_work(batch: dict[str, torch.Tensor], d: int) -> tuple[int, int]:
    """(real ground-truth tokens T, candidate slots N) of one step."""
    from tokinteract import shift_labels

    T = int(batch["attention_mask"].sum())
    N = d * int((shift_labels(batch["labels"]) != -100).sum())
    return T, N


def _text_params(model) -> tuple[int, int, int]:
    """(non-embedding language-model parameters, layers, hidden). A weight shared by several layers
    (``--share-frozen-layers``) counts once per layer that uses it: each layer does its own work."""
    lm = model.model.language_model
    n = sum(p.numel() for k, p in lm.named_parameters(remove_duplicate=False) if "embed_tokens" not in k)
    cfg = model.config.text_config
    return n, cfg.num_hidden_layers, cfg.hidden_size


def estimated_macs(v: str, student, teacher, batch: dict[str, torch.Tensor], d: int, vocab: int,
                   teacher_only: bool = False) -> float:
    """Rough multiply-accumulates of one step: 1 MAC per parameter per token (x3 with gradients),
    attention scores ``2 L H ctx``, the LM heads on the rows the loss needs (fused: supervised rows,
    + visual rows for IVA, + candidate rows for TPA; logits: every slot). Vision towers are left
    out (frozen, identical in every variant). ``teacher_only``: the teacher's share alone."""
    from tokinteract import shift_labels

    method, extra = VARIANTS[v]
    fused = extra.get("loss_impl", "fused") == "fused"
    packed = extra.get("tpa_forward") == "packed"
    tpa = method in ("tpa", "align_ti")
    iva = method in ("iva", "align_ti", "uniform_va")
    att = batch["attention_mask"]
    B, T = att.shape
    lens = att.sum(1).double()
    R = float((shift_labels(batch["labels"]) != -100).sum())
    N = d * R if tpa else 0.0
    vis = float(batch["visual_mask"].sum()) if iva else 0.0
    T2 = T + (d * int((shift_labels(batch["labels"]) != -100).sum(1).max()) if tpa else 0)
    rows = (R + N + vis) if fused else float(B * T2)

    def model_macs(m, grad: bool) -> float:
        n, L, H = _text_params(m)
        gt = float(lens.sum()) * n + float((lens**2).sum()) * L * H  # 2 L H ctx, ctx ~ len / 2
        cand = N * n + 2 * L * H * N * float(lens.mean())
        f = gt + cand + rows * vocab * H
        if grad and packed and tpa:
            f += gt  # the no-grad ground-truth pass Algorithm 1 runs before the packed pass
            return 3 * (f - gt) + gt
        return 3 * f if grad else f

    t_macs = model_macs(teacher, False) if method != "sft" else 0.0
    return t_macs if teacher_only else model_macs(student, True) + t_macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU shapes: student H=128 x2, teacher H=256 x4, 196 visual")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--teacher", choices=["1.5b", "7b"], default="1.5b", help="GPU teacher shape")
    ap.add_argument("--student", choices=["0.5b", "1.5b"], default="0.5b", help="GPU student shape")
    ap.add_argument("--attn", choices=["sdpa", "flex_attention"], default="sdpa",
                    help="text models' attention: sdpa (dense ribbon mask in packed passes) or flex_attention "
                         "(ribbon BlockMask; CUDA only)")
    ap.add_argument("--count-syncs", action="store_true",
                    help="count device->host syncs of one step per variant (torch.cuda.set_sync_debug_mode)")
    ap.add_argument("--real-shapes", action="store_true",
                    help="Qwen2-0.5B-shaped student, --teacher-shaped teacher, SigLIP-so400m tower (729 tokens) "
                         "on any device (the default on CUDA; on CPU it needs ~20 GiB in fp32 at --batch 1)")
    ap.add_argument("--batch", type=int, default=None, help="default 2 (CPU) / 4 (CUDA)")
    ap.add_argument("--visual", type=int, default=None, help="image tokens (CPU 196, CUDA 729: fixed by the tower)")
    ap.add_argument("--instruction", type=int, default=60)
    ap.add_argument("--response", type=int, default=100)
    ap.add_argument("--vocab", type=int, default=None, help="default 151,936 (Qwen2); --quick: 8,192")
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds after one warm-up round; best kept")
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                    help="default: all (kd_trl only when trl is installed)")
    ap.add_argument("--profile", default=None, choices=list(VARIANTS), help="cProfile + torch.profiler of one step")
    ap.add_argument("--name", default=None, help="results file stem (default bench_step_<device>)")
    ap.add_argument("--estimate", action="store_true",
                    help="only print the compute-model ratios for these shapes (models on the meta device, no run)")
    ap.add_argument("--breakdown", action="store_true",
                    help="time the parts of each step (student passes, teacher pass, sampling, loss, backward)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a loaded machine)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time each step by the process's CPU time (time.process_time, all threads) instead of "
                         "wall time: steadier on a shared machine; use with --threads 1 (no spinning threads)")
    ap.add_argument("--share-frozen-layers", action="store_true",
                    help="the frozen parts (both vision towers, the teacher's decoder layers) repeat one layer's "
                         "weights: same work per layer, a peak of ~11 GiB instead of ~20 GiB at --real-shapes --batch 1 on CPU "
                         "(see build_model_shared)")
    ap.add_argument("--sampling-cost", action="store_true",
                    help="only time TPA's candidate sampling at this batch's candidate rows (random hidden states, "
                         "a random [V, H] student head; no models): head alone, full-distribution draws, nucleus")
    ap.add_argument("--max-rss-gb", type=float, default=None,
                    help="stop the run (exit status 3) when the process's resident set exceeds this many GiB")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from _peers import trl_available

    if a.variants is None:
        a.variants = [v for v in VARIANTS if (v not in PEER_STEPS or trl_available()) and v not in UNSHARED + PREVIOUS]

    from transformers import TrainingArguments

    from tokinteract.mllm import set_trainable

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[a.dtype or ("bf16" if cuda else "fp32")]
    if cuda or a.real_shapes:
        s_shape, t_shape, vision = SHAPES[a.student], SHAPES[a.teacher], dict(GPU_VISION)
    else:
        s_shape, t_shape, vision = CPU_STUDENT, CPU_TEACHER, dict(CPU_VISION)
    vocab = a.vocab or (8192 if a.quick and not cuda else 151_936)
    image_token = vocab - 1
    n_vis = (vision["image_size"] // vision["patch_size"]) ** 2
    if a.visual is not None and a.visual != n_vis:
        side = int(round(a.visual**0.5))
        if side * side != a.visual:
            raise SystemExit("--visual must be a square number (patches of a square image)")
        vision["image_size"] = side * vision["patch_size"]
        n_vis = a.visual
    B = a.batch or (4 if cuda else 2)
    if a.estimate:
        with torch.device("meta"):
            st = build_model(vocab, image_token, s_shape, vision, None, dtype, "meta")
            te = build_model(vocab, image_token, t_shape, vision, None, dtype, "meta")
        b = build_batch(B, n_vis, a.instruction, a.response, vocab, image_token, vision["image_size"], 0, "cpu", dtype)
        T, N = token_work(b, a.d)
        print(f"estimate only (no run): B={B} T={T} N={N} token_ratio={(T + N) / T:.3f} vocab={vocab}")
        est = {v: estimated_macs(v, st, te, b, a.d, vocab) for v in a.variants}
        for v in a.variants:
            base = "kd_logits" if v.endswith("_logits") else "kd"
            share = estimated_macs(v, st, te, b, a.d, vocab, teacher_only=True) / est[v]
            print(f"  {v:>16}: estimated ratio vs {base} {est[v] / est[base]:.3f}, teacher's share of the step {share:.1%}")
        return
    if a.sampling_cost:
        sampling_cost(B, n_vis, a, s_shape, t_shape, vision, vocab, image_token, dtype, device)
        return
    if a.attn == "flex_attention" and not cuda:
        raise SystemExit("--attn flex_attention needs --device cuda (FlexAttention has no backward on CPU)")
    if a.max_rss_gb:
        rss_guard(a.max_rss_gb)
    with torch.device(device):  # initialise on the device: a 7B-shaped model is slow to build on the host
        if a.share_frozen_layers:
            student = build_model_shared(vocab, image_token, s_shape, vision, 1, dtype, device, share_text=False)
            teacher = build_model_shared(vocab, image_token, t_shape, vision, 2, dtype, device, share_text=True)
        else:
            student = build_model(vocab, image_token, s_shape, vision, 1, dtype, device)
            teacher = build_model(vocab, image_token, t_shape, vision, 2, dtype, device)
    for m in (student, teacher):
        m.set_attn_implementation({"text_config": a.attn})
    set_trainable(student, "finetune")
    batch = build_batch(B, n_vis, a.instruction, a.response, vocab, image_token, vision["image_size"], 0, device, dtype)
    T, N = token_work(batch, a.d)
    token_ratio = (T + N) / T
    tmp = tempfile.mkdtemp(prefix="bench_step_")
    targs = TrainingArguments(
        output_dir=tmp, use_cpu=not cuda, report_to=[], per_device_train_batch_size=B, save_strategy="no",
        disable_tqdm=True,
    )
    iva_layer = t_shape[1] // 2
    names = [a.profile] if a.profile else a.variants
    trl_check = None
    if any(v in PEER_STEPS for v in names):
        trl_check = trl_reference_check()
        print(f"TRL reference check (generalized_jsd_loss beta=0 vs tests/reference.py ref_kd_loss): |diff| = {trl_check:.2e}")
        if trl_check > 1e-5:
            raise SystemExit("TRL reference check failed")
    if a.breakdown:
        names = [v for v in names if v not in PEER_STEPS]  # the breakdown wraps the trainer's parts
    trainers = {v: make_trainer(student, teacher, *VARIANTS[v], targs, iva_layer, a.d) for v in names if v not in PEER_STEPS}
    student.train()

    def step(v: str) -> None:
        if v == "kd_trl":
            loss = trl_kd_loss(student, teacher, batch)
            loss.backward()
            student.zero_grad(set_to_none=True)
            return
        with variant_switches(v):
            loss = trainers[v].compute_loss(student, dict(batch))
            loss.backward()
        student.zero_grad(set_to_none=True)
        trainers[v]._part_sums = {}

    clock = time.process_time if a.cpu_time else time.perf_counter
    models_note = ("random weights; frozen parts (both vision towers, the teacher's decoder layers) repeat one layer's "
                   "weights (--share-frozen-layers)" if a.share_frozen_layers else "random weights, independent layers")
    print(f"device={device} dtype={dtype} B={B} T={T} N={N} token_ratio={token_ratio:.3f} vocab={vocab} d={a.d}")
    load0 = tuple(round(x, 2) for x in os.getloadavg())
    if a.profile:
        profile(step, a.profile, cuda)
        return
    if a.breakdown:
        info = {**machine_info(str(device)), "command": "python " + " ".join(sys.argv),
                "student": f"Qwen2 H={s_shape[0]} L={s_shape[1]}", "teacher": f"Qwen2 H={t_shape[0]} L={t_shape[1]}",
                "batch": f"B={B}, T={T} real tokens, N={N} candidate slots, vocab {vocab}",
                "load average (1/5/15 min) at start": str(load0), "models": models_note,
                "time": "process CPU time (time.process_time, all threads)" if a.cpu_time else "wall time"}
        breakdown(names, trainers, student, batch, a.rounds, cuda, a.name and a.name + "_breakdown", info, clock)
        return
    if a.count_syncs:
        count_syncs(names, step, cuda, a.name or f"bench_step_{device.type}_syncs",
                    {**machine_info(str(device)), "command": "python " + " ".join(sys.argv)})
        return
    best = {v: float("inf") for v in names}
    peak = {v: 0.0 for v in names}
    capture = {v: 0.0 for v in names}  # seconds of the IVA attention capture + weights in the best round
    sampled = {v: 0.0 for v in names}  # seconds of TPA's candidate sampling in the best round
    with timed_method_work(clock, cuda) as work:
        for r in range(a.rounds + 1):
            for v in names:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                work["capture"] = work["sampling"] = 0.0
                t0 = clock()
                step(v)
                if cuda:
                    torch.cuda.synchronize()
                dt = clock() - t0
                if cuda:
                    peak[v] = max(peak[v], (torch.cuda.max_memory_allocated() - base) / 2**20)
                if r > 0 and dt < best[v]:
                    best[v], capture[v], sampled[v] = dt, work["capture"], work["sampling"]
        if r > 0:
            print(f"round {r}: " + " ".join(f"{v}={best[v]:.3f}" for v in names), flush=True)

    est = {v: estimated_macs(v, student, teacher, batch, a.d, vocab) for v in names}
    rows = []
    for v in names:
        base_name = "kd_logits" if v.endswith("_logits") else "kd"
        if base_name not in best:
            base_name = "kd"
        uses_tpa = VARIANTS[v][0] in ("tpa", "align_ti")
        rows.append({
            "bench": "step", "variant": v, "positions": T + N if uses_tpa else T, "vocab": vocab, "d": a.d,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device), "time_s": best[v],
            "peak_mem_mb": peak[v] if cuda else "", "time_ratio": ratio(best[v], best.get(base_name, float("nan"))),
            "mem_ratio": ratio(peak[v], peak.get(base_name, 0.0)) if cuda else "", "baseline": base_name,
        })
    print_table(rows)
    print("estimated MAC ratio vs the same baseline (compute model, see estimated_macs):")
    for r in rows:
        b = r["baseline"]
        r["est_ratio"] = est[r["variant"]] / est[b] if b in est else float("nan")
        print(f"  {r['variant']:>16}: measured {r['time_ratio']:.3f}  estimated {r['est_ratio']:.3f}")
    verdicts = [f"token_ratio (T+N)/T = {token_ratio:.3f} (T={T} real tokens, N={N} candidate slots)"]

    def check(num: str, den: str, limit: float, what: str) -> None:
        if num in best and den in best:
            r_ = best[num] / best[den]
            ok = r_ <= limit
            e = est[num] / est[den]
            verdicts.append(
                f"{what}: {num}/{den} = {r_:.3f} vs target <= {limit:.3f}: {'MET' if ok else 'MISSED'} "
                f"(compute-model estimate of the same ratio: {e:.3f})"
            )

    check("align_ti", "kd", 1.05 * token_ratio, f"Align-TI (token_ratio {token_ratio:.3f} x 1.05)")
    check("iva", "kd", 1.03, "IVA")
    # issue 16: within 5% (Align-TI) / 3% (IVA) of the compute model's ratio
    for num, lim in (("align_ti", 1.05), ("align_ti_unshared", 1.05), ("align_ti_prev", 1.05), ("iva", 1.03)):
        if num in est and "kd" in est:
            check(num, "kd", lim * est[num] / est["kd"], f"{num} vs the compute model x {lim:.2f}")
    check("iva", "uniform_va", 1.03, "IVA attention capture (teacher weights vs uniform, same rows)")
    if "iva" in est and "kd" in est:
        check("iva_prev", "kd_prev", 1.03 * est["iva"] / est["kd"], "before the IVA change (iva_prev / kd_prev) vs the compute model x 1.03")
    def inclusive(v: str, lim: float, n_rows: int, rows: str, parts: list[tuple[str, float]]) -> list[str]:
        """The method-inclusive model of ``v``: the plain model's ratio plus the measured seconds of the work
        ``v`` needs that the MAC count leaves out (``parts``, in the best ``v`` step, and the vocabulary-wide
        softmax work of its ``n_rows`` extra loss rows), over KD's measured step; checked against ``lim`` x it."""
        softmax_s = softmax_work_seconds(n_rows, vocab, a.rounds, clock, device)
        plain, extra = est[v] / est["kd"], sum(sec for _, sec in parts) + softmax_s
        incl, r_ = plain + extra / best["kd"], best[v] / best["kd"]
        return [
            f"{v} work the compute model leaves out (measured in this run): "
            + "; ".join(f"{label} {sec:.3f} s" for label, sec in parts)
            + f" (in the best {v} step); vocabulary-wide softmax work of the {n_rows} {rows} rows (both "
            f"log-softmaxes, the KL and its gradient) {softmax_s:.3f} s",
            f"{v} vs the method-inclusive model x {lim:.2f}: {v}/kd = {r_:.3f} vs target <= {lim * incl:.3f}: "
            f"{'MET' if r_ <= lim * incl else 'MISSED'} (method-inclusive ratio {incl:.3f} = plain {plain:.3f} + "
            f"{extra:.3f} s / kd {best['kd']:.3f} s)",
        ]

    n_vis_rows = int(batch["visual_mask"].sum())
    if "iva" in best and "kd" in best:
        verdicts += inclusive("iva", 1.03, n_vis_rows, "visual",
                              [("attention capture at l* + instruction->vision weights", capture["iva"])])
    if "align_ti" in best and "kd" in best:  # also TPA's candidate sampling (head, softmax, top-p, draws)
        verdicts += inclusive("align_ti", 1.05, n_vis_rows + N, "visual + candidate",
                              [("attention capture + weights", capture["align_ti"]),
                               ("candidate sampling", sampled["align_ti"])])
    check("align_ti_logits", "kd_logits", 1.05 * token_ratio, "Align-TI, loss_impl=logits")
    check("iva_logits", "kd_logits", 1.03, "IVA, loss_impl=logits")
    verdicts += [
        f"{r['variant']}: time_ratio {r['time_ratio']:.3f} vs {r['baseline']}, compute-model estimate {r['est_ratio']:.3f}"
        for r in rows
    ]
    for line in verdicts:
        print(line)
    info = machine_info(str(device))
    header = {**info, "command": "python " + " ".join(sys.argv), "attention": a.attn,
              "student": f"Qwen2 H={s_shape[0]} L={s_shape[1]} heads={s_shape[2]}/{s_shape[3]} I={s_shape[4]}",
              "teacher": f"Qwen2 H={t_shape[0]} L={t_shape[1]} heads={t_shape[2]}/{t_shape[3]} I={t_shape[4]}",
              "vision": f"SigLIP H={vision['vision_hidden_size']} L={vision['vision_layers']} ({n_vis} tokens/image)",
              "batch": f"B={B}, real tokens T={T}, candidate slots N={N} (d={a.d}), token_ratio (T+N)/T={token_ratio:.3f}",
              "step": "compute_loss + backward + zero_grad, no optimizer update; best of interleaved rounds",
              "time": "process CPU time (time.process_time, all threads)" if a.cpu_time else "wall time",
              "peak memory": "torch.cuda.max_memory_allocated() - memory_allocated() around the step" if cuda
              else "not measured on CPU (all variants share one process)",
              **({"kd_trl": f"TRL-style KD step: {_peers.TRL_SOURCE}; reference check |diff| = {trl_check:.2e}"}
                 if trl_check is not None else {}),
              "models": models_note,
              "peak resident set (VmHWM)": f"{peak_rss_gb():.2f} GiB" if not cuda else "n/a",
              "load average (1/5/15 min) at start / end": f"{load0} / {tuple(round(x, 2) for x in os.getloadavg())}"}
    name = a.name or f"bench_step_{device.type}"
    paths = write_results(name, rows, header, verdicts)
    print("wrote", *paths)


@contextlib.contextmanager
def timed_method_work(clock, cuda: bool):
    """Accumulate into ``acc["capture"]`` the seconds spent in IVA's attention capture at ``l*``
    (``tokinteract.hf.capture._record``: the instruction rows' scores and softmax) and in the
    instruction->vision weights (``AttentionCapture.visual_importance``), and into
    ``acc["sampling"]`` those of TPA's candidate sampling (``tokinteract.fused.fused_sample_candidates``
    and the trainer's ``sample_candidates``: the student's head at the candidate rows, softmax,
    top-p selection, draws); restored afterwards."""
    import tokinteract.fused as fused_mod
    import tokinteract.mllm.trainer as tr_mod
    from tokinteract.hf import capture as cap_mod

    acc = {"capture": 0.0, "sampling": 0.0}
    saved = [(cap_mod, "_record", "capture"), (cap_mod.AttentionCapture, "visual_importance", "capture"),
             (fused_mod, "fused_sample_candidates", "sampling"), (tr_mod, "sample_candidates", "sampling")]
    originals = [(m, n, getattr(m, n)) for m, n, _ in saved]

    def timed(f, key):
        def g(*args, **kw):
            if cuda:
                torch.cuda.synchronize()
            t0 = clock()
            out = f(*args, **kw)
            if cuda:
                torch.cuda.synchronize()
            acc[key] += clock() - t0
            return out

        return g

    for (m, n, key), (_, _, f) in zip(saved, originals):
        setattr(m, n, timed(f, key))
    try:
        yield acc
    finally:
        for m, n, f in originals:
            setattr(m, n, f)


def softmax_work_seconds(rows: int, vocab: int, rounds: int, clock, device) -> float:
    """Seconds of the vocabulary-wide work of ``rows`` loss rows (IVA's visual rows, TPA's candidate rows) beyond their LM-head matmuls, best
    of ``rounds``: per chunk of the fused loss (``tokinteract._engine``'s chunk size, fp32), the
    student's and the teacher's ``log_softmax`` over ``V`` and the forward KL with its gradient
    (``tokinteract.divergence.divergence_and_grad``, buffers reused as in the loss). The compute
    model counts the rows' matmuls (``R V H``) only; any exact implementation also normalises both
    distributions over the vocabulary and forms ``S - T``, which is this."""
    from tokinteract._engine import _Scratch, resolve_chunk_size
    from tokinteract.divergence import divergence_and_grad

    C = resolve_chunk_size(None, vocab)
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(C, vocab, generator=g).to(device) for _ in range(2))
    coef = torch.full((C,), 1.0 / max(rows, 1), device=device)
    scratch = _Scratch(C, torch.float32, device).at(C, vocab)
    ybuf = scratch("logits_t")

    def one(n: int) -> None:
        lp = torch.log_softmax(x[:n], dim=-1, out=scratch.at(n, vocab)("log_s"))
        ybuf[:n].copy_(y[:n])
        divergence_and_grad(lp, ybuf[:n], kind="fkl", temperature=1.0, beta=0.5, alpha=0.1, need_grad=True,
                            coef=coef[:n], softmax_coef=torch.zeros_like(coef[:n]), student_log_probs=True,
                            scratch=scratch.at(n, vocab))

    copy_s = best = float("inf")
    for _ in range(max(rounds, 1) + 1):
        t0 = clock()
        for start in range(0, rows, C):
            one(min(C, rows - start))
        best = min(best, clock() - t0)
        t0 = clock()
        for start in range(0, rows, C):
            ybuf[: min(C, rows - start)].copy_(y[: min(C, rows - start)])
        copy_s = min(copy_s, clock() - t0)
    return max(best - copy_s, 0.0)  # the copy only refreshes the consumed teacher buffer


def sampling_cost(B: int, n_vis: int, a: Any, s_shape, t_shape, vision: dict, vocab: int, image_token: int, dtype,
                  device) -> None:
    """Seconds of TPA's candidate sampling at the batch's ``R`` candidate rows, best of ``--rounds``.

    What any implementation of TPA must do there, beyond the compute model (which counts the
    transformers and the loss's LM-head rows): the student's distribution at every candidate row
    (the LM head on ``R`` rows, ``R * V * H`` MACs, no gradient) and ``d`` draws from it
    (``strategy="multinomial"``: head + softmax + draws). Nucleus (top-p, the trainer's default)
    adds the selection of the top-p set, exactly as the sort-based definition: on flat rows (random
    weights) a full sort of each row (``key sort``: the int32 key sort of ``tokinteract.sampling``;
    ``float sort``: the previous one). Random hidden states ``N(0, 1)`` (unit RMS, like a final
    norm's output) and a random head ``N(0, 0.02)`` as the benchmark's models have, so the rows
    are as flat as in the step. Also prints the compute model's ratios with the sampling head added.
    """
    from tokinteract import sampling
    from tokinteract.fused import fused_sample_candidates

    batch = build_batch(B, n_vis, a.instruction, a.response, vocab, image_token, vision["image_size"], 0, "cpu", dtype)
    from tokinteract import shift_labels

    cmask = shift_labels(batch["labels"]) != -100
    R = int(cmask.sum())
    H = s_shape[0]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*cmask.shape, H, generator=g).to(device=device, dtype=dtype)
    head = (torch.randn(vocab, H, generator=g) * 0.02).to(device=device, dtype=dtype)
    cm = cmask.to(device)
    clock = time.process_time if a.cpu_time else time.perf_counter

    def run(strategy: str, key_sort: bool = True):
        sampling._KEY_SORT = key_sort
        try:
            return fused_sample_candidates(hidden, head, a.d, mask=cm, strategy=strategy,
                                           generator=torch.Generator(device=device).manual_seed(1))
        finally:
            sampling._KEY_SORT = True

    cases = {
        "head only (R x V x H)": lambda: torch.nn.functional.linear(hidden[cm], head),
        "multinomial (head + softmax + draws)": lambda: run("multinomial"),
        "nucleus, key sort (default)": lambda: run("nucleus"),
        "nucleus, float sort (previous)": lambda: run("nucleus", False),
    }
    best = {k: float("inf") for k in cases}
    for r in range(a.rounds + 1):
        for k, f in cases.items():
            t0 = clock()
            f()
            dt = clock() - t0
            if r > 0:
                best[k] = min(best[k], dt)
    assert torch.equal(run("nucleus"), run("nucleus", False)), "key sort and float sort must draw the same candidates"
    with torch.device("meta"):
        st = build_model(vocab, image_token, s_shape, vision, None, dtype, "meta")
        te = build_model(vocab, image_token, t_shape, vision, None, dtype, "meta")
    est = {v: estimated_macs(v, st, te, batch, a.d, vocab) for v in ("kd", "iva", "align_ti")}
    head_macs = R * vocab * H
    lines = [f"R={R} candidate rows, V={vocab}, H={H}, d={a.d}, {dtype}, {device}; best of {a.rounds} rounds "
             f"({'process CPU time' if a.cpu_time else 'wall time'}, {torch.get_num_threads()} thread(s))"]
    lines += [f"{k}: {best[k]:.3f} s" for k in cases]
    lines += [
        f"compute model: align_ti / kd = {est['align_ti'] / est['kd']:.3f}; with the sampling head (R x V x H = "
        f"{head_macs / 1e9:.1f} GMAC, {head_macs / est['kd']:.2%} of KD's step): "
        f"{(est['align_ti'] + head_macs) / est['kd']:.3f}",
        "method-inclusive ratio = compute-model ratio (with the sampling head) + the rest of sampling's seconds "
        "(softmax, draws, top-p selection) / KD's measured step: see benchmarks/results/SUMMARY.md",
    ]
    print("\n".join(lines))
    if a.name:
        from _common import RESULTS

        hdr = {**machine_info(str(device)), "command": "python " + " ".join(sys.argv),
               "load average (1/5/15 min) at end": str(tuple(round(x, 2) for x in os.getloadavg()))}
        md = [f"# {a.name}: TPA's candidate sampling at the step's rows", ""] + [f"- **{k}**: {v}" for k, v in hdr.items()]
        md += ["", "```", *lines, "```", ""]
        (RESULTS / f"{a.name}.md").write_text("\n".join(md))
        print("wrote", RESULTS / f"{a.name}.md")


def trl_kd_loss(student, teacher, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """TRL's GKD step without Liger (``GKDTrainer.compute_loss``): full logits of both models at every
    position, shifted, and TRL's ``generalized_jsd_loss(beta=0)`` over the supervised positions."""
    from _peers import trl_gkd_jsd

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    s_logits = student(**inputs).logits
    teacher.eval()
    with torch.no_grad():
        t_logits = teacher(**inputs).logits
    return trl_gkd_jsd(s_logits[:, :-1, :], t_logits[:, :-1, :], batch["labels"][:, 1:], beta=0.0)


def count_syncs(names: list[str], step, cuda: bool, name: str, header: dict[str, str]) -> None:
    """Device->host synchronisations of one step per variant (after one warm-up step each).

    Counted as the warnings ``torch.cuda.set_sync_debug_mode("warn")`` raises for synchronising
    CUDA calls (``.item()``, ``nonzero``, host copies, ...). On CPU there is nothing to count: the
    figure is written as ``n/a``. Writes ``<name>.csv`` (variant, syncs) and ``<name>.md``.
    """
    import csv
    import warnings

    from _common import RESULTS

    counts: dict[str, str] = {}
    for v in names:
        step(v)  # warm-up: lazy initialisation may synchronise once
        if not cuda:
            counts[v] = "n/a"
            continue
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(v)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts[v] = str(sum("synchroniz" in str(w.message) for w in caught))
    for v in names:
        print(f"{v:>16}: {counts[v]} device->host syncs per step")
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = RESULTS / f"{name}.csv", RESULTS / f"{name}.md"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "syncs_per_step"])
        w.writerows([v, counts[v]] for v in names)
    lines = [f"# {name}", ""] + [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["- **method**: one step per variant after a warm-up step, under torch.cuda.set_sync_debug_mode('warn'); "
              "count of its synchronisation warnings (n/a: not CUDA)", "", "| variant | syncs per step |", "|---|---|"]
    lines += [f"| {v} | {counts[v]} |" for v in names]
    md_path.write_text("\n".join(lines) + "\n")
    print("wrote", csv_path, md_path)


def trl_reference_check() -> float:
    """TRL's ``generalized_jsd_loss(beta=0)`` on shifted logits vs ``tests/reference.py``'s KD loss; |diff|."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference import ref_kd_loss

    from _peers import trl_gkd_jsd

    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 7, 11, generator=g), torch.randn(2, 7, 11, generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = -100
    labels[1, 5:] = -100
    got = trl_gkd_jsd(s[:, :-1], t[:, :-1], labels[:, 1:], beta=0.0)
    return abs(float(got) - float(ref_kd_loss(s, t, labels)))


def breakdown(names: list[str], trainers: dict, student, batch: dict, rounds: int, cuda: bool,
              name: str | None = None, header: dict[str, str] | None = None, clock=time.perf_counter) -> None:
    """Seconds per part of one step (best round per variant), by wrapping the functions the trainer calls.

    ``teacher``: ``teacher_pass`` (its forwards, under inference mode); ``teacher_head``: the
    teacher's LM head on the rows the loss reads (``head_rows``, ``logits`` path only); ``sampling``: candidate sampling
    (``fused_sample_candidates`` / ``sample_candidates``); ``expand``: ``tpa_expand``; ``loss``:
    the loss module (the fused loss also computes the LM-head gradients here); ``student+rest``:
    the rest of ``compute_loss`` (the student's forwards); ``backward``: ``loss.backward()``.
    Inside ``student+rest`` (nested): ``s.ground_truth`` (``student_pass``: the student's vision
    tower and ground-truth pass) and ``s.candidates`` (its candidate block over the KV cache,
    ``cached_candidate_forward``); ``t.candidates`` is the teacher's candidate block, inside ``t.decoder``;
    ``t.capture`` IVA's attention capture at ``l*`` (inside ``t.decoder``) and the instruction->vision
    weights (``_record``, ``AttentionCapture.visual_importance``).

    Inside ``teacher`` (nested, not added to the total again): ``t.vision`` (the teacher's vision
    tower and projector), ``t.decoder`` (its language model's forwards: the ground-truth pass, the
    candidate block, the IVA attention capture at ``l*``) and ``t.lm_head`` (its LM head module, which
    the teacher pass no longer runs: the ``logits`` path applies it in ``teacher_head``, the fused path
    sends the rows the losses need through it inside ``loss``). With ``name``, also writes ``<name>.md`` (the table, the shares, ``header``).
    """
    import tokinteract.fused as fused_mod
    import tokinteract.mllm.trainer as tr_mod

    acc: dict[str, float] = {}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(key: str, f):
        def g(*args, **kw):
            sync()
            t0 = clock()
            out = f(*args, **kw)
            sync()
            acc[key] = acc.get(key, 0.0) + clock() - t0
            return out

        return g

    saved = [
        (fused_mod, "fused_sample_candidates"), (tr_mod, "sample_candidates"), (tr_mod, "tpa_expand"),
        (tr_mod.DistillationTrainer, "teacher_pass"), (tr_mod, "head_rows"),
    ]
    import tokinteract.hf as hf_pkg

    from tokinteract.hf import capture as cap_mod

    saved += [(tr_mod.DistillationTrainer, "student_pass"), (hf_pkg, "cached_candidate_forward"),
              (cap_mod, "_record"), (cap_mod.AttentionCapture, "visual_importance")]
    originals = [(m, n, getattr(m, n)) for m, n in saved]
    keys = {"fused_sample_candidates": "sampling", "sample_candidates": "sampling", "tpa_expand": "expand",
            "teacher_pass": "teacher", "head_rows": "teacher_head", "student_pass": "s.ground_truth",
            "cached_candidate_forward": "candidates", "_record": "t.capture", "visual_importance": "t.capture"}

    def by_model(f):  # the candidate block of the student (s.*, inside student+rest) or of the teacher (t.*)
        ts, tt = timed("s.candidates", f), timed("t.candidates", f)
        return lambda model, *a, **k: (ts if model is student else tt)(model, *a, **k)

    try:
        for m, n, f in originals:
            setattr(m, n, by_model(f) if n == "cached_candidate_forward" else timed(keys[n], f))
        for tr in trainers.values():
            tr.loss_fn.forward = timed("loss", tr.loss_fn.forward)
        teacher = next(tr.teacher for tr in trainers.values() if tr.teacher is not None)
        inner = [(teacher.model.vision_tower, "t.vision"), (teacher.model.multi_modal_projector, "t.vision"),
                 (teacher.model.language_model, "t.decoder"), (teacher.lm_head, "t.lm_head")]
        for mod, key in inner:
            mod.forward = timed(key, mod.forward)
        best: dict[str, dict[str, float]] = {}
        for r in range(rounds + 1):
            for v in names:
                acc.clear()
                sync()
                with variant_switches(v):
                    t0 = clock()
                    loss = trainers[v].compute_loss(student, dict(batch))
                    sync()
                    t1 = clock()
                    loss.backward()
                    sync()
                    t2 = clock()
                student.zero_grad(set_to_none=True)
                trainers[v]._part_sums = {}
                parts = dict(acc)
                parts["student+rest"] = (t1 - t0) - sum(x for k, x in parts.items() if not k.startswith(("t.", "s.")))
                parts["backward"] = t2 - t1
                parts["total"] = t2 - t0
                if r > 0 and (v not in best or parts["total"] < best[v]["total"]):
                    best[v] = parts
    finally:
        for m, n, f in originals:
            setattr(m, n, f)
        for tr in trainers.values():
            tr.loss_fn.__dict__.pop("forward", None)
        for mod, _ in inner:
            mod.__dict__.pop("forward", None)
    cols = ["student+rest", "s.ground_truth", "s.candidates", "sampling", "expand", "teacher", "t.vision", "t.decoder",
            "t.candidates", "t.capture", "t.lm_head", "teacher_head", "loss", "backward", "total"]
    table = [f"{'variant':>16} " + " ".join(f"{c:>12}" for c in cols)]
    table += [f"{v:>16} " + " ".join(f"{best[v].get(c, 0.0):>12.4f}" for c in cols) for v in names]
    shares = [f"{v}: teacher {(best[v].get('teacher', 0.0) + best[v].get('teacher_head', 0.0)) / best[v]['total']:.1%} "
              f"of the step (vision {best[v].get('t.vision', 0.0) / best[v]['total']:.1%}, "
              f"decoder {best[v].get('t.decoder', 0.0) / best[v]['total']:.1%}, "
              f"LM head {(best[v].get('t.lm_head', 0.0) + best[v].get('teacher_head', 0.0)) / best[v]['total']:.1%}, "
              f"rest of the teacher pass {(best[v].get('teacher', 0.0) - sum(best[v].get(k, 0.0) for k in ('t.vision', 't.decoder', 't.lm_head'))) / best[v]['total']:.1%})"
              for v in names]
    print("seconds per part (best round; t.* are inside teacher):")
    print("\n".join(table + shares))
    if name:
        from _common import RESULTS

        header = {**(header or {}), "peak resident set (VmHWM)": f"{peak_rss_gb():.2f} GiB" if not cuda else "n/a",
                  "load average (1/5/15 min) at end": str(tuple(round(x, 2) for x in os.getloadavg()))}
        lines = [f"# {Path(name).name}: seconds per part of one step", ""]
        lines += [f"- **{k}**: {v}" for k, v in (header or {}).items()]
        lines += ["- **parts**: see `breakdown` in bench_step.py; `t.*` are inside `teacher`; best round per variant", "",
                  "```", *table, "```", "", "## Teacher share", ""] + [f"- {x}" for x in shares]
        path = RESULTS / f"{name}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        import csv

        with path.with_suffix(".csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", *cols])
            w.writerows([v, *(f"{best[v].get(c, 0.0):.4f}" for c in cols)] for v in names)
        print("wrote", path, path.with_suffix(".csv"))


def profile(step, v: str, cuda: bool) -> None:
    import cProfile
    import pstats

    step(v)  # warm-up
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with tprofile(activities=acts) as prof:
        step(v)
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30))
    pr = cProfile.Profile()
    pr.enable()
    step(v)
    pr.disable()
    pstats.Stats(pr).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
