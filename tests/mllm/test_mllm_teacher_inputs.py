"""A teacher with its own processor and image-token count (issue 13, item 3), on every family of
``tests/hf/families.py``.

Teachers (:func:`teacher_processor`, :func:`teacher_model`): twice the student's resolution per side where
the family's processor allows it: LLaVA a 32 px tower (4x4 tokens per image vs 2x2); Qwen2-VL / Qwen2.5-VL a
processor upsampling to at least 1536 px^2 (4x the tokens); Gemma 3 a 32 px tower with 16
``mm_tokens_per_image`` (vs 4); LLaVA-NeXT / OneVision a 32 px tower with the anyres pinpoints doubled;
Idefics3 / SmolVLM 32 px tiles with ``image_seq_len`` 16; InternVL 32 px tiles with 16 tokens each; Qwen3-VL
another vision tower (depth, width) at the same resolution. The trainer's parts are compared with naive
per-sample forwards: each model on its own sequence of the sample (the processor's output for that sample
alone), SFT and KD on the rows that predict the same response token, TPA with one plain forward per
candidate after each model's own prefix (loss, parts and gradients); IVA (LLaVA, Qwen2.5-VL) with the
teacher's eager attention map and logits pooled onto the student's grid; IVA refused for every family
without one grid per image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import families as fx  # noqa: E402
from mllm_helpers import one_step, processor_trainer, record_candidates, write_family_data  # noqa: E402

from tokinteract.hf.families import GRID_MODEL_TYPES, image_grids, visual_token_ids  # noqa: E402
from tokinteract.mllm import DistillationConfig, DistillationTrainer  # noqa: E402
from tokinteract.mllm.data import DataError  # noqa: E402
from tokinteract.mllm.processor_data import ProcessorCollator, ProcessorDataset  # noqa: E402

pytestmark = pytest.mark.slow  # trains tiny models

NAMES = ["llava", "qwen2_5_vl"]  # the pairs of the collator and IVA tests
SAMPLES = (0, 1, 2)  # one image; two images over two turns; text only (the per-family test)
FACTOR = 2  # the teacher's grid is 2x the student's on each side, for every image of both pairs
NOT_INPUTS = ("labels", "visual_mask", "instruction_mask", "response_mask")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_family_data(tmp_path_factory.mktemp("teacher-inputs"))


_BIG_PINPOINTS = [[2 * h, 2 * w] for h, w in fx._PINPOINTS]


def teacher_processor(name: str):
    """The family's processor at twice the student's resolution per side (4x the visual tokens per image or
    tile); Qwen3-VL's unchanged (its teacher differs in the vision tower only, as 8B and 2B do)."""
    if name == "qwen3_vl":
        return fx.make_processor(name)
    if name == "llava":
        from transformers.models.siglip.image_processing_pil_siglip import (
            SiglipImageProcessorPil,
        )
        return fx.make_processor(name, SiglipImageProcessorPil(size={"height": 32, "width": 32}))
    if name in ("qwen2_vl", "qwen2_5_vl"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )
        return fx.make_processor(name, Qwen2VLImageProcessorPil(
            patch_size=4, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 1536, "longest_edge": 4096}))
    if name == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil,
        )
        return fx.make_processor(name, Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), image_seq_length=16)
    if name == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import (
            LlavaNextImageProcessorPil,
        )
        return fx.make_processor(name, LlavaNextImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=_BIG_PINPOINTS))
    if name == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )
        return fx.make_processor(name, LlavaOnevisionImageProcessorPil(
            size={"height": 32, "width": 32}, image_grid_pinpoints=_BIG_PINPOINTS), num_image_tokens=16)
    if name in ("idefics3", "smolvlm"):  # 32 px tiles (images up to 64 px, split), 16 tokens per tile
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil,
        )
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil,
        )

        cls = Idefics3ImageProcessorPil if name == "idefics3" else SmolVLMImageProcessorPil
        return fx.make_processor(name, cls(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}),
                                 image_seq_len=16)
    if name == "internvl":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            GotOcr2ImageProcessorPil,
        )
        return fx.make_processor(name, GotOcr2ImageProcessorPil(
            size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4), image_seq_length=16)
    raise ValueError(name)


def teacher_model(name: str, seed: int = 2):
    f = fx.family(name)
    cfg = f.config(fx._token_ids(name))
    vc = cfg.vision_config
    if name == "qwen3_vl":  # another vision tower (depth, width) with the same patches and merge
        vc.depth, vc.hidden_size, vc.intermediate_size = 3, 48, 96
        vc.deepstack_visual_indexes = [1]
    elif name in ("qwen2_vl", "qwen2_5_vl"):
        pass  # the same tower, more patches
    elif name == "internvl":
        vc.image_size = [32, 32]
        cfg.image_seq_length = 16
    else:
        vc.image_size = 32
        if name == "gemma3":
            cfg.mm_tokens_per_image = 16
        if name in ("llava_next", "llava_onevision"):
            cfg.image_grid_pinpoints = _BIG_PINPOINTS
    torch.manual_seed(seed)
    impl = {"": "sdpa", "text_config": "sdpa", "vision_config": "sdpa"}
    return getattr(transformers, f.model_cls)._from_config(cfg, attn_implementation=impl, dtype=torch.float32).eval()


def collator(name: str, student, teacher) -> ProcessorCollator:
    return ProcessorCollator(fx.make_processor(name), visual_token_ids(student), teacher_processor=teacher_processor(name),
                             teacher_visual_token_ids=visual_token_ids(teacher))


def _trainer(tmp_path, data, name, student, teacher, distill):
    return processor_trainer(tmp_path, data, fx.make_processor(name), student, teacher, distill,
                             collator(name, student, teacher))


def _split(batch: dict) -> tuple[dict, dict]:
    """(student, teacher) parts of a collated batch, the teacher's without its prefix."""
    s = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    t = {k[len("teacher_"):]: v for k, v in batch.items() if k.startswith("teacher_")}
    return s, t


def _inputs(part: dict) -> dict:
    return {k: v for k, v in part.items() if k not in NOT_INPUTS}


def _kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """KL(T || S) per row."""
    return (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)


def _rows(labels: torch.Tensor) -> torch.Tensor:
    """Rows t whose next token is supervised (of one unpadded sample)."""
    return (labels[0, 1:] != -100).nonzero().flatten()


def _singles(tr, samples=None) -> list[tuple[dict, dict]]:
    """Each sample (default: every one) alone through the collator (student part, teacher part): no padding."""
    return [_split(tr.data_collator([tr.train_dataset[i]])) for i in (samples or range(len(tr.train_dataset)))]


def test_the_collator_adds_the_teachers_own_batch(data) -> None:
    for name in NAMES:
        student, teacher = fx.make_model(name, seed=1), teacher_model(name)
        proc = fx.make_processor(name)
        ds = ProcessorDataset(data, data.parent, proc)
        col = collator(name, student, teacher)
        batch = col([ds[i] for i in range(3)])
        s, t = _split(batch)
        plain = ProcessorCollator(proc, visual_token_ids(student))([ds[i] for i in range(3)])
        assert s.keys() == plain.keys()
        for k in plain:  # the student's batch is unchanged
            torch.testing.assert_close(s[k], plain[k], rtol=0, atol=0)
        assert {"input_ids", "attention_mask", "pixel_values", "labels", "visual_mask", "instruction_mask"} <= t.keys()
        if name == "qwen2_5_vl":
            assert {"image_grid_thw", "mm_token_type_ids"} <= t.keys()
        assert t["visual_mask"].sum(1).tolist() == [4 * n for n in s["visual_mask"].sum(1).tolist()]
        for b in range(3):
            assert torch.equal(s["labels"][b][s["labels"][b] != -100], t["labels"][b][t["labels"][b] != -100])
            assert torch.equal(s["input_ids"][b][s["instruction_mask"][b]], t["input_ids"][b][t["instruction_mask"][b]])
        sg = image_grids(student, _inputs(s), s["visual_mask"])
        tg = image_grids(teacher, _inputs(t), t["visual_mask"])
        assert [[(h * FACTOR, w * FACTOR) for h, w in g] for g in sg] == tg
        assert [len(g) for g in sg] == [1, 2, 0]


def test_bad_teacher_processors_and_responses_are_refused(data) -> None:
    proc = fx.make_processor("llava")
    with pytest.raises(ValueError, match=r"student 'LlavaProcessor' and teacher 'Gemma3Processor' have different "
                                         r"tokenizers"):
        ProcessorCollator(proc, [5], teacher_processor=fx.make_processor("gemma3"), teacher_visual_token_ids=[5])
    with pytest.raises(ValueError, match="teacher_processor needs teacher_visual_token_ids"):
        ProcessorCollator(proc, [5], teacher_processor=teacher_processor("llava"))
    student, teacher = fx.make_model("llava", seed=1), teacher_model("llava")
    col = collator("llava", student, teacher)
    ds = ProcessorDataset(data, data.parent, proc)
    inner = col.teacher

    def other_answer(features):
        out = inner(features)
        lab = out["labels"]
        lab[1, (lab[1] != -100).nonzero()[0]] = 7  # sample 1's first supervised token differs
        return out

    col.teacher = other_answer
    with pytest.raises(DataError, match=r"sample 1: the teacher's processor gives other supervised tokens"):
        col([ds[i] for i in range(3)])


def _prefix(inputs: dict, t: int, token: int) -> dict:
    """Tokens 0..t of one unpadded sample plus ``token`` (every image lies in the prefix): the per-token
    inputs cut and extended with the text values, the per-image / per-sample ones unchanged."""
    out = dict(inputs)
    for k in fx.TOKEN_KEYS:
        if k in out:
            v = out[k]
            fill = token if k == "input_ids" else int(k == "attention_mask")
            out[k] = torch.cat([v[:, : t + 1], torch.full((1, 1), fill, dtype=v.dtype)], 1)
    return out


@pytest.mark.parametrize("name", fx.FAMILIES)
def test_sft_kd_and_tpa_equal_per_sample_forwards_on_each_models_own_sequence(tmp_path, data, name, monkeypatch) -> None:
    """One step of ``tpa`` (SFT + KD + TPA), logits loss with the cached TPA forward and fused loss with the
    packed one, on three samples (one image; two images over two turns; text only): loss, parts and every student
    gradient equal the naive reference built from plain per-sample forwards of each model on its own
    sequence (SFT and KD on the rows predicting the same response token) and one plain forward per
    candidate after each model's own prefix (TPA)."""
    d = 2
    student, teacher = fx.make_model(name, seed=1), teacher_model(name)
    with torch.no_grad():  # sharper distributions: KLs of order 1, so that errors show
        student.lm_head.weight.mul_(10.0)
        teacher.lm_head.weight.mul_(15.0)
    steps = {}
    for impl, forward in (("logits", "cached"), ("fused", "packed")):
        cfg = DistillationConfig(method="tpa", loss_impl=impl, tpa_forward=forward, tpa_num_candidates=d)
        tr = _trainer(tmp_path / impl, data, name, student, teacher, cfg)
        rec = record_candidates(monkeypatch)
        steps[impl] = (*one_step(tr, student, tr.data_collator([tr.train_dataset[i] for i in SAMPLES])), rec)
    cand, cmask = steps["logits"][3]["cand"], steps["logits"][3]["mask"]
    assert torch.equal(steps["fused"][3]["cand"], cand) and torch.equal(steps["fused"][3]["mask"], cmask)
    singles = _singles(tr, SAMPLES)
    n = sum(len(_rows(s["labels"])) for s, _ in singles)
    ref = {"sft": 0.0, "kd": 0.0, "tpa": 0.0}
    student.eval()
    student.zero_grad(set_to_none=True)
    for b, (s, t) in enumerate(singles):
        rs, rt = _rows(s["labels"]), _rows(t["labels"])
        assert torch.equal(s["labels"][0, rs + 1], t["labels"][0, rt + 1])  # the same tokens ...
        ns, nt = int(s["visual_mask"].sum()), int(t["visual_mask"].sum())
        assert nt == ns if name == "qwen3_vl" or b == 2 else nt > ns > 0  # ... after other image-token counts
        assert cmask[b].nonzero().flatten().tolist() == rs.tolist()  # right padding: the single sample's rows
        sl = student(**_inputs(s)).logits[0].float()
        with torch.no_grad():
            tl = teacher(**_inputs(t)).logits[0].float()
        kd = _kl(tl[rt], sl[rs]).sum() / n
        sft = torch.nn.functional.cross_entropy(sl[rs], s["labels"][0, rs + 1], reduction="sum") / n
        (kd + sft).backward()
        ref["kd"] += float(kd.detach())
        ref["sft"] += float(sft.detach())
        for ts, tt in zip(rs.tolist(), rt.tolist()):
            for u in range(d):
                tok = int(cand[b, ts, u])
                last = student(**_prefix(_inputs(s), ts, tok)).logits[0, -1].float()
                with torch.no_grad():
                    t_last = teacher(**_prefix(_inputs(t), tt, tok)).logits[0, -1].float()
                tpa = _kl(t_last, last) / (d * n)
                tpa.backward()
                ref["tpa"] += float(tpa.detach())
    ref_grads = {k: p.grad.detach().clone() for k, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    assert min(ref.values()) > 0.05
    for impl, (loss, parts, grads, _) in steps.items():
        for k in ref:
            assert parts[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), (impl, k)
        assert loss == pytest.approx(sum(ref.values()), rel=1e-4), impl
        assert grads.keys() == ref_grads.keys() and any(".language_model." in k or ".text_model." in k for k in grads)
        for k, g in ref_grads.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=max(1e-6, 1e-5 * float(g.abs().max())),
                                       msg=lambda m, impl=impl, k=k: f"{impl} {k}: {m}")


def _pool(x: torch.Tensor, grid: tuple[int, int], how: str, f: int = FACTOR) -> torch.Tensor:
    """``[h*w, ...]`` row-major cells -> the student's grid (f x f blocks): mean or sum."""
    h, w = grid
    y = x.reshape(h // f, f, w // f, f, *x.shape[1:])
    y = y.mean((1, 3)) if how == "mean" else y.sum((1, 3))
    return y.reshape((h // f) * (w // f), *x.shape[1:])


@pytest.mark.parametrize("name,impl", [("llava", "logits"), ("qwen2_5_vl", "fused"), ("qwen3_vl", "logits")])
def test_iva_resamples_the_teachers_map_and_outputs_onto_the_students_grid(tmp_path, data, name, impl) -> None:
    """Qwen3-VL: another tower on the same grid (f = 1: the map and outputs are taken cell for cell)."""
    layer = 1
    f = 1 if name == "qwen3_vl" else FACTOR
    student, teacher = fx.make_model(name, seed=1), teacher_model(name)
    cfg = DistillationConfig(method="iva", iva_layer=layer, loss_impl=impl)
    tr = _trainer(tmp_path, data, name, student, teacher, cfg)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(3)])
    _, parts, _ = one_step(tr, student, batch)
    student.eval()
    teacher.set_attn_implementation("eager")
    iva = 0.0
    with torch.no_grad():
        for s, t in _singles(tr):
            if not int(s["visual_mask"].sum()):
                continue
            sl = student(**_inputs(s)).logits[0].float()
            out = teacher(**_inputs(t), output_attentions=True)
            tl = out.logits[0].float()
            a = out.attentions[layer][0].float().mean(0)  # [T, T], mean over heads
            w = a[t["instruction_mask"][0]].mean(0)  # mean over the instruction rows: attention to each key
            sv, tv = s["visual_mask"][0].nonzero().flatten(), t["visual_mask"][0].nonzero().flatten()
            tg = image_grids(teacher, _inputs(t), t["visual_mask"])[0]
            t0 = s0 = 0
            for h, wd in tg:
                n = h * wd
                rows_t = tv[t0 : t0 + n]
                rows_s = sv[s0 : s0 + n // f**2]
                ws = _pool(w[rows_t], (h, wd), "sum", f)  # the attention mass of each student cell
                ts = _pool(tl[rows_t], (h, wd), "mean", f)  # the teacher's mean logits over the cell
                iva += float((ws * _kl(ts, sl[rows_s])).sum())
                t0, s0 = t0 + n, s0 + n // f**2
            assert t0 == len(tv) and s0 == len(sv)
    ref = iva / 3  # mean over the batch's sequences
    assert ref > 0
    assert parts["iva"] == pytest.approx(ref, rel=1e-4, abs=1e-7)


def test_trainer_refuses_what_a_teacher_on_its_own_inputs_cannot_do(tmp_path, data) -> None:
    student, teacher = fx.make_model("llava", seed=1), teacher_model("llava")
    with pytest.raises(ValueError, match="iva_layer is None: IRS layer selection on the teacher's own batches"):
        _trainer(tmp_path, data, "llava", student, teacher, DistillationConfig(method="iva"))
    with pytest.raises(ValueError, match="on_policy .* not supported with a teacher that reads its own"):
        _trainer(tmp_path, data, "llava", student, teacher, DistillationConfig(method="gkd"))
    g_student, g_teacher = fx.make_model("gemma3", seed=1), fx.make_model("gemma3", seed=2)
    proc = fx.make_processor("gemma3")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    col = ProcessorCollator(proc, visual_token_ids(g_student), teacher_processor=fx.make_processor("gemma3"),
                            teacher_visual_token_ids=visual_token_ids(g_teacher))
    for name in (n for n in fx.FAMILIES if n not in GRID_MODEL_TYPES):  # every family without one grid per image
        st, te = fx.make_model(name, seed=1), teacher_model(name)
        p_n = fx.make_processor(name)
        col_n = ProcessorCollator(p_n, visual_token_ids(st), teacher_processor=teacher_processor(name),
                                  teacher_visual_token_ids=visual_token_ids(te))
        with pytest.raises(ValueError, match=r"IVA with a teacher on its own visual tokens needs both models to show "
                                             rf"each image as one grid .*'{name}'"):
            DistillationTrainer(st, args, teacher=te, distill=DistillationConfig(method="align_ti", iva_layer=1),
                                train_dataset=ProcessorDataset(data, data.parent, p_n), data_collator=col_n,
                                processing_class=p_n)
    with pytest.raises(ValueError, match=r"different families \(student model_type 'gemma3', teacher 'llava'\); with "
                                         r"their own processors"):
        DistillationTrainer(g_student, args, teacher=teacher, distill=DistillationConfig(method="kd"),
                            train_dataset=ProcessorDataset(data, data.parent, proc), data_collator=col,
                            processing_class=proc)
    with pytest.raises(ValueError, match=r"Gemma 3 \(model_type 'gemma3'\) does not show each image as one grid"):
        image_grids(g_student, {}, torch.zeros(1, 3, dtype=torch.bool))


def test_cli_trains_a_llava_student_from_a_higher_resolution_teacher(tmp_path, data, monkeypatch) -> None:
    import yaml
    from transformers import AutoModelForImageTextToText

    from tokinteract.mllm.cli import main
    from tokinteract.mllm.model import teacher_needs_own_inputs

    student, teacher = fx.make_model("llava", seed=1), teacher_model("llava")
    assert teacher_needs_own_inputs(student, teacher, fx.make_processor("llava"), teacher_processor("llava"))
    assert not teacher_needs_own_inputs(student, fx.make_model("llava", seed=2), fx.make_processor("llava"),
                                        fx.make_processor("llava"))
    ckpts = {}
    for role, model, proc in (("student", student, fx.make_processor("llava")),
                              ("teacher", teacher, teacher_processor("llava"))):
        ckpts[role] = tmp_path / role
        model.save_pretrained(ckpts[role])
        proc.save_pretrained(ckpts[role])
    out = tmp_path / "out"
    cfg = dict(
        student_checkpoint=str(ckpts["student"]), teacher_checkpoint=str(ckpts["teacher"]), method="align_ti",
        iva_layer=1, data_path=str(data), image_folder=str(data.parent), output_dir=str(out),
        per_device_train_batch_size=3, max_steps=1, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, learning_rate=1e-2, disable_tqdm=True, seed=0,
        preflight=False,  # its dataset scan is the LLaVA pipeline's, whose chat template these fixtures do not use
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    import tokinteract.mllm.cli as cli_mod

    seen = []
    orig = cli_mod._processor_trainer

    def spy(*a, **kw):
        seen.append(kw.get("teacher_processor"))
        return orig(*a, **kw)

    monkeypatch.setattr(cli_mod, "_processor_trainer", spy)
    assert main([str(tmp_path / "cfg.yaml")]) == 0
    assert len(seen) == 1 and seen[0].image_processor.size == {"height": 32, "width": 32}  # the teacher's own
    after = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    assert not torch.equal(after["lm_head.weight"], student.state_dict()["lm_head.weight"])  # it trained
