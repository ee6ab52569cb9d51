"""The single helper that masks, weights and reduces per-token values.

Every loss in tokinteract returns per-token values first and reduces them here, so the
convention is the same everywhere:

    loss = sum_{valid i} w_i * v_i / max(count, 1)

where ``count`` is ``num_items`` when the caller passes one (a global count across
gradient-accumulation steps or ranks) and the number of valid entries otherwise.
A batch with nothing valid gives exactly 0 with zero gradients, never NaN.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tokinteract._checks import check_bool, check_tensor

__all__ = ["compute_dtype", "masked_reduce", "resolve_count"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype losses compute in: fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def resolve_count(mask: Tensor, num_items: int | float | Tensor | None) -> Tensor:
    """The denominator: ``num_items`` if given, else ``mask.sum()``, clamped to >= 1."""
    if num_items is None:
        count = mask.sum().to(torch.float32)
    elif isinstance(num_items, Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a scalar, got shape {tuple(num_items.shape)}")
        count = num_items.detach().to(device=mask.device, dtype=torch.float32).reshape(())
    elif isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
        raise TypeError(f"num_items must be a number or a scalar tensor, got {type(num_items).__name__}")
    else:
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        count = torch.tensor(float(num_items), device=mask.device)
    return count.clamp(min=1.0)


def masked_reduce(
    values: Float[Tensor, "*shape"],
    mask: Bool[Tensor, "*shape"] | None = None,
    *,
    weights: Float[Tensor, "*shape"] | None = None,
    num_items: int | float | Tensor | None = None,
) -> Float[Tensor, ""]:
    """``sum(values * weights over mask) / max(num_items or mask.sum(), 1)``.

    Computed in fp32 (fp64 when ``values`` are fp64).

    Masked-out entries contribute exactly nothing (``torch.where``, not multiplication, so a
    NaN or inf in a masked-out entry cannot leak into the result or its gradient).
    """
    check_tensor("values", values)
    values = values.to(compute_dtype(values))
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    check_bool("mask", mask)
    if mask.shape != values.shape:
        raise ValueError(f"mask must have the shape of values {tuple(values.shape)}, got {tuple(mask.shape)}")
    if weights is not None:
        if weights.shape != values.shape:
            raise ValueError(
                f"weights must have the shape of values {tuple(values.shape)}, got {tuple(weights.shape)}"
            )
        # mask both factors first: a NaN/inf in a masked-out value or weight must not reach
        # the result or either gradient (0 * NaN = NaN in the backward of a product)
        zero = values.new_zeros(())
        values = torch.where(mask, values, zero) * torch.where(mask, weights.to(values.dtype), zero)
    total = torch.where(mask, values, values.new_zeros(())).sum()
    return total / resolve_count(mask, num_items)
