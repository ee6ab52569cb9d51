from __future__ import annotations

import pytest
import torch
from mllm_helpers import N_VIS, make_model
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tokinteract.mllm import (
    build_llava_from_pretrained,
    check_teacher_student,
    num_image_tokens,
    save_pretrained_student,
    set_trainable,
)
from tokinteract.mllm.model import count_trainable


def _batch(tok, n_img=1):
    img = tok.convert_tokens_to_ids("<image>")
    words = tok("what color is the circle ?", add_special_tokens=False).input_ids
    ids = torch.tensor([[2] + [img] * (N_VIS * n_img) + words + [3]])
    return ids, torch.rand(n_img, 3, 32, 32) * 2 - 1


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tiny_llava_forward_and_visual_token_count(tok, family) -> None:
    m = make_model(tok, family=family)
    assert num_image_tokens(m) == N_VIS == 16
    assert m.config.vision_feature_select_strategy == "full"
    assert type(m.model.language_model).__name__ == ("Qwen2Model" if family == "qwen2" else "Qwen3Model")
    ids, px = _batch(tok)
    out = m(input_ids=ids, pixel_values=px)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    with pytest.raises(ValueError):  # the model refuses a wrong image-token count
        m(input_ids=torch.cat([ids[:, :1], ids[:, 2:]], 1), pixel_values=px)


def test_set_trainable_freezes_the_vision_tower(tok) -> None:
    m = make_model(tok)
    set_trainable(m, "pretrain")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("multi_modal_projector" in n for n in trainable)
    set_trainable(m, "finetune")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in n for n in trainable)
    assert any("language_model" in n for n in trainable) and any(n.startswith("lm_head") for n in trainable)
    assert count_trainable(m) == sum(p.numel() for n, p in m.named_parameters() if n in trainable)
    with pytest.raises(ValueError, match="stage"):
        set_trainable(m, "both")


def test_save_load_round_trip_with_processor(tok, processor, tmp_path) -> None:
    m = make_model(tok).eval()
    save_pretrained_student(m, processor, tmp_path)
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    proc = AutoProcessor.from_pretrained(tmp_path)
    ids, px = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=px).logits, m(input_ids=ids, pixel_values=px).logits)
    # the loaded processor expands <image> to exactly the visual tokens the tower yields
    prompt = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]}],
        add_generation_prompt=True,
    )
    enc = proc(images=[Image.new("RGB", (40, 40), (0, 200, 0))], text=prompt, return_tensors="pt")
    assert int((enc["input_ids"] == again.config.image_token_id).sum()) == N_VIS
    assert enc["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        out = again.generate(**enc, max_new_tokens=2, do_sample=False)
    assert out.shape[1] >= enc["input_ids"].shape[1] + 1


def test_build_from_pretrained_parts_copies_weights(tok, tmp_path) -> None:
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )).eval()
    vt = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
    )).eval()
    lm.save_pretrained(tmp_path / "lm")
    vt.save_pretrained(tmp_path / "vt")
    m = build_llava_from_pretrained(str(tmp_path / "lm"), str(tmp_path / "vt"), tokenizer=tok).eval()
    assert m.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert num_image_tokens(m) == 16 and m.config.vision_feature_select_strategy == "full"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, lm(input_ids=ids).logits)
        px = torch.rand(1, 3, 32, 32)
        ref = vt(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        got = m.model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(got, ref)


def test_teacher_student_checks(tok) -> None:
    s = make_model(tok)
    assert check_teacher_student(s, make_model(tok, hidden=48, layers=3)) is None
    bigger = make_model(tok, vocab_size=len(tok) + 10)
    with pytest.raises(ValueError, match="different vocabularies.*vocab_policy"):
        check_teacher_student(s, bigger)
    assert check_teacher_student(s, bigger, vocab_policy="shared_prefix") == len(tok)
    other_img = make_model(tok, image_token_id=5)
    with pytest.raises(ValueError, match="different image-token ids"):
        check_teacher_student(s, other_img)
    assert check_teacher_student(s, other_img, image_token_policy="remap") is None
    with pytest.raises(ValueError, match="teacher yields 4 visual tokens per image but the student yields 16"):
        check_teacher_student(s, make_model(tok, image_size=16))
    with pytest.raises(ValueError, match="vocab_policy"):
        check_teacher_student(s, s, vocab_policy="maybe")
