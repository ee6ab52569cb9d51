"""Row maps between a teacher's and a student's sequences (tokinteract.rowmap): known maps."""

from __future__ import annotations

import pytest
import torch

from tokinteract.rowmap import (
    RowMap,
    grid_area_matrix,
    resample_grid_weights,
    response_row_map,
    visual_row_map,
)


def test_area_matrix_known_values() -> None:
    torch.testing.assert_close(grid_area_matrix((3, 4), (3, 4)), torch.eye(12))
    # 1-D 3 -> 2: cell 0 of the destination is covered 2/3 by source 0 and 1/3 by source 1
    want = torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]])
    torch.testing.assert_close(grid_area_matrix((3, 1), (2, 1)), want)
    torch.testing.assert_close(grid_area_matrix((1, 3), (1, 2)), want)
    # 2 -> 4 (upsampling): every destination cell lies inside one source cell
    up = grid_area_matrix((2, 2), (4, 4))
    src = torch.arange(4.0)
    torch.testing.assert_close((up @ src).view(4, 4), src.view(2, 2).repeat_interleave(2, 0).repeat_interleave(2, 1))
    # divisible sizes: the same as torch's area interpolation; rows always sum to 1
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.interpolate(x[None, None], size=(3, 2), mode="area")[0, 0]
    torch.testing.assert_close((grid_area_matrix((6, 4), (3, 2)) @ x.flatten()).view(3, 2), ref)
    for s, d in [((5, 3), (2, 7)), ((4, 6), (3, 4)), ((1, 1), (3, 2))]:
        torch.testing.assert_close(grid_area_matrix(s, d).sum(1), torch.ones(d[0] * d[1]))


def test_resampled_weights_keep_each_image_mass_and_place_it_by_area() -> None:
    w = torch.zeros(16)
    w[0] = 0.5  # the top-left teacher cell of a 4x4 grid holds half the attention
    torch.testing.assert_close(resample_grid_weights(w, (4, 4), (2, 2)), torch.tensor([0.5, 0.0, 0.0, 0.0]))
    # upsampling splits a cell's mass evenly over the 4 cells inside it
    up = resample_grid_weights(torch.tensor([0.4, 0.0, 0.0, 0.2]), (2, 2), (4, 4)).view(4, 4)
    want = torch.zeros(4, 4)
    want[:2, :2], want[2:, 2:] = 0.1, 0.05
    torch.testing.assert_close(up, want)
    # 3 -> 2: the middle cell's mass is split half and half
    torch.testing.assert_close(resample_grid_weights(torch.tensor([0.3, 0.2, 0.1]), (3, 1), (2, 1)),
                               torch.tensor([0.4, 0.2]))
    g = torch.Generator().manual_seed(1)
    w = torch.rand(35, generator=g)
    for dst in [(2, 3), (7, 5), (9, 11)]:
        assert float(resample_grid_weights(w, (5, 7), dst).sum()) == pytest.approx(float(w.sum()), rel=1e-6)
    with pytest.raises(ValueError, match=r"weights must hold 6 values \(src_grid \(2, 3\)\), got 5"):
        resample_grid_weights(torch.ones(5), (2, 3), (1, 1))
    with pytest.raises(ValueError, match=r"dst_grid must be a \(height, width\) pair of ints >= 1, got \(0, 2\)"):
        grid_area_matrix((2, 2), (0, 2))


def test_response_rows_map_the_same_tokens_after_different_prefixes() -> None:
    i = -100
    s = torch.tensor([[i, i, i, 7, 8, 9, i], [i, i, 5, 6, i, i, i]])
    t = torch.tensor([[i, i, i, i, i, 7, 8, 9, i], [i, 5, 6, i, i, i, i, i, i]])
    m = response_row_map(s, t)
    x = torch.arange(2 * 9, dtype=torch.float32).view(2, 9, 1) * torch.tensor([1.0, -1.0])
    y = m.apply(x)
    assert y.shape == (2, 7, 2)
    # student row 2 predicts token 7 (position 3); the teacher predicts it at row 4
    for b, pairs in enumerate([[(2, 4), (3, 5), (4, 6)], [(1, 0), (2, 1)]]):
        for ds, dt in pairs:
            torch.testing.assert_close(y[b, ds], x[b, dt])
        others = [r for r in range(7) if r not in [p[0] for p in pairs]]
        assert bool((y[b, others] == 0).all())
    assert torch.equal(m.covered(), torch.zeros(2, 7, dtype=torch.bool).index_put_(
        (torch.tensor([0, 0, 0, 1, 1]), torch.tensor([2, 3, 4, 1, 2])), torch.tensor(True)))
    bad = t.clone()
    bad[1, 2] = 4
    with pytest.raises(ValueError, match=r"sample 1: .*different responses \(2 vs 2 supervised tokens; first "
                                         r"difference at supervised token 1: \(student, teacher\) \(6, 4\)\)"):
        response_row_map(s, bad)
    short = t.clone()
    short[0, 7] = i
    with pytest.raises(ValueError, match=r"sample 0: .*\(3 vs 2 supervised tokens; .*token 2: .*\(9, None\)"):
        response_row_map(s, short)
    with pytest.raises(TypeError, match="teacher_labels"):  # (jaxtyping checks first in the tests)
        response_row_map(s, t.float())


def test_visual_rows_resample_each_image_onto_the_students_grid() -> None:
    # sample 0: one image, student 2x2 at positions 1..4, teacher 4x4 at positions 2..17
    # sample 1: two images, student 1x2 and 2x2, teacher 2x2 and 2x2
    Ts, Tt = 8, 20
    sv, tv = torch.zeros(2, Ts, dtype=torch.bool), torch.zeros(2, Tt, dtype=torch.bool)
    sv[0, 1:5], tv[0, 2:18] = True, True
    sv[1, 0:2], sv[1, 3:7] = True, True
    tv[1, 1:5], tv[1, 6:10] = True, True
    mean, mass = visual_row_map(sv, tv, [[(2, 2)], [(1, 2), (2, 2)]], [[(4, 4)], [(2, 2), (2, 2)]])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, Tt, 3, generator=g)
    y = mean.apply(x)
    want = torch.zeros(2, Ts, 3)
    img = x[0, 2:18].T.reshape(3, 1, 4, 4)
    want[0, 1:5] = torch.nn.functional.avg_pool2d(img, 2).reshape(3, 4).T
    want[1, 0:2] = x[1, 1:5].view(2, 2, 3).mean(0)  # 2x2 -> 1x2: mean over each column
    want[1, 3:7] = x[1, 6:10]  # the same grid: identity
    torch.testing.assert_close(y, want)
    w = torch.rand(2, Tt, generator=g) * tv
    ws = mass.apply(w[..., None])[..., 0]
    torch.testing.assert_close(ws[0, 1:5], resample_grid_weights(w[0, 2:18], (4, 4), (2, 2)))
    torch.testing.assert_close(ws[1, 0:2], w[1, 1:5].view(2, 2).sum(0))
    torch.testing.assert_close(ws[1, 3:7], w[1, 6:10])
    torch.testing.assert_close(ws.sum(1), w.sum(1))
    assert bool((ws[~sv] == 0).all())
    with pytest.raises(ValueError, match=r"sample 1: the student shows 1 images, the teacher 2"):
        visual_row_map(sv, tv, [[(2, 2)], [(2, 3)]], [[(4, 4)], [(2, 2), (2, 2)]])
    with pytest.raises(ValueError, match=r"sample 0: the teacher's image grids \[\(3, 3\)\] hold 9 visual tokens "
                                         r"but its sequence has 16"):
        visual_row_map(sv, tv, [[(2, 2)], [(1, 2), (2, 2)]], [[(3, 3)], [(2, 2), (2, 2)]])


def test_rowmap_apply_equals_a_loop_and_maps_combine() -> None:
    g = torch.Generator().manual_seed(2)
    b = torch.tensor([0, 0, 1, 1, 1])
    dst = torch.tensor([0, 2, 1, 1, 3])
    src = torch.tensor([4, 1, 0, 2, 2])
    w = torch.rand(5, generator=g)
    m = RowMap(2, 4, 5, b, dst, src, w)
    x = torch.randn(2, 5, 3, dtype=torch.float64, generator=g)
    want = torch.zeros(2, 4, 3, dtype=torch.float64)
    for e in range(5):
        want[b[e], dst[e]] += float(w[e]) * x[b[e], src[e]]
    y = m.apply(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want)
    xg = x.clone().requires_grad_(True)
    m.apply(xg).sum().backward()
    assert xg.grad is not None and float(xg.grad[1, 2].sum()) == pytest.approx(3 * float(w[3] + w[4]))
    other = RowMap(2, 4, 5, torch.tensor([0]), torch.tensor([3]), torch.tensor([0]), torch.tensor([1.0]))
    both = m + other
    torch.testing.assert_close(both.apply(x), want + other.apply(x))
    with pytest.raises(ValueError, match="both write a destination row"):
        m + m
    with pytest.raises(ValueError, match=r"x must have shape \[2, 5, \.\.\.\] \(batch, source rows\), got \(2, 4, 3\)"):
        m.apply(torch.zeros(2, 4, 3))
