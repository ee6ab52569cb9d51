"""The CLI (``tokinteract-train CONFIG.yaml``) on the non-LLaVA families (issue 13).

Families whose processor has no video slot load with ``AutoProcessor`` offline: the CLI trains a tiny
local pair end to end and saves a student that transformers reloads (Gemma 3 is in
``test_mllm_families_trainer.py``; LLaVA-NeXT and Idefics3 here). The others (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, LLaVA-OneVision, SmolVLM, InternVL) need torchvision for ``AutoProcessor``: it always builds
the processor's video processor, and transformers 5.24 has video processors with a torchvision backend
only. No torchvision wheel runs beside the project's CPU torch 2.13.0, so ``load_pretrained`` builds
their processor without its video processor (:mod:`tokinteract.mllm.image_only`, proved equal to the
processor built in memory in ``test_mllm_image_only.py``): the CLI trains them too, from checkpoints laid
out as on the Hub (tokenizer files, ``preprocessor_config.json``, the processor's arguments, the chat
template).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from test_mllm_families_trainer import data  # noqa: F401  (the module's data fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import families as fx  # noqa: E402

from tokinteract.mllm.cli import main  # noqa: E402

NEEDS_TORCHVISION = [n for n in fx.FAMILIES if fx.family(n).has_video_slot]


def _checkpoints(tmp_path: Path, name: str, *, whole_processor: bool) -> dict[str, Path]:
    """Tiny local student (seed 1) and teacher (seed 2) checkpoints with their processor beside them
    (``whole_processor=False``: tokenizer and image processor only, for processors that cannot be saved
    without their video processor)."""
    ckpts = {}
    for role, seed in (("student", 1), ("teacher", 2)):
        d = ckpts[role] = tmp_path / role
        fx.make_model(name, seed=seed).save_pretrained(d)
        proc = fx.make_processor(name)
        if whole_processor:
            proc.save_pretrained(d)
        else:
            proc.tokenizer.save_pretrained(d)
            proc.image_processor.save_pretrained(d)
    return ckpts


def _config(tmp_path: Path, data_path: Path, ckpts: dict[str, Path], **kw) -> str:
    cfg = dict(
        student_checkpoint=str(ckpts["student"]), teacher_checkpoint=str(ckpts["teacher"]), method="align_ti",
        iva_layer=1, data_path=str(data_path), image_folder=str(data_path.parent), output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=3, max_steps=1, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, learning_rate=1e-2, disable_tqdm=True, seed=0, preflight_cache_dir="",
    )
    cfg.update(kw)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("name", ["llava_next", "idefics3"])
def test_cli_trains_a_local_pair_and_saves_a_reloadable_student(tmp_path, data, name) -> None:  # noqa: F811
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ckpts = _checkpoints(tmp_path, name, whole_processor=True)
    assert main([_config(tmp_path, data, ckpts)]) == 0
    out = tmp_path / "out"
    log = [h for h in yaml.safe_load((out / "trainer_state.json").read_text())["log_history"] if "loss_tpa" in h]
    assert len(log) == 1 and all(log[0][k] > 0 for k in ("loss_sft", "loss_kd", "loss_iva", "loss_tpa"))
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == fx.family(name).model_cls
    assert type(AutoProcessor.from_pretrained(out)).__name__ == fx.family(name).processor_cls
    before, after = fx.make_model(name, seed=1).state_dict(), model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert "lm_head.weight" in changed  # it trained
    assert not any("vision" in k for k in changed)  # the tower stays frozen


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="the fallback is for missing torchvision")
@pytest.mark.parametrize("name", NEEDS_TORCHVISION)
def test_cli_trains_a_video_slot_family_through_its_image_only_processor(tmp_path, data, name) -> None:  # noqa: F811
    from test_mllm_image_only import save_checkpoint
    from transformers import AutoModelForImageTextToText

    from tokinteract.mllm.model import load_pretrained

    f = fx.family(name)
    ckpts = {role: save_checkpoint(name, tmp_path / role, layout="parts", seed=seed)
             for role, seed in (("student", 1), ("teacher", 2))}
    assert main([_config(tmp_path, data, ckpts, max_steps=2)]) == 0
    out = tmp_path / "out"
    log = [h for h in yaml.safe_load((out / "trainer_state.json").read_text())["log_history"] if "loss_tpa" in h]
    assert len(log) == 2
    assert all(math.isfinite(h[k]) and h[k] > 0 for h in log for k in ("loss", "loss_sft", "loss_kd", "loss_iva",
                                                                         "loss_tpa"))
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(model).__name__ == f.model_cls
    before, after = fx.make_model(name, seed=1).state_dict(), model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert "lm_head.weight" in changed  # it trained
    assert not any("vision" in k for k in changed)  # the tower stays frozen
    _, proc = load_pretrained(out)  # the saved processor: the same image-only build
    assert type(proc).__name__ == f.processor_cls
    assert {k: v for k, v in proc.to_dict().items() if k != "video_processor"} == {
        k: v for k, v in fx.make_processor(name).to_dict().items() if k != "video_processor"}
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this picture"}]}]
    text = proc.tokenizer.apply_chat_template(msgs, chat_template=proc.chat_template, tokenize=False)
    image = Image.open(data.parent / "a.png").convert("RGB")
    inputs = fx.run_processor(name, proc, [text + fx.CHAT_START + "assistant "], [[image]], "left")
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, inputs["input_ids"].shape[1] + 3)
