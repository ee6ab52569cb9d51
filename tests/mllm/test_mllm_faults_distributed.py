"""The fault guards of the reference trainer under 2-process DDP (gloo, CPU) and FSDP2: a step
that is non-finite on one rank is skipped on every rank, a checkpoint with a non-finite tensor on
one rank is refused by every rank, a bad sample met by one rank stops every rank after a
checkpoint, only rank 0 renames a staged checkpoint, and ``last`` resumes the newest complete
one. One ``torchrun`` launch trains every run (``guard_worker.py``); DeepSpeed ZeRO-2 is in
``test_mllm_deepspeed.py``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from mllm_helpers import (
    all_finite_checkpoint,
    tiny_config,
    torchrun_two_ranks,
    truncated_image_data,
)

from tokinteract.mllm.checkpoints import latest_checkpoint

pytestmark = pytest.mark.slow  # two processes, end to end

HERE = Path(__file__).parent
FSDP_CONFIG = yaml.safe_load((HERE.parents[1] / "examples" / "configs" / "stage2_fsdp_override.yaml").read_text())[
    "fsdp_config"]
DDP = dict(method="kd", ddp_backend="gloo")
RUNS: dict[str, tuple[dict, dict | None, str | None]] = {
    # rank 1's loss is +inf at step 2 while every gradient stays finite: only rank 1 can tell
    "inf": (dict(max_steps=4, save_strategy="steps", save_steps=1), {"rank": 1, "steps": [2], "kind": "inf"}, None),
    # rank 1's loss is NaN at steps 2-4 (so is every all-reduced gradient): the run stops after 3
    "nan": (dict(max_steps=6, output="nan"), {"rank": 1, "steps": [2, 3, 4], "kind": "nan"}, None),
    "resumed": (dict(max_steps=6, output="nan"), None, "last"),  # continues "nan" from its newest checkpoint
    # sequential order, batches of 2 dealt in turn to the ranks: sample 11 is rank 1's at step 3
    "bad": (dict(max_steps=3, train_sampling_strategy="sequential", data="cut"), None, None),
    # FSDP2 (the example's settings, CPU patch of fsdp_worker.py): as "inf"
    "fsdp_inf": (dict(max_steps=3, save_strategy="steps", save_steps=1, fsdp=True, fsdp_config=FSDP_CONFIG),
                 {"rank": 1, "steps": [2], "kind": "inf"}, None),
    # a NaN in rank 1's optimizer state (as a ZeRO partition would hold it) before the step-1 save
    "poisoned": (dict(max_steps=1, save_strategy="steps", save_steps=1, poison=1), None, None),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, synth) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("faults_ddp")
    cut = truncated_image_data(tmp, synth, index=11)
    specs = []
    for name, (kw, inject, resume) in RUNS.items():
        kw = dict(kw)
        out = tmp / kw.pop("output", name)
        if kw.pop("data", None):
            kw["data_path"] = str(cut)
        poison = kw.pop("poison", None)
        cfg = tiny_config(tmp, synth, f"{name}.yaml", output_dir=str(out), **DDP, **kw)
        specs.append({"name": name, "config": str(cfg), "inject": inject, "resume": resume,
                      "poison_optimizer_rank": poison})
    (tmp / "runs.json").write_text(json.dumps(specs))
    ranks = tmp / "ranks"
    ranks.mkdir()
    torchrun_two_ranks(HERE / "guard_worker.py", ranks, tmp / "runs.json", timeout=400)  # a rank left waiting hangs
    load = lambda n: tuple(torch.load(ranks / f"{n}_rank{r}.pt", weights_only=False) for r in (0, 1))  # noqa: E731
    return SimpleNamespace(tmp=tmp, **{n: load(n) for n in RUNS})


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_a_step_non_finite_on_one_rank_is_applied_by_no_rank(runs) -> None:
    """Step 2 changes no weight on either rank (rank 0 saw only finite numbers and is told), steps 3-4 train,
    both ranks log it and end equal; every checkpoint is finite, holds both ranks' RNG states,
    and was renamed from its staging folder by rank 0 only."""
    r0, r1 = runs.inf
    assert r0["world_size"] == 2 and r0["distributed_type"] == "DistributedType.MULTI_CPU"
    for r in (r0, r1):
        assert r["outcome"] == "ok" and r["steps_run"] == [1, 2, 3, 4]
        assert _equal(r["snaps"][2], r["snaps"][1]) and not _equal(r["snaps"][3], r["snaps"][2])
        assert len(r["nonfinite_steps"]) == 1 and r["nonfinite_steps"][0].startswith("step 2: non-finite")
    assert "loss [inf]" in r1["nonfinite_steps"][0]
    assert all("(non-finite on rank(s) [1] of 2)" in r["nonfinite_steps"][0] for r in (r0, r1))
    assert r0["nonfinite_steps"][0].startswith("step 2: non-finite loss or gradient on another rank")
    for step in (1, 2, 3, 4):
        assert _equal(r0["snaps"][step], r1["snaps"][step]), step
    out = runs.tmp / "inf"
    assert [Path(d).name for _, d in r0["renames"]] == [f"checkpoint-{s}" for s in (1, 2, 3, 4)] and r1["renames"] == []
    assert latest_checkpoint(out) == out / "checkpoint-4" and not list(out.glob("tmp-checkpoint-*"))
    for step in (1, 2, 3, 4):
        ckpt = out / f"checkpoint-{step}"
        all_finite_checkpoint(ckpt)
        assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file(), step


def test_ddp_non_finite_steps_in_a_row_stop_every_rank_then_last_resumes(runs) -> None:
    """NaN on rank 1 at steps 2-4: both ranks stop at step 4 with the same checkpoint-3 (the
    weights of step 1, finite); ``last`` then resumes both ranks from it to step 6."""
    out = runs.tmp / "nan"
    for r in runs.nan:
        assert r["outcome"] == "stopped" and r["checkpoint"] == str(out / "checkpoint-3"), r.get("message")
        assert "3 non-finite steps in a row (max_nonfinite_steps=3); last: step 4" in r["message"]
        assert len(r["nonfinite_steps"]) == 3 and _equal(r["snaps"][3], r["snaps"][1])
    assert "non-finite gradient" in runs.nan[0]["nonfinite_steps"][0]  # rank 0's own loss was finite
    all_finite_checkpoint(out / "checkpoint-3")
    r0, r1 = runs.resumed
    for r in (r0, r1):
        assert r["outcome"] == "ok" and r["steps_run"] == [4, 5, 6] and not r["nonfinite_steps"]
    assert _equal(r0["snaps"][6], r1["snaps"][6]) and not _equal(r0["snaps"][6], runs.nan[0]["snaps"][3])
    assert latest_checkpoint(out) == out / "checkpoint-3"  # save_strategy "no": nothing newer


def test_ddp_bad_sample_on_one_rank_stops_every_rank_after_a_checkpoint(runs) -> None:
    """Sample 11 (rank 1's, step 3) exceeds the default limit (1 % of 12): rank 1 skips and logs
    it, and both ranks stop with the complete checkpoint-2 that rank 0 renamed."""
    r0, r1 = runs.bad
    out = runs.tmp / "bad"
    assert r0["skipped"] == {} and list(r1["skipped"]) == [11] and "cut.png" in r1["skipped"][11][0]
    for r in (r0, r1):
        assert r["outcome"] == "stopped" and r["checkpoint"] == str(out / "checkpoint-2"), r.get("message")
        assert "1 bad sample(s) of 12 exceed bad_sample_limit=0.01" in r["message"] and r["steps_run"] == [1, 2]
    assert len(r0["renames"]) == 1 and r1["renames"] == []
    assert latest_checkpoint(out) == out / "checkpoint-2"
    all_finite_checkpoint(out / "checkpoint-2")


def test_ddp_a_checkpoint_non_finite_on_one_rank_is_refused_by_every_rank(runs) -> None:
    """Rank 1's optimizer state holds a NaN at the step-1 save: both ranks refuse it (rank 0
    learns it from rank 1), nothing is written, and neither rank waits for the other."""
    r0, r1 = runs.poisoned
    for r in (r0, r1):
        assert r["outcome"] == "refused" and "refusing to save checkpoint-1" in r["message"], r.get("message")
        assert "on rank(s) [1]" in r["message"]
    assert "optimizer.state[" in r1["message"]
    out = runs.tmp / "poisoned"
    assert not list(out.glob("*checkpoint-*"))


def test_fsdp2_a_step_non_finite_on_one_rank_is_applied_by_no_rank(runs) -> None:
    """As the DDP case under FSDP2 (sharded student, example settings): step 2 changes no full
    weight on either rank, step 3 trains, rank 0's message says another rank saw it; the
    checkpoints (FULL_STATE_DICT weights, optimizer.bin) are finite, complete, renamed by rank 0 only."""
    r0, r1 = runs.fsdp_inf
    out = runs.tmp / "fsdp_inf"
    for r in (r0, r1):
        assert r["distributed_type"] == "DistributedType.FSDP" and r["outcome"] == "ok" and r["steps_run"] == [1, 2, 3]
        assert _equal(r["snaps"][2], r["snaps"][1]) and not _equal(r["snaps"][3], r["snaps"][2])
        assert len(r["nonfinite_steps"]) == 1 and "(non-finite on rank(s) [1] of 2)" in r["nonfinite_steps"][0]
    assert r0["nonfinite_steps"][0].startswith("step 2: non-finite loss or gradient on another rank")
    assert r1["nonfinite_steps"][0].startswith("step 2: non-finite loss [inf]")
    assert _equal(r0["snaps"][3], r1["snaps"][3])
    assert [Path(d).name for _, d in r0["renames"]] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert r1["renames"] == [] and latest_checkpoint(out) == out / "checkpoint-3"
    for step in (1, 2, 3):
        all_finite_checkpoint(out / f"checkpoint-{step}")
        assert (out / f"checkpoint-{step}" / "rng_state_1.pth").is_file()
