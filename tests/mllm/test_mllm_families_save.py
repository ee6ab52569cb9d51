"""The saved student of each family reloads with transformers alone (issue 13, item 6).

One distillation step through the trainer, ``save_model``, then ``AutoModelForImageTextToText`` and
``generate``: no tokinteract code on the reload side. The processor saved beside the weights loads with
``AutoProcessor`` for the families whose processor has no video slot; the others (Qwen-VL,
LLaVA-OneVision, SmolVLM, InternVL) need torchvision for it, which this project cannot install (see
``tests/hf/families.py``): ``load_pretrained`` loads their processor without its video processor
(``tokinteract.mllm.image_only``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from mllm_helpers import state
from test_mllm_families_trainer import _trainer, data  # noqa: F401  (the module's data fixture)
from test_mllm_image_only import VIDEO_CLASS
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import families as fx  # noqa: E402

from tokinteract.mllm import DistillationConfig  # noqa: E402
from tokinteract.mllm.image_only import NoVideoProcessor  # noqa: E402
from tokinteract.mllm.model import load_pretrained  # noqa: E402

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _prompt(name: str, proc, image) -> dict[str, torch.Tensor]:
    """One user turn (an image, then a question) and the assistant's turn opened, left-padded."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this picture"}]}]
    text = proc.tokenizer.apply_chat_template(msgs, chat_template=proc.chat_template, tokenize=False)
    return fx.run_processor(name, proc, [text + fx.CHAT_START + "assistant "], [[image]], "left")


@pytest.mark.parametrize("name", fx.FAMILIES)
def test_saved_student_reloads_and_generates_with_transformers_alone(tmp_path, data, name) -> None:  # noqa: F811
    from PIL import Image

    f = fx.family(name)
    student, teacher = fx.make_model(name, seed=1), fx.make_model(name, seed=2)
    tr = _trainer(tmp_path / "run", data, name, student, teacher, DistillationConfig(method="kd"))
    if f.has_video_slot:  # the offline processor's empty video slot: the stand-in an image-only processor has
        tr.processing_class.video_processor = NoVideoProcessor(str(tmp_path), f.processor_cls,
                                                               {"video_processor_type": VIDEO_CLASS[name]})
    before = state(student)
    tr.train()
    out = tmp_path / "saved"
    tr.save_model(str(out))
    trained = state(student)
    assert any(not torch.equal(trained[k], before[k]) for k in trained)  # it trained

    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(model).__name__ == f.model_cls
    got = model.state_dict()
    assert got.keys() == trained.keys()
    for k, v in trained.items():
        assert torch.equal(got[k], v), k
    if f.has_video_slot and not HAS_TORCHVISION:
        with pytest.raises((ImportError, ValueError), match="(?i)torchvision"):
            AutoProcessor.from_pretrained(out)
        _, proc = load_pretrained(out)  # its image-only build (tests/mllm/test_mllm_image_only.py)
    else:
        proc = AutoProcessor.from_pretrained(out)
    assert type(proc).__name__ == f.processor_cls
    assert proc.tokenizer.get_vocab() == fx.make_tokenizer(name).get_vocab()
    assert proc.chat_template == fx.make_processor(name).chat_template
    inputs = _prompt(name, proc, Image.open(data.parent / "a.png").convert("RGB"))
    assert bool(torch.isin(inputs["input_ids"], torch.tensor(fx.image_token_ids(name))).any())
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(gen, student.eval().generate(**inputs, max_new_tokens=4, do_sample=False))
