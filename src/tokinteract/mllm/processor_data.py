"""LLaVA-format data through a model family's own processor (any supported VLM family).

:mod:`tokinteract.mllm.data` expands ``<image>`` itself into a fixed number of tokens, which
only fits the paper's LLaVA. Here the family's processor does everything it does for the
model: the chat template, the expansion of each image into its own number of visual tokens
(dynamic resolution, tiles, grids), and every tensor the model reads (``pixel_values``,
``image_grid_thw``, ``mm_token_type_ids``, ``token_type_ids``, ``image_sizes``,
``pixel_attention_mask``, ...). The collator calls the processor on the whole batch, exactly
as a user would, and keeps all its tensors.

Labels and masks are derived the same way for every family:

1. Each LLaVA sample (:func:`tokinteract.mllm.data.normalize_sample`) becomes chat messages
   whose content is a list of parts: ``{"type": "image"}`` where the text had ``<image>``,
   ``{"type": "text", "text": ...}`` for the text between. The processor's chat template
   renders them; each text part is located in the rendered text (unique markers, as in
   :mod:`tokinteract.mllm.data`).
2. The rendered text, *before* image expansion, is tokenized with character offsets, and
   :func:`tokinteract.mllm.data.token_roles` gives labels and instruction flags (the rules of
   :mod:`tokinteract.mllm.data`).
3. The processor's ``input_ids`` of the sample are that sequence with each image
   placeholder expanded. The two are aligned token by token (longest common blocks); every
   supervised, instruction or user-text token must find its equal partner, else the sample is
   refused (never a guessed label). Tokens the processor inserted are never labels nor
   instructions.

Masks per token (``[B, T]`` bool, on the processor's padded layout):

* ``visual_mask``: tokens whose id is one of the family's image/video token ids
  (:func:`tokinteract.hf.families.visual_token_ids`), on real (non-pad) positions.
* ``instruction_mask``: the **instruction rule**, identical for every template: the user's
  own words, i.e. tokens of the user messages' text parts that are not whitespace-only, not
  visual, not the template's own tokens (role markers, image delimiters, the system prompt).
  IVA's attention rows are those of them after the sample's first visual token
  (:func:`tokinteract.instruction_rows`).
* ``response_mask``: ``labels != -100``: the assistant messages' tokens and the end-of-turn
  token closing each (``eos_token``, ``<|im_end|>``, ``<end_of_turn>`` or ``<|eot_id|>``).

A sample longer than ``max_length`` (after expansion) is refused: cutting it would cut
through a family-specific image layout.

**A teacher with its own processor** (``ProcessorCollator(..., teacher_processor=...)``: another
image resolution, another vision tower, hence other image-token counts): the same samples (the
same rendered text and images) also go through the teacher's processor, and every tensor it makes
(with its own labels and masks, derived as above) is added under a ``teacher_`` prefix
(``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_pixel_values``,
``teacher_image_grid_thw``, ``teacher_labels``, ``teacher_visual_mask``, ...). Both processors
must share the tokenizer and the chat template
(:func:`tokinteract.mllm.model.check_same_tokenizer`), and each sample's supervised tokens must
be the same in both sequences (different prefixes, same responses), else :class:`DataError`
naming the sample.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokinteract.mllm.data import (
    IGNORE_INDEX,
    DataError,
    _stop_ids,
    load_llava_json,
    normalize_sample,
    token_roles,
)

__all__ = ["ProcessorCollator", "ProcessorDataset", "render_with_spans", "to_chat_parts"]

MASK_KEYS = ("visual_mask", "instruction_mask", "response_mask")


def to_chat_parts(messages: Sequence[dict[str, str]], image_token: str = "<image>") -> list[dict[str, Any]]:
    """LLaVA ``{"role", "content": str}`` messages -> content-part messages (images in place)."""
    out = []
    for m in messages:
        parts: list[dict[str, str]] = []
        for k, chunk in enumerate(m["content"].split(image_token)):
            if k:
                parts.append({"type": "image"})
            if chunk:
                parts.append({"type": "text", "text": chunk})
        out.append({"role": m["role"], "content": parts})
    return out


def render_with_spans(processor: Any, msgs: list[dict[str, Any]], where: str) -> tuple[str, list[tuple[int, int, str]]]:
    """Render content-part messages with the processor's chat template; locate each text part.

    Each text part is replaced by a unique marker (private-use characters) in a skeleton
    rendering; the real rendering must equal the skeleton with the parts put back (verbatim
    or stripped, as templates do), else :class:`DataError`.
    """
    tok = processor.tokenizer
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
    if template is None:
        raise DataError(f"{where}: the processor {type(processor).__name__} has no chat template")

    def render(m: list[dict[str, Any]]) -> str:
        return tok.apply_chat_template(m, chat_template=template, tokenize=False)

    texts: list[tuple[str, str]] = []  # (text, role) per text part, in order
    skel_msgs = []
    for m in msgs:
        content = []
        for part in m["content"]:
            if part["type"] == "text":
                content.append({"type": "text", "text": f"\ue000{len(texts)}\ue001"})
                texts.append((part["text"], m["role"]))
            else:
                content.append(part)
        skel_msgs.append({"role": m["role"], "content": content})
    real, skeleton = render(msgs), render(skel_msgs)
    for strip in (False, True):
        pieces: list[str] = []
        spans: list[tuple[int, int, str]] = []
        pos = cursor = 0
        for k, (text, role) in enumerate(texts):
            marker = f"\ue000{k}\ue001"
            idx = skeleton.find(marker, cursor)
            if idx < 0:
                break
            text = text.strip() if strip else text
            pieces.append(skeleton[cursor:idx])
            pos += idx - cursor
            if text:
                spans.append((pos, pos + len(text), role))
            pieces.append(text)
            pos += len(text)
            cursor = idx + len(marker)
        else:
            pieces.append(skeleton[cursor:])
            if "".join(pieces) == real:
                return real, spans
    raise DataError(
        f"{where}: the chat template altered or dropped a message's text; use a template that keeps contents verbatim"
    )


class ProcessorDataset(torch.utils.data.Dataset):
    """LLaVA JSON / JSON Lines samples, rendered with a family's processor (module docstring).

    Items: ``{"index", "where", "text", "images", "image_files", "ids", "labels",
    "instruction"}`` (the rendered text, its PIL images, and per token of the unexpanded text
    its id, label and instruction flag); :class:`ProcessorCollator` runs the processor.

    Args:
        data_path: LLaVA JSON or JSON Lines file.
        image_folder: image paths are relative to it (None: as written).
        processor: the family's processor (tokenizer + image processor + chat template).
        system_prompt: system message prepended to samples without one (None: none).

    Raises:
        DataError: (at item time) a malformed sample or an unreadable image file, naming the
            sample index and the file.
    """

    def __init__(
        self, data_path: str | Path, image_folder: str | Path | None, processor: Any, *, system_prompt: str | None = None
    ) -> None:
        if getattr(processor, "tokenizer", None) is None:
            raise TypeError(f"processor must be a vision-language processor with a tokenizer, got {type(processor).__name__}")
        self.source = str(data_path)
        self.samples = load_llava_json(data_path)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.processor = processor
        self.system_prompt = system_prompt
        self.stops = _stop_ids(processor.tokenizer)

    def __len__(self) -> int:
        return len(self.samples)

    def _path(self, p: str) -> Path:
        return self.image_folder / p if self.image_folder is not None else Path(p)

    def __getitem__(self, k: int) -> dict[str, Any]:
        from PIL import Image

        messages, paths = normalize_sample(self.samples[k], k, source=self.source)
        where = f"{self.source}: sample {k}"
        if self.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        files = [self._path(p) for p in paths]
        images = []
        for f in files:
            try:
                with Image.open(f) as im:
                    images.append(im.convert("RGB"))
            except (OSError, ValueError) as e:
                raise DataError(f"{where}: cannot read image file {str(f)!r}: {e}") from e
        text, spans = render_with_spans(self.processor, to_chat_parts(messages), where)
        enc = self.processor.tokenizer(text, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels, instr = token_roles(text, ids, enc["offset_mapping"], spans, self.stops)
        in_text = [any(a < e and s < b for a, b, _ in spans) and bool(text[s:e].strip())
                   for s, e in enc["offset_mapping"]]
        if not any(x != IGNORE_INDEX for x in labels):
            raise DataError(f"{where}: no supervised token (no assistant text survived the chat template)")
        return {"index": k, "where": where, "text": text, "images": images, "image_files": [str(f) for f in files],
                "ids": ids, "labels": labels, "instruction": instr, "in_text": in_text}


def _align(a: list[int], b: list[int]) -> dict[int, int]:
    """``a`` index -> ``b`` index over the longest common blocks (difflib, no junk heuristic)."""
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return {i + d: j + d for i, j, n in sm.get_matching_blocks() for d in range(n)}


class ProcessorCollator:
    """Batch :class:`ProcessorDataset` items with the processor; add labels and masks.

    ``processor(text=..., images=..., padding=True, padding_side=..., return_tensors="pt")``
    on the whole batch: every tensor it returns is kept for the model. Added:
    ``labels`` (``-100`` on pads), ``visual_mask``, ``instruction_mask``, ``response_mask``.

    Args:
        processor: the family's processor.
        visual_token_ids: the family's image/video token ids
            (:func:`tokinteract.hf.families.visual_token_ids` of the model).
        max_length: samples longer than this after expansion are refused (None: no limit).
        padding_side: ``"right"`` or ``"left"``.

        teacher_processor: the teacher's processor when it differs from the student's (module
            docstring): its batch is added under ``teacher_`` keys. None: the teacher reads
            the student's batch.
        teacher_visual_token_ids: the teacher model's image/video token ids (required with
            ``teacher_processor``).

    Raises:
        DataError: the processor fails on a sample (naming its index and image files), a
            sample is longer than ``max_length``, or the processor's tokens do not align with
            the chat template's (naming the sample); the teacher's sequence of a sample
            supervises other tokens than the student's.
        ValueError: (at construction) a teacher processor with another tokenizer or chat
            template, naming both.
    """

    def __init__(
        self, processor: Any, visual_token_ids: Sequence[int], *, max_length: int | None = None,
        padding_side: str = "right", teacher_processor: Any = None, teacher_visual_token_ids: Sequence[int] | None = None,
    ) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        vis = [int(v) for v in visual_token_ids]
        if not vis:
            raise ValueError("visual_token_ids must name at least one image-token id, got none")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be None or >= 1, got {max_length}")
        self.processor = processor
        self.visual_token_ids = torch.tensor(vis, dtype=torch.long)
        self.max_length = max_length
        self.padding_side = padding_side
        self.teacher: ProcessorCollator | None = None
        if teacher_processor is None:
            if teacher_visual_token_ids is not None:
                raise ValueError("teacher_visual_token_ids is given but teacher_processor is None")
        else:
            from tokinteract.mllm.model import check_same_tokenizer

            if teacher_visual_token_ids is None:
                raise ValueError("teacher_processor needs teacher_visual_token_ids (the teacher model's image token ids)")
            check_same_tokenizer(processor, teacher_processor, student_name=type(processor).__name__,
                                 teacher_name=type(teacher_processor).__name__)
            self.teacher = ProcessorCollator(
                teacher_processor, teacher_visual_token_ids, max_length=max_length, padding_side=padding_side
            )

    def _run(self, texts: list[str], images: list[list[Any]]) -> dict[str, Tensor]:
        kw: dict[str, Any] = dict(text=texts, padding=True, padding_side=self.padding_side, return_tensors="pt")
        if any(images):
            kw["images"] = images
        out = self.processor(**kw)
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}

    def _locate_failure(self, features: list[dict[str, Any]], err: Exception) -> DataError:
        for f in features:
            for im, file in zip(f["images"], f["image_files"]):
                try:
                    self.processor.image_processor(images=[im], return_tensors="pt")
                except Exception as e:  # noqa: BLE001 - reported with the file
                    return DataError(f"{f['where']}: the processor cannot read image file {file!r}: {e}")
            try:
                self._run([f["text"]], [f["images"]])
            except Exception as e:  # noqa: BLE001 - reported with the sample
                return DataError(f"{f['where']} (image files {f['image_files']}): the processor failed: {e}")
        return DataError(f"the processor failed on the batch of samples {[f['index'] for f in features]}: {err}")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        if not features:
            raise DataError("cannot collate an empty list of samples")
        try:
            out = self._run([f["text"] for f in features], [f["images"] for f in features])
        except Exception as e:  # noqa: BLE001 - re-raised naming the sample and file
            raise self._locate_failure(features, e) from e
        ids, att = out["input_ids"], out["attention_mask"].bool()
        labels = torch.full_like(ids, IGNORE_INDEX)
        instr = torch.zeros_like(att)
        for b, f in enumerate(features):
            pos = att[b].nonzero().squeeze(1)
            if self.max_length is not None and pos.numel() > self.max_length:
                raise DataError(
                    f"{f['where']}: {pos.numel()} tokens after the processor expands its images, more than "
                    f"max_length={self.max_length}; raise max_length or shorten the sample"
                )
            row = ids[b, pos].tolist()
            match = _align(f["ids"], row)
            lost = [i for i in range(len(f["ids"])) if i not in match
                    and (f["labels"][i] != IGNORE_INDEX or f["instruction"][i] or f["in_text"][i])]
            if lost:
                raise DataError(
                    f"{f['where']}: the processor's tokens do not contain the chat template's tokens "
                    f"{[f['ids'][i] for i in lost[:5]]} at positions {lost[:5]}; cannot place labels and masks exactly"
                )
            for i, j in match.items():
                labels[b, pos[j]] = f["labels"][i]
                instr[b, pos[j]] = f["instruction"][i]
        visual = torch.isin(ids, self.visual_token_ids) & att
        if bool((visual & ((labels != IGNORE_INDEX) | instr)).any()):
            raise DataError(
                f"samples {[f['index'] for f in features]}: a visual token id appears in a user or assistant text; "
                "it would be both an image token and text"
            )
        out.update(labels=labels, visual_mask=visual, instruction_mask=instr, response_mask=labels != IGNORE_INDEX)
        if self.teacher is not None:
            t_out = self.teacher(features)
            for b, f in enumerate(features):
                s_resp, t_resp = labels[b][labels[b] != IGNORE_INDEX], t_out["labels"][b][t_out["labels"][b] != IGNORE_INDEX]
                if not torch.equal(s_resp, t_resp):
                    raise DataError(
                        f"{f['where']}: the teacher's processor gives other supervised tokens than the student's "
                        f"({t_resp.tolist()[:8]} vs {s_resp.tolist()[:8]}); teacher and student must share every "
                        "response token"
                    )
            out.update({f"teacher_{k}": v for k, v in t_out.items()})
        return out
