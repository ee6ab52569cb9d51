"""The study's tasks (examples/study/tasks.py, issue 15): determinism, answers parsed back against the
world, held-out splits, POPE splits, token lengths and visual-token counts."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "study"))
import tasks as T  # noqa: E402  (the study lives in examples/, outside the package)

pytest.importorskip("sklearn")  # the digits task reads scikit-learn's bundled data set

TASK_NAMES = ("scenes", "digits")


def _qa(sample: dict) -> tuple[str, str]:
    q = sample["conversations"][0]["value"].replace("<image>\n", "").replace("\n<image>", "")
    return q, sample["conversations"][1]["value"]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, name: str) -> None:
    task = T.make_task(name)
    a = T.write_task(task, tmp_path / "a", n_train=6, n_test=3, n_captions=2, n_irs=2, seed=7)
    b = T.write_task(task, tmp_path / "b", n_train=6, n_test=3, n_captions=2, n_irs=2, seed=7)
    c = T.write_task(task, tmp_path / "c", n_train=6, n_test=3, n_captions=2, n_irs=2, seed=8)
    for split in ("train", "test", "captions", "irs"):
        assert a[split].read_text() == b[split].read_text()
        for s in json.loads(a[split].read_text()):
            assert (tmp_path / "a" / s["image"]).read_bytes() == (tmp_path / "b" / s["image"]).read_bytes()
    assert a["train"].read_text() != c["train"].read_text()


@pytest.mark.parametrize("grounded", [False, True])
@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_answer_parses_back_to_the_world_and_wrong_ones_fail(name: str, grounded: bool) -> None:
    task = T.make_task(name, grounded_answers=grounded, compact_positions=grounded)
    samples, worlds = T.make_samples(task, 600, seed=3)
    types = Counter(s["meta"]["type"] for s in samples)
    assert set(types) == set(task.question_types)
    wrong_checked = Counter()
    for sample, world in zip(samples, worlds):
        q, a = _qa(sample)
        assert task.check_answer(world, q, a, sample["meta"]), (q, a)
        # another sample's answer of the same type, when it differs, must be judged wrong
        for other, ow in zip(samples, worlds):
            oq, oa = _qa(other)
            if other["meta"]["type"] == sample["meta"]["type"] and oa != a and ow.key() != world.key():
                if not task.check_answer(world, q, oa, sample["meta"]):
                    wrong_checked[sample["meta"]["type"]] += 1
                break
    assert set(wrong_checked) == set(task.question_types)


def test_scene_pixels_show_every_object_in_its_cell_and_colour() -> None:
    task = T.SceneTask()
    _, worlds = T.make_samples(task, 50, seed=1)
    cell = task.image_size // task.grid
    for scene in worlds:
        img = task.render(scene)
        occupied = {(r, k) for _, _, r, k in scene.objects}
        for r in range(task.grid):
            for k in range(task.grid):
                px = {img.getpixel((k * cell + x, r * cell + y)) for x in range(cell) for y in range(cell)}
                hit = scene.at(r, k)
                if hit is None:
                    assert px == {T._BACKGROUND}
                else:
                    assert T.COLORS[hit[0]] in px and (r, k) in occupied


def test_digit_boards_paste_the_sklearn_digits_and_test_uses_held_out_handwriting() -> None:
    task = T.DigitTask()
    _, train = T.make_samples(task, 40, seed=0, split="train")
    _, test = T.make_samples(task, 40, seed=1, split="test")
    n = len(T._digits()[1])
    cut = n - int(round(n * task.test_fraction))
    assert all(i < cut for b in train for i in b.indices)
    assert all(i >= cut for b in test for i in b.indices)
    board = train[0]
    img = task.render(board)
    cell = task.image_size // task.grid
    tile = task.digit_tile(board.indices[5], cell - 2)
    r, c = divmod(5, task.grid)
    assert img.crop((c * cell + 1, r * cell + 1, c * cell + cell - 1, r * cell + cell - 1)).tobytes() == tile.tobytes()
    assert list(board.labels) == [int(T._digits()[1][i]) for i in board.indices]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_test_split_never_repeats_a_training_world(tmp_path: Path, name: str) -> None:
    task = T.make_task(name)
    _, train = T.make_samples(task, 200, seed=0)
    keys = {w.key() for w in train}
    _, test = T.make_samples(task, 100, seed=1, split="test", exclude=keys)
    assert not keys & {w.key() for w in test}
    assert len({w.key() for w in test}) == 100


def test_pope_splits_random_popular_adversarial() -> None:
    task = T.SceneTask(question_types=("exist",))
    samples, worlds = T.make_samples(task, 900, seed=2)
    splits = Counter((s["meta"]["pope"], s["meta"]["answer"]) for s in samples)
    for split in T.SceneTask.POPE_SPLITS:  # every split, with present and absent probes (about half each)
        assert 0.35 < splits[(split, "yes")] / (splits[(split, "yes")] + splits[(split, "no")]) < 0.65
    weight = {(c, s): cw * sw for c, cw in zip(T.COLORS, T.COLOR_WEIGHTS) for s, sw in zip(T.SHAPES, T.SHAPE_WEIGHTS)}
    adv_both = adv = 0
    for s, scene in zip(samples, worlds):
        m = s["meta"]
        if m["answer"] != "no":
            continue
        c, sh = m["probe"].split()
        present = {(o[0], o[1]) for o in scene.objects}
        assert (c, sh) not in present
        if m["pope"] == "popular":
            assert weight[(c, sh)] == max(w for p, w in weight.items() if p not in present)
        if m["pope"] == "adversarial":
            adv += 1
            adv_both += c in {p[0] for p in present} and sh in {p[1] for p in present}
    assert adv_both / adv > 0.8  # colour and shape both in the image, on different objects


def test_answer_token_lengths_and_closed_vocabulary() -> None:
    from tokinteract.mllm import build_word_tokenizer

    for name, long_type, min_mean in (("scenes", "describe", 30), ("digits", "read", 30)):
        task = T.make_task(name)
        tok = build_word_tokenizer(task.vocabulary())
        unk = tok.unk_token_id
        samples, _ = T.make_samples(task, 400, seed=4)
        lens: dict[str, list[int]] = {}
        for s in samples:
            q, a = _qa(s)
            qi, ai = tok(q)["input_ids"], tok(a)["input_ids"]
            assert unk not in qi and unk not in ai, (q, a)
            assert tok.decode(ai) == a  # one token per word: the answer text is recovered exactly
            lens.setdefault(s["meta"]["type"], []).append(len(ai))
        long = lens[long_type]
        assert sum(long) / len(long) >= min_mean, (name, sum(long) / len(long))
        for t in task.SHORT_TYPES:
            assert max(lens[t]) <= 4, (t, max(lens[t]))
    desc = [len(T.SceneTask.parse_objects(_qa(s)[1])) for s in T.make_samples(T.SceneTask(), 300, seed=5)[0]
            if s["meta"]["type"] == "describe"]
    assert max(desc) >= 6  # "up to 6-8 objects"


@pytest.mark.parametrize(("name", "patch", "tokens"), [("scenes", 8, 36), ("scenes", 12, 16), ("digits", 12, 16)])
def test_visual_token_count_through_the_llava_pipeline(tmp_path: Path, name: str, patch: int, tokens: int) -> None:
    from tokinteract.mllm import build_processor, build_tiny_llava, build_word_tokenizer
    from tokinteract.mllm.data import LlavaJsonDataset

    task = T.make_task(name)
    paths = T.write_task(task, tmp_path, n_train=4, n_test=2, n_irs=3, seed=0)
    tok = build_word_tokenizer(task.vocabulary())
    img_id = tok.convert_tokens_to_ids("<image>")
    model = build_tiny_llava(vocab_size=len(tok), image_token_id=img_id, image_size=task.image_size, patch_size=patch,
                             hidden_size=32, num_layers=1, vision_hidden_size=16, vision_layers=1)
    proc = build_processor(tok, model)
    ds = LlavaJsonDataset(paths["train"], tmp_path, tok, proc.image_processor, num_image_tokens=tokens, max_length=256)
    for k in range(len(ds)):
        it = ds[k]
        assert int((it["input_ids"] == img_id).sum()) == tokens >= 16
        assert tuple(it["pixel_values"].shape) == (1, 3, task.image_size, task.image_size)
    irs = LlavaJsonDataset(paths["irs"], tmp_path, tok, proc.image_processor, num_image_tokens=tokens, max_length=256)
    pairs = irs.instruction_pairs(3)
    assert len(pairs) == 3  # two different questions about one image
    for a, b in pairs:
        assert not (a["input_ids"].shape == b["input_ids"].shape and bool((a["input_ids"] == b["input_ids"]).all()))


def test_bad_settings_are_refused_with_the_argument_named() -> None:
    with pytest.raises(ValueError, match="grid must be one of"):
        T.SceneTask(grid=2)
    with pytest.raises(ValueError, match="max_objects must be an int in"):
        T.SceneTask(max_objects=10)
    with pytest.raises(ValueError, match="image_size must be a multiple of grid"):
        T.DigitTask(image_size=50)
    with pytest.raises(ValueError, match="question_types must be a non-empty subset"):
        T.DigitTask(question_types=("describe",))
    with pytest.raises(ValueError, match="task must be one of"):
        T.make_task("mnist")
    with pytest.raises(ValueError, match="turns must be <="):
        T.make_samples(T.DigitTask(question_types=("read",)), 2, seed=0, turns=2)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_compact_positions_are_one_token_and_parse_back(name: str) -> None:
    from tokinteract.mllm import build_word_tokenizer

    task = T.make_task(name, compact_positions=True)
    tok = build_word_tokenizer(task.vocabulary())
    samples, worlds = T.make_samples(task, 300, seed=6)
    seen_cells = 0
    for sample, world in zip(samples, worlds):
        q, a = _qa(sample)
        assert "row" not in q.split() or name == "digits"  # digits' "read" answer keeps its row labels
        assert task.check_answer(world, q, a, sample["meta"]), (q, a)
        for text in (q, a):
            for cell in __import__("re").findall(r"r\d+c\d+", text):
                seen_cells += 1
                assert len(tok(cell)["input_ids"]) == 1 and tok.unk_token_id not in tok(text)["input_ids"]
    assert seen_cells > 100
    r, c = 1, 2  # row two, column three
    assert T._pos(r, c, True) == "r2c3" and T._parse_pos("r2c3") == T._parse_pos("row two column three") == (r, c)
    if name == "scenes":  # a wrong cell is judged wrong
        scene = worlds[0]
        o = scene.objects[0]
        empty = next((i, j) for i in range(3) for j in range(3) if scene.at(i, j) is None) if len(scene.objects) < 9 else None
        if empty is not None:
            assert not task.check_answer(scene, f"where is the {o[0]} {o[1]} ?", T._pos(*empty, True), {"type": "position"})


@pytest.mark.parametrize("name", TASK_NAMES)
def test_question_weights_shape_the_training_split_only(tmp_path: Path, name: str) -> None:
    base = T.make_task(name)
    types = base.question_types
    weights = tuple(8.0 if k == 1 else 1.0 for k in range(len(types)))
    task = T.make_task(name, question_weights=weights)
    samples, _ = T.make_samples(task, 800, seed=0, weights=task.question_weights)
    freq = Counter(s["meta"]["type"] for s in samples)
    share = freq[types[1]] / 800
    expected = 8.0 / (8.0 + len(types) - 1)
    assert abs(share - expected) < 0.06, (share, expected)
    paths = T.write_task(task, tmp_path, n_train=200, n_test=200, seed=0)
    test_freq = Counter(s["meta"]["type"] for s in json.loads(paths["test"].read_text()))
    train_freq = Counter(s["meta"]["type"] for s in json.loads(paths["train"].read_text()))
    assert train_freq[types[1]] > 100 and test_freq[types[1]] < 100  # weighted train, uniform test
    # without weights the draws (and so the files) are the earlier ones
    assert T.make_samples(base, 20, seed=0)[0] == T.make_samples(base, 20, seed=0, weights=())[0]
    with pytest.raises(ValueError, match="question_weights must be empty or one positive number per question type"):
        T.make_task(name, question_weights=(1.0,))
    with pytest.raises(ValueError, match="question_weights must be empty or one positive number per question type"):
        T.make_task(name, question_weights=tuple(0.0 for _ in types))
    # multi-turn samples draw distinct types, each draw weighted among the types left
    multi, _ = T.make_samples(task, 600, seed=0, turns=2, weights=task.question_weights)
    firsts = Counter(s["meta"]["turns"][0]["type"] for s in multi)
    assert all(len({t["type"] for t in s["meta"]["turns"]}) == 2 for s in multi)
    assert abs(firsts[types[1]] / 600 - expected) < 0.06, (firsts, expected)


def test_frozen_scene_setting_keeps_long_answers_long() -> None:
    # the calibrated setting (4x4 grid, one-token positions) still has describe answers of 30+ tokens
    from tokinteract.mllm import build_word_tokenizer

    task = T.SceneTask(grid=4, compact_positions=True)
    tok = build_word_tokenizer(task.vocabulary())
    samples, _ = T.make_samples(task, 200, seed=4, question_types=("describe",))
    lens = [len(tok(_qa(s)[1])["input_ids"]) for s in samples]
    assert sum(lens) / len(lens) >= 30 and max(lens) >= 45, (sum(lens) / len(lens), max(lens))


def test_frozen_scene_stage1_trains_on_every_question_type() -> None:
    # session 11: the scenes stage-1 student trains on every type of the task (none forgotten, none unknown)
    import demo_study as dm

    s = dm.task_settings("scenes", "full")
    assert s.stage1_types == T.SceneTask.ALL_TYPES
    assert (dm.stage1_batch(s), dm.stage1_lr(s), dm.student_batch(s)) == (48, 3e-3, 16)


def test_irs_pairs_use_every_type_when_the_task_has_one(tmp_path: Path) -> None:
    task = T.SceneTask(question_types=("color",))
    paths = T.write_task(task, tmp_path, n_train=4, n_test=2, n_irs=10, seed=0)
    assert {s["meta"]["type"] for s in json.loads(paths["train"].read_text())} == {"color"}
    irs = json.loads(paths["irs"].read_text())
    assert len(irs) == 10 and all(len({t["type"] for t in s["meta"]["turns"]}) == 2 for s in irs)


GROUNDED_EXAMPLES = {  # (question, grounded answer, its plain answer) for one fixed scene
    "color": ("what color is the object at r1c2 ?", "r1c2 red", "red"),
    "shape": ("what shape is at r1c2 ?", "r1c2 circle", "circle"),
    "position": ("where is the blue square ?", "blue square r2c1", "r2c1"),
    "count": ("how many red objects are there ?", "red one", "one"),
    "exist": ("is there a green circle in the image ?", "green circle no", "no"),
}


@pytest.mark.parametrize("qtype", sorted(GROUNDED_EXAMPLES))
def test_grounded_answers_restate_the_key_and_a_wrong_key_is_wrong(qtype: str) -> None:
    scene = T.Scene((("red", "circle", 0, 1), ("blue", "square", 1, 0)), 3)
    grounded = T.SceneTask(grid=3, compact_positions=True, grounded_answers=True)
    plain = T.SceneTask(grid=3, compact_positions=True)
    q, a, bare = GROUNDED_EXAMPLES[qtype]
    meta = {"type": qtype}
    assert grounded.check_answer(scene, q, a, meta) and plain.check_answer(scene, q, bare, meta)
    assert not grounded.check_answer(scene, q, bare, meta)  # the key is part of the answer
    assert not plain.check_answer(scene, q, a, meta)
    key, _, value = a.rpartition(" ")
    other_key = {"color": "r2c1", "shape": "r2c1", "position": "red circle", "count": "blue",
                 "exist": "red circle"}[qtype]
    assert not grounded.check_answer(scene, q, f"{other_key} {value}", meta)  # another key, same value
    # the generator writes this format: the key first, then what the plain task answers
    import random

    for seed in range(40):
        gq, ga, _ = grounded.question(random.Random(seed), scene, qtype)
        pq, pa, _ = plain.question(random.Random(seed), scene, qtype)
        assert gq == pq and (ga == pa or ga.endswith(" " + pa)) and grounded.check_answer(scene, gq, ga, meta)
        assert (ga == pa) == (gq == "how many objects are there ?")  # the one question without a key


def test_grounded_digit_answers_read_each_named_cell_first() -> None:
    task = T.DigitTask(compact_positions=True, grounded_answers=True)
    samples, boards = T.make_samples(task, 200, seed=2, question_types=("digit_at", "sum", "compare"))
    for sample, board in zip(samples, boards):
        q, a = _qa(sample)
        cells = __import__("re").findall(r"r\d+c\d+", q)
        reads = " ".join(f"{c} {board.digit(*T._parse_pos(c))}" for c in cells)
        assert (a == reads if sample["meta"]["type"] == "digit_at" else a.startswith(reads + " "))
        assert task.check_answer(board, q, a, sample["meta"])
        wrong = a.replace(f"{cells[0]} {board.digit(*T._parse_pos(cells[0]))}",
                          f"{cells[0]} {(board.digit(*T._parse_pos(cells[0])) + 1) % 10}", 1)
        assert not task.check_answer(board, q, wrong, sample["meta"])  # a misread cell is wrong


@pytest.mark.parametrize("name", TASK_NAMES)
def test_question_first_puts_the_image_after_the_question(name: str) -> None:
    task = T.make_task(name, question_first=True)
    samples, worlds = T.make_samples(task, 20, seed=1)
    for s, w in zip(samples, worlds):
        first = s["conversations"][0]["value"]
        assert first.endswith("\n<image>") and first.count("<image>") == 1
        assert task.check_answer(w, *_qa(s), s["meta"])
    default = T.make_samples(T.make_task(name), 20, seed=1)[0]
    assert all(s["conversations"][0]["value"].startswith("<image>\n") for s in default)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_question_first_both_puts_the_question_before_and_after_the_image(name: str) -> None:
    task = T.make_task(name, question_first="both")
    samples, worlds = T.make_samples(task, 20, seed=1)
    plain = T.make_samples(T.make_task(name), 20, seed=1)[0]
    for s, p, w in zip(samples, plain, worlds):
        before, image, after = s["conversations"][0]["value"].split("\n")
        assert image == "<image>" and before == after == _qa(p)[0]  # the same question as the default layout's
        assert s["conversations"][1:] == p["conversations"][1:] and s["meta"] == p["meta"]
        assert task.check_answer(w, after, s["conversations"][1]["value"], s["meta"])
    assert [T.user_turn("q", v) for v in T.QUESTION_FIRST] == ["<image>\nq", "q\n<image>", "q\n<image>\nq"]


@pytest.mark.parametrize("bad", [1, 0, "true", "after", None])
def test_question_first_refuses_other_values(bad: object) -> None:
    for name in TASK_NAMES:
        with pytest.raises(ValueError, match="question_first must be one of"):
            T.make_task(name, question_first=bad)


def _digest(task: object, n: int = 40, seed: int = 5) -> str:
    import hashlib

    samples, _ = T.make_samples(task, n, seed=seed)
    return hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()[:16]


def test_generator_options_leave_the_earlier_outputs_unchanged() -> None:
    # digests of the samples written before aligned_questions / object_tokens existed (commit 6213cc0):
    # the digits task and the scenes task at their defaults and in the frozen (grounded, one-token) format
    assert _digest(T.DigitTask()) == "ecad6d43980749f5"
    assert _digest(T.DigitTask(compact_positions=True, grounded_answers=True)) == "13a8982165555370"
    assert _digest(T.SceneTask()) == "13572ff9911cbc27"
    assert _digest(T.SceneTask(grid=4, compact_positions=True, grounded_answers=True)) == "96b8a72110b902f5"


def test_aligned_questions_give_the_shape_question_the_colour_layout() -> None:
    import random

    scene = T.Scene((("red", "circle", 0, 1), ("blue", "square", 1, 0)), 3)
    task = T.SceneTask(grid=3, compact_positions=True, grounded_answers=True, aligned_questions=True)
    default = T.SceneTask(grid=3, compact_positions=True, grounded_answers=True)
    for seed in range(20):
        cq, ca, _ = task.question(random.Random(seed), scene, "color")
        sq, sa, meta = task.question(random.Random(seed), scene, "shape")
        dq, da, _ = default.question(random.Random(seed), scene, "shape")
        assert cq.split()[:2] == ["what", "color"] and sq.split()[:2] == ["what", "shape"]
        assert cq.split()[2:] == sq.split()[2:]  # the same words after the attribute: one layout
        assert sa == da and dq == sq.replace(" the object", "")  # only the question's wording changes
        assert task.check_answer(scene, sq, sa, {"type": "shape", **meta})
        wrong = sa.rpartition(" ")[0] + (" square" if sa.endswith("circle") else " circle")
        assert not task.check_answer(scene, sq, wrong, {"type": "shape", **meta})


def test_object_tokens_name_the_object_with_one_token_in_position_and_existence() -> None:
    from tokinteract.mllm import build_word_tokenizer

    task = T.SceneTask(grid=4, compact_positions=True, grounded_answers=True, object_tokens=True)
    plain = T.SceneTask(grid=4, compact_positions=True, grounded_answers=True)
    tok = build_word_tokenizer(task.vocabulary())
    assert len(task.vocabulary()) == len(plain.vocabulary()) + len(T.COLORS) * len(T.SHAPES)
    samples, worlds = T.make_samples(task, 300, seed=6)
    ref, _ = T.make_samples(plain, 300, seed=6)  # the same draws: only the object's name differs
    seen = Counter()
    for s, w, r in zip(samples, worlds, ref):
        q, a = _qa(s)
        rq, ra = _qa(r)
        t = s["meta"]["type"]
        assert s["meta"] == r["meta"] and task.check_answer(w, q, a, s["meta"])
        assert "<unk>" not in tok.tokenize(q + " " + a)
        if t in ("position", "exist"):
            seen[t] += 1
            obj = s["meta"]["object"] if t == "position" else s["meta"]["probe"]
            name = obj.replace(" ", "_")
            assert (q, a) == (rq.replace(obj, name), ra.replace(obj, name)) and name in tok.tokenize(q)
            assert a.startswith(name + " ") and not task.check_answer(w, q, ra, s["meta"])  # "red circle" key: wrong
            other = next(f"{c}_{sh}" for c in T.COLORS for sh in T.SHAPES if f"{c}_{sh}" != name)
            assert not task.check_answer(w, q, a.replace(name, other, 1), s["meta"])  # another object's key
        else:  # every other question and the long answers keep their words
            assert (q, a) == (rq, ra)
    assert seen["position"] > 20 and seen["exist"] > 20


@pytest.mark.parametrize("grounded", [True, False])
def test_exist_cells_name_the_probed_objects_cell_or_none(grounded: bool) -> None:
    task = T.SceneTask(grid=4, compact_positions=True, grounded_answers=grounded, exist_cells=True)
    plain = T.SceneTask(grid=4, compact_positions=True, grounded_answers=grounded)
    kinds = ("color", "position", "exist", "list_color")
    samples, worlds = T.make_samples(task, 300, seed=6, question_types=kinds)
    ref, _ = T.make_samples(plain, 300, seed=6, question_types=kinds)  # the same draws: only existence differs
    answers = Counter()
    for s, w, r in zip(samples, worlds, ref):
        q, a = _qa(s)
        rq, ra = _qa(r)
        assert s["meta"] == r["meta"] and q == rq and task.check_answer(w, q, a, s["meta"])
        if s["meta"]["type"] != "exist":
            assert a == ra
            continue
        c, sh = s["meta"]["probe"].split()
        where = [(o[2], o[3]) for o in w.objects if (o[0], o[1]) == (c, sh)]
        cell = T._pos(*where[0], True) if where else "none"
        answers[s["meta"]["answer"]] += 1
        assert a == ra.replace(s["meta"]["answer"], f"{cell} {s['meta']['answer']}")  # "... r2c3 yes" / "... none no"
        assert s["meta"]["answer"] == ("yes" if where else "no") and not task.check_answer(w, q, ra, s["meta"])
        other = "r1c1" if cell != "r1c1" else "r4c4"
        for wrong in (a.replace(cell, other), a.replace(cell, "none" if where else other),
                      a.rpartition(" ")[0] + (" no" if where else " yes")):  # another cell, or the wrong verdict
            assert not task.check_answer(w, q, wrong, s["meta"]), wrong
    assert answers["yes"] > 20 and answers["no"] > 20


def test_describe_cells_walks_every_cell_with_the_object_or_none() -> None:
    task = T.SceneTask(grid=4, compact_positions=True, grounded_answers=True, describe_cells=True)
    plain = T.SceneTask(grid=4, compact_positions=True, grounded_answers=True)
    samples, worlds = T.make_samples(task, 120, seed=9, question_types=("describe", "color", "list_color"))
    ref, _ = T.make_samples(plain, 120, seed=9, question_types=("describe", "color", "list_color"))
    n = 0
    for s, w, r in zip(samples, worlds, ref):
        q, a = _qa(s)
        rq, ra = _qa(r)
        assert q == rq and task.check_answer(w, q, a, s["meta"])
        if s["meta"]["type"] != "describe":
            assert a == ra  # only describe changes
            continue
        n += 1
        parts = a[:-2].split(" , ")
        assert len(parts) == 16 and a.endswith(" .")
        for i, part in enumerate(parts):
            r_, k = divmod(i, 4)
            hit = w.at(r_, k)
            assert part == f"r{r_ + 1}c{k + 1} " + (f"{hit[0]} {hit[1]}" if hit else "none")
        assert [p for p in parts if not p.endswith(" none")] == [f"r{o[2] + 1}c{o[3] + 1} {o[0]} {o[1]}"
                                                                  for o in w.objects]  # every object, reading order
        assert not task.check_answer(w, q, ra, s["meta"])  # the sparse list is not this task's answer
        wrong = a.replace(" none", " red circle", 1) if " none" in a else a.replace("r1c1 ", "r1c1 x", 1)
        assert not task.check_answer(w, q, wrong, s["meta"])
    assert n > 20
    with pytest.raises(ValueError, match="compact_positions"):
        T.SceneTask(grid=4, describe_cells=True)


@pytest.mark.parametrize("grounded", [False, True])
def test_row_sum_answers_parse_back_and_keep_the_default_vocabulary(grounded: bool) -> None:
    """``row_sum`` (opt-in): the sum of a named row, grounded as each cell's digit then the running sum; every
    reference answer checks against its board, a changed one does not, every word is in the vocabulary, and
    the default task's vocabulary (so its tokenizer and data) is unchanged, the new sums appended after it."""
    kw = dict(compact_positions=grounded, grounded_answers=grounded)
    task = T.DigitTask(question_types=T.DigitTask.ALL_TYPES, **kw)
    default = T.DigitTask(**kw)
    assert "row_sum" not in default.question_types
    assert task.vocabulary()[: len(default.vocabulary())] == default.vocabulary()
    assert set(task.vocabulary()) - set(default.vocabulary()) == set(T.ROW_SUM_WORDS)
    samples, boards = T.make_samples(task, 300, seed=5, question_types=("row_sum",))
    vocab, sums = set(task.vocabulary()), set()
    for sample, board in zip(samples, boards):
        q, a = _qa(sample)
        r = sample["meta"]["row"]
        row = [board.digit(r, c) for c in range(task.grid)]
        assert a.split()[-1] == str(sum(row)) and task.check_answer(board, q, a, sample["meta"])
        if grounded:  # cell, digit, then the running sum from the second cell on
            w = a.split()
            assert w[:2] == [f"r{r + 1}c1", str(row[0])]
            assert w[2:5] == [f"r{r + 1}c2", str(row[1]), str(row[0] + row[1])]
        wrong = a.rsplit(" ", 1)[0] + f" {sum(row) + 1}" if " " in a else str(sum(row) + 1)
        assert not task.check_answer(board, q, wrong, sample["meta"])
        assert set(q.split()) | set(a.split()) <= vocab
        sums.add(sum(row))
    assert max(sums) > 18  # the appended words are used
    with pytest.raises(ValueError, match="not a row_sum question"):
        task.check_answer(boards[0], "what is the sum of row nine ?", "1", {"type": "row_sum"})
