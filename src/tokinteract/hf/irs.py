"""IRS across layers (paper Def. 3.1, Appendix B.5) and the Fig. 4 / Fig. 7 / Fig. 10 plots.

For every text layer ``l`` and ``N`` input pairs ``(x1_n, x2_n)`` (same image, two
different instructions), with ``alpha_l(x)`` the instruction-to-vision importance of the
visual tokens (:func:`tokinteract.visual_importance` of the head-averaged attention rows of
the instruction tokens, restricted to the ``N_v`` visual positions, in order):

    IRS(l) = 1 - (1/N) sum_n cos(alpha_l(x1_n), alpha_l(x2_n))          l* = argmax_l IRS(l)

One forward per input captures the rows of every layer at once
(:func:`tokinteract.hf.capture_attention` with ``layer=None``, head mean), never
``output_attentions``. Batches of pairs are combined with exact per-pair weights (the mean
over all ``N`` pairs, not a mean of batch means).

Plots need matplotlib (``pip install 'tokinteract[plot]'``), imported only when a plotting
function is called.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from tokinteract._checks import check_bool, check_float, check_tensor
from tokinteract.hf import _attn, families
from tokinteract.hf.capture import capture_attention
from tokinteract.irs import irs_score, select_layer

__all__ = ["IRSCurve", "instruction_vision_alphas", "irs_curve", "plot_attention_grid", "plot_irs_curve", "visual_attention_grid"]


@dataclass(frozen=True, eq=False)
class IRSCurve:
    """Per-layer IRS and the selected layer.

    Attributes:
        scores: fp32 ``[L]``, ``IRS(l)`` for every text layer.
        best_layer: ``l* = argmax_l IRS(l)`` (first on ties).
        num_pairs: ``N``, the number of pairs averaged.
    """

    scores: Float[Tensor, "layers"]
    best_layer: int
    num_pairs: int


def _visual_mask(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    vm = batch.get("visual_mask")
    if vm is not None:
        return vm
    vis = families.visual_token_ids(model)
    if not vis:
        raise ValueError("each input needs a 'visual_mask' [B, T] (the model config has no image or video token id)")
    ids = batch["input_ids"]
    return torch.isin(ids, torch.tensor(vis, device=ids.device))


_META = ("instruction_mask", "visual_mask")


@torch.no_grad()
def instruction_vision_alphas(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    layers: Iterable[int] | None = None,
) -> dict[int, Tensor]:
    """``alpha_l(x)`` for one batch of inputs: ``{layer: [B, N_v]}``.

    Args:
        model: a Hugging Face causal LM or ``LlavaForConditionalGeneration`` (eager or sdpa).
        batch: ``input_ids`` ``[B, T]``, ``instruction_mask`` bool ``[B, T]``, optional
            ``attention_mask``, ``visual_mask`` (default: ``input_ids == image_token_id``)
            and any other model inputs (``pixel_values``). Every row must hold the same
            number ``N_v`` of visual tokens.
        layers: text layers to evaluate (default: all).
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch or "instruction_mask" not in batch:
        raise ValueError("each input must be a mapping with at least 'input_ids' and 'instruction_mask'")
    ids = batch["input_ids"]
    check_tensor("input_ids", ids, ndim=2)
    qm = batch["instruction_mask"]
    check_tensor("instruction_mask", qm, ndim=2)
    check_bool("instruction_mask", qm)
    vm = _visual_mask(model, batch)
    check_tensor("visual_mask", vm, ndim=2)
    check_bool("visual_mask", vm)
    counts = vm.sum(1)
    if counts.numel() and (int(counts.min()) != int(counts.max()) or int(counts.max()) == 0):
        raise ValueError(f"every row must hold the same, non-zero number of visual tokens, got {counts.tolist()}")
    inputs = {k: v for k, v in batch.items() if k not in _META}
    sel = None if layers is None else list(layers)
    with capture_attention(model, layer=sel, query_mask=qm, heads="mean") as cap:
        model(**inputs)
    B, nv = vm.shape[0], int(counts.max())
    out = {}
    for layer in cap.layers:
        w = cap.visual_importance(vm, layer)
        out[layer] = w[vm.to(w.device)].reshape(B, nv)
    return out


def irs_curve(
    model: nn.Module,
    pairs: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]],
    *,
    layers: Iterable[int] | None = None,
) -> IRSCurve:
    """IRS for every layer over a loader/iterable of input pairs, and ``l*``.

    Args:
        model: a Hugging Face causal LM or ``LlavaForConditionalGeneration`` (eager or sdpa).
        pairs: yields ``(x1, x2)``: two batches of the same ``B`` images with different
            instructions (see :func:`instruction_vision_alphas` for the keys). Row ``n`` of
            ``x1`` and row ``n`` of ``x2`` form a pair; the visual token counts must agree.
        layers: evaluate only these text layers (default: all); ``scores`` then follows
            this order and ``best_layer`` is one of them.

    Returns:
        an :class:`IRSCurve` with ``scores[l] = 1 - mean_n cos(alpha_l(x1_n), alpha_l(x2_n))``.
    """
    n_layers = int(_attn.text_config(model).num_hidden_layers)
    sel = list(range(n_layers)) if layers is None else [int(x) % n_layers for x in layers]
    total = torch.zeros(len(sel), dtype=torch.float64)
    n = 0
    for item in pairs:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"pairs must yield (x1, x2) tuples, got {type(item).__name__}")
        a = instruction_vision_alphas(model, item[0], layers=sel)
        b = instruction_vision_alphas(model, item[1], layers=sel)
        for i, layer in enumerate(sel):
            if a[layer].shape != b[layer].shape:
                raise ValueError(
                    f"x1 and x2 must hold the same batch and visual token count, got {tuple(a[layer].shape)} "
                    f"and {tuple(b[layer].shape)}"
                )
            total[i] += float(irs_score(a[layer], b[layer])) * a[layer].shape[0]
        n += a[sel[0]].shape[0]
    if n == 0:
        raise ValueError("pairs must yield at least one pair, got none")
    scores = (total / n).float()
    best = sel[select_layer(scores)]
    return IRSCurve(scores=scores, best_layer=best, num_pairs=n)


def visual_attention_grid(
    weights: Float[Tensor, "batch keys"],
    visual_mask: Bool[Tensor, "batch keys"],
    grid: tuple[int, int] | None = None,
) -> Float[Tensor, "batch _ _"]:
    """Lay each row's visual-token weights out on the image's patch grid: ``[B, h, w]``.

    ``grid`` defaults to a square ``sqrt(N_v) x sqrt(N_v)``; visual tokens fill it row-major
    (the order a ViT/SigLIP patch sequence has). Use with :func:`plot_attention_grid`.
    """
    check_tensor("weights", weights, ndim=2)
    check_float("weights", weights)
    check_tensor("visual_mask", visual_mask, ndim=2)
    check_bool("visual_mask", visual_mask)
    if weights.shape != visual_mask.shape:
        raise ValueError(f"visual_mask must have the shape of weights {tuple(weights.shape)}, got {tuple(visual_mask.shape)}")
    counts = visual_mask.sum(1)
    nv = int(counts.max()) if counts.numel() else 0
    if nv == 0 or int(counts.min()) != nv:
        raise ValueError(f"every row must hold the same, non-zero number of visual tokens, got {counts.tolist()}")
    if grid is None:
        side = math.isqrt(nv)
        if side * side != nv:
            raise ValueError(f"{nv} visual tokens do not form a square grid; pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    if h * w != nv:
        raise ValueError(f"grid {grid} must hold exactly the {nv} visual tokens")
    return weights.float()[visual_mask].reshape(-1, h, w)


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised by monkeypatching in tests
        raise ImportError(
            "plotting needs matplotlib, an optional dependency: pip install 'tokinteract[plot]'"
        ) from e
    return plt


def plot_irs_curve(
    curve: IRSCurve | Tensor,
    *,
    ax: Any = None,
    label: str | None = None,
    mark_best: bool = True,
) -> Any:
    """Plot IRS against layer depth (paper Fig. 4); returns the matplotlib ``Axes``."""
    plt = _pyplot()
    scores = curve.scores if isinstance(curve, IRSCurve) else curve
    check_tensor("scores", scores, ndim=1)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    y = scores.detach().float().cpu().tolist()
    ax.plot(range(len(y)), y, marker="o", label=label)
    if mark_best and y:
        best = int(torch.tensor(y).argmax())
        ax.axvline(best, linestyle="--", color="gray", linewidth=1)
        ax.annotate(f"l*={best}", (best, y[best]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("layer")
    ax.set_ylabel("IRS")
    if label is not None:
        ax.legend()
    return ax


def plot_attention_grid(
    grid_map: Float[Tensor, "_ _"],
    *,
    image: Any = None,
    ax: Any = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    title: str | None = None,
) -> Any:
    """Heat map of instruction-to-vision importance over the image grid (Fig. 7 / Fig. 10).

    Args:
        grid_map: ``[h, w]`` from :func:`visual_attention_grid` (one row).
        image: optional image (PIL image or ``[H, W(, 3)]`` array) drawn underneath; the
            map is stretched over it.
        ax: matplotlib ``Axes`` to draw on (a new figure by default).
        cmap, alpha: colour map and opacity of the map over the image.
        title: optional title.

    Returns:
        the matplotlib ``Axes``.
    """
    plt = _pyplot()
    check_tensor("grid_map", grid_map, ndim=2)
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    m = grid_map.detach().float().cpu().numpy()
    if image is not None:
        import numpy as np

        img = np.asarray(image)
        H, W = img.shape[:2]
        ax.imshow(img)
        ax.imshow(m, cmap=cmap, alpha=alpha, extent=(0, W, H, 0), interpolation="bilinear")
    else:
        ax.imshow(m, cmap=cmap)
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title)
    return ax
