"""The logged TPA part on Qwen2.5-VL and Gemma 3 equals per-candidate forwards (issue 13, item 6).

As ``test_mllm_tpa_end_to_end.py`` does for LLaVA: one real training step (``Trainer.train``) of the
``tpa`` preset on the family's own processor pipeline (``ProcessorDataset`` + ``ProcessorCollator``)
records the batch and the candidates the trainer sampled; the TPA part is then recomputed with the
models' plain forwards, one sequence per candidate: sample b's real tokens ``0..t`` plus the candidate,
with only the images whose tokens lie in that prefix, cut by ``tests/hf/families.py``
(:func:`families.prefix_plus_token_inputs`). No position ids, no custom mask, no cache: each model builds
its own positions (Qwen2.5-VL's multimodal RoPE index, Gemma 3's sliding windows and bidirectional image
blocks). ``KL(T || S)`` of the last rows, mean over the ``d`` candidates, summed over the candidate
positions, divided by the batch's supervised-token count. The logged ``loss_tpa`` must equal it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from mllm_helpers import state, train_recording_tpa
from test_mllm_families_trainer import _trainer, data  # noqa: F401  (the module's data fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import families as fx  # noqa: E402

from tokinteract.hf.families import visual_token_ids  # noqa: E402
from tokinteract.mllm import DistillationConfig  # noqa: E402
from tokinteract.mllm.processor_data import MASK_KEYS  # noqa: E402

pytestmark = pytest.mark.slow  # end to end: trains tiny models, then ~130 plain forwards per case

D = 3


def family_batch(name: str, batch: dict[str, torch.Tensor]) -> fx.FamilyBatch:
    """The collator's batch as a :class:`families.FamilyBatch`, so that ``families`` can cut samples out of it.

    Each image is one run of image tokens (the chat templates put text or delimiters between images);
    its pixel units are its ``image_grid_thw`` rows (Qwen-VL) or one ``pixel_values`` row (Gemma 3, one
    tile per image). Other layouts are refused.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels" and k not in MASK_KEYS}
    ids, att = inputs["input_ids"], inputs["attention_mask"].bool()
    image_ids = torch.tensor(fx.image_token_ids(name))
    per_sample, tokens = [], []
    for b in range(ids.shape[0]):
        pos = (torch.isin(ids[b], image_ids) & att[b]).nonzero().flatten()
        breaks = [0, *((pos[1:] - pos[:-1]) != 1).nonzero().flatten().add(1).tolist(), pos.numel()]
        runs = [breaks[i + 1] - breaks[i] for i in range(len(breaks) - 1) if breaks[i + 1] > breaks[i]]
        per_sample.append(len(runs))
        tokens += runs
    if "image_grid_thw" in inputs:
        thw = inputs["image_grid_thw"]
        units = thw.prod(1).tolist()
        merge = fx.make_model(name).config.vision_config.spatial_merge_size
        assert [u // merge**2 for u in units] == tokens, (units, tokens)
    elif inputs.get("pixel_values") is not None and inputs["pixel_values"].ndim == 4:
        units = [1] * len(tokens)
    else:
        raise ValueError(f"family_batch: no pixel layout known for {name!r} (keys {sorted(inputs)})")
    if tokens:
        assert sum(units) == inputs["pixel_values"].shape[0], (units, inputs["pixel_values"].shape)
    return fx.FamilyBatch(
        family=name, inputs=inputs, image_token_ids=fx.image_token_ids(name), texts=[], images=[],
        images_per_sample=per_sample, image_tokens=tokens, units=units, patches=[], padding="right",
    )


def reference_tpa(name: str, student, teacher, batch, cand: torch.Tensor, cmask: torch.Tensor, num_items: int) -> torch.Tensor:
    """``sum over slots of mean_u KL(T || S)`` at the last row of each plain per-candidate forward, / ``num_items``."""
    fb = family_batch(name, batch)
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for b, t in cmask.nonzero().tolist():
            for u in range(D):
                inp = fx.prefix_plus_token_inputs(name, fb, b, t, int(cand[b, t, u]))
                s = student(**inp).logits[0, -1].double()
                te = teacher(**inp).logits[0, -1].double()
                total += (te.softmax(-1) * (te.log_softmax(-1) - s.log_softmax(-1))).sum() / D
    return total / num_items


# both TPA forwards per family (the positions they build differ); fused == logits is
# test_mllm_families_trainer.py's test, so each forward runs with one loss_impl here
CASES = [(n, impl, fwd) for n in ("qwen2_5_vl", "gemma3") for impl, fwd in (("fused", "cached"), ("logits", "packed"))]


@pytest.mark.parametrize("name,impl,forward", CASES)
def test_logged_tpa_equals_per_candidate_forwards(tmp_path, data, monkeypatch, name, impl, forward) -> None:  # noqa: F811
    student, teacher = fx.make_model(name, seed=1), fx.make_model(name, seed=2)
    with torch.no_grad():  # sharper random distributions: a KL of order 1, not 0.02, so errors show
        student.lm_head.weight.mul_(20.0)
        teacher.lm_head.weight.mul_(30.0)
    cfg = DistillationConfig(method="tpa", loss_impl=impl, tpa_forward=forward, tpa_num_candidates=D)
    tr = _trainer(tmp_path, data, name, student, teacher, cfg)
    tr.args.logging_steps = 1
    visual = visual_token_ids(student)
    b0 = tr.data_collator([tr.train_dataset[i] for i in range(len(tr.train_dataset))])
    with torch.no_grad():  # give the image token the LM-head row of the student's favourite token:
        mi = {k: v for k, v in b0.items() if k != "labels" and k not in MASK_KEYS}
        at = torch.zeros_like(b0["attention_mask"], dtype=torch.bool)  # the candidate positions
        at[:, :-1] = b0["labels"][:, 1:] != -100
        fav = int(student(**mi).logits.argmax(-1)[at].mode().values)
        for i in visual:  # unmasked, it would be drawn as often as that token
            student.lm_head.weight[i] = student.lm_head.weight[fav]
    before = state(student)
    logged, batch, cand, cmask, supervised = train_recording_tpa(tr, monkeypatch)
    labels = batch["labels"]
    assert torch.equal(cmask, supervised) and int(cmask.sum()) > 0
    assert cand.shape == (*labels.shape, D)
    drawn = cand[cmask]
    assert not bool(torch.isin(drawn, torch.tensor(sorted(visual))).any()) and bool((drawn == fav).any())
    assert int(batch["visual_mask"].sum()) > 0  # the prefixes carry images

    ref_student = fx.make_model(name, seed=1)
    ref_student.load_state_dict(before)  # the weights the step started from
    ref = reference_tpa(name, ref_student.eval(), teacher.eval(), batch, cand, cmask, int(supervised.sum()))
    assert float(ref) > 0.1
    assert logged == pytest.approx(float(ref), rel=1e-5, abs=2e-6)
