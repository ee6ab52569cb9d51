"""QLoRA students (issue 13 item 4): a 4-bit bitsandbytes base (NF4, on CPU) with LoRA adapters.

One ``align_ti`` step gives the same loss, parts and adapter / projector gradients with the fused and
the logits losses, and both equal the same step on a plain fp32 model holding the dequantised weights
with the same adapters (an independent check that the 4-bit layers compute what they store); a trained
adapter saved with ``save_pretrained`` reloads on a freshly quantised base to the trained model's logits;
a quantised LM head is refused by the fused loss; a quantised student without adapters is refused.

The tiny vision towers stay unquantised (``llm_int8_skip_modules``): bitsandbytes' CPU 4-bit kernel needs
``in_features`` >= its block size (64), and their layers have 32 inputs. QLoRA quantises the language
model, which is what is tested.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import families as fx  # noqa: E402
from test_mllm_families_trainer import data  # noqa: E402, F401  (the fixture: 3 samples, 2 images, one text-only)
from test_mllm_lora import _lora, _outputs, _step, _trainer  # noqa: E402

from tokinteract.hf.families import visual_token_ids  # noqa: E402
from tokinteract.mllm import DistillationConfig  # noqa: E402
from tokinteract.mllm.lora import exact_4bit_layers, unwrap_peft  # noqa: E402
from tokinteract.mllm.processor_data import ProcessorCollator, ProcessorDataset  # noqa: E402

NAME = "qwen2_5_vl"
SKIP = ["model.visual", "lm_head"]  # transformers' default keeps lm_head unquantised; the tiny tower too (see above)


def _quantised(ckpt: Path, skip: list[str] = SKIP) -> torch.nn.Module:
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                             llm_int8_skip_modules=skip)
    return AutoModelForImageTextToText.from_pretrained(ckpt, quantization_config=cfg, dtype=torch.float32)


def _checkpoint(tmp_path: Path, seed: int = 1) -> Path:
    ckpt = tmp_path / f"base{seed}"
    fx.make_model(NAME, seed=seed).save_pretrained(ckpt)
    return ckpt


def _dequantised_copy(q4: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A plain fp32 model of the family whose weights are the 4-bit model's, dequantised (read before any
    forward: bitsandbytes repacks a 4-bit weight for its CPU kernel at the first call)."""
    plain = fx.make_model(NAME, seed=seed)
    quantised = {n: m for n, m in q4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert any(".language_model." in n for n in quantised) and not any(".visual." in n for n in quantised)
    sd = plain.state_dict()
    with torch.no_grad():
        for n, m in quantised.items():
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            assert w.shape == sd[n + ".weight"].shape and 0 < float((w - sd[n + ".weight"]).abs().max()) < 0.5
            sd[n + ".weight"].copy_(w)
        for k, v in q4.state_dict().items():
            if k in sd and v.dtype.is_floating_point and v.shape == sd[k].shape and k.rsplit(".", 1)[0] not in quantised:
                sd[k].copy_(v)
    return plain


def _batch(student: torch.nn.Module, data: Path) -> dict:
    proc = fx.make_processor(NAME)
    ds = ProcessorDataset(data, data.parent, proc)
    return ProcessorCollator(proc, visual_token_ids(unwrap_peft(student)))([ds[i] for i in range(len(ds))])


def test_qlora_align_ti_step_fused_equals_logits_equals_the_dequantised_model(tmp_path, data) -> None:  # noqa: F811
    teacher = fx.make_model(NAME, seed=2)
    q4 = _quantised(_checkpoint(tmp_path))
    plain = _lora(_dequantised_copy(q4))
    student = _lora(q4)
    steps = {}
    for impl in ("logits", "fused"):
        cfg = DistillationConfig(method="align_ti", iva_layer=1, loss_impl=impl)
        steps[impl] = _step(tmp_path / impl, data, NAME, student, teacher, cfg)
        _outputs(student, _batch(student, data))  # an eval-mode, no-grad forward (bf16 repacking: see below)
    steps["plain"] = _step(tmp_path / "plain", data, NAME, plain, teacher,
                           DistillationConfig(method="align_ti", iva_layer=1, loss_impl="logits"))
    (la, pa, ga), (lb, pb, gb), (lp, pp, gp) = steps["logits"], steps["fused"], steps["plain"]
    assert pa["tpa"] > 0 and pa["iva"] > 0 and pa["kd"] > 0 and pa.keys() == pb.keys() == pp.keys()
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)
    assert lp == pytest.approx(la, rel=1e-5, abs=1e-6)
    for k in pa:
        assert pb[k] == pytest.approx(pa[k], rel=1e-5, abs=1e-6), k
        assert pp[k] == pytest.approx(pa[k], rel=1e-5, abs=1e-6), k
    assert ga.keys() == gb.keys() == gp.keys()
    assert {k for k in ga if "lora_A" in k} and all("lora_" in k or ".modules_to_save." in k for k in ga)
    assert all(float(ga[k].abs().max()) > 0 for k in ga if "lora_A" in k)  # B is random: A's gradients are real
    for k in ga:
        tol = max(1e-6, 1e-5 * float(ga[k].abs().max()))
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=tol, msg=k)
        torch.testing.assert_close(gp[k], ga[k], rtol=1e-4, atol=tol, msg=k)


def test_a_4bit_teacher_fused_equals_logits_equals_its_dequantised_model(tmp_path, data) -> None:  # noqa: F811
    """A teacher loaded 4-bit (to save memory) is read through its own forward, in its compute dtype (fp32
    here: the trainer keeps bitsandbytes off its bf16 CPU kernel, see the next test): the fused and the logits
    losses and a plain teacher holding its dequantised weights give the same step."""
    t4 = _quantised(_checkpoint(tmp_path, seed=2))
    plain_teacher = _dequantised_copy(t4, seed=2)
    student = _lora(fx.make_model(NAME, seed=1))
    res = {}
    for key, teacher, impl in (("logits", t4, "logits"), ("fused", t4, "fused"), ("plain", plain_teacher, "logits")):
        res[key] = _step(tmp_path / key, data, NAME, student, teacher,
                         DistillationConfig(method="align_ti", iva_layer=1, loss_impl=impl))
    (la, pa, ga) = res["logits"]
    assert pa["tpa"] > 0 and pa["iva"] > 0 and pa["kd"] > 0
    for key in ("fused", "plain"):
        lb, pb, gb = res[key]
        assert lb == pytest.approx(la, rel=1e-5, abs=1e-6) and pb.keys() == pa.keys() and gb.keys() == ga.keys(), key
        for k in pa:
            assert pb[k] == pytest.approx(pa[k], rel=1e-5, abs=1e-6), (key, k)
        for k in ga:
            torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=max(1e-6, 1e-5 * float(ga[k].abs().max())),
                                       msg=f"{key} {k}")


@pytest.mark.skipif(not bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu, reason="a CPU without AVX512-BF16")
def test_a_4bit_layer_repacked_for_the_bf16_cpu_kernel_is_refused(tmp_path, data) -> None:  # noqa: F811
    """bitsandbytes repacks a 4-bit weight at its first eval-mode, no-grad forward on an AVX512-BF16 CPU; the
    repacked layer computes in bf16 and passes no gradient, even in training mode. A model already repacked
    is refused when the trainer is built; the trainer keeps the layers it holds from being repacked."""
    q4 = _quantised(_checkpoint(tmp_path))
    lin = q4.model.language_model.layers[0].mlp.up_proj
    x = torch.randn(3, 64)
    w = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    with torch.no_grad():
        y = lin.eval()(x)
    assert float((y - torch.nn.functional.linear(x, w)).abs().max()) > 1e-4  # bf16, not the compute dtype
    xg = x.clone().requires_grad_(True)
    lin.train()(xg).sum().backward()
    assert xg.grad is None  # the repacked layer passes no gradient in training mode either
    with pytest.raises(ValueError, match=r"^student: the 4-bit layer .*layers\.0\.mlp\.up_proj\.base_layer was repacked by "
                                         r"bitsandbytes for its bf16 CPU inference kernel"):
        _trainer(tmp_path, data, NAME, _lora(q4), fx.make_model(NAME, seed=2), DistillationConfig(method="kd"))


def test_qlora_trains_and_its_saved_adapter_reloads_on_a_fresh_4bit_base(tmp_path, data) -> None:  # noqa: F811
    ckpt = _checkpoint(tmp_path)
    student = _lora(_quantised(ckpt))
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    tr = _trainer(tmp_path / "run", data, NAME, student, fx.make_model(NAME, seed=2),
                  DistillationConfig(method="align_ti", iva_layer=1, loss_impl="fused"))
    tr.train()
    log = [h for h in tr.state.log_history if "loss" in h or "train_loss" in h]
    assert log and all(torch.isfinite(torch.tensor(h.get("loss", h.get("train_loss")))) for h in log)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
    changed = {k for k, v in student.state_dict().items() if k in before and v.dtype.is_floating_point
               and v.shape == before[k].shape and not torch.equal(v, before[k])}
    assert {k for k in changed if "lora_B" in k} and all("lora_" in k or ".modules_to_save." in k for k in changed)
    batch = _batch(student, data)
    trained = _outputs(student, batch)
    student.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_quantised(ckpt), tmp_path / "adapter")
    assert exact_4bit_layers(reloaded, "reloaded")  # the trained student's fp32 path (off the bf16 CPU kernel)
    torch.testing.assert_close(_outputs(reloaded, batch), trained, rtol=1e-5, atol=1e-5)
    untrained = PeftModel.from_pretrained(_quantised(ckpt), tmp_path / "adapter")
    exact_4bit_layers(untrained, "untrained")
    untrained.load_state_dict({k: v for k, v in before.items() if "lora_" in k}, strict=False)
    assert (_outputs(untrained, batch) - trained).abs().max() > 1e-3  # it trained


def test_a_quantised_lm_head_is_refused_by_the_fused_loss(tmp_path, data) -> None:  # noqa: F811
    student = _lora(_quantised(_checkpoint(tmp_path), skip=["model.visual"]))
    assert isinstance(unwrap_peft(student).lm_head, bnb.nn.Linear4bit)
    teacher = fx.make_model(NAME, seed=2)
    with pytest.raises(ValueError, match=r"LM head is quantised \(Linear4bit, weight Params4bit of dtype torch.uint8\)"
                                         r".*loss_impl='logits'"):
        _step(tmp_path / "fused", data, NAME, student, teacher, DistillationConfig(method="kd", loss_impl="fused"))
    loss, parts, grads = _step(tmp_path / "logits", data, NAME, student, teacher,
                               DistillationConfig(method="kd", loss_impl="logits"))
    assert torch.isfinite(torch.tensor(loss)) and parts["kd"] > 0 and any("lora_A" in k for k in grads)


def test_a_quantised_student_without_adapters_is_refused(tmp_path, data) -> None:  # noqa: F811
    q4 = _quantised(_checkpoint(tmp_path))
    with pytest.raises(ValueError, match="(?i)quantized model"):
        _trainer(tmp_path, data, NAME, q4, fx.make_model(NAME, seed=2), DistillationConfig(method="kd"))


def test_merging_into_a_quantised_base_is_refused(tmp_path) -> None:
    from tokinteract.mllm.lora import merge_and_save

    student = _lora(_quantised(_checkpoint(tmp_path)))
    with pytest.raises(ValueError, match=r"^model: cannot merge LoRA adapters into the quantised "
                                         r"Qwen2_5_VLForConditionalGeneration: the merged weights would be re-quantised"):
        merge_and_save(student, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_cli_trains_a_lora_on_a_prequantised_gemma3_checkpoint(tmp_path, data) -> None:  # noqa: F811
    """A checkpoint saved 4-bit (its config holds the quantization_config) loads quantised through the CLI's
    AutoModelForImageTextToText; with lora_r the run trains adapters and saves them; lora_merge_on_save is
    refused before training, and so is a run without adapters."""
    import yaml

    from mllm_helpers import save_pair
    from tokinteract.mllm.cli import main

    ckpts = save_pair(tmp_path, lambda seed: fx.make_model("gemma3", seed=seed), lambda: fx.make_processor("gemma3"))
    q4 = _quantised(ckpts["student"], skip=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q4.modules())
    student4 = tmp_path / "student4"
    q4.save_pretrained(student4)
    fx.make_processor("gemma3").save_pretrained(student4)
    out = tmp_path / "out"
    cfg = dict(
        student_checkpoint=str(student4), teacher_checkpoint=str(ckpts["teacher"]), method="align_ti",
        iva_layer=1, data_path=str(data), image_folder=str(data.parent), output_dir=str(out),
        per_device_train_batch_size=3, max_steps=1, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, learning_rate=1e-2, disable_tqdm=True, seed=0, preflight_cache_dir="", lora_r=4, lora_alpha=8.0,
    )

    def run(**kw) -> int:
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**cfg, **kw}))
        return main([str(tmp_path / "cfg.yaml")])

    with pytest.raises(ValueError, match=rf"^student_checkpoint '{student4}' \(lora_merge_on_save\): cannot merge"):
        run(lora_merge_on_save=True)
    with pytest.raises(ValueError, match=rf"^student_checkpoint '{student4}' is quantised .* set lora_r >= 1"):
        run(lora_r=0)
    assert not out.exists() or not any(out.iterdir())
    assert run() == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    log = [h for h in yaml.safe_load((out / "trainer_state.json").read_text())["log_history"] if "loss_tpa" in h]
    assert len(log) == 1 and all(log[0][k] > 0 for k in ("loss_sft", "loss_kd", "loss_iva", "loss_tpa"))
    base = AutoModelForImageTextToText.from_pretrained(student4)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    adapted = PeftModel.from_pretrained(base, out)
    assert any(float(p.abs().max()) > 0 for n, p in adapted.named_parameters() if "lora_B" in n)  # B left 0: it trained


def test_a_4bit_teacher_is_not_cast_by_bf16_training(tmp_path, data) -> None:  # noqa: F811
    """transformers refuses ``.to(dtype)`` on a bitsandbytes model: with ``bf16`` the trainer casts the
    teacher only when it is not quantised; a 4-bit teacher keeps the dtypes it was loaded with."""
    from transformers import TrainingArguments

    from tokinteract.mllm import DistillationTrainer

    t4 = _quantised(_checkpoint(tmp_path, seed=2))
    with pytest.raises(ValueError, match="cannot cast a bitsandbytes model"):
        t4.to(dtype=torch.bfloat16)
    proc = fx.make_processor(NAME)
    student = _lora(fx.make_model(NAME, seed=1))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_steps=1,
                             report_to="none", use_cpu=True, bf16=True, save_strategy="no", disable_tqdm=True)
    tr = DistillationTrainer(
        student, args, teacher=t4, distill=DistillationConfig(method="kd"),
        train_dataset=ProcessorDataset(data, data.parent, proc),
        data_collator=ProcessorCollator(proc, visual_token_ids(unwrap_peft(student))), processing_class=proc,
    )
    assert tr.teacher is t4 and t4.lm_head.weight.dtype == torch.float32
