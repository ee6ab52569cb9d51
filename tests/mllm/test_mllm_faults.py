"""Faults of the reference trainer (issue 14): each case ends before step 1 with a clear error, or
with every trained step kept and no non-finite checkpoint."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mllm_helpers import (
    all_finite_checkpoint,
    make_model,
    tiny_config,
    truncated_image_data,
    write_json,
)
from safetensors.torch import load_file

from tokinteract.mllm import DistillationConfig
from tokinteract.mllm.checkpoints import OutputDirError, latest_checkpoint
from tokinteract.mllm.cli import build_everything, main, parse_args
from tokinteract.mllm.preflight import PreflightError, check_model_path, scan_dataset
from tokinteract.mllm.reliability import NonFiniteError, TrainingStopped

HERE = Path(__file__).parent


def _samples(synth) -> list[dict]:
    return json.loads(Path(synth.train).read_text())


def _png(synth) -> Path:
    return next(Path(synth.image_folder).rglob("*.png"))


def _no_models(monkeypatch) -> None:
    """Any model load fails loudly: the error under test must come first."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr("tokinteract.mllm.model.build_tiny_llava", boom)
    monkeypatch.setattr("transformers.LlavaForConditionalGeneration.from_pretrained", boom)


def _build(path: Path, *flags: str, **kw):
    return build_everything(*parse_args([str(path), *flags]), **kw)


# ---------------------------------------------------------------- 1. preflight
def test_preflight_reports_every_bad_sample_before_any_model_loads(tmp_path, synth, monkeypatch) -> None:
    _no_models(monkeypatch)
    s = _samples(synth)
    s[1]["image"] = str(tmp_path / "missing.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    s[2]["image"] = str(tmp_path / "garbage.png")
    s[3]["conversations"][0]["value"] = "<image>\n<image>\nwhat color is the circle ?"
    s[4]["conversations"][0]["value"] += " what" * 3000  # nothing left to supervise after truncation
    del s[5]["conversations"]
    data = write_json(tmp_path / "bad.json", s)
    with pytest.raises(PreflightError) as err:
        _build(tiny_config(tmp_path, synth, data_path=str(data)))
    msg = str(err.value)
    assert "5 bad sample(s) of 12 exceed bad_sample_limit=0.01" in msg
    for index, why in [(1, "missing"), (2, "not a readable image"), (3, "placeholder"), (4, "no supervised token left"),
                       (5, "conversations")]:
        line = next(x for x in msg.splitlines() if f"bad sample {index}:" in x)
        assert why in line, line


def test_preflight_with_iva_flags_images_without_an_instruction_after_them(tmp_path, synth, tok) -> None:
    """IVA weighted by attention needs instruction rows after the image (tokinteract.instruction_rows):
    a question only before the image is a bad sample for IVA, fine for KD; before and after is fine."""
    s = _samples(synth)
    question = s[0]["conversations"][0]["value"].replace("<image>", "").strip()
    s[1]["conversations"] = [{"from": "human", "value": f"{question}\n<image>"},  # only before the image
                             {"from": "gpt", "value": "no"}]
    s[2]["conversations"] = [{"from": "human", "value": f"{question}\n<image>\n{question}"},  # before and after
                             {"from": "gpt", "value": "no"}]
    data = write_json(tmp_path / "order.json", s)
    kw = dict(num_image_tokens=16, max_length=2048, workers=1, cache_dir=tmp_path / "cache")
    iva = scan_dataset(str(data), str(synth.image_folder), tok, iva_rows=True, **kw)
    assert set(iva.bad) == {1} and "IVA needs instruction tokens after the image" in iva.bad[1]
    kd = scan_dataset(str(data), str(synth.image_folder), tok, **kw)  # a separate cache entry
    assert kd.bad == {} and kd.chunks_scanned == 1
    from tokinteract.mllm.preflight import _iva_needs_rows

    assert _iva_needs_rows(DistillationConfig(method="align_ti"))
    assert _iva_needs_rows(DistillationConfig(method="kd", iva_weight=0.5))
    assert not _iva_needs_rows(DistillationConfig(method="kd"))
    assert not _iva_needs_rows(DistillationConfig(method="uniform_va"))


def test_preflight_paths_output_dir_and_disk(tmp_path, synth, tok, monkeypatch) -> None:
    _no_models(monkeypatch)
    cfg = tiny_config(tmp_path, synth, tiny=False, method="kd", student_checkpoint="./no/such/student",
                      teacher_checkpoint=str(tmp_path / "no-teacher"))
    with pytest.raises(PreflightError, match=r"student_checkpoint './no/such/student' not found[\s\S]*"
                                             r"teacher_checkpoint '.*no-teacher' not found"):
        _build(cfg)
    with pytest.raises(PreflightError, match=r"resume_from_checkpoint '\./no/ckpt' not found"):
        _build(tiny_config(tmp_path, synth), "--resume_from_checkpoint", "./no/ckpt")
    with pytest.raises(PreflightError, match=r"resume_from_checkpoint='last': no complete checkpoint-\* folder"):
        _build(tiny_config(tmp_path, synth), "--resume_from_checkpoint", "last")
    assert check_model_path("teacher_checkpoint", "Qwen/Qwen2.5-7B-Instruct") is None  # a hub id: left to the Hub
    assert "not found" in check_model_path("vision_tower", "not a//valid id")
    (tmp_path / "a-file").write_text("x")
    bad_out = tiny_config(tmp_path, synth, output_dir=str(tmp_path / "a-file" / "out"))
    with pytest.raises(PreflightError, match="output_dir .*a-file/out' is not writable"):
        _build(bad_out)
    monkeypatch.undo()
    gone = tmp_path / "gone"
    tr = _build(tiny_config(tmp_path, synth, output_dir=str(gone)), "--preflight", "false")
    shutil.rmtree(gone)
    gone.write_text("x")  # the output dir became unusable after the trainer was built (save_strategy: no)
    with pytest.raises(OutputDirError, match="output_dir .*gone' is not writable"):
        tr.train()
    assert tr.state.global_step == 0
    _no_models(monkeypatch)
    ckpt = tmp_path / "student"
    make_model(tok).save_pretrained(ckpt)
    monkeypatch.setattr("tokinteract.mllm.preflight.shutil.disk_usage", lambda p: SimpleNamespace(total=1, used=1, free=10))
    with pytest.raises(PreflightError, match="has 0.00 GiB free but one checkpoint needs about"):
        _build(tiny_config(tmp_path, synth, tiny=False, method="sft", student_checkpoint=str(ckpt)))


def test_preflight_scan_is_parallel_and_cached_by_fingerprint(tmp_path, synth, tok) -> None:
    base = _samples(synth)
    s = [dict(x) for x in base * 90]  # 1080 samples: 3 chunks of 512
    bad_img = tmp_path / "bad.png"
    bad_img.write_bytes(b"garbage")
    s[700]["image"] = str(bad_img)
    data = write_json(tmp_path / "big.json", s)
    kw = dict(num_image_tokens=16, max_length=2048)
    serial = scan_dataset(str(data), str(synth.image_folder), tok, workers=1, cache_dir="", **kw)
    cache = tmp_path / "cache"
    par = scan_dataset(str(data), str(synth.image_folder), tok, workers=2, cache_dir=cache, **kw)
    assert serial.samples == par.samples == 1080 and set(serial.bad) == set(par.bad) == {700}
    assert (par.chunks_scanned, par.chunks_cached, par.images) == (3, 0, 1080)
    again = scan_dataset(str(data), str(synth.image_folder), tok, workers=2, cache_dir=cache, **kw)
    assert (again.chunks_scanned, again.chunks_cached) == (0, 3) and again.bad == par.bad
    shutil.copy(_png(synth), bad_img)  # the image is fixed: only its chunk is scanned again
    st = os.stat(bad_img)
    os.utime(bad_img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fixed = scan_dataset(str(data), str(synth.image_folder), tok, workers=2, cache_dir=cache, **kw)
    assert (fixed.chunks_scanned, fixed.chunks_cached) == (1, 2) and fixed.bad == {}
    longer = scan_dataset(str(data), str(synth.image_folder), tok, workers=1, cache_dir=cache,
                          num_image_tokens=16, max_length=40)  # another setting: another cache entry
    assert longer.chunks_scanned == 3 and longer.truncated > 0


# ---------------------------------------------------------------- 2. bad samples mid-run
def test_bad_sample_mid_run_is_skipped_counted_and_logged(tmp_path, synth, caplog) -> None:
    data = truncated_image_data(tmp_path, synth)
    cfg = tiny_config(tmp_path, synth, method="kd", data_path=str(data), max_steps=3, per_device_train_batch_size=4,
                      bad_sample_limit=0.1, train_sampling_strategy="sequential")
    tr = _build(cfg)
    with caplog.at_level(logging.WARNING, logger="tokinteract.mllm.reliability"):
        tr.train()
    assert tr.state.global_step == 3
    assert list(tr.skipped_samples) == [10] and "cut.png" in tr.skipped_samples[10][0]
    assert "skipped sample 10" in caplog.text and "step 3" in caplog.text


def test_bad_samples_past_the_limit_stop_after_a_checkpoint(tmp_path, synth) -> None:
    data = truncated_image_data(tmp_path, synth)
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path, synth, method="kd", data_path=str(data), max_steps=3, per_device_train_batch_size=4,
                      train_sampling_strategy="sequential", output_dir=str(out))  # default limit: 1 % of 12
    tr = _build(cfg)
    with pytest.raises(TrainingStopped, match=r"1 bad sample\(s\) of 12 exceed bad_sample_limit=0.01.*sample 10") as err:
        tr.train()
    assert err.value.checkpoint == str(out / "checkpoint-2")  # steps 1 and 2 are kept
    assert latest_checkpoint(out) == out / "checkpoint-2"


def test_a_too_long_prompt_mid_run_is_skipped(tmp_path, synth) -> None:
    s = _samples(synth)
    s[6]["conversations"][0]["value"] += " what" * 3000
    data = write_json(tmp_path / "long.json", s)
    cfg = tiny_config(tmp_path, synth, method="sft", data_path=str(data), max_steps=3, per_device_train_batch_size=4,
                      bad_sample_limit=0.1, preflight=False)  # no preflight: the sample is met mid-run
    tr = _build(cfg)
    tr.train()
    assert tr.state.global_step == 3 and "no supervised token left" in tr.skipped_samples[6][1]


# ---------------------------------------------------------------- 3. non-finite guard
def _nan_at(tr, steps: set[int]) -> None:
    """Make the KD part, the loss and so every gradient NaN on the given optimizer steps (1-based)."""
    orig = tr.loss_fn

    def loss_fn(*a, **k):
        loss, parts = orig(*a, **k)
        if tr.state.global_step + 1 in steps:
            parts = {**parts, "kd": parts["kd"] * float("nan")}
            loss = loss * float("nan")
        return loss, parts

    tr.loss_fn = loss_fn


def _snapshots(tr) -> dict[int, dict[str, torch.Tensor]]:
    from transformers import TrainerCallback

    snaps: dict[int, dict[str, torch.Tensor]] = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            snaps[state.global_step] = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}

    tr.add_callback(Snap())
    return snaps


def test_a_non_finite_step_is_not_applied_and_logged(tmp_path, synth, caplog) -> None:
    cfg = tiny_config(tmp_path, synth, method="kd", max_steps=4, save_strategy="steps", save_steps=1)
    tr = _build(cfg)
    _nan_at(tr, {2})
    snaps = _snapshots(tr)
    with caplog.at_level(logging.WARNING, logger="tokinteract.mllm.reliability"):
        tr.train()
    for k in snaps[1]:  # step 2 changed nothing; steps 3 and 4 trained
        assert torch.equal(snaps[2][k], snaps[1][k]), k
    assert any(not torch.equal(snaps[3][k], snaps[2][k]) for k in snaps[2])
    assert len(tr.nonfinite_steps) == 1
    msg = tr.nonfinite_steps[0]
    assert msg.startswith("step 2: non-finite loss") and "loss_kd" in msg and "in 31 parameter(s): model.multi_modal_projector" in msg
    assert "the update was not applied" in caplog.text
    assert all(math.isfinite(h["loss"]) for h in tr.state.log_history if "loss" in h)
    assert [h.get("nonfinite_steps_skipped", 0) for h in tr.state.log_history if "loss" in h] == [0, 1, 0, 0]
    for step in (1, 2, 3, 4):
        all_finite_checkpoint(Path(tmp_path / "out" / f"checkpoint-{step}"))


def test_non_finite_steps_in_a_row_stop_with_a_finite_checkpoint(tmp_path, synth) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path, synth, method="kd", max_steps=6, output_dir=str(out))  # save_strategy: no
    tr = _build(cfg)
    _nan_at(tr, {2, 3, 4})
    with pytest.raises(TrainingStopped, match=r"3 non-finite steps in a row \(max_nonfinite_steps=3\); last: step 4: "
                                              r"non-finite loss .*loss_kd.*parameter") as err:
        tr.train()
    assert err.value.checkpoint == str(out / "checkpoint-3")
    all_finite_checkpoint(out / "checkpoint-3")


def test_no_checkpoint_holds_a_non_finite_tensor(tmp_path, synth) -> None:
    out = tmp_path / "run"
    tr = _build(tiny_config(tmp_path, synth, method="sft", max_steps=1, output_dir=str(out)))
    tr.train()
    with torch.no_grad():
        tr.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="lm_head.weight"):
        tr._save_checkpoint(tr.model, None)
    with pytest.raises(NonFiniteError, match="lm_head.weight"):
        tr.save_model(str(out / "final"))
    assert not (out / "checkpoint-1").exists() and not (out / "final").exists()


# ---------------------------------------------------------------- 4. atomic checkpoints
def test_last_skips_incomplete_checkpoints(tmp_path, caplog) -> None:
    for step, files in [(2, ["model.safetensors", "trainer_state.json"]), (4, ["model.safetensors"]), (6, [])]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for f in files:
            (d / f).write_text("{}")
    (tmp_path / "tmp-checkpoint-8").mkdir()
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    for name in ("checkpoint-4", "checkpoint-6", "tmp-checkpoint-8"):
        assert name in caplog.text


@pytest.mark.slow
def test_kill_9_during_a_save_then_resume_equals_an_uninterrupted_run(tmp_path, synth) -> None:
    """SIGKILL at three points of checkpoint-4's save; ``last`` then resumes from checkpoint-2
    and the run ends with the uninterrupted run's final loss and weights (tolerances of
    ``test_resume_reaches_the_same_final_loss``)."""
    kw = dict(method="kd", max_steps=4, save_strategy="steps", save_steps=2)
    full = _build(tiny_config(tmp_path, synth, "full.yaml", output_dir=str(tmp_path / "full"), **kw))
    full.train()
    loss_full = [h["loss"] for h in full.state.log_history if "loss" in h]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    for point in ("weights", "optimizer", "rename"):
        out = tmp_path / point
        cfg = tiny_config(tmp_path, synth, f"{point}.yaml", output_dir=str(out), **kw)
        proc = subprocess.run([sys.executable, str(HERE / "crash_worker.py"), str(cfg), point, "4"],
                              capture_output=True, text=True, timeout=300, env=env, check=False)
        assert proc.returncode == -9, proc.stderr[-3000:]
        assert (out / "tmp-checkpoint-4").is_dir() and not (out / "checkpoint-4").exists(), point
        resumed = _build(cfg, "--resume_from_checkpoint", "last", check_existing_run=True)
        resumed.train(resume_from_checkpoint="last")
        loss = [h["loss"] for h in resumed.state.log_history if "loss" in h]
        assert resumed.state.global_step == 4 and loss[-1] == pytest.approx(loss_full[-1], rel=1e-6), point
        sa, sb = full.model.state_dict(), resumed.model.state_dict()
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6)
        assert latest_checkpoint(out) == out / "checkpoint-4" and not (out / "tmp-checkpoint-4").exists()


# ---------------------------------------------------------------- 5. existing output dir
def test_refuses_to_start_over_an_earlier_run(tmp_path, synth) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path, synth, method="sft", max_steps=1, save_strategy="steps", save_steps=1,
                      output_dir=str(out))
    assert main([str(cfg)]) == 0
    first = load_file(out / "checkpoint-1" / "model.safetensors")
    with pytest.raises(PreflightError, match="already holds a run .*checkpoint-1.*resume_from_checkpoint=last"):
        main([str(cfg)])
    tr = _build(cfg)  # without the CLI: the trainer refuses too
    with pytest.raises(OutputDirError, match="already holds a run"):
        tr.train()
    assert all(torch.equal(v, load_file(out / "checkpoint-1" / "model.safetensors")[k]) for k, v in first.items())
    assert main([str(cfg), "--overwrite_output_dir", "true"]) == 0
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]


# ---------------------------------------------------------------- 6. remap, messages, flags
def test_remap_collision_with_a_text_token_is_refused_before_step_1(tmp_path, synth, tok, processor, monkeypatch) -> None:
    from transformers import TrainingArguments

    from tokinteract.mllm import (
        DistillationTrainer,
        LlavaCollator,
        LlavaJsonDataset,
        set_trainable,
    )

    ds = LlavaJsonDataset(synth.train, synth.image_folder, tok, processor.image_processor, num_image_tokens=16)
    col = LlavaCollator(tok.pad_token_id, tok.convert_tokens_to_ids("<image>"), 16)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    student = make_model(tok, seed=1)
    set_trainable(student, "finetune")
    text_id = tok.convert_tokens_to_ids("red")
    with pytest.raises(ValueError, match=r"image_token_policy='remap': the teacher's image-token id \d+ is the student "
                                         r"tokenizer's text token 'red'"):
        DistillationTrainer(student, args, teacher=make_model(tok, seed=2, image_token_id=text_id),
                            distill=DistillationConfig(method="kd", image_token_policy="remap"), train_dataset=ds,
                            data_collator=col, processing_class=processor)
    eos = make_model(tok, seed=2, image_token_id=tok.eos_token_id)  # a special token: found in the first batch
    eos.save_pretrained(tmp_path / "teacher-eos")
    tr = DistillationTrainer(student, args, teacher=eos, distill=DistillationConfig(method="kd", image_token_policy="remap"),
                             train_dataset=ds, data_collator=col, processing_class=processor)
    with pytest.raises(TrainingStopped, match="holds the teacher's image-token id .*no step had been applied"):
        tr.train()
    _no_models(monkeypatch)  # the CLI finds those samples in its preflight scan, before any model loads
    with pytest.raises(PreflightError, match=rf"bad sample 0: its text holds token id {tok.eos_token_id}, the "
                                             r"teacher's image-token id \(image_token_policy='remap'"):
        _build(tiny_config(tmp_path, synth, method="kd", teacher_checkpoint=str(tmp_path / "teacher-eos"),
                           image_token_policy="remap"))


def test_messages_name_the_argument_and_flags_are_not_abbreviated(tmp_path, synth) -> None:
    with pytest.raises(ValueError, match="tpa_temperature must be a finite number > 0, got 0"):
        DistillationConfig(tpa_temperature=0.0).resolved()
    with pytest.raises(ValueError, match="gkd_temperature must be"):
        DistillationConfig(gkd_temperature=-1.0).resolved()
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--learning_rat'"):
        parse_args([str(tiny_config(tmp_path, synth)), "--learning_rat", "1.0"])


# ---------------------------------------------------------------- 7. determinism
@pytest.fixture(scope="module")
def determinism_runs(tmp_path_factory: pytest.TempPathFactory, synth) -> dict[int, dict[str, dict]]:
    """Two processes, ``OMP_NUM_THREADS=1`` and ``2`` (and hash seeds 1 and 2), one after the
    other: each trains the tiny CLI config (3 align_ti steps, ``torch.set_num_threads`` = its
    count), then the demo-scale run (``determinism_worker.py``). ``{threads: {"cli": weights,
    "demo": record}}``; a part that raised holds ``{"error": traceback}``."""
    tmp = tmp_path_factory.mktemp("determinism")
    cfg = tiny_config(tmp, synth, max_steps=3)
    got = {}
    for threads in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONHASHSEED": str(threads)}
        cli, demo = tmp / f"w{threads}.pt", tmp / f"demo{threads}.pt"
        proc = subprocess.run([sys.executable, str(HERE / "determinism_worker.py"), str(cfg), str(cli), str(threads),
                               str(tmp / "run"), str(demo), "8"],
                              capture_output=True, text=True, timeout=900, env=env, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[threads] = {"cli": torch.load(cli), "demo": torch.load(demo)}
    return got


def _ok(record: dict) -> dict:
    assert "error" not in record, record.get("error")
    return record


@pytest.mark.slow
def test_same_seed_bit_identical_weights_across_processes_and_thread_counts(determinism_runs) -> None:
    """Two processes, 1 and 2 threads, 3 align_ti steps: bit-identical weights. (At these tiny sizes
    no reduction is split across threads; see the trainer guide's "Faults" section for larger ones.)"""
    got = {threads: _ok(run["cli"]) for threads, run in determinism_runs.items()}
    assert got[1].keys() == got[2].keys()
    for k in got[1]:
        assert torch.equal(got[1][k], got[2][k]), k


@pytest.mark.slow
def test_demo_scale_runs_repeat_bit_for_bit_whatever_the_environment_threads(determinism_runs) -> None:
    """The demo at its quick preset's model sizes (teacher 128 x 4 with its vision tower
    trained, Align-TI student 48 x 2, batch 16): two processes with the same seeds, one with
    ``OMP_NUM_THREADS=1`` and one with ``2`` (and different hash seeds), end with bit-identical
    teacher and student weights, because ``Demo.fit`` trains with the setting's thread count.
    (With 1 and 2 training threads the teacher's vision-tower weights differ after one step.)"""
    got = {threads: _ok(run["demo"]) for threads, run in determinism_runs.items()}
    assert (got[1]["threads_in_env"], got[2]["threads_in_env"]) == (1, 2)  # the environments did differ
    for model in ("teacher", "student"):
        a, b = got[1][model], got[2][model]
        assert a.keys() == b.keys() and len(a) > 50
        for k in a:
            assert torch.equal(a[k], b[k]), (model, k)
