"""The cached path's linked weight gradients (tokinteract.hf._shared): one gradient per shared
weight, the same values as two gradients added by autograd, every other module untouched."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

from tokinteract import tpa_expand
from tokinteract.hf import _shared, cached_candidate_forward, ground_truth_forward

ATOL = 1e-6


def _edges(loss: torch.Tensor, model: nn.Module) -> dict[str, int]:
    """How many graph nodes hand a gradient to each parameter (edges into its AccumulateGrad)."""
    names = {id(p): n for n, p in model.named_parameters()}
    count: dict[str, int] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        for nxt, _ in f.next_functions:
            var = getattr(nxt, "variable", None)
            if var is not None and id(var) in names:
                count[names[id(var)]] = count.get(names[id(var)], 0) + 1
            if nxt is not None:
                stack.append(nxt)
    return count


def _setup(tiny, kind, **kw):
    if kind == "llava":
        model = tiny.llava().train()
        ids, am, px = tiny.image_batch((9, 6), 10, padding="left")
        cm = tiny.candidate_mask(am, skip_first=1 + tiny.PATCHES)
        extra = {"pixel_values": px}
    else:
        model = tiny.qwen2(**kw).train()
        ids, am = tiny.text_batch((9, 6), 10, padding="left")
        ids[0, 2] = 0  # the padding_idx as a real token: its embedding row gets no gradient
        cm = tiny.candidate_mask(am)
        extra = {}
    cands = torch.randint(0, tiny.VOCAB, (*ids.shape, 2), generator=torch.Generator().manual_seed(1))
    cands[cands == tiny.IMAGE_TOKEN] = 0
    return model, ids, am, tpa_expand(ids, cands, cm, am), extra


def _step(model, ids, am, exp, extra, output, *, shared, backward=1, use_candidates=True):
    model.zero_grad(set_to_none=True)
    with mock.patch.object(_shared, "ENABLED", shared):
        gt = ground_truth_forward(model, ids, am, output=output, **extra)
        first = gt.logits if output == "logits" else gt.hidden_states
        cand = cached_candidate_forward(model, gt, exp)
    assert (gt.shared is not None) == shared
    out = torch.cat([first, cand], 1) if use_candidates else first
    loss = out.square().mean() + out[..., :5].sum() * 0.01
    edges = _edges(loss, model)
    for i in range(backward):
        loss.backward(retain_graph=i + 1 < backward)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, edges


@pytest.mark.parametrize(
    "kind,output,tied",
    [("qwen2", "logits", False), ("qwen2", "hidden", False), ("qwen2", "logits", True), ("llava", "hidden", False)],
)
def test_one_gradient_per_weight_and_the_same_gradients(tiny, kind, output, tied):
    model, ids, am, exp, extra = _setup(tiny, kind, **({"tie_word_embeddings": True} if tied else {}))
    out_s, g_s, e_s = _step(model, ids, am, exp, extra, output, shared=True)
    out_u, g_u, e_u = _step(model, ids, am, exp, extra, output, shared=False)
    assert torch.equal(out_s, out_u)
    assert g_s.keys() == g_u.keys() and len(g_s) > 10
    for n in g_u:
        torch.testing.assert_close(g_s[n], g_u[n], atol=ATOL, rtol=0, msg=n)
    text = [n for n in e_u if ("layers." in n and "norm" not in n and "vision" not in n) or "embed_tokens" in n]
    assert len(text) > 10
    for n in text:
        # without links every decoder weight gets a gradient from each call; with them, one
        # (a tied embedding: one from the lookups and one from the LM head, which is a Linear)
        want = 2 if tied and "embed_tokens" in n else 1
        assert e_u[n] == 2 * want, (n, e_u[n])
        assert e_s[n] == want, (n, e_s[n])
    if kind == "qwen2":
        assert float(g_s["model.embed_tokens.weight"][0].abs().max()) == 0.0 or tied


def test_retain_graph_and_unused_candidates(tiny):
    model, ids, am, exp, extra = _setup(tiny, "qwen2")
    _, g_s, _ = _step(model, ids, am, exp, extra, "logits", shared=True, backward=2)
    _, g_u, _ = _step(model, ids, am, exp, extra, "logits", shared=False, backward=2)
    for n in g_u:
        torch.testing.assert_close(g_s[n], g_u[n], atol=ATOL, rtol=0, msg=n)
    # candidate block computed but not in the loss: the ground-truth nodes get no link gradient
    _, g_s, _ = _step(model, ids, am, exp, extra, "logits", shared=True, use_candidates=False)
    _, g_u, _ = _step(model, ids, am, exp, extra, "logits", shared=False, use_candidates=False)
    for n in g_u:
        torch.testing.assert_close(g_s[n], g_u[n], atol=ATOL, rtol=0, msg=n)


class _Scaled(nn.Embedding):
    def forward(self, ids):  # a subclass with its own forward (e.g. Gemma's scaled embedding)
        return super().forward(ids) * 2.0


def test_only_plain_modules_with_gradients_take_part(tiny):
    model = tiny.qwen2().train()
    lin = model.model.layers[0].mlp.up_proj
    hooked = model.model.layers[0].mlp.down_proj
    hooked.forward = hooked.forward  # an instance attribute, as accelerate's hooks set
    model.model.layers[1].mlp.gate_proj.weight.requires_grad_(False)
    emb = _Scaled(tiny.VOCAB, 32, padding_idx=0)
    model.model.embed_tokens = emb
    mods = _shared.SharedTape(model).modules
    assert lin in mods
    assert hooked not in mods and emb not in mods and model.model.layers[1].mlp.gate_proj not in mods
    ids, am = tiny.text_batch((9, 6), 10)
    with torch.no_grad():
        assert ground_truth_forward(model, ids, am).shared is None
    assert ground_truth_forward(model, ids, am, use_cache=False).shared is None
    gt = ground_truth_forward(model, ids, am)
    assert gt.shared is not None and id(lin) in gt.shared.links
    # the patch is gone after the pass; the hooked module keeps its own forward
    assert "forward" not in lin.__dict__ and "forward" in hooked.__dict__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _shared.SharedTape.active()
