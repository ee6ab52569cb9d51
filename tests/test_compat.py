"""Every private touch in tokinteract.compat, against the pinned versions: a change fails here loudly."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tokinteract import compat  # noqa: E402


def _tiny_qwen2(**kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, **kw,
    )
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def test_installed_versions_are_in_the_tested_ranges():
    for lib in compat.TESTED:
        compat._check_range(lib)  # raises CompatError otherwise


def test_an_untested_version_is_refused_with_the_library_and_version(monkeypatch):
    compat._check_range.cache_clear()
    monkeypatch.setattr(compat, "_version", lambda lib: (6, 1))
    with pytest.raises(compat.CompatError, match=r"transformers 6\.1 is installed"):
        compat.get_attn_implementation(object())
    monkeypatch.undo()
    compat._check_range.cache_clear()


def test_set_attn_implementation_switches_what_the_model_runs():
    model = _tiny_qwen2()
    cfg = model.config
    assert compat.get_attn_implementation(cfg) == "sdpa"
    compat.set_attn_implementation(cfg, "eager")
    assert cfg._attn_implementation == "eager"
    compat.set_attn_implementation(cfg, "sdpa")
    assert cfg._attn_implementation == "sdpa"
    with pytest.raises(compat.CompatError, match="attention implementation"):
        compat.get_attn_implementation(object())


def test_register_lookup_unregister_round_trip():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    calls = []

    def fn(module, q, k, v, mask, **kw):
        calls.append(module.layer_idx)
        return compat.attention_function("sdpa")(module, q, k, v, mask, **kw)

    AttentionInterface.register("tokinteract_compat_test", fn)
    AttentionMaskInterface.register("tokinteract_compat_test", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        assert compat.is_attention_registered("tokinteract_compat_test")
        assert compat.attention_function("tokinteract_compat_test") is fn
        model = _tiny_qwen2()
        compat.set_attn_implementation(model.config, "tokinteract_compat_test")
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
        assert calls == [0], "the registered function must run in the forward"
    finally:
        compat.unregister_attention("tokinteract_compat_test")
    assert not compat.is_attention_registered("tokinteract_compat_test")
    assert "tokinteract_compat_test" not in AttentionMaskInterface._global_mapping


def test_checkpointing_drops_cache_reads_the_layer_flag():
    model = _tiny_qwen2()
    layer = model.model.layers[0]
    assert not compat.checkpointing_drops_cache(layer)
    model.gradient_checkpointing_enable()
    assert compat.checkpointing_drops_cache(layer) == (not layer._can_checkpoint_with_cache)
    assert compat.checkpointing_drops_cache(layer), "Qwen2 layers drop the cache when checkpointed (5.x)"
    assert not compat.checkpointing_drops_cache(torch.nn.Linear(2, 2))


def test_eager_attention_function_is_the_modeling_files_own():
    from transformers.models.qwen2 import modeling_qwen2

    model = _tiny_qwen2()
    attn = model.model.layers[0].self_attn
    assert compat.eager_attention_function(attn) is modeling_qwen2.eager_attention_forward
    assert compat.eager_attention_function(torch.nn.Linear(2, 2)) is None


def test_liger_function_has_the_hook_we_override():
    pytest.importorskip("liger_kernel")
    import inspect

    fn = compat.liger_fused_linear_jsd_function()
    assert callable(fn.distillation_loss_fn)
    params = list(inspect.signature(fn.forward).parameters)
    assert params[:4] == ["ctx", "student_input", "student_weight", "teacher_input"], params


def test_trainer_overrides_match_the_installed_trainer(monkeypatch):
    from transformers import Trainer

    compat.check_trainer_overrides()
    monkeypatch.delattr(Trainer, "_save_checkpoint")
    with pytest.raises(compat.CompatError, match="_save_checkpoint"):
        compat.check_trainer_overrides()
    monkeypatch.undo()
    monkeypatch.setattr(Trainer, "_get_output_dir", lambda self, trial, extra: None)
    with pytest.raises(compat.CompatError, match=r"Trainer._get_output_dir\('self', 'trial', 'extra'\) changed"):
        compat.check_trainer_overrides()


def test_bnb_4bit_cpu_switch_and_repack_flag_are_where_compat_reads_them():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 8, bias=False, compute_dtype=torch.float32)
    assert hasattr(layer, "support_avx512bf16_for_cpu")  # set by Linear4bit.__init__ in the tested range
    compat.bnb_4bit_cpu_exact(layer)
    assert layer.support_avx512bf16_for_cpu is False
    assert compat.bnb_4bit_cpu_repacked(layer) is False
    layer.weight.quant_state = type("QS", (), {"packing_format_for_cpu": True})()
    assert compat.bnb_4bit_cpu_repacked(layer) is True


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*specials, "cat"])}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", extra_special_tokens={
        "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})


def test_build_processor_with_video_slot_skips_only_that_slots_check():
    from transformers import LlavaProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    stand_in, ip, tok = object(), Qwen2VLImageProcessorPil(), _word_tokenizer()
    proc = compat.build_processor_with_video_slot(Qwen2VLProcessor, stand_in, image_processor=ip, tokenizer=tok,
                                                  chat_template="{{ messages }}")
    assert type(proc) is Qwen2VLProcessor
    assert proc.video_processor is stand_in and proc.image_processor is ip and proc.tokenizer is tok
    assert proc.chat_template == "{{ messages }}" and proc.image_token == "<|image_pad|>"
    assert "check_argument_for_proper_class" not in vars(proc)  # the class's own check is back
    with pytest.raises(TypeError, match=r"Received a \w+ for argument image_processor, but a ImageProcessingMixin was expected"):
        compat.build_processor_with_video_slot(Qwen2VLProcessor, stand_in, image_processor=tok, tokenizer=tok)
    with pytest.raises(compat.CompatError, match="LlavaProcessor has no video_processor slot"):
        compat.build_processor_with_video_slot(LlavaProcessor, stand_in, image_processor=ip, tokenizer=tok)
