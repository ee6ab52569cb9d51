"""tokinteract.hf.families.image_grids: the visual-token grid of each image, or a clear refusal."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from tokinteract.hf.families import image_grids


class _Configured(nn.Module):
    """Only a config: image_grids reads nothing else (no weights to build)."""

    def __init__(self, config: transformers.PretrainedConfig) -> None:
        super().__init__()
        self.config = config


def _llava(vision: transformers.PretrainedConfig, strategy: str) -> _Configured:
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=transformers.Qwen2Config(),
                                   vision_feature_select_strategy=strategy)
    return _Configured(cfg)


def _vis(*counts: int) -> torch.Tensor:
    out = torch.zeros(len(counts), max(counts) + 2, dtype=torch.bool)
    for b, n in enumerate(counts):
        out[b, 1 : 1 + n] = True
    return out


def test_llava_square_grids_and_refusals() -> None:
    siglip = transformers.SiglipVisionConfig(image_size=32, patch_size=8)
    assert image_grids(_llava(siglip, "full"), {}, _vis(16, 32, 0)) == [[(4, 4)], [(4, 4), (4, 4)], []]
    clip = transformers.CLIPVisionConfig(image_size=32, patch_size=8)
    assert image_grids(_llava(clip, "default"), {}, _vis(16)) == [[(4, 4)]]  # CLS dropped
    with pytest.raises(ValueError, match=r"'clip_vision_model' .*'full' does not yield a square patch grid"):
        image_grids(_llava(clip, "full"), {}, _vis(17))
    with pytest.raises(ValueError, match=r"'siglip_vision_model' .*'default' does not yield a square patch grid"):
        image_grids(_llava(siglip, "default"), {}, _vis(15))
    with pytest.raises(ValueError, match=r"sample 1 has 20 visual tokens, not a multiple of the 4x4 grid"):
        image_grids(_llava(siglip, "full"), {}, _vis(16, 20))


def test_qwen_vl_grids_after_the_merge_and_refusals() -> None:
    model = _Configured(transformers.Qwen2_5_VLConfig(vision_config={"spatial_merge_size": 2}))
    thw = torch.tensor([[1, 4, 6], [1, 6, 4], [1, 4, 4]])
    assert image_grids(model, {"image_grid_thw": thw}, _vis(6, 10, 0)) == [[(2, 3)], [(3, 2), (2, 2)], []]
    with pytest.raises(ValueError, match=r"sample 1's visual tokens do not match image_grid_thw"):
        image_grids(model, {"image_grid_thw": thw}, _vis(6, 9))
    with pytest.raises(ValueError, match=r"image 0 has grid \(t, h, w\) = \(2, 4, 6\); only single images"):
        image_grids(model, {"image_grid_thw": torch.tensor([[2, 4, 6]])}, _vis(12))
    with pytest.raises(ValueError, match="videos are not resampled"):
        image_grids(model, {"video_grid_thw": torch.tensor([[2, 4, 6]])}, _vis(12))
    with pytest.raises(ValueError, match=r"image_grid_thw holds 3 images but the batch's visual tokens cover 1"):
        image_grids(model, {"image_grid_thw": thw}, _vis(6))


def test_other_families_are_refused() -> None:
    model = _Configured(transformers.Gemma3Config())
    with pytest.raises(ValueError, match=r"Gemma 3 \(model_type 'gemma3'\) does not show each image as one grid"):
        image_grids(model, {}, _vis(4))
