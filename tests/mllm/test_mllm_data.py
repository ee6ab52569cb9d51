from __future__ import annotations

import pytest
import torch
from PIL import Image

from tokinteract.mllm import DataError, LlavaCollator, LlavaJsonDataset, encode_conversation, load_llava_json
from tokinteract.mllm.data import normalize_sample

from mllm_helpers import N_VIS, write_json


def _toks(tok, ids, mask=None):
    ids = ids.tolist()
    if mask is not None:
        ids = [i for i, m in zip(ids, mask.tolist()) if m]
    return tok.convert_ids_to_tokens(ids)


def _image(folder, name="a.png"):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / name)
    return name


def test_masks_and_labels_of_a_multi_turn_sample(tok) -> None:
    msgs = [
        {"role": "user", "content": "<image>\nwhat color is the circle ?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "where is the circle ?"},
        {"role": "assistant", "content": "top left"},
    ]
    enc = encode_conversation(msgs, tok, num_image_tokens=N_VIS, system_prompt="describe the image .")
    assert _toks(tok, enc.input_ids, enc.labels != -100) == ["red", "<|im_end|>", "top", "left", "<|im_end|>"]
    assert torch.equal(enc.labels[enc.labels != -100], enc.input_ids[enc.labels != -100])
    assert torch.equal(enc.response_mask, enc.labels != -100)
    # the user's own words only: not the system prompt, not role markers, not the image
    assert _toks(tok, enc.input_ids, enc.instruction_mask) == "what color is the circle ? where is the circle ?".split()
    assert int(enc.visual_mask.sum()) == N_VIS
    assert bool((enc.input_ids[enc.visual_mask] == tok.convert_tokens_to_ids("<image>")).all())
    assert int((enc.input_ids == tok.convert_tokens_to_ids("<image>")).sum()) == N_VIS
    assert enc.num_images == 1 and not enc.truncated
    assert not bool((enc.visual_mask & enc.instruction_mask).any())


def test_truncation_never_cuts_through_an_image(tok) -> None:
    msgs = [
        {"role": "user", "content": "what color is the circle ?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "<image>\nwhere is the circle ?"},
        {"role": "assistant", "content": "top left"},
    ]
    full = encode_conversation(msgs, tok, num_image_tokens=N_VIS)
    start = int(full.visual_mask.nonzero()[0])
    for cut in (start + 1, start + N_VIS - 1, start + N_VIS // 2):
        enc = encode_conversation(msgs, tok, num_image_tokens=N_VIS, max_length=cut)
        assert enc.truncated and enc.num_images == 0 and int(enc.visual_mask.sum()) == 0
        assert enc.input_ids.shape[0] == start
    enc = encode_conversation(msgs, tok, num_image_tokens=N_VIS, max_length=start + N_VIS + 2)
    assert enc.num_images == 1 and int(enc.visual_mask.sum()) == N_VIS and enc.input_ids.shape[0] == start + N_VIS + 2
    with pytest.raises(DataError, match="no supervised token left after truncation"):
        encode_conversation(msgs, tok, num_image_tokens=N_VIS, max_length=4)


def test_dataset_items_and_collator(synth, tok, processor) -> None:
    ds = LlavaJsonDataset(synth.train, synth.image_folder, tok, processor.image_processor, num_image_tokens=N_VIS)
    assert len(ds) == 12
    items = [ds[i] for i in range(3)]
    col = LlavaCollator(tok.pad_token_id, tok.convert_tokens_to_ids("<image>"), N_VIS)
    b = col(items)
    T = max(int(it["input_ids"].shape[0]) for it in items)
    assert b["input_ids"].shape == (3, T) and b["pixel_values"].shape == (3, 3, 32, 32)
    for i, it in enumerate(items):  # right padding
        n = int(it["input_ids"].shape[0])
        assert torch.equal(b["input_ids"][i, :n], it["input_ids"])
        assert bool((b["input_ids"][i, n:] == tok.pad_token_id).all()) and bool((b["labels"][i, n:] == -100).all())
        assert int(b["attention_mask"][i].sum()) == n
        assert not bool(b["visual_mask"][i, n:].any())
    ref = processor.image_processor(images=ds.load_images(0), return_tensors="pt")["pixel_values"]
    assert torch.equal(b["pixel_values"][:1], ref)


def test_text_only_samples_and_batches(tmp_path, tok, processor) -> None:
    data = write_json(tmp_path / "d.json", [
        {"id": "t0", "conversations": [{"from": "human", "value": "how many objects are there ?"}, {"from": "gpt", "value": "two"}]},
        {"id": "i0", "image": _image(tmp_path), "conversations": [{"from": "human", "value": "what color is the square ?"}, {"from": "gpt", "value": "red"}]},
    ])
    ds = LlavaJsonDataset(data, tmp_path, tok, processor.image_processor, num_image_tokens=N_VIS)
    assert "pixel_values" not in ds[0] and int(ds[0]["visual_mask"].sum()) == 0
    # an image without a placeholder gets "<image>\n" in front of the first user turn
    assert int(ds[1]["visual_mask"].sum()) == N_VIS and ds[1]["pixel_values"].shape == (1, 3, 32, 32)
    col = LlavaCollator(tok.pad_token_id, tok.convert_tokens_to_ids("<image>"), N_VIS)
    assert "pixel_values" not in col([ds[0]])
    assert col([ds[0], ds[1]])["pixel_values"].shape[0] == 1


def test_missing_image_names_file_and_sample_and_skip_mode_counts(tmp_path, tok, processor) -> None:
    ok = {"image": _image(tmp_path), "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "red"}]}
    bad = {"image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "red"}]}
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    broken = {"image": "broken.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "red"}]}
    data = write_json(tmp_path / "d.json", [ok, bad, ok, broken])
    with pytest.raises(DataError, match=r"sample 1: image .*nope\.png.* is missing"):
        LlavaJsonDataset(data, tmp_path, tok, processor.image_processor, num_image_tokens=N_VIS)
    ds = LlavaJsonDataset(data, tmp_path, tok, processor.image_processor, num_image_tokens=N_VIS, on_bad_image="skip")
    assert len(ds) == 2 and [s.index for s in ds.skipped] == [1, 3]
    assert "unreadable" in ds.skipped[1].reason and ds.skipped[1].path.endswith("broken.png")
    # error mode: an undecodable file fails when loaded, naming file and sample
    data2 = write_json(tmp_path / "d2.json", [ok, broken])
    ds2 = LlavaJsonDataset(data2, tmp_path, tok, processor.image_processor, num_image_tokens=N_VIS)
    with pytest.raises(DataError, match=r"sample 1: image .*broken\.png.* is unreadable"):
        ds2[1]


@pytest.mark.parametrize(
    ("sample", "match"),
    [
        ({"conversations": [{"from": "human", "value": "hi"}]}, "no assistant"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}, "no assistant"),
        ({"image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}]},
         "2 '<image>' placeholder.*1 image"),
        ({"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]}, "1 '<image>' placeholder.*0 image"),
        ({"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]}, "unknown role"),
        ({"conversations": "hi"}, "conversations"),
        ({"image": 3, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}, "'image' must be"),
    ],
)
def test_bad_samples_are_refused_with_their_index(sample, match) -> None:
    with pytest.raises(DataError, match=r"sample 5.*" + match):
        normalize_sample(sample, 5)


def test_malformed_json_reports_line_and_column(tmp_path) -> None:
    p = tmp_path / "d.json"
    p.write_text('[\n {"id": 1},\n {"id": 2,,}\n]')
    with pytest.raises(DataError, match=r"line 3, column \d+ \(in sample 1\)"):
        load_llava_json(p)
    q = tmp_path / "d.jsonl"
    q.write_text('{"id": 1}\n{"id": 2}\n{"id": \n')
    with pytest.raises(DataError, match=r"line 3 \(sample 2\)"):
        load_llava_json(q)
    r = tmp_path / "e.json"
    r.write_text('{"id": 1}')
    assert load_llava_json(r) == [{"id": 1}]  # one JSON Lines record
    r.write_text('[1, 2]')
    with pytest.raises(DataError, match="sample 0 must be a JSON object"):
        load_llava_json(r)


def test_collator_refuses_image_token_count_mismatch(tok) -> None:
    img = tok.convert_tokens_to_ids("<image>")
    col = LlavaCollator(tok.pad_token_id, img, N_VIS)
    item = {
        "input_ids": torch.tensor([2, img, img, 3]), "labels": torch.tensor([-100, -100, -100, 3]),
        "visual_mask": torch.tensor([False, True, True, False]),
        "instruction_mask": torch.zeros(4, dtype=torch.bool), "response_mask": torch.tensor([False, False, False, True]),
        "pixel_values": torch.zeros(1, 3, 32, 32),
    }
    with pytest.raises(DataError, match=f"2 image-token ids but 1 image.*{N_VIS}"):
        col([item])


QWEN_LIKE_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_level_bpe():
    """A Qwen-like byte-level BPE tokenizer trained on a few sentences (tokens straddle words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    corpus = ["You are a helpful assistant.", "What colour is the circle in the picture?", "The circle is red.",
              "Where is the square? It is at the top left."] * 20
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>", "<image>"])
    tok.chat_template = QWEN_LIKE_TEMPLATE
    return tok


def test_masks_with_a_qwen_like_byte_level_tokenizer_and_default_system_prompt() -> None:
    tok = _byte_level_bpe()
    msgs = [
        {"role": "user", "content": "<image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": "The circle is red."},
    ]
    enc = encode_conversation(msgs, tok, num_image_tokens=4)
    ids = enc.input_ids
    assert tok.decode(ids[enc.labels != -100]) == "The circle is red.<|im_end|>"
    assert tok.decode(ids[enc.instruction_mask]).strip() == "What colour is the circle?"
    assert "helpful" not in tok.decode(ids[enc.instruction_mask])  # the template's system prompt is excluded
    assert int(enc.visual_mask.sum()) == 4


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tokinteract.mllm import vocabulary  # noqa: E402

_WORDS = st.lists(st.sampled_from(vocabulary()), min_size=1, max_size=6).map(" ".join)


@given(
    turns=st.lists(st.tuples(_WORDS, _WORDS, st.booleans()), min_size=1, max_size=3),
    system=st.one_of(st.none(), _WORDS),
    max_length=st.one_of(st.none(), st.integers(min_value=30, max_value=80)),
)
def test_label_and_mask_invariants(tok, turns, system, max_length) -> None:
    """For random conversations: labels are exactly the (kept) assistant words and their
    end-of-turn tokens, the instruction mask exactly the (kept) user words, images whole."""
    msgs, n_img = [], 0
    for q, a, with_image in turns:
        msgs += [{"role": "user", "content": ("<image>\n" if with_image else "") + q}, {"role": "assistant", "content": a}]
        n_img += with_image
    try:
        enc = encode_conversation(msgs, tok, num_image_tokens=N_VIS, system_prompt=system, max_length=max_length)
    except DataError as exc:
        assert "no supervised token left after truncation" in str(exc) and max_length is not None
        return
    full = encode_conversation(msgs, tok, num_image_tokens=N_VIS, system_prompt=system)
    n = enc.input_ids.shape[0]
    assert torch.equal(enc.input_ids, full.input_ids[:n]) and (max_length is None or n <= max_length)
    assert int(enc.visual_mask.sum()) == enc.num_images * N_VIS and enc.num_images <= n_img
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    want_labels = [w for _, a, _ in turns for w in a.split() + ["<|im_end|>"]]
    got_labels = _toks(tok, full.input_ids, full.labels != -100)
    assert got_labels == want_labels
    assert _toks(tok, full.input_ids, full.instruction_mask) == [w for q, _, _ in turns for w in q.split()]
    assert torch.equal(enc.labels, full.labels[:n]) and torch.equal(enc.instruction_mask, full.instruction_mask[:n])
    assert int((full.labels == eot).sum()) == len(turns)


def test_reply_that_is_a_substring_of_the_role_header_is_labelled_where_it_stands(tok) -> None:
    """Regression (found by the property above): a reply "is" matched the "is" in "assistant"."""
    msgs = [{"role": "user", "content": "what"}, {"role": "assistant", "content": "is"}]
    enc = encode_conversation(msgs, tok, num_image_tokens=N_VIS)
    assert _toks(tok, enc.input_ids, enc.labels != -100) == ["is", "<|im_end|>"]
    assert _toks(tok, enc.input_ids, enc.instruction_mask) == ["what"]
