"""End-to-end check of the TPA part on the ``DistillationTrainer`` path.

One real training step (``Trainer.train``, batch from the real ``LlavaCollator``, images
included) with the ``tpa`` preset records the candidates the trainer sampled; the TPA part
is then recomputed with ordinary ``model(input_ids=..., pixel_values=...)`` calls, one short
sequence per candidate: ``[ground-truth tokens 0..t] + [candidate]`` (right padding, so
positions 0..t+1), last-position distributions, ``KL(T || S)``, mean over the ``d``
candidates, mean over the candidate positions. The logged ``loss_tpa`` must equal it.

The candidate ids never include the image token (the trainer masks it before sampling; the test\ngives it the LM-head row of a token that is drawn, so an unmasked image token would be drawn too). The pad
token is *not* masked: with random weights it is drawn now and then (1 of 150 draws here); that
is harmless, since the expansion finds its unused slots by layout, not by token id, and the
reference (which feeds a drawn pad id as an ordinary token) still matches.
"""

from __future__ import annotations

import pytest
import torch
from mllm_helpers import N_VIS, make_model, state, train_recording_tpa
from transformers import TrainingArguments

from tokinteract.mllm import DistillationConfig, DistillationTrainer, LlavaCollator, LlavaJsonDataset, set_trainable

pytestmark = pytest.mark.slow  # end to end: trains tiny models

D = 3


def _reference_tpa(student, teacher, batch, cand: torch.Tensor, cmask: torch.Tensor, pad: int,
                   num_items: int) -> torch.Tensor:
    """Per-candidate sequences ``ids[b, :t+1] + [cand[b, t, u]]``, right-padded into one batch
    (positions 0.. by default; the padding is masked and lies after the last real token);
    mean over the ``d`` candidates, summed over the slots, divided by ``num_items``."""
    ids, px, vis = batch["input_ids"], batch["pixel_values"], batch["visual_mask"].bool()
    n_img = vis.sum(1) // N_VIS
    img_start = torch.cumsum(n_img, 0) - n_img  # first pixel_values row of each sample
    seqs, rows, pos = [], [], cmask.nonzero().tolist()
    for b, t in pos:
        n_in = int(vis[b, : t + 1].sum()) // N_VIS  # images whose tokens lie in the prefix
        for u in range(D):
            seqs.append(torch.cat([ids[b, : t + 1], cand[b, t, u : u + 1]]))
            rows += list(range(int(img_start[b]), int(img_start[b]) + n_in))
    n = max(len(q) for q in seqs)
    inp = torch.full((len(seqs), n), pad, dtype=ids.dtype)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, q in enumerate(seqs):
        inp[i, : len(q)], att[i, : len(q)] = q, 1
    last = torch.tensor([len(q) - 1 for q in seqs])
    kw = {"pixel_values": px[rows]} if rows else {}
    with torch.no_grad():
        s = student(input_ids=inp, attention_mask=att, **kw).logits[torch.arange(len(seqs)), last].float()
        te = teacher(input_ids=inp, attention_mask=att, **kw).logits[torch.arange(len(seqs)), last].float()
    kl = (te.softmax(-1) * (te.log_softmax(-1) - s.log_softmax(-1))).sum(-1)  # KL(T || S) per candidate
    return kl.view(len(pos), D).mean(1).sum() / num_items


@pytest.mark.parametrize(
    "impl,forward,skip_end_of_turn",
    [("logits", "cached", False), ("logits", "packed", False), ("fused", "cached", False), ("fused", "packed", False),
     ("fused", "cached", True), ("logits", "packed", True)],
)
def test_logged_tpa_equals_per_candidate_forwards(
    tmp_path, synth, tok, processor, monkeypatch, impl, forward, skip_end_of_turn
) -> None:
    """``skip_end_of_turn``: ``tpa_skip_token_ids=[<|im_end|>]`` (beyond the paper) drops exactly
    the slots whose ground-truth next token is end-of-turn; they count as 0 over the same
    supervised-token denominator."""
    torch.manual_seed(0)
    student = make_model(tok, seed=1)
    teacher = make_model(tok, seed=2, hidden=48, layers=3)
    with torch.no_grad():  # sharper random distributions: a KL of order 1, not 0.02, so errors show
        student.lm_head.weight.mul_(20.0)
        teacher.lm_head.weight.mul_(30.0)
    set_trainable(student, "finetune")
    ds = LlavaJsonDataset(synth.train, synth.image_folder, tok, processor.image_processor, num_image_tokens=N_VIS)
    col = LlavaCollator(tok.pad_token_id, tok.convert_tokens_to_ids("<image>"), N_VIS)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, learning_rate=1e-3, disable_tqdm=True, seed=0,
    )
    img = tok.convert_tokens_to_ids("<image>")
    with torch.no_grad():  # give the image token the LM-head row of the student's favourite token:
        b0 = col([ds[i] for i in range(4)])  # unmasked, it would be drawn as often as that token
        lg = student(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"], pixel_values=b0["pixel_values"]).logits
        fav = int(lg.argmax(-1).flatten().mode().values)
        student.lm_head.weight[img] = student.lm_head.weight[fav]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = DistillationConfig(method="tpa", loss_impl=impl, tpa_forward=forward, tpa_num_candidates=D,
                             tpa_skip_token_ids=[im_end] if skip_end_of_turn else None)
    tr = DistillationTrainer(student, args, teacher=teacher, distill=cfg, train_dataset=ds, data_collator=col,
                             processing_class=processor)
    before = state(student)
    logged, batch, cand, cmask, supervised = train_recording_tpa(tr, monkeypatch)
    labels = batch["labels"]
    # candidate positions: t such that token t+1 is supervised (assistant answer tokens and <|im_end|>)
    end_of_turn = torch.zeros_like(cmask)
    end_of_turn[:, :-1] = supervised[:, :-1] & (batch["input_ids"][:, 1:] == im_end)
    assert bool(end_of_turn.any())
    want = supervised & ~end_of_turn if skip_end_of_turn else supervised
    assert torch.equal(cmask, want) and int(cmask.sum()) > 0
    assert cand.shape == (*labels.shape, D)
    assert not bool((cand[cmask] == img).any()) and bool((cand[cmask] == fav).any())
    assert bool(((cand[cmask] >= 0) & (cand[cmask] < len(tok))).all())

    ref_student = make_model(tok, seed=1)
    ref_student.load_state_dict(before)  # the weights the step started from
    ref_student.eval()
    teacher.eval()
    ref = _reference_tpa(ref_student, teacher, batch, cand, cmask, tok.pad_token_id, int(supervised.sum()))
    assert float(ref) > 0
    assert logged == pytest.approx(float(ref), rel=1e-5, abs=2e-6)
