"""masked_reduce: the one reducer every loss uses."""

from __future__ import annotations

import pytest
import torch

import tokinteract as ti


def test_mean_over_valid_and_weights():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[True, False, True], [False, False, True]])
    assert ti.masked_reduce(v, m).item() == pytest.approx((1 + 3 + 6) / 3)
    w = torch.tensor([[2.0, 100.0, 0.5], [100.0, 100.0, 1.0]])
    assert ti.masked_reduce(v, m, weights=w).item() == pytest.approx((2 + 1.5 + 6) / 3)
    assert ti.masked_reduce(v).item() == pytest.approx(21 / 6)


def test_num_items_forms():
    v = torch.arange(6.0).reshape(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    for n in (10, 10.0, torch.tensor(10), torch.tensor([10.0])):
        assert ti.masked_reduce(v, m, num_items=n).item() == pytest.approx(1.5)
    assert ti.masked_reduce(v, m, num_items=0).item() == pytest.approx(15.0)  # clamped to 1
    with pytest.raises(ValueError, match="num_items"):
        ti.masked_reduce(v, m, num_items=-1)
    with pytest.raises(TypeError, match="num_items"):
        ti.masked_reduce(v, m, num_items=True)
    with pytest.raises(ValueError, match="num_items"):
        ti.masked_reduce(v, m, num_items=torch.tensor([1.0, 2.0]))


def test_empty_mask_is_exact_zero_with_zero_grad():
    v = torch.randn(3, 4, requires_grad=True)
    out = ti.masked_reduce(v, torch.zeros(3, 4, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.equal(v.grad, torch.zeros_like(v))
    e = torch.zeros(0, requires_grad=True)
    assert ti.masked_reduce(e).item() == 0.0


def test_nonfinite_masked_out_entries_never_leak():
    v = torch.tensor([1.0, float("nan"), float("inf")], requires_grad=True)
    w = torch.tensor([2.0, float("nan"), 3.0], requires_grad=True)
    m = torch.tensor([True, False, False])
    out = ti.masked_reduce(v, m, weights=w)
    out.backward()
    assert out.item() == 2.0
    assert torch.equal(v.grad, torch.tensor([2.0, 0.0, 0.0]))
    assert torch.equal(w.grad, torch.tensor([1.0, 0.0, 0.0]))


def test_dtypes_and_shape_errors():
    v = torch.randn(2, 3).bfloat16()
    assert ti.masked_reduce(v).dtype == torch.float32
    assert ti.masked_reduce(v.double()).dtype == torch.float64
    with pytest.raises((ValueError, TypeError), match="mask|jaxtyping|Type-check"):
        ti.masked_reduce(torch.randn(2, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError), match="weights|jaxtyping|Type-check"):
        ti.masked_reduce(torch.randn(2, 3), weights=torch.ones(3))
    with pytest.raises(TypeError, match="mask"):
        ti.masked_reduce(torch.randn(2, 3), torch.ones(2, 3))  # type: ignore[arg-type]
