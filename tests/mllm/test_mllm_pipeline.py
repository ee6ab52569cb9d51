"""The parts of DistillationTrainer's step (batch, student pass, candidates, teacher pass, loss),
GKD's on-policy batches in training_step, and the configuration groups."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from mllm_helpers import make_model, one_step
from transformers import TrainingArguments

import tokinteract
from tokinteract.mllm import DistillationConfig, DistillationTrainer, LlavaCollator, LlavaJsonDataset, set_trainable
from tokinteract.mllm import config as config_mod
from tokinteract.mllm import trainer as trainer_mod
from tokinteract.mllm.trainer import ON_POLICY, head_rows, split_batch

N_VIS = 16


def _trainer(tmp_path, synth, tok, processor, student, teacher, distill, **kw):
    args = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, learning_rate=1e-3, disable_tqdm=True, seed=0,
    )
    args.update(kw)
    ds = LlavaJsonDataset(synth.train, synth.image_folder, tok, processor.image_processor, num_image_tokens=N_VIS)
    set_trainable(student, "finetune")
    col = LlavaCollator(tok.pad_token_id, tok.convert_tokens_to_ids("<image>"), N_VIS)
    return DistillationTrainer(
        student, TrainingArguments(**args), teacher=teacher, distill=distill, train_dataset=ds, data_collator=col,
        processing_class=processor,
    )


def _batch(tr, n: int = 3) -> dict:
    return tr.data_collator([tr.train_dataset[i] for i in range(n)])


# ---------------------------------------------------------------- the batch
def test_split_batch_names_the_parts_and_keeps_every_other_tensor_as_a_model_input() -> None:
    ids = torch.tensor([[1, 2, 3]])
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "visual_mask": torch.zeros_like(ids),
        "instruction_mask": torch.ones_like(ids), "response_mask": ids, "pixel_values": torch.ones(1, 3),
        "image_grid_thw": torch.ones(1, 3, dtype=torch.long), "note": "not a tensor",
    }
    b = split_batch(inputs)
    assert b.inputs.input_ids is ids and set(b.inputs.extra) == {"pixel_values", "image_grid_thw"}
    assert b.visual_mask.dtype == torch.bool and b.instruction_mask.dtype == torch.bool and not b.on_policy
    assert split_batch({**inputs, ON_POLICY: True}).on_policy
    assert not split_batch({**inputs, ON_POLICY: torch.tensor(True)}).on_policy  # only the trainer's own marker
    with pytest.raises(ValueError, match=r"missing \['visual_mask'\]"):
        split_batch({k: v for k, v in inputs.items() if k != "visual_mask"})


def test_head_rows_computes_few_rows_only_and_poisons_the_others() -> None:
    g = torch.Generator().manual_seed(0)
    h, w, bias = torch.randn(2, 5, 4, generator=g), torch.randn(7, 4, generator=g), torch.randn(7, generator=g)
    rows = torch.tensor([[True, False, True, False, False], [False, False, False, True, True]])
    out = head_rows(h, w, bias, rows)
    torch.testing.assert_close(out[rows], torch.nn.functional.linear(h, w, bias)[rows])
    assert bool(out[~rows].isnan().all()) and not out.requires_grad
    with pytest.raises(ValueError, match="rows must have shape"):
        head_rows(h, w, bias, rows[:, :3])
    most = rows | torch.tensor([[False, True, False, True, True], [True, True, False, False, False]])
    torch.testing.assert_close(head_rows(h, w, bias, most), torch.nn.functional.linear(h, w, bias))  # 8 of 10: all rows


# ---------------------------------------------------------------- student pass and candidates
def test_ground_truth_pass_is_the_model_forward_and_hidden_is_its_lm_head_input(tmp_path, synth, tok, processor) -> None:
    student, teacher = make_model(tok, seed=1), make_model(tok, seed=2, hidden=48, layers=3)
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, DistillationConfig(method="kd"))
    b = split_batch(_batch(tr))
    student.eval()
    with torch.no_grad():
        want = student(input_ids=b.inputs.input_ids, attention_mask=b.inputs.attention_mask, **b.inputs.extra).logits
        got = tr.ground_truth_pass(student, b.inputs, output="logits", tpa=False)
        hidden = tr.ground_truth_pass(student, b.inputs, output="hidden", tpa=False)
    real = b.inputs.attention_mask.bool()
    assert got.output == "logits" and hidden.output == "hidden" and got.ground_truth is None
    torch.testing.assert_close(got.states[real], want[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student.lm_head(hidden.states)[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("forward", ["cached", "packed"])
def test_candidates_from_hidden_states_equal_those_from_logits(tmp_path, synth, tok, processor, forward) -> None:
    """Greedy candidates: the fused sampler (head on the candidate positions only) picks what the
    logits sampler picks; never an image token, only where the candidate mask allows; the expanded
    pass of both outputs agrees through the LM head."""
    student, teacher = make_model(tok, seed=1), make_model(tok, seed=2, hidden=48, layers=3)
    cfg = DistillationConfig(method="tpa", tpa_sampling="greedy", tpa_num_candidates=2, tpa_forward=forward)
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, cfg)
    b = split_batch(_batch(tr))
    student.eval()
    with torch.no_grad():
        exps, states = [], []
        for output in ("logits", "hidden"):
            gt = tr.ground_truth_pass(student, b.inputs, output=output, tpa=True)
            exp = tr.candidates(student, gt, b, torch.Generator().manual_seed(0))
            exps.append(exp)
            states.append(tr.expanded_pass(student, exp, b.inputs, output=output, ground_truth=gt))
    assert torch.equal(exps[0].input_ids, exps[1].input_ids) and torch.equal(exps[0].candidate_index, exps[1].candidate_index)
    cand = exps[0].input_ids[:, exps[0].seq_len :]
    assert not bool((cand == tok.convert_tokens_to_ids("<image>")).any())
    positions = (exps[0].candidate_index >= 0).any(-1)
    assert bool(positions.any()) and not bool((positions & ~tr.candidate_mask(b)).any())
    torch.testing.assert_close(student.lm_head(states[1]), states[0], rtol=1e-4, atol=1e-5)


def test_cached_expanded_pass_needs_the_ground_truth_pass(tmp_path, synth, tok, processor) -> None:
    student, teacher = make_model(tok, seed=1), make_model(tok, seed=2, hidden=48, layers=3)
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, DistillationConfig(method="tpa"))
    b = split_batch(_batch(tr))
    with torch.no_grad():
        gt = tr.ground_truth_pass(student, b.inputs, output="logits", tpa=True)
        exp = tr.candidates(student, gt, b, torch.Generator().manual_seed(0))
        with pytest.raises(ValueError, match="needs the ground-truth pass"):
            tr.expanded_pass(student, exp, b.inputs, output="logits", ground_truth=None)


# ---------------------------------------------------------------- teacher pass
def test_teacher_pass_runs_under_inference_mode_and_returns_normal_tensors(tmp_path, synth, tok, processor) -> None:
    student, teacher = make_model(tok, seed=1), make_model(tok, seed=2, hidden=48, layers=3)
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, DistillationConfig(method="align_ti", iva_layer=1))
    b = split_batch(_batch(tr))
    modes = []
    hook = teacher.model.language_model.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    try:
        gt = tr.ground_truth_pass(student, b.inputs, output="hidden", tpa=True)
        exp = tr.candidates(student, gt, b, torch.Generator().manual_seed(0))
        out = tr.teacher_pass(b, exp, tr.batch_weights(b))
    finally:
        hook.remove()
    assert modes and all(modes)  # the ground-truth pass and the candidate block
    assert out.output == "hidden" and not out.states.is_inference() and not out.weights.is_inference()
    assert out.states.shape[:2] == exp.input_ids.shape and out.weights.shape == b.labels.shape
    with torch.no_grad():  # the same states as the teacher's passes outside inference mode
        t_in = tr.teacher_inputs(b)
        t_gt = tr.ground_truth_pass(teacher, t_in, output="hidden", tpa=True)
        want = tr.expanded_pass(teacher, exp, t_in, output="hidden", ground_truth=t_gt)
    torch.testing.assert_close(out.states, want)


def test_logits_path_sends_only_the_rows_the_loss_reads_through_the_teacher_head(tmp_path, synth, tok, processor) -> None:
    student, teacher = make_model(tok, seed=1), make_model(tok, seed=2, hidden=48, layers=3)
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher,
                  DistillationConfig(method="align_ti", iva_layer=1, loss_impl="logits"))
    tr.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    batch = _batch(tr)
    b = split_batch(batch)
    head_calls, rows_seen, exps = [], [], []
    h1 = teacher.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    real_rows, real_candidates = trainer_mod.head_rows, tr.candidates
    tr.candidates = lambda *a, **kw: exps.append(real_candidates(*a, **kw)) or exps[-1]
    try:
        trainer_mod.head_rows = lambda h, w, bias, rows: rows_seen.append(rows) or real_rows(h, w, bias, rows)
        loss = tr.compute_loss(student, dict(batch))
    finally:
        trainer_mod.head_rows = real_rows
        h1.remove()
    assert torch.isfinite(loss) and not head_calls and len(rows_seen) == len(exps) == 1
    rows, exp = rows_seen[0], exps[0]
    T = b.labels.shape[1]
    supervised = tokinteract.shift_labels(b.labels) != -100
    assert torch.equal(rows[:, :T], supervised | b.visual_mask)  # KD and IVA rows of the ground truth
    bi, _, _, slot = exp.candidate_slots()
    want = torch.zeros_like(rows[:, T:])
    want[bi, slot - T] = True
    assert bool(want.any()) and torch.equal(rows[:, T:], want)  # TPA: the candidate slots, not the unused ones
    assert int(rows.sum()) < rows.numel()  # instruction, padding and unused slots are not asked for


def test_a_row_missing_from_the_teacher_rows_raises_instead_of_a_wrong_loss(tmp_path, synth, tok, processor, monkeypatch) -> None:
    student, teacher = make_model(tok, seed=1), make_model(tok, seed=2, hidden=48, layers=3)
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, DistillationConfig(method="kd", loss_impl="logits"))
    rows = tr.teacher_rows

    def drop_one(*a, **kw):
        r = rows(*a, **kw).clone()
        r[r.nonzero()[0].unbind()] = False
        return r

    monkeypatch.setattr(tr, "teacher_rows", drop_one)
    with pytest.raises(ValueError, match="non-finite"):
        tr.compute_loss(student, dict(_batch(tr)))


# ---------------------------------------------------------------- GKD in training_step
@pytest.mark.parametrize("impl", ["logits", "fused"])
def test_on_policy_batch_is_made_in_training_step_and_gets_the_kd_term_only(tmp_path, synth, tok, processor, impl) -> None:
    """gkd_lambda=1: training_step replaces the batch by generated responses; compute_loss on it is
    kd_weight * KD (JSD) on the generated tokens, as the paper's GKD baseline and earlier releases."""
    student, teacher = make_model(tok, seed=1), make_model(tok, seed=2, hidden=48, layers=3)
    cfg = DistillationConfig(method="gkd", gkd_lambda=1.0, gkd_max_new_tokens=4, kd_weight=0.7, loss_impl=impl)
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, cfg)
    tr.current_gradient_accumulation_steps = 1
    seen = {}
    real = tr.compute_loss

    def compute_loss(model, inputs, *a, **kw):
        seen["inputs"] = dict(inputs)
        seen["loss"] = real(model, inputs, *a, **kw)
        return seen["loss"]

    tr.compute_loss = compute_loss
    student.train()
    tr.training_step(student, _batch(tr, 2))
    got = seen["inputs"]
    assert got[ON_POLICY] is True and tr._on_policy_batches == 1 and set(tr._part_sums) == {"kd_on_policy"}
    seq, att, labels = got["input_ids"], got["attention_mask"], got["labels"]
    assert bool((labels != -100).any()) and seq.shape[1] == labels.shape[1]
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        pos = trainer_mod._position_ids(att)
        s = student(input_ids=seq, attention_mask=att, position_ids=pos, pixel_values=got["pixel_values"]).logits
        t = teacher(input_ids=seq, attention_mask=att, position_ids=pos, pixel_values=got["pixel_values"]).logits
    kd = tokinteract.kd_loss(s, t, labels, kind="jsd")
    torch.testing.assert_close(seen["loss"].detach(), 0.7 * kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr._part_sums["kd_on_policy"], kd, rtol=1e-5, atol=1e-6)


def test_off_policy_coin_keeps_the_batch(tmp_path, synth, tok, processor, monkeypatch) -> None:
    student, teacher = make_model(tok, seed=1), make_model(tok, seed=2, hidden=48, layers=3)
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, DistillationConfig(method="gkd", gkd_lambda=0.0))
    tr.current_gradient_accumulation_steps = 1
    monkeypatch.setattr(tr, "_generate", lambda *a, **kw: pytest.fail("generated with gkd_lambda=0"))
    student.train()
    tr.training_step(student, _batch(tr, 2))
    assert tr._on_policy_batches == 0 and {"sft", "kd"} <= set(tr._part_sums)


# ---------------------------------------------------------------- configuration groups
def test_every_config_field_belongs_to_exactly_one_group() -> None:
    names = [f.name for g in config_mod.GROUPS for f in dataclasses.fields(g)]
    assert len(names) == len(set(names))
    assert set(names) == {f.name for f in dataclasses.fields(DistillationConfig)}


def test_groups_join_into_the_config_and_back() -> None:
    tpa = config_mod.TPAConfig(tpa_num_candidates=2, tpa_forward="packed")
    cfg = DistillationConfig.from_groups(config_mod.MethodConfig(method="tpa"), tpa)
    assert cfg == DistillationConfig(method="tpa", tpa_num_candidates=2, tpa_forward="packed")
    assert cfg.group(config_mod.TPAConfig) == tpa and cfg.group(config_mod.LossConfig) == config_mod.LossConfig()
    with pytest.raises(ValueError, match="TPAConfig given twice"):
        DistillationConfig.from_groups(tpa, tpa)
    with pytest.raises(TypeError, match="groups must be instances"):
        DistillationConfig.from_groups(cfg)
    with pytest.raises(TypeError, match="kind must be one of"):
        cfg.group(DistillationConfig)


@pytest.mark.parametrize(
    "group,bad,match",
    [
        (config_mod.TPAConfig, dict(tpa_top_p=0.0), "tpa_top_p"),
        (config_mod.TPAConfig, dict(tpa_forward="twice"), "tpa_forward"),
        (config_mod.OnPolicyConfig, dict(gkd_lambda=2.0), "gkd_lambda"),
        (config_mod.LossConfig, dict(loss_impl="chunked"), "loss_impl"),
        (config_mod.IVAConfig, dict(iva_layer=-1), "iva_layer"),
        (config_mod.FaultConfig, dict(max_nonfinite_steps=0), "max_nonfinite_steps"),
        (config_mod.MethodConfig, dict(method="nope"), "method"),
    ],
)
def test_each_group_checks_its_own_fields_and_the_config_checks_them_all(group, bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        group(**bad).validate()
    with pytest.raises(ValueError, match=match):
        DistillationConfig(**bad).resolved()


def test_cli_parses_the_groups_with_the_same_flags_and_keys(tmp_path) -> None:
    import yaml

    from tokinteract.mllm.cli import _parser, parse_args

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": "tpa", "tpa_num_candidates": 3, "loss_impl": "logits",
                                    "data_path": "x.json", "output_dir": str(tmp_path / "o")}))
    _, _, dcfg, _ = parse_args([str(path), "--gkd_lambda", "0.25", "--bad_sample_limit", "0.5"])
    assert isinstance(dcfg, DistillationConfig)
    assert (dcfg.method, dcfg.tpa_num_candidates, dcfg.loss_impl, dcfg.gkd_lambda, dcfg.bad_sample_limit) == (
        "tpa", 3, "logits", 0.25, 0.5)
    help_text = _parser().format_help()
    for g in config_mod.GROUPS:
        assert g._argument_group_name in help_text  # one --help section per concern


def test_one_step_is_unchanged_by_splitting_the_config(tmp_path, synth, tok, processor) -> None:
    """The same step from a config built from groups and from the flat facade."""
    student, teacher = make_model(tok, seed=1), make_model(tok, seed=2, hidden=48, layers=3)
    flat = DistillationConfig(method="tpa", tpa_num_candidates=2, loss_impl="logits")
    joined = DistillationConfig.from_groups(
        config_mod.MethodConfig(method="tpa"), config_mod.TPAConfig(tpa_num_candidates=2),
        config_mod.LossConfig(loss_impl="logits"),
    )
    steps = []
    for i, cfg in enumerate((flat, joined)):
        tr = _trainer(tmp_path / str(i), synth, tok, processor, student, teacher, cfg)
        steps.append(one_step(tr, student, _batch(tr, 2)))
    assert steps[0][0] == steps[1][0] and steps[0][1] == steps[1][1]
    assert all(torch.equal(steps[0][2][k], steps[1][2][k]) for k in steps[0][2])


def test_a_teacher_with_logit_softcapping_returns_full_logits_under_no_grad(tmp_path, synth, tok, processor) -> None:
    """A teacher whose logits are more than its LM head's output (final-logit softcapping, read from
    its config) gives its own logits on the logits path, never hidden states + head."""
    student, teacher = make_model(tok, seed=1), make_model(tok, seed=2, hidden=48, layers=3)
    teacher.config.text_config.final_logit_softcapping = 30.0
    tr = _trainer(tmp_path, synth, tok, processor, student, teacher, DistillationConfig(method="kd", loss_impl="logits"))
    assert tr.teacher_output == "logits"
    b = split_batch(_batch(tr))
    modes = []
    hook = teacher.lm_head.register_forward_hook(
        lambda *_: modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
    )
    try:
        out = tr.teacher_pass(b, None, tr.batch_weights(b))
    finally:
        hook.remove()
    assert out.output == "logits" and modes == [(False, False)] and not out.states.is_inference()
    with torch.no_grad():
        want = teacher(input_ids=b.inputs.input_ids, attention_mask=b.inputs.attention_mask, **b.inputs.extra).logits
    real = b.inputs.attention_mask.bool()
    torch.testing.assert_close(out.states[real], want[real], rtol=1e-5, atol=1e-5)
