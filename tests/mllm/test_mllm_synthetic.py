from __future__ import annotations

import json

import pytest
from PIL import Image

from tokinteract.mllm.synthetic import COLORS, NUMBERS, SyntheticConfig, generate_dataset, make_samples



def test_same_seed_same_bytes_other_seed_differs(tmp_path) -> None:
    cfg = SyntheticConfig(turns=2)
    a = generate_dataset(tmp_path / "a", n_train=6, n_test=3, seed=7, config=cfg)
    b = generate_dataset(tmp_path / "b", n_train=6, n_test=3, seed=7, config=cfg)
    c = generate_dataset(tmp_path / "c", n_train=6, n_test=3, seed=8, config=cfg)
    assert a["train"].read_text() == b["train"].read_text()
    for s in json.loads(a["train"].read_text()):
        assert (tmp_path / "a" / s["image"]).read_bytes() == (tmp_path / "b" / s["image"]).read_bytes()
    assert a["train"].read_text() != c["train"].read_text()


def test_test_split_never_repeats_a_training_scene() -> None:
    cfg = SyntheticConfig()
    _, train = make_samples(60, cfg, seed=0)
    keys = {s.key() for s in train}
    _, test = make_samples(30, cfg, seed=1, exclude=keys)
    assert not keys & {s.key() for s in test}
    assert len({s.key() for s in test}) == 30


def test_answers_match_the_pixels_and_the_scene() -> None:
    cfg = SyntheticConfig(image_size=48, grid=3, max_objects=4)
    samples, scenes = make_samples(80, cfg, seed=5)
    from tokinteract.mllm.synthetic import render_scene

    seen_types = set()
    for sample, scene in zip(samples, scenes):
        img = render_scene(scene, cfg.image_size)
        cell = cfg.image_size / cfg.grid
        for shape, colour, r, c in scene.objects:  # every object is drawn in its cell, in its colour
            centre = img.getpixel((int((c + 0.5) * cell), int((r + 0.6) * cell)))
            assert centre == COLORS[colour], (shape, colour, centre)
        q = sample["conversations"][0]["value"]
        a = sample["conversations"][1]["value"]
        meta = sample["meta"]
        seen_types.add(meta["type"])
        objs = {s: (col, r, k) for s, col, r, k in scene.objects}
        if meta["type"] == "color":
            assert a == objs[meta["object"]][0]
        elif meta["type"] == "position":
            _, r, k = objs[meta["object"]]
            assert a == scene.where(r, k)
        elif meta["type"] == "count":
            want = len(scene.objects) if "color" not in meta else sum(o[1] == meta["color"] for o in scene.objects)
            assert a == NUMBERS[want]
        elif meta["type"] == "exist":
            colour, shape = meta["probe"].split()
            present = (shape, colour) in {(s, col) for s, col, _, _ in scene.objects}
            assert a == ("yes" if present else "no")
        else:
            assert meta["type"] == "describe"
            for s, col, r, k in scene.objects:
                assert f"a {col} {s} at {scene.where(r, k)}" in a
            assert a.count(" at ") == len(scene.objects)
        assert q.startswith("<image>\n")
    assert seen_types == {"color", "position", "count", "exist", "describe"}


def test_pope_probes_include_absent_objects() -> None:
    samples, _ = make_samples(60, SyntheticConfig(question_types=("exist",)), seed=2)
    answers = [s["meta"]["answer"] for s in samples]
    assert 15 < answers.count("no") < 45


def test_captions_split_and_files(tmp_path) -> None:
    out = generate_dataset(tmp_path, n_train=3, n_test=2, n_captions=2, seed=0)
    caps = json.loads(out["captions"].read_text())
    assert all(c["meta"]["type"] == "describe" for c in caps)
    for s in caps:
        with Image.open(tmp_path / s["image"]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"


def test_tokenizer_covers_every_generated_word(tok) -> None:
    samples, _ = make_samples(50, SyntheticConfig(turns=3), seed=9)
    for s in samples:
        for turn in s["conversations"]:
            ids = tok(turn["value"].replace("<image>", ""), add_special_tokens=False).input_ids
            assert tok.unk_token_id not in ids, turn["value"]


@pytest.mark.parametrize("kw", [dict(grid=4), dict(max_objects=0), dict(question_types=("nope",)), dict(turns=0)])
def test_bad_config_is_refused(kw) -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(**kw)


def test_draw_shape_refuses_an_unknown_shape() -> None:
    from PIL import Image, ImageDraw

    from tokinteract.mllm.synthetic import draw_shape

    draw = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="shape must be one of circle, square, triangle, cross, got 'hexagon'"):
        draw_shape(draw, "hexagon", (1, 1, 6, 6), (255, 0, 0))
