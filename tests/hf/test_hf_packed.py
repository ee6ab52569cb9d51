"""Packed and cached TPA forwards through tiny Qwen2 / Qwen3 / LLaVA models."""

from __future__ import annotations

import logging

import pytest
import torch

from tokinteract import AlignTILoss, sample_candidates, shift_labels, tpa_expand
from tokinteract.hf import (
    cached_candidate_forward,
    ground_truth_attention_mask,
    ground_truth_forward,
    packed_forward,
    prefix_self_attention,
    tpa_forward,
)
from tokinteract.hf import _attn
from tokinteract.hf import packed as packed_mod

ATOL = 1e-5


def _build(tiny, kind, attn, padding, *, d=2, seed=0, lengths=(9, 6), T=10):
    model = getattr(tiny, kind)(attn)
    px = {}
    if kind == "llava":
        ids, am, pixel_values = tiny.image_batch(lengths, T, padding=padding, seed=seed)
        px = {"pixel_values": pixel_values}
        cm = tiny.candidate_mask(am, skip_first=1 + tiny.PATCHES, seed=seed)
    else:
        ids, am = tiny.text_batch(lengths, T, padding=padding, seed=seed)
        cm = tiny.candidate_mask(am, seed=seed)
    g = torch.Generator().manual_seed(seed + 5)
    cands = torch.randint(10, tiny.VOCAB, (*ids.shape, d), generator=g)
    return model, ids, am, cm, cands, px


def _naive(model, ids, am, exp, px):
    """Every real slot of the expansion, recomputed as its own plain sequence (batch 1)."""
    B, T = ids.shape
    gt = torch.zeros(B, T, model.config.get_text_config().vocab_size)
    cand = {}
    for b in range(B):
        real = am[b].nonzero().flatten()
        extra = {k: v[b : b + 1] for k, v in px.items()}
        full = model(input_ids=ids[b, real][None], **extra).logits[0]
        gt[b, real] = full
    bb, tt, uu, slot = exp.candidate_slots()
    for b, t, s in zip(bb.tolist(), tt.tolist(), slot.tolist()):
        real = am[b].nonzero().flatten()
        prefix = ids[b, real[real <= t]]
        seq = torch.cat([prefix, exp.input_ids[b, s : s + 1]])[None]
        extra = {k: v[b : b + 1] for k, v in px.items()}
        cand[(b, s)] = model(input_ids=seq, **extra).logits[0, -1]
    return gt, cand


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama", "llava"])
@torch.no_grad()
def test_packed_equals_naive_per_candidate(tiny, kind, attn, padding):
    model, ids, am, cm, cands, px = _build(tiny, kind, attn, padding)
    exp = tpa_expand(ids, cands, cm, am)
    logits = packed_forward(model, exp, **px)
    assert logits.shape == (*exp.input_ids.shape, tiny.VOCAB)
    gt, cand = _naive(model, ids, am, exp, px)
    assert cand, "the test needs candidates"
    T = exp.seq_len
    torch.testing.assert_close(logits[:, :T][am], gt[am], atol=ATOL, rtol=0)
    for (b, s), want in cand.items():
        torch.testing.assert_close(logits[b, s], want, atol=ATOL, rtol=0)
    # the cached path gives the same logits, with either candidate attention
    for attention in ("prefix_self", "dense"):
        cached = tpa_forward(model, exp, mode="cached", attention=attention, **px)
        torch.testing.assert_close(cached, logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["qwen2", "llava"])
def test_flash_attention_is_refused(tiny, kind):
    model, ids, am, cm, cands, px = _build(tiny, kind, "sdpa", "right")
    model.config.get_text_config()._attn_implementation_internal = "flash_attention_2"
    exp = tpa_expand(ids, cands, cm, am)
    for fn in (
        lambda: packed_forward(model, exp, **px),
        lambda: tpa_forward(model, exp, mode="cached", **px),
    ):
        with pytest.raises(ValueError, match=r"flash_attention_2.*supported implementations.*sdpa"):
            fn()


def test_unknown_custom_attention_is_refused(tiny):
    model, ids, am, cm, cands, _ = _build(tiny, "qwen2", "sdpa", "right")
    model.config._attn_implementation_internal = "my_kernel"
    with pytest.raises(ValueError, match="my_kernel"):
        packed_forward(model, tpa_expand(ids, cands, cm, am))


def test_eager_gets_a_float_mask_with_finfo_min(tiny, monkeypatch):
    model, ids, am, cm, cands, _ = _build(tiny, "qwen2", "eager", "left")
    seen = []
    orig = model.forward

    def spy(*a, **kw):
        seen.append(kw["attention_mask"])
        return orig(*a, **kw)

    monkeypatch.setattr(model, "forward", spy)
    exp = tpa_expand(ids, cands, cm, am)
    packed_forward(model, exp)
    m = seen[0]
    assert m.dtype == torch.float32
    assert torch.equal(m == 0, exp.attention_mask)
    assert torch.equal(m[~exp.attention_mask].unique(), torch.tensor([torch.finfo(torch.float32).min]))


def test_ground_truth_mask_is_the_ribbon_block(tiny):
    _, ids, am, cm, cands, _ = _build(tiny, "qwen2", "sdpa", "left")
    exp = tpa_expand(ids, cands, cm, am)
    T = exp.seq_len
    assert torch.equal(ground_truth_attention_mask(am), exp.attention_mask[:, :, :T, :T])


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "kind,attn,padding,attention",
    [
        ("qwen2", "sdpa", "right", "prefix_self"),
        ("qwen2", "eager", "left", "prefix_self"),
        ("qwen2", "sdpa", "left", "dense"),
        ("qwen3", "sdpa", "left", "prefix_self"),
        ("qwen3", "eager", "right", "dense"),
        ("llava", "sdpa", "right", "prefix_self"),
        ("llava", "eager", "left", "prefix_self"),
    ],
)
def test_cached_equals_packed_loss_and_every_gradient(tiny, kind, attn, padding, attention):
    student, ids, am, cm, _, px = _build(tiny, kind, attn, padding, d=3)
    teacher = getattr(tiny, kind)("sdpa", seed=1)
    labels = torch.where(am, ids, torch.full_like(ids, -100))
    if kind == "llava":
        labels[ids == tiny.IMAGE_TOKEN] = -100
    cm = cm & (shift_labels(labels) != -100)
    loss_fn = AlignTILoss(iva=0.0)

    # cached path: (a) ground truth + cache, (b) sample, (c) candidate block
    student.zero_grad()
    gt = ground_truth_forward(student, ids, am, **px)
    assert gt.cache is not None and gt.cache.get_seq_length() == ids.shape[1]
    logits_for_sampling = gt.logits.detach().clone()
    logits_for_sampling[..., tiny.IMAGE_TOKEN] = -1e4
    cands = sample_candidates(logits_for_sampling, 3, mask=cm, generator=torch.Generator().manual_seed(3))
    exp = tpa_expand(ids, cands, cm, am)
    cand_logits = cached_candidate_forward(student, gt, exp, attention=attention)
    assert cand_logits.shape == (ids.shape[0], exp.expanded_len - exp.seq_len, tiny.VOCAB)
    assert gt.cache.get_seq_length() == ids.shape[1], "the cache must be cropped back"
    s_cached = torch.cat([gt.logits, cand_logits], dim=1)
    with torch.no_grad():
        t_logits = tpa_forward(teacher, exp, mode="packed", **px)
    loss_c, parts_c = loss_fn(s_cached, t_logits, labels, expansion=exp)
    loss_c.backward()
    g_cached = _grads(student)

    student.zero_grad()
    s_packed = packed_forward(student, exp, **px)
    loss_p, parts_p = loss_fn(s_packed, t_logits, labels, expansion=exp)
    loss_p.backward()
    g_packed = _grads(student)

    assert parts_c["tpa"] > 0
    torch.testing.assert_close(loss_c, loss_p, atol=ATOL, rtol=0)
    assert g_cached.keys() == g_packed.keys()
    nonzero = 0
    for name in g_packed:
        torch.testing.assert_close(g_cached[name], g_packed[name], atol=ATOL, rtol=0, msg=name)
        nonzero += bool(g_packed[name].abs().sum() > 0)
    assert nonzero > len(g_packed) // 2
    if kind == "llava":
        assert any(g_packed[n].abs().sum() > 0 for n in g_packed if "vision_tower" in n)


@pytest.mark.parametrize("kind,attn", [("qwen2", "sdpa"), ("qwen2", "eager"), ("qwen3", "sdpa"), ("llava", "sdpa")])
def test_unpadded_ground_truth_runs_causal_without_a_mask(tiny, kind, attn, monkeypatch):
    """No padding: the ground-truth pass hands the model no mask (its own causal attention, SDPA's
    causal kernel) and the cached path still equals the packed pass, loss and every gradient; a
    padded batch still gets the ribbon block."""
    student, ids, am, cm, _, px = _build(tiny, kind, attn, "right", d=2, lengths=(10, 10))
    assert bool(am.all())
    teacher = getattr(tiny, kind)("sdpa", seed=1)
    labels = torch.where(am, ids, torch.full_like(ids, -100))
    if kind == "llava":
        labels[ids == tiny.IMAGE_TOKEN] = -100
    cm = cm & (shift_labels(labels) != -100)
    starts = []
    real = packed_mod._plan.model_masks
    monkeypatch.setattr(
        packed_mod._plan, "model_masks", lambda model, p, B, q_start, *a, **k: starts.append(q_start) or real(model, p, B, q_start, *a, **k)
    )
    gt = ground_truth_forward(student, ids, am, **px)
    assert starts == [], "an unpadded ground truth must run without a mask"
    cands = torch.randint(10, tiny.VOCAB, (*ids.shape, 2), generator=torch.Generator().manual_seed(4))
    exp = tpa_expand(ids, cands, cm, am)
    s_cached = torch.cat([gt.logits, cached_candidate_forward(student, gt, exp)], dim=1)
    assert starts == [ids.shape[1]], "the candidate block keeps its ribbon rows"
    with torch.no_grad():
        t_logits = tpa_forward(teacher, exp, mode="packed", **px)
    loss_fn = AlignTILoss(iva=0.0)
    loss_c, _ = loss_fn(s_cached, t_logits, labels, expansion=exp)
    student.zero_grad()
    loss_c.backward()
    g_cached = _grads(student)
    student.zero_grad()
    loss_p, _ = loss_fn(packed_forward(student, exp, **px), t_logits, labels, expansion=exp)
    loss_p.backward()
    g_packed = _grads(student)
    torch.testing.assert_close(loss_c, loss_p, atol=ATOL, rtol=0)
    for name in g_packed:
        torch.testing.assert_close(g_cached[name], g_packed[name], atol=ATOL, rtol=0, msg=name)

    starts.clear()
    _, ids_p, am_p, _, _, px_p = _build(tiny, kind, attn, "right", d=2, lengths=(10, 7))
    ground_truth_forward(student, ids_p, am_p, **px_p)
    assert starts == [0], "a padded ground truth keeps the ribbon block"


@torch.no_grad()
def test_cache_is_reusable_across_candidate_blocks(tiny):
    model, ids, am, cm, cands, _ = _build(tiny, "qwen2", "sdpa", "left")
    gt = ground_truth_forward(model, ids, am)
    exp1 = tpa_expand(ids, cands, cm, am)
    exp2 = tpa_expand(ids, cands.flip(-1) + 1, cm, am)
    a1 = cached_candidate_forward(model, gt, exp1)
    a2 = cached_candidate_forward(model, gt, exp2)
    b1 = cached_candidate_forward(model, gt, exp1)
    torch.testing.assert_close(a1, b1, atol=0, rtol=0)
    torch.testing.assert_close(a2, packed_forward(model, exp2)[:, exp2.seq_len :], atol=ATOL, rtol=0)


def test_cached_checks_its_inputs(tiny):
    model, ids, am, cm, cands, _ = _build(tiny, "qwen2", "sdpa", "right")
    gt = ground_truth_forward(model, ids, am)
    other = ids.clone()
    other[0, 0] += 1
    with pytest.raises(ValueError, match="ground truth"):
        cached_candidate_forward(model, gt, tpa_expand(other, cands, cm, am))
    with pytest.raises(ValueError, match="attention"):
        cached_candidate_forward(model, gt, tpa_expand(ids, cands, cm, am), attention="sparse")
    with pytest.raises(TypeError, match="pixel_values|attention_mask"):
        packed_forward(model, tpa_expand(ids, cands, cm, am), attention_mask=am)


def test_image_token_in_candidates_is_refused(tiny):
    model, ids, am, cm, cands, px = _build(tiny, "llava", "sdpa", "right")
    cands[cm] = tiny.IMAGE_TOKEN
    exp = tpa_expand(ids, cands, cm, am)
    with pytest.raises(ValueError, match="image token id 7"):
        packed_forward(model, exp, **px)


def test_gradient_checkpointing_falls_back_to_packed(tiny, caplog):
    model, ids, am, cm, cands, _ = _build(tiny, "qwen2", "sdpa", "left")
    model.activation_checkpointing_enable()
    model.train()
    exp = tpa_expand(ids, cands, cm, am)
    packed_mod._warned.clear()
    with caplog.at_level(logging.WARNING, logger="tokinteract.hf"):
        model.zero_grad()
        cached = tpa_forward(model, exp, mode="cached")
        cached.square().mean().backward()
    assert "gradient checkpointing" in caplog.text
    g_cached = _grads(model)
    model.zero_grad()
    packed = packed_forward(model, exp)
    packed.square().mean().backward()
    torch.testing.assert_close(cached, packed, atol=ATOL, rtol=0)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g_cached[name], g, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("groups", [1, 2])
def test_prefix_self_attention_equals_dense_masked_sdpa(groups):
    torch.manual_seed(0)
    B, Hkv, P, N, D = 2, 2, 7, 5, 8
    Hq = Hkv * groups
    q = torch.randn(B, Hq, N, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, P + N, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, P + N, D, dtype=torch.float64)
    prefix = torch.rand(B, 1, N, P) < 0.6
    prefix[0, 0, 0] = False  # a row that sees only itself
    dense = torch.cat([prefix, torch.eye(N, dtype=torch.bool).expand(B, 1, N, N)], dim=-1)
    module = torch.nn.Module()
    out, _ = prefix_self_attention(module, q, k, v, prefix, scaling=0.3)
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=dense, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    # additive float masks work too
    fmask = torch.where(prefix, torch.zeros((), dtype=torch.float64), torch.finfo(torch.float64).min)
    out2, _ = prefix_self_attention(module, q, k, v, fmask, scaling=0.3)
    torch.testing.assert_close(out2, want, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="prefix mask"):
        prefix_self_attention(module, q, k, v, dense, scaling=0.3)


def test_attention_implementation_is_restored_after_candidate_pass(tiny):
    model, ids, am, cm, cands, _ = _build(tiny, "llava", "eager", "right")
    before = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    tpa_forward(model, tpa_expand(ids, cands, cm, am), mode="cached", pixel_values=torch.zeros(2, 3, 16, 16))
    assert (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation) == before
    assert _attn.PREFIX_SELF not in ("eager", before[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention needs a GPU (no CPU backward)")
def test_flex_attention_block_mask_matches_sdpa(tiny):
    model, ids, am, cm, cands, _ = _build(tiny, "qwen2", "sdpa", "left", lengths=(30, 17), T=32)
    model = model.cuda()
    exp = tpa_expand(ids, cands, cm, am)
    want = packed_forward(model, exp)
    model.set_attn_implementation("flex_attention")
    got = packed_forward(model, exp)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_sliding_window_layers_equal_naive_per_candidate(tiny, attn, padding):
    """Sliding-window layers: the window (in sequence positions) on top of the ribbon rule."""
    model = tiny.qwen2(attn, use_sliding_window=True, sliding_window=3, max_window_layers=1)
    assert "sliding_attention" in model.config.layer_types
    _, ids, am, cm, cands, _ = _build(tiny, "qwen2", attn, padding)
    exp = tpa_expand(ids, cands, cm, am)
    gt, cand = _naive(model, ids, am, exp, {})
    plain = tiny.qwen2(attn)  # the same weights without windows differ: the window matters here
    plain.load_state_dict(model.state_dict())
    got = packed_forward(model, exp)
    assert (packed_forward(plain, exp) - got).abs().max() > 1e-3
    T = exp.seq_len
    torch.testing.assert_close(got[:, :T][am], gt[am], atol=ATOL, rtol=0)
    for (b, s), want in cand.items():
        torch.testing.assert_close(got[b, s], want, atol=ATOL, rtol=0)
    for attention in ("prefix_self", "dense"):
        torch.testing.assert_close(tpa_forward(model, exp, attention=attention), got, atol=ATOL, rtol=0)


def test_unknown_layer_types_are_refused(tiny):
    model = tiny.qwen2("sdpa")
    model.config.layer_types = ["chunked_attention"] * model.config.num_hidden_layers
    _, ids, am, cm, cands, _ = _build(tiny, "qwen2", "sdpa", "right")
    with pytest.raises(ValueError, match="chunked_attention"):
        packed_forward(model, tpa_expand(ids, cands, cm, am))


@torch.no_grad()
def test_bf16_eager_mask_stays_finite_and_matches_sdpa(tiny):
    """finfo(bf16).min, not -inf: pad rows and unused slots give finite logits."""
    model, ids, am, cm, cands, _ = _build(tiny, "qwen2", "eager", "left", lengths=(9, 3))
    exp = tpa_expand(ids, cands, cm, am)
    model = model.to(torch.bfloat16)
    eager = packed_forward(model, exp)
    assert eager.dtype == torch.bfloat16 and bool(torch.isfinite(eager).all())
    model.set_attn_implementation("sdpa")
    sdpa = packed_forward(model, exp)
    real = exp.slot_is_query
    torch.testing.assert_close(eager[real].float(), sdpa[real].float(), atol=3e-2, rtol=0)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llava"])
def test_hidden_output_times_the_lm_head_equals_the_logits(tiny, kind, padding):
    """output="hidden" returns the LM head's input on every path (gt, cached candidates, packed,
    tpa_forward), so ``hidden @ W.T + b`` gives the logits path's logits and its gradients."""
    from tokinteract.hf.packed import lm_head_parameters

    model, ids, am, cm, cands, px = _build(tiny, kind, "sdpa", padding)
    exp = tpa_expand(ids, cands, cm, am)
    T = exp.seq_len
    weight, bias = lm_head_parameters(model)
    assert weight is model.get_output_embeddings().weight and bias is None

    def head(h):
        return torch.nn.functional.linear(h, weight, bias)

    gt_l = ground_truth_forward(model, ids, am, **px)
    gt_h = ground_truth_forward(model, ids, am, output="hidden", **px)
    assert gt_h.logits is None and gt_h.output == "hidden" and gt_l.hidden_states is None
    assert gt_h.hidden_states.shape == (*ids.shape, weight.shape[1])
    torch.testing.assert_close(head(gt_h.hidden_states), gt_l.logits, atol=ATOL, rtol=0)
    cand_l = cached_candidate_forward(model, gt_l, exp)
    cand_h = cached_candidate_forward(model, gt_h, exp)
    assert cand_h.shape == (*cand_l.shape[:2], weight.shape[1])
    torch.testing.assert_close(head(cand_h), cand_l, atol=ATOL, rtol=0)
    ref = torch.cat([gt_l.logits, cand_l], 1)
    for mode in ("cached", "packed"):
        h = tpa_forward(model, exp, mode=mode, output="hidden", **px)
        torch.testing.assert_close(head(h), ref, atol=ATOL, rtol=0)
    h = packed_forward(model, exp, output="hidden", **px)
    torch.testing.assert_close(head(h), ref, atol=ATOL, rtol=0)
    # same parameter gradients through the hidden path (LM head applied by hand)
    g = torch.Generator().manual_seed(3)
    probe = torch.randn(ref.shape, generator=g)
    model.zero_grad()
    (ref * probe).sum().backward()
    want = _grads(model)
    model.zero_grad()
    gt_h = ground_truth_forward(model, ids, am, output="hidden", **px)
    hid = torch.cat([gt_h.hidden_states, cached_candidate_forward(model, gt_h, exp)], 1)
    (head(hid) * probe).sum().backward()
    got = _grads(model)
    assert want.keys() == got.keys() and want
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)


def test_hidden_output_is_checked(tiny):
    model, ids, am, cm, cands, px = _build(tiny, "qwen2", "sdpa", "right")
    exp = tpa_expand(ids, cands, cm, am)
    with pytest.raises(ValueError, match="output"):
        packed_forward(model, exp, output="probs")
    with pytest.raises(ValueError, match="output"):
        ground_truth_forward(model, ids, am, output="probs")
    with pytest.raises(ValueError, match="base module"):
        packed_forward(model.model, exp, output="hidden")
