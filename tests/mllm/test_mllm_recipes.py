"""The recipes of examples/configs (issue 13 item 5): every launch line parses with the trainer's parser,
the FSDP2 configs wrap layers the models have, the memory estimate (tokinteract.mllm.memory and
examples/memory_estimate.py) counts what it says, and the Gemma 3 recipe trains on tiny local checkpoints."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import families as fx  # noqa: E402
from mllm_helpers import save_pair  # noqa: E402
from test_mllm_families_trainer import data  # noqa: E402, F401  (the fixture: 3 samples, 2 images, one text-only)

from tokinteract.mllm.cli import build_everything, load_config, parse_args  # noqa: E402
from tokinteract.mllm.memory import GiB, ModelSize, estimate_memory, model_size  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("stage2_align_ti_*.yaml"))


def _script():
    spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "examples" / "memory_estimate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _launch_lines(path: Path) -> dict[str, list[str]]:
    """``{strategy label: the arguments after -m tokinteract.mllm.cli}`` of the recipe's launch comments."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") and "-m tokinteract.mllm.cli" in line:
            label, cmd = line.lstrip("# ").split(":", 1)
            argv = shlex.split(cmd)
            out[label.strip()] = argv[argv.index("tokinteract.mllm.cli") + 1 :]
    return out


def test_the_new_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {"stage2_align_ti_qwen2.5-vl-7b_to_3b.yaml", "stage2_align_ti_qwen3-vl-8b_to_2b.yaml",
            "stage2_align_ti_gemma-3-12b_to_4b.yaml", "stage2_align_ti_qwen2.5-7b_to_0.5b.yaml",
            "stage2_align_ti_qwen2.5-7b_to_1.5b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_launch_line_parses(path, monkeypatch) -> None:
    """torchrun (DDP), DeepSpeed ZeRO-2 and FSDP2 lines of each recipe parse with the CLI's parser; the
    ZeRO-2 file is stage 2; the FSDP2 file is version 2 and names layer classes the student has."""
    from transformers import AutoModelForImageTextToText

    monkeypatch.chdir(ROOT)
    lines = _launch_lines(path)
    assert {"torchrun (DDP)", "DeepSpeed ZeRO-2", "FSDP2"} <= lines.keys(), lines.keys()
    script = _script()
    student = load_config(path)["student_checkpoint"]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(script.load_model_config(student))
    classes = {type(m).__name__ for m in model.modules()}
    for label, argv in lines.items():
        assert argv[0] == f"examples/configs/{path.name}", label
        margs, dargs, dcfg, targs = parse_args([*argv, "--use_cpu", "true"])
        dcfg.resolved()
        if label == "DeepSpeed ZeRO-2":
            assert json.loads(Path(targs.deepspeed).read_text())["zero_optimization"]["stage"] == 2
        if label == "torchrun (DDP)":
            assert not targs.deepspeed and not targs.fsdp
        if label == "FSDP2":
            assert targs.fsdp and not targs.deepspeed and targs.fsdp_config["version"] == 2
            wrap = targs.fsdp_config["transformer_layer_cls_to_wrap"]
            assert wrap and set(wrap) <= classes, set(wrap) - classes
        # Table 11, fine-tuning column; d = 4
        assert (targs.learning_rate, targs.num_train_epochs, targs.weight_decay) == (2e-5, 1, 0.0)
        assert targs.per_device_train_batch_size * targs.gradient_accumulation_steps * 8 == 128
        assert targs.lr_scheduler_type == "cosine" and targs.warmup_steps == 0.03 and targs.bf16
        assert dargs.max_length == 2048 and dcfg.tpa_num_candidates == 4 and dcfg.method == "align_ti"
        assert not margs.train_vision_tower


# published parameter counts (model cards / safetensors metadata)
PUBLISHED = {
    "Qwen/Qwen2.5-VL-7B-Instruct": 8_292_166_656,
    "Qwen/Qwen2.5-VL-3B-Instruct": 3_754_622_976,
    "google/gemma-3-12b-it": 12_187_325_040,
    "google/gemma-3-4b-it": 4_300_079_472,
}


def test_reference_configs_give_the_published_parameter_counts() -> None:
    script = _script()
    for name, count in PUBLISHED.items():
        assert model_size(script.load_model_config(name)).total == count, name
    # Qwen3-VL: 8.77 B and 2.13 B on the model cards (rounded there)
    assert round(model_size(script.load_model_config("Qwen/Qwen3-VL-8B-Instruct")).total / 1e7) == 877
    assert round(model_size(script.load_model_config("Qwen/Qwen3-VL-2B-Instruct")).total / 1e7) == 213
    # the paper's LLaVA students: Qwen2.5-0.5B / 1.5B language models (494 M / 1.54 B with the LM head tied)
    assert model_size(script.load_model_config("runs/stage1-qwen2.5-0.5b")).language_model == 494_032_768
    assert model_size(script.load_model_config("runs/stage1-qwen2.5-1.5b")).language_model == 1_543_714_304


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "qwen3_vl", "gemma3", "internvl", "smolvlm"])
def test_model_size_counts_the_real_model(name) -> None:
    """On the meta device == the real tiny model's parameters per part; lora_per_rank == the adapter size at r=1."""
    from tokinteract.mllm.lora import apply_lora
    from tokinteract.mllm.model import model_parts

    model = fx.make_model(name)
    size = model_size(model.config)
    parts = model_parts(model)
    numel = dict((n, p.numel()) for n, p in model.named_parameters())
    assert size.total == sum(numel.values()) == sum(p.numel() for p in model.parameters())
    for part in ("vision_tower", "projector", "language_model"):
        assert getattr(size, part) == sum(numel[n] for n in parts[part]), part
    tc = model.config.get_text_config()
    assert (size.hidden_size, size.num_layers, size.vocab_size) == (tc.hidden_size, tc.num_hidden_layers, tc.vocab_size)
    lora = apply_lora(model, r=1, alpha=1.0, train_projector=False)
    assert size.lora_per_rank == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert size.trainable(lora_r=3, projector=False) == 3 * size.lora_per_rank
    assert size.trainable(lora_r=3) == 3 * size.lora_per_rank + size.projector
    assert size.trainable() == size.projector + size.language_model
    assert size.trainable(vision_tower=True) == size.total


SIZE = ModelSize(total=1000, vision_tower=100, projector=50, language_model=850, hidden_size=8, num_layers=3,
                 vocab_size=64, num_kv_heads=2, head_dim=4, lora_per_rank=10)
TEACHER = ModelSize(total=3000, vision_tower=100, projector=60, language_model=2840, hidden_size=16, num_layers=5,
                    vocab_size=64, num_kv_heads=2, head_dim=8, lora_per_rank=20)


def test_estimate_memory_terms_by_hand() -> None:
    kw = dict(trainable=600, micro_batch=2, seq_len=10, world_size=4, param_bytes=2)
    ddp = estimate_memory(SIZE, TEACHER, strategy="ddp", **kw)
    assert (ddp.student_weights, ddp.teacher_weights, ddp.gradients, ddp.optimizer) == (2000, 6000, 1200, 2400)
    assert ddp.activations == 3 * 34 * 10 * 2 * 8  # layers * 34 s b h (16-bit)
    assert ddp.logits == 2 * 3 * (2**24 // 64) * 64 * 4 and ddp.teacher_cache == 0
    z2 = estimate_memory(SIZE, TEACHER, strategy="zero2", **kw)
    assert (z2.student_weights, z2.gradients, z2.optimizer) == (2000, 300, 600 * 12 // 4)
    f2 = estimate_memory(SIZE, TEACHER, strategy="fsdp2", **kw)
    assert (f2.student_weights, f2.teacher_weights, f2.gradients, f2.optimizer) == (500, 6000, 300, 600)
    assert f2.total == sum([500, 6000, 300, 600, f2.activations, f2.logits, 0])
    # TPA: d candidates on response_fraction of the tokens; the teacher's cache of the ground-truth pass
    tpa = estimate_memory(SIZE, TEACHER, strategy="ddp", tpa_candidates=4, response_fraction=0.5, **kw)
    assert tpa.activations == 3 * 34 * (10 + 20) * 2 * 8
    assert tpa.teacher_cache == 2 * 5 * 2 * 8 * 10 * 2 * 2
    assert estimate_memory(SIZE, TEACHER, strategy="ddp", tpa_candidates=4, tpa_forward="packed", **kw).teacher_cache == 0
    ckpt = estimate_memory(SIZE, TEACHER, strategy="ddp", gradient_checkpointing=True, **kw)
    assert ckpt.activations == 3 * 2 * 10 * 2 * 8 + 34 * 10 * 2 * 8
    full = estimate_memory(SIZE, TEACHER, strategy="ddp", loss_impl="logits", **kw)
    assert full.logits == 2 * 10 * 64 * (2 + 12) + 2 * 10 * 64 * (2 + 4)
    alone = estimate_memory(SIZE, None, strategy="ddp", **kw)
    assert alone.teacher_weights == 0 and alone.logits == 3 * (2**24 // 64) * 64 * 4
    assert ddp.gib()["total"] == round(ddp.total / GiB, 1)


def test_estimate_memory_refuses_bad_input() -> None:
    kw = dict(trainable=10, micro_batch=1, seq_len=8)
    with pytest.raises(ValueError, match=r"strategy must be one of \('ddp', 'zero2', 'fsdp2'\), got 'zero3'"):
        estimate_memory(SIZE, None, strategy="zero3", **kw)
    with pytest.raises(ValueError, match="micro_batch must be an int >= 1, got 0"):
        estimate_memory(SIZE, None, **{**kw, "micro_batch": 0})
    with pytest.raises(ValueError, match="loss_impl must be"):
        estimate_memory(SIZE, None, loss_impl="chunked", **kw)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_memory_estimate_script_on_every_recipe(path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    script = _script()
    r = script.estimate_recipe(path)
    e = r["estimates"]
    assert r["teacher"] is not None and 0 < r["trainable"] < r["student"].total
    assert e["fsdp2"].total < e["zero2"].total < e["ddp"].total
    assert e["ddp"].teacher_weights == r["teacher"].total * 2  # bf16, whole on every GPU
    assert script.main([str(path), "--markdown"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| `{path.name}` |") and f"{e['zero2'].gib()['total']} GiB" in row
    assert row in (ROOT / "docs" / "guides" / "trainer.md").read_text().splitlines()  # the guide's table is current


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_gemma3_recipe_trains_with_tiny_local_checkpoints(tmp_path, data, lora) -> None:
    """The recipe as shipped (gradient checkpointing, align_ti, d = 4, its IVA layer scaled to the tiny
    teacher), only checkpoints, data, sizes and precision replaced: two steps train the student; with LoRA
    (under gradient checkpointing) the adapters get gradients and move."""
    cfg = load_config(CONFIGS / "stage2_align_ti_gemma-3-12b_to_4b.yaml")
    ckpts = save_pair(tmp_path, lambda seed: fx.make_model("gemma3", seed=seed), lambda: fx.make_processor("gemma3"))
    cfg.update({f"{role}_checkpoint": str(path) for role, path in ckpts.items()})
    cfg.update(
        data_path=str(data), image_folder=str(data.parent), output_dir=str(tmp_path / "out"), iva_layer=1,
        model_dtype="float32", bf16=False, use_cpu=True, per_device_train_batch_size=2, gradient_accumulation_steps=1,
        max_steps=2, logging_steps=1, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, preflight_cache_dir="",
        learning_rate=1e-2,
    )
    if lora:  # the projector frozen too: the checkpointed layers' inputs do not require grad
        cfg.update(lora_r=4, lora_alpha=8.0, train_projector=False)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    tr = build_everything(*parse_args([str(tmp_path / "cfg.yaml")]))
    assert tr.args.activation_checkpointing and tr.args.gradient_checkpointing
    before = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    tr.train()
    logs = [h for h in tr.state.log_history if "loss_tpa" in h]
    assert logs and all(np.isfinite(h[k]) for h in logs for k in ("loss", "loss_kd", "loss_iva", "loss_tpa"))
    after = tr.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if lora:
        lora_b = {k for k in before if "lora_B" in k}
        assert lora_b and lora_b <= changed  # every checkpointed layer passed its gradient to its adapters
        assert all("lora_" in k or "modules_to_save" in k for k in changed)
    else:
        assert any("language_model" in k for k in changed) and not any("vision_tower" in k for k in changed)
