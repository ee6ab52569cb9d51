"""The term registry (`tokinteract._plan.TERMS`) is the one place a term is defined.

A term registered there, and nothing else, is evaluated by every backend: the evaluators only
see rows and coefficients. The test adds a term no backend knows (KD on the last supervised
position of each sequence only, a non-uniform coefficient) and checks each backend against a
loop over the rows with the reference divergence, loss and gradients.
"""

from __future__ import annotations

import pytest
import torch

from reference import ref_divergence
from tokinteract import _plan
from tokinteract._checks import Deferred


def _last_supervised(ctx: _plan._Context) -> torch.Tensor:
    valid = ctx.valid
    idx = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    last = torch.where(valid, idx, -1).amax(1, keepdim=True)
    only = valid & (idx == last)
    return ctx.on_ground_truth(only.to(ctx.dtype) / ctx.batch)


@pytest.fixture
def extra_term(monkeypatch: pytest.MonkeyPatch) -> str:
    term = _plan.Term("kd_last", on="div", needs="labels", uniform=False, coefficients=_last_supervised)
    monkeypatch.setattr(_plan, "TERMS", {**_plan.TERMS, term.name: term})
    return term.name


@pytest.mark.parametrize("backend", ["eager", "chunked", "fused"])
def test_a_registered_term_runs_on_every_backend(extra_term: str, backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 7, 5, 11
    hs = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    ws = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    labels[1, 5:] = -100  # last supervised label at 4 -> aligned position 3
    labels[2] = -100
    labels[2, 2] = 1  # one supervised label -> aligned position 1

    # the oracle: a loop over sequences, the reference divergence at the last supervised position
    s_logits, t_logits = hs @ ws.T, ht @ wt.T
    expected = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        sup = (labels[b, 1:] != -100).nonzero().reshape(-1)
        if len(sup):
            k = int(sup[-1])
            expected = expected + ref_divergence(s_logits[b, k], t_logits[b, k]) / B
    exp_grads = torch.autograd.grad(expected, (hs, ws), retain_graph=True)

    if backend == "fused":
        student, teacher = (hs.reshape(B * T, H), ws, None), (ht.reshape(B * T, H), wt, None)
    else:
        student, teacher = (s_logits.reshape(B * T, V), None, None), (t_logits.reshape(B * T, V), None, None)
    checks = Deferred(True)
    total, parts = _plan.run_align_ti(
        student, teacher, backend=backend, vocab=V, chunk_size=2, checks=checks,
        div_opts=dict(kind="fkl", temperature=1.0, beta=0.5, alpha=0.1),
        batch=B, length=T, student_vocab=V, labels=labels, weights={extra_term: 1.0}, ignore_index=-100,
        expansion=None, visual_weights=None, num_items=None, num_sequences=None,
    )
    checks.resolve()
    assert list(parts) == [extra_term]
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts[extra_term], expected.detach(), rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(total, (hs, ws)), exp_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_the_public_parts_are_the_registry() -> None:
    assert _plan.PARTS == ("sft", "kd", "iva", "tpa")
    assert _plan.TEACHER_PARTS == ("kd", "iva", "tpa")
    assert {k for k, t in _plan.TERMS.items() if t.optional} == {"iva", "tpa"}


def test_check_options_names_the_parts() -> None:
    with pytest.raises(ValueError, match="weights must name exactly the parts"):
        _plan.check_options({"sft": 1.0}, "fkl", 1.0, 0.5, 0.1)
