"""Canary: the jaxtyping import hook really checks tokinteract's annotations in tests."""

from __future__ import annotations

import pytest
import torch

import tokinteract


def test_shape_checker_is_on() -> None:
    # labels must be [batch, seq]; a 1-D tensor violates the annotation before our own checks run.
    with pytest.raises(TypeError) as info:
        tokinteract.shift_labels(torch.zeros(5, dtype=torch.long))
    assert "jaxtyping" in type(info.value).__module__ or "Type-check" in str(info.value)


def test_dimension_names_are_bound_across_arguments() -> None:
    # student and teacher must agree on [batch, seq]: jaxtyping binds the shared names.
    with pytest.raises(TypeError):
        tokinteract.token_divergence(torch.zeros(2, 3, 5), torch.zeros(2, 4, 5))
