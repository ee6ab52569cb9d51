"""The demo (examples/demo.py, examples/study/demo_study.py): CI smoke run + the evaluation helpers of
tokinteract.mllm.eval it uses."""

from __future__ import annotations

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
    run_dir, res = smoke
    saved = json.loads((run_dir / "results.json").read_text())
    assert set(saved["runs"]) == set(dm.EXPERIMENTS["table5"]) | set(dm.EXPERIMENTS["fig6"])
    for key, run in saved["runs"].items():
        for r in run["seeds"]:
            ev = r["eval"]
            assert 0.0 <= ev["overall"] <= 1.0
            assert math.isfinite(ev["kl"]) and ev["kl"] >= 0.0
            assert sum(ev["counts"].values()) == saved["task"]["test_eval"]
            assert r["train"]["steps_timed"] >= 1
    for key in dm.EXPERIMENTS["fig6"]:
        ex = saved["runs"][key]["seeds"][0]["exposure"]
        assert len(ex["ex_acc_err"]) == dm.PRESETS["smoke"].exposure_steps
        assert all(e >= 0 for e in ex["e"]) and all(r >= 0 for r in ex["r"])
    assert len(saved["irs"]["scores"]) == dm.PRESETS["smoke"].teacher.layers
    assert 0 <= saved["irs"]["best_layer"] < dm.PRESETS["smoke"].teacher.layers
    assert {t["method"] for t in saved["timing"]} == {m for _, m, _ in dm.TIMING_RUNS}
    # the cached teacher and stage-1 student are reused by a second call
    assert (run_dir / "teacher" / "config.json").exists()
    assert (run_dir / "student_stage1" / "config.json").exists()


def test_report_tables_and_plots(smoke, tmp_path: Path) -> None:
    _, res = smoke
    page = dm.write_report(res, tmp_path / "out", command="python examples/demo.py --smoke",
                           page=tmp_path / "page.md")
    md = page.read_text()
    assert "## Components (paper Table 5)" in md
    assert "## Exposure bias (paper Fig. 6)" in md
    assert "## Time and memory per training step" in md
    assert "![IRS](out/fig4_irs.png)" in md
    for png in ("fig4_irs.png", "fig6_exaccerr.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(data["summary"]) == set(res["runs"])
    # every student row of the Table 5 section
    for key in dm.EXPERIMENTS["table5"]:
        assert f"| {res['runs'][key]['label']} |" in md
    assert "| student | overall EM % |" in dm.summary_markdown(res)


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
    monkeypatch.setattr(sys, "argv", ["demo.py", "--smoke", "--no-progress", "--run-dir", str(run_dir)])
    with pytest.raises(SystemExit) as ei:
        runpy.run_path(str(ROOT / "examples" / "demo.py"), run_name="__main__")
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert f"| {res['runs']['align_ti']['label']} |" in out
    assert "## Components (paper Table 5)" in (run_dir / "report" / "README.md").read_text()
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


def test_only_keys_restricts_the_student_runs(smoke, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke[0], run_dir)
    got = dm.run_demo(dm.PRESETS["smoke"], run_dir, progress=False, log=lambda *_: None, only_keys=["kd", "nope"],
                      skip_missing=True)
    assert list(got["runs"]) == ["kd"]
