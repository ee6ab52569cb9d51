"""The demo (examples/demo.py, examples/study/demo_study.py): CI smoke run + the evaluation helpers of
tokinteract.mllm.eval it uses."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from tokinteract.mllm import eval as mllm_eval

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "study"))
import demo_study as dm  # noqa: E402  (the study lives in examples/, outside the package)

pytestmark = pytest.mark.slow  # end to end: trains tiny models


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory):
    """One smoke run (tiny task, tiny models, a few steps) shared by the tests below."""
    torch.set_num_threads(2)
    run_dir = tmp_path_factory.mktemp("demo_smoke")
    res = dm.run_demo(dm.PRESETS["smoke"], run_dir, progress=False, log=lambda *_: None)
    return run_dir, res


def test_smoke_pipeline_writes_results(smoke) -> None:
    run_dir, _ = smoke
    saved = json.loads((run_dir / "results.json").read_text())
    assert set(saved["runs"]) == set(dm.EXPERIMENTS["table5"]) | set(dm.EXPERIMENTS["fig6"]) | {"kd@budget"}
    for key, run in saved["runs"].items():
        for r in run["seeds"]:
            ev = r["eval"]
            assert 0.0 <= ev["overall"] <= 1.0
            assert math.isfinite(ev["kl"]) and ev["kl"] >= 0.0
            assert sum(ev["counts"].values()) == saved["task"]["test_eval"]
            assert r["train"]["steps_timed"] >= 1
            assert len(r["weights"]) == 16 and int(r["weights"], 16) >= 0  # the trained student's digest
    for key in dm.EXPERIMENTS["fig6"]:
        ex = saved["runs"][key]["seeds"][0]["exposure"]
        assert len(ex["ex_acc_err"]) == dm.PRESETS["smoke"].exposure_steps
        assert all(e >= 0 for e in ex["e"]) and all(r >= 0 for r in ex["r"])
    assert len(saved["irs"]["scores"]) == dm.PRESETS["smoke"].teacher.layers
    assert 0 <= saved["irs"]["best_layer"] < dm.PRESETS["smoke"].teacher.layers
    # Table 4/13: the rows of the methods the study trains (both TPA forwards), none of the others
    study_methods = {"sft", "kd", "iva", "tpa", "align_ti"}
    assert [t["label"] for t in saved["timing"]] == [lab for lab, m, _ in dm.TIMING_RUNS if m in study_methods]
    assert len(saved["timing"]) == 6
    assert all(t["step_cpu_s"] > 0 for t in saved["timing"])
    # the cached teacher and stage-1 student are reused by a second call, under their settings' keys
    for path in ("teacher", "student_stage1"):
        assert (run_dir / path / "config.json").exists()
        info = json.loads((run_dir / path / "train_info.json").read_text())
        assert len(info["cache_key"]) == 16 and len(info["weights"]) == 16
    # each seed's student differs from the others (the digest names the weights, not the setting)
    assert len({r["weights"] for r in saved["runs"]["sft"]["seeds"]} | {r["weights"] for r in saved["runs"]["kd"]["seeds"]}) \
        == len(saved["runs"]["sft"]["seeds"]) + len(saved["runs"]["kd"]["seeds"])
    # Table 18: Vanilla KD for the steps that take Align-TI's time, from the timing pass
    b = saved["table18"]
    assert b == dm.compute_budget(saved["timing"], dm.PRESETS["smoke"].student_steps)
    assert saved["runs"]["kd@budget"]["steps"] == b["kd_steps"]
    assert saved["runs"]["kd@budget"]["seeds"][0]["train"]["steps_timed"] >= 1
    # Fig. 7: a map over the 4x4 patch grid per sample for the teacher and the first seed's kd and iva students
    f7 = saved["fig7"]
    n = len(f7["samples"])
    assert 1 <= n <= dm.PRESETS["smoke"].n_fig7
    assert all(s["type"] in ("color", "position", "count", "exist") for s in f7["samples"])
    side = dm.PRESETS["smoke"].image_size // dm.PRESETS["smoke"].patch_size
    for maps in [f7["teacher"]["maps"]] + [saved["runs"][k]["seeds"][0]["attention_maps"]["maps"] for k in ("kd", "iva", "align_ti")]:
        assert torch.tensor(maps).shape == (n, side, side)
        assert all(0.0 < float(torch.tensor(m).sum()) <= 1.0 + 1e-5 for m in maps)  # attention mass on the image
    assert "attention_maps" not in saved["runs"]["sft"]["seeds"][0]


def test_report_tables_and_plots(smoke, tmp_path: Path) -> None:
    _, res = smoke
    page = dm.write_report(res, tmp_path / "out", command="python examples/demo.py --smoke",
                           page=tmp_path / "page.md")
    md = page.read_text()
    assert "## Components (paper Table 5)" in md
    assert "## Exposure bias (paper Fig. 6)" in md
    assert "## Time and memory per training step" in md
    rows = {r["label"]: r for r in res["timing"]}  # Table 4/13 as ratios to SFT and to Vanilla KD (the paper's)
    ati, kd = rows["Align-TI (cached forward)"], rows["Vanilla KD (FKL)"]
    line = next(x for x in md.splitlines() if x.startswith("| Align-TI (cached forward) |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == f"{ati['step_time_s'] / kd['step_time_s']:.2f}"
    assert cells[6] == f"{ati['peak_mem_mib'] / kd['peak_mem_mib']:.2f}"
    assert "![IRS](out/fig4_irs.png)" in md
    assert "## Vanilla KD given Align-TI's compute (paper Table 18)" in md
    assert f"trains {res['table18']['kd_steps']} steps" in md
    assert "## Instruction-to-vision attention over the image grid (paper Fig. 7)" in md
    assert "![Fig. 7](out/fig7_attention.png)" in md
    for png in ("fig4_irs.png", "fig6_exaccerr.png", "fig7_attention.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    # a bar plot per table (issue 15, item 7), linked under the table's section
    for e in res["settings"]["experiments"]:
        if e in dm._TABLES and e != "fig5" and any(k in res["runs"] for k in dm._TABLES[e][2]):
            assert f"![{dm._TABLES[e][0]}](out/bars_{e}.png)" in md
            assert (tmp_path / "out" / f"bars_{e}.png").stat().st_size > 1000
    assert "![Components (paper Table 5)](out/bars_table5.png)" in md
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(data["summary"]) == set(res["runs"])
    # every student row of the Table 5 section
    for key in dm.EXPERIMENTS["table5"]:
        assert f"| {res['runs'][key]['label']} |" in md
    assert "| student | overall EM % |" in dm.summary_markdown(res)


def test_bar_rows_hold_each_tables_runs_in_order() -> None:
    """The bars of a table: its keys with runs, in the table's order, mean and std over seeds in percent with
    every seed's value; a key without runs is left out, and no run at all writes no plot."""
    summary = {"kd": {"label": "Vanilla KD", "values": {"overall": [0.5, 0.7, 0.6]}},
               "sft": {"label": "SFT", "values": {"overall": [0.25]}},
               "iva": {"label": "+IVA", "values": {"overall": []}}}
    rows = dm._bar_rows(summary, ["sft", "iva", "tpa", "kd"])
    assert [r[0] for r in rows] == ["SFT", "Vanilla KD"]
    assert rows[0][1:] == (25.0, 0.0, [25.0])
    label, m, sd, v = rows[1]
    assert m == pytest.approx(60.0) and sd == pytest.approx(10.0) and v == pytest.approx([50.0, 70.0, 60.0])
    assert not dm._plot_table_bars(summary, ["iva", "tpa"], Path("/nonexistent/never.png"), "t")


def test_run_is_resumed_from_saved_runs(smoke) -> None:
    run_dir, res = smoke
    logs: list[str] = []
    again = dm.run_demo(dm.PRESETS["smoke"], run_dir, progress=False, log=logs.append)
    assert any("reusing the teacher checkpoint" in line for line in logs)
    assert sum("reused" in line for line in logs) == len(res["runs"])
    assert again["runs"]["kd"]["seeds"] == res["runs"]["kd"]["seeds"]


# ----------------------------------------------------------------- helpers on known answers
class _Oracle(torch.nn.Module):
    """A fake LM that always predicts ``answer[k]`` after ``k`` generated tokens, then EOS."""

    def __init__(self, vocab: int, answers: list[list[int]], prompt_len: int) -> None:
        super().__init__()
        self.vocab, self.answers, self.prompt_len = vocab, answers, prompt_len
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.config = type("C", (), {"model_type": "qwen2"})()  # decodes like a plain causal LM

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, **kw):
        B, T = input_ids.shape
        done = 0 if cache is None else cache["n"]
        rows = (input_ids[:, -1] - 20).tolist() if cache is None else cache["rows"]  # prompt = [5, 20 + item]
        total = done + T
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            for t in range(T):
                k = done + t - self.prompt_len + 1  # tokens generated after position done + t
                ans = self.answers[rows[b]]
                tok = ans[k] if 0 <= k < len(ans) else ans[-1]
                logits[b, t, tok] = 10.0
        out = type("O", (), {})()
        out.logits = logits
        out.cache = {"n": total, "rows": rows}
        return out


def test_evaluate_generation_exact_match_and_pope(monkeypatch) -> None:
    from tokinteract.hf import exposure

    eos, pad = 3, 0
    # items: prompt [5, 20 + i] then answer tokens (supervised) + eos
    answers = [[10, eos], [11, eos], [12, eos], [13, 14, eos]]
    items = []
    for i, a in enumerate(answers):
        ids = torch.tensor([5, 20 + i] + a)
        labels = torch.tensor([-100, -100] + a)
        items.append({"input_ids": ids, "labels": labels})
    metas = [{"type": "exist", "answer": "yes"}, {"type": "exist", "answer": "no"},
             {"type": "exist", "answer": "no"}, {"type": "describe"}]
    # the model answers item 0 right (yes), item 1 wrong (says 'yes' to an absent object),
    # item 2 right (no), item 3 right
    preds = [[10, eos], [99, eos], [12, eos], [13, 14, eos]]

    def fake_run(model, ids, mask, pos, **kw):
        return model(ids, cache=kw.get("cache"))

    monkeypatch.setattr(exposure, "_run", fake_run)
    model = _Oracle(100, preds, prompt_len=2)
    res = mllm_eval.evaluate_generation(model, items, metas, eos=eos, pad=pad, batch_size=2)
    assert dm.evaluate_generation is mllm_eval.evaluate_generation  # the study uses the library's helpers
    assert res["exact_match"] == {"describe": 1.0, "exist": 2 / 3}
    assert res["overall"] == 0.75
    pope = res["pope"]
    assert pope["accuracy"] == pytest.approx(2 / 3)
    assert pope["yes_rate"] == pytest.approx(2 / 3)  # one true yes + one hallucinated yes
    assert pope["precision"] == pytest.approx(0.5) and pope["recall"] == pytest.approx(1.0)


def test_kl_and_exposure_are_zero_for_identical_models(smoke) -> None:
    run_dir, _ = smoke
    from transformers import LlavaForConditionalGeneration

    demo = dm.Demo(dm.PRESETS["smoke"], run_dir, progress=False, log=lambda *_: None)
    demo.prepare()
    t = LlavaForConditionalGeneration.from_pretrained(run_dir / "teacher")
    s = LlavaForConditionalGeneration.from_pretrained(run_dir / "student_stage1")
    assert mllm_eval.heldout_kl(t, t, demo.test.items, demo.collator) == pytest.approx(0.0, abs=1e-6)
    assert mllm_eval.heldout_kl(s, t, demo.test.items, demo.collator) > 1e-3
    ex = mllm_eval.exposure_curve(t, t, demo.test.items[:4], steps=4, pad=demo.pad, eos=demo.eos)
    assert ex["r"] == pytest.approx([0.0] * 4, abs=1e-6)
    assert ex["ex_acc_err"] == [0.0] * 4


def test_mean_std() -> None:
    assert dm.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))
    assert dm.mean_std([4.0]) == (4.0, 0.0)
    assert dm.mean_std([1.0, float("nan"), 3.0, float("inf")]) == (2.0, pytest.approx(math.sqrt(2.0)))
    assert all(math.isnan(x) for x in dm.mean_std([float("nan")]))


def test_step_meter_counts_steps_and_memory() -> None:
    meter = dm.StepMeter()
    for _ in range(3):
        with meter:
            x = torch.ones(256, 256) @ torch.ones(256, 256)
    assert float(x[0, 0]) == 256.0
    summ = meter.summary(skip=1)
    assert summ["steps_timed"] == 2 and summ["step_time_s"] > 0 and math.isnan(summ["peak_mem_mib"])
    mem = dm.StepMeter(memory=True)
    a = torch.ones(512, 512)  # created before the step: not counted
    with mem:
        b = a * 2  # 1 MiB, kept
        c = (b + 1).sum()  # a 1 MiB temporary, freed at once
        del c
    with mem:
        pass
    assert mem.peaks[0] == 2 * 2**20 + 4 and mem.peaks[1] == 0  # b + the temporary + a 4-byte scalar
    assert float(b[0, 0]) == 2.0


def test_example_script_smoke(smoke, monkeypatch, capsys) -> None:
    """examples/demo.py --smoke (on the fixture's run dir: the trained models are reused) writes its report."""
    run_dir, res = smoke
    monkeypatch.setattr(sys, "argv", ["demo.py", "--smoke", "--task", "shapes", "--no-progress", "--run-dir", str(run_dir)])
    with pytest.raises(SystemExit) as ei:
        runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert f"| {res['runs']['align_ti']['label']} |" in out
    page = (run_dir / "report" / "README.md").read_text()
    assert "## Components (paper Table 5)" in page
    teacher_digest = json.loads((run_dir / "teacher" / "train_info.json").read_text())["weights"]
    assert "**Determinism.**" in page and f"teacher `{teacher_digest}`" in page  # item 4: the report states it
    assert "total wall time" in out
    assert json.loads((run_dir / "report" / "results.json").read_text())["runs"].keys() == res["runs"].keys()


def test_presets_are_frozen_and_consistent() -> None:
    for name, s in dm.PRESETS.items():
        assert s.name == name
        assert s.n_eval <= s.n_test
        assert s.student.hidden < s.teacher.hidden or s.student.layers < s.teacher.layers
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.seeds = (9,)  # type: ignore[misc]
    assert len(dm.PRESETS["full"].seeds) >= 3


def test_report_only_collects_saved_runs(smoke, tmp_path: Path) -> None:
    """skip_missing trains nothing: runs without a saved file are left out of the results."""
    import shutil

    run_dir, res = smoke
    part = tmp_path / "partial"
    shutil.copytree(run_dir, part)
    for f in (part / "runs").glob("tpa_seed*.json"):
        f.unlink()
    logs: list[str] = []
    got = dm.run_demo(dm.PRESETS["smoke"], part, progress=False, log=logs.append, skip_missing=True)
    assert "tpa" not in got["runs"] and set(got["runs"]) == set(res["runs"]) - {"tpa"}
    assert any("tpa seed 0: not run (skipped)" in line for line in logs)
    assert not (part / "runs" / "tpa_seed0.json").exists()


def test_measured_costs_give_the_expected_total_up_front(smoke, tmp_path: Path) -> None:
    """With the task's measured costs the first progress line is the study's expected total: every stage's
    steps times its prior, the student runs weighted by their methods' ratios and shared by the workers."""
    import io
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke[0], run_dir)
    s = dm.PRESETS["smoke"]
    costs = {"vision_s": 9.0, "teacher_step_s": 0.5, "student_step_s": 0.1, "eval_s": 1.0, "ratio": {"kd": 2.0}}
    stream = io.StringIO()
    dm.run_demo(s, run_dir, progress=True, progress_stream=stream, log=lambda *_: None, costs=costs,
                skip_missing=True, only_keys=["sft", "kd"], workers=2)
    first = stream.getvalue().splitlines()[0]
    n_rows = len(dm.timing_runs(["sft", "kd", "iva", "tpa", "align_ti"]))  # the smoke study's methods
    # teacher, stage 1, the study's timing rows (3 SFT steps per step), then the 2 runs only_keys keeps (kd
    # weighted 2) on 2 workers
    want = (s.teacher_steps * 0.5 + s.stage1_steps * 0.1 + n_rows * (s.timing_steps + 3) * 0.3
            + s.student_steps * 0.1 * (1 + 2) / 2)
    assert first == f"[study] expected: ~{want:.0f} s (from the task's measured costs; cached stages count as work until reused)"


def test_costs_from_a_study_results_json(smoke, tmp_path: Path, capsys) -> None:
    """A study's results.json gives its measured costs: the tower's, the teacher's and the SFT runs' step times
    and each method's step time / SFT's from the run's own timing pass (TPA's cached forward, not the packed
    Algorithm-1 row); ``--estimate`` takes it as it takes a costs JSON, and a results.json without a timing pass
    or SFT runs is refused with what it lacks."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo as demo_cli
    finally:
        sys.path.remove(str(ROOT / "examples"))
    run_dir, _ = smoke
    saved = json.loads((run_dir / "results.json").read_text())
    c = dm.costs_from_results(saved, eval_s=2.5)
    assert c["task"] == saved["settings"]["task"] and c["eval_s"] == 2.5
    assert c["teacher_step_s"] == saved["teacher_train"]["step_time_s"]
    sft = [r["train"]["step_time_s"] for r in saved["runs"]["sft"]["seeds"]]
    assert c["student_step_s"] == pytest.approx(sum(sft) / len(sft))
    rows = {r["method"]: r["step_time_s"] for r in saved["timing"] if not r.get("overrides", {}).get("tpa_forward")}
    assert c["ratio"] == pytest.approx({m: t / rows["sft"] for m, t in rows.items()}) and c["ratio"]["sft"] == 1.0
    packed = [r for r in saved["timing"] if r.get("overrides", {}).get("tpa_forward")]
    assert packed and c["ratio"]["tpa"] != pytest.approx(packed[0]["step_time_s"] / rows["sft"])
    if saved.get("vision"):
        assert (c["vision_s"], c["vision_steps"]) == (saved["vision"]["wall_s"], saved["vision"]["steps"])
    else:  # a preset without a pre-trained tower
        assert c["vision_s"] == 0.0 and "vision_steps" not in c
    # --estimate reads it (one evaluation taken as _RESULTS_EVAL_S)
    assert demo_cli._measured_costs(run_dir / "results.json") == (
        c["task"], {k: v for k, v in dm.costs_from_results(saved, demo_cli._RESULTS_EVAL_S).items() if k != "task"})
    assert demo_cli.main(["--smoke", "--task", c["task"], "--estimate", str(run_dir / "results.json")]) == 0
    want = dm.estimate_study_s(dm.task_settings(c["task"], "smoke"), demo_cli._measured_costs(run_dir / "results.json")[1],
                               workers=2)  # --estimate's default
    assert f"total {want['total'] / 60:.1f} min" in capsys.readouterr().out
    with pytest.raises(ValueError, match="timing pass with an SFT row"):
        dm.costs_from_results({**saved, "timing": []}, eval_s=1.0)
    with pytest.raises(ValueError, match="SFT runs"):
        dm.costs_from_results({**saved, "runs": {}}, eval_s=1.0)
    with pytest.raises(ValueError, match="eval_s must be a finite number >= 0, got nan"):
        dm.costs_from_results(saved, eval_s=float("nan"))


def test_only_keys_restricts_the_student_runs(smoke, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke[0], run_dir)
    got = dm.run_demo(dm.PRESETS["smoke"], run_dir, progress=False, log=lambda *_: None, only_keys=["kd", "nope"],
                      skip_missing=True)
    assert list(got["runs"]) == ["kd"]


# ----------------------------------------------------------------- resuming, progress, the new experiments
def _strip_times(rec: dict) -> dict:
    """A run record without what is measured, not computed (wall/step times vary run to run)."""
    out = {k: v for k, v in rec.items() if k != "train"}
    out["train_log"] = rec["train"]["log"]
    return out


def test_a_stopped_study_resumes_without_retraining(smoke, tmp_path: Path) -> None:
    """Stop after 2 student runs (the test hook), run again: the 2 finished runs are reused, the rest
    trained, and every result equals the uninterrupted run's (the fixture), bit for bit. The timing
    pass (run before the students) is kept: Table 18's budget comes from its measured times."""
    import io
    import shutil

    run_dir, res = smoke
    part = tmp_path / "resumed"
    shutil.copytree(run_dir, part, ignore=shutil.ignore_patterns("runs", "results.json", "report"))
    with pytest.raises(dm.StudyStopped, match="stopped after 2 student run"):
        dm.run_demo(dm.PRESETS["smoke"], part, progress=False, log=lambda *_: None, stop_after=2)
    first = sorted(f.name for f in (part / "runs").glob("*.json"))
    assert len(first) == 2
    logs: list[str] = []
    stream = io.StringIO()
    again = dm.run_demo(dm.PRESETS["smoke"], part, progress=True, progress_stream=stream, log=logs.append)
    reused = [line for line in logs if "reused" in line]
    assert len(reused) == 2 and all(any(f.removesuffix(".json") in line for f in first) for line in reused)
    assert set(again["runs"]) == set(res["runs"])
    for key, run in res["runs"].items():
        assert [_strip_times(r) for r in again["runs"][key]["seeds"]] == [_strip_times(r) for r in run["seeds"]], key
    for k in ("teacher", "irs", "stage1", "table18", "timing"):
        assert again[k] == res[k], k
    assert again["fig7"] == {**res["fig7"], "data_dir": str(part / "data")}
    # progress: not a TTY, so one line per unit, each with the expected remaining time
    lines = stream.getvalue().splitlines()
    n_students = len(res["runs"]) * len(dm.PRESETS["smoke"].seeds)
    students = [line for line in lines if line.startswith("[students ")]
    assert len(students) == n_students
    assert sum("reused" in line for line in students) == 2
    assert all("| left: stage " in line for line in students) and students[-1].endswith("study 0 s")
    assert len([line for line in lines if line.startswith("[timing ")]) == len(res["timing"]) == 6


def test_a_changed_setting_does_not_reuse_cached_runs(smoke, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke[0], run_dir)
    logs: list[str] = []
    s = dataclasses.replace(dm.PRESETS["smoke"], student_steps=3)  # another budget: no run of the fixture fits
    got = dm.run_demo(s, run_dir, progress=False, log=logs.append, only_keys=["kd", "sft"], skip_missing=True)
    assert got["runs"] == {} and sum("not run (skipped)" in line for line in logs) == 2
    assert any("reusing the teacher checkpoint" in line for line in logs)  # the teacher's setting did not change
    logs.clear()  # the same budget with the peak rate held (another stage-2 schedule): not reused either
    s = dataclasses.replace(dm.PRESETS["smoke"], student_stable=0.25)
    got = dm.run_demo(s, run_dir, progress=False, log=logs.append, only_keys=["kd", "sft"], skip_missing=True)
    assert got["runs"] == {} and sum("not run (skipped)" in line for line in logs) == 2
    assert dm.cache_key({"a": 1, "b": [1, 2]}) == dm.cache_key({"b": (1, 2), "a": 1})
    assert dm.cache_key({"a": 1}) != dm.cache_key({"a": 2})


def test_progress_expected_remaining_time() -> None:
    import io

    stream = io.StringIO()
    p = dm.Progress([("a", [("a1", 10), ("a2", 10)]), ("b", [("b1", 20)])], stream=stream, tty=False)
    assert p.remaining_s() is None  # nothing measured, no prior
    p.done("a", "a1", 5.0)  # 0.5 s per step
    assert p.remaining_s("a") == pytest.approx(5.0) and p.remaining_s() == pytest.approx(15.0)
    assert stream.getvalue() == "[a 1/2] a1: 5 s | left: stage 5 s, study ~15 s\n"  # b not measured yet: '~'
    p.done("a", "a2", None)  # reused: done, not measured
    p.set_weight("b", "b1", 40)
    assert p.remaining_s() == pytest.approx(20.0)
    p.done("b", "b1", 10.0)
    assert p.remaining_s() == 0.0 and len(stream.getvalue().splitlines()) == 3
    tty = io.StringIO()
    q = dm.Progress([("a", [("a1", 1), ("a2", 1)])], stream=tty, tty=True)
    q.done("a", "a1", 1.0)
    q.done("a", "a2", 1.0)
    assert tty.getvalue().count("\r") == 2 and tty.getvalue().endswith("\n") and tty.getvalue().count("\n") == 1
    primed = dm.Progress([("x", [("x1", 100)])], stream=io.StringIO(), priors={"x": 0.1})
    assert primed.remaining_s() == pytest.approx(10.0)
    # units run 2 at a time (workers): the work left divided by 2 while at least 2 units are left
    par = dm.Progress([("s", [("u1", 10), ("u2", 10), ("u3", 10)])], stream=io.StringIO())
    par.set_parallel("s", 2)
    par.done("s", "u1", 5.0)  # 0.5 s per step, measured by the unit's own wall time
    assert par.remaining_s("s") == pytest.approx(20 * 0.5 / 2)
    par.done("s", "u2", 5.0)
    assert par.remaining_s("s") == pytest.approx(10 * 0.5)  # one unit left: one worker busy
    with pytest.raises(ValueError, match="n \\(units running at once\\) must be an integer >= 1, got 0"):
        par.set_parallel("s", 0)
    # a stage's prior (measured costs) comes before the last stage's rate; a stage without one takes that rate
    mixed = dm.Progress([("a", [("a1", 10)]), ("b", [("b1", 10)]), ("c", [("c1", 10)])], stream=io.StringIO(),
                        priors={"b": 2.0})
    mixed.done("a", "a1", 5.0)  # 0.5 s per step
    assert mixed.remaining_s("b") == pytest.approx(20.0) and mixed.remaining_s("c") == pytest.approx(5.0)


def test_progress_priors_from_measured_costs() -> None:
    q = dm.task_settings("digits", "quick")
    costs = json.loads((ROOT / "docs" / "results" / "costs-digits.json").read_text())
    pri = dm.progress_priors(q, costs)
    assert pri == {"vision": pytest.approx(costs["vision_s"] / costs["vision_steps"]),  # per step, as measured
                   "teacher": costs["teacher_step_s"], "stage1": costs["student_step_s"],
                   "timing": pytest.approx(3 * costs["student_step_s"]), "students": costs["student_step_s"]}
    assert "vision" not in dm.progress_priors(dm.PRESETS["smoke"], costs)  # no tower to pre-train
    half = dataclasses.replace(q, vision_pretrain_steps=costs["vision_steps"] // 2)
    assert dm.progress_priors(half, costs)["vision"] == pri["vision"]
    assert dm.estimate_study_s(half, costs)["vision"] == pytest.approx(costs["vision_s"] / 2)  # scaled by the steps
    big = dataclasses.replace(q, stage1_batch=3 * dm.student_batch(q))  # stage 1 at 3x the students' batch
    assert dm.progress_priors(big, costs)["stage1"] == pytest.approx(3 * costs["student_step_s"])
    assert dm.estimate_study_s(big, costs)["stage1"] - dm.estimate_study_s(q, costs)["stage1"] == pytest.approx(
        2 * q.stage1_steps * costs["student_step_s"])
    with pytest.raises(ValueError, match="costs\\['teacher_step_s'\\] must be a finite number > 0, got nan"):
        dm.progress_priors(q, {**costs, "teacher_step_s": float("nan")})


def test_table14_combinations_are_the_trainer_weights() -> None:
    from tokinteract.mllm.trainer import DistillationConfig

    specs = dm.run_specs(dm.PRESETS["smoke"], l_star=1)
    assert len(dm.TERM_COMBINATIONS) == 15 and set(dm.EXPERIMENTS["table14"]) == set(dm.TERM_COMBINATIONS.values())
    for combo, key in dm.TERM_COMBINATIONS.items():
        spec = specs[key]
        ov = {k: v for k, v in spec.overrides.items() if k != "tpa_skip_token_ids"}
        got = DistillationConfig(method=spec.method, **ov).resolved()
        assert {c for c, name in (("S", "sft"), ("K", "kd"), ("I", "iva"), ("T", "tpa")) if got[name] > 0} == set(combo), key
        assert got["iva_weights"] == "teacher" and not got["on_policy"] and got["divergence"] == "fkl"
        if "I" in combo:
            assert spec.overrides["iva_layer"] == 1


def test_table14_mixes_train(smoke, tmp_path: Path) -> None:
    """Two of the combinations that are no method preset (TPA alone, KD+IVA+TPA without SFT) train and evaluate."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke[0], run_dir)
    s = dataclasses.replace(dm.PRESETS["smoke"], experiments=("table14", "fig6", "fig7"))  # align_ti as the fixture's
    got = dm.run_demo(s, run_dir, progress=False, log=lambda *_: None, only_keys=["mix@T", "mix@KIT", "align_ti"])
    assert set(got["runs"]) == {"mix@T", "mix@KIT", "align_ti"}
    for key in ("mix@T", "mix@KIT"):
        log = got["runs"][key]["seeds"][0]["train"]["log"]
        assert log and "loss_sft" not in log[0] and "loss_tpa" in log[0]
    assert ("loss_kd" in got["runs"]["mix@KIT"]["seeds"][0]["train"]["log"][0]
            and "loss_kd" not in got["runs"]["mix@T"]["seeds"][0]["train"]["log"][0])
    # align_ti was trained by the fixture with the same setting: reused
    assert got["runs"]["align_ti"]["seeds"] == smoke[1]["runs"]["align_ti"]["seeds"]
    md = dm.write_report(got, tmp_path / "out", command="t", page=tmp_path / "p.md").read_text()
    assert "## Every combination of the loss terms (paper Tables 5 and 14)" in md and "| TPA (no SFT) |" in md


def test_compute_budget_and_estimate() -> None:
    timing = [{"method": "kd", "overrides": {}, "step_time_s": 0.02, "step_cpu_s": 0.02},
              {"method": "align_ti", "overrides": {}, "step_time_s": 0.05, "step_cpu_s": 0.06},
              {"method": "tpa", "overrides": {"tpa_forward": "packed"}, "step_time_s": 9.0}]
    b = dm.compute_budget(timing, 300)
    assert b["kd_steps"] == 750 and b["wall_ratio"] == pytest.approx(2.5) and b["cpu_ratio"] == pytest.approx(3.0)
    faster = [{**timing[0], "step_time_s": 0.1}, timing[1]]  # Align-TI faster than KD: KD gets fewer steps
    assert dm.compute_budget(faster, 300)["kd_steps"] == 150
    with pytest.raises(ValueError, match="timing must hold a 'align_ti' row"):
        dm.compute_budget(timing[:1], 300)
    with pytest.raises(ValueError, match="kd step time must be a finite number > 0"):
        dm.compute_budget([{**timing[0], "step_time_s": 0.0}, timing[1]], 300)
    s = dataclasses.replace(dm.PRESETS["smoke"], experiments=("table5",), seeds=(0, 1), vision_pretrain_steps=0)
    m = {"teacher_step_s": 1.0, "student_step_s": 0.1, "eval_s": 5.0, "ratio": {"kd": 2.0, "iva": 2.0, "align_ti": 4.0}}
    est = dm.estimate_study_s(s, m)
    # teacher 2 steps + eval; stage 1: 1 step + eval; 5 runs x 2 seeds: 2 steps x 0.1 x ratio + eval
    assert est["teacher"] == pytest.approx(7.0) and est["stage1"] == pytest.approx(5.1)
    assert est["students"] == pytest.approx(2 * (0.2 * (1 + 2 + 2 + 1 + 4) + 5 * 5))
    assert est["total"] == pytest.approx(est["teacher"] + est["stage1"] + est["students"] + est["vision"])
    with pytest.raises(ValueError, match="measured\\['eval_s'\\] must be a finite number >= 0"):
        dm.estimate_study_s(s, {**m, "eval_s": float("nan")})
    # workers: each run (sft 5.2 s, kd and iva 5.4 s, tpa 5.2 s, align_ti 5.8 s; 2 seeds each), longest
    # first, goes to the first free worker: with 3, worker 3 takes 5.4, 5.4, 5.2, 5.2 (21.2) and the others
    # 5.8, 5.4, 5.2 (16.4); in the study's order (sft first) the last worker would end at 21.6
    assert dm.estimate_study_s(s, m, workers=2)["students"] == pytest.approx(27.0)
    assert dm.estimate_study_s(s, m, workers=3)["students"] == pytest.approx(21.2)
    assert dm.estimate_study_s(s, m, workers=2)["teacher"] == est["teacher"]  # only the students run in workers
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        dm.estimate_study_s(s, m, workers=0)


def test_quick_is_the_main_comparison_on_digits_within_the_budget(capsys) -> None:
    """``make demo`` (quick): the digits task, the runs Tables 3 and 5 share (SFT, Vanilla KD, Align-TI) with
    3 seeds, Fig. 4/6/7 and Table 4 measured on them; its estimate from the digits costs fits 15 minutes
    minus the venv's install at the frozen student budget (docs/results/study.md, "Time")."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo as demo_cli
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert demo_cli.DEFAULT_TASKS["quick"] == demo_cli.DEFAULT_TASKS["smoke"] == ["digits"]
    q = dm.task_settings("digits", "quick")
    assert q.seeds == (0, 1, 2) and dm._student_keys(q, q.experiments) == ["sft", "kd", "align_ti"]
    assert [m for _, m, _ in dm.timing_runs(dm._study_methods(q, ["sft", "kd", "align_ti"]))] == ["sft", "kd", "align_ti"]
    assert dm._view_keys(q.experiments, "fig6", ["sft", "kd", "align_ti"]) == {"sft", "kd", "align_ti"}
    assert dm._view_keys(q.experiments, "fig7", ["sft", "kd", "align_ti"]) == {"kd", "align_ti"}
    assert dm._student_keys(q, ("fig6", "fig7")) == []  # views add no run
    costs = json.loads((ROOT / "docs" / "results" / "costs-digits.json").read_text())
    est = dm.estimate_study_s(q, costs, workers=2)
    assert est["total"] <= 13 * 60, est
    assert demo_cli.main(["--estimate", str(ROOT / "docs" / "results" / "costs-digits.json"),
                          "--set", "student_steps=1400"]) == 0
    out = capsys.readouterr().out
    assert "digits (" in out and f"total {dm.estimate_study_s(dataclasses.replace(q, student_steps=1400), costs, workers=2)['total'] / 60:.1f} min" in out
    with pytest.raises(SystemExit):
        demo_cli.main(["--estimate", str(ROOT / "docs" / "results" / "costs-digits.json"), "--set", "nonsense=1"])
    assert "--set takes NAME=VALUE" in capsys.readouterr().err


def test_full_runs_every_experiment_on_a_task_within_the_budget(capsys) -> None:
    """``--full``: scenes runs every experiment, digits every one but the three TPA sweeps (Table 14, Fig. 5,
    the end-of-turn row), so every experiment runs on a task; its estimate from the measured costs of both
    tasks leaves 10 % of the issue's 150 minutes for what it does not count (start-ups, data, IRS pass)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo as demo_cli
    finally:
        sys.path.remove(str(ROOT / "examples"))
    full = dm.PRESETS["full"].experiments
    scenes, digits = (dm.task_settings(t, "full") for t in ("scenes", "digits"))
    assert scenes.experiments == full and scenes.seeds == digits.seeds == (0, 1, 2, 3, 4)
    assert set(digits.experiments) == set(full) - {"table14", "fig5", "eot"}
    assert demo_cli.DEFAULT_TASKS["full"] == ["scenes", "digits"]
    # scenes: the step times and ratios of its own full run (session 12: 41.4 min measured, 39.7 estimated)
    costs = [ROOT / "docs" / "results" / f for f in ("study/full/scenes/results.json", "costs-digits.json")]
    assert demo_cli.main(["--full", "--workers", "2", "--estimate", *map(str, costs)]) == 0
    out = capsys.readouterr().out
    total = float(out.split("all tasks: ")[1].split(" min")[0])
    assert 0 < total <= 135, out
    # the split is what brings it under: every experiment on digits too would not fit
    measured = demo_cli._measured_costs(costs[1])[1]
    every = dm.estimate_study_s(dataclasses.replace(digits, experiments=full), measured, workers=2)["total"] / 60
    assert total - dm.estimate_study_s(digits, measured, workers=2)["total"] / 60 + every > 150


def test_teacher_threads_are_part_of_the_teachers_key(smoke) -> None:
    """``teacher_threads``: the teacher's own thread count (0: ``threads``), in its cache key (and so in the
    keys of everything trained from it), checked."""
    run_dir, _ = smoke
    keys = {}
    for n in (0, 1, 2):
        d = dm.Demo(dataclasses.replace(dm.PRESETS["smoke"], threads=1, teacher_threads=n), run_dir, progress=False,
                    log=lambda *_: None)
        d.prepare()
        keys[n] = d.teacher_key()
    assert keys[0] == keys[1] != keys[2]
    assert keys[0] == json.loads((run_dir / "teacher" / "train_info.json").read_text())["cache_key"]  # as before
    d = dm.Demo(dataclasses.replace(dm.PRESETS["smoke"], teacher_threads=-1), run_dir, progress=False)
    d.prepare()
    with pytest.raises(ValueError, match="teacher_threads must be an integer >= 0 \\(0: threads\\), got -1"):
        d.teacher_key()


def test_study_report_per_task(smoke, tmp_path: Path) -> None:
    _, res = smoke
    page = dm.write_study_report({"scenes": res, "digits": res}, tmp_path / "study", command="c",
                                 page=tmp_path / "study.md", title="Study")
    md = page.read_text()
    assert "## Task scenes" in md and "## Task digits" in md and "| paper claim | scenes | digits |" in md
    assert "[Every table and plot of scenes](study-scenes.md)" in md
    for task in ("scenes", "digits"):
        assert "## Components (paper Table 5)" in (tmp_path / f"study-{task}.md").read_text()
        assert (tmp_path / "study" / task / "results.json").exists()
    assert "| Vanilla KD > SFT | not resolved (1 seed) | not resolved (1 seed) |" in md


def test_run_study_and_the_cli_on_several_tasks(smoke, tmp_path: Path, monkeypatch, capsys) -> None:
    """examples/demo.py --task scenes digits: one run dir per task, one settings per task, a study report
    (run_demo stubbed with the fixture's results: the smoke runs of the tasks are tested in test_study_*)."""
    calls: list[tuple[str, Path, tuple]] = []
    costs: dict[str, object] = {}

    def fake_run_demo(settings, run_dir, **kw):
        calls.append((settings.task, Path(run_dir), settings.seeds))
        costs[settings.task] = kw.get("costs")
        return smoke[1]

    monkeypatch.setattr(dm, "run_demo", fake_run_demo)
    out = dm.run_study(["scenes", "digits"], "smoke", tmp_path / "r",
                       adjust=lambda s: dataclasses.replace(s, seeds=(4,)), progress=False)
    assert set(out) == {"scenes", "digits"}
    assert calls == [("scenes", tmp_path / "r" / "scenes", (4,)), ("digits", tmp_path / "r" / "digits", (4,))]
    calls.clear()
    monkeypatch.setattr(sys, "argv", ["demo.py", "--full", "--no-progress", "--run-dir", str(tmp_path / "cli"),
                                      "--docs-dir", str(tmp_path / "docs")])
    with pytest.raises(SystemExit) as ei:
        runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")
    assert ei.value.code == 0
    assert [c[0] for c in calls] == ["scenes", "digits"] and all(c[2] == dm.PRESETS["full"].seeds for c in calls)
    # each task's measured costs, where recorded, give the progress its expected times from the start
    assert costs == {"scenes": None, "digits": json.loads((ROOT / "docs/results/costs-digits.json").read_text())}
    assert "## Task digits" in (tmp_path / "docs" / "study-full.md").read_text()
    assert (tmp_path / "docs" / "study" / "full" / "scenes" / "results.json").exists()
    assert "total wall time" in capsys.readouterr().out


def test_cli_estimate_trains_nothing(tmp_path: Path, capsys) -> None:
    cal = {"teachers": [{"train": {"step_time_s": 0.2}, "eval_wall_s": 10.0}], "sft": [{"train": {"step_time_s": 0.05}}],
           "vision": {"wall_s": 60.0}, "settings": {"task": "scenes"}}
    (tmp_path / "cal.json").write_text(json.dumps(cal))
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo as demo_cli
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert demo_cli.main(["--task", "scenes", "--estimate", str(tmp_path / "cal.json"), "--ratios",
                          str(ROOT / "docs/results/study/full/scenes/results.json"), "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ESTIMATE (not a measurement)") and "one evaluation 10 s): vision 1.0 min, teacher" in out
    assert not (tmp_path / "run").exists()  # --estimate trains nothing
    with pytest.raises(SystemExit):  # --full runs digits too: its calibration is needed
        demo_cli.main(["--full", "--estimate", str(tmp_path / "cal.json")])
    assert "none for ['digits']" in capsys.readouterr().err


def test_a_checkpoint_without_its_key_is_trained_again(smoke, tmp_path: Path) -> None:
    """A kill between a checkpoint's weights and its key (written last), or a checkpoint of another
    setting, is not reused: that stage is trained again; what depends only on settings is reused."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke[0], run_dir)
    (run_dir / "student_stage1" / "train_info.json").unlink()  # killed after save_pretrained
    info = run_dir / "teacher" / "train_info.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "cache_key": "0" * 16}))  # another setting's
    logs: list[str] = []
    got = dm.run_demo(dm.PRESETS["smoke"], run_dir, progress=False, log=logs.append, only_keys=["kd"], skip_missing=True)
    assert any("holds a teacher of another setting" in line for line in logs)
    assert any(line.startswith("stage 0: teacher") for line in logs) and any(line.startswith("stage 1: student") for line in logs)
    assert json.loads(info.read_text())["cache_key"] != "0" * 16
    # keys follow settings, which is sound because the same setting retrains the same weights bit for bit
    from safetensors.torch import load_file

    for path in ("teacher", "student_stage1"):
        a, b = load_file(str(run_dir / path / "model.safetensors")), load_file(str(smoke[0] / path / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
    assert got["runs"]["kd"]["seeds"] == smoke[1]["runs"]["kd"]["seeds"]  # so the runs on them are reused


# ----------------------------------------------------------------- student runs in worker processes
def _fresh_copy(smoke, path: Path) -> Path:
    """The fixture's run dir with its cached teacher, stage-1 student and timing rows, no student run."""
    import shutil

    shutil.copytree(smoke[0], path, ignore=shutil.ignore_patterns("runs", "results.json", "report", "trainer"))
    return path


def _computed(res: dict) -> dict:
    """Everything of a study's results that is computed, not measured (the report's JSON without the
    wall/step times, the machine and the run dir)."""
    out = {k: v for k, v in res.items() if k not in ("machine_start", "machine_end", "wall_s", "fig7", "runs")}
    out["fig7"] = {k: v for k, v in res["fig7"].items() if k != "data_dir"}
    out["runs"] = {k: {**run, "seeds": [_strip_times(r) for r in run["seeds"]]} for k, run in res["runs"].items()}
    if "summary" in res:  # the report's per-run metrics: all but the step time and memory are computed
        out["summary"] = {k: {**v, "values": {m: x for m, x in v["values"].items() if m not in ("step_ms", "peak_mib")},
                              "mean_std": {m: x for m, x in v["mean_std"].items() if m not in ("step_ms", "peak_mib")}}
                          for k, v in res["summary"].items()}
    return out


def test_a_parallel_study_stops_resumes_and_equals_the_serial_one(smoke, tmp_path: Path) -> None:
    """2 workers: stopped after 1 finished run (the in-flight one is killed), resumed with 2 workers; every
    computed number (losses, evaluations, maps, the report's JSON) equals the serial run's (the fixture),
    bit for bit; the progress counts each unit once and ends at 0 s left; no worker outlives the study."""
    import io
    import multiprocessing as mp

    run_dir, res = smoke
    part = _fresh_copy(smoke, tmp_path / "par")
    with pytest.raises(dm.StudyStopped, match="stopped after 1 student run"):
        dm.run_demo(dm.PRESETS["smoke"], part, progress=False, log=lambda *_: None, stop_after=1, workers=2)
    assert mp.active_children() == []
    first = sorted(f.name for f in (part / "runs").glob("*.json"))
    n_units = len(res["runs"]) * len(dm.PRESETS["smoke"].seeds)
    assert 1 <= len(first) < n_units
    logs: list[str] = []
    stream = io.StringIO()
    again = dm.run_demo(dm.PRESETS["smoke"], part, progress=True, progress_stream=stream, log=logs.append, workers=2)
    assert mp.active_children() == []
    assert sum("reused" in line for line in logs) == len(first)
    assert any("student runs in 2 worker processes" in line for line in logs)
    assert _computed(again) == _computed(res)
    assert list(again["runs"]) == list(res["runs"])  # the serial order, whatever order the workers finished in
    for path in (part / "runs").glob("*.json"):  # the saved records too (what a later resume reads)
        assert _strip_times(json.loads(path.read_text())) == _strip_times(json.loads((run_dir / "runs" / path.name).read_text()))
    students = [line for line in stream.getvalue().splitlines() if line.startswith("[students ")]
    assert len(students) == n_units and students[-1].endswith("study 0 s")
    a = dm.write_report(again, tmp_path / "rep_par", command="c", page=tmp_path / "par.md")
    b = dm.write_report(res, tmp_path / "rep_ser", command="c", page=tmp_path / "ser.md")
    assert a.exists() and b.exists()
    assert (_computed(json.loads((tmp_path / "rep_par" / "results.json").read_text()))
            == _computed(json.loads((tmp_path / "rep_ser" / "results.json").read_text())))


def test_a_failing_unit_in_a_worker_fails_the_study_naming_it(smoke, tmp_path: Path) -> None:
    """A student run that raises in a worker (here: a stage-1 checkpoint whose weights are corrupt, which
    only the workers read) fails the study with the run's name and the worker's traceback; no hang,
    no worker left, no record written."""
    import multiprocessing as mp

    part = _fresh_copy(smoke, tmp_path / "bad")
    (part / "student_stage1" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(dm.StudyUnitFailed, match=r"student run (sft|kd) seed 0 failed in worker process [01]:\n"
                                                  r"Traceback \(most recent call last\)") as ei:
        dm.run_demo(dm.PRESETS["smoke"], part, progress=False, log=lambda *_: None, only_keys=["sft", "kd"], workers=2)
    assert "load_stage1" in str(ei.value)  # the worker's own traceback
    assert mp.active_children() == []
    assert not list((part / "runs").glob("*.json"))
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        dm.run_demo(dm.PRESETS["smoke"], part, progress=False, workers=0)


def test_a_killed_parent_leaves_no_worker(smoke, tmp_path: Path) -> None:
    """SIGKILL of the study's process while its workers train: each worker exits by itself (its watchdog
    sees the parent gone) within seconds."""
    import os
    import signal
    import subprocess

    import psutil

    part = _fresh_copy(smoke, tmp_path / "killed")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import demo_study as dm; from pathlib import Path; "
              "dm.run_demo(dm.PRESETS['smoke'], Path(sys.argv[2]), progress=False, workers=2, "
              "log=lambda m: print(m, flush=True))")
    proc = subprocess.Popen([sys.executable, "-u", "-c", script, str(ROOT / "examples" / "study"), str(part)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    workers: list[psutil.Process] = []
    servers: list[psutil.Process] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if "(worker " in line:  # a worker started a student run
                break
        # the workers: children of the study (spawn) or of its fork server (forkserver, where there is one)
        kids = psutil.Process(proc.pid).children()
        servers = [p for p in kids if "forkserver" in " ".join(p.cmdline())]
        workers = [p for p in kids if "spawn_main" in " ".join(p.cmdline())] + [
            w for srv in servers for w in srv.children()]
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(workers + servers, timeout=20)
        assert alive == [], f"workers (or their fork server) still running 20 s after their parent was killed: {alive}"
    finally:
        for p in workers + servers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_busy_cores_reads_proc_stat_or_falls_back_to_the_load_average(tmp_path, monkeypatch) -> None:
    """``busy_cores``: the non-idle share of ``/proc/stat``'s CPU time over the interval (idle and iowait
    idle) times the CPU count; the 1-minute load average where the file cannot be read."""
    stat = tmp_path / "stat"
    samples = iter(["cpu 100 0 100 700 100 0 0 0 0 0\n", "cpu 160 0 140 800 100 0 0 0 0 0\n"])
    monkeypatch.setattr(dm.time, "sleep", lambda s: stat.write_text(next(samples)))
    stat.write_text(next(samples))
    monkeypatch.setattr(dm.os, "cpu_count", lambda: 2)
    assert dm.busy_cores(0.0, str(stat)) == pytest.approx(2 * 100 / 200)  # 100 busy of 200 jiffies
    monkeypatch.setattr(dm.os, "getloadavg", lambda: (1.7, 0.0, 0.0))
    assert dm.busy_cores(0.0, str(tmp_path / "missing")) == 1.7


def test_default_workers_are_the_idle_cores(monkeypatch, capsys) -> None:
    monkeypatch.setattr(dm.os, "cpu_count", lambda: 2)
    for load, want in ((0.0, 2), (0.6, 1), (0.4, 2), (5.0, 1)):
        monkeypatch.setattr(dm, "busy_cores", lambda load=load: load)
        assert dm.default_workers() == want, load
    monkeypatch.setattr(dm.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(dm, "busy_cores", lambda: 0.0)
    assert dm.default_workers() == 2 and dm.default_workers(cap=8) == 8
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo as demo_cli
    finally:
        sys.path.remove(str(ROOT / "examples"))
    with pytest.raises(SystemExit):
        demo_cli.main(["--smoke", "--workers", "0"])
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err


def test_students_at_the_floor_are_flagged_in_both_reports(tmp_path: Path) -> None:
    """A task whose SFT student stays below a third of the teacher's exact match gets the warning on its
    page, above the verdicts of the summary page and in the verdict table's header; a task whose students
    learnt gets none; the teacher's missing POPE prints n/a, never nan."""
    def res(sft_overall: float) -> dict:
        seeds = [{"eval": {"overall": x, "exact_match": {"read": x}, "kl": 0.1},
                  "train": {"step_time_s": 0.01, "peak_mem_mib": 1.0}} for x in (sft_overall, sft_overall + 0.01)]
        runs = {"sft": {"label": "SFT", "seeds": seeds}, "kd": {"label": "Vanilla KD", "seeds": seeds}}
        return {"runs": runs, "teacher": {"overall": 0.72, "exact_match": {}},
                "task": {"question_types": ["read"]}}

    def note(r):
        return dm.floor_note(dm.summarize(r), r["teacher"])

    low, ok = res(0.09), res(0.60)
    assert "did not learn this task" in note(low) and "9.5 %" in note(low)
    assert note(ok) is None
    assert note(res(0.72 / 3 + 0.001)) is None and note(res(0.72 / 3 - 0.02)) is not None
    table = dm.summary_markdown(low, keys=("sft",))
    assert "| teacher | 72.0 | n/a | — |" in table and "nan" not in table
    write = dm.write_report
    calls = []
    try:  # the per-task pages need every field of a real run: record what the summary page passes them
        dm.write_report = lambda r, *a, **k: calls.append(r)
        page = dm.write_study_report({"scenes": low, "digits": ok}, tmp_path, command="x")
    finally:
        dm.write_report = write
    text = page.read_text()
    assert text.count("did not learn this task") == 1
    assert "| paper claim | scenes (students at the floor: see above) | digits |" in text
    assert "| Vanilla KD > SFT | not resolved" in text
    assert len(calls) == 2


def test_a_claim_between_one_configuration_and_itself_gets_no_verdict(tmp_path: Path) -> None:
    """The IVA layer sweep's last layer is the teacher's l* on a 4-layer teacher with l* = 3: the claim
    'l* > last layer' would compare a run with itself. It is reported as n/a, never as a verdict, on the
    summary page too; two configurations that differ keep their verdict."""
    def seeds(x: float) -> list[dict]:
        return [{"eval": {"overall": v, "exact_match": {"read": v}, "kl": 0.1},
                 "train": {"step_time_s": 0.01, "peak_mem_mib": 1.0}} for v in (x, x + 0.02, x - 0.01)]

    iva = {"method": "iva", "overrides": {"iva_layer": 3}}
    runs = {"iva": {"label": "SFT+KD+IVA (teacher l*=3)", "seeds": seeds(0.7), **iva},
            "iva@last": {"label": "IVA, teacher layer 3", "seeds": seeds(0.7), **iva},
            "iva@first": {"label": "IVA, teacher layer 0", "seeds": seeds(0.5), "method": "iva",
                          "overrides": {"iva_layer": 0}}}
    res = {"runs": runs, "teacher": {"overall": 0.8, "exact_match": {}}, "task": {"question_types": ["read"]}}
    rows = {r["claim"]: r for r in dm.claim_checks(dm.summarize(res))}
    assert rows["IRS-max layer l* > last layer"]["verdict"] == "n/a (the same configuration)"
    assert rows["IRS-max layer l* > layer 0"]["verdict"] == "supported"
    write = dm.write_report
    try:
        dm.write_report = lambda *a, **k: None
        text = dm.write_study_report({"digits": res}, tmp_path, command="x").read_text()
    finally:
        dm.write_report = write
    assert "| IRS-max layer l* > last layer | n/a (the same configuration) |" in text
    assert "| IRS-max layer l* > layer 0 | supported (+" in text
