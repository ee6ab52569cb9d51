"""Device-to-host synchronisations per loss call, counted through a ``TorchDispatchMode``.

A read of a tensor's value on the host (``aten._local_scalar_dense``, behind ``.item()``,
``int(t)``, ``bool(t)``; ``aten.item``; ``aten.is_nonzero``) stalls the device until every
queued kernel has run. Per call (forward and backward):

* ``validate=True`` (the default): exactly 1, the single read of all value checks
  (:class:`tokinteract._checks.Deferred`), whatever the backend;
* ``validate=False``: 0 for every backend.

Row selection (``nonzero``, which needs the number of rows) is not counted: the result's
shapes need it. It is stated below as a second count.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tokinteract as ti

SYNC_OPS = ("_local_scalar_dense", "item", "is_nonzero")
B, T, V, H, D = 2, 7, 13, 5, 2


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return sum(self.ops[name] for name in SYNC_OPS)


def _inputs():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100
    cm = ti.shift_labels(labels) != -100
    cand = torch.randint(0, V, (B, T, D), generator=g)
    ex = ti.tpa_expand(torch.randint(0, V, (B, T), generator=g), cand, cm)
    L = ex.expanded_len
    w = torch.rand(B, T, generator=g)
    hs = torch.randn(B, L, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    ht, Wt = torch.randn(B, L, H, generator=g), torch.randn(V, H, generator=g)
    return labels, ex, w, hs, W, ht, Wt


def _count(backend: str, validate: bool) -> CountOps:
    labels, ex, w, hs, W, ht, Wt = _inputs()
    loss = ti.AlignTILoss(backend=backend, validate=validate, chunk_size=4)
    if backend in ("fused", "liger"):
        student, teacher = ti.HiddenStates(hs, W), ti.HiddenStates(ht, Wt)
    else:
        student, teacher = hs @ W.T, ht @ Wt.T
    with CountOps() as counter:
        total, parts = loss(student, teacher, labels, expansion=ex, visual_weights=w)
        total.backward()
    assert set(parts) == {"sft", "kd", "iva", "tpa"} and torch.isfinite(total)
    return counter


@pytest.mark.parametrize("backend", ["eager", "chunked", "fused"])
def test_no_sync_without_validation(backend):
    assert _count(backend, validate=False).syncs == 0


@pytest.mark.parametrize("backend", ["eager", "chunked", "fused"])
def test_one_sync_with_validation(backend):
    counter = _count(backend, validate=True)
    assert counter.syncs == 1, counter.ops


@pytest.mark.parametrize("backend", ["eager", "chunked", "fused"])
def test_row_selection_is_the_only_other_host_dependence(backend):
    # the plan selects its rows with one nonzero; TPA's candidate slots take one more
    assert _count(backend, validate=False).ops["nonzero"] == 2


def test_validation_still_refuses_bad_values_with_one_read():
    labels, ex, w, hs, W, ht, Wt = _inputs()
    s, t = hs @ W.T, ht @ Wt.T
    bad = w.clone()
    bad[0, 0] = -1.0
    with pytest.raises(ValueError, match="visual_weights must be >= 0, got 1 negative"):
        ti.AlignTILoss()(s, t, labels, expansion=ex, visual_weights=bad)
    # validate=False reads nothing back, so the same call returns (a wrong number: the caller's risk)
    total, _ = ti.AlignTILoss(validate=False)(s, t, labels, expansion=ex, visual_weights=bad)
    assert total.shape == ()
