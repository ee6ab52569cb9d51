"""The processor-driven data pipeline on every family's real processor (issue 13, item 2)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import families as fx  # noqa: E402

from tokinteract.mllm.data import DataError  # noqa: E402
from tokinteract.mllm.processor_data import ProcessorCollator, ProcessorDataset  # noqa: E402

SIZES = {"a.png": (16, 24), "b.png": (24, 16), "c.png": (32, 32), "d.png": (16, 32)}
SAMPLES = [
    {"id": "one", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is this picture"}, {"from": "gpt", "value": "a cat sat on the mat"}]},
    {"id": "two", "image": ["b.png", "c.png"], "conversations": [
        {"from": "human", "value": "<image> see the red dog <image> and the blue cat"},
        {"from": "gpt", "value": "two red"},
        {"from": "human", "value": "what is the dog"}, {"from": "gpt", "value": "yes it is here"}]},
    {"id": "text", "conversations": [{"from": "human", "value": "what is it"}, {"from": "gpt", "value": "no"}]},
]
USER = ["what is this picture", "see the red dog and the blue cat what is the dog", "what is it"]
ANSWERS = [["a cat sat on the mat"], ["two red", "yes it is here"], ["no"]]


@pytest.fixture()
def data(tmp_path) -> Path:
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(SAMPLES))
    return path


def _vis_ids(name: str) -> list[int]:
    return list(fx.image_token_ids(name))


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", fx.FAMILIES)
def test_labels_masks_and_every_processor_tensor_per_family(data, name, padding) -> None:
    proc = fx.make_processor(name)
    ds = ProcessorDataset(data, data.parent, proc)
    items = [ds[i] for i in range(len(ds))]
    batch = ProcessorCollator(proc, _vis_ids(name), padding_side=padding)(items)
    # every tensor the processor returns for this batch, unchanged
    direct = fx.run_processor(name, fx.make_processor(name), [it["text"] for it in items],
                              [it["images"] for it in items], padding)
    assert set(direct) <= set(batch)
    for k, v in direct.items():
        torch.testing.assert_close(batch[k], v, rtol=0, atol=0)
    tok = proc.tokenizer
    ids, att = batch["input_ids"], batch["attention_mask"].bool()
    end = tok.convert_tokens_to_ids(fx.CHAT_END)
    for b in range(len(items)):
        want = [i for ans in ANSWERS[b] for i in [*tok.convert_tokens_to_ids(ans.split()), end]]
        assert batch["labels"][b][batch["labels"][b] != -100].tolist() == want
        assert ids[b][batch["labels"][b] != -100].tolist() == want
        assert ids[b][batch["instruction_mask"][b]].tolist() == tok.convert_tokens_to_ids(USER[b].split())
    torch.testing.assert_close(batch["visual_mask"], torch.isin(ids, torch.tensor(_vis_ids(name))) & att)
    torch.testing.assert_close(batch["response_mask"], batch["labels"] != -100)
    n_vis = batch["visual_mask"].sum(1).tolist()
    assert n_vis[0] > 0 and n_vis[1] > 0 and n_vis[2] == 0  # counts from the processor; the text-only row has none
    for k in ("labels", "visual_mask", "instruction_mask", "response_mask"):
        assert not bool((batch[k][~att] != (-100 if k == "labels" else False)).any())


def test_image_token_counts_come_from_the_processor(data) -> None:
    proc = fx.make_processor("qwen2_5_vl")
    ds = ProcessorDataset(data, data.parent, proc)
    col = ProcessorCollator(proc, _vis_ids("qwen2_5_vl"))
    counts = [int(col([ds[0]])["visual_mask"].sum())]
    (data.parent / "big.json").write_text(json.dumps([{**SAMPLES[0], "image": "d.png"}]))
    counts.append(int(col([ProcessorDataset(data.parent / "big.json", data.parent, proc)[0]])["visual_mask"].sum()))
    # Qwen2.5-VL: (h / 4 / 2) * (w / 4 / 2) merged patches per image (within 512 px^2): 16x24 -> 6, 16x32 -> 8
    assert counts == [6, 8]


def test_unreadable_images_name_the_sample_and_the_file(data) -> None:
    (data.parent / "bad.png").write_bytes(b"not a png")
    bad = [SAMPLES[2], {**SAMPLES[0], "image": "bad.png"}]
    (data.parent / "bad.json").write_text(json.dumps(bad))
    ds = ProcessorDataset(data.parent / "bad.json", data.parent, fx.make_processor("gemma3"))
    with pytest.raises(DataError, match=r"sample 1: cannot read image file '.*bad.png'"):
        ds[1]
    # readable by PIL, refused by the processor (Qwen-VL: aspect ratio above 200)
    Image.new("RGB", (2000, 8)).save(data.parent / "thin.png")
    (data.parent / "thin.json").write_text(json.dumps([SAMPLES[2], {**SAMPLES[0], "image": "thin.png"}]))
    proc = fx.make_processor("qwen2_5_vl")
    ds = ProcessorDataset(data.parent / "thin.json", data.parent, proc)
    with pytest.raises(DataError, match=r"sample 1: the processor cannot read image file '.*thin.png'"):
        ProcessorCollator(proc, _vis_ids("qwen2_5_vl"))([ds[0], ds[1]])


def test_too_long_and_bad_arguments_are_refused(data) -> None:
    proc = fx.make_processor("gemma3")
    ds = ProcessorDataset(data, data.parent, proc)
    with pytest.raises(DataError, match=r"sample 1: \d+ tokens after the processor expands its images, more than "
                                        r"max_length=20"):
        ProcessorCollator(proc, _vis_ids("gemma3"), max_length=20)([ds[1]])
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'top'"):
        ProcessorCollator(proc, _vis_ids("gemma3"), padding_side="top")
    with pytest.raises(ValueError, match="visual_token_ids must name at least one"):
        ProcessorCollator(proc, [])
