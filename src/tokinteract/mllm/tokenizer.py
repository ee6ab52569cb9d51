"""An offline word-level tokenizer for closed-vocabulary tasks (the synthetic shapes data).

Built with Hugging Face ``tokenizers`` (no download) and wrapped as a
``transformers.PreTrainedTokenizerFast`` so it saves, loads and applies a chat template like
any Hub tokenizer. Text is lower-cased and split on whitespace and punctuation; each word of
the closed vocabulary is one token, anything else is ``<unk>``.

Special tokens (fixed ids, in this order): ``<pad>`` 0, ``<unk>`` 1, ``<|im_start|>`` 2,
``<|im_end|>`` 3 (also the eos token), ``<image>`` 4. The chat template is Qwen's ChatML
layout (``<|im_start|>role\\n content <|im_end|>\\n``) so the data pipeline treats this
tokenizer and a real Qwen tokenizer the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["CHATML_TEMPLATE", "SPECIAL_TOKENS", "build_word_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>")

#: ChatML, as used by Qwen2/2.5/3 (without Qwen's default system prompt and tool logic).
#: Content may be a string or a processor-style list of ``{"type": "image"}`` /
#: ``{"type": "text", "text": ...}`` parts (an image part renders as ``<image>\\n``).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_word_tokenizer(words: Iterable[str], *, model_max_length: int = 2048):  # -> PreTrainedTokenizerFast
    """A ``PreTrainedTokenizerFast`` whose vocabulary is ``SPECIAL_TOKENS`` then ``words``.

    Args:
        words: the task's closed vocabulary (lower-cased, de-duplicated, order kept after
            the special tokens; ``system``, ``user`` and ``assistant`` are always added so
            the chat template's role names are known words).
        model_max_length: stored on the tokenizer.

    Returns:
        A fast tokenizer with ``pad_token="<pad>"``, ``eos_token="<|im_end|>"``,
        ``unk_token="<unk>"``, an extra special token ``<image>`` and the ChatML chat template.

    Raises:
        ValueError: a word contains whitespace or is empty (it could never be produced by
            the pre-tokenizer), or the vocabulary is empty.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    given = 0
    for w in [*words, "system", "user", "assistant"]:
        if not isinstance(w, str):
            raise TypeError(f"words must hold strings, got {type(w).__name__}")
        w = w.lower()
        if not w or any(ch.isspace() for ch in w):
            raise ValueError(f"words must be non-empty and hold no whitespace, got {w!r}")
        given += 1
        if w not in vocab:
            vocab[w] = len(vocab)
    if given <= 3:
        raise ValueError("words must hold at least one word, got none")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<image>"],
        model_max_length=model_max_length,
        padding_side="right",
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped
