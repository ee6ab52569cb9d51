from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback

from tokinteract.mllm.cli import build_everything, main, parse_args
from mllm_helpers import tiny_config as _config
from mllm_helpers import ddp_ranks

HERE = Path(__file__).parent


def test_config_file_flags_override_and_unknown_keys(tmp_path, synth) -> None:
    cfg = _config(tmp_path, synth)
    margs, dargs, dcfg, targs = parse_args([str(cfg), "--max_steps", "7", "--method", "kd"])
    assert margs.tiny and dargs.data_path == str(synth.train) and targs.max_steps == 7 and dcfg.method == "kd"
    assert dcfg.iva_layer == 1 and isinstance(targs.learning_rate, float)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tiny": True, "learning_rat": 1.0}))
    with pytest.raises(ValueError, match="unknown keys.*learning_rat"):
        parse_args([str(bad)])


def test_stage1_pretrain_then_stage2_from_the_saved_checkpoint(tmp_path, synth) -> None:
    s1 = tmp_path / "stage1"
    assert main([str(_config(tmp_path, synth, "s1.yaml", stage="pretrain", method="sft", data_path=str(synth.captions),
                             output_dir=str(s1)))]) == 0
    m1 = LlavaForConditionalGeneration.from_pretrained(s1)
    proc = AutoProcessor.from_pretrained(s1)
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == m1.config.image_token_id
    fresh = build_everything(*parse_args([str(_config(tmp_path, synth, "f.yaml", method="sft", stage="pretrain"))])).model
    changed = {k for k, v in m1.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)  # stage 1 trains the projector only
    s2 = tmp_path / "stage2"
    assert main([str(_config(tmp_path, synth, "s2.yaml", student_checkpoint=str(s1), tiny=False, output_dir=str(s2),
                             method="kd", teacher_checkpoint=str(s1)))]) == 0
    m2 = LlavaForConditionalGeneration.from_pretrained(s2)
    changed = {k for k, v in m2.state_dict().items() if not torch.equal(v, m1.state_dict()[k])}
    assert any("language_model" in k for k in changed) and not any("vision_tower" in k for k in changed)


class _Interrupt(Exception):
    pass


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Interrupt(f"simulated crash before step {self.step + 1}")


def full_and_resumed(tmp_path, synth, **kw):
    """``(full, first, resumed)`` trainers of a 4-step tiny run saving every 2 steps: uninterrupted in
    ``tmp_path/a``; in ``tmp_path/b`` interrupted after the step-2 checkpoint, then resumed from it."""
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, **kw)
    full = build_everything(*parse_args([str(_config(tmp_path, synth, "a.yaml", output_dir=str(tmp_path / "a"), **kw))]))
    full.train()
    cfg_b = _config(tmp_path, synth, "b.yaml", output_dir=str(tmp_path / "b"), **kw)
    first = build_everything(*parse_args([str(cfg_b)]))
    first.add_callback(_StopAt(2))
    with pytest.raises(_Interrupt):
        first.train()
    assert (tmp_path / "b" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "checkpoint-4").exists()
    resumed = build_everything(*parse_args([str(cfg_b)]))
    resumed.train(resume_from_checkpoint=True)
    return full, first, resumed


def test_resume_reaches_the_same_final_loss(tmp_path, synth) -> None:
    """Interrupted after the step-2 checkpoint and resumed == uninterrupted (TPA sampling included).

    Tolerance: 1e-6 relative on the final logged loss, 1e-6 absolute on every weight (CPU runs
    are deterministic; the candidates are reseeded per step, so resuming redraws the same ones).
    """
    full, _, resumed = full_and_resumed(tmp_path, synth, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    loss_a = [h["loss"] for h in full.state.log_history if "loss" in h]
    loss_b = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert resumed.state.global_step == 4 and len(loss_a) == 4
    assert loss_b[-1] == pytest.approx(loss_a[-1], rel=1e-6)
    parts_a = {h["step"]: h for h in full.state.log_history if "loss_sft" in h}
    parts_b = {h["step"]: h for h in resumed.state.log_history if "loss_sft" in h}
    assert sorted(parts_b) == [1, 2, 3, 4]  # 1, 2: restored from checkpoint-2's trainer_state.json
    for step in (3, 4):  # the first log after resuming averages over 1 step, not over 3
        for key in ("loss_sft", "loss_kd", "loss_iva", "loss_tpa"):
            assert parts_b[step][key] == pytest.approx(parts_a[step][key], rel=1e-5), (step, key)
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6)


@pytest.mark.slow  # two processes, end to end
def test_ddp_two_processes_gloo_identical_weights(tmp_path, synth, ddp_runs) -> None:
    """torchrun --nproc_per_node=2 on CPU (gloo): both ranks end with identical student weights,
    and the first step's SFT/KD/IVA parts equal a single-process run on the same global batch
    (global counts across ranks)."""
    r0, r1, changed = ddp_ranks(ddp_runs["plain"])
    assert any("language_model" in k for k in changed) and not any("vision_tower" in k for k in changed)
    assert all(torch.equal(v, r1["teacher"][k]) for k, v in r0["teacher"].items())
    single = build_everything(*parse_args([str(_config(tmp_path, synth, "one.yaml", per_device_train_batch_size=4,
                                                        max_steps=1, output_dir=str(tmp_path / "one")))]))
    single.train()
    ref, got = single.state.log_history[0], r0["log"][0]
    for key in ("loss_sft", "loss_kd", "loss_iva"):
        assert got[key] == pytest.approx(ref[key], rel=1e-4), key


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse(tmp_path, path) -> None:
    """Every example config names only real arguments with valid values (the ``deepspeed`` key
    is checked separately; ``ds_zero2.json`` itself is run by ``test_mllm_deepspeed.py``)."""
    from tokinteract.mllm.cli import load_config

    cfg = load_config(path)
    ds = cfg.pop("deepspeed", None)
    if ds is not None:
        import json

        ds_cfg = json.loads((EXAMPLES.parents[1] / ds).read_text())
        assert ds_cfg["zero_optimization"]["stage"] == 2
    tmp = tmp_path / path.name
    tmp.write_text(yaml.safe_dump(cfg))
    margs, dargs, dcfg, targs = parse_args([str(tmp), "--use_cpu", "true"])
    dcfg.resolved()
    if "stage2" in path.name:  # Table 11, fine-tuning column
        assert (targs.learning_rate, targs.num_train_epochs, targs.weight_decay) == (2e-5, 1, 0.0)
        assert targs.per_device_train_batch_size * targs.gradient_accumulation_steps * 8 == 128
        assert margs.stage == "finetune" and dcfg.tpa_num_candidates == 4 and dcfg.method == "align_ti"
    if "stage1" in path.name:  # Table 11, pretraining column
        assert (targs.learning_rate, targs.per_device_train_batch_size * 8) == (1e-3, 256)
        assert margs.stage == "pretrain" and dcfg.method == "sft"
