"""The trainer on non-LLaVA families: every processor input reaches both models (issue 13, item 3 of
the session brief = the issue's item 6, first bullet)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import families as fx  # noqa: E402
from mllm_helpers import one_step, processor_trainer, save_pair, write_family_data  # noqa: E402

from tokinteract.hf.families import visual_token_ids  # noqa: E402
from tokinteract.mllm import DistillationConfig  # noqa: E402
from tokinteract.mllm.processor_data import ProcessorCollator  # noqa: E402

FAMILIES = ["qwen2_5_vl", "gemma3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_family_data(tmp_path_factory.mktemp("fam-data"))


def _trainer(tmp_path, data, name, student, teacher, distill):
    proc = fx.make_processor(name)
    col = ProcessorCollator(proc, visual_token_ids(student))
    return processor_trainer(tmp_path, data, proc, student, teacher, distill, col)


def _one_step(tmp_path, data, name, student, teacher, distill):
    """One training-mode compute_loss + backward on the whole fixed batch: (loss, parts, grads)."""
    tr = _trainer(tmp_path, data, name, student, teacher, distill)
    return one_step(tr, student, tr.data_collator([tr.train_dataset[i] for i in range(len(tr.train_dataset))]))


STEP_CASES = [(n, "cached") for n in fx.FAMILIES] + [(n, "packed") for n in FAMILIES]


@pytest.mark.parametrize("name,forward", STEP_CASES)
def test_align_ti_step_fused_equals_logits(tmp_path, data, name, forward) -> None:
    student, teacher = fx.make_model(name, seed=1), fx.make_model(name, seed=2)
    steps = []
    for impl in ("logits", "fused"):
        cfg = DistillationConfig(method="align_ti", iva_layer=1, loss_impl=impl, tpa_forward=forward)
        steps.append(_one_step(tmp_path / impl, data, name, student, teacher, cfg))
    (la, pa, ga), (lb, pb, gb) = steps
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)
    assert pa.keys() == pb.keys() and {"sft", "kd", "iva", "tpa"} <= pa.keys()
    assert pa["tpa"] > 0 and pa["iva"] > 0 and pa["kd"] > 0
    for k in pa:
        assert pb[k] == pytest.approx(pa[k], rel=1e-5, abs=1e-6), k
    assert ga.keys() == gb.keys() and any(".language_model." in k or ".text_model." in k for k in ga)
    assert not any("vision" in k or (".visual." in k and "merger" not in k) for k in ga)  # the tower stays frozen
    for k in ga:  # fp32 rounding: elementwise, with an absolute floor at 1e-5 of the tensor's largest entry
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=max(1e-6, 1e-5 * float(ga[k].abs().max())), msg=k)


@pytest.mark.parametrize("name", fx.FAMILIES)
def test_the_model_inputs_reach_both_models(tmp_path, data, name, monkeypatch) -> None:
    """KD without TPA (plain forwards): the trainer's loss equals KD computed from the models' own forwards
    on the processor's full batch (their own positions: multimodal RoPE, Gemma 3 image blocks)."""
    student, teacher = fx.make_model(name, seed=1), fx.make_model(name, seed=2)
    tr = _trainer(tmp_path, data, name, student, teacher, DistillationConfig(method="kd", sft_weight=0.0,
                                                                             loss_impl="logits"))
    batch = tr.data_collator([tr.train_dataset[i] for i in range(len(tr.train_dataset))])
    student.train()
    tr.current_gradient_accumulation_steps = 1
    loss = tr.compute_loss(student, dict(batch))
    model_inputs = {k: v for k, v in batch.items() if not k.endswith("_mask") or k == "attention_mask"}
    model_inputs.pop("labels")
    assert {"pixel_values", "attention_mask"} <= model_inputs.keys()
    if name == "qwen2_5_vl":
        assert {"image_grid_thw", "mm_token_type_ids"} <= model_inputs.keys()
    if name == "gemma3":
        assert "token_type_ids" in model_inputs
    with torch.no_grad():
        s = student(**model_inputs).logits
        t = teacher(**model_inputs).logits
    from tokinteract import kd_loss

    ref = kd_loss(s, t, batch["labels"])
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)


def test_different_families_or_vision_towers_are_refused(tmp_path, data) -> None:
    student = fx.make_model("gemma3", seed=1)
    with pytest.raises(ValueError, match=r"different families \(student model_type 'gemma3', teacher 'llava'\)"):
        _trainer(tmp_path, data, "gemma3", student, fx.make_model("llava"), DistillationConfig(method="kd"))
    cfg = fx.family("gemma3").config(fx._token_ids("gemma3"))
    cfg.mm_tokens_per_image = 16
    other = transformers.Gemma3ForConditionalGeneration._from_config(cfg)
    with pytest.raises(ValueError, match=r"mm_tokens_per_image: student 4, teacher 16.*image-token count is not supported"):
        _trainer(tmp_path, data, "gemma3", student, other, DistillationConfig(method="kd"))
    cfg = fx.family("gemma3").config(fx._token_ids("gemma3"))
    cfg.vision_config.num_hidden_layers = 2
    other = transformers.Gemma3ForConditionalGeneration._from_config(cfg)
    with pytest.raises(ValueError, match=r"different vision towers .*'num_hidden_layers': \(1, 2\)"):
        _trainer(tmp_path, data, "gemma3", student, other, DistillationConfig(method="kd"))
    with pytest.raises(ValueError, match="on_policy .* supports only LLaVA students for now"):
        _trainer(tmp_path, data, "gemma3", student, fx.make_model("gemma3", seed=2), DistillationConfig(method="gkd"))


def test_cli_trains_a_gemma3_pair_and_the_student_reloads_with_transformers_alone(tmp_path, data) -> None:
    import yaml
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tokinteract.mllm.cli import main

    ckpts = save_pair(tmp_path, lambda seed: fx.make_model("gemma3", seed=seed), lambda: fx.make_processor("gemma3"))
    out = tmp_path / "out"
    cfg = dict(
        student_checkpoint=str(ckpts["student"]), teacher_checkpoint=str(ckpts["teacher"]), method="align_ti",
        iva_layer=1, data_path=str(data), image_folder=str(data.parent), output_dir=str(out),
        per_device_train_batch_size=3, max_steps=1, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, learning_rate=1e-2, disable_tqdm=True, seed=0, preflight_cache_dir="",
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main([str(tmp_path / "cfg.yaml")]) == 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    proc = AutoProcessor.from_pretrained(out)
    before = fx.make_model("gemma3", seed=1).state_dict()
    after = model.state_dict()
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])  # it trained
    torch.testing.assert_close(after["model.vision_tower.embeddings.patch_embedding.weight"],
                               before["model.vision_tower.embeddings.patch_embedding.weight"])  # tower frozen
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this picture"}]}]
    text = proc.tokenizer.apply_chat_template(msgs, chat_template=proc.chat_template, tokenize=False)
    inputs = proc(text=[text], images=[[Image.open(data.parent / "a.png").convert("RGB")]], return_tensors="pt")
    gen = model.eval().generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
