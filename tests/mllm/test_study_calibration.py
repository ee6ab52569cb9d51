"""The study's new tasks wired into the demo (examples/study/demo_study.py, calibrate.py; issue 15):
task settings, the pre-trained vision tower shared and frozen, the calibration targets and page."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "study"))
import calibrate as cal  # noqa: E402
import demo_study as dm  # noqa: E402

pytest.importorskip("sklearn")


def test_task_settings() -> None:
    assert dm.task_settings("shapes", "quick") is dm.PRESETS["quick"]  # the earlier study is unchanged
    s = dm.task_settings("scenes", "quick")
    assert (s.task, s.grid, s.image_size, s.patch_size) == ("scenes", 4, 48, 12)  # one patch per cell
    assert s.compact_positions and s.vision_position and len(s.question_weights) == 8
    assert s.grounded_answers and s.train_turns == 1  # calibration-log.md, session 2
    # session 4: the shape question in the colour question's layout, no curriculum; session 14
    # (calibration-scenes-s14a.md): 40,000 training samples and 20,000 teacher steps (the teacher at 100 %)
    assert s.aligned_questions and not s.object_tokens and not s.teacher_first_steps
    assert (s.teacher_steps, s.n_train) == (20000, 40000)
    assert s.question_first == "both" and not s.exist_cells  # session 5: the question before and after the image
    d = dm.task_settings("digits", "quick")  # calibration-digits-shift-40d.md
    assert d.grounded_answers and d.compact_positions and d.vision_position and d.teacher_steps == 2000
    # session 8: the tower pre-trained 3,000 steps on batches shifted by +-1 px
    assert (d.vision_shift, d.vision_pretrain_steps, d.vision_images) == (1, 3000, 3000)
    # the student (calibration-log.md, session 8): 40-d x 2, stage 1 150, SFT 1,000 at 3e-3, cosine (every seed 0-4
    # past the transition on the shifted tower)
    assert (d.student, d.stage1_steps, d.student_steps, d.student_lr) == (dm.ModelSize(40, 2), 150, 1000, 3e-3)
    assert d.student_stable == 0.0
    assert s.student_steps == dm.PRESETS["quick"].student_steps  # scenes: not calibrated yet
    assert s.vision_pretrain_steps > 0 and not s.teacher_trains_vision
    assert (s.image_size // s.patch_size) ** 2 >= 16
    full = dm.task_settings("digits", "full")
    assert full.seeds == dm.PRESETS["full"].seeds
    # session 10 (calibration-digits-s10a.md): --full's digits teacher trains 6,000 steps (every short type >= 85 %);
    # make demo keeps 2,000 (its 15-minute budget)
    assert full.teacher_steps == 6000 and d.teacher_steps == 2000
    # session 11 (calibration-digits-s11*.md): --full adds the long 'row_sum' answers (their teachers: short types
    # 93.3 / 92.7 %, l* = 3 for both) and a stage 1 of 500 steps on 'digit_at' alone (SFT 38.3 %, gap 39.4 points);
    # make demo keeps the default types and stage 1; nothing else differs between the two presets' settings
    assert full.question_types == ("read", "digit_at", "sum", "compare", "row_sum") and not d.question_types
    assert (full.stage1_types, full.stage1_steps) == (("digit_at",), 500) and (d.stage1_types, d.stage1_steps) == ((), 150)
    assert dataclasses.replace(full, teacher_steps=2000, name=d.name, seeds=d.seeds, experiments=d.experiments,
                               question_types=(), stage1_types=(), stage1_steps=150) == d
    for task in ("scenes", "digits"):  # the smoke budget stays tiny on every task
        smoke = dm.task_settings(task, "smoke")
        for f in ("teacher_steps", "stage1_steps", "student_steps", "student_lr", "student", "n_train", "n_eval"):
            assert getattr(smoke, f) == getattr(dm.PRESETS["smoke"], f), (task, f)
    with pytest.raises(ValueError, match="task must be one of"):
        dm.task_settings("mnist", "quick")
    with pytest.raises(ValueError, match="preset must be one of"):
        dm.task_settings("scenes", "huge")


def test_the_vision_towers_key_holds_its_thread_count(tmp_path: Path) -> None:
    """The tower trains at the setting's thread count, so a tower of another count is not reused (the key of
    a 1-thread tower is the one it had before the count was part of it: cached towers stay valid)."""
    import dataclasses

    s = dm.task_settings("digits", "smoke")
    keys = {}
    for n in (1, 2):
        d = dm.Demo(dataclasses.replace(s, threads=n, vision_shift=0), tmp_path, progress=False)
        d.task_obj = d.task()
        keys[n] = d._vision_setting()
    assert keys[1] != keys[2] and keys[2][:-1] == keys[1] and keys[2][-1] == {"threads": 2}
    assert len(keys[1]) == 9  # images, steps, images count, lr, hidden, layers, patch, position head, data seed


def test_the_vision_towers_key_holds_its_shift_only_when_set(tmp_path: Path) -> None:
    """A shifted tower (``vision_shift``) is another tower; ``vision_shift=0`` keeps the key towers had
    before the field existed, and the setting reaches the pre-training (recorded in its info)."""
    s = dm.task_settings("digits", "smoke")
    keys = {}
    for n in (0, 1):
        d = dm.Demo(dataclasses.replace(s, vision_shift=n), tmp_path / str(n), progress=False)
        d.task_obj = d.task()
        keys[n] = d._vision_setting()
    assert len(keys[0]) == 9 and keys[1][:-1] == keys[0] and keys[1][-1] == {"shift": 1}
    d = dm.Demo(dataclasses.replace(s, vision_shift=1), tmp_path / "run", progress=False)
    d.prepare()
    d.vision_tower()
    assert d.results["vision"]["shift"] == 1


def test_answer_format_settings_reach_the_task(tmp_path: Path) -> None:
    s = dm.task_settings("scenes", "smoke")
    for grounded, first in ((True, False), (False, True), (True, "both")):
        task = dm.Demo(dataclasses.replace(s, grounded_answers=grounded, question_first=first), tmp_path,
                       progress=False).task()
        assert (task.grounded_answers, task.question_first) == (grounded, first)
    for aligned, objects, cells in ((True, False, True), (False, True, False)):
        task = dm.Demo(dataclasses.replace(s, aligned_questions=aligned, object_tokens=objects, exist_cells=cells),
                       tmp_path, progress=False).task()
        assert (task.aligned_questions, task.object_tokens, task.exist_cells) == (aligned, objects, cells)
    d = dm.task_settings("digits", "smoke")
    with pytest.raises(ValueError, match="object_tokens"):  # scenes options: refused on another task, not ignored
        dm.Demo(dataclasses.replace(d, object_tokens=True), tmp_path / "d", progress=False).task()
    with pytest.raises(ValueError, match="exist_cells=True"):
        dm.Demo(dataclasses.replace(d, exist_cells=True), tmp_path / "d", progress=False).task()
    with pytest.raises(ValueError, match="describe_cells=True"):
        dm.Demo(dataclasses.replace(d, describe_cells=True), tmp_path / "d", progress=False).task()
    assert dm.Demo(dataclasses.replace(s, describe_cells=True), tmp_path, progress=False).task().describe_cells


def test_new_format_options_keep_earlier_cache_keys_and_name_themselves_on_the_page(tmp_path: Path) -> None:
    import dataclasses

    s = dataclasses.replace(dm.task_settings("scenes", "smoke"), aligned_questions=False, object_tokens=False,
                            question_first=False)
    demo = dm.Demo(s, tmp_path / "a", progress=False)
    demo.task_obj = demo.task()
    plain = demo._vision_setting()
    demo.task_obj = dm.Demo(dataclasses.replace(s, aligned_questions=True, object_tokens=True), tmp_path / "b",
                            progress=False).task()
    assert demo._vision_setting() == plain  # the images do not change: the pre-trained tower is reused
    assert not any(k in json.dumps(plain) for k in ("aligned_questions", "object_tokens", "exist_cells"))
    demo.prepare()  # the data key names an option only when it is set: earlier run dirs keep their data
    key = (tmp_path / "a" / "data" / "settings.json").read_text()
    assert '"grounded_answers"' in key and not any(k in key for k in ("aligned_questions", "object_tokens", "exist_cells"))
    other = dm.Demo(dataclasses.replace(s, object_tokens=True), tmp_path / "c", progress=False)
    other.prepare()
    assert '"object_tokens": true' in (tmp_path / "c" / "data" / "settings.json").read_text()
    both = dm.Demo(dataclasses.replace(s, question_first="both"), tmp_path / "q", progress=False)
    both.task_obj = both.task()
    assert both._vision_setting() == plain and '"question_first": false' in key  # False stays in the key as before
    both.prepare()
    assert '"question_first": "both"' in (tmp_path / "q" / "data" / "settings.json").read_text()
    assert both.train.items[0]["input_ids"].numel() > demo.train.items[0]["input_ids"].numel()
    assert other.data_key != demo.data_key and other.tok.convert_tokens_to_ids("red_circle") != other.tok.unk_token_id
    flags = dict(cal._FORMAT_FLAGS)
    assert set(flags) == {"grounded_answers", "aligned_questions", "object_tokens", "question_first", "exist_cells",
                          "describe_cells"}


def test_set_parses_tuple_fields_and_refuses_unknown_ones() -> None:
    s = dm.task_settings("scenes", "smoke")
    got = cal._parse_set(["question_weights=3,1.5", "question_types=color,shape", "compact_positions=true",
                          "teacher_steps=7"], s)
    assert got == {"question_weights": (3.0, 1.5), "question_types": ("color", "shape"), "compact_positions": True,
                   "teacher_steps": 7}
    with pytest.raises(ValueError, match="--set takes NAME=VALUE"):
        cal._parse_set(["teacher=3"], s)
    with pytest.raises(ValueError, match="--set takes NAME=VALUE"):
        cal._parse_set(["nonsense=1"], s)
    assert cal._parse_set(["question_first=both", "grounded_answers=no"], s) == {
        "question_first": "both", "grounded_answers": False}
    assert cal._parse_set(["question_first=True"], s) == {"question_first": True}  # whatever the setting's value
    assert cal._parse_set(["question_first=no"], dataclasses.replace(s, question_first=True)) == {"question_first": False}
    for bad in ("grounded_answers=both", "question_first=before", "compact_positions=ture"):  # never a silent False
        with pytest.raises(ValueError, match="takes one of"):
            cal._parse_set([bad], s)


def test_irs_ratio_and_targets_can_fail() -> None:
    assert cal.irs_ratio([0.1, 0.5, 0.2]) == pytest.approx(5.0)
    assert cal.irs_ratio([0.0, 0.5]) == float("inf")

    def res(short: float, sft: float, irs: list[list[float]]) -> dict:
        ev = {"exact_match": {"a": short, "b": short, "long": 0.5}, "short_overall": short, "overall": 0.7}
        return {"task": {"short_types": ["a", "b"]},
                "teachers": [{"seed": k, "eval": ev, "irs": {"scores": c, "best_layer": c.index(max(c))}}
                             for k, c in enumerate(irs)],
                "sft": [{"eval": {"overall": sft}}]}

    good = cal.check_targets(res(0.9, 0.5, [[0.1, 0.4, 0.2], [0.1, 0.2, 0.5]]))
    assert all(r["met"] for r in good), good
    bad = cal.check_targets(res(0.8, 0.6, [[0.1, 0.2, 0.25], [0.25, 0.1, 0.12]]))
    assert not any(r["met"] for r in bad), bad
    missing = cal.check_targets({**res(0.9, 0.5, [[0.1, 0.4]]), "task": {"short_types": ["a", "c"]}})
    assert [r["met"] for r in missing if "'c'" in r["target"]] == [False]  # not measured is not met


def test_student_line_records_the_recipe_and_the_gap() -> None:
    res = {"settings": {"student": {"hidden": 48, "layers": 2}, "stage1_steps": 150, "student_steps": 600,
                        "student_lr": 3e-3},
           "teachers": [{"seed": 1000, "eval": {"overall": 0.70}}]}
    rec = {"seed": 0, "method": "sft", "train": {"wall_s": 12.34, "step_time_s": 0.02, "threads": 1,
                                "log": [{"loss": 2.0}, {"loss": 0.51234}]},
           "eval": {"exact_match": {"digit_at": 0.4, "read": 0.0}, "overall": 0.25, "short_overall": 0.3}}
    line = cal.student_line(res, rec, command="cmd")
    assert line["gap"] == pytest.approx(0.45) and line["teacher_seed"] == 1000 and line["student_lr"] == 3e-3
    assert (line["student_steps"], line["train_s"], line["loss"]) == (600, 12.3, [2.0, 0.5123])
    assert line["em"] == {"digit_at": 0.4, "read": 0.0} and line["short_overall"] == 0.3 and line["command"] == "cmd"
    assert line["kind"] == "sft_student"
    json.dumps(line)  # one JSON line


def test_cli_student_size_heads_and_schedule_reach_the_settings(tmp_path: Path, monkeypatch) -> None:
    got = {}

    def stop(settings, run_dir, **kw):  # what main() would calibrate, without training it
        got["settings"] = settings
        raise RuntimeError("stopped before training")

    monkeypatch.setattr(cal, "calibrate", stop)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="stopped before training"):
            cal.main(["--task", "digits", "--run-dir", str(tmp_path), "--student-size", "40", "2",
                      "--student-heads", "2", "1", "--set", "student_stable=0.5", "--threads", str(threads)])
    finally:
        torch.set_num_threads(threads)
    s = got["settings"]
    assert s.student == dm.ModelSize(40, 2, heads=2, kv_heads=1) and s.student_stable == 0.5
    assert s.teacher == dm.task_settings("digits", "quick").teacher  # the teacher is untouched


def _lr_curve(steps: int, stable: float) -> list[float]:
    """The learning rate of each step under ``dm.schedule_args(steps, stable)``, as the Trainer builds it."""
    from transformers.optimization import get_scheduler

    args = dm.schedule_args(steps, stable)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(args["lr_scheduler_type"], opt, num_warmup_steps=args["warmup_steps"],
                          num_training_steps=steps, scheduler_specific_kwargs=args.get("lr_scheduler_kwargs", {}))
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_args_cosine_by_default_and_warmup_stable_decay() -> None:
    # the default is the schedule of every earlier run: the Trainer's cosine after a 5 % warm-up
    assert dm.schedule_args(800) == {"warmup_steps": 40, "lr_scheduler_type": "cosine"}
    assert dm.schedule_args(10) == {"warmup_steps": 1, "lr_scheduler_type": "cosine"}
    got = dm.schedule_args(800, 0.75)
    assert got["lr_scheduler_type"] == "warmup_stable_decay" and got["warmup_steps"] == 40
    assert got["lr_scheduler_kwargs"] == {"num_decay_steps": 160}  # 600 stable steps: 800 - 40 - 160
    cos, wsd = _lr_curve(100, 0.0), _lr_curve(100, 0.5)
    assert cos[0] == wsd[0] == 0.0 and cos[5] == wsd[5] == pytest.approx(1.0)  # the same warm-up
    assert all(x == 1.0 for x in wsd[5:55]) and wsd[55] == 1.0  # held for 50 steps, then decayed
    assert all(a > b for a, b in zip(wsd[56:], wsd[57:])) and wsd[-1] < 0.01
    assert cos[50] < 0.6 and all(w >= c for w, c in zip(wsd, cos))  # more integrated rate than the cosine
    for bad in (-0.1, 1.0, True, "0.5", 0.97):  # 0.97 of 20 steps leaves no decay step after the warm-up
        with pytest.raises(ValueError, match="stable"):
            dm.schedule_args(20, bad)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        dm.schedule_args(0)


def test_the_schedule_is_in_the_student_keys_only_when_not_cosine() -> None:
    s = dm.task_settings("digits", "quick")
    assert s.student_stable == 0.0 and dm.student_schedule_key(s) == {}  # earlier cached runs keep their keys
    assert dm.student_schedule_key(dataclasses.replace(s, student_stable=0.6)) == {"stable": 0.6}
    assert cal._parse_set(["student_stable=0.6"], s) == {"student_stable": 0.6}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["scenes", "digits"])
def test_calibration_smoke_shares_one_frozen_pretrained_tower(tmp_path: Path, task: str) -> None:
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(1)
    page = tmp_path / "cal.md"
    argv = ["--task", task, "--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--page", str(page),
            "--teacher-seeds", "5", "6", "--student-seeds", "0", "--jsonl", str(tmp_path / "log.jsonl"), "--kd-seeds", "0"]
    assert cal.main(argv) == 0
    text = page.read_text()
    res = json.loads((tmp_path / "run" / "calibration.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["sft_student", "kd_student"]
    # the frozen digits tower is pre-trained on shifted batches (scenes' is not), and its page says so
    shifted = dm.task_settings(task, "smoke").vision_shift
    assert shifted == (1 if task == "digits" else 0) and res["vision"]["shift"] == shifted
    assert ("shifted by a random offset of up to ±1 px" in text) == (task == "digits")
    for line, rec in zip(lines, res["sft"] + res["kd"]):
        assert line["overall"] == round(rec["eval"]["overall"], 3) and rec["train"]["log"][0]["loss"] > 0
    assert "loss_kd" in res["kd"][0]["train"]["log"][0] and "loss_kd" not in res["sft"][0]["train"]["log"][0]
    assert lines[0]["student_steps"] == res["settings"]["student_steps"] and "--jsonl" in lines[0]["command"]
    assert cal.main(argv) == 0  # resumed: the cached students are not logged again
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2
    steps = res["settings"]["student_steps"] + 1  # another recipe in the same run dir: trained again, not reused
    assert cal.main([*argv, "--set", f"student_steps={steps}", "--kd-seeds"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and lines[-1]["student_steps"] == steps and lines[-1]["kind"] == "sft_student"
    # the same steps with the peak rate held (warm-up-stable-decay): another recipe, trained again
    assert cal.main([*argv, "--set", f"student_steps={steps}", "--set", "student_stable=0.34", "--kd-seeds"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and lines[-1]["student_stable"] == 0.34 and lines[-2]["student_stable"] == 0.0
    assert [t["seed"] for t in res["teachers"]] == [5, 6]
    assert len(res["sft"]) == 1 and res["task"]["name"] == task
    # a teacher trained again in the same run dir (other steps) is evaluated again, not read from the old record
    old = json.loads((tmp_path / "run" / "teacher_eval_seed5.json").read_text())
    t_steps = res["settings"]["teacher_steps"] + 1
    base = ["--task", task, "--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--page", str(page)]
    assert cal.main([*base, "--teacher-seeds", "5", "--student-seeds", "0", "--set", f"teacher_steps={t_steps}"]) == 0
    new = json.loads((tmp_path / "run" / "teacher_eval_seed5.json").read_text())
    assert new["cache_key"] != old["cache_key"] and new["train"]["cache_key"] != old["train"]["cache_key"]
    assert json.loads((tmp_path / "run" / "calibration.json").read_text())["teachers"][0] == new
    v = res["vision"]
    assert set(v["probe"]) == set(v["random_probe"]) and all(0.0 <= x <= 1.0 for x in v["probe"].values())
    tower = load_file(str(tmp_path / "run" / "vision_tower" / "tower.safetensors"))
    for path in ("teacher", "teacher_seed6", "student_stage1"):  # every model holds the pre-trained tower, unchanged
        m = LlavaForConditionalGeneration.from_pretrained(tmp_path / "run" / path)
        for k, w in m.model.vision_tower.state_dict().items():
            assert torch.equal(w, tower[k]), (path, k)
    assert "## Targets (issue 15)" in text and "probe" in text and "| Vanilla KD student seed 0 |" in text
    assert "Gap left after Vanilla KD" in text
    assert len(res["targets"]) == len(res["task"]["short_types"]) + 1 + 1 + 2 + 1


@pytest.mark.slow
def test_demo_smoke_on_the_scenes_task(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    settings = dm.task_settings("scenes", "smoke")
    res = dm.run_demo(settings, tmp_path / "run", progress=False, log=lambda *_: None)
    assert res["task"]["name"] == "scenes" and res["task"]["visual_tokens"] == 16
    settings_types = ("color", "shape", "position", "count", "exist", "describe", "list_color", "count_colors")
    assert tuple(res["task"]["question_types"]) == settings_types
    assert "probe" in res["vision"]
    for key in dm.EXPERIMENTS["table5"]:
        ev = res["runs"][key]["seeds"][0]["eval"]
        assert sum(ev["counts"].values()) == res["task"]["test_eval"]
        assert set(ev["exact_match"]) <= set(settings_types)
    page = dm.write_report(res, tmp_path / "out", command="smoke", page=tmp_path / "page.md")
    text = page.read_text()
    assert "| list_color % |" in text and "'describe' prompts" in text and "3..8 objects" in text


def test_teacher_curriculum_trains_a_first_stage_on_the_named_types(tmp_path: Path) -> None:
    import dataclasses

    torch.set_num_threads(1)
    s = dataclasses.replace(dm.task_settings("scenes", "smoke"), n_train=40, teacher_steps=2)
    staged = dataclasses.replace(s, teacher_first_types=("color", "shape"), teacher_first_steps=3)
    demo = dm.Demo(staged, tmp_path, progress=False)
    demo.prepare()
    sub = demo.train_subset(("color", "shape"))
    types = [m["type"] for m in dm._meta(tmp_path / "data" / "train.json")]
    assert len(sub) == sum(t in ("color", "shape") for t in types) > 0
    assert all(any(it is x for x in demo.train.items) for it in sub.items)  # the same decoded items, no copies
    for bad in (("colour",), (), "color"):
        with pytest.raises(ValueError, match="teacher_first_types"):
            demo.train_subset(bad)
    plain = dm.Demo(s, tmp_path, progress=False)
    plain.prepare()
    plain.task_obj = demo.task_obj
    assert demo.teacher_key() != plain.teacher_key()  # the curriculum is part of the teacher's cache key
    demo.teacher_model()
    info = json.loads((tmp_path / "teacher" / "train_info.json").read_text())
    first = info["first_stage"]
    assert (first["types"], first["steps"], first["samples"]) == (["color", "shape"], 3, len(sub))
    assert len(first["log"]) == 3 and all(x["loss"] > 0 for x in first["log"])  # one logged loss per first-stage step
    assert info["cache_key"] == demo.teacher_key()


def test_stage1_on_named_types_trains_on_those_training_samples(tmp_path: Path) -> None:
    """``stage1_types``: the shared stage-1 student trains on the training samples of those types (not the
    caption split), logs how many, and the choice is part of its cache key; a wrong type is refused by name."""
    import dataclasses

    torch.set_num_threads(1)
    s = dataclasses.replace(dm.task_settings("scenes", "smoke"), n_train=40, teacher_steps=1)
    demo = dm.Demo(dataclasses.replace(s, stage1_types=("color", "shape")), tmp_path, progress=False)
    demo.prepare()
    teacher = demo.teacher_model()
    lines: list[str] = []
    demo.log = lines.append
    demo.stage1_student(teacher)
    n = len(demo.train_subset(("color", "shape")))
    assert any(f"{n} training samples of color, shape" in x for x in lines), lines
    staged_key = demo.stage1_key
    plain = dm.Demo(s, tmp_path, progress=False)
    plain.prepare()
    plain.stage1_student(teacher)  # the caption split: another key, so trained again
    assert plain.stage1_key != staged_key
    base = {"batch_size": 16, "student_lr": 1e-3}  # a results JSON's settings always hold these
    assert dm.stage1_words({"stage1_types": ["color", "shape"], **base}) == "the training samples of color, shape"
    assert dm.stage1_words({"stage1_types": [], **base}) == dm.stage1_words(base) == "captions"
    bad = dm.Demo(dataclasses.replace(s, stage1_types=("colour",)), tmp_path, progress=False)
    bad.prepare()
    with pytest.raises(ValueError, match="stage1_types"):
        bad.stage1_student(teacher)


def test_the_same_seed_gives_the_same_weights_in_another_run_dir(tmp_path: Path) -> None:
    """Issue 15, item 4: the tower and the teacher trained twice, from scratch, in two run dirs (nothing cached)
    have the same weights digest (and it is the digest of the saved checkpoint); another teacher seed gives
    another teacher."""
    from transformers import LlavaForConditionalGeneration

    s = dataclasses.replace(dm.task_settings("digits", "smoke"), teacher_steps=3)
    got = []
    for name in ("a", "b"):
        d = dm.Demo(s, tmp_path / name, progress=False, log=lambda *_: None)
        d.prepare()
        t = d.teacher_model()
        got.append((d.results["vision"]["weights"], d.results["teacher_train"]["weights"], dm.weights_digest(t)))
    assert got[0] == got[1] and got[0][1] == got[0][2]
    saved = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a" / "teacher")
    assert dm.weights_digest(saved) == got[0][1]
    other = d.teacher_model(seed=s.teacher_seed + 1)
    assert dm.weights_digest(other) != got[0][1]
    # one bit of one weight changes the digest
    with torch.no_grad():
        p = next(iter(saved.parameters()))
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))
    assert dm.weights_digest(saved) != got[0][1]


def _spy_training_args(monkeypatch) -> list[tuple[str, int, float]]:
    """Record (output dir name, batch, learning rate) of every TrainingArguments the study builds."""
    import transformers

    torch.set_num_threads(1)
    seen: list[tuple[str, int, float]] = []
    real = transformers.TrainingArguments

    def spy(*a, **k):
        seen.append((Path(k["output_dir"]).name, k["per_device_train_batch_size"], k["learning_rate"]))
        return real(*a, **k)

    monkeypatch.setattr(transformers, "TrainingArguments", spy)
    return seen


def _stage1_key(settings: dm.DemoSettings, run_dir: Path, teacher: torch.nn.Module) -> str:
    """The stage-1 key of ``settings`` in ``run_dir``, after training (or reusing) that stage-1 student."""
    d = dm.Demo(settings, run_dir, progress=False)
    d.prepare()
    d.stage1_student(teacher)
    return d.stage1_key


def test_student_batch_trains_the_students_only_and_keys_them(tmp_path: Path, monkeypatch) -> None:
    """``student_batch``: stage 1 (and every student) trains with it, the teacher with ``batch_size``; the
    stage-1 key names the batch trained with, so 0 and an equal batch give the earlier key."""
    calls = _spy_training_args(monkeypatch)
    s = dataclasses.replace(dm.task_settings("scenes", "smoke"), n_train=40, teacher_steps=1)
    assert s.batch_size == 4
    demo = dm.Demo(dataclasses.replace(s, student_batch=2), tmp_path, progress=False)
    demo.prepare()
    teacher = demo.teacher_model()
    demo.stage1_student(teacher)
    assert [c[:2] for c in calls] == [("teacher", 4), ("stage1", 2)] and demo.student_batch == 2
    keys = {b: _stage1_key(dataclasses.replace(s, student_batch=b), tmp_path, teacher) for b in (0, 4, 2)}
    assert keys[0] == keys[4] != keys[2]
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="student_batch must be an integer >= 0"):
            dm.student_batch(dataclasses.replace(s, student_batch=bad))
    assert cal._parse_set(["student_batch=48"], s) == {"student_batch": 48}
    assert dm.student_batch({"batch_size": 16}) == 16 and dm.student_batch({"batch_size": 16, "student_batch": 48}) == 48


def test_stage1_batch_and_lr_train_stage1_only_and_key_it(tmp_path: Path, monkeypatch) -> None:
    """``stage1_batch`` / ``stage1_lr``: the shared stage-1 student trains with them, stage 2 with the
    students'; 0 falls back to the students' (so earlier stage-1 keys stay), another value is another key;
    the page names them only when they differ."""
    seen = _spy_training_args(monkeypatch)
    s = dataclasses.replace(dm.task_settings("scenes", "smoke"), n_train=40, teacher_steps=1, student_batch=2,
                            student_lr=1e-3)
    demo = dm.Demo(dataclasses.replace(s, stage1_batch=3, stage1_lr=3e-3), tmp_path, progress=False)
    demo.prepare()
    teacher = demo.teacher_model()
    demo.stage1_student(teacher)
    assert seen[-1] == ("stage1", 3, 3e-3) and demo.student_batch == 2
    keys = {b: _stage1_key(dataclasses.replace(s, stage1_batch=b), tmp_path, teacher) for b in (0, 2, 3)}
    assert keys[0] == keys[2] != keys[3]
    for lr in (0.0, 1e-3, 3e-3):
        keys[lr] = _stage1_key(dataclasses.replace(s, stage1_batch=3, stage1_lr=lr), tmp_path, teacher)
    assert keys[0.0] == keys[1e-3] == keys[3] != keys[3e-3]
    n = len(seen)  # the run dir holds the last one, (3, 3e-3): the same setting again reuses it
    assert _stage1_key(dataclasses.replace(s, stage1_batch=3, stage1_lr=3e-3), tmp_path, teacher) == keys[3e-3]
    assert len(seen) == n
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="stage1_batch must be an integer >= 0"):
            dm.stage1_batch(dataclasses.replace(s, stage1_batch=bad))
    for bad in (-1e-3, float("nan"), True, "3e-3"):
        with pytest.raises(ValueError, match="stage1_lr must be a finite number >= 0"):
            dm.stage1_lr(dataclasses.replace(s, stage1_lr=bad))
    assert cal._parse_set(["stage1_batch=48"], s) == {"stage1_batch": 48}
    assert dm.stage1_batch({"batch_size": 16}) == 16 and dm.stage1_batch({"batch_size": 16, "student_batch": 8}) == 8
    assert dm.stage1_batch({"batch_size": 16, "stage1_batch": 48}) == 48
    assert dm.stage1_lr({"student_lr": 1e-3}) == 1e-3 and dm.stage1_lr({"student_lr": 1e-3, "stage1_lr": 3e-3}) == 3e-3
    lr = {"student_lr": 1e-3}
    assert dm.stage1_words({"batch_size": 16, "stage1_batch": 48, **lr}) == "captions at batch 48"
    assert dm.stage1_words({"batch_size": 16, "stage1_batch": 16, "stage1_lr": 1e-3, **lr}) == "captions"
    assert dm.stage1_words({"batch_size": 16, "stage1_lr": 3e-3, **lr}) == "captions, lr 0.003"
