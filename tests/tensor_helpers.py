"""Small tensor helpers shared by the core tests (a uniquely named module: tests are not a package)."""

from __future__ import annotations

import torch


def seeded_randn(shape, seed, scale=1.0, dtype=torch.float32) -> torch.Tensor:
    """``scale * randn(shape)`` from its own generator, cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def grads(loss, xs):
    return torch.autograd.grad(loss, xs)


def close_all(got, want, **tol) -> None:
    """``assert_close`` pairwise, compared in float64."""
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), **tol)
