"""The CLI (``tokinteract-train CONFIG.yaml``) on the non-LLaVA families (issue 13).

Families whose processor has no video slot load with ``AutoProcessor`` offline: the CLI trains a tiny
local pair end to end and saves a student that transformers reloads (Gemma 3 is in
``test_mllm_families_trainer.py``; LLaVA-NeXT and Idefics3 here). The others (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, LLaVA-OneVision, SmolVLM, InternVL) need torchvision for ``AutoProcessor``: it always builds
the processor's video processor, and transformers 5.24 has video processors with a torchvision backend
only (their image processors alone load without it, as the PIL classes). No torchvision wheel runs beside
the project's CPU torch 2.13.0 (the one built for it is a CUDA build), so here the CLI must stop before
training with an ImportError naming the checkpoint and what to install.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
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


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="the error is for missing torchvision")
@pytest.mark.parametrize("name", NEEDS_TORCHVISION)
def test_cli_stops_before_training_naming_the_checkpoint_whose_processor_needs_torchvision(tmp_path, data, name) -> None:  # noqa: F811
    ckpts = _checkpoints(tmp_path, name, whole_processor=False)
    with pytest.raises(ImportError, match=rf"^student_checkpoint '{ckpts['student']}': its processor cannot be built "
                                          r"here: [\s\S]*(?i:torchvision)[\s\S]*Install the torchvision release built "
                                          rf"for this torch \({re.escape(torch.__version__)}\), of the same build"):
        main([_config(tmp_path, data, ckpts)])
    assert not (tmp_path / "out" / "model.safetensors").exists()
