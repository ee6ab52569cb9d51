"""LLaVA-format data: loading, chat-template tokenization, per-token masks, collation.

Input format (LLaVA): a JSON list (or JSON Lines, one sample per line) of samples

    {"id": "...", "image": "rel/path.png" | ["a.png", "b.png"] | absent,
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                       {"from": "gpt", "value": "..."}, ...]}

with images under ``image_folder``. Roles: ``human``/``user`` -> user, ``gpt``/``assistant``
-> assistant, ``system`` -> system. A sample with images but no ``<image>`` placeholder gets
one ``"<image>\\n"`` per image prepended to its first user turn (LLaVA's convention); text-only samples have
no ``image`` key. Multi-turn samples are supported.

Tokenization renders the conversation with the tokenizer's chat template, tokenizes the
text with character offsets, and classifies every token by the message whose content it
overlaps. Then each ``<image>`` token is expanded into ``num_image_tokens`` image-token ids
(the model does not expand it).

Per-token masks (all ``[T]`` bool, right-padded to ``[B, T]`` by :class:`LlavaCollator`):

* ``visual_mask``: the expanded image-token positions.
* ``instruction_mask``: **the user's own words**: tokens overlapping the content of a user
  message, minus image tokens and minus whitespace-only tokens (such as the newline after
  ``<image>``). Not the system prompt (its own or the template's default), not the role
  markers or other template tokens, not assistant text. All user turns count.
  IVA's attention rows are those of them after the sample's first image token
  (:func:`tokinteract.instruction_rows`: words before the image attend to no visual token).
* ``response_mask``: tokens whose label is supervised (see ``labels``).
* ``labels``: the input id at every token overlapping an assistant message's content and
  at the end-of-turn token that closes it (``eos_token`` or ``<|im_end|>``: the model must
  learn to stop); ``-100`` elsewhere (unshifted, as in Hugging Face).

Truncation to ``max_length`` never cuts through an image block: if the cut falls inside
one, the whole block (and its image) is dropped, keeping the token and image counts
consistent.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

__all__ = [
    "SKIPPED_KEY",
    "DataError",
    "EncodedSample",
    "LlavaCollator",
    "LlavaJsonDataset",
    "encode_conversation",
    "load_llava_json",
    "normalize_sample",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SKIPPED_KEY = "skipped_samples"  # item/batch key: ``[(index, file, reason), ...]`` replaced by this item
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """Bad training data: the message names the file, the sample index and the problem."""


def load_llava_json(path: str | Path) -> list[dict[str, Any]]:
    """Read a LLaVA JSON list or a JSON Lines file.

    Raises:
        DataError: unreadable file, malformed JSON (with line and column), or a top level
            that is not a list of objects.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read data file {str(p)!r}: {exc}") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"malformed JSON in {str(p)!r} at line {exc.lineno}, column {exc.colno} "
                f"(in sample {_samples_before(text, exc.pos)}): {exc.msg}"
            ) from exc
    else:
        data = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"malformed JSON Lines record in {str(p)!r} at line {lineno} (sample {len(data)}), "
                    f"column {exc.colno}: {exc.msg}"
                ) from exc
    if not isinstance(data, list):
        raise DataError(f"{str(p)!r} must hold a JSON list of samples, got {type(data).__name__}")
    for i, s in enumerate(data):
        if not isinstance(s, dict):
            raise DataError(f"{str(p)!r}: sample {i} must be a JSON object, got {type(s).__name__}")
    return data


def _samples_before(text: str, pos: int) -> int:
    """Index of the list element that holds character ``pos`` (complete elements before it)."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = 0
    while i < pos:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= pos:
            break
        try:
            _, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        if end > pos:
            break
        n, i = n + 1, end
    return n


def normalize_sample(
    sample: dict[str, Any], index: int, *, image_token: str = "<image>", source: str = "<data>"
) -> tuple[list[dict[str, str]], list[str]]:
    """Validate one LLaVA sample; return ``(messages, image_paths)``.

    ``messages`` are ``{"role", "content"}`` dicts for ``apply_chat_template``.

    Raises:
        DataError: missing/ill-typed ``conversations``, an unknown role, no assistant turn
            with text, a placeholder/image count mismatch, or a ``video`` / ``videos`` entry
            (never silently dropped). The message names the sample
            index (and id when present).
    """
    sid = sample.get("id")
    where = f"{source}: sample {index}" + (f" (id {sid!r})" if sid is not None else "")
    conv = sample.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns, got {conv!r:.80}")
    for key in ("video", "videos"):
        if sample.get(key) is not None:
            raise DataError(
                f"{where}: has a {key!r} ({sample[key]!r:.80}); videos are not supported (tokinteract.mllm trains on "
                "images and text only)"
            )
    images = sample.get("image")
    if images is None:
        paths: list[str] = []
    elif isinstance(images, str):
        paths = [images]
    elif isinstance(images, list) and all(isinstance(x, str) for x in images):
        paths = list(images)
    else:
        raise DataError(f"{where}: 'image' must be a path or a list of paths, got {images!r:.80}")
    messages = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: turn {j} must be an object with 'from' and 'value', got {turn!r:.80}")
        role = _ROLES.get(turn["from"])
        if role is None:
            raise DataError(f"{where}: turn {j} has unknown role {turn['from']!r}; expected one of {sorted(_ROLES)}")
        if not isinstance(turn["value"], str):
            raise DataError(f"{where}: turn {j} 'value' must be a string, got {type(turn['value']).__name__}")
        messages.append({"role": role, "content": turn["value"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: no assistant ('gpt') turn with text; nothing to supervise")
    for m in messages:
        if m["role"] != "user" and image_token in m["content"]:
            raise DataError(f"{where}: {image_token!r} appears in a {m['role']} turn; only user turns may hold images")
    n_placeholders = sum(m["content"].count(image_token) for m in messages)
    if n_placeholders == 0 and paths:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(f"{where}: has an image but no user turn to attach it to")
        first_user["content"] = (image_token + "\n") * len(paths) + first_user["content"]
        n_placeholders = len(paths)
    if n_placeholders != len(paths):
        raise DataError(
            f"{where}: {n_placeholders} {image_token!r} placeholder(s) but {len(paths)} image(s); "
            "each placeholder needs exactly one image"
        )
    return messages, paths


@dataclass
class EncodedSample:
    """One tokenized sample (1-D tensors of equal length) and its kept image count.

    Attributes:
        input_ids: token ids, each image already expanded to its visual tokens.
        labels: the supervised token ids, ``-100`` elsewhere (rules: the module docstring).
        visual_mask: True on image tokens.
        instruction_mask: True on instruction tokens (rules: the module docstring).
        response_mask: True on response tokens (rules: the module docstring).
        num_images: images kept after truncation.
        truncated: whether ``max_length`` cut the sample.
    """

    input_ids: Int[Tensor, "seq"]
    labels: Int[Tensor, "seq"]
    visual_mask: Bool[Tensor, "seq"]
    instruction_mask: Bool[Tensor, "seq"]
    response_mask: Bool[Tensor, "seq"]
    num_images: int
    truncated: bool = False


def _stop_ids(tokenizer: Any) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return ids


def _render_with_spans(tokenizer: Any, msgs: list[dict[str, Any]], where: str) -> tuple[str, list[tuple[int, int, str]]]:
    """Render ``msgs`` with the chat template and locate each message's content in the text.

    Each content is first replaced by a unique marker (private-use characters), so a content
    is found where the template put it, never inside template text (a reply "is" must not
    match the "is" of "assistant"). The real rendering must equal the skeleton with the
    contents put back (verbatim, or stripped if the template strips them).
    """
    real = tokenizer.apply_chat_template(msgs, tokenize=False)
    markers = [f"\ue000{k}\ue001" for k in range(len(msgs))]
    skeleton = tokenizer.apply_chat_template(
        [{**m, "content": markers[k]} for k, m in enumerate(msgs)], tokenize=False
    )
    for strip in (False, True):
        parts: list[str] = []
        spans: list[tuple[int, int, str]] = []
        pos = cursor = 0
        for k, m in enumerate(msgs):
            idx = skeleton.find(markers[k], cursor)
            if idx < 0:
                break
            content = m["content"].strip() if strip else m["content"]
            parts.append(skeleton[cursor:idx])
            pos += idx - cursor
            if content:
                spans.append((pos, pos + len(content), m["role"]))
            parts.append(content)
            pos += len(content)
            cursor = idx + len(markers[k])
        else:
            parts.append(skeleton[cursor:])
            if "".join(parts) == real:
                return real, spans
    bad = next((m for m in msgs if m["content"].strip() and m["content"].strip() not in real), msgs[-1])
    raise DataError(
        f"{where}: the chat template altered a {bad['role']} message's text (could not find "
        f"{bad['content'][:60]!r} verbatim in the rendered conversation); use a template that keeps contents verbatim"
    )


def token_roles(
    text: str,
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int, str]],
    stop_ids: Collection[int],
    *,
    skip_ids: Collection[int] = (),
) -> tuple[list[int], list[bool]]:
    """Labels and instruction flags of tokenized chat text (the module docstring's rules).

    ``spans``: ``(start, end, role)`` character spans of the message contents in ``text``,
    in order; a token belongs to the span its characters overlap. Labels: the id of every
    token of an assistant span, and the first ``stop_ids`` token between the end of that
    span and the next content (end of turn); ``-100`` elsewhere. Instruction: tokens of a
    user span that are not whitespace-only and not in ``skip_ids`` (image placeholders).
    """
    n = len(ids)
    role_of: list[str | None] = [None] * n
    span_of = [-1] * n
    si = 0
    for i, (s, e) in enumerate(offsets):
        while si < len(spans) and spans[si][1] <= s:
            si += 1
        if si < len(spans):
            a, b, r = spans[si]
            if s < b and e > a:
                role_of[i], span_of[i] = r, si
    labels = [IGNORE_INDEX] * n
    for i in range(n):
        if role_of[i] == "assistant":
            labels[i] = ids[i]
            if i + 1 >= n or span_of[i + 1] != span_of[i]:  # last token of the span: find its end of turn
                j = i + 1
                while j < n and span_of[j] < 0:
                    if ids[j] in stop_ids:
                        labels[j] = ids[j]
                        break
                    j += 1
    user_words = []
    for i in range(n):
        ok = role_of[i] == "user" and ids[i] not in skip_ids
        if ok:
            s, e = offsets[i]
            ok = bool(text[s:e].strip())
        user_words.append(ok)
    return labels, user_words


def encode_conversation(
    messages: list[dict[str, str]],
    tokenizer: Any,
    *,
    num_image_tokens: int,
    image_token: str = "<image>",
    max_length: int | None = None,
    system_prompt: str | None = None,
    where: str = "sample",
) -> EncodedSample:
    """Tokenize a conversation with the chat template and build labels and masks.

    See the module docstring for the rules. ``num_image_tokens`` is what the vision tower
    yields per image (:func:`tokinteract.mllm.model.num_image_tokens`).

    Raises:
        DataError: the chat template dropped or altered a message's text, the tokenizer
            does not map ``image_token`` to one token, or nothing is left to supervise.
    """
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise DataError(f"the tokenizer has no {image_token!r} token; add it as a special token")
    msgs = list(messages)
    if system_prompt is not None and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    text, spans = _render_with_spans(tokenizer, msgs, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    n = len(ids)
    labels, user_words = token_roles(text, ids, offsets, spans, _stop_ids(tokenizer), skip_ids={image_id})
    # Expand each <image> token into num_image_tokens ids.
    out_ids, out_labels, vis, ins = [], [], [], []
    for i in range(n):
        if ids[i] == image_id:
            out_ids += [image_id] * num_image_tokens
            out_labels += [IGNORE_INDEX] * num_image_tokens
            vis += [True] * num_image_tokens
            ins += [False] * num_image_tokens
        else:
            out_ids.append(ids[i])
            out_labels.append(labels[i] if labels[i] != image_id else IGNORE_INDEX)
            vis.append(False)
            ins.append(user_words[i])
    n_images = sum(1 for t in ids if t == image_id)
    truncated = False
    if max_length is not None and len(out_ids) > max_length:
        truncated = True
        cut = max_length
        # never cut through an image block: back off to its start
        if vis[cut - 1] and vis[cut]:
            while cut > 0 and vis[cut - 1]:
                cut -= 1
        out_ids, out_labels, vis, ins = out_ids[:cut], out_labels[:cut], vis[:cut], ins[:cut]
        kept = sum(vis)
        if kept % num_image_tokens:
            raise AssertionError("internal error: truncation split an image block")  # pragma: no cover
        n_images = kept // num_image_tokens
    t_labels = torch.tensor(out_labels, dtype=torch.long)
    if not bool((t_labels[1:] != IGNORE_INDEX).any()):
        raise DataError(
            f"{where}: no supervised token left" + (f" after truncation to max_length={max_length}" if truncated else "")
            + "; raise max_length or shorten the prompt"
        )
    return EncodedSample(
        input_ids=torch.tensor(out_ids, dtype=torch.long),
        labels=t_labels,
        visual_mask=torch.tensor(vis, dtype=torch.bool),
        instruction_mask=torch.tensor(ins, dtype=torch.bool),
        response_mask=t_labels != IGNORE_INDEX,
        num_images=n_images,
        truncated=truncated,
    )


@dataclass
class SkippedSample:
    index: int
    path: str
    reason: str


class LlavaJsonDataset(torch.utils.data.Dataset):
    """A LLaVA-format dataset: one item = tokens, labels, masks and ``pixel_values``.

    Args:
        data_path: JSON list or JSON Lines file.
        image_folder: image paths in the data are relative to it.
        tokenizer: a fast tokenizer with a chat template and the ``<image>`` token.
        image_processor: turns PIL images into ``pixel_values [n, 3, H, W]``.
        num_image_tokens: visual tokens per image the vision tower yields.
        image_token: the placeholder string that marks an image in the conversation text.
        max_length: truncation length (never through an image).
        system_prompt: optional system message prepended to every sample.
        on_bad_image: ``"error"`` (default): a missing or unreadable image raises a
            :class:`DataError` naming the file and sample index, at construction for
            missing files and at loading for undecodable ones. ``"skip"``: every image is
            fully decoded at construction and samples with a bad one are dropped, counted in
            :attr:`skipped` and logged. Never a silent black image.
        skip_bad: a sample that fails to load in ``__getitem__`` (:class:`DataError`: an
            undecodable image, nothing left to supervise after truncation, ...; or an
            ``OSError``) is replaced by the next sample that loads (cyclically), and the item
            carries ``SKIPPED_KEY: [(index, file, reason), ...]`` for the trainer to count and
            log (see :class:`tokinteract.mllm.reliability.ReliableTrainerMixin`). False
            (default): the error is raised.
        exclude: sample indices to drop at construction (e.g. those a preflight scan found
            bad); each is counted in :attr:`skipped` with ``exclude[index]`` as reason.

    Attributes:
        num_samples_total: samples in the data file (kept, skipped and excluded).

    Raises:
        DataError: on malformed data (see :func:`load_llava_json`, :func:`normalize_sample`).
    """

    def __init__(
        self,
        data_path: str | Path,
        image_folder: str | Path | None,
        tokenizer: Any,
        image_processor: Any,
        *,
        num_image_tokens: int,
        image_token: str = "<image>",
        max_length: int | None = 2048,
        system_prompt: str | None = None,
        on_bad_image: str = "error",
        skip_bad: bool = False,
        exclude: dict[int, str] | None = None,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.source = str(data_path)
        self.image_folder = Path(image_folder) if image_folder is not None else Path(".")
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_image_tokens, self.image_token = num_image_tokens, image_token
        self.max_length, self.system_prompt, self.on_bad_image = max_length, system_prompt, on_bad_image
        self.skip_bad = skip_bad
        raw = load_llava_json(data_path)
        self.num_samples_total = len(raw)
        self.items: list[tuple[int, list[dict[str, str]], list[Path]]] = []
        self.skipped: list[SkippedSample] = []
        exclude = exclude or {}
        for i, sample in enumerate(raw):
            if i in exclude:
                self.skipped.append(SkippedSample(i, self.source, exclude[i]))
                continue
            messages, rel = normalize_sample(sample, i, image_token=image_token, source=self.source)
            paths = [self.image_folder / r for r in rel]
            bad = self._check_images(paths, full=on_bad_image == "skip")
            if bad is not None:
                path, reason = bad
                if on_bad_image == "error":
                    raise DataError(f"{self.source}: sample {i}: image {str(path)!r} {reason}")
                self.skipped.append(SkippedSample(i, str(path), reason))
                continue
            self.items.append((i, messages, paths))
        if self.skipped:
            logger.warning(
                "skipped %d of %d samples with a missing or unreadable image (first: sample %d, %s: %s)",
                len(self.skipped), len(raw), self.skipped[0].index, self.skipped[0].path, self.skipped[0].reason,
            )
        if not self.items:
            raise DataError(f"{self.source}: no usable sample ({len(self.skipped)} skipped)")

    @staticmethod
    def _check_images(paths: Sequence[Path], *, full: bool) -> tuple[Path, str] | None:
        from PIL import Image

        for p in paths:
            if not os.path.isfile(p):
                return p, "is missing"
            if full:
                try:
                    with Image.open(p) as im:
                        im.load()
                except Exception as exc:  # PIL raises many types for corrupt files
                    return p, f"is unreadable ({type(exc).__name__}: {exc})"
        return None

    def __len__(self) -> int:
        return len(self.items)

    def load_images(self, k: int) -> list[Any]:
        """Decode the images of item ``k`` as RGB PIL images (errors name file and sample)."""
        index, _, paths = self.items[k]
        return self._load(index, paths)

    def _load(self, index: int, paths: Sequence[Path]) -> list[Any]:
        from PIL import Image

        images = []
        for p in paths:
            try:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            except Exception as exc:
                raise DataError(
                    f"{self.source}: sample {index}: image {str(p)!r} is unreadable ({type(exc).__name__}: {exc})"
                ) from exc
        return images

    def build_item(self, index: int, messages: list[dict[str, str]], paths: Sequence[Path]) -> dict[str, Any]:
        """Tokenize ``messages`` and load ``paths``: the item for sample ``index``."""
        enc = encode_conversation(
            messages, self.tokenizer, num_image_tokens=self.num_image_tokens, image_token=self.image_token,
            max_length=self.max_length, system_prompt=self.system_prompt,
            where=f"{self.source}: sample {index}",
        )
        item: dict[str, Any] = {
            "input_ids": enc.input_ids, "labels": enc.labels, "visual_mask": enc.visual_mask,
            "instruction_mask": enc.instruction_mask, "response_mask": enc.response_mask,
        }
        if enc.num_images:
            images = self._load(index, paths[: enc.num_images])
            item["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return item

    def __getitem__(self, k: int) -> dict[str, Any]:
        if not self.skip_bad:
            return self.build_item(*self.items[k])
        skipped: list[tuple[int, str, str]] = []
        for j in range(len(self.items)):
            index, messages, paths = self.items[(k + j) % len(self.items)]
            try:
                item = self.build_item(index, messages, paths)
            except (DataError, OSError) as exc:
                skipped.append((index, ", ".join(map(str, paths)) or self.source, str(exc)))
                continue
            if skipped:
                item[SKIPPED_KEY] = skipped
            return item
        raise DataError(f"{self.source}: none of the {len(self.items)} samples could be loaded; first: {skipped[0][2]}")

    def instruction_pairs(self, n: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Up to ``n`` pairs of items with the same single image and different instructions
        (for IRS): two samples sharing an image, or the first two question/answer turns of
        one multi-turn sample, each made a single-turn sample."""
        by_image: dict[str, list[int]] = {}
        for k, (_, _, paths) in enumerate(self.items):
            if len(paths) == 1:
                by_image.setdefault(str(paths[0]), []).append(k)
        pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        tag = self.image_token + "\n"
        for ks in by_image.values():
            if len(pairs) >= n:
                break
            turns: list[tuple[int, str, str, list[Path]]] = []  # (index, question, answer, paths)
            for k in ks:
                index, messages, paths = self.items[k]
                qa = [(m["content"], a["content"]) for m, a in zip(messages, messages[1:])
                      if m["role"] == "user" and a["role"] == "assistant"]
                for q, a in qa:
                    turns.append((index, q.replace(tag, "").replace(self.image_token, "").strip(), a, paths))
            seen: dict[str, tuple[int, str, str, list[Path]]] = {}
            for t in turns:
                seen.setdefault(t[1], t)
            if len(seen) >= 2:
                items = []
                for index, q, a, paths in list(seen.values())[:2]:
                    msgs = [{"role": "user", "content": tag + q}, {"role": "assistant", "content": a}]
                    items.append(self.build_item(index, msgs, paths))
                pairs.append((items[0], items[1]))
        return pairs


@dataclass
class LlavaCollator:
    """Right-pads a list of dataset items into a batch.

    Output: ``input_ids``, ``attention_mask`` (long), ``labels`` (``-100`` on padding),
    ``visual_mask``, ``instruction_mask``, ``response_mask`` (bool ``[B, T]``) and, if any
    sample has an image, ``pixel_values [n_images, 3, H, W]`` (images in sample order, as
    LLaVA consumes them).

    Attributes:
        pad_token_id: id written into ``input_ids`` on padding.
        image_token_id: the image token's id; with ``num_image_tokens``, enables the
            image-token count check.
        num_image_tokens: visual tokens per image.
        pad_to_multiple_of: round the padded length up to a multiple of it.
        extra: not read by the collator.

    Raises:
        DataError: a sample's image-token count is not ``num_image_tokens`` times its number
            of images (when ``image_token_id`` and ``num_image_tokens`` are set).
    """

    pad_token_id: int
    image_token_id: int | None = None
    num_image_tokens: int | None = None
    pad_to_multiple_of: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        if not features:
            raise DataError("cannot collate an empty list of samples")
        T = max(int(f["input_ids"].shape[0]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            T = (T + m - 1) // m * m
        B = len(features)
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        masks = {k: torch.zeros((B, T), dtype=torch.bool) for k in ("visual_mask", "instruction_mask", "response_mask")}
        pixels = []
        skipped = [s for f in features for s in f.get(SKIPPED_KEY, ())]
        for b, f in enumerate(features):
            n = int(f["input_ids"].shape[0])
            ids[b, :n] = f["input_ids"]
            att[b, :n] = 1
            labels[b, :n] = f["labels"]
            for k in masks:
                masks[k][b, :n] = f[k]
            pv = f.get("pixel_values")
            n_img = 0 if pv is None else int(pv.shape[0])
            if self.image_token_id is not None and self.num_image_tokens is not None:
                got = int((f["input_ids"] == self.image_token_id).sum())
                if got != n_img * self.num_image_tokens:
                    raise DataError(
                        f"batch item {b}: {got} image-token ids but {n_img} image(s) x "
                        f"{self.num_image_tokens} visual tokens = {n_img * self.num_image_tokens}"
                    )
            if pv is not None and n_img:
                pixels.append(pv)
        batch: dict[str, Tensor] = {"input_ids": ids, "attention_mask": att, "labels": labels, **masks}
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)
        if skipped:
            batch[SKIPPED_KEY] = skipped  # type: ignore[assignment]
        return batch
