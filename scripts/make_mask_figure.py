"""Draw the TPA ribbon mask and the KV-cached candidate layout for the documentation.

Usage (from the repository root)::

    .venv/bin/python scripts/make_mask_figure.py            # writes docs/assets/*.png
    .venv/bin/python scripts/make_mask_figure.py --out DIR

Both figures are drawn from what the library builds, not from a hand-made matrix:
``tokinteract.tpa_expand`` (whose ``attention_mask`` is ``tokinteract.ribbon_mask``) on a
small left-padded example with ``d = 2`` candidates per supervised position.

* ``ribbon_mask.png``: the packed sequence (ground truth first, then the candidate slots)
  with each slot's token and position id, and the dense ribbon mask (True = may attend).
* ``candidate_layout.png``: the same computation split in two passes: the ground-truth pass
  with the plain causal (padding-aware) mask, then the candidate block, whose queries see
  the cached ground-truth keys and themselves (the rows ``T:`` of the ribbon mask).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from tokinteract import TPAExpansion, ribbon_mask, shift_labels, tpa_expand

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "assets"

# The example: two pads (left padding), an image token, an instruction token, then a
# three-token response. Labels supervise the response only.
TOKENS = ["pad", "pad", "img", "q", "y1", "y2", "y3"]
NUM_CANDIDATES = 2
IGNORE = -100


@dataclass(frozen=True)
class MaskExample:
    """The example's expansion and one label per slot of the packed sequence."""

    expansion: TPAExpansion
    attention_mask: torch.Tensor  # [1, T] padding mask
    candidate_mask: torch.Tensor  # [1, T]
    slot_labels: list[str]  # token drawn in each of the T2 slots
    slot_kinds: list[str]  # "pad", "gt", "cand" or "unused"


def mask_example() -> MaskExample:
    """Build the figure's example with the library (left padding, ``d = 2``)."""
    T = len(TOKENS)
    input_ids = torch.arange(1, T + 1)[None]  # one id per token, 0 is reserved for pad slots
    attention_mask = torch.tensor([[tok != "pad" for tok in TOKENS]])
    labels = torch.full((1, T), IGNORE)
    is_response = torch.tensor([[tok.startswith("y") for tok in TOKENS]])
    labels[is_response] = input_ids[is_response]
    candidate_mask = shift_labels(labels, IGNORE) != IGNORE
    d = NUM_CANDIDATES
    # Candidate ids are irrelevant to the mask; make them recognisable: 100 * (t+1) + u.
    t_idx = torch.arange(T)[None, :, None]
    u_idx = torch.arange(d)[None, None, :]
    candidates = 100 * (t_idx + 1) + u_idx
    exp = tpa_expand(input_ids, candidates, candidate_mask, attention_mask, pad_token_id=0)

    labels_out: list[str] = []
    kinds: list[str] = []
    for slot in range(exp.expanded_len):
        src = int(exp.slot_source[0, slot])
        if slot < T:
            labels_out.append(TOKENS[slot])
            kinds.append("gt" if bool(attention_mask[0, slot]) else "pad")
        elif src < 0:
            labels_out.append("unused")
            kinds.append("unused")
        else:
            u = int(exp.input_ids[0, slot]) % 100
            labels_out.append(f"{TOKENS[src + 1]}'({u + 1})")
            kinds.append("cand")
    return MaskExample(exp, attention_mask, candidate_mask, labels_out, kinds)


def _draw_matrix(ax, mask, row_labels, col_labels, row_kinds, col_kinds, title):  # noqa: ANN001
    import numpy as np
    from matplotlib.colors import ListedColormap

    # 0 = blocked, 1 = attends to ground-truth context, 2 = attends to itself only
    # (diagonal of candidate / pad slots), 3 = a candidate's own slot.
    m = mask.numpy().astype(int)
    code = np.zeros_like(m)
    n_rows, n_cols = m.shape
    for i in range(n_rows):
        for j in range(n_cols):
            if not m[i, j]:
                continue
            if col_kinds[j] == "gt":
                code[i, j] = 1
            elif row_kinds[i] == "cand":
                code[i, j] = 3
            else:
                code[i, j] = 2
    cmap = ListedColormap(["#f4f4f4", "#3b6fb6", "#b0b0b0", "#e07b39"])
    ax.imshow(code, cmap=cmap, vmin=0, vmax=3, interpolation="nearest", aspect="equal")
    ax.set_xticks(range(n_cols), col_labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n_rows), row_labels, fontsize=8)
    ax.set_xticks([x - 0.5 for x in range(1, n_cols)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, n_rows)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("key slot")
    ax.set_ylabel("query slot")
    ax.set_title(title, fontsize=10)


def _legend(fig) -> None:  # noqa: ANN001
    from matplotlib.patches import Patch

    fig.legend(
        handles=[
            Patch(color="#3b6fb6", label="attends: ground-truth context"),
            Patch(color="#e07b39", label="attends: the candidate itself"),
            Patch(color="#b0b0b0", label="pad / unused: itself only"),
            Patch(color="#f4f4f4", label="blocked"),
        ],
        loc="lower center",
        ncol=2,
        fontsize=8,
        frameon=False,
    )


def _axis_labels(ex: MaskExample, slots: range) -> list[str]:
    pos = ex.expansion.position_ids[0]
    return [f"{s}: {ex.slot_labels[s]} (p{int(pos[s])})" for s in slots]


def draw_ribbon(ex: MaskExample, path: Path) -> None:
    """``ribbon_mask.png``: the dense ribbon mask of the packed sequence."""
    import matplotlib.pyplot as plt

    exp = ex.expansion
    T, T2 = exp.seq_len, exp.expanded_len
    mask = exp.attention_mask[0, 0]
    labels = _axis_labels(ex, range(T2))
    fig, ax = plt.subplots(figsize=(7.2, 7.6))
    _draw_matrix(
        ax, mask, labels, labels, ex.slot_kinds, ex.slot_kinds,
        f"Ribbon mask: T={T} (left padding), d={exp.num_candidates}, T2={T2}\n"
        "slot: token (position id); y'(u) = candidate u replacing y",
    )
    ax.axhline(T - 0.5, color="black", linewidth=1.5)
    ax.axvline(T - 0.5, color="black", linewidth=1.5)
    _legend(fig)
    fig.subplots_adjust(bottom=0.22, left=0.2, top=0.92)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_candidate_layout(ex: MaskExample, path: Path) -> None:
    """``candidate_layout.png``: ground-truth pass (causal) and the cached candidate block."""
    import matplotlib.pyplot as plt

    exp = ex.expansion
    T, T2 = exp.seq_len, exp.expanded_len
    mask = exp.attention_mask[0, 0]
    gt_labels = _axis_labels(ex, range(T))
    all_labels = _axis_labels(ex, range(T2))
    fig, (ax0, ax1) = plt.subplots(
        1, 2, figsize=(11.0, 5.4), gridspec_kw={"width_ratios": [T, T2]}
    )
    _draw_matrix(
        ax0, mask[:T, :T], gt_labels, gt_labels, ex.slot_kinds[:T], ex.slot_kinds[:T],
        "Pass 1: ground truth, plain causal mask\n(its keys/values are cached)",
    )
    _draw_matrix(
        ax1, mask[T:, :], all_labels[T:], all_labels, ex.slot_kinds[T:], ex.slot_kinds,
        f"Pass 2: candidate block, mask [n_new={T2 - T}, n_cached+n_new={T2}]\n"
        "(rows T: of the ribbon mask)",
    )
    ax1.axvline(T - 0.5, color="black", linewidth=1.5)
    _legend(fig)
    fig.subplots_adjust(bottom=0.3, left=0.12, right=0.98, wspace=0.45, top=0.88)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    args.out.mkdir(parents=True, exist_ok=True)
    ex = mask_example()
    # The figure must show exactly the library's mask.
    expected = ribbon_mask(ex.candidate_mask, NUM_CANDIDATES, ex.attention_mask)
    if not torch.equal(expected, ex.expansion.attention_mask):
        raise RuntimeError("tpa_expand's attention_mask differs from ribbon_mask")
    paths = [args.out / "ribbon_mask.png", args.out / "candidate_layout.png"]
    draw_ribbon(ex, paths[0])
    draw_candidate_layout(ex, paths[1])
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main()
