"""The vision-tower stand-in for SigLIP (examples/study/vision_pretrain.py, issue 15) on a toy size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "study"))
import tasks as T  # noqa: E402
import vision_pretrain as vp  # noqa: E402


def test_cell_of_patch_by_patch_centre() -> None:
    # 48 px, patch 8 (6x6 patches), 3x3 grid: each cell holds a 2x2 block of patches
    c = vp.cell_of_patch(48, 8, 3).view(6, 6)
    assert c[0, 0] == c[1, 1] == 0 and c[0, 2] == 1 and c[5, 5] == 8 and c[2, 0] == 3
    assert torch.bincount(c.flatten()).tolist() == [4] * 9
    # 48 px, patch 12 (4x4), 3x3 grid of 16 px cells: patch centres 6, 18, 30, 42 -> cells 0, 1, 1, 2
    assert vp.cell_of_patch(48, 12, 3).view(4, 4)[0].tolist() == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="must be a multiple of patch_size"):
        vp.cell_of_patch(50, 8, 3)
    with pytest.raises(ValueError, match="a cell would hold none"):
        vp.cell_of_patch(48, 16, 4)


def _toy(name: str = "scenes", patch: int = 12):
    from tokinteract.mllm import build_processor, build_tiny_llava, build_word_tokenizer

    task = T.make_task(name)
    tok = build_word_tokenizer(task.vocabulary())
    model = build_tiny_llava(vocab_size=len(tok), image_token_id=4, image_size=task.image_size, patch_size=patch,
                             hidden_size=16, num_layers=1, vision_hidden_size=32, vision_layers=1, seed=0)
    return task, model.model.vision_tower, build_processor(tok, model).image_processor


def test_pooled_features_are_the_mean_of_the_cells_patches() -> None:
    task, tower, ip = _toy()
    pv, _ = vp.labelled_images(task, 3, seed=0, split="train", image_processor=ip)
    cells = vp.cell_of_patch(task.image_size, 12, task.grid)
    with torch.no_grad():
        h = tower(pixel_values=pv, output_hidden_states=True).hidden_states[-1]
        pooled = vp.pooled_cell_features(tower, pv, cells, task.grid)
    for c in range(task.grid ** 2):
        torch.testing.assert_close(pooled[:, c], h[:, cells == c].mean(1))


@pytest.mark.parametrize("name", ["scenes", "digits"])
def test_pretraining_learns_the_cells_then_freezes_the_tower(name: str) -> None:
    torch.set_num_threads(1)
    task, tower, ip = _toy(name)
    train = vp.labelled_images(task, 96, seed=0, split="train", image_processor=ip)
    test = vp.labelled_images(task, 48, seed=1, split="test", image_processor=ip)
    for k, c in task.label_classes().items():
        assert train[1][k].shape == (96, task.grid ** 2) and int(train[1][k].max()) < c
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    out = vp.pretrain_vision_tower(tower, *train, task.label_classes(), grid=task.grid, patch_size=12, steps=40,
                                   lr=3e-3, batch_size=32, seed=0)
    loss = out["loss"]
    assert len(loss) == 40 and sum(loss[-5:]) / 5 < 0.7 * sum(loss[:5]) / 5
    assert any(not torch.equal(before[k], v) for k, v in tower.state_dict().items())
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.training
    acc = vp.probe_accuracy(tower, train, test, task.label_classes(), grid=task.grid, patch_size=12, steps=100)
    assert set(acc) == set(task.label_classes())
    # above the majority class of the held-out cells
    for k, a in acc.items():
        majority = float(torch.bincount(test[1][k].flatten()).max()) / test[1][k].numel()
        assert a > majority, (k, a, majority)
    assert 0.0 < vp.image_signal_fraction(tower, test[0]) <= 1.0


def test_pretraining_is_deterministic_by_seed() -> None:
    torch.set_num_threads(1)
    states = []
    for _ in range(2):
        task, tower, ip = _toy()
        train = vp.labelled_images(task, 32, seed=0, split="train", image_processor=ip)
        vp.pretrain_vision_tower(tower, *train, task.label_classes(), grid=task.grid, patch_size=12, steps=5,
                                 batch_size=8, seed=3)
        states.append(tower.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_bad_arguments_are_refused() -> None:
    task, tower, ip = _toy()
    pv, labels = vp.labelled_images(task, 4, seed=0, split="train", image_processor=ip)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        vp.pretrain_vision_tower(tower, pv, labels, task.label_classes(), grid=3, patch_size=12, steps=0)
    with pytest.raises(ValueError, match="labels and classes must name the same attributes"):
        vp.pretrain_vision_tower(tower, pv, labels, {"digit": 10}, grid=3, patch_size=12, steps=1)


def test_position_head_keeps_each_patch_cell_readable() -> None:
    torch.set_num_threads(1)
    task, tower, ip = _toy()
    train = vp.labelled_images(task, 64, seed=0, split="train", image_processor=ip)
    test = vp.labelled_images(task, 32, seed=1, split="test", image_processor=ip)
    out = vp.pretrain_vision_tower(tower, *train, task.label_classes(), grid=task.grid, patch_size=12, steps=30,
                                   lr=3e-3, batch_size=32, seed=0, position=True)
    assert sum(out["loss"][-5:]) < sum(out["loss"][:5])
    acc = vp.position_probe_accuracy(tower, train[0], test[0], grid=task.grid, patch_size=12, steps=200)
    assert acc > 0.9, acc  # chance: the largest cell's share of patches (4 of 16 here)
    # without the head the loss is the attribute loss alone: the two objectives differ from the first step
    _, tower2, _ = _toy()
    out2 = vp.pretrain_vision_tower(tower2, *train, task.label_classes(), grid=task.grid, patch_size=12, steps=1,
                                    lr=3e-3, batch_size=32, seed=0)
    assert out2["loss"][0] < out["loss"][0]


def test_shift_augments_the_batches_and_zero_keeps_the_unshifted_tower() -> None:
    """``shift=0`` gives exactly the tower of a run without the argument (earlier cached towers stay
    valid); ``shift=1`` trains on shifted pixels (another tower); a bad shift is refused."""
    torch.set_num_threads(1)
    states = {}
    for name, kw in (("default", {}), ("zero", {"shift": 0}), ("one", {"shift": 1})):
        task, tower, ip = _toy()
        train = vp.labelled_images(task, 32, seed=0, split="train", image_processor=ip)
        seen = []
        orig = vp._features
        vp._features = lambda t, pv, layer: (seen.append(pv.clone()), orig(t, pv, layer))[1]
        try:
            vp.pretrain_vision_tower(tower, *train, task.label_classes(), grid=task.grid, patch_size=12, steps=4,
                                     batch_size=8, seed=3, **kw)
        finally:
            vp._features = orig
        states[name] = (tower.state_dict(), seen, train[0])
    for k in states["default"][0]:
        assert torch.equal(states["default"][0][k], states["zero"][0][k]), k
    assert any(not torch.equal(states["default"][0][k], v) for k, v in states["one"][0].items())
    # every shifted batch is a roll of some training images by at most one pixel each way
    pv_all = states["one"][2]
    rolled = 0
    for batch in states["one"][1]:
        for img in batch:
            match = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                     if any(torch.equal(img, torch.roll(p, (dy, dx), (-2, -1))) for p in pv_all)]
            assert match, "a batch image is not a <= 1 px roll of a training image"
            rolled += (0, 0) not in match
    assert rolled > 0
    task, tower, ip = _toy()
    pv, labels = vp.labelled_images(task, 4, seed=0, split="train", image_processor=ip)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="shift must be an int >= 0"):
            vp.pretrain_vision_tower(tower, pv, labels, task.label_classes(), grid=3, patch_size=12, steps=1, shift=bad)
