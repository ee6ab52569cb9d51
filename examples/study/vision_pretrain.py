"""Pre-training the tiny SigLIP tower before any LLaVA stage (issue 15): a stand-in for SigLIP. Not library code.

The paper's teacher and students share a pretrained SigLIP encoder; a random tower trained
from scratch gave the language model almost no image signal (docs/results/calibration.md).
Here the tower is pre-trained on the task's images with a cheap supervised objective,
**per-cell attribute classification**: the features LLaVA reads (``hidden_states[layer]``
of the tower, ``vision_feature_layer``; before SigLIP's post-layernorm) are mean-pooled
over the patches whose centre lies in each grid cell, and one linear head per attribute
(scenes: colour and shape, 0 = empty cell; digits: the digit) classifies every cell:

    loss = sum_attr mean_cells CE(W_attr · mean_{p in cell} h_p + b_attr, label_attr(cell))

With ``position=True`` a further linear head classifies, from every patch's own feature
(not pooled), the grid cell holding that patch (``cell_of_patch``): the visual tokens then
keep *where* they are as well as *what* they show, so that the language model can look a
cell up by content ("row two column three" -> the tokens of that cell):

    loss += mean_patches CE(W_pos · h_p + b_pos, cell(p))

With ``shift = s > 0`` every step's batch is shifted by a random ``(dy, dx)`` in
``[-s, s]^2`` pixels (``torch.roll``; the task's cells keep a black margin, so an object stays in
its patch and the labels stay the same): an augmentation that makes the tower read unseen
handwriting better (docs/results/calibration-log.md, "The vision tower caps read").

The heads are then dropped and the tower frozen for teacher and students.

:func:`probe_accuracy` measures what the frozen features hold: a *fresh* linear probe of
the same form, trained on the pooled features of training images, scored per cell on
held-out images (the "probe accuracy" recorded with every calibration).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "cell_of_patch", "image_signal_fraction", "labelled_images", "pooled_cell_features", "position_probe_accuracy",
    "pretrain_vision_tower", "probe_accuracy",
]


def cell_of_patch(image_size: int, patch_size: int, grid: int) -> Tensor:
    """``[num_patches]`` long: the grid cell (reading order) holding each patch's centre."""
    for name, v in (("image_size", image_size), ("patch_size", patch_size), ("grid", grid)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    side = image_size // patch_size
    if side < grid:
        raise ValueError(f"grid ({grid}) has more cells per side than the {side} patches per side: a cell would hold none")
    centres = (torch.arange(side) + 0.5) * patch_size
    cell_1d = torch.clamp((centres * grid / image_size).long(), max=grid - 1)
    return (cell_1d[:, None] * grid + cell_1d[None, :]).flatten()


def _features(tower: nn.Module, pixel_values: Tensor, layer: int) -> Tensor:
    return tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]


def pooled_cell_features(tower: nn.Module, pixel_values: Tensor, cells: Tensor, grid: int, *, layer: int = -1) -> Tensor:
    """``[N, grid*grid, D]``: the tower's ``hidden_states[layer]`` mean-pooled per cell."""
    return _pool_cells(_features(tower, pixel_values, layer), cells, grid)


def _pool_cells(h: Tensor, cells: Tensor, grid: int) -> Tensor:
    """``h [N, P, D]`` mean-pooled over the patches of each cell -> ``[N, grid*grid, D]``."""
    if h.shape[1] != cells.numel():
        raise ValueError(f"the tower yields {h.shape[1]} patches per image but cells maps {cells.numel()}")
    onehot = torch.nn.functional.one_hot(cells, grid * grid).to(h.dtype)  # [P, C]
    return torch.einsum("npd,pc->ncd", h, onehot) / onehot.sum(0)[None, :, None]


def labelled_images(task: Any, n: int, *, seed: int, split: str, image_processor: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """``n`` images of ``task`` (fresh worlds of ``split``) as ``pixel_values`` (through the
    model's image processor, as the LLaVA data pipeline reads them) and per-cell labels
    ``{attr: [n, grid*grid] long}``."""
    rng = random.Random(seed)
    worlds = [task.sample_world(rng, split) for _ in range(n)]
    pv = image_processor(images=[task.render(w) for w in worlds], return_tensors="pt")["pixel_values"]
    labels = {k: torch.tensor([task.cell_labels(w)[k] for w in worlds], dtype=torch.long) for k in task.label_classes()}
    return pv, labels


def _heads(dim: int, classes: dict[str, int]) -> nn.ModuleDict:
    return nn.ModuleDict({k: nn.Linear(dim, c) for k, c in classes.items()})


def _loss(heads: nn.ModuleDict, feats: Tensor, labels: dict[str, Tensor]) -> Tensor:
    return sum(nn.functional.cross_entropy(heads[k](feats).flatten(0, 1), labels[k].flatten()) for k in heads)


def pretrain_vision_tower(
    tower: nn.Module,
    pixel_values: Tensor,
    labels: dict[str, Tensor],
    classes: dict[str, int],
    *,
    grid: int,
    patch_size: int,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    layer: int = -1,
    position: bool = False,
    shift: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``tower`` in place on per-cell classification, plus per-patch cell-index
    classification with ``position``, on batches shifted by up to ``shift`` pixels (module
    docstring); returns ``{"loss": [per-step losses], "steps": steps}``. AdamW, cosine decay,
    gradients clipped at 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be an int >= 0, got {shift!r}")
    missing = set(classes) ^ set(labels)
    if missing:
        raise ValueError(f"labels and classes must name the same attributes, got labels {sorted(labels)}, "
                         f"classes {sorted(classes)}")
    image_size = int(pixel_values.shape[-1])
    cells = cell_of_patch(image_size, patch_size, grid)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = _heads(int(tower.config.hidden_size), classes)
    pos_head = nn.Linear(int(tower.config.hidden_size), grid * grid) if position else None
    tower.train()
    tower.requires_grad_(True)
    params = [*tower.parameters(), *heads.parameters(), *(pos_head.parameters() if pos_head is not None else ())]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * s / steps)))
    losses = []
    n = pixel_values.shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        pv = pixel_values[idx]
        if shift:  # drawn after idx only when shifting: shift=0 keeps the batches of earlier towers
            dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
            pv = torch.roll(pv, shifts=(dy, dx), dims=(-2, -1))
        h = _features(tower, pv, layer)
        loss = _loss(heads, _pool_cells(h, cells, grid), {k: v[idx] for k, v in labels.items()})
        if pos_head is not None:
            loss = loss + nn.functional.cross_entropy(pos_head(h).flatten(0, 1), cells.repeat(h.shape[0]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    tower.eval()
    tower.requires_grad_(False)
    return {"loss": losses, "steps": steps}


@torch.no_grad()
def _pooled(tower: nn.Module, pv: Tensor, cells: Tensor, grid: int, layer: int, bs: int = 128) -> Tensor:
    tower.eval()
    return torch.cat([pooled_cell_features(tower, pv[i:i + bs], cells, grid, layer=layer) for i in range(0, len(pv), bs)])


def probe_accuracy(
    tower: nn.Module,
    train: tuple[Tensor, dict[str, Tensor]],
    test: tuple[Tensor, dict[str, Tensor]],
    classes: dict[str, int],
    *,
    grid: int,
    patch_size: int,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
    layer: int = -1,
) -> dict[str, float]:
    """Per-cell accuracy, per attribute, of a fresh linear probe on the frozen pooled features.

    The probe (one linear layer per attribute on the standardized features) is trained
    full-batch with Adam on ``train`` and scored on ``test``; the tower is not changed.
    """
    cells = cell_of_patch(int(train[0].shape[-1]), patch_size, grid)
    ftr, fte = _pooled(tower, train[0], cells, grid, layer), _pooled(tower, test[0], cells, grid, layer)
    mu, sd = ftr.mean((0, 1)), ftr.std((0, 1)).clamp_min(1e-6)
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    torch.manual_seed(seed)
    heads = _heads(ftr.shape[-1], classes)
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = _loss(heads, ftr, train[1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return {k: float((heads[k](fte).argmax(-1) == test[1][k]).float().mean()) for k in classes}


def position_probe_accuracy(
    tower: nn.Module, train: Tensor, test: Tensor, *, grid: int, patch_size: int, steps: int = 300, lr: float = 1e-2,
    seed: int = 0, layer: int = -1,
) -> float:
    """Accuracy, over the held-out images' patches, of a fresh linear probe that reads each
    patch's own (standardized) feature and names the grid cell holding the patch: whether
    the visual tokens still say *where* they are. Trained full-batch with Adam on ``train``
    (``pixel_values``), scored on ``test``; the tower is not changed."""
    cells = cell_of_patch(int(train.shape[-1]), patch_size, grid)
    with torch.no_grad():
        tower.eval()
        ftr = torch.cat([_features(tower, train[i:i + 128], layer) for i in range(0, len(train), 128)]).float()
        fte = torch.cat([_features(tower, test[i:i + 128], layer) for i in range(0, len(test), 128)]).float()
    mu, sd = ftr.mean((0, 1)), ftr.std((0, 1)).clamp_min(1e-6)
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    torch.manual_seed(seed)
    head = nn.Linear(ftr.shape[-1], grid * grid)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    target = cells.repeat(ftr.shape[0])
    with torch.enable_grad():
        for _ in range(steps):
            loss = nn.functional.cross_entropy(head(ftr).flatten(0, 1), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((head(fte).argmax(-1) == cells[None]).float().mean())


@torch.no_grad()
def image_signal_fraction(tower: nn.Module, pixel_values: Tensor, *, layer: int = -1) -> float:
    """How much of the features LLaVA reads differs between images: the standard deviation
    across images of ``hidden_states[layer]`` (per patch position and channel, averaged)
    over their root mean square. Near 0: a component common to every image dominates
    (what the random tower gave, docs/results/calibration.md), however linearly decodable
    the rest is."""
    tower.eval()
    h = torch.cat([_features(tower, pixel_values[i:i + 128], layer) for i in range(0, len(pixel_values), 128)]).float()
    return float(h.std(0).mean() / h.pow(2).mean().sqrt())

