"""FSDP2 with the unchanged ``DistillationTrainer``: 2 CPU processes (gloo), accelerate's own
FSDP2 code path forced through its CPU gate by a test-only patch (see ``fsdp_worker.py``).

One ``torchrun`` launch trains every FSDP2 run and its DDP reference (same config without
``fsdp``) in the same process group. DDP is the reference because it sees the same data
shards and draws the same TPA candidates (their seed includes the rank); DDP itself is
checked against a single process in ``test_mllm_cli.py``, and step 1 here as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import LlavaForConditionalGeneration

from tokinteract.mllm.cli import build_everything, parse_args
from mllm_helpers import torchrun_two_ranks

pytestmark = pytest.mark.slow  # end to end: trains tiny models

HERE = Path(__file__).parent
# the example's own FSDP settings (version 2, decoder + SigLIP layers wrapped, FULL_STATE_DICT)
OVERRIDE = HERE.parents[1] / "examples" / "configs" / "stage2_fsdp_override.yaml"
FSDP_CONFIG = yaml.safe_load(OVERRIDE.read_text())["fsdp_config"]
# variant -> (config overrides, tie the student's LM head to its input embedding)
VARIANTS = {
    "untied": ({}, False),  # align_ti, default fused loss: the LM head is its own FSDP2 unit
    # as Qwen2.5-0.5B: accelerate puts head and embedding in one unit; same global batch in
    # 2 accumulation steps (FSDP2 keeps unreduced gradients between them)
    "tied": ({"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2}, True),
    "gkd": ({"method": "gkd", "gkd_lambda": 0.5, "gkd_max_new_tokens": 4, "max_steps": 4}, False),
}


def _config(tmp: Path, synth, name: str, **kw) -> Path:
    cfg = dict(
        tiny=True, tiny_hidden_size=32, tiny_teacher_hidden_size=48, method="align_ti", iva_layer=1,
        data_path=str(synth.train), image_folder=str(synth.image_folder), output_dir=str(tmp / name),
        per_device_train_batch_size=2, max_steps=3, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, learning_rate=1e-3, disable_tqdm=True, seed=0, ddp_backend="gloo",
        eval_data_path=str(synth.train), eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4,
    )
    cfg.update(kw)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, synth) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("fsdp")
    specs = []
    for variant, (kw, tie) in VARIANTS.items():
        specs.append({"name": f"ddp_{variant}", "config": str(_config(tmp, synth, f"ddp_{variant}", **kw)), "tie": tie})
        ckpt = dict(save_strategy="steps", save_steps=2) if variant == "untied" else {}  # resumed below
        specs.append({
            "name": f"fsdp_{variant}", "tie": tie, "save": str(tmp / f"saved_{variant}"),
            "config": str(_config(tmp, synth, f"fsdp_{variant}", fsdp=True, fsdp_config=dict(FSDP_CONFIG), **kw, **ckpt)),
        })
    specs.append({"name": "fsdp_resumed", "resume": str(tmp / "fsdp_untied" / "checkpoint-2"),
                  "config": str(_config(tmp, synth, "fsdp_resumed", fsdp=True, fsdp_config=dict(FSDP_CONFIG)))})
    (tmp / "runs.json").write_text(json.dumps(specs))
    out = tmp / "ranks"
    out.mkdir()
    torchrun_two_ranks(HERE / "fsdp_worker.py", out, tmp / "runs.json", timeout=400)
    load = lambda name: tuple(torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in (0, 1))  # noqa: E731
    return SimpleNamespace(tmp=tmp, **{s["name"]: load(s["name"]) for s in specs})


def _train_logs(log: list[dict]) -> list[dict]:
    return [h for h in log if "loss" in h]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp2_shards_the_student_and_not_the_teacher(runs, variant) -> None:
    """Every student parameter is a DTensor split over the 2 ranks (dim-0 shards add up to the
    full size; LM head, embedding and layers have a strictly smaller local shard); the root
    is an FSDP2 module; the teacher holds no DTensor and no FSDP unit. The DDP run is not
    sharded (without the test-only patch, ``fsdp: true`` on CPU would look like it)."""
    f0, f1 = getattr(runs, f"fsdp_{variant}")
    for r in (f0, f1):
        info = r["info"]
        assert info["distributed_type"] == "DistributedType.FSDP" and info["fsdp_version"] == 2, info
        assert info["is_fsdp_module"] and "" in info["fsdp_units"]  # the root, fully_shard'ed in place
        if not VARIANTS[variant][1]:
            assert "lm_head" in info["fsdp_units"]  # its own unit, whose forward the fused loss skips
        assert set(info["sharding"]) == set(info["params"])  # every parameter is a DTensor
        assert info["teacher_type"] == "LlavaForConditionalGeneration"
        assert not info["teacher_is_fsdp_module"] and not info["teacher_dtensors"]
    for name, (local0, full) in f0["info"]["sharding"].items():
        local1 = f1["info"]["sharding"][name][0]
        assert local0[1:] == local1[1:] == full[1:] and local0[0] + local1[0] == full[0], name
    for name in ("lm_head.weight", "model.language_model.embed_tokens.weight",
                 "model.language_model.layers.0.mlp.down_proj.weight"):
        if name in f0["info"]["sharding"]:  # a tied lm_head.weight is listed as the embedding
            local, full = f0["info"]["sharding"][name]
            assert local[0] < full[0], name
    ddp = getattr(runs, f"ddp_{variant}")[0]["info"]
    assert ddp["distributed_type"] == "DistributedType.MULTI_CPU" and not ddp["sharding"] and not ddp["fsdp_units"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp2_steps_and_weights_equal_ddp(runs, synth, variant) -> None:
    """Each step's loss, parts and gradient norm, and the evaluation losses, equal the DDP
    run's (rel 1e-5; seen: equal to ~1e-7); both ranks end with identical full student
    weights, equal to DDP's (atol 1e-6; seen: <= 7e-9), the LM head moved (its gradient
    reached the shards) and the frozen vision tower did not. align_ti with the default fused
    loss (tied: 2 accumulation steps); GKD with on-policy (generated) batches on both ranks."""
    f0, f1 = getattr(runs, f"fsdp_{variant}")
    d0, d1 = getattr(runs, f"ddp_{variant}")
    got, ref = _train_logs(f0["log"]), _train_logs(d0["log"])
    assert len(got) == len(ref) == (4 if variant == "gkd" else 3)
    keys = ("loss", "grad_norm") + tuple(k for k in ref[0] if k.startswith("loss_"))
    assert len(keys) >= (4 if variant == "gkd" else 6), keys
    for g, e in zip(got, ref):
        for key in keys:
            assert g[key] == pytest.approx(e[key], rel=1e-5, abs=1e-7), (g["step"], key)
    if variant == "gkd":
        assert got[-1]["on_policy_batches"] == ref[-1]["on_policy_batches"] > 0
        assert any(g["loss_kd_on_policy"] > 0 for g in got) and any(g["loss_sft"] > 0 for g in got)
    evals = [(h["step"], h["eval_loss"]) for h in f0["log"] if "eval_loss" in h]
    ref_evals = [(h["step"], h["eval_loss"]) for h in d0["log"] if "eval_loss" in h]
    assert len(evals) == len(ref_evals) >= 2
    for (s, g), (t, e) in zip(evals, ref_evals):
        assert s == t and g == pytest.approx(e, rel=1e-5)
    assert set(f0["after"]) == set(f1["after"]) == set(d0["after"])
    for k in f0["after"]:
        assert torch.equal(f0["after"][k], f1["after"][k]), k
        torch.testing.assert_close(f0["after"][k], d0["after"][k], rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(f0["after"]["lm_head.weight"], f0["before"]["lm_head.weight"])
    assert all(torch.equal(f0["after"][k], f0["before"][k]) for k in f0["after"] if "vision_tower" in k)
    assert all(torch.equal(v, f1["teacher"][k]) and torch.equal(v, d1["teacher"][k]) for k, v in f0["teacher"].items())
    if variant == "untied":  # step 1 equals one process on the global batch (as the DDP test checks)
        cfg = _config(runs.tmp, synth, "one", per_device_train_batch_size=4, max_steps=1, eval_strategy="no",
                      ddp_backend=None)
        single = build_everything(*parse_args([str(cfg)]))
        single.train()
        one = single.state.log_history[0]
        for key in ("loss_sft", "loss_kd", "loss_iva"):
            assert got[0][key] == pytest.approx(one[key], rel=1e-4), key


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_fsdp2_saved_student_is_a_plain_checkpoint(runs, variant) -> None:
    """``save_model`` under FSDP2 (FULL_STATE_DICT) writes a student that ``from_pretrained``
    loads with exactly the trained (gathered) weights."""
    f0, _ = getattr(runs, f"fsdp_{variant}")
    loaded = LlavaForConditionalGeneration.from_pretrained(runs.tmp / f"saved_{variant}").state_dict()
    assert set(loaded) == set(f0["after"])
    for k, v in loaded.items():
        assert torch.equal(v, f0["after"][k]), k


def test_fsdp2_resume_from_an_fsdp_checkpoint(runs) -> None:
    """Resuming from the FSDP2 run's checkpoint-2 (the Trainer's stock FSDP path: sharded
    model and optimizer files) reaches its step-3 loss and parts (rel 1e-6) and final
    weights (atol 1e-7)."""
    full, resumed = runs.fsdp_untied[0], runs.fsdp_resumed[0]
    a = {h["step"]: h for h in _train_logs(full["log"])}
    b = {h["step"]: h for h in _train_logs(resumed["log"])}
    assert sorted(a) == sorted(b) == [1, 2, 3]  # 1, 2: restored from checkpoint-2's trainer state
    for key in ("loss", "loss_sft", "loss_kd", "loss_iva", "loss_tpa"):
        assert b[3][key] == pytest.approx(a[3][key], rel=1e-6), key
    for k, v in full["after"].items():
        torch.testing.assert_close(resumed["after"][k], v, rtol=0, atol=1e-7, msg=k)
