from __future__ import annotations

import math

import pytest
import torch
from mllm_helpers import N_VIS, make_model, one_step, state
from torch import nn
from transformers import TrainingArguments

import tokinteract
from tokinteract.mllm import (
    DistillationConfig,
    DistillationTrainer,
    LlavaCollator,
    LlavaJsonDataset,
    run_through_wrapper,
    set_trainable,
)

PARTS = {
    "sft": {"sft"}, "kd": {"sft", "kd"}, "iva": {"sft", "kd", "iva"}, "tpa": {"sft", "kd", "tpa"},
    "align_ti": {"sft", "kd", "iva", "tpa"}, "uniform_va": {"sft", "kd", "iva"}, "rkl": {"sft", "kd"},
    "jsd": {"sft", "kd"}, "skew_kl": {"sft", "kd"},
}


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, learning_rate=1e-3, disable_tqdm=True, seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(tmp_path, synth, tok, processor, student, teacher, distill, **kw):
    ds = LlavaJsonDataset(synth.train, synth.image_folder, tok, processor.image_processor, num_image_tokens=N_VIS)
    set_trainable(student, "finetune")
    col = LlavaCollator(tok.pad_token_id, tok.convert_tokens_to_ids("<image>"), N_VIS)
    return DistillationTrainer(
        student, _args(tmp_path, **kw), teacher=teacher, distill=distill, train_dataset=ds, data_collator=col,
        processing_class=processor,
    )


def _log(tr):
    return tr.state.log_history[0]


@pytest.mark.parametrize("method", sorted(PARTS))
def test_each_method_trains_and_logs_its_parts(tmp_path, synth, tok, processor, student, teacher, method) -> None:
    before_s, before_t = state(student), state(teacher)
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher if method != "sft" else None,
                  DistillationConfig(method=method, iva_layer=1))
    tr.train()
    log = _log(tr)
    assert {k[5:] for k in log if k.startswith("loss_")} == PARTS[method]
    assert math.isfinite(log["loss"])
    assert log["loss"] == pytest.approx(sum(log[f"loss_{p}"] for p in PARTS[method]), rel=1e-4)
    after = state(student)
    changed = {k for k in after if not torch.equal(after[k], before_s[k])}
    assert any("language_model" in k for k in changed) and any("multi_modal_projector" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)
    if method != "sft":  # the teacher is frozen, in eval mode, outside the optimizer
        assert all(torch.equal(v, before_t[k]) for k, v in state(teacher).items())
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        opt_ids = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
        assert not opt_ids & {id(p) for p in teacher.parameters()}


def test_loss_equals_the_parts_computed_by_hand(tmp_path, synth, tok, processor, student, teacher) -> None:
    """kd + iva with teacher weights, against an independent reference (eager output_attentions)."""
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, DistillationConfig(method="iva", iva_layer=2))
    batch = tr.data_collator([tr.train_dataset[i] for i in range(3)])
    student.eval()
    with torch.no_grad():
        loss = tr.compute_loss(student, dict(batch))
        ids, att, px = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        s = student(input_ids=ids, attention_mask=att, pixel_values=px).logits
        teacher.set_attn_implementation("eager")
        t_out = teacher(input_ids=ids, attention_mask=att, pixel_values=px, output_attentions=True)
    w = tokinteract.visual_importance(t_out.attentions[2], batch["instruction_mask"], batch["visual_mask"])
    assert float(w.sum()) > 0
    ref = (
        tokinteract.sft_loss(s, batch["labels"])
        + tokinteract.kd_loss(s, t_out.logits, batch["labels"])
        + tokinteract.iva_loss(s, t_out.logits, w)
    )
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_cached_and_packed_tpa_give_the_same_step(tmp_path, synth, tok, processor, family) -> None:
    logs = []
    teacher = make_model(tok, seed=2, hidden=48, layers=3, family=family)
    for mode in ("cached", "packed"):
        st = make_model(tok, seed=1, family=family)
        tr = _trainer(tmp_path / mode, synth, tok, processor, st, teacher,
                      DistillationConfig(method="align_ti", iva_layer=1, tpa_forward=mode))
        tr.train()
        logs.append(_log(tr))
    for key in ("loss", "grad_norm", "loss_tpa", "loss_iva"):
        assert logs[0][key] == pytest.approx(logs[1][key], rel=1e-4), key


def test_gradient_accumulation_matches_one_big_batch(tmp_path, synth, tok, processor, teacher) -> None:
    """num_items / num_sequences cover the whole accumulation window (sft, kd, iva, tpa;
    greedy candidates so that the split into micro-batches draws the same ones)."""
    logs = []
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        st = make_model(tok, seed=1)
        tr = _trainer(tmp_path / f"{bs}", synth, tok, processor, st, teacher,
                      DistillationConfig(method="align_ti", iva_layer=1, tpa_sampling="greedy", tpa_num_candidates=2),
                      per_device_train_batch_size=bs, gradient_accumulation_steps=ga)
        tr.train()
        logs.append(_log(tr))
    for log in logs[1:]:
        for key in ("loss", "grad_norm", "loss_sft", "loss_kd", "loss_iva", "loss_tpa"):
            assert log[key] == pytest.approx(logs[0][key], rel=2e-4), key


def test_irs_selects_the_iva_layer(tmp_path, synth, tok, processor, student, teacher) -> None:
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, DistillationConfig(method="iva"))
    assert tr.irs_scores.shape == (3,)
    assert tr.iva_layer == int(torch.argmax(tr.irs_scores))


def test_student_attention_weights_and_gkd(tmp_path, synth, tok, processor, teacher) -> None:
    tr = _trainer(tmp_path / "s", synth, tok, processor, make_model(tok, seed=1), teacher,
                  DistillationConfig(method="iva", iva_layer=2, iva_weights="student"))
    assert tr._weights_layer() == 1  # l* = 2 of 3 teacher layers -> 1 of 2 student layers
    tr.train()
    assert _log(tr)["loss_iva"] > 0
    tr = _trainer(tmp_path / "g", synth, tok, processor, make_model(tok, seed=1), teacher,
                  DistillationConfig(method="gkd", gkd_lambda=1.0, gkd_max_new_tokens=4))
    tr.train()
    log = _log(tr)
    assert log["on_policy_batches"] == 1 and log["loss_kd_on_policy"] > 0 and math.isfinite(log["loss"])


def test_on_policy_generation_labels_only_the_generated_tokens(tmp_path, synth, tok, processor, student, teacher) -> None:
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, DistillationConfig(method="gkd", gkd_max_new_tokens=5))
    b = tr.data_collator([tr.train_dataset[i] for i in range(2)])
    seq, att, labels, px = tr._generate(student, b["input_ids"], b["attention_mask"], b["labels"], b["visual_mask"], b["pixel_values"])
    L = seq.shape[1] - 5
    assert bool((labels[:, :L] == -100).all()) and bool((att[:, L:][labels[:, L:] != -100] == 1).all())
    assert bool((seq[:, :L][att[:, :L] == 1] != tok.pad_token_id).all())  # left-padded prompts
    assert px.shape[0] == 2 and int((seq == tok.convert_tokens_to_ids("<image>")).sum()) == 2 * N_VIS


def test_errors_before_training(tmp_path, synth, tok, processor, student, teacher) -> None:
    with pytest.raises(ValueError, match="needs a teacher"):
        _trainer(tmp_path, synth, tok, processor, student, None, DistillationConfig(method="kd"))
    with pytest.raises(ValueError, match="different vocabularies"):
        _trainer(tmp_path, synth, tok, processor, student, make_model(tok, vocab_size=len(tok) + 3), DistillationConfig(method="kd"))
    with pytest.raises(ValueError, match="visual tokens"):
        _trainer(tmp_path, synth, tok, processor, student, make_model(tok, image_size=16), DistillationConfig(method="kd"))
    ds = LlavaJsonDataset(synth.train, synth.image_folder, tok, processor.image_processor, num_image_tokens=4)
    with pytest.raises(ValueError, match="4 image tokens but the student's vision tower yields 16"):
        DistillationTrainer(student, _args(tmp_path), teacher=teacher, train_dataset=ds, distill=DistillationConfig(method="kd"))
    for bad in (dict(method="nope"), dict(kd_weight=-1.0), dict(tpa_forward="fast"), dict(method="gkd", tpa_weight=1.0),
                dict(method="sft", sft_weight=0.0), dict(tpa_sampling="top_k"), dict(tpa_num_candidates=0),
                dict(tpa_top_p=0.0), dict(iva_weights="both")):
        with pytest.raises(ValueError):
            DistillationConfig(**bad).resolved()


def test_shared_vocab_prefix_and_image_token_remap(tmp_path, synth, tok, processor, student) -> None:
    big = make_model(tok, seed=2, vocab_size=len(tok) + 6)
    tr = _trainer(tmp_path / "v", synth, tok, processor, student, big,
                  DistillationConfig(method="tpa", vocab_policy="shared_prefix"))
    assert tr.vocab_size == len(tok)
    tr.train()
    assert math.isfinite(_log(tr)["loss_tpa"])
    # a teacher whose <image> id differs: the trainer rewrites the ids it feeds the teacher
    remapped = make_model(tok, seed=2, image_token_id=tok.unk_token_id)  # never in the data
    tr = _trainer(tmp_path / "r", synth, tok, processor, make_model(tok, seed=1), remapped,
                  DistillationConfig(method="kd", image_token_policy="remap"))
    tr.train()
    assert math.isfinite(_log(tr)["loss_kd"])


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *a, **k):
        self.calls += 1
        return self.inner(*a, **k)


def test_run_through_wrapper_calls_the_wrapper_once_and_restores_forward() -> None:
    inner = nn.Linear(2, 2)
    w = _Wrapper(inner)
    out = run_through_wrapper(w, inner, lambda: inner(torch.ones(1, 2)) + inner(torch.zeros(1, 2)))
    assert w.calls == 1 and out.shape == (1, 2) and "forward" not in inner.__dict__
    marker = inner.forward
    inner.forward = marker  # an instance-level forward (Accelerate's autocast) survives
    run_through_wrapper(w, inner, lambda: inner(torch.ones(1, 2)))
    assert inner.__dict__["forward"] is marker and w.calls == 2
    with pytest.raises(RuntimeError):
        run_through_wrapper(w, inner, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert inner.__dict__["forward"] is marker


def test_evaluate_reports_the_distillation_loss(tmp_path, synth, tok, processor, student, teacher) -> None:
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, DistillationConfig(method="align_ti", iva_layer=1))
    tr.eval_dataset = tr.train_dataset
    metrics = tr.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    assert not teacher.training


def test_mixed_batch_text_only_and_two_image_samples(tmp_path, tok, processor, student, teacher) -> None:
    from PIL import Image

    from mllm_helpers import write_json

    for name, rgb in (("a.png", (200, 0, 0)), ("b.png", (0, 0, 200))):
        Image.new("RGB", (32, 32), rgb).save(tmp_path / name)
    samples = [
        {"conversations": [{"from": "human", "value": "how many objects are there ?"}, {"from": "gpt", "value": "two"}]},
        {"image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nwhat color is the circle ?"}, {"from": "gpt", "value": "red"}]},
        {"image": "b.png", "conversations": [{"from": "human", "value": "<image>\nwhere is the square ?"},
                                             {"from": "gpt", "value": "top left"}]},
    ]
    data = write_json(tmp_path / "d.json", samples)
    ds = LlavaJsonDataset(data, tmp_path, tok, processor.image_processor, num_image_tokens=N_VIS)
    assert int(ds[1]["visual_mask"].sum()) == 2 * N_VIS and ds[1]["pixel_values"].shape[0] == 2
    set_trainable(student, "finetune")
    col = LlavaCollator(tok.pad_token_id, tok.convert_tokens_to_ids("<image>"), N_VIS)
    tr = DistillationTrainer(student, _args(tmp_path), teacher=teacher, train_dataset=ds, data_collator=col,
                             distill=DistillationConfig(method="align_ti", iva_layer=1), processing_class=processor)
    batch = col([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape[0] == 3
    tr.train()
    log = _log(tr)
    assert all(math.isfinite(log[f"loss_{k}"]) for k in ("sft", "kd", "iva", "tpa")) and log["loss_iva"] > 0


# ---------------------------------------------------------------- loss_impl="fused" vs "logits"
FUSED_CASES = [
    ("align_ti", {}), ("align_ti", {"tpa_forward": "packed"}), ("tpa", {}), ("kd", {}), ("iva", {}),
    ("rkl", {}), ("jsd", {}), ("skew_kl", {}), ("sft", {}), ("uniform_va", {}),
    ("iva", {"iva_weights": "student"}), ("gkd", {"gkd_lambda": 0.0}),
]


def _one_step(tmp_path, synth, tok, processor, student, teacher, distill):
    """One training-mode compute_loss + backward on a fixed batch: (loss, parts, grads, generator state)."""
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, distill)
    return one_step(tr, student, tr.data_collator([tr.train_dataset[i] for i in range(4)]))


def _assert_same_step(a, b) -> None:
    (la, pa, ga), (lb, pb, gb) = a, b
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)
    assert pa.keys() == pb.keys() and pa
    for k in pa:
        assert pb[k] == pytest.approx(pa[k], rel=1e-5, abs=1e-6), k
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("method,extra", FUSED_CASES, ids=[f"{m}-{'-'.join(map(str, e.values())) or 'default'}" for m, e in FUSED_CASES])
def test_fused_loss_impl_equals_the_logits_path(tmp_path, synth, tok, processor, family, method, extra) -> None:
    """Same loss, every logged part and every parameter gradient (fp32) with loss_impl fused and logits."""
    teacher = make_model(tok, seed=2, hidden=48, layers=3, family=family) if method != "sft" else None
    student = make_model(tok, seed=1, family=family)
    steps = []
    for impl in ("logits", "fused"):
        cfg = DistillationConfig(method=method, iva_layer=1, loss_impl=impl, **extra)
        steps.append(_one_step(tmp_path / impl, synth, tok, processor, student, teacher, cfg))
    _assert_same_step(*steps)
    if method in ("align_ti", "tpa"):
        assert steps[0][1]["tpa"] > 0


@pytest.mark.parametrize("method", ["align_ti", "jsd"])
def test_liger_backend_equals_the_default_backend(tmp_path, synth, tok, processor, monkeypatch, method) -> None:
    """loss_backend="liger" (KD and TPA through Liger-Kernel, uncompiled here) gives the default
    backend's loss, parts and gradients (fp32)."""
    pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    import tokinteract.liger as liger_mod

    calls = []
    run = liger_mod.liger_row_sum
    monkeypatch.setattr(liger_mod, "liger_row_sum", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    liger_parts = {"align_ti": 2, "jsd": 1}[method]  # one Liger call per uniform-row part (KD, TPA)
    teacher = make_model(tok, seed=2, hidden=48, layers=3)
    student = make_model(tok, seed=1)
    steps = []
    for backend in ("tokinteract", "liger"):
        cfg = DistillationConfig(method=method, iva_layer=1, loss_backend=backend, loss_liger_compiled=False)
        steps.append(_one_step(tmp_path / backend, synth, tok, processor, student, teacher, cfg))
        assert len(calls) == (liger_parts if backend == "liger" else 0)  # the Liger path really ran, once per part
    _assert_same_step(*steps)


@pytest.mark.parametrize("impl,forward", [("logits", "packed"), ("fused", "packed"), ("fused", "cached")])
def test_tpa_with_flex_attention_shares_one_block_mask(tmp_path, synth, tok, processor, monkeypatch, impl, forward) -> None:
    """flex_attention student and teacher give the sdpa models' loss; with tpa_forward="packed"
    one ribbon BlockMask per batch serves both models (and all layers); the cached path builds
    its ground-truth and candidate-block masks per call. Forward only (evaluation mode):
    FlexAttention has no backward on CPU."""
    import tokinteract.attention as attention_mod

    # CPU flex is compiled by inductor; after other shapes were compiled, dynamo's automatic
    # dynamic shapes hit an inductor CPU codegen bug ("cur_kvSplitSize8 was not declared").
    # Static shapes and a fresh dynamo cache keep this test independent of the ones before it.
    torch._dynamo.reset()
    teacher = make_model(tok, seed=2, hidden=48, layers=3)
    student = make_model(tok, seed=1)
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher,
                  DistillationConfig(method="tpa", tpa_forward=forward, loss_impl=impl))
    batch = tr.data_collator([tr.train_dataset[i] for i in range(3)])
    student.eval()
    with torch.no_grad():
        want = tr.compute_loss(student, dict(batch))
    calls = []
    build = attention_mod.ribbon_block_mask
    monkeypatch.setattr(attention_mod, "ribbon_block_mask", lambda *a, **kw: calls.append(1) or build(*a, **kw))
    for m in (student, teacher):
        m.set_attn_implementation({"text_config": "flex_attention", "vision_config": "sdpa"})
    packed = forward == "packed"
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        got = tr.compute_loss(student, dict(batch))
        assert len(calls) == packed  # built once, used by the student's and the teacher's packed pass
        tr.compute_loss(student, dict(batch))
    assert len(calls) == 2 * packed  # a new batch (expansion) gets its own
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_loss_backend_is_checked() -> None:
    with pytest.raises(ValueError, match="loss_backend"):
        DistillationConfig(loss_backend="triton").resolved()
    with pytest.raises(ValueError, match="loss_backend='liger' needs loss_impl='fused'"):
        DistillationConfig(loss_backend="liger", loss_impl="logits").resolved()


def test_fused_loss_impl_with_tied_embeddings(tmp_path, synth, tok, processor) -> None:
    """The LM head *is* the embedding: its gradient (lookup + head) matches the logits path."""
    teacher = make_model(tok, seed=2, hidden=48, layers=3)
    student = make_model(tok, seed=1)
    student.lm_head.weight = student.get_input_embeddings().weight
    student.config.text_config.tie_word_embeddings = True
    steps = []
    for impl in ("logits", "fused"):
        cfg = DistillationConfig(method="align_ti", iva_layer=1, loss_impl=impl)
        steps.append(_one_step(tmp_path / impl, synth, tok, processor, student, teacher, cfg))
    assert student.lm_head.weight is student.get_input_embeddings().weight
    _assert_same_step(*steps)
    assert any("embed_tokens" in k for k in steps[1][2])


def test_fused_loss_impl_shared_vocab_prefix_and_outputs(tmp_path, synth, tok, processor) -> None:
    """A teacher with a larger vocabulary (shared prefix), and return_outputs gives ground-truth logits."""
    big = make_model(tok, seed=2, vocab_size=len(tok) + 6)
    student = make_model(tok, seed=1)
    steps = []
    for impl in ("logits", "fused"):
        cfg = DistillationConfig(method="tpa", vocab_policy="shared_prefix", loss_impl=impl)
        steps.append(_one_step(tmp_path / impl, synth, tok, processor, student, big, cfg))
    _assert_same_step(*steps)
    outs = []
    for impl in ("logits", "fused"):
        tr = _trainer(tmp_path / f"o{impl}", synth, tok, processor, student, big,
                      DistillationConfig(method="align_ti", iva_layer=1, loss_impl=impl,
                                         vocab_policy="shared_prefix"))
        batch = tr.data_collator([tr.train_dataset[i] for i in range(2)])
        student.eval()
        with torch.no_grad():
            outs.append(tr.compute_loss(student, dict(batch), return_outputs=True))
    assert outs[0][1]["logits"].shape == outs[1][1]["logits"].shape == (*batch["input_ids"].shape, len(tok))
    torch.testing.assert_close(outs[1][1]["logits"], outs[0][1]["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)


def test_loss_impl_is_checked() -> None:
    for bad in (dict(loss_impl="chunked"), dict(loss_chunk_size=0), dict(loss_chunk_size=True)):
        with pytest.raises(ValueError, match="loss_impl|loss_chunk_size"):
            DistillationConfig(**bad).resolved()
    assert DistillationConfig(loss_impl="logits", loss_chunk_size=8).resolved()["sft"] == 1.0


def test_tpa_skip_token_ids_is_checked_and_parsed() -> None:
    """The slots themselves are checked end to end in test_mllm_tpa_end_to_end.py."""
    from transformers import HfArgumentParser

    for bad in ([-1], [3, True]):
        with pytest.raises(ValueError, match="tpa_skip_token_ids"):
            DistillationConfig(tpa_skip_token_ids=bad).resolved()
    for bad in (["7"], 7, [1.5]):  # the test run's type checker may refuse these at construction already
        with pytest.raises((TypeError, ValueError), match="tpa_skip_token_ids"):
            DistillationConfig(tpa_skip_token_ids=bad).resolved()
    (cfg,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(["--tpa_skip_token_ids", "5", "7"])
    assert cfg.tpa_skip_token_ids == [5, 7]
    assert DistillationConfig().tpa_skip_token_ids is None  # the paper's Eq. 7 by default


def test_fused_loss_impl_under_gradient_checkpointing(tmp_path, synth, tok, processor) -> None:
    """Checkpointed layers drop the KV cache: the fused cached TPA path falls back to the packed
    forward of hidden states and still equals the logits path."""
    teacher = make_model(tok, seed=2, hidden=48, layers=3)
    student = make_model(tok, seed=1)
    student.activation_checkpointing_enable()
    student.train()
    from tokinteract.hf.packed import _checkpointing_active

    assert _checkpointing_active(student)
    steps = []
    for impl in ("logits", "fused"):
        cfg = DistillationConfig(method="align_ti", iva_layer=1, loss_impl=impl)
        steps.append(_one_step(tmp_path / impl, synth, tok, processor, student, teacher, cfg))
    _assert_same_step(*steps)


def test_on_policy_generation_never_samples_the_image_token(tmp_path, synth, tok, processor, student, teacher) -> None:
    """A sampled <image> id would break LLaVA's image-token count on the next forward."""
    img = tok.convert_tokens_to_ids("<image>")

    def favour_image(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., img] += 100.0  # the student would sample <image> almost surely
        return logits

    handle = student.lm_head.register_forward_hook(favour_image)
    try:
        tr = _trainer(tmp_path, synth, tok, processor, student, teacher, DistillationConfig(method="gkd", gkd_max_new_tokens=5))
        b = tr.data_collator([tr.train_dataset[i] for i in range(2)])
        seq, *_ = tr._generate(student, b["input_ids"], b["attention_mask"], b["labels"], b["visual_mask"], b["pixel_values"])
    finally:
        handle.remove()
    assert int((seq == img).sum()) == 2 * N_VIS
