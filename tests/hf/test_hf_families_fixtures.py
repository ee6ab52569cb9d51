"""The per-family fixtures of ``families.py``: tiny VLMs, processor-made batches, the naive oracle."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")
import families as F

from tokinteract import tpa_expand

ATOL = 1e-5


@functools.cache
def _processor(name):
    return F.make_processor(name)


@functools.cache
def _model(name, attn):
    return F.make_model(name, attn)


@functools.cache
def _batch(name, padding):
    return F.make_batch(name, _processor(name), padding=padding)


def _equal_inputs(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match=r"family must be one of .*qwen2_5_vl.*'mamba_vl'"):
        F.make_model("mamba_vl")


def test_padding_side_is_checked():
    with pytest.raises(ValueError, match="padding must be 'right' or 'left', got 'middle'"):
        F.make_batch("llava", _processor("llava"), padding="middle")


@pytest.mark.parametrize("name", F.FAMILIES)
def test_tokenizer_and_model_agree_on_image_token_ids(name):
    model = _model(name, "sdpa")
    cfg = model.config
    want = getattr(cfg, "image_token_id", None)
    if want is None:
        want = cfg.image_token_index
    assert F.image_token_ids(name) == (want,)
    proc = _processor(name)
    assert len(proc.tokenizer) <= cfg.get_text_config().vocab_size


@pytest.mark.parametrize("name", F.FAMILIES)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_batch_is_processor_made(name, padding):
    batch = _batch(name, padding)
    ids, am = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert ids.shape[0] == len(batch.texts) >= 2
    lengths = am.sum(1)
    assert len(set(lengths.tolist())) == len(lengths), "samples of different lengths: padding must matter"
    pad_cols = am[:, 0] == 0 if padding == "left" else am[:, -1] == 0
    assert pad_cols.any()
    assert sum(batch.images_per_sample) >= 3
    # re-running the processor on the same inputs gives the same tensors
    _equal_inputs(F.run_processor(name, _processor(name), batch.texts, batch.images, padding), batch.inputs)


@pytest.mark.parametrize("name", F.FAMILIES)
def test_image_token_counts(name):
    batch = _batch(name, "right")
    ids = batch.inputs["input_ids"]
    is_image = torch.isin(ids, torch.tensor(batch.image_token_ids))
    for b in range(ids.shape[0]):
        first, last = F._image_range(batch, b)
        assert int(is_image[b].sum()) == sum(batch.image_tokens[first:last])
    assert all(n > 0 for n in batch.image_tokens)
    if "image_grid_thw" in batch.inputs:  # Qwen-VL: one token per merge_size**2 patches
        grid = batch.inputs["image_grid_thw"]
        assert batch.image_tokens == (grid.prod(-1) // 4).tolist()
        assert batch.units == grid.prod(-1).tolist()
        assert len(set(map(tuple, grid.tolist()))) > 1, "images of different sizes"


@pytest.mark.parametrize("name", F.FAMILIES)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_sample_inputs_equal_the_processor_on_that_sample_alone(name, padding):
    batch = _batch(name, padding)
    for b in range(len(batch.texts)):
        _equal_inputs(F.sample_inputs(name, batch, b), F.processor_alone(name, _processor(name), batch, b))


@pytest.mark.parametrize("name", F.FAMILIES)
def test_prefix_plus_next_token_is_the_whole_sample(name):
    batch = _batch(name, "left")
    am = batch.inputs["attention_mask"]
    for b in range(am.shape[0]):
        real = am[b].nonzero().flatten()
        last, before = int(real[-1]), int(real[-2])
        got = F.prefix_plus_token_inputs(name, batch, b, before, int(batch.inputs["input_ids"][b, last]))
        _equal_inputs(got, F.sample_inputs(name, batch, b))


def test_prefix_inside_an_image_is_refused():
    batch = _batch("qwen2_5_vl", "right")
    t = int(torch.isin(batch.inputs["input_ids"][0], torch.tensor(batch.image_token_ids)).nonzero()[0])
    with pytest.raises(ValueError, match="ends inside an image"):
        F.prefix_plus_token_inputs("qwen2_5_vl", batch, 0, t, 5)
    ob = _batch("llava_onevision", "right")
    pos = torch.isin(ob.inputs["input_ids"][1], torch.tensor(ob.image_token_ids)).nonzero().flatten()
    after_first = int(pos[ob.image_tokens[1] - 1]) + 1  # the text token after sample 1's first image
    with pytest.raises(ValueError, match="keeps 1 of the 2 images of LLaVA-OneVision sample 1"):
        F.prefix_plus_token_inputs("llava_onevision", ob, 1, after_first, 5)
    with pytest.raises(ValueError, match="real position"):
        F.prefix_plus_token_inputs("qwen2_5_vl", batch, 2, batch.inputs["input_ids"].shape[1] - 1, 5)


@pytest.mark.parametrize("name", F.FAMILIES)
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_padded_batch_equals_per_sample_forwards(name, padding, attn):
    model, batch = _model(name, attn), _batch(name, padding)
    logits = model(**batch.inputs).logits
    V = model.config.get_text_config().vocab_size
    assert logits.shape == (*batch.inputs["input_ids"].shape, V)
    assert torch.isfinite(logits).all()
    am = batch.inputs["attention_mask"].bool()
    for b in range(am.shape[0]):
        alone = model(**F.sample_inputs(name, batch, b)).logits[0]
        torch.testing.assert_close(logits[b, am[b]], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", F.FAMILIES)
def test_eager_and_sdpa_agree(name):
    batch = _batch(name, "right")
    with torch.no_grad():
        eager = _model(name, "eager")(**batch.inputs).logits
        sdpa = _model(name, "sdpa")(**batch.inputs).logits
    am = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(eager[am], sdpa[am], atol=ATOL, rtol=0)


def test_candidate_mask_is_on_response_tokens_only():
    for name in F.FAMILIES:
        batch = _batch(name, "left")
        cm = F.candidate_mask_for(batch, seed=1)
        ids, am = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
        resp = F.response_mask(batch)
        assert cm.any(1).all(), "every sample gets candidates"
        assert not (cm & ~resp).any()
        assert not (cm & torch.isin(ids, torch.tensor(batch.image_token_ids))).any()
        last = am.long().cumsum(1) == am.sum(1, keepdim=True)
        assert not (cm & last & am).any()
        assert (resp & torch.isin(ids, torch.tensor(batch.image_token_ids))).sum() == 0
        # the response is the assistant answer: it ends with the end-of-turn marker of the last turn
        end = F._token_ids(name)[F.CHAT_END]
        for b in range(ids.shape[0]):
            assert int(ids[b, am[b].nonzero()[-1]]) == end
            assert resp[b].sum() >= 2


@pytest.mark.parametrize("name", F.FAMILIES)
@pytest.mark.parametrize("padding", ["right", "left"])
@torch.no_grad()
def test_naive_oracle(name, padding):
    """The oracle's rows: ground truth = per-sample forwards; a candidate equal to the real next token
    reproduces that token's ground-truth row; another candidate differs from it."""
    model, batch = _model(name, "sdpa"), _batch(name, padding)
    ids, am = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
    cm = F.candidate_mask_for(batch, seed=2, p=0.25)
    nxt = torch.roll(ids, -1, dims=1)
    words = torch.tensor(F.word_ids(name))  # another candidate: a plain word, not the next token
    other = words[(nxt + 1) % len(words)]
    other = torch.where(other == nxt, words[(nxt + 2) % len(words)], other)
    cands = torch.stack([nxt, other], dim=-1)
    exp = tpa_expand(ids, cands, cm, am)
    gt, cand = F.naive_logits(model, name, batch, exp)
    assert gt.shape == (*ids.shape, model.config.get_text_config().vocab_size)
    assert (gt[~am] == 0).all()
    for b in range(ids.shape[0]):
        torch.testing.assert_close(gt[b, am[b]], model(**F.sample_inputs(name, batch, b)).logits[0], atol=0, rtol=0)
    bb, tt, uu, slot = exp.candidate_slots()
    assert len(cand) == len(bb) > 0
    real_next = {}
    for b in range(ids.shape[0]):
        real = am[b].nonzero().flatten()
        real_next.update({(b, int(t)): int(n) for t, n in zip(real[:-1], real[1:])})
    for b, t, u, s in zip(bb.tolist(), tt.tolist(), uu.tolist(), slot.tolist()):
        row = gt[b, real_next[(b, t)]]
        if u == 0:
            torch.testing.assert_close(cand[(b, s)], row, atol=ATOL, rtol=0)
        else:
            assert (cand[(b, s)] - row).abs().max() > 1e-4


@pytest.mark.parametrize("name", F.FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementation_reaches_text_and_vision(name, attn):
    cfg = _model(name, attn).config
    assert cfg.get_text_config()._attn_implementation == attn
    assert cfg.vision_config._attn_implementation == attn


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@torch.no_grad()
def test_qwen_oracle_uses_multimodal_rope(name):
    """Plain 2-D positions (what a text-only adapter passes) change the logits: the oracle is not that."""
    model, batch = _model(name, "sdpa"), _batch(name, "right")
    s = F.sample_inputs(name, batch, 0)
    own = model(**s).logits
    flat = model(**s, position_ids=torch.arange(s["input_ids"].shape[1])[None]).logits
    assert (own - flat).abs().max() > 1e-3


@torch.no_grad()
def test_gemma3_oracle_has_sliding_windows_and_bidirectional_images():
    model, batch = _model("gemma3", "sdpa"), _batch("gemma3", "right")
    text = model.config.get_text_config()
    assert "sliding_attention" in text.layer_types and "full_attention" in text.layer_types
    s = F.sample_inputs("gemma3", batch, 1)
    assert s["input_ids"].shape[1] > 2 * text.sliding_window
    own = model(**s).logits[0]
    # without token_type_ids the image tokens attend causally only: image rows change
    no_types = model(**{k: v for k, v in s.items() if k != "token_type_ids"}).logits[0]
    image = s["token_type_ids"][0] == 1
    assert (own[image] - no_types[image]).abs().max() > 1e-4
    # the same weights with a window covering the sequence: rows past the window change
    wide = F.make_model("gemma3", "sdpa", sliding_window=256)
    assert (own - wide(**s).logits[0]).abs().max() > 1e-4


def test_make_model_refuses_an_unknown_override():
    with pytest.raises(TypeError, match="overrides: the qwen2_vl text config has no attribute 'no_such_option'"):
        F.make_model("qwen2_vl", no_such_option=1)


@pytest.mark.parametrize("name", [n for n in F.FAMILIES if n != "llava_onevision"])
@torch.no_grad()
def test_prefix_with_the_first_image_only(name):
    """A prefix ending between two images takes the first image only; with the real next token its plain
    forward gives the whole sample's rows (the models are causal across images)."""
    model, batch = _model(name, "sdpa"), _batch(name, "left")
    b = 1
    assert batch.images_per_sample[b] == 2
    ids = batch.inputs["input_ids"][b]
    pos = torch.isin(ids, torch.tensor(batch.image_token_ids)).nonzero().flatten()
    t = int(pos[batch.image_tokens[sum(batch.images_per_sample[:b])]]) - 2
    got = F.prefix_plus_token_inputs(name, batch, b, t, int(ids[t + 1]))
    n_first = batch.units[sum(batch.images_per_sample[:b])]
    whole = F.sample_inputs(name, batch, b)
    assert got["pixel_values"].shape[0 if F.family(name).units == "rows" else 1] == n_first
    assert got["pixel_values"].shape != whole["pixel_values"].shape
    start = int(batch.inputs["attention_mask"][b].nonzero()[0])
    n = t + 2 - start
    torch.testing.assert_close(model(**got).logits[0], model(**whole).logits[0, :n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3", "llava_next", "idefics3", "internvl"])
def test_make_batch_takes_other_layouts(name):
    proc = _processor(name)
    batch = F.make_batch(name, proc, padding="left", seed=3, images_per_sample=(0, 3), sizes=((32, 16), (16, 16)))
    assert batch.images_per_sample == [0, 3]
    assert [im.size for im in batch.images[1]] == [(16, 32), (16, 16), (16, 32)]  # PIL: (width, height)
    for b in range(2):
        _equal_inputs(F.sample_inputs(name, batch, b), F.processor_alone(name, proc, batch, b))
