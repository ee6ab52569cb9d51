"""examples/study/diagnose.py: the calibration's fast loop, its trainer path and its start from a saved model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "study"))

import diagnose  # noqa: E402


def _run(tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)
    torch.set_num_threads(1)
    rc = diagnose.main(["--task", "scenes", "--preset", "smoke", "--teacher-size", "32", "1", "--steps", "2",
                        "--eval-every", "1", "--n-eval", "4", "--batch", "2", "--run-dir", str(tmp_path / "run"),
                        "--out", str(out), *extra])
    assert rc == 0
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_plain_loop_trainer_and_init_each_write_their_evaluations(tmp_path: Path) -> None:
    plain = _run(tmp_path)
    assert [r["step"] for r in plain] == [1, 2] and all(0.0 <= r["overall"] <= 1.0 for r in plain)
    assert all("--preset smoke" in r["command"] for r in plain)
    tr = _run(tmp_path, "--trainer")
    assert [r["step"] for r in tr] == [2] and "--trainer" in tr[0]["command"] and tr[0]["train_s"] > 0
    # --init: a saved model (here: a fresh one saved), its tower replaced by the run dir's
    import demo_study as dm

    s = dm.task_settings("scenes", "smoke")
    demo = dm.Demo(s, tmp_path / "run", progress=False, log=lambda *_: None)
    demo.prepare()
    model = demo.build_model(dm.ModelSize(32, 1), seed=5)
    model.save_pretrained(tmp_path / "init")
    init = _run(tmp_path, "--init", str(tmp_path / "init"))
    assert [r["step"] for r in init] == [1, 2]
    assert init[0]["loss"] != plain[0]["loss"]  # another start (seed 5), not the fresh model of seed 1000
    with pytest.raises(ValueError, match="no curriculum"):
        _run(tmp_path, "--trainer", "--first-types", "color", "--first-steps", "1")


def test_weight_decay_changes_the_second_step_and_is_checked(tmp_path: Path) -> None:
    """``--wd``: AdamW's decoupled weight decay on the matrices. The first step's loss is computed before any
    update (the same with or without it); the second sees the decayed weights. A negative value is refused."""
    plain = _run(tmp_path)
    decayed = _run(tmp_path, "--wd", "100")  # lr 1e-3 x 100: every matrix shrinks by 10 % in the first step
    assert decayed[0]["loss"] == plain[0]["loss"]
    assert decayed[1]["loss"] != plain[1]["loss"]
    assert "--wd 100" in decayed[0]["command"]
    with pytest.raises(ValueError, match="--wd must be a finite number >= 0, got -1.0"):
        diagnose.main(["--task", "scenes", "--preset", "smoke", "--wd", "-1", "--run-dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()  # refused before any data or model was made
