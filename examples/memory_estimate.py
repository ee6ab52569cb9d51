"""Per-GPU memory estimate of a ``tokinteract-train`` recipe, for DDP, DeepSpeed ZeRO-2 and FSDP2.

Computed, not measured (:mod:`tokinteract.mllm.memory` lists every term and what it leaves
out). The recipe is parsed with the trainer's own argument parser; the models' sizes come
from their ``config.json`` (a local checkpoint folder, or :data:`REFERENCE_CONFIGS` for the
checkpoints of ``examples/configs``, so nothing is downloaded; any other Hub name is read
with ``AutoConfig.from_pretrained``, which fetches only the config).

    python examples/memory_estimate.py examples/configs/stage2_align_ti_qwen2.5-vl-7b_to_3b.yaml
    python examples/memory_estimate.py CONFIG.yaml --world_size 8 --markdown
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# The config.json values of the recipes' models that decide their sizes (Hugging Face Hub, model cards and
# config.json of each repository); the parameter counts these give are checked against the published
# ones in tests/mllm/test_mllm_recipes.py.
_QWEN25_VL_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
)
_QWEN25_VL_ROPE = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}
_SIGLIP_SO400M_896 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                          image_size=896, patch_size=14, vision_use_head=False)
_SIGLIP_B16_224 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16)


def _qwen25_vl(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tie: bool) -> dict[str, Any]:
    return dict(
        model_type="qwen2_5_vl", tie_word_embeddings=tie,
        text_config=dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tie, rope_parameters=_QWEN25_VL_ROPE),
        vision_config=dict(_QWEN25_VL_VISION, out_hidden_size=hidden),
    )


def _qwen3_vl(hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool, vision: dict[str, Any]) -> dict[str, Any]:
    return dict(
        model_type="qwen3_vl", tie_word_embeddings=tie,
        text_config=dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=128, vocab_size=151936, tie_word_embeddings=tie,
                         rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                                          "rope_theta": 5000000.0}),
        vision_config=dict(vision, out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_heads=16, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh"),
    )


def _gemma3(hidden: int, inter: int, layers: int, heads: int, kv: int) -> dict[str, Any]:
    return dict(
        model_type="gemma3", mm_tokens_per_image=256,
        text_config=dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=256, vocab_size=262208, sliding_window=1024),
        vision_config=_SIGLIP_SO400M_896,
    )


def _llava(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tie: bool) -> dict[str, Any]:
    return dict(
        model_type="llava", vision_feature_select_strategy="full", tie_word_embeddings=tie, image_seq_length=196,
        text_config=dict(model_type="qwen2", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tie),
        vision_config=dict(_SIGLIP_B16_224, model_type="siglip_vision_model"),
    )


REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-VL-7B-Instruct": _qwen25_vl(3584, 18944, 28, 28, 4, 152064, False),
    "Qwen/Qwen2.5-VL-3B-Instruct": _qwen25_vl(2048, 11008, 36, 16, 2, 151936, True),
    "Qwen/Qwen3-VL-8B-Instruct": _qwen3_vl(4096, 12288, 36, 32, 8, False, dict(
        depth=27, hidden_size=1152, intermediate_size=4304, deepstack_visual_indexes=[8, 16, 24])),
    "Qwen/Qwen3-VL-2B-Instruct": _qwen3_vl(2048, 6144, 28, 16, 8, True, dict(
        depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=[5, 11, 17])),
    "google/gemma-3-12b-it": _gemma3(3840, 15360, 48, 16, 8),
    "google/gemma-3-4b-it": _gemma3(2560, 10240, 34, 8, 4),
    # the paper's LLaVA (SigLIP-B/16 + 2-layer MLP + Qwen2.5): stage-1 outputs and the teacher of the recipes
    "runs/teacher-qwen2.5-7b": _llava(3584, 18944, 28, 28, 4, 152064, False),
    "runs/stage1-qwen2.5-0.5b": _llava(896, 4864, 24, 14, 2, 151936, True),
    "runs/stage1-qwen2.5-1.5b": _llava(1536, 8960, 28, 12, 2, 151936, True),
}


def load_model_config(checkpoint: str) -> Any:
    """The transformers config of ``checkpoint``: a local folder's config.json, a
    :data:`REFERENCE_CONFIGS` entry, else ``AutoConfig.from_pretrained`` (downloads the config)."""
    from transformers import AutoConfig

    if Path(checkpoint, "config.json").is_file() or checkpoint not in REFERENCE_CONFIGS:
        return AutoConfig.from_pretrained(checkpoint)
    kw = dict(REFERENCE_CONFIGS[checkpoint])
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def estimate_recipe(config_path: str | Path, *, world_size: int = 8) -> dict[str, Any]:
    """``{"student": ModelSize, "teacher": ModelSize | None, "trainable": int, "estimates": {strategy:
    MemoryEstimate}}`` of one recipe (parsed and validated with the trainer's parser)."""
    from tokinteract.mllm.cli import parse_args
    from tokinteract.mllm.memory import STRATEGIES, estimate_memory, model_size

    import tempfile

    import yaml

    from tokinteract.mllm.cli import load_config

    cfg = load_config(config_path)
    for key in ("deepspeed", "fsdp", "fsdp_config"):  # the strategy is the estimate's parameter, not the recipe's
        cfg.pop(key, None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, Path(config_path).stem + ".yaml")
        path.write_text(yaml.safe_dump(cfg))
        margs, dargs, dcfg, targs = parse_args([str(path), "--use_cpu", "true"])
    settings = dcfg.resolved()
    if not margs.student_checkpoint:
        raise ValueError(f"{config_path}: the estimate needs student_checkpoint (a checkpoint with a config.json)")
    student = model_size(load_model_config(margs.student_checkpoint))
    needs_teacher = any(settings[k] > 0 for k in ("kd", "iva", "tpa")) or settings["on_policy"]
    teacher = model_size(load_model_config(margs.teacher_checkpoint)) if needs_teacher else None
    trainable = student.trainable(
        vision_tower=margs.train_vision_tower,
        projector=True if margs.train_projector is None else margs.train_projector,
        language_model=margs.stage == "finetune" if margs.train_language_model is None else margs.train_language_model,
        lora_r=margs.lora_r,
    )
    common = dict(
        trainable=trainable, micro_batch=targs.per_device_train_batch_size, seq_len=dargs.max_length,
        world_size=world_size, param_bytes=2 if (targs.bf16 or targs.fp16 or margs.model_dtype in ("bfloat16", "float16")) else 4,
        gradient_checkpointing=bool(targs.activation_checkpointing),
        tpa_candidates=dcfg.tpa_num_candidates if settings["tpa"] > 0 else 0, tpa_forward=dcfg.tpa_forward,
        loss_impl=dcfg.loss_impl, chunk_rows=dcfg.loss_chunk_size,
    )
    estimates = {s: estimate_memory(student, teacher, strategy=s, **common) for s in STRATEGIES}
    return {"student": student, "teacher": teacher, "trainable": trainable, "estimates": estimates}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--world_size", type=int, default=8)
    p.add_argument("--markdown", action="store_true", help="one table row per recipe (the trainer guide's table)")
    a = p.parse_args(argv)
    if a.markdown:
        print("| recipe | student / teacher params | trainable | DDP | ZeRO-2 | FSDP2 |")
        print("|---|---|---|---|---|---|")
    for path in a.configs:
        r = estimate_recipe(path, world_size=a.world_size)
        s, t = r["student"], r["teacher"]
        tt = f"{t.total / 1e9:.2f} B" if t is not None else "-"
        gib = {k: e.gib()["total"] for k, e in r["estimates"].items()}
        if a.markdown:
            print(f"| `{Path(path).name}` | {s.total / 1e9:.2f} B / {tt} | {r['trainable'] / 1e9:.2f} B | "
                  f"{gib['ddp']} GiB | {gib['zero2']} GiB | {gib['fsdp2']} GiB |")
            continue
        print(f"{path}: student {s.total / 1e9:.2f} B params, teacher {tt}, trainable {r['trainable'] / 1e9:.2f} B, "
              f"{a.world_size} GPUs (estimate, GiB per GPU)")
        for strategy, e in r["estimates"].items():
            print(f"  {strategy:6s} {e.gib()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
