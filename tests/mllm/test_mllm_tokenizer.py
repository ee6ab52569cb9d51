from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tokinteract.mllm import build_word_tokenizer, vocabulary
from tokinteract.mllm.tokenizer import SPECIAL_TOKENS


def test_special_tokens_have_fixed_ids(tok) -> None:
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 3)


def test_every_task_word_is_one_token_and_unknown_words_are_unk(tok) -> None:
    words = vocabulary()
    ids = tok(" ".join(words), add_special_tokens=False).input_ids
    assert len(ids) == len(words) and tok.unk_token_id not in ids
    assert tok("What COLOR is the zebra?", add_special_tokens=False).input_ids == [
        tok.convert_tokens_to_ids(w) for w in ("what", "color", "is", "the")
    ] + [tok.unk_token_id, tok.convert_tokens_to_ids("?")]


def test_chat_template_is_chatml_and_image_is_one_token(tok) -> None:
    text = tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nwhat color is the circle ?"}, {"role": "assistant", "content": "red"}],
        tokenize=False,
    )
    assert text == "<|im_start|>user\n<image>\nwhat color is the circle ?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    toks = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids)
    assert toks[:3] == ["<|im_start|>", "user", "<image>"] and toks.count("<image>") == 1
    parts = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        tokenize=False, add_generation_prompt=True,
    )
    assert parts == "<|im_start|>user\n<image>\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_save_load_round_trip(tok, tmp_path) -> None:
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\n<image>\nhow many red objects are there ?<|im_end|>"
    assert again(text).input_ids == tok(text).input_ids
    assert again.chat_template == tok.chat_template and again.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("bad", [["two words"], [""]])
def test_bad_words_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="words"):
        build_word_tokenizer(bad)
