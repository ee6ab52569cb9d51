"""A seeded synthetic visual-QA task: coloured shapes on a grid, LLaVA-format JSON + PNG.

Every image is a ``grid x grid`` board with 1..``max_objects`` objects, each a distinct
shape (so "the circle" names one object) of one colour in its own cell. Questions (one
per sample, or several turns with ``turns > 1``) are drawn from five types, recorded in
``sample["meta"]["type"]``:

* ``color``: "what color is the circle ?" -> "red"
* ``position``: "where is the circle ?" -> "top left"
* ``count``: "how many objects are there ?" / "how many red objects are there ?" -> "two"
* ``exist`` (POPE-style): "is there a blue square in the image ?" -> "yes" / "no", with
  half of the probes about absent objects (``meta["answer"]``, ``meta["probe"]`` say which)
* ``describe``: "describe the image ." -> "a red circle at top left , a blue square at center ."
  (objects in reading order: row by row, left to right)

Everything is a pure function of ``seed`` (``random.Random``; PIL drawing is
deterministic), and the test split never repeats a training scene. :func:`vocabulary`
lists every word the questions and answers can use, for
:func:`tokinteract.mllm.tokenizer.build_word_tokenizer`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "COLORS",
    "QUESTION_TYPES",
    "SHAPES",
    "Scene",
    "SyntheticConfig",
    "generate_dataset",
    "draw_shape",
    "make_samples",
    "render_scene",
    "vocabulary",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
QUESTION_TYPES = ("color", "position", "count", "exist", "describe")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_ROWS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COLS = {2: ("left", "right"), 3: ("left", "center", "right")}
_BACKGROUND = (20, 20, 20)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generator.

    Attributes:
        image_size: side of the square PNG in pixels.
        grid: 2 or 3 cells per side.
        max_objects: at most this many objects per image (<= number of shapes and cells).
        question_types: which question types to draw from (uniformly).
        turns: question/answer turns per sample (multi-turn when > 1).
    """

    image_size: int = 32
    grid: int = 2
    max_objects: int = 3
    question_types: tuple[str, ...] = QUESTION_TYPES
    turns: int = 1

    def __post_init__(self) -> None:
        if self.grid not in _ROWS:
            raise ValueError(f"grid must be one of {sorted(_ROWS)}, got {self.grid!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8 * self.grid:
            raise ValueError(f"image_size must be an int >= {8 * self.grid} for grid={self.grid}, got {self.image_size!r}")
        cap = min(len(SHAPES), self.grid * self.grid)
        if isinstance(self.max_objects, bool) or not isinstance(self.max_objects, int) or not 1 <= self.max_objects <= cap:
            raise ValueError(f"max_objects must be an int in [1, {cap}], got {self.max_objects!r}")
        bad = [q for q in self.question_types if q not in QUESTION_TYPES]
        if bad or not self.question_types:
            raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {self.question_types!r}")
        if isinstance(self.turns, bool) or not isinstance(self.turns, int) or self.turns < 1:
            raise ValueError(f"turns must be an int >= 1, got {self.turns!r}")


@dataclass(frozen=True)
class Scene:
    """Objects as ``(shape, colour, row, col)`` tuples, sorted in reading order.

    Attributes:
        objects: the ``(shape, colour, row, col)`` tuples.
        grid: the image is a ``grid x grid`` board of cells.
    """

    objects: tuple[tuple[str, str, int, int], ...]
    grid: int

    def key(self) -> str:
        return ";".join(f"{s},{c},{r},{k}" for s, c, r, k in self.objects)

    def where(self, row: int, col: int) -> str:
        return f"{_ROWS[self.grid][row]} {_COLS[self.grid][col]}"


def vocabulary(grid: int = 2) -> list[str]:
    """Every word a question or answer can contain (for the word-level tokenizer)."""
    words = (
        "what color is the where how many objects are there in image describe a at yes no "
        "? . ,"
    ).split()
    words += list(COLORS) + list(SHAPES) + list(NUMBERS)
    for g in (grid,) if grid in _ROWS else tuple(_ROWS):
        words += list(_ROWS[g]) + list(_COLS[g])
    return list(dict.fromkeys(words))


def _random_scene(rng: random.Random, cfg: SyntheticConfig) -> Scene:
    n = rng.randint(1, cfg.max_objects)
    shapes = rng.sample(SHAPES, n)
    cells = rng.sample(range(cfg.grid * cfg.grid), n)
    objs = [(s, rng.choice(list(COLORS)), c // cfg.grid, c % cfg.grid) for s, c in zip(shapes, cells)]
    return Scene(tuple(sorted(objs, key=lambda o: (o[2], o[3]))), cfg.grid)


def draw_shape(draw: Any, shape: str, box: tuple[int | float, ...], rgb: tuple[int, int, int]) -> None:
    """Fill one of :data:`SHAPES` (circle, square, triangle pointing up, cross of thirds) into
    ``box = (x0, y0, x1, y1)`` on a ``PIL.ImageDraw.Draw``; another name is a ``ValueError``."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)
    elif shape == "cross":
        w = (x1 - x0) / 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=rgb)
        draw.rectangle((x0, y0 + w, x1, y1 - w), fill=rgb)
    else:
        raise ValueError(f"shape must be one of circle, square, triangle, cross, got {shape!r}")


def render_scene(scene: Scene, image_size: int):  # -> PIL.Image.Image
    """Draw ``scene`` as an RGB PIL image (dark background, one shape per cell)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (image_size, image_size), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = image_size / scene.grid
    for shape, colour, row, col in scene.objects:
        x0, y0 = col * cell, row * cell
        m = cell * 0.15
        box = (x0 + m, y0 + m, x0 + cell - m, y0 + cell - m)
        draw_shape(draw, shape, box, COLORS[colour])
    return img


def _question(rng: random.Random, scene: Scene, qtype: str) -> tuple[str, str, dict[str, Any]]:
    objs = scene.objects
    if qtype == "color":
        s, c, _, _ = rng.choice(objs)
        return f"what color is the {s} ?", c, {"object": s}
    if qtype == "position":
        s, _, r, k = rng.choice(objs)
        return f"where is the {s} ?", scene.where(r, k), {"object": s}
    if qtype == "count":
        if rng.random() < 0.5:
            return "how many objects are there ?", NUMBERS[len(objs)], {}
        c = rng.choice(list(COLORS))
        n = sum(o[1] == c for o in objs)
        return f"how many {c} objects are there ?", NUMBERS[n], {"color": c}
    if qtype == "exist":
        present = {(s, c) for s, c, _, _ in objs}
        if rng.random() < 0.5:
            s, c, _, _ = rng.choice(objs)
            answer = "yes"
        else:
            absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
            s, c = rng.choice(absent)
            answer = "no"
        return f"is there a {c} {s} in the image ?", answer, {"probe": f"{c} {s}", "answer": answer}
    desc = " , ".join(f"a {c} {s} at {scene.where(r, k)}" for s, c, r, k in objs) + " ."
    return "describe the image .", desc, {}


def make_samples(
    n: int, cfg: SyntheticConfig, *, seed: int, exclude: set[str] | None = None, prefix: str = "s"
) -> tuple[list[dict[str, Any]], list[Scene]]:
    """``n`` LLaVA-format samples (without writing images) and their scenes.

    Scenes whose :meth:`Scene.key` is in ``exclude`` are redrawn (held-out splits), and so
    are repeats within this call while unseen scenes remain likely. Image paths are
    ``images/{prefix}{i:05d}.png``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    exclude = set(exclude or ())
    samples, scenes = [], []
    for i in range(n):
        for attempt in range(1000):
            scene = _random_scene(rng, cfg)
            if scene.key() not in exclude:
                break
        else:
            raise ValueError(
                f"could not draw a scene outside the {len(exclude)} excluded ones after 1000 tries; "
                "raise grid or max_objects, or ask for fewer samples"
            )
        exclude.add(scene.key())
        conv, metas = [], []
        for turn in range(cfg.turns):
            qtype = rng.choice(cfg.question_types)
            q, a, meta = _question(rng, scene, qtype)
            metas.append({"type": qtype, **meta})
            conv.append({"from": "human", "value": ("<image>\n" + q) if turn == 0 else q})
            conv.append({"from": "gpt", "value": a})
        sample = {
            "id": f"{prefix}{i:05d}",
            "image": f"images/{prefix}{i:05d}.png",
            "conversations": conv,
            "meta": metas[0] if cfg.turns == 1 else {"type": "multi", "turns": metas},
        }
        samples.append(sample)
        scenes.append(scene)
    return samples, scenes


def generate_dataset(
    out_dir: str | Path,
    *,
    n_train: int = 256,
    n_test: int = 64,
    n_captions: int = 0,
    seed: int = 0,
    config: SyntheticConfig | None = None,
) -> dict[str, Path]:
    """Write ``train.json``, ``test.json`` (held out: no training scene) and, if
    ``n_captions > 0``, ``captions.json`` (describe-only, for stage-1 pre-training) plus
    ``images/*.png`` under ``out_dir``.

    Returns:
        ``{"train": path, "test": path[, "captions": path], "image_folder": path}``.
    """
    cfg = config or SyntheticConfig()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    train, train_scenes = make_samples(n_train, cfg, seed=seed, prefix="train")
    seen = {s.key() for s in train_scenes}
    test, test_scenes = make_samples(n_test, cfg, seed=seed + 1_000_003, exclude=seen, prefix="test")
    splits: dict[str, tuple[list[dict[str, Any]], list[Scene]]] = {"train": (train, train_scenes), "test": (test, test_scenes)}
    if n_captions:
        cap_cfg = SyntheticConfig(cfg.image_size, cfg.grid, cfg.max_objects, ("describe",), 1)
        splits["captions"] = make_samples(n_captions, cap_cfg, seed=seed + 2_000_003, prefix="cap")
    paths: dict[str, Path] = {}
    for name, (samples, scenes) in splits.items():
        for sample, scene in zip(samples, scenes):
            render_scene(scene, cfg.image_size).save(out / sample["image"], format="PNG")
        path = out / f"{name}.json"
        path.write_text(json.dumps(samples, indent=1))
        paths[name] = path
    paths["image_folder"] = out
    return paths
