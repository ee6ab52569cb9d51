"""LoRA students (tokinteract.mllm.lora; issue 13 item 4): every method, fused == logits through the
PeftModel wrapper, only the adapters (and the projector) train, the saved adapter and the merged export
reload to the trained model's outputs, resume and DDP."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import families as fx  # noqa: E402
from mllm_helpers import ddp_ranks, one_step, save_pair  # noqa: E402
from mllm_helpers import tiny_config as _config  # noqa: E402
from test_mllm_families_trainer import data  # noqa: E402, F401  (the fixture: 3 samples, 2 images, one text-only)

from tokinteract.hf.families import visual_token_ids  # noqa: E402
from tokinteract.mllm import DistillationConfig, DistillationTrainer  # noqa: E402
from tokinteract.mllm.cli import build_everything, main, parse_args  # noqa: E402
from tokinteract.mllm.lora import (  # noqa: E402
    apply_lora,
    lora_target_regex,
    merge_and_save,
    projector_modules,
    unwrap_peft,
)
from tokinteract.mllm.processor_data import ProcessorCollator, ProcessorDataset  # noqa: E402

FAMILIES = ["llava", "qwen2_5_vl"]


def _lora(model, seed: int = 5, **kw):
    """A LoRA student whose B matrices are random (peft starts them at 0, which would make every gradient of
    the A matrices 0 and the adapted model equal to its base: comparisons that cannot fail)."""
    peft_model = apply_lora(model, r=kw.pop("r", 4), alpha=kw.pop("alpha", 8.0), **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model


def _trainer(tmp_path, data, name, student, teacher, distill):
    proc = fx.make_processor(name)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, learning_rate=1e-3, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )
    return DistillationTrainer(
        student, args, teacher=teacher, distill=distill, train_dataset=ProcessorDataset(data, data.parent, proc),
        data_collator=ProcessorCollator(proc, visual_token_ids(unwrap_peft(student))), processing_class=proc,
    )


def _step(tmp_path, data, name, student, teacher, distill):
    tr = _trainer(tmp_path, data, name, student, teacher, distill)
    return one_step(tr, student, tr.data_collator([tr.train_dataset[i] for i in range(len(tr.train_dataset))]))


# ------------------------------------------------------------------------------------------ targets, wrapping


@pytest.mark.parametrize("name", fx.FAMILIES)
def test_default_targets_are_the_language_models_projections_only(name) -> None:
    model = fx.make_model(name)
    peft_model = apply_lora(model, r=2, alpha=4.0)
    lora = [n for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)
    assert all((".language_model." in n or ".text_model." in n) for n in lora), lora[:3]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    modules, loose = projector_modules(fx.make_model(name))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trainable and all(".modules_to_save." in n for n in trainable)  # the projector, a trained copy
    assert all(any(m in n for m in modules) for n in trainable)
    frozen_lm = [n for n, p in peft_model.named_parameters() if not p.requires_grad and "layers.0.mlp" in n]
    assert frozen_lm  # the language model's base weights stay frozen
    assert unwrap_peft(peft_model) is model and unwrap_peft(model) is model
    if name == "llava_onevision":
        assert loose == ["model.image_newline"]


def test_bad_lora_arguments_are_refused(tmp_path, synth) -> None:
    model = fx.make_model("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"lora_target_modules \['qkv'\] match no linear layer .*'q_proj'"):
        lora_target_regex(model, ["qkv"])  # the vision tower's name: never adapted
    with pytest.raises(TypeError, match="lora_target_modules must be a non-empty list"):
        lora_target_regex(model, [])
    with pytest.raises(ValueError, match="lora_r must be an int >= 1, got 0"):
        apply_lora(model, r=0, alpha=1.0)
    with pytest.raises(ValueError, match="lora_dropout must lie in"):
        apply_lora(model, r=2, alpha=1.0, dropout=1.5)
    with pytest.raises(ValueError, match="train_language_model=True with lora_r > 0"):
        build_everything(*parse_args([str(_config(tmp_path, synth, lora_r=4, train_language_model=True))]))
    with pytest.raises(ValueError, match="train_vision_tower=True with lora_r > 0"):
        build_everything(*parse_args([str(_config(tmp_path, synth, lora_r=4, train_vision_tower=True))]))
    with pytest.raises(ValueError, match="lora_merge_on_save needs a LoRA student"):
        build_everything(*parse_args([str(_config(tmp_path, synth, lora_merge_on_save=True))]))
    with pytest.raises(ValueError, match="lora_r must be an int >= 0"):
        build_everything(*parse_args([str(_config(tmp_path, synth, lora_r=-1))]))


# -------------------------------------------------------------------------------- one step: fused == logits


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("forward", ["cached", "packed"])
def test_lora_align_ti_step_fused_equals_logits(tmp_path, data, name, forward) -> None:
    """Through the PeftModel wrapper: loss, parts and every LoRA / projector gradient equal between the fused
    and the logits loss; no frozen parameter gets a gradient; the logits path equals the same step on the
    merged model (the wrapper changes nothing but the weights)."""
    teacher = fx.make_model(name, seed=2)
    student = _lora(fx.make_model(name, seed=1))
    steps = {}
    for impl in ("logits", "fused"):
        cfg = DistillationConfig(method="align_ti", iva_layer=1, loss_impl=impl, tpa_forward=forward)
        steps[impl] = _step(tmp_path / impl, data, name, student, teacher, cfg)
    (la, pa, ga), (lb, pb, gb) = steps["logits"], steps["fused"]
    assert pa["tpa"] > 0 and pa["iva"] > 0 and pa["kd"] > 0 and pa.keys() == pb.keys()
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)
    for k in pa:
        assert pb[k] == pytest.approx(pa[k], rel=1e-5, abs=1e-6), k
    assert ga.keys() == gb.keys()
    assert {k for k in ga if "lora_A" in k} and {k for k in ga if "lora_B" in k}
    assert all("lora_" in k or ".modules_to_save." in k for k in ga), [k for k in ga if "lora_" not in k][:3]
    assert all(float(ga[k].abs().max()) > 0 for k in ga if "lora_A" in k)  # B is random: A's gradients are real
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=max(1e-6, 1e-5 * float(ga[k].abs().max())), msg=k)
    # the same logits step on a plain model holding the merged weights: the same loss and parts
    merged = fx.make_model(name, seed=1)
    merged.load_state_dict(_merged_state(student), strict=True)
    lm, pm, _ = _step(tmp_path / "merged", data, name, merged, teacher,
                      DistillationConfig(method="align_ti", iva_layer=1, loss_impl="logits", tpa_forward=forward))
    assert lm == pytest.approx(la, rel=1e-4)
    for k in pa:
        assert pm[k] == pytest.approx(pa[k], rel=1e-4, abs=1e-6), k


def _merged_state(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA update folded in and the projector's trained copy, computed
    by hand (W + alpha / r * B A), not by peft's merge: an independent check of the adapted model."""
    inner = unwrap_peft(peft_model)
    out = {}
    scale = {}
    for n, m in inner.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            scale[n] = m.scaling["default"]
    for k, v in inner.state_dict().items():
        if "lora_" in k or ".original_module." in k:
            continue
        key = k.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        mod = k.rsplit(".base_layer.", 1)[0] if ".base_layer." in k else None
        if mod is not None and k.endswith("weight"):
            sub = inner.get_submodule(mod)
            v = v + scale[mod] * sub.lora_B["default"].weight @ sub.lora_A["default"].weight
        out[key] = v.detach().clone()
    return out


@pytest.mark.parametrize(
    "method", ["sft", "kd", "iva", "tpa", "align_ti", "uniform_va", "rkl", "jsd", "skew_kl"]
)
def test_every_method_fused_equals_logits_on_a_lora_qwen2_5_vl(tmp_path, data, method) -> None:
    teacher = fx.make_model("qwen2_5_vl", seed=2)
    student = _lora(fx.make_model("qwen2_5_vl", seed=1))
    res = {}
    for impl in ("logits", "fused"):
        cfg = DistillationConfig(method=method, iva_layer=1, loss_impl=impl)
        res[impl] = _step(tmp_path / impl, data, "qwen2_5_vl", student, teacher if method != "sft" else None, cfg)
    (la, pa, ga), (lb, pb, gb) = res["logits"], res["fused"]
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6) and pa.keys() == pb.keys()
    assert ga.keys() == gb.keys() and ga and all("lora_" in k or ".modules_to_save." in k for k in ga)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=max(1e-6, 1e-5 * float(ga[k].abs().max())), msg=k)


@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
def test_liger_backend_equals_tokinteract_on_a_lora_student(tmp_path, data, divergence) -> None:
    pytest.importorskip("liger_kernel")
    teacher = fx.make_model("qwen2_5_vl", seed=2)
    student = _lora(fx.make_model("qwen2_5_vl", seed=1))
    res = {}
    for backend in ("tokinteract", "liger"):
        cfg = DistillationConfig(method="tpa", divergence=divergence, loss_backend=backend, loss_liger_compiled=False)
        res[backend] = _step(tmp_path / backend, data, "qwen2_5_vl", student, teacher, cfg)
    (la, pa, ga), (lb, pb, gb) = res["tokinteract"], res["liger"]
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)
    for k in pa:
        assert pb[k] == pytest.approx(pa[k], rel=1e-5, abs=1e-6), k
    assert ga.keys() == gb.keys() and any("lora_A" in k for k in ga)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=max(1e-6, 1e-5 * float(ga[k].abs().max())), msg=k)


# ----------------------------------------------------------------------- train, save, reload, merge (CLI)


@pytest.mark.parametrize("method", ["sft", "kd", "iva", "tpa", "align_ti", "uniform_va", "rkl", "jsd", "skew_kl", "gkd"])
def test_every_method_trains_a_lora_tiny_llava_through_the_cli(tmp_path, synth, method) -> None:
    """Two steps of every method (GKD: on-policy generation through the wrapper too): only the adapters and
    the projector's trained copy change."""
    extra = dict(gkd_lambda=1.0, gkd_max_new_tokens=4) if method == "gkd" else {}
    tr = build_everything(*parse_args([str(_config(tmp_path, synth, method=method, lora_r=4, lora_alpha=8.0,
                                                   learning_rate=1e-2, **extra))]))
    assert isinstance(tr.model, PeftModel)
    before = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    tr.train()
    after = tr.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in changed if "lora_B" in k}, method  # B starts at 0 and moves
    assert all("lora_" in k or ".modules_to_save." in k for k in changed), sorted(changed)[:3]
    assert all(np.isfinite(h["loss"]) for h in tr.state.log_history if "loss" in h)
    if method == "gkd":
        assert max(h.get("on_policy_batches", 0) for h in tr.state.log_history) >= 1


def _outputs(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if not k.endswith("_mask") or k == "attention_mask"}
    inputs.pop("labels")
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.parametrize("name", ["gemma3"])  # a checkpoint with its processor: Qwen-VL processors need torchvision
def test_cli_lora_adapter_and_merged_export_reload_to_the_trained_model(tmp_path, data, name) -> None:
    """tokinteract-train with lora_r and lora_merge_on_save: output_dir holds the adapter, which
    PeftModel.from_pretrained loads on the base; output_dir/merged a standard checkpoint that
    AutoModelForImageTextToText loads and generates with (no peft). Both give the trained model's logits."""
    import yaml
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ckpts = save_pair(tmp_path, lambda seed: fx.make_model(name, seed=seed), lambda: fx.make_processor(name))
    out = tmp_path / "out"
    cfg = dict(
        student_checkpoint=str(ckpts["student"]), teacher_checkpoint=str(ckpts["teacher"]), method="align_ti",
        iva_layer=1, data_path=str(data), image_folder=str(data.parent), output_dir=str(out),
        per_device_train_batch_size=3, max_steps=2, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, learning_rate=1e-2, disable_tqdm=True, seed=0, preflight_cache_dir="",
        lora_r=4, lora_alpha=8.0, lora_merge_on_save=True,
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # the trained model in memory: the same run through build_everything
    tr = build_everything(*parse_args([str(tmp_path / "cfg.yaml")]))
    tr.train()
    assert main([str(tmp_path / "cfg.yaml"), "--output_dir", str(out), "--overwrite_output_dir", "true"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    proc = AutoProcessor.from_pretrained(out / "merged")
    ds = ProcessorDataset(data, data.parent, proc)
    batch = ProcessorCollator(proc, visual_token_ids(fx.make_model(name)))([ds[i] for i in range(len(ds))])
    trained = _outputs(tr.model, batch)
    base = AutoModelForImageTextToText.from_pretrained(ckpts["student"])
    base_out = _outputs(base, batch)
    assert (trained - base_out).abs().max() > 1e-3  # it trained
    adapter = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_outputs(adapter, batch), trained, rtol=1e-5, atol=1e-5)
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")
    assert not any("lora" in k or "modules_to_save" in k for k in merged.state_dict())
    torch.testing.assert_close(_outputs(merged, batch), trained, rtol=1e-4, atol=1e-4)
    vt = [k for k in base.state_dict() if k.startswith(("model.visual.", "model.vision_tower.")) and "merger" not in k]
    assert vt and all(torch.equal(merged.state_dict()[k], base.state_dict()[k]) for k in vt)  # tower untouched
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this picture"}]}]
    text = proc.tokenizer.apply_chat_template(msgs, chat_template=proc.chat_template, tokenize=False)
    inputs = proc(text=[text], images=[[Image.open(data.parent / "a.png").convert("RGB")]], return_tensors="pt")
    gen = merged.eval().generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    # the export command on the saved adapter gives the same checkpoint
    from tokinteract.mllm.lora import main as lora_main

    assert lora_main(["merge", str(out), str(tmp_path / "merged2")]) == 0
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged2")
    torch.testing.assert_close(_outputs(again, batch), _outputs(merged, batch), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "internvl"])
def test_adapter_and_merged_export_reload_without_the_cli(tmp_path, data, name) -> None:
    """The families whose processors this machine cannot save (no torchvision): the adapter saved by
    PeftModel.save_pretrained and the merged checkpoint reload to the adapted model's logits."""
    from transformers import AutoModelForImageTextToText

    student = _lora(fx.make_model(name, seed=1))
    proc = fx.make_processor(name)
    ds = ProcessorDataset(data, data.parent, proc)
    batch = ProcessorCollator(proc, visual_token_ids(unwrap_peft(student)))([ds[i] for i in range(len(ds))])
    adapted = _outputs(student, batch)
    assert (adapted - _outputs(fx.make_model(name, seed=1), batch)).abs().max() > 1e-3
    student.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(fx.make_model(name, seed=1), tmp_path / "adapter")
    torch.testing.assert_close(_outputs(reloaded, batch), adapted, rtol=1e-5, atol=1e-6)
    merge_and_save(student, tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == fx.family(name).model_cls
    torch.testing.assert_close(_outputs(merged, batch), adapted, rtol=1e-4, atol=1e-5)
    ids = torch.tensor([fx.word_ids(name)[:5]])  # a text-only prompt: generation with transformers alone
    gen = merged.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 3


def test_merge_and_save_refuses_a_plain_model(tmp_path) -> None:
    with pytest.raises(TypeError, match="must be a peft.PeftModel to merge, got Qwen2_5_VLForConditionalGeneration"):
        merge_and_save(fx.make_model("qwen2_5_vl"), tmp_path)


def test_lora_resume_reaches_the_same_weights(tmp_path, synth) -> None:
    """Interrupted after the step-2 checkpoint (an adapter checkpoint) and resumed == uninterrupted."""
    from test_mllm_cli import full_and_resumed

    full, first, resumed = full_and_resumed(tmp_path, synth, lora_r=4, lora_alpha=8.0, learning_rate=1e-2)
    assert (tmp_path / "b" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    loss_a = [h["loss"] for h in full.state.log_history if "loss" in h]
    loss_b = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert resumed.state.global_step == 4 and loss_b[-1] == pytest.approx(loss_a[-1], rel=1e-6)
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert any(not torch.equal(sa[k], first.model.state_dict()[k]) for k in sa if "lora_B" in k)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow  # two processes, end to end
def test_lora_ddp_two_processes_identical_weights(ddp_runs) -> None:
    _, _, changed = ddp_ranks(ddp_runs["lora"])
    assert any("lora_B" in k for k in changed) and all("lora_" in k or ".modules_to_save." in k for k in changed)


@pytest.mark.slow  # two processes, end to end
def test_lora_deepspeed_zero2_two_processes(tmp_path, synth) -> None:
    """ZeRO-2 on 2 CPU processes with a LoRA student (the shipped ds_zero2.json): the engine wraps the
    PeftModel, both ranks end with identical weights, only adapters and the projector's copy changed, and
    the saved adapter reloads to them."""
    pytest.importorskip("deepspeed")
    from test_mllm_deepspeed import DS_CONFIG, _config as ds_config, _launch  # skips without a C++ compiler

    cfg = ds_config(tmp_path, synth, "ds.yaml", output_dir=str(tmp_path / "out"), deepspeed=str(DS_CONFIG),
                    accelerator_config={"use_configured_state": True}, per_device_train_batch_size=1,
                    gradient_accumulation_steps=2, max_steps=2, save_strategy="no", lora_r=4, learning_rate=1e-2)
    r0, r1 = _launch(cfg, tmp_path / "ranks")
    assert r0["engine"] == "deepspeed.runtime.engine.DeepSpeedEngine" and r0["engine_module_is_student"]
    for k in r0["after"]:
        assert torch.equal(r0["after"][k], r1["after"][k]), k
    changed = [k for k in r0["after"] if not torch.equal(r0["after"][k], r0["before"][k])]
    assert any("lora_B" in k for k in changed) and all("lora_" in k or ".modules_to_save." in k for k in changed)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    after = {k.replace(".modules_to_save.default.", ".").replace(".default.", "."): v
             for k, v in r0["after"].items() if ".original_module." not in k}
    assert saved and all(torch.equal(v, after[k]) for k, v in saved.items()), sorted(set(saved) - set(after))[:3]
