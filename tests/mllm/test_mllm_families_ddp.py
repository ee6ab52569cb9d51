"""2-process DDP (gloo, CPU) on a non-LLaVA family, Qwen2.5-VL (issue 13, item 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_ddp_worker import make_trainer
from mllm_helpers import FAMILY_SAMPLES as SAMPLES, torchrun_two_ranks
from test_mllm_families_trainer import data  # noqa: F401  (the module's data fixture)

HERE = Path(__file__).parent
PARTS = ("loss_sft", "loss_kd", "loss_iva", "loss_tpa")


@pytest.mark.slow  # two processes, end to end
def test_qwen2_5_vl_ddp_two_processes_identical_weights_and_equal_to_one_process(tmp_path, data) -> None:  # noqa: F811
    """Two ranks of 2 samples: both end with the same student weights, which (and each step's logged
    parts) equal one process on the same global batch of 4. Every step sees the whole 4-sample file, so
    the global batch is the same whatever the samplers' order; greedy candidates and SGD make the step
    deterministic (only fp32 summation order differs)."""
    four = tmp_path / "data.json"
    four.write_text(json.dumps([*SAMPLES, {"image": "b.png", "conversations": [
        {"from": "human", "value": "what is it <image> is it red"}, {"from": "gpt", "value": "a red dog on the mat"}]}]))
    for png in ("a.png", "b.png"):
        (tmp_path / png).write_bytes((data.parent / png).read_bytes())
    out = tmp_path / "ranks"
    out.mkdir()
    torchrun_two_ranks(HERE / "family_ddp_worker.py", "qwen2_5_vl", four, out, timeout=600)
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert r0["world_size"] == r1["world_size"] == 2
    for k in r0["after"]:
        assert torch.equal(r0["after"][k], r1["after"][k]), k
    assert all(torch.equal(v, r1["teacher"][k]) for k, v in r0["teacher"].items())
    changed = [k for k in r0["after"] if not torch.equal(r0["after"][k], r0["before"][k])]
    assert any(".language_model." in k for k in changed) and any(".visual.merger." in k for k in changed)
    assert not any(".visual." in k and "merger" not in k for k in changed)  # the tower stays frozen

    single = make_trainer("qwen2_5_vl", four, tmp_path / "one", per_device_batch=4, ddp=False)
    single.train()
    got = {h["step"]: h for h in r0["log"] if "loss_sft" in h}
    ref = {h["step"]: h for h in single.state.log_history if "loss_sft" in h}
    assert sorted(got) == sorted(ref) == [1, 2]
    for step in (1, 2):
        assert ref[step]["loss_tpa"] > 0 and ref[step]["loss_iva"] > 0
        for key in PARTS:
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
    after = single.model.state_dict()
    for k in changed:
        torch.testing.assert_close(r0["after"][k], after[k], rtol=1e-5, atol=1e-6, msg=k)
    assert {k for k in after if not torch.equal(after[k], r0["before"][k])} == set(changed)
