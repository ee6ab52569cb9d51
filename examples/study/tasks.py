"""The study's tasks (issue 15): seeded generators written as LLaVA JSON + PNG. Not library code.

Two tasks share one interface (:class:`SceneTask`, :class:`DigitTask`) and one writer
(:func:`write_task`):

* ``scenes``: coloured shapes on a ``grid x grid`` board (3x3 or 4x4), ``min_objects`` ..
  ``max_objects`` objects (each (colour, shape) pair at most once per image, so "the red
  circle" names one object). Colours and shapes are drawn with unequal frequencies, so
  some objects are *popular* (POPE). Question types:

  - short: ``color`` ("what color is the object at row one column two ?" -> "red"),
    ``shape`` ("what shape is at row ... ?" -> "circle"), ``position`` ("where is the red
    circle ?" -> "row one column two"), ``count`` ("how many red objects are there ?" /
    "how many objects are there ?" -> "three"), ``exist`` ("is there a red circle in the
    image ?" -> "yes" / "no"; POPE splits in ``meta["pope"]``: ``random`` (any absent pair),
    ``popular`` (the most frequent absent pair of the generator's distribution) and
    ``adversarial`` (an absent pair whose colour and shape are both in the image, on
    different objects: a binding error), half of the probes present);
  - long, with branching: ``describe`` ("a red circle at row one column two , a ... ."
    every object in reading order, 9 tokens per object), ``list_color`` ("list the red
    objects ." -> "a red circle at row one column two , ... ." or "none ."),
    ``count_colors`` ("count the objects of each color ." -> "red : two , blue : one ."
    over the colours present, in the fixed colour order).

* ``digits``: real handwritten digits shipped inside scikit-learn
  (``sklearn.datasets.load_digits``: 1,797 8x8 images, no download) arranged in a full
  ``grid x grid`` board; the test split draws its digits from a held-out block of that
  data set (other handwriting). Question types: ``read`` ("read the digits ." -> "row one
  : 3 1 4 1 , row two : ... ." long, OCR-like as TextVQA), ``digit_at`` ("what digit is at
  row two column three ?" -> "7"), ``sum`` (of the digits at two positions -> "12"),
  ``compare`` ("compare the digit at P with the digit at Q ." -> "larger" / "smaller" /
  "equal").

Every position is "row R column C" with number words (row one = top, column one = left), or
one token ``r2c3`` with ``compact_positions``. With ``grounded_answers`` a short answer restates
its key first (``"r2c3 red"``, ``"red circle r2c3"``; see :class:`SceneTask`): the token that
predicts the value then holds the key, so one attention hop to the matching visual token answers.
The question follows the image (as LLaVA), or with ``question_first`` precedes it (``True``) or both
(``"both"``: ``"q\n<image>\nq"``).
Everything is a pure function of ``seed`` (``random.Random``, deterministic PIL drawing);
test worlds never repeat a training world. :meth:`check_answer` parses an answer text
back and checks it against the world (independently of the generator's own formatting
code), and :meth:`cell_labels` gives per-cell classes for pre-training the vision tower
(:mod:`vision_pretrain`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokinteract.mllm.synthetic import COLORS, NUMBERS, draw_shape  # the earlier shapes task's colours, words, shapes

__all__ = [
    "COLORS",
    "DIGIT_WORDS",
    "DigitTask",
    "NUMBERS",
    "QUESTION_FIRST",
    "SHAPES",
    "SceneTask",
    "TASKS",
    "make_task",
    "user_turn",
    "write_task",
]

#: relative frequencies of the colours and shapes (unequal: POPE's "popular" objects exist)
COLOR_WEIGHTS = (0.30, 0.25, 0.20, 0.15, 0.10)
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
SHAPE_WEIGHTS = (0.25, 0.20, 0.18, 0.15, 0.12, 0.10)
DIGIT_WORDS = tuple(str(i) for i in range(19))  # digits 0-9 and sums up to 18, one token each
ROW_SUM_WORDS = tuple(str(i) for i in range(19, 37))  # the running sums of a 4-digit row beyond 18 (row_sum only)
_BACKGROUND = (20, 20, 20)
_GRIDS = (3, 4)


def _pos(row: int, col: int, compact: bool = False) -> str:
    """``"row two column three"``, or with ``compact`` the one-token cell name ``"r2c3"``."""
    if compact:
        return f"r{row + 1}c{col + 1}"
    return f"row {NUMBERS[row + 1]} column {NUMBERS[col + 1]}"


def _cell_words(grid: int) -> list[str]:
    return [_pos(r, c, True) for r in range(grid) for c in range(grid)]


#: a position in either format (``_pos``)
_POS = r"row \w+ column \w+|r\d+c\d+"
_POS_RE = re.compile(r"row (\w+) column (\w+)")
_CELL_RE = re.compile(r"r(\d+)c(\d+)")
#: an object's name in a question: ``"red circle"``, or one token ``"red_circle"`` (``SceneTask.object_tokens``)
_OBJ = r"[a-z]+[ _][a-z]+"


def _parse_pos(text: str) -> tuple[int, int]:
    m = _CELL_RE.fullmatch(text.strip())
    if m is not None:
        return int(m.group(1)) - 1, int(m.group(2)) - 1
    m = _POS_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a position: {text!r}")
    return NUMBERS.index(m.group(1)) - 1, NUMBERS.index(m.group(2)) - 1


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int in {rng}, got {value!r}")


def _check_geometry(grid: int, image_size: int, min_cell: int) -> None:
    if grid not in _GRIDS:
        raise ValueError(f"grid must be one of {_GRIDS}, got {grid!r}")
    _check_int("image_size", image_size, min_cell * grid)
    if image_size % grid:
        raise ValueError(f"image_size must be a multiple of grid={grid}, got {image_size!r}")


def _check_types(name: str, given: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    given = tuple(given)
    bad = [q for q in given if q not in allowed]
    if bad or not given:
        raise ValueError(f"{name} must be a non-empty subset of {tuple(allowed)}, got {given!r}")
    return given


def _check_weights(weights: Sequence[float], types: Sequence[str]) -> tuple[float, ...]:
    weights = tuple(weights)
    if weights and (len(weights) != len(types) or any(isinstance(w, bool) or not isinstance(w, (int, float))
                                                      or not w > 0 for w in weights)):
        raise ValueError(f"question_weights must be empty or one positive number per question type "
                         f"({len(types)}: {tuple(types)}), got {weights!r}")
    return tuple(float(w) for w in weights)


#: the values of ``question_first`` (``SceneTask``): after the image, before it, before and after it
QUESTION_FIRST = (False, True, "both")


def _check_question_first(value: Any) -> None:
    if not any(value is v if isinstance(v, bool) else value == v for v in QUESTION_FIRST):
        raise ValueError(f"question_first must be one of {QUESTION_FIRST}, got {value!r}")


def user_turn(question: str, question_first: bool | str) -> str:
    """The first user turn: the question after ``<image>`` (``False``), before it (``True``) or both (``"both"``)."""
    if question_first == "both":
        return f"{question}\n<image>\n{question}"
    return f"{question}\n<image>" if question_first else f"<image>\n{question}"


def _split_key(qtype: str, question: str, answer: str) -> tuple[str | None, str]:
    """A grounded short answer (``SceneTask.grounded_answers``) split into ``(key, value)``; the
    key must be the one the question names (its cell, its object, its colour), else ``(None, answer)``.
    ``"how many objects are there ?"`` has no key: its answer is returned as is with key ``""``."""
    if qtype in ("color", "shape"):
        m = re.search(rf"at ({_POS}) \?$", question)
        want = m.group(1) if m else None
    elif qtype == "position":
        m = re.fullmatch(rf"where is the ({_OBJ}) \?", question)
        want = m.group(1) if m else None
    elif qtype == "exist":
        m = re.fullmatch(rf"is there a ({_OBJ}) in the image \?", question)
        want = m.group(1) if m else None
    else:  # count
        m = re.fullmatch(r"how many (?:(\w+) )?objects are there \?", question)
        if m is None:
            return None, answer
        if m.group(1) is None:
            return "", answer
        want = m.group(1)
    if want is None or not answer.startswith(want + " "):
        return None, answer
    return want, answer[len(want) + 1:]


# --------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Scene:
    """Objects as ``(colour, shape, row, col)`` tuples in reading order (row by row, left to right)."""

    objects: tuple[tuple[str, str, int, int], ...]
    grid: int

    def key(self) -> str:
        return ";".join(f"{c},{s},{r},{k}" for c, s, r, k in self.objects)

    def at(self, row: int, col: int) -> tuple[str, str] | None:
        return next(((c, s) for c, s, r, k in self.objects if (r, k) == (row, col)), None)


@dataclass(frozen=True)
class SceneTask:
    """Coloured shapes on a grid (see the module docstring).

    Attributes:
        image_size: side of the square PNG in pixels (a multiple of ``grid``, >= 12 px per cell).
        grid: 3 or 4 cells per side.
        min_objects, max_objects: objects per image (1 <= min <= max <= grid**2).
        question_types: drawn per question (uniformly in the test split).
        question_weights: relative frequencies of ``question_types`` in the *training* split
            (empty: uniform); the test split stays uniform.
        caption_type: the question type of the stage-1 caption split (a long answer).
        compact_positions: a position is one token ``"r2c3"`` instead of ``"row two column three"``.
        grounded_answers: a short answer restates its key first (:meth:`question`): colour or shape
            at a cell -> ``"r2c3 red"``, position of an object -> ``"red circle r2c3"``, existence
            -> ``"red circle no"``, count of a colour -> ``"red three"``; the long answers are
            grounded already. Why: the token that predicts the value then has the key (the cell
            or the object) as its own input, so one attention hop from it to the matching visual
            token answers, where a bare answer needs two (read which key the question names,
            then look it up). Exact match scores the whole answer, the key included.
        question_first: where the question sits around the image in the (first) user turn: ``False``
            (default, as LLaVA) after it, ``"<image>\nq"``; ``True`` before it, ``"q\n<image>"``, so that
            visual tokens can attend to it (causal attention); ``"both"`` before and after it,
            ``"q\n<image>\nq"``: the visual tokens see the question, and the copy after the image keeps
            instruction -> vision attention rows of today's kind (the copy before attends to no visual
            token). Why ``"both"``: a visual token that sees the named object can mark itself in its
            own residual stream, so finding it is a one-hop lookup of a flag instead of a conjunctive
            search (position, existence).
        aligned_questions: the shape question takes the colour question's layout, ``"what shape is the
            object at r2c3 ?"`` (default ``"what shape is at r2c3 ?"``): both lookups then sit at the
            same distance from every visual token, differing only in the attribute word. Why: a lookup
            that a model learns as "attend at this relative offset" (RoPE) serves both types only if
            their layouts agree.
        object_tokens: position and existence questions name the object with one token
            ``"red_circle"`` (question and grounded key: ``"where is the red_circle ?"`` ->
            ``"red_circle r2c3"``; ``"is there a red_circle in the image ?"`` -> ``"red_circle no"``).
            Why: the token that predicts the cell (or yes/no) then holds colour *and* shape itself, so one
            attention hop matches both, where ``"red circle"`` needs the colour carried over from the
            previous token first. The long answers keep ``"a red circle at r2c3"``.
        exist_cells: an existence answer names the probed object's cell, or ``none``, before yes / no:
            ``"r2c3 yes"`` / ``"none no"`` (with ``grounded_answers``: ``"red circle r2c3 yes"``). Why: the
            cell is the position question's answer, so existence reuses its object -> cell search (16
            cells and ``none`` as targets) instead of learning a bare yes / no from one bit per sample.
        describe_cells: ``describe`` walks every cell in reading order, the object or ``none`` at each:
            ``"r1c1 red circle , r1c2 none , ... ."`` (``compact_positions`` required), instead of the
            occupied cells only (``"a red circle at r1c1 , ... ."``). Still every object in reading order
            with colour, shape and position, and a branch at each cell. Why: token by token it is the
            cell -> attribute lookup of the short questions (as digits' ``read``), where the sparse list
            asks for a search of the next occupied cell first; a small model trained on the sparse
            one settles on the answer priors and never learns the lookup (calibration log, session 9).
    """

    image_size: int = 48
    grid: int = 3
    min_objects: int = 3
    max_objects: int = 8
    question_types: tuple[str, ...] = (
        "color", "shape", "position", "count", "exist", "describe", "list_color", "count_colors")
    caption_type: str = "describe"
    question_weights: tuple[float, ...] = ()
    compact_positions: bool = False
    grounded_answers: bool = False
    question_first: bool | str = False
    aligned_questions: bool = False
    object_tokens: bool = False
    exist_cells: bool = False
    describe_cells: bool = False

    name = "scenes"
    ALL_TYPES = ("color", "shape", "position", "count", "exist", "describe", "list_color", "count_colors")
    SHORT_TYPES = ("color", "shape", "position", "count", "exist")
    POPE_SPLITS = ("random", "popular", "adversarial")

    def __post_init__(self) -> None:
        _check_geometry(self.grid, self.image_size, 12)
        _check_int("max_objects", self.max_objects, 1, self.grid * self.grid)
        _check_int("min_objects", self.min_objects, 1, self.max_objects)
        object.__setattr__(self, "question_types", _check_types("question_types", self.question_types, self.ALL_TYPES))
        _check_types("caption_type", (self.caption_type,), self.ALL_TYPES)
        object.__setattr__(self, "question_weights", _check_weights(self.question_weights, self.question_types))
        _check_question_first(self.question_first)
        if self.describe_cells and not self.compact_positions:
            raise ValueError("describe_cells=True needs compact_positions=True (one token per cell), got "
                             "compact_positions=False")

    # ---------------------------------------------------------------- vocabulary, world, image
    def vocabulary(self) -> list[str]:
        words = ("what color is the object at shape where how many objects are there in image describe a "
                 "list count of each none row column yes no ? . , :").split()
        cells = _cell_words(self.grid) if self.compact_positions else []
        names = [self._name(c, s) for c in COLORS for s in SHAPES] if self.object_tokens else []
        return list(dict.fromkeys(words + list(COLORS) + list(SHAPES) + list(NUMBERS) + cells + names))

    def sample_world(self, rng: random.Random, split: str) -> Scene:  # noqa: ARG002 - one distribution for both splits
        n = rng.randint(self.min_objects, self.max_objects)
        cells = rng.sample(range(self.grid * self.grid), n)
        pairs: list[tuple[str, str]] = []
        while len(pairs) < n:
            c = rng.choices(list(COLORS), COLOR_WEIGHTS)[0]
            s = rng.choices(SHAPES, SHAPE_WEIGHTS)[0]
            if (c, s) not in pairs:
                pairs.append((c, s))
        objs = [(c, s, cell // self.grid, cell % self.grid) for (c, s), cell in zip(pairs, cells)]
        return Scene(tuple(sorted(objs, key=lambda o: (o[2], o[3]))), self.grid)

    def render(self, scene: Scene):  # -> PIL.Image.Image
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (self.image_size, self.image_size), _BACKGROUND)
        draw = ImageDraw.Draw(img)
        cell = self.image_size // self.grid
        for colour, shape, row, col in scene.objects:
            x0, y0 = col * cell, row * cell
            m = max(1, round(cell * 0.12))
            b = (x0 + m, y0 + m, x0 + cell - m - 1, y0 + cell - m - 1)
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            rgb = COLORS[colour]
            if shape == "diamond":
                draw.polygon([(cx, b[1]), (b[2], cy), (cx, b[3]), (b[0], cy)], fill=rgb)
            elif shape == "ring":
                draw.ellipse(b, outline=rgb, width=max(2, cell // 6))
            else:  # circle, square, triangle, cross: as the shapes task draws them
                draw_shape(draw, shape, b, rgb)
        return img

    def cell_labels(self, scene: Scene) -> dict[str, list[int]]:
        """Per cell (reading order): ``color`` and ``shape`` class, 0 = empty cell."""
        colour = [0] * (self.grid * self.grid)
        shape = [0] * (self.grid * self.grid)
        for c, s, r, k in scene.objects:
            colour[r * self.grid + k] = 1 + list(COLORS).index(c)
            shape[r * self.grid + k] = 1 + SHAPES.index(s)
        return {"color": colour, "shape": shape}

    def label_classes(self) -> dict[str, int]:
        return {"color": 1 + len(COLORS), "shape": 1 + len(SHAPES)}

    # ---------------------------------------------------------------- questions
    def _name(self, colour: str, shape: str) -> str:
        """How position and existence questions name an object: ``"red circle"``, or one token
        ``"red_circle"`` with ``object_tokens``."""
        return f"{colour}_{shape}" if self.object_tokens else f"{colour} {shape}"

    def _phrase(self, c: str, s: str, r: int, k: int) -> str:
        return f"a {c} {s} at {_pos(r, k, self.compact_positions)}"

    def question(self, rng: random.Random, scene: Scene, qtype: str) -> tuple[str, str, dict[str, Any]]:
        objs = scene.objects
        cp, g = self.compact_positions, self.grounded_answers
        if qtype in ("color", "shape"):
            c, s, r, k = rng.choice(objs)
            where = _pos(r, k, cp)
            value = c if qtype == "color" else s
            q = (f"what color is the object at {where} ?" if qtype == "color" else
                 f"what shape is the object at {where} ?" if self.aligned_questions else f"what shape is at {where} ?")
            return q, f"{where} {value}" if g else value, {"cell": [r, k]}
        if qtype == "position":
            c, s, r, k = rng.choice(objs)
            where, name = _pos(r, k, cp), self._name(c, s)
            return f"where is the {name} ?", f"{name} {where}" if g else where, {"object": f"{c} {s}"}
        if qtype == "count":
            if rng.random() < 0.3:
                return "how many objects are there ?", NUMBERS[len(objs)], {}
            c = rng.choice(list(COLORS))
            n = NUMBERS[sum(o[0] == c for o in objs)]
            return f"how many {c} objects are there ?", f"{c} {n}" if g else n, {"color": c}
        if qtype == "exist":
            split = rng.choice(self.POPE_SPLITS)
            if rng.random() < 0.5:
                c, s, _, _ = rng.choice(objs)
                answer = "yes"
            else:
                c, s = self._absent_probe(rng, scene, split)
                answer = "no"
            name = self._name(c, s)
            if self.exist_cells:  # the cell the probe is at, or none: position's search
                cell = next((_pos(r, k, cp) for oc, os, r, k in objs if (oc, os) == (c, s)), "none")
                answer = f"{cell} {answer}"
            return (f"is there a {name} in the image ?", f"{name} {answer}" if g else answer,
                    {"probe": f"{c} {s}", "answer": answer.rpartition(" ")[2], "pope": split})
        if qtype == "describe":
            return "describe the image .", self._describe(scene), {}
        if qtype == "list_color":
            present = sorted({o[0] for o in objs}, key=list(COLORS).index)
            c = rng.choice(present) if rng.random() < 0.85 else rng.choice(list(COLORS))
            sel = [o for o in objs if o[0] == c]
            ans = (" , ".join(self._phrase(*o) for o in sel) + " .") if sel else "none ."
            return f"list the {c} objects .", ans, {"color": c}
        # count_colors
        counts = [(c, sum(o[0] == c for o in objs)) for c in COLORS]
        return ("count the objects of each color .",
                " , ".join(f"{c} : {NUMBERS[n]}" for c, n in counts if n) + " .", {})

    def _describe(self, scene: Scene) -> str:
        """The ``describe`` answer: the occupied cells' phrases, or every cell with ``describe_cells``."""
        if not self.describe_cells:
            return " , ".join(self._phrase(*o) for o in scene.objects) + " ."
        cells = []
        for r in range(self.grid):
            for k in range(self.grid):
                hit = scene.at(r, k)
                cells.append(f"{_pos(r, k, True)} " + (f"{hit[0]} {hit[1]}" if hit else "none"))
        return " , ".join(cells) + " ."

    @staticmethod
    def _absent_probe(rng: random.Random, scene: Scene, split: str) -> tuple[str, str]:
        present = {(c, s) for c, s, _, _ in scene.objects}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        if split == "popular":
            weight = {(c, s): cw * sw for c, cw in zip(COLORS, COLOR_WEIGHTS) for s, sw in zip(SHAPES, SHAPE_WEIGHTS)}
            top = max(weight[p] for p in absent)
            return rng.choice([p for p in absent if weight[p] == top])
        if split == "adversarial":
            colours = {c for c, _ in present}
            shapes = {s for _, s in present}
            both = [p for p in absent if p[0] in colours and p[1] in shapes]
            one = [p for p in absent if p[0] in colours or p[1] in shapes]
            return rng.choice(both or one or absent)
        return rng.choice(absent)

    # ---------------------------------------------------------------- parsing answers back
    @staticmethod
    def parse_objects(text: str) -> list[tuple[str, str, int, int]]:
        """``"a red circle at row one column two , ... ."`` -> ``[(colour, shape, row, col), ...]``
        (``"none ."`` -> ``[]``). Raises ValueError on any other text."""
        body = text.strip()
        if not body.endswith(" ."):
            raise ValueError(f"an object list ends with ' .': {text!r}")
        body = body[:-2].strip()
        if body == "none":
            return []
        out = []
        for part in body.split(" , "):
            m = re.fullmatch(rf"a (\w+) (\w+) at ({_POS})", part)
            if m is None or m.group(1) not in COLORS or m.group(2) not in SHAPES:
                raise ValueError(f"not an object phrase: {part!r} in {text!r}")
            out.append((m.group(1), m.group(2), *_parse_pos(m.group(3))))
        return out

    def check_answer(self, scene: Scene, question: str, answer: str, meta: dict[str, Any]) -> bool:
        """Whether ``answer`` is right for ``question`` about ``scene`` (parsed back from the text)."""
        t = meta["type"]
        objs = list(scene.objects)
        if t in ("color", "shape", "position", "count", "exist") and self.grounded_answers:
            key, answer = _split_key(t, question, answer)
            if key is None:
                return False
        if t in ("color", "shape"):
            m = re.search(rf"at ({_POS}) \?$", question)
            hit = scene.at(*_parse_pos(m.group(1))) if m else None
            return hit is not None and answer == hit[0 if t == "color" else 1]
        if t == "position":
            c, s = re.fullmatch(r"where is the ([a-z]+)[ _]([a-z]+) \?", question).groups()
            try:
                where = _parse_pos(answer)
            except ValueError:
                return False
            return any((o[0], o[1]) == (c, s) and (o[2], o[3]) == where for o in objs)
        if t == "count":
            m = re.fullmatch(r"how many (?:(\w+) )?objects are there \?", question)
            c = m.group(1)
            return answer == NUMBERS[sum(1 for o in objs if c is None or o[0] == c)]
        if t == "exist":
            c, s = re.fullmatch(r"is there a ([a-z]+)[ _]([a-z]+) in the image \?", question).groups()
            where = next(((o[2], o[3]) for o in objs if (o[0], o[1]) == (c, s)), None)
            if self.exist_cells:  # "<cell> yes" at the object's cell, or "none no"
                cell, _, answer = answer.rpartition(" ")
                try:
                    if (None if cell == "none" else _parse_pos(cell)) != where:
                        return False
                except ValueError:
                    return False
            return answer == ("yes" if where is not None else "no")
        if t == "describe":
            if self.describe_cells:  # every cell in reading order: the one right text
                return answer == self._describe(scene)
            return self.parse_objects(answer) == objs  # every object, in reading order
        if t == "list_color":
            c = re.fullmatch(r"list the (\w+) objects \.", question).group(1)
            return self.parse_objects(answer) == [o for o in objs if o[0] == c]
        if t == "count_colors":
            parts = answer[:-2].split(" , ") if answer.endswith(" .") else [answer]
            got = [tuple(p.split(" : ")) for p in parts]
            want = [(c, NUMBERS[n]) for c in COLORS if (n := sum(o[0] == c for o in objs))]
            return got == want
        raise ValueError(f"unknown question type {t!r}")


# --------------------------------------------------------------------------- digits
@lru_cache(maxsize=1)
def _digits() -> tuple[Any, Any]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    return d.images, d.target


@dataclass(frozen=True)
class DigitBoard:
    """Indices into ``sklearn.datasets.load_digits()`` per cell (reading order) and their labels."""

    indices: tuple[int, ...]
    labels: tuple[int, ...]
    grid: int

    def key(self) -> str:
        return ",".join(map(str, self.indices))

    def digit(self, row: int, col: int) -> int:
        return self.labels[row * self.grid + col]


@dataclass(frozen=True)
class DigitTask:
    """Handwritten digits of scikit-learn arranged on a full grid (see the module docstring).

    Attributes:
        image_size: side of the PNG (a multiple of ``grid``; each 8x8 digit is resized to a cell).
        grid: 3 or 4 cells per side.
        question_types: drawn per question (uniformly in the test split).
        question_weights: relative frequencies of ``question_types`` in the *training* split
            (empty: uniform); the test split stays uniform.
        test_fraction: the last fraction of ``load_digits`` (other writers) only the test split uses.
        compact_positions: a position is one token ``"r2c3"`` instead of ``"row two column three"``.
        grounded_answers: a short answer reads every digit it uses next to its cell first:
            ``digit_at`` -> ``"r2c3 7"``, ``sum`` -> ``"r1c2 3 r4c1 4 7"``, ``row_sum`` -> each digit of the
            row after its cell, then the running sum from the second on: ``"r2c1 3 r2c2 5 8 r2c3 0 8 r2c4 7 15"``
            (without it: ``"15"``), ``compare`` ->
            ``"r1c2 3 r4c1 4 smaller"`` (one attention hop per lookup, as ``SceneTask``'s).
        question_first: where the question sits around the image (``SceneTask.question_first``: ``False``
            after it, ``True`` before it, ``"both"`` before and after it).
    """

    image_size: int = 48
    grid: int = 4
    question_types: tuple[str, ...] = ("read", "digit_at", "sum", "compare")
    caption_type: str = "read"
    test_fraction: float = 0.2
    question_weights: tuple[float, ...] = ()
    compact_positions: bool = False
    grounded_answers: bool = False
    question_first: bool | str = False

    name = "digits"
    #: ``row_sum`` (the sum of a named row: ``grid`` lookups and ``grid - 1`` additions, a reasoning type where
    #: the language model's size matters) is opt-in: the default types, vocabulary and data are unchanged
    ALL_TYPES = ("read", "digit_at", "sum", "compare", "row_sum")
    SHORT_TYPES = ("digit_at", "sum", "compare")

    def __post_init__(self) -> None:
        _check_geometry(self.grid, self.image_size, 8)
        object.__setattr__(self, "question_types", _check_types("question_types", self.question_types, self.ALL_TYPES))
        _check_types("caption_type", (self.caption_type,), self.ALL_TYPES)
        object.__setattr__(self, "question_weights", _check_weights(self.question_weights, self.question_types))
        if not isinstance(self.test_fraction, float) or not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be a float in (0, 1), got {self.test_fraction!r}")
        _check_question_first(self.question_first)

    def vocabulary(self) -> list[str]:
        words = ("read the digits what digit is at row column sum of and compare with "
                 "larger smaller equal ? . , :").split()
        cells = _cell_words(self.grid) if self.compact_positions else []
        extra = list(ROW_SUM_WORDS) if "row_sum" in self.question_types else []  # appended: earlier ids unchanged
        return list(dict.fromkeys(words + list(NUMBERS) + list(DIGIT_WORDS) + cells + extra))

    def _pool(self, split: str) -> range:
        n = len(_digits()[1])
        cut = n - int(round(n * self.test_fraction))
        return range(cut, n) if split == "test" else range(0, cut)

    def sample_world(self, rng: random.Random, split: str) -> DigitBoard:
        pool = self._pool(split)
        idx = tuple(rng.choice(pool) for _ in range(self.grid * self.grid))
        target = _digits()[1]
        return DigitBoard(idx, tuple(int(target[i]) for i in idx), self.grid)

    def render(self, board: DigitBoard):  # -> PIL.Image.Image
        from PIL import Image

        cell = self.image_size // self.grid
        m = 1 if cell >= 10 else 0  # a black margin keeps neighbouring digits apart
        img = Image.new("RGB", (self.image_size, self.image_size), (0, 0, 0))
        for k, i in enumerate(board.indices):
            img.paste(self.digit_tile(i, cell - 2 * m), ((k % self.grid) * cell + m, (k // self.grid) * cell + m))
        return img

    @staticmethod
    def digit_tile(index: int, size: int):  # -> PIL.Image.Image
        """Digit ``index`` of ``load_digits`` (values 0..16) as a white-on-black RGB tile of ``size`` px."""
        import numpy as np
        from PIL import Image

        a = np.clip(_digits()[0][index] * (255.0 / 16.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB")

    def cell_labels(self, board: DigitBoard) -> dict[str, list[int]]:
        return {"digit": list(board.labels)}

    def label_classes(self) -> dict[str, int]:
        return {"digit": 10}

    def question(self, rng: random.Random, board: DigitBoard, qtype: str) -> tuple[str, str, dict[str, Any]]:
        g, cp = self.grid, self.compact_positions
        if qtype == "read":
            rows = [f"row {NUMBERS[r + 1]} : " + " ".join(str(board.digit(r, c)) for c in range(g)) for r in range(g)]
            return "read the digits .", " , ".join(rows) + " .", {}
        if qtype == "digit_at":
            r, c = rng.randrange(g), rng.randrange(g)
            where = _pos(r, c, cp)
            d = str(board.digit(r, c))
            return f"what digit is at {where} ?", f"{where} {d}" if self.grounded_answers else d, {"cell": [r, c]}
        if qtype == "row_sum":
            r = rng.randrange(g)
            return f"what is the sum of row {NUMBERS[r + 1]} ?", self._row_sum_answer(board, r), {"row": r}
        a, b = rng.sample(range(g * g), 2)
        (ra, ca), (rb, cb) = divmod(a, g), divmod(b, g)
        da, db = board.digit(ra, ca), board.digit(rb, cb)
        pa, pb = _pos(ra, ca, cp), _pos(rb, cb, cp)
        reads = f"{pa} {da} {pb} {db} " if self.grounded_answers else ""
        if qtype == "sum":
            return (f"what is the sum of the digits at {pa} and {pb} ?", reads + str(da + db),
                    {"cells": [[ra, ca], [rb, cb]]})
        ans = "larger" if da > db else "smaller" if da < db else "equal"
        return (f"compare the digit at {pa} with the digit at {pb} .", reads + ans, {"cells": [[ra, ca], [rb, cb]]})

    def _row_sum_answer(self, board: DigitBoard, r: int) -> str:
        """The reference answer of ``row_sum`` on row ``r`` (see ``grounded_answers``)."""
        digits = [board.digit(r, c) for c in range(self.grid)]
        if not self.grounded_answers:
            return str(sum(digits))
        parts = []
        for c, d in enumerate(digits):
            parts.append(f"{_pos(r, c, self.compact_positions)} {d}")
            if c:
                parts.append(str(sum(digits[:c + 1])))
        return " ".join(parts)

    def check_answer(self, board: DigitBoard, question: str, answer: str, meta: dict[str, Any]) -> bool:
        t = meta["type"]
        pos = [_parse_pos(p) for p in re.findall(_POS, question)]
        if t == "read":
            rows = answer[:-2].split(" , ") if answer.endswith(" .") else []
            got = []
            for r, row in enumerate(rows):
                head, _, digits = row.partition(" : ")
                if head != f"row {NUMBERS[r + 1]}":
                    return False
                got += [int(x) for x in digits.split()]
            return got == list(board.labels)
        if t == "row_sum":
            m = re.search(r"sum of row (\w+) \?", question)
            if m is None or m.group(1) not in NUMBERS[1:self.grid + 1]:
                raise ValueError(f"not a row_sum question: {question!r}")
            return answer == self._row_sum_answer(board, NUMBERS.index(m.group(1)) - 1)
        if self.grounded_answers:  # digit_at: its cell, then the digit; sum, compare: each cell and its digit first
            cells = [m.group(0) for m in re.finditer(_POS, question)]
            reads = (cells[0] if t == "digit_at" else
                     " ".join(f"{c} {board.digit(*_parse_pos(c))}" for c in cells)) + " "
            if not answer.startswith(reads):
                return False
            answer = answer[len(reads):]
        if t == "digit_at":
            return answer == str(board.digit(*pos[0]))
        da, db = board.digit(*pos[0]), board.digit(*pos[1])
        if t == "sum":
            return answer.isdigit() and int(answer) == da + db
        if t == "compare":
            return answer == {1: "larger", -1: "smaller", 0: "equal"}[(da > db) - (da < db)]
        raise ValueError(f"unknown question type {t!r}")


TASKS = {"scenes": SceneTask, "digits": DigitTask}


def make_task(name: str, **kw: Any) -> SceneTask | DigitTask:
    """The task ``name`` (``"scenes"`` or ``"digits"``) with its config overrides."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](**kw)


# --------------------------------------------------------------------------- writing splits
def _draw_types(rng: random.Random, types: Sequence[str], weights: Sequence[float], turns: int) -> list[str]:
    """``turns`` distinct question types (one when ``turns == 1``), each drawn with ``weights`` among the rest."""
    if not weights:
        return rng.sample(list(types), turns) if turns > 1 else [rng.choice(types)]
    left, w, out = list(types), list(weights), []
    for _ in range(turns):
        k = rng.choices(range(len(left)), w)[0]
        out.append(left.pop(k))
        w.pop(k)
    return out


def make_samples(
    task: SceneTask | DigitTask, n: int, *, seed: int, split: str = "train", prefix: str = "s",
    turns: int = 1, question_types: Sequence[str] | None = None, exclude: set[str] | None = None,
    weights: Sequence[float] = (),
) -> tuple[list[dict[str, Any]], list[Any]]:
    """``n`` LLaVA-format samples and their worlds (scenes / digit boards), images not written.

    Worlds whose key is in ``exclude`` are redrawn (held-out splits); with ``turns > 1``
    each sample asks ``turns`` questions of different types about one image (IRS pairs).
    ``meta`` holds ``task``, ``type`` and what the answer depends on (per turn for
    multi-turn samples). ``weights``: relative frequencies of the question types (empty:
    uniform); a multi-turn sample draws its ``turns`` types without replacement, each draw
    with these weights among the types not drawn yet.
    """
    _check_int("n", n, 0)
    _check_int("turns", turns, 1)
    types = _check_types("question_types", question_types or task.question_types, task.ALL_TYPES)
    weights = _check_weights(weights, types)
    if turns > len(types):
        raise ValueError(f"turns must be <= the {len(types)} question types (one type per turn), got {turns!r}")
    rng = random.Random(seed)
    exclude = set(exclude or ())
    samples, worlds = [], []
    for i in range(n):
        for _ in range(1000):
            world = task.sample_world(rng, split)
            if world.key() not in exclude:
                break
        else:
            raise ValueError(f"could not draw a world outside the {len(exclude)} excluded ones after 1000 tries")
        exclude.add(world.key())
        conv, metas = [], []
        drawn = _draw_types(rng, types, weights, turns)
        for turn, qtype in enumerate(drawn):
            q, a, meta = task.question(rng, world, qtype)
            metas.append({"task": task.name, "type": qtype, **meta})
            if turn == 0:  # the image opens the first user turn, or follows the question (``question_first``)
                q = user_turn(q, task.question_first)
            conv.append({"from": "human", "value": q})
            conv.append({"from": "gpt", "value": a})
        samples.append({
            "id": f"{prefix}{i:05d}", "image": f"images/{prefix}{i:05d}.png", "conversations": conv,
            "meta": metas[0] if turns == 1 else {"task": task.name, "type": "multi", "turns": metas},
        })
        worlds.append(world)
    return samples, worlds


def write_task(
    task: SceneTask | DigitTask, out_dir: str | Path, *, n_train: int, n_test: int, n_captions: int = 0,
    n_irs: int = 0, seed: int = 0, train_turns: int = 1,
) -> dict[str, Path]:
    """Write ``train.json`` (question types drawn with ``task.question_weights``; ``train_turns``
    questions about each image, of different types), ``test.json`` (single-turn,
    uniform question types; worlds never seen in training; digits from held-out handwriting), ``captions.json`` (``task.caption_type`` only, stage 1) and ``irs.json``
    (two questions per image, for IRS) with their PNGs under ``out_dir/images``.

    Returns ``{"train": path, "test": path[, "captions": path][, "irs": path], "image_folder": out_dir}``.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    train = make_samples(task, n_train, seed=seed, split="train", prefix="train", weights=task.question_weights,
                         turns=train_turns)
    splits = {"train": train}
    seen = {w.key() for w in train[1]}
    splits["test"] = make_samples(task, n_test, seed=seed + 1_000_003, split="test", prefix="test", exclude=seen)
    if n_captions:
        splits["captions"] = make_samples(task, n_captions, seed=seed + 2_000_003, split="train", prefix="cap",
                                          question_types=(task.caption_type,))
    if n_irs:
        irs_types = task.question_types if len(task.question_types) >= 2 else task.ALL_TYPES  # two types per image
        splits["irs"] = make_samples(task, n_irs, seed=seed + 3_000_003, split="train", prefix="irs", turns=2,
                                     question_types=irs_types)
    paths: dict[str, Path] = {}
    for name, (samples, worlds) in splits.items():
        for sample, world in zip(samples, worlds):
            task.render(world).save(out / sample["image"], format="PNG")
        paths[name] = out / f"{name}.json"
        paths[name].write_text(json.dumps(samples, indent=1))
    paths["image_folder"] = out
    return paths
