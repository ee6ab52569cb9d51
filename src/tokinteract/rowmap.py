"""Row maps between two sequences of one sample: a teacher with its own prefix or visual grid.

A teacher may read a different sequence than the student: another number of visual tokens per
image (a higher resolution, another vision tower), hence other positions for the same response.
The losses of :mod:`tokinteract` compare rows position by position, so the teacher's outputs are
first carried onto the student's layout by a :class:`RowMap`:

    dst[b, i] = sum_e weight[e] * src[b, j]      over the entries e = (b, i, j, weight)

(rows of ``dst`` without an entry are 0; no loss reads them). Two kinds of entries:

* **Response rows** (:func:`response_row_map`): the k-th supervised row of the student (the row
  whose next token is the k-th supervised label, :func:`tokinteract.shift_labels`) takes the
  k-th supervised row of the teacher, weight 1. Both must supervise the same tokens in the same
  order (same responses, different prefixes), else ``ValueError`` naming the sample. KD, SFT and
  TPA then compare the rows that predict the same token after the same response prefix.
* **Visual rows** (:func:`visual_row_map`): when both sequences show each image as a grid of
  visual tokens (row-major), the teacher's grid ``Ht x Wt`` is resampled onto the student's
  ``Hs x Ws`` by exact **area overlap** (:func:`grid_area_matrix`): both grids tile the same
  image, and student cell ``k`` takes teacher cell ``j`` with weight
  ``R[k, j] = area(k ∩ j) / area(k)`` (each row sums to 1: an area-weighted mean; identity when
  the grids are equal). Two maps come out:

  - ``mean``: ``R``, for the teacher's *outputs* at the student's visual tokens (its hidden
    states or logits: since the LM head is affine and ``R``'s rows sum to 1, resampling hidden
    states and resampling logits give the same logits);
  - ``mass``: ``M[k, j] = area(k ∩ j) / area(j) = R[k, j] * (Ht Wt) / (Hs Ws)``, for IVA's
    importance weights. IVA's weights are attention *mass* (each weight is the share of the
    instruction rows' attention that lands on the token; :func:`tokinteract.visual_importance`
    leaves them unnormalised), so the resampled map keeps each image's total mass: every teacher
    cell's weight is split over the student cells it overlaps, by area (``M``'s columns sum to 1).

Pure torch; the per-family grid layouts (which family has grids, how they are read from the
processor's inputs) live in :func:`tokinteract.hf.families.image_grids`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tokinteract._checks import check_bool, check_integer, check_tensor

__all__ = ["RowMap", "grid_area_matrix", "resample_grid_weights", "response_row_map", "visual_row_map"]

Grid = tuple[int, int]


@dataclass(frozen=True, eq=False)
class RowMap:
    """Carry rows of a ``[batch, src_len, ...]`` tensor onto a ``[batch, dst_len, ...]`` layout.

    ``dst[b[e], dst[e]] += weight[e] * src[b[e], src[e]]`` for every entry ``e``; rows without an
    entry are 0.

    Attributes:
        batch: ``B``.
        dst_len: rows of the result (the student's sequence length).
        src_len: rows of the input (the teacher's sequence length).
        b, dst, src: ``[E]`` long entry indexes.
        weight: ``[E]`` fp32 entry weights.
    """

    batch: int
    dst_len: int
    src_len: int
    b: Int[Tensor, " rows"]
    dst: Int[Tensor, " rows"]
    src: Int[Tensor, " rows"]
    weight: Float[Tensor, " rows"]

    def apply(self, x: Tensor) -> Tensor:
        """``[B, dst_len, ...]`` from ``x`` ``[B, src_len, ...]``, summed in fp32, returned in ``x``'s dtype."""
        check_tensor("x", x)
        if x.ndim < 2 or tuple(x.shape[:2]) != (self.batch, self.src_len):
            raise ValueError(
                f"x must have shape [{self.batch}, {self.src_len}, ...] (batch, source rows), got {tuple(x.shape)}"
            )
        dev = x.device
        b, dst, src = self.b.to(dev), self.dst.to(dev), self.src.to(dev)
        acc = torch.promote_types(x.dtype, torch.float32)
        rows = x[b, src].to(acc)
        w = self.weight.to(device=dev, dtype=acc).reshape(-1, *([1] * (x.ndim - 2)))
        out = torch.zeros((self.batch, self.dst_len, *x.shape[2:]), dtype=acc, device=dev)
        out.index_put_((b, dst), rows * w, accumulate=True)
        return out.to(x.dtype)

    def covered(self) -> Bool[Tensor, "batch seq"]:
        """Which destination rows have at least one entry."""
        out = torch.zeros((self.batch, self.dst_len), dtype=torch.bool, device=self.b.device)
        out[self.b, self.dst] = True
        return out

    def __add__(self, other: "RowMap") -> "RowMap":
        """Both maps' entries (same batch and lengths; they must not share a destination row)."""
        if not isinstance(other, RowMap):
            return NotImplemented
        if (self.batch, self.dst_len, self.src_len) != (other.batch, other.dst_len, other.src_len):
            raise ValueError(
                f"cannot combine RowMaps of (batch, dst_len, src_len) {(self.batch, self.dst_len, self.src_len)} and "
                f"{(other.batch, other.dst_len, other.src_len)}"
            )
        if bool((self.covered() & other.covered().to(self.b.device)).any()):
            raise ValueError("cannot combine RowMaps that both write a destination row")
        dev = self.b.device
        return RowMap(
            self.batch, self.dst_len, self.src_len, *(
                torch.cat([getattr(self, k), getattr(other, k).to(dev)]) for k in ("b", "dst", "src", "weight")
            ),
        )


def _empty(batch: int, dst_len: int, src_len: int, device: torch.device) -> RowMap:
    z = torch.zeros(0, dtype=torch.long, device=device)
    return RowMap(batch, dst_len, src_len, z, z.clone(), z.clone(), torch.zeros(0, device=device))


def response_row_map(
    student_labels: Int[Tensor, "batch seq"],
    teacher_labels: Int[Tensor, "batch tseq"],
    *,
    ignore_index: int = -100,
) -> RowMap:
    """The student's supervised logits rows -> the teacher's rows predicting the same tokens.

    Row ``t`` is supervised when ``labels[b, t + 1] != ignore_index`` (it predicts that label).
    The k-th supervised row of sample ``b`` in the student takes the k-th in the teacher.

    Raises:
        ValueError: a sample whose two label sequences (in order) differ, naming the sample,
            the counts and the first different token; different batch sizes.
        TypeError: labels that are not integer tensors.
    """
    from tokinteract.kd import shift_labels

    for name, lab in (("student_labels", student_labels), ("teacher_labels", teacher_labels)):
        check_tensor(name, lab, ndim=2)
        check_integer(name, lab)
    B = student_labels.shape[0]
    if teacher_labels.shape[0] != B:
        raise ValueError(
            f"teacher_labels must have the student's batch size {B}, got shape {tuple(teacher_labels.shape)}"
        )
    ts, tt = shift_labels(student_labels, ignore_index), shift_labels(teacher_labels, ignore_index).to(student_labels.device)
    vs, vt = ts != ignore_index, tt != ignore_index
    ns, nt = vs.sum(1), vt.sum(1)
    for b in range(B):
        a, c = ts[b][vs[b]], tt[b][vt[b]]
        if int(ns[b]) != int(nt[b]) or not torch.equal(a, c):
            k = next((i for i in range(min(len(a), len(c))) if int(a[i]) != int(c[i])), min(len(a), len(c)))
            got = (int(a[k]) if k < len(a) else None, int(c[k]) if k < len(c) else None)
            raise ValueError(
                f"sample {b}: the student and the teacher supervise different responses ({int(ns[b])} vs "
                f"{int(nt[b])} supervised tokens; first difference at supervised token {k}: (student, teacher) "
                f"{got}); their sequences must share every response token"
            )
    bs, rs = vs.nonzero(as_tuple=True)
    _, rt = vt.nonzero(as_tuple=True)
    w = torch.ones(bs.shape[0], dtype=torch.float32, device=bs.device)
    return RowMap(B, student_labels.shape[1], teacher_labels.shape[1], bs, rs, rt.to(bs.device), w)


def _overlap_1d(n_src: int, n_dst: int) -> Tensor:
    """``[n_dst, n_src]``: the share of destination cell i covered by source cell j (rows sum to 1).

    On ``[0, n_src * n_dst]``: cell i spans ``[i n_src, (i+1) n_src]``, cell j ``[j n_dst, (j+1) n_dst]``
    (integers: exact).
    """
    i = torch.arange(n_dst, dtype=torch.float64)[:, None]
    j = torch.arange(n_src, dtype=torch.float64)[None, :]
    lo = torch.maximum(i * n_src, j * n_dst)
    hi = torch.minimum((i + 1) * n_src, (j + 1) * n_dst)
    return (hi - lo).clamp(min=0) / n_src


def _check_grid(name: str, grid: object) -> Grid:
    if (
        not isinstance(grid, (tuple, list)) or len(grid) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in grid)
    ):
        raise ValueError(f"{name} must be a (height, width) pair of ints >= 1, got {grid!r}")
    return int(grid[0]), int(grid[1])


def grid_area_matrix(src_grid: Grid, dst_grid: Grid) -> Float[Tensor, "cells tcells"]:
    """``R[k, j] = area(k ∩ j) / area(k)`` for two grids tiling the same image (row-major cells).

    ``[Hd * Wd, Hs * Ws]`` fp32; each row sums to 1; the identity when the grids are equal; equal
    to ``torch.nn.functional.interpolate(mode="area")`` when the source sizes are multiples of
    the destination's (that function's bins are not exact area overlaps otherwise).
    """
    hs, ws = _check_grid("src_grid", src_grid)
    hd, wd = _check_grid("dst_grid", dst_grid)
    return torch.kron(_overlap_1d(hs, hd), _overlap_1d(ws, wd)).float()


def resample_grid_weights(
    weights: Float[Tensor, " tcells"], src_grid: Grid, dst_grid: Grid
) -> Float[Tensor, " cells"]:
    """One image's importance weights (row-major over ``src_grid``) resampled onto ``dst_grid``.

    Mass-preserving area resampling: ``w_dst[k] = sum_j area(k ∩ j) / area(j) * w_src[j]``, i.e.
    the area mean :func:`grid_area_matrix` rescaled by ``(Hs Ws) / (Hd Wd)``, so that the image's
    total weight (its share of the instruction rows' attention) is kept.
    """
    hs, ws = _check_grid("src_grid", src_grid)
    check_tensor("weights", weights, ndim=1)
    if weights.shape[0] != hs * ws:
        raise ValueError(f"weights must hold {hs * ws} values (src_grid {src_grid}), got {weights.shape[0]}")
    hd, wd = _check_grid("dst_grid", dst_grid)
    m = grid_area_matrix(src_grid, dst_grid).to(weights.device) * (hs * ws / (hd * wd))
    return (m @ weights.float()).to(weights.dtype)


def visual_row_map(
    student_visual: Bool[Tensor, "batch seq"],
    teacher_visual: Bool[Tensor, "batch tseq"],
    student_grids: Sequence[Sequence[Grid]],
    teacher_grids: Sequence[Sequence[Grid]],
) -> tuple[RowMap, RowMap]:
    """``(mean, mass)`` maps from the teacher's visual rows onto the student's (module docstring).

    ``*_grids[b]`` lists the ``(height, width)`` of each image of sample ``b``, in sequence order;
    image ``i``'s tokens are the next ``height * width`` visual positions of the sample (row-major).

    Raises:
        ValueError: grids that do not account for a sample's visual tokens, or a sample whose
            student and teacher show a different number of images, naming the sample.
    """
    for name, vm in (("student_visual", student_visual), ("teacher_visual", teacher_visual)):
        check_tensor(name, vm, ndim=2)
        check_bool(name, vm)
    B, Ts = student_visual.shape
    Tt = teacher_visual.shape[1]
    if teacher_visual.shape[0] != B or len(student_grids) != B or len(teacher_grids) != B:
        raise ValueError(
            f"student_visual, teacher_visual, student_grids and teacher_grids must cover the same batch, got "
            f"{B}, {teacher_visual.shape[0]}, {len(student_grids)} and {len(teacher_grids)} samples"
        )
    dev = student_visual.device
    entries: dict[str, list[list[Tensor]]] = {"mean": [[], [], [], []], "mass": [[], [], [], []]}
    for b in range(B):
        sg = [_check_grid(f"student_grids[{b}]", g) for g in student_grids[b]]
        tg = [_check_grid(f"teacher_grids[{b}]", g) for g in teacher_grids[b]]
        if len(sg) != len(tg):
            raise ValueError(f"sample {b}: the student shows {len(sg)} images, the teacher {len(tg)}")
        sp, tp = student_visual[b].nonzero().flatten(), teacher_visual[b].nonzero().flatten().to(dev)
        for who, grids, pos in (("student", sg, sp), ("teacher", tg, tp)):
            if sum(h * w for h, w in grids) != pos.numel():
                raise ValueError(
                    f"sample {b}: the {who}'s image grids {grids} hold {sum(h * w for h, w in grids)} visual tokens "
                    f"but its sequence has {pos.numel()}"
                )
        s0 = t0 = 0
        for gs, gt in zip(sg, tg):
            ns, nt = gs[0] * gs[1], gt[0] * gt[1]
            r = grid_area_matrix(gt, gs).to(dev)
            k, j = r.nonzero(as_tuple=True)
            for kind, w in (("mean", r[k, j]), ("mass", r[k, j] * (nt / ns))):
                e = entries[kind]
                e[0].append(torch.full_like(k, b))
                e[1].append(sp[s0 + k])
                e[2].append(tp[t0 + j])
                e[3].append(w)
            s0, t0 = s0 + ns, t0 + nt
    out = []
    for kind in ("mean", "mass"):
        e = entries[kind]
        if not e[0]:
            out.append(_empty(B, Ts, Tt, dev))
        else:
            out.append(RowMap(B, Ts, Tt, *(torch.cat(x) for x in e)))
    return out[0], out[1]
