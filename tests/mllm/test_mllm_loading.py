"""Loading any supported VLM pair: AutoModelForImageTextToText + AutoProcessor, the family and
tokenizer checks before training, and the trainable parts (issue 13, item 1)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import families as fx  # noqa: E402  (tests/hf/families.py: tiny models and real processors, offline)
from mllm_helpers import tiny_config  # noqa: E402

from tokinteract.mllm.cli import build_everything, parse_args  # noqa: E402
from tokinteract.mllm.model import (  # noqa: E402
    PARTS,
    check_pair,
    check_same_tokenizer,
    load_pretrained,
    model_parts,
    set_trainable_parts,
)


def _save(tmp_path: Path, name: str, sub: str | None = None, **overrides) -> Path:
    """A local checkpoint (model + processor) of the family, as a user's from_pretrained path."""
    d = tmp_path / (sub or name)
    fx.make_model(name, **overrides).save_pretrained(d)
    fx.make_processor(name).save_pretrained(d)
    return d


@pytest.mark.parametrize("name", ["llava", "gemma3"])
def test_load_pretrained_any_family_with_dtype_and_attention(tmp_path, name) -> None:
    d = _save(tmp_path, name)
    ref = fx.make_model(name)
    model, proc = load_pretrained(d, dtype=torch.bfloat16, attn_implementation="eager")
    f = fx.family(name)
    assert type(model).__name__ == f.model_cls and type(proc).__name__ == f.processor_cls
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    got = model.state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v.to(torch.bfloat16), rtol=0, atol=0)
    assert proc.tokenizer.get_vocab() == fx.make_tokenizer(name).get_vocab()
    model32, _ = load_pretrained(d)
    assert {p.dtype for p in model32.parameters()} == {torch.float32}


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="the error is for missing torchvision")
def test_qwen_vl_model_loads_and_a_processor_needing_torchvision_names_the_checkpoint(tmp_path, monkeypatch) -> None:
    from tokinteract.mllm import image_only

    d = tmp_path / "qwen"
    fx.make_model("qwen2_5_vl").save_pretrained(d)
    p = fx.make_processor("qwen2_5_vl")  # its video slot is None: saved part by part
    p.tokenizer.save_pretrained(d)
    p.image_processor.save_pretrained(d)
    _, proc = load_pretrained(d, role="teacher")  # without torchvision: the image-only build
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"
    monkeypatch.setattr(image_only, "IMAGE_ONLY_PROCESSORS", ())  # a class with no image-only build
    with pytest.raises(ImportError, match=r"teacher_checkpoint '.*qwen': its processor cannot be built here:[\s\S]*Torchvision"):
        load_pretrained(d, role="teacher")
    from transformers import AutoModelForImageTextToText

    assert type(AutoModelForImageTextToText.from_pretrained(d)).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_different_tokenizers_special_tokens_or_chat_templates_are_refused_naming_both() -> None:
    check_same_tokenizer(fx.make_processor("gemma3"), fx.make_processor("gemma3"))
    with pytest.raises(ValueError, match=r"student 'S' and teacher 'T' have different tokenizers: \d+ vs \d+ tokens"):
        check_same_tokenizer(fx.make_processor("gemma3"), fx.make_processor("llava"), student_name="S", teacher_name="T")
    other = fx.make_processor("gemma3")
    other.tokenizer.eos_token = "<end_of_image>"
    with pytest.raises(ValueError, match=r"different special tokens .*'eos_token': \(None, '<end_of_image>'\)"):
        check_same_tokenizer(fx.make_processor("gemma3"), other)
    other = fx.make_processor("gemma3")
    other.chat_template = other.chat_template.replace("{{ m['role'] }}", "{{ m['role'] | upper }}")
    with pytest.raises(ValueError, match="student 'student' and teacher 'teacher' have different chat templates"):
        check_same_tokenizer(fx.make_processor("gemma3"), other)


def test_check_pair_runs_the_adapter_family_check_on_both_and_names_the_model() -> None:
    ok = fx.make_model("gemma3")
    check_pair(ok, ok, output="hidden")
    capped = fx.make_model("gemma3", final_logit_softcapping=30.0)
    check_pair(capped, capped, output="logits")
    with pytest.raises(ValueError, match=r"^student \(Gemma3ForConditionalGeneration\): .*final_logit_softcapping"):
        check_pair(capped, ok, output="hidden")
    with pytest.raises(ValueError, match=r"^teacher \(Gemma3ForConditionalGeneration\): .*final_logit_softcapping"):
        check_pair(ok, capped, output="hidden")
    unknown = torch.nn.Linear(1, 1)
    unknown.config = SimpleNamespace(model_type="paligemma")
    with pytest.raises(ValueError, match=r"^teacher \(Linear\): tokinteract.hf does not know the model family 'paligemma'"):
        check_pair(ok, unknown)


@pytest.mark.parametrize("name", fx.FAMILIES)
def test_trainable_parts_split_every_family(name) -> None:
    m = fx.make_model(name)
    parts = model_parts(m)
    names = [n for n, _ in m.named_parameters()]
    assert sorted(sum(parts.values(), [])) == sorted(names)  # every parameter in exactly one part
    assert all(parts[p] for p in PARTS)
    assert all(n.startswith("lm_head.") or ".language_model." in n or ".text_model." in n for n in parts["language_model"])
    if name.startswith("qwen"):  # the merger (patch merger MLP) is Qwen-VL's projector
        assert parts["projector"] and all(n.startswith("model.visual.merger.") or "deepstack_merger" in n
                                          for n in parts["projector"])
    m.train()
    set_trainable_parts(m)  # default: vision tower frozen (and in eval mode), projector + language model train
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(parts["projector"]) | set(parts["language_model"])
    vt = next(mod for mod_name, mod in m.named_modules() if mod_name in ("model.vision_tower", "model.vision_model",
                                                                          "model.visual"))
    assert not vt.training
    set_trainable_parts(m, vision_tower=True, projector=False, language_model=False)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(parts["vision_tower"])


def test_trainable_parts_refuse_unknown_layouts_and_bad_flags() -> None:
    m = fx.make_model("llava")
    with pytest.raises(ValueError, match="nothing trains"):
        set_trainable_parts(m, projector=False, language_model=False)
    with pytest.raises(TypeError, match=r"projector[\s\S]*'yes'"):
        set_trainable_parts(m, projector="yes")
    m.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match=r"parameters \['extra'\] belong to no part"):
        model_parts(m)


def _build(path: Path, *flags: str):
    return build_everything(*parse_args([str(path), *flags]))


def test_cli_checks_the_pair_before_training(tmp_path, synth) -> None:
    gemma = _save(tmp_path, "gemma3")
    llava = _save(tmp_path, "llava")
    capped = _save(tmp_path, "gemma3", "capped", final_logit_softcapping=30.0)
    common = dict(tiny=False, method="kd", preflight=False)
    with pytest.raises(ValueError, match=rf"student '{gemma}' and teacher '{llava}' have different tokenizers"):
        _build(tiny_config(tmp_path, synth, student_checkpoint=str(gemma), teacher_checkpoint=str(llava), **common))
    with pytest.raises(ValueError, match=r"^teacher \(Gemma3ForConditionalGeneration\): .*final_logit_softcapping"):
        _build(tiny_config(tmp_path, synth, student_checkpoint=str(gemma), teacher_checkpoint=str(capped),
                           loss_impl="fused", **common))
    # a supported, matching pair passes the checks and trains on the family's own processor pipeline
    tr = _build(tiny_config(tmp_path, synth, student_checkpoint=str(gemma), teacher_checkpoint=str(capped),
                            loss_impl="logits", **common))
    assert type(tr.train_dataset).__name__ == "ProcessorDataset" and type(tr.teacher).__name__ == "Gemma3ForConditionalGeneration"
    with pytest.raises(ValueError, match="on_bad_image='skip': skipping bad samples is supported only with a LLaVA"):
        _build(tiny_config(tmp_path, synth, student_checkpoint=str(gemma), teacher_checkpoint=str(capped),
                           loss_impl="logits", on_bad_image="skip", **common))


def test_cli_trainable_parts_override_the_stage(tmp_path, synth) -> None:
    tr = _build(tiny_config(tmp_path, synth, method="sft", train_vision_tower=True, train_language_model=False,
                            preflight=False))
    parts = model_parts(tr.model)
    assert {n for n, p in tr.model.named_parameters() if p.requires_grad} == set(parts["vision_tower"]) | set(
        parts["projector"])
    tr = _build(tiny_config(tmp_path, synth, method="sft", stage="pretrain", preflight=False))
    assert {n for n, p in tr.model.named_parameters() if p.requires_grad} == set(model_parts(tr.model)["projector"])
