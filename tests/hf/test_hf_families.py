"""Every TPA pass, per model family, against the model's own plain forward on each sequence.

Inputs are made by each family's real processor (``tests/hf/families.py``); the oracle is the
model's plain forward on each unpadded sample and on each "ground-truth prefix up to t, then the
candidate" sequence, where the model builds its own positions (multimodal RoPE), sliding windows
and bidirectional image blocks.
"""

from __future__ import annotations

import pytest
import torch

import families as fx
from tokinteract import tpa_expand
from tokinteract.hf import cached_candidate_forward, ground_truth_forward, packed_forward, tpa_forward
from tokinteract.hf.families import family_of

ATOL = 1e-5
VLM = [f for f in fx.FAMILIES]


def _setup(name, attn, padding, *, seed=0, d=2, **overrides):
    model = fx.make_model(name, attn, seed=seed, **overrides)
    proc = fx.make_processor(name)
    batch = fx.make_batch(name, proc, padding=padding, seed=seed)
    cm = fx.candidate_mask_for(batch, seed=seed)
    words = torch.tensor(fx.word_ids(name))
    g = torch.Generator().manual_seed(seed + 7)
    cands = words[torch.randint(len(words), (*cm.shape, d), generator=g)]
    ids, am = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    exp = tpa_expand(ids, cands, cm, am)
    extra = {k: v for k, v in batch.inputs.items() if k not in ("input_ids", "attention_mask")}
    return model, batch, exp, extra


def _check(got, exp, gt, cand, am):
    T = exp.seq_len
    assert cand, "the test needs candidates"
    torch.testing.assert_close(got[:, :T][am], gt[am], atol=ATOL, rtol=0)
    for (b, s), want in cand.items():
        torch.testing.assert_close(got[b, s], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", VLM)
@torch.no_grad()
def test_every_pass_equals_the_models_own_forward(name, attn, padding):
    model, batch, exp, extra = _setup(name, attn, padding)
    am = batch.inputs["attention_mask"].bool()
    gt, cand = fx.naive_logits(model, name, batch, exp)
    packed = packed_forward(model, exp, **extra)
    _check(packed, exp, gt, cand, am)
    for attention in ("dense", "prefix_self"):
        _check(tpa_forward(model, exp, attention=attention, **extra), exp, gt, cand, am)
    # the ground-truth pass alone (SFT, KD, IVA and sampling read it)
    g = ground_truth_forward(model, batch.inputs["input_ids"], am, **extra)
    torch.testing.assert_close(g.logits[am], gt[am], atol=ATOL, rtol=0)
    c = cached_candidate_forward(model, g, exp)
    _check(torch.cat([g.logits, c], 1), exp, gt, cand, am)


def test_the_registry_knows_each_family():
    for name in VLM:
        assert family_of(fx.make_model(name)).model_types  # no error


@pytest.mark.parametrize("padding", ["right", "left"])
@torch.no_grad()
def test_gemma3_image_blocks_alone(padding):
    """Gemma 3 with every layer full attention: only the bidirectional image blocks differ from causal."""
    model, batch, exp, extra = _setup("gemma3", "sdpa", padding, layer_types=["full_attention"] * 3)
    am = batch.inputs["attention_mask"].bool()
    gt, cand = fx.naive_logits(model, "gemma3", batch, exp)
    _check(packed_forward(model, exp, **extra), exp, gt, cand, am)
    # without token_type_ids the model itself is causal, and so are we
    causal = packed_forward(model, exp, **{k: v for k, v in extra.items() if k != "token_type_ids"})
    assert (causal[:, : exp.seq_len][am] - gt[am]).abs().max() > 1e-3


def _full_logits(pieces_gt, pieces_cand, exp, V):
    """Assemble [B, T2, V] from the oracle's rows (pads and unused slots 0), keeping the graph."""
    B, T2 = exp.input_ids.shape
    rows = [[torch.zeros(V) for _ in range(T2)] for _ in range(B)]
    am = exp.slot_is_context[:, : exp.seq_len]
    for b in range(B):
        for t in am[b].nonzero().flatten().tolist():
            rows[b][t] = pieces_gt[b][t]
    for (b, s), v in pieces_cand.items():
        rows[b][s] = v
    return torch.stack([torch.stack(r) for r in rows])


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3"])
def test_loss_and_every_gradient_equal_the_per_candidate_forwards(name, padding):
    from tokinteract import AlignTILoss, shift_labels

    model, batch, exp, extra = _setup(name, "sdpa", padding, d=2)
    ids, am = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
    V = model.config.get_text_config().vocab_size
    labels = torch.where(fx.response_mask(batch), ids, torch.full_like(ids, -100))
    assert bool((exp.candidate_mask <= (shift_labels(labels) != -100)).all())
    g = torch.Generator().manual_seed(11)
    t_logits = torch.randn(*exp.input_ids.shape, V, generator=g)
    loss_fn = AlignTILoss(iva=0.0)

    # oracle: every row from its own plain forward, with the graph
    model.zero_grad()
    gt_rows, cand_rows = {}, {}
    for b in range(ids.shape[0]):
        real = am[b].nonzero().flatten().tolist()
        out = model(**fx.sample_inputs(name, batch, b)).logits[0]
        gt_rows[b] = {t: out[i] for i, t in enumerate(real)}
    bb, tt, _, slot = exp.candidate_slots()
    for b, t, s in zip(bb.tolist(), tt.tolist(), slot.tolist()):
        tok = int(exp.input_ids[b, s])
        cand_rows[(b, s)] = model(**fx.prefix_plus_token_inputs(name, batch, b, t, tok)).logits[0, -1]
    naive = _full_logits(gt_rows, cand_rows, exp, V)
    loss_n, _ = loss_fn(naive, t_logits, labels, expansion=exp)
    loss_n.backward()
    g_naive = _grads(model)
    assert len(g_naive) > 10

    for mode, attention in (("packed", "dense"), ("cached", "dense"), ("cached", "prefix_self")):
        model.zero_grad()
        s = tpa_forward(model, exp, mode=mode, attention=attention, **extra)
        loss, _ = loss_fn(s, t_logits, labels, expansion=exp)
        loss.backward()
        torch.testing.assert_close(loss, loss_n, atol=ATOL, rtol=0)
        got = _grads(model)
        assert got.keys() == g_naive.keys()
        for k, v in g_naive.items():
            # 1e-5 absolute, scaled by the tensor's largest entry where that exceeds 1 (fp32 rounding
            # of sums over many rows: Gemma 3's projector gradient reaches ~3e6)
            err, scale = (got[k] - v).abs().max().item(), max(1.0, v.abs().max().item())
            assert err <= ATOL * scale, f"{mode}/{attention}: {k}: max error {err:.3g} at scale {scale:.3g}"


def test_an_unknown_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    ids = torch.randint(2, 32, (1, 6))
    cm = torch.zeros(1, 6, dtype=torch.bool)
    cm[0, 2] = True
    exp = tpa_expand(ids, ids[..., None], cm)
    for call in (lambda: packed_forward(model, exp), lambda: ground_truth_forward(model, ids)):
        with pytest.raises(ValueError, match=r"does not know the model family 'gpt2'.*qwen2_5_vl"):
            call()


def _eager_attentions(model, inputs, layer):
    impl = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(impl)
    return out.attentions[layer]


@pytest.mark.parametrize("name", VLM)
@torch.no_grad()
def test_capture_equals_eager_and_irs_runs(name):
    """IVA's weights: capture at one layer == eager output_attentions rows; IRS from the image-token ids."""
    from tokinteract import visual_importance
    from tokinteract.hf import capture_attention, instruction_vision_alphas, irs_curve
    from tokinteract.hf.families import visual_token_ids

    model = fx.make_model(name, "sdpa")
    proc = fx.make_processor(name)
    batch = fx.make_batch(name, proc, padding="left", images_per_sample=(1, 1), sizes=(fx.family(name).image_sizes[0],))
    inputs = dict(batch.inputs)
    ids, am = inputs["input_ids"], inputs["attention_mask"].bool()
    vm = torch.isin(ids, torch.tensor(visual_token_ids(model)))
    assert torch.equal(vm, torch.isin(ids, torch.tensor(batch.image_token_ids))) and bool(vm.any())
    # instruction rows: the user's words after the image (the text before the answer)
    qm = am & ~vm & ~fx.response_mask(batch)
    qm &= (torch.arange(ids.shape[1])[None] > vm.float().argmax(1, keepdim=True) + int(vm.sum(1).max()))
    assert bool(qm.any(1).all())
    layer = 1
    want = model(**inputs).logits
    with capture_attention(model, layer=layer, query_mask=qm, heads="mean") as cap:
        got = model(**inputs).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    full = _eager_attentions(model, inputs, layer)
    assert full.shape[-1] == ids.shape[1]
    torch.testing.assert_close(cap.visual_importance(vm), visual_importance(full, qm, vm), atol=ATOL, rtol=0)
    # IRS: alphas from the model's own image-token ids, a curve over every layer
    x1 = {**inputs, "instruction_mask": qm}
    x2 = {**inputs, "instruction_mask": qm & (qm.cumsum(1) <= 1)}  # another instruction: its first word only
    alphas = instruction_vision_alphas(model, x1, layers=[layer])
    torch.testing.assert_close(alphas[layer], visual_importance(full, qm, vm)[vm].reshape(2, -1), atol=ATOL, rtol=0)
    curve = irs_curve(model, [(x1, x2)])
    n_layers = model.config.get_text_config().num_hidden_layers
    assert curve.scores.shape == (n_layers,) and bool(torch.isfinite(curve.scores).all())


@pytest.mark.parametrize("name", VLM)
@torch.no_grad()
def test_hidden_output_times_the_head_equals_the_logits(name):
    """output='hidden' (the fused losses' input) is the LM head's input on every family."""
    from tokinteract.hf import lm_head_parameters

    model, batch, exp, extra = _setup(name, "sdpa", "right")
    logits = packed_forward(model, exp, **extra)
    hidden = packed_forward(model, exp, output="hidden", **extra)
    w, bias = lm_head_parameters(model)
    want = hidden @ w.T + (0 if bias is None else bias)
    torch.testing.assert_close(want, logits, atol=ATOL, rtol=0)


def test_final_logit_softcapping_refuses_hidden_output():
    model, batch, exp, extra = _setup("gemma3", "sdpa", "right")
    model.config.get_text_config().final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        packed_forward(model, exp, output="hidden", **extra)
    packed_forward(model, exp, **extra)  # logits: the model applies it itself


def test_qwen_vl_without_mm_token_type_ids_is_refused():
    model, batch, exp, extra = _setup("qwen2_5_vl", "sdpa", "right")
    extra.pop("mm_token_type_ids")
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        packed_forward(model, exp, **extra)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3"])
def test_exposure_bias_refuses_what_its_decoding_does_not_reproduce(name):
    from tokinteract.hf import exposure_bias

    model, batch, _, _ = _setup(name, "sdpa", "right")
    with pytest.raises(ValueError, match="exposure_bias: the teacher"):
        exposure_bias(model, model, [batch.inputs], max_new_tokens=2)


@pytest.mark.parametrize("padding", ["right", "left"])
@torch.no_grad()
def test_gemma3_text_model_sliding_windows(padding):
    """Gemma3ForCausalLM (model_type gemma3_text): sliding and full layers, no images."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=0,
        max_position_embeddings=64,
    )
    model = Gemma3ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(1)
    B, T, lengths = 2, 11, (11, 7)
    ids = torch.zeros(B, T, dtype=torch.long)
    am = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        sl = slice(0, n) if padding == "right" else slice(T - n, T)
        ids[b, sl] = torch.randint(2, 64, (n,), generator=g)
        am[b, sl] = True
    cm = am & (torch.rand(B, T, generator=g) < 0.6)
    rank = am.long().cumsum(1)
    cm &= rank < am.sum(1, keepdim=True)
    exp = tpa_expand(ids, torch.randint(2, 64, (B, T, 2), generator=g), cm, am)
    got = packed_forward(model, exp)
    for attention in ("dense", "prefix_self"):
        torch.testing.assert_close(tpa_forward(model, exp, attention=attention), got, atol=ATOL, rtol=0)
    for b in range(B):
        real = am[b].nonzero().flatten()
        torch.testing.assert_close(got[b, real], model(input_ids=ids[b, real][None]).logits[0], atol=ATOL, rtol=0)
    bb, tt, _, slot = exp.candidate_slots()
    assert bb.numel()
    for b, t, s in zip(bb.tolist(), tt.tolist(), slot.tolist()):
        real = am[b].nonzero().flatten()
        seq = torch.cat([ids[b, real[real <= t]], exp.input_ids[b, s : s + 1]])[None]
        torch.testing.assert_close(got[b, s], model(input_ids=seq).logits[0, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3"])
@torch.no_grad()
def test_packed_inputs_are_what_packed_forward_runs(name):
    """``model(**packed_inputs(...))`` is the exact packed pass; the hand-built plain inputs are not."""
    from tokinteract.hf import packed_inputs

    model, batch, exp, extra = _setup(name, "sdpa", "left")
    inputs = packed_inputs(model, exp, **extra)
    got = model(**inputs).logits
    torch.testing.assert_close(got, packed_forward(model, exp, **extra), atol=0, rtol=0)
    if name == "qwen2_5_vl":
        assert inputs["position_ids"].shape == (3, *exp.input_ids.shape) and "mm_token_type_ids" not in inputs
    else:
        assert set(inputs["attention_mask"]) == {"full_attention", "sliding_attention"}
    fwd = {k: v for k, v in extra.items() if k not in ("mm_token_type_ids", "token_type_ids")}
    naive = model(input_ids=exp.input_ids, position_ids=exp.position_ids, attention_mask=exp.attention_mask, **fwd)
    am = batch.inputs["attention_mask"].bool()
    assert (naive.logits[:, : exp.seq_len][am] - got[:, : exp.seq_len][am]).abs().max() > 1e-3


@pytest.mark.parametrize("name", VLM)
@torch.no_grad()
def test_iva_rows_are_the_instruction_after_the_image(name, tmp_path):
    """IVA's rows through each family's own data path (ProcessorDataset -> ProcessorCollator -> capture):
    words before and after the image give the weights of the words after it alone, against eager
    attention and the loop reference; words only before the image are refused, naming the sample."""
    import json

    from reference import ref_visual_importance
    from tokinteract.hf import capture_attention
    from tokinteract.mllm.processor_data import ProcessorCollator, ProcessorDataset

    h, w = fx.family(name).image_sizes[0]
    fx._rgb(h, w, seed=5).save(tmp_path / "a.png")
    samples = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "see the red dog <image> what is this picture"},
                                             {"from": "gpt", "value": "a cat"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image> what is this picture"},
                                             {"from": "gpt", "value": "a cat"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "see the red dog <image>"},
                                             {"from": "gpt", "value": "a cat"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(samples))
    proc = fx.make_processor(name)
    ds = ProcessorDataset(tmp_path / "d.json", tmp_path, proc)
    model = fx.make_model(name, "sdpa")
    collate = ProcessorCollator(proc, list(fx.image_token_ids(name)), padding_side="left")
    layer = 1

    def run(indexes):
        batch = collate([ds[i] for i in indexes])
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "visual_mask", "instruction_mask", "response_mask")}
        with capture_attention(model, layer=layer, query_mask=batch["instruction_mask"], heads="mean") as cap:
            model(**inputs)
        return batch, inputs, cap

    batch, inputs, cap = run([0, 1])
    ids, qm, vm = batch["input_ids"], batch["instruction_mask"], batch["visual_mask"]
    T = ids.shape[1]
    first = vm.float().argmax(1)  # both samples have an image
    after = qm & (torch.arange(T)[None] > first[:, None])

    def words(row, b):
        return proc.tokenizer.decode(ids[b][row]).split()

    # the data path marks the user's words on both sides; the rows after the image are the question
    assert words(qm[0], 0) == "see the red dog what is this picture".split()
    assert words(after[0], 0) == words(after[1], 1) == words(qm[1], 1) == "what is this picture".split()
    full = _eager_attentions(model, inputs, layer).mean(1)  # [B, T, T]
    got = cap.visual_importance(vm)
    want = ref_visual_importance(full, after, vm).float()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    by_hand = full[0][after[0]][:, vm[0]].mean(0)  # mean over the question's rows after the image
    torch.testing.assert_close(got[0][vm[0]], by_hand, atol=ATOL, rtol=0)
    # the words before the image see no visual token (causal), so the old mean over every
    # instruction row was diluted by them: 4 of 8 rows here
    before = qm[0] & ~after[0]
    assert int(before.sum()) == 4 and float(full[0][before][:, vm[0]].abs().sum()) == 0.0
    diluted = full[0][qm[0]][:, vm[0]].mean(0)
    torch.testing.assert_close(diluted * 2, by_hand, atol=ATOL, rtol=1e-5)
    # an image with words only before it: no Eq. 4 weights, an error naming the batch row
    batch, _, cap = run([1, 2])
    words2 = proc.tokenizer.decode(batch["input_ids"][1][batch["instruction_mask"][1]]).split()
    assert words2 == "see the red dog".split()
    with pytest.raises(ValueError, match=r"samples \[1\] .*no instruction token after the first one"):
        cap.visual_importance(batch["visual_mask"])
