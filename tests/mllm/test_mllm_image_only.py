"""The image-only processor that ``load_pretrained`` builds when torchvision is missing (issue 13).

For the six families whose ``AutoProcessor`` always builds a torchvision-only video processor
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, SmolVLM, InternVL), a tiny checkpoint with the
processor ``tests/hf/families.py`` builds in memory is saved, loaded back through
``load_pretrained`` (the fallback of :mod:`tokinteract.mllm.image_only`), and both processors are run
on the same samples: every tensor must be equal, token for token and value for value, and the chat
template must render the same text. Two layouts of the saved processor: transformers' own
``save_pretrained`` (one nested ``processor_config.json``) and the parts a Hub checkpoint holds
(tokenizer files, ``preprocessor_config.json``, the processor's arguments, ``chat_template.jinja``;
the processor class from the model config when nothing names it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import families as fx  # noqa: E402

from tokinteract.mllm import image_only  # noqa: E402
from tokinteract.mllm.data import DataError  # noqa: E402
from tokinteract.mllm.image_only import IMAGE_ONLY_PROCESSORS, NoVideoProcessor  # noqa: E402
from tokinteract.mllm.model import load_pretrained  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="the fallback is for a missing torchvision"
)

VIDEO_SLOT = [n for n in fx.FAMILIES if fx.family(n).has_video_slot]
LAYOUTS = ("saved", "parts", "legacy")
VIDEO_CLASS = {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
               "qwen3_vl": "Qwen3VLVideoProcessor", "llava_onevision": "LlavaOnevisionVideoProcessor",
               "smolvlm": "SmolVLMVideoProcessor", "internvl": "InternVLVideoProcessor"}
"""The video processor class each family's processor saves (what a torchvision install would write)."""


def save_checkpoint(name: str, d: Path, *, layout: str = "saved", seed: int = 0, image_processor: Any = None,
                    **processor_kwargs: Any) -> Path:
    """A tiny model of the family and the processor ``families.py`` builds, saved in ``d``.

    ``"saved"``: the processor's own ``save_pretrained`` (its empty video slot given a stand-in that
    saves a video processor configuration naming the family's video processor class).
    ``"parts"``: tokenizer files, the image processor's ``preprocessor_config.json``,
    ``processor_config.json`` with the processor's arguments and class (only when it has arguments;
    else the class comes from the model config's ``model_type``) and ``chat_template.jinja``.
    ``"legacy"``: as many Hub checkpoints: the class named in ``preprocessor_config.json``, the
    arguments alone in ``processor_config.json`` and the template in ``chat_template.json``.
    """
    f = fx.family(name)
    fx.make_model(name, seed=seed).save_pretrained(d)
    proc = fx.make_processor(name, image_processor, **processor_kwargs)
    kwargs = {**f.processor_kwargs, **processor_kwargs}
    if layout == "saved":
        if f.has_video_slot:
            saved = {"video_processor_type": VIDEO_CLASS[name]}
            proc.video_processor = NoVideoProcessor(str(d), f.processor_cls, saved)
        proc.save_pretrained(d)
    elif layout == "parts":
        proc.tokenizer.save_pretrained(d)
        proc.image_processor.save_pretrained(d)
        if kwargs:
            (d / "processor_config.json").write_text(json.dumps({**kwargs, "processor_class": f.processor_cls}))
        (d / "chat_template.jinja").write_text(proc.chat_template)
    elif layout == "legacy":
        proc.tokenizer.save_pretrained(d)
        proc.image_processor.save_pretrained(d)
        ip = json.loads((d / "preprocessor_config.json").read_text())
        (d / "preprocessor_config.json").write_text(json.dumps({**ip, "processor_class": f.processor_cls}))
        if kwargs:
            (d / "processor_config.json").write_text(json.dumps(kwargs))
        (d / "chat_template.json").write_text(json.dumps({"chat_template": proc.chat_template}))
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return d


def _assert_same_outputs(name: str, got: Any, want: Any) -> None:
    """Both processors on the family's samples (one image, two images in a multi-part turn, text only),
    batched with both padding sides and one sample at a time: equal tensors and equal rendered text."""
    for padding in ("right", "left"):
        a, b = fx.make_batch(name, want, padding=padding), fx.make_batch(name, got, padding=padding)
        assert b.texts == a.texts  # the chat template
        assert b.inputs.keys() == a.inputs.keys()
        for k in a.inputs:
            assert b.inputs[k].dtype == a.inputs[k].dtype and torch.equal(b.inputs[k], a.inputs[k]), (padding, k)
        for i in range(len(a.texts)):
            one_a, one_b = fx.processor_alone(name, want, a, i), fx.processor_alone(name, got, a, i)
            assert one_b.keys() == one_a.keys()
            assert all(torch.equal(one_b[k], one_a[k]) for k in one_a), (padding, i)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", VIDEO_SLOT)
def test_fallback_processor_equals_the_in_memory_processor(tmp_path, name, layout) -> None:
    f = fx.family(name)
    d = save_checkpoint(name, tmp_path / "ckpt", layout=layout)
    model, proc = load_pretrained(d)
    want = fx.make_processor(name)
    assert type(model).__name__ == f.model_cls
    assert type(proc) is getattr(transformers, f.processor_cls)
    assert type(proc.image_processor) is type(want.image_processor)
    assert proc.image_processor.to_dict() == want.image_processor.to_dict()
    assert proc.tokenizer.get_vocab() == want.tokenizer.get_vocab()
    assert proc.chat_template == want.chat_template
    got_dict, want_dict = proc.to_dict(), want.to_dict()
    assert want_dict.pop("video_processor") is None
    if layout == "saved":  # the checkpoint's own video processor configuration, kept for saving
        assert got_dict.pop("video_processor") == {"video_processor_type": VIDEO_CLASS[name]}
    else:  # what AutoVideoProcessor reads then: the image processor's configuration
        assert got_dict.pop("video_processor") == json.loads((d / "preprocessor_config.json").read_text())
    if layout == "legacy":
        assert not (d / "chat_template.jinja").exists() and "processor_class" not in json.loads(
            (d / "tokenizer_config.json").read_text())
    assert got_dict == want_dict  # the processor's own arguments (image_seq_len, num_image_tokens, ...)
    assert isinstance(proc.video_processor, NoVideoProcessor)
    assert any(torch.isin(fx.make_batch(name, proc).inputs["input_ids"], torch.tensor(fx.image_token_ids(name))).flatten())
    _assert_same_outputs(name, proc, want)


# the processor argument each family saves, and another value for it
SAVED_ARGUMENT = {"llava_onevision": ("num_image_tokens", 2), "smolvlm": ("image_seq_len", 2),
                  "internvl": ("image_seq_length", 2)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(SAVED_ARGUMENT))
def test_fallback_reads_the_saved_processor_arguments_not_defaults(tmp_path, name, layout) -> None:
    key, value = SAVED_ARGUMENT[name]
    assert fx.family(name).processor_kwargs[key] != value
    d = save_checkpoint(name, tmp_path / "ckpt", layout=layout, **{key: value})
    _, proc = load_pretrained(d)
    assert getattr(proc, key) == value
    want = fx.make_processor(name, **{key: value})
    _assert_same_outputs(name, proc, want)
    default = fx.make_batch(name, fx.make_processor(name)).inputs["input_ids"]
    assert default.shape != fx.make_batch(name, proc).inputs["input_ids"].shape  # the argument mattered


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fallback_reads_the_saved_image_processor_settings(tmp_path, layout) -> None:
    """Qwen-VL processors save no arguments of their own: their image processor's settings decide the
    grid (here a smaller ``longest_edge``: fewer patches per image)."""
    small = fx.family("qwen2_5_vl").image_processor()
    small.size = {"shortest_edge": 8 * 8, "longest_edge": 16 * 16}
    d = save_checkpoint("qwen2_5_vl", tmp_path / "ckpt", layout=layout, image_processor=small)
    _, proc = load_pretrained(d)
    want = fx.make_processor("qwen2_5_vl", small)
    _assert_same_outputs("qwen2_5_vl", proc, want)
    default = fx.make_batch("qwen2_5_vl", fx.make_processor("qwen2_5_vl")).inputs["image_grid_thw"]
    assert not torch.equal(default, fx.make_batch("qwen2_5_vl", proc).inputs["image_grid_thw"])


def test_videos_are_refused_and_the_warning_is_logged_once(tmp_path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(image_only, "_warned", set())
    d = save_checkpoint("qwen2_5_vl", tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="tokinteract.mllm"):
        _, proc = load_pretrained(d, role="teacher")
        load_pretrained(d)
    warnings = [r.getMessage() for r in caplog.records if "video" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"teacher_checkpoint '{d}': torchvision is missing")
    frames = [np.zeros((2, 16, 16, 3), dtype=np.uint8)]
    msg = rf"'{d}': this Qwen2_5_VLProcessor was built without its video processor .* videos are not supported"
    with pytest.raises(ValueError, match=msg):
        proc(text=["<|vision_start|><|video_pad|><|vision_end|> what"], videos=frames, return_tensors="pt")
    with pytest.raises(AttributeError, match=msg + r"[\s\S]*no video setting 'merge_size'"):
        proc.video_processor.merge_size  # noqa: B018


def test_smolvlm_processor_chat_template_reads_video_settings_and_is_refused(tmp_path) -> None:
    """SmolVLMProcessor.apply_chat_template reads the video processor's ``num_frames`` / ``fps`` even
    for images: refused with the clear error (the trainer renders with the tokenizer, as below)."""
    _, proc = load_pretrained(save_checkpoint("smolvlm", tmp_path / "ckpt"))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this picture"}]}]
    with pytest.raises(AttributeError, match=r"built without its video processor[\s\S]*no video setting 'num_frames'"):
        proc.apply_chat_template(msgs, tokenize=False)
    want = fx.make_processor("smolvlm")
    assert proc.tokenizer.apply_chat_template(msgs, chat_template=proc.chat_template, tokenize=False) == (
        want.tokenizer.apply_chat_template(msgs, chat_template=want.chat_template, tokenize=False))


def test_a_data_sample_with_a_video_is_refused_naming_it(tmp_path) -> None:
    from tokinteract.mllm.data import normalize_sample

    sample = {"id": "v1", "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhat happens"}, {"from": "gpt", "value": "a cat sat"}]}
    with pytest.raises(DataError, match=r"sample 3 \(id 'v1'\): has a 'video' \('clip.mp4'\); videos are not supported"):
        normalize_sample(sample, 3)


def test_save_keeps_the_checkpoints_video_processor_configuration(tmp_path) -> None:
    d = save_checkpoint("qwen2_vl", tmp_path / "ckpt", layout="parts")
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "merge_size": 2, "patch_size": 4,
             "temporal_patch_size": 2, "min_pixels": 64, "max_pixels": 512}
    (d / "video_preprocessor_config.json").write_text(json.dumps(video))
    _, proc = load_pretrained(d)
    out = tmp_path / "out"
    proc.save_pretrained(out)
    saved = json.loads((out / "processor_config.json").read_text())
    assert saved["video_processor"] == video and saved["processor_class"] == "Qwen2VLProcessor"
    again = image_only.load_image_only_processor(out)  # and the saved processor loads back the same
    assert again.video_processor.to_dict() == video
    _assert_same_outputs("qwen2_vl", again, fx.make_processor("qwen2_vl"))


def test_a_processor_class_without_an_image_only_build_keeps_the_import_error(tmp_path, monkeypatch) -> None:
    d = save_checkpoint("smolvlm", tmp_path / "ckpt")
    monkeypatch.setattr(image_only, "IMAGE_ONLY_PROCESSORS", tuple(c for c in IMAGE_ONLY_PROCESSORS
                                                                   if c != "SmolVLMProcessor"))
    with pytest.raises(ImportError, match=rf"^student_checkpoint '{d}': its processor cannot be built here: "
                                          r"[\s\S]*torchvision[\s\S]*its processor class SmolVLMProcessor has no "
                                          r"image-only build"):
        load_pretrained(d)


def test_remote_code_processors_keep_the_import_error(tmp_path) -> None:
    d = save_checkpoint("internvl", tmp_path / "ckpt", layout="parts")
    cfg = json.loads((d / "processor_config.json").read_text())
    cfg["auto_map"] = {"AutoProcessor": "processing_custom.CustomProcessor"}
    (d / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImportError, match=r"its processor class \(remote code\) has no image-only build"):
        load_pretrained(d)


def test_lora_merge_command_keeps_the_adapters_image_only_processor(tmp_path) -> None:
    from tokinteract.mllm.lora import apply_lora
    from tokinteract.mllm.lora import main as lora_main
    from tokinteract.mllm.model import load_processor

    base = save_checkpoint("qwen2_5_vl", tmp_path / "base", layout="parts")
    model, proc = load_pretrained(base)
    adapter = tmp_path / "adapter"
    apply_lora(model, r=2, alpha=4.0).save_pretrained(adapter)
    proc.save_pretrained(adapter)  # as the trainer saves it beside the adapter
    assert lora_main(["merge", str(adapter), str(tmp_path / "merged"), "--base", str(base)]) == 0
    merged = load_processor(tmp_path / "merged")
    assert merged.to_dict() == proc.to_dict()
    _assert_same_outputs("qwen2_5_vl", merged, fx.make_processor("qwen2_5_vl"))
