"""The DistillationTrainer under DeepSpeed ZeRO-2: two CPU processes (DeepSpeed's CPU accelerator,
gloo) against a single-process run on the same global batch.

Uses ``examples/configs/ds_zero2.json`` as shipped ("auto" values filled by the Trainer; bf16 and
fp16 are off because the run is fp32). See ``deepspeed_worker.py`` for the two CPU-only settings
(a pre-configured gloo ``PartialState``; the inference-only shm kernel is not compiled).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoProcessor, LlavaForConditionalGeneration

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[mllm,deepspeed]')")
if shutil.which("c++") is None and shutil.which("g++") is None:  # DeepSpeed JIT-builds its CPU ops
    pytest.skip("DeepSpeed's CPU accelerator needs a C++ compiler", allow_module_level=True)

from tokinteract.mllm.checkpoints import latest_checkpoint  # noqa: E402
from tokinteract.mllm.cli import build_everything, parse_args  # noqa: E402
from mllm_helpers import torchrun_two_ranks  # noqa: E402

pytestmark = pytest.mark.slow  # end to end: trains tiny models

HERE = Path(__file__).parent
DS_CONFIG = HERE.parents[1] / "examples" / "configs" / "ds_zero2.json"


def _config(tmp_path: Path, synth, name: str, **kw) -> Path:
    cfg = dict(
        tiny=True, tiny_hidden_size=32, tiny_teacher_hidden_size=48, method="align_ti", iva_layer=1,
        tpa_sampling="greedy", tpa_num_candidates=2,  # greedy: the same candidates however the batch is split
        data_path=str(synth.train), image_folder=str(synth.image_folder), max_steps=4, logging_steps=1,
        report_to="none", learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=1, disable_tqdm=True, seed=0,
    )
    cfg.update(kw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(cfg: Path, out: Path, *inject: str) -> list[dict]:
    out.mkdir()
    torchrun_two_ranks(HERE / "deepspeed_worker.py", cfg, out, *inject)
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def _steps(log: list[dict]) -> list[dict]:
    return [h for h in log if "loss" in h]


def test_deepspeed_zero2_two_processes_match_one_process(tmp_path, synth) -> None:
    """ZeRO-2 on 2 CPU processes (micro-batch 1, 2 accumulation steps) == 1 process with batch 4.

    Checks: the model is a DeepSpeedEngine at ZeRO stage 2 over 2 gloo ranks; the teacher stays
    outside it (frozen, eval, identical on both ranks); both ranks end with bit-identical
    student weights; per step, loss / SFT / KD / IVA / TPA parts (rel 1e-4; the parts are logged
    rounded to 6 decimals), grad norm (rel 1e-4) and learning rate (cosine with warmup from the
    YAML, not a DeepSpeed scheduler) equal the single-process run, and so do the final weights
    (abs 1e-6; measured 2e-8, while 4 AdamW steps at lr 1e-3 move weights by up to 2e-3); the
    step-4 checkpoint (with both ranks' ZeRO optimizer shards) and the final ``save_model``
    load with ``from_pretrained`` to the trained weights; and a run resumed
    from the DeepSpeed step-2 checkpoint really resumes and ends with the same weights (abs 1e-6).
    """
    ds = dict(deepspeed=str(DS_CONFIG), accelerator_config={"use_configured_state": True},
              per_device_train_batch_size=1, gradient_accumulation_steps=2)
    run_a = tmp_path / "a"
    cfg = _config(tmp_path, synth, "ds.yaml", output_dir=str(run_a), save_strategy="steps", save_steps=2, **ds)
    r0, r1 = _launch(cfg, tmp_path / "ranks")

    for r in (r0, r1):
        assert r["engine"] == "deepspeed.runtime.engine.DeepSpeedEngine" and r["zero_stage"] == 2
        assert r["engine_world_size"] == r["world_size"] == 2 and r["engine_module_is_student"]
        assert r["distributed_type"] == "DistributedType.DEEPSPEED" and r["comm_backend"] == "gloo"
        assert r["ds_accelerator"] == "cpu" and r["optimizer"] == "DeepSpeedZeroOptimizer"
        assert not (r["teacher_training"] or r["teacher_requires_grad"] or r["teacher_in_engine"])
    for k in r0["after"]:
        assert torch.equal(r0["after"][k], r1["after"][k]), k
    assert all(torch.equal(v, r1["teacher"][k]) for k, v in r0["teacher"].items())
    changed = [k for k in r0["after"] if not torch.equal(r0["after"][k], r0["before"][k])]
    assert any("language_model" in k for k in changed) and any("multi_modal_projector" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)

    single = build_everything(*parse_args([str(_config(
        tmp_path, synth, "one.yaml", output_dir=str(tmp_path / "one"), save_strategy="no", use_cpu=True,
        per_device_train_batch_size=4))]))
    teacher_before = {k: v.clone() for k, v in single.teacher.state_dict().items()}
    single.train()
    assert all(torch.equal(v, teacher_before[k]) for k, v in r0["teacher"].items())  # same teacher, untouched
    ref, got = _steps(single.state.log_history), _steps(r0["log"])
    assert len(ref) == len(got) == 4
    for step, (a, b) in enumerate(zip(ref, got), 1):
        for key in ("loss", "loss_sft", "loss_kd", "loss_iva", "loss_tpa"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (step, key)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), step
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-6, abs=1e-12), step
    assert ref[1]["loss_tpa"] > 0 and ref[0]["loss_iva"] > 0
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0["after"][k], v, rtol=0, atol=1e-6, msg=k)

    ckpt = run_a / "checkpoint-4"
    assert (ckpt / "model.safetensors").is_file() and len(list(ckpt.glob("global_step4/*optim_states.pt"))) == 2
    for path in (ckpt, run_a):  # the step-4 checkpoint and the final save_model
        saved = LlavaForConditionalGeneration.from_pretrained(path)
        sd = saved.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in r0["after"].items()), path.name
    assert AutoProcessor.from_pretrained(run_a).tokenizer.convert_tokens_to_ids("<image>") == saved.config.image_token_id

    resumed = _config(tmp_path, synth, "resume.yaml", output_dir=str(tmp_path / "b"), save_strategy="no",
                      resume_from_checkpoint=str(run_a / "checkpoint-2"), **ds)
    s0, s1 = _launch(resumed, tmp_path / "ranks_resumed")
    assert r0["steps_run"] == [1, 2, 3, 4] and s0["steps_run"] == s1["steps_run"] == [3, 4]  # really resumed
    for a, b in zip(_steps(r0["log"]), _steps(s0["log"])):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]
    for k in r0["after"]:
        assert torch.equal(s0["after"][k], s1["after"][k]), k
        torch.testing.assert_close(s0["after"][k], r0["after"][k], rtol=0, atol=1e-6, msg=k)


def test_deepspeed_zero2_a_non_finite_step_on_one_rank_stops_every_rank(tmp_path, synth) -> None:
    """ZeRO-2, rank 1's loss NaN at step 2 (so every reduced gradient): DeepSpeed skips the update
    (its overflow check), and the guard stops both ranks at that step, naming it, without a new
    checkpoint: checkpoint-1 stays the newest complete one and the weights are step 1's, finite."""
    ds = dict(deepspeed=str(DS_CONFIG), accelerator_config={"use_configured_state": True},
              per_device_train_batch_size=1, gradient_accumulation_steps=2)
    out = tmp_path / "run"
    cfg = _config(tmp_path, synth, "nan.yaml", output_dir=str(out), save_strategy="steps", save_steps=1, **ds)
    r0, r1 = _launch(cfg, tmp_path / "ranks", json.dumps({"rank": 1, "steps": [2], "kind": "nan"}))
    for r in (r0, r1):
        assert r["outcome"] == "stopped" and r["checkpoint"] is None and r["steps_run"] == [1]
        assert r["message"].startswith("step 2: non-finite") and "DeepSpeed owns the gradients" in r["message"]
        assert "(non-finite on rank(s) [0, 1] of 2)" in r["message"]  # DeepSpeed's grad norm is global: inf
        assert all(torch.equal(v, r["snaps"][1][k]) and torch.isfinite(v).all() for k, v in r["after"].items())
    assert "non-finite loss [nan, nan]" in r1["message"]  # its 2 micro-batches
    assert latest_checkpoint(out) == out / "checkpoint-1" and not (out / "checkpoint-2").exists()
    assert not list(out.glob("tmp-checkpoint-*"))
