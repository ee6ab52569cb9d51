"""IRS across layers on a tiny LLaVA, and the plotting helpers."""

from __future__ import annotations

import sys

import pytest
import torch

from tokinteract import visual_importance
from tokinteract.hf import (
    IRSCurve,
    instruction_vision_alphas,
    irs_curve,
    plot_attention_grid,
    plot_irs_curve,
    visual_attention_grid,
)


def _item(tiny, seed, px, lengths=(11, 9), T=12, padding="right"):
    ids, am, _ = tiny.image_batch(lengths, T, padding=padding, seed=seed)
    vm = ids == tiny.IMAGE_TOKEN
    after_image = (vm.long().cumsum(1) == tiny.PATCHES) & ~vm
    return {"input_ids": ids, "attention_mask": am, "pixel_values": px, "instruction_mask": after_image & am}


def _sharpen(model, factor=25.0):
    """Random init gives near-uniform attention (IRS ~ 1e-6); scale q/k so maps differ."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


def _ref_alpha(model, item, layer):
    impl = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=item["input_ids"], attention_mask=item["attention_mask"],
                        pixel_values=item["pixel_values"], output_attentions=True)
    finally:
        model.set_attn_implementation(impl)
    vm = item["input_ids"] == 7
    w = visual_importance(out.attentions[layer], item["instruction_mask"], vm)
    return w[vm].reshape(vm.shape[0], -1).double()


def test_irs_of_identical_pairs_is_zero(tiny):
    model = _sharpen(tiny.llava("sdpa", layers=3))
    px = torch.randn(2, 3, 16, 16)
    x = _item(tiny, 0, px)
    curve = irs_curve(model, [(x, x)])
    assert isinstance(curve, IRSCurve) and curve.scores.shape == (3,) and curve.num_pairs == 2
    assert float(curve.scores.abs().max()) < 1e-6


def test_irs_matches_eager_reference_and_batches_combine_exactly(tiny):
    model = _sharpen(tiny.llava("sdpa", layers=3))
    px = torch.randn(2, 3, 16, 16)
    x1, x2 = _item(tiny, 0, px, padding="left"), _item(tiny, 10, px, padding="right")
    curve = irs_curve(model, [(x1, x2)])
    want = []
    for layer in range(3):
        a, b = _ref_alpha(model, x1, layer), _ref_alpha(model, x2, layer)
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        want.append(1 - cos.mean())
    want = torch.stack(want).float()
    torch.testing.assert_close(curve.scores, want, atol=1e-5, rtol=0)
    assert float(curve.scores.max()) > 1e-2, "different instructions must give a non-zero IRS"
    assert curve.best_layer == int(want.argmax())
    # two batches of one pair each give the same mean over the 2 pairs
    split = [({k: v[i : i + 1] for k, v in x1.items()}, {k: v[i : i + 1] for k, v in x2.items()}) for i in range(2)]
    curve2 = irs_curve(model, iter(split))
    assert curve2.num_pairs == 2
    torch.testing.assert_close(curve2.scores, curve.scores, atol=1e-6, rtol=0)
    # a subset of layers
    sub = irs_curve(model, [(x1, x2)], layers=[2, 0])
    torch.testing.assert_close(sub.scores, curve.scores[[2, 0]], atol=1e-7, rtol=0)
    assert sub.best_layer in (0, 2)


def test_alphas_need_equal_visual_counts(tiny):
    model = tiny.llava("sdpa")
    x = _item(tiny, 0, torch.randn(2, 3, 16, 16))
    x["visual_mask"] = x["input_ids"] == tiny.IMAGE_TOKEN
    x["visual_mask"][0, -1] = True
    with pytest.raises(ValueError, match="same, non-zero number of visual tokens"):
        instruction_vision_alphas(model, x)
    with pytest.raises(ValueError, match="at least one pair"):
        irs_curve(model, [])


def test_visual_attention_grid_and_plots(tiny, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    w = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6)
    vm = torch.zeros(2, 6, dtype=torch.bool)
    vm[:, 1:5] = True
    g = visual_attention_grid(w, vm)
    assert torch.equal(g, torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[7.0, 8.0], [9.0, 10.0]]]))
    with pytest.raises(ValueError, match="grid"):
        visual_attention_grid(w, vm, grid=(3, 1))
    ax = plot_irs_curve(IRSCurve(scores=torch.tensor([0.1, 0.3, 0.2]), best_layer=1, num_pairs=4), label="teacher")
    assert [round(v, 3) for v in ax.lines[0].get_ydata()] == [0.1, 0.3, 0.2]
    ax2 = plot_attention_grid(g[0], image=torch.rand(16, 16, 3).numpy(), title="layer 1")
    assert len(ax2.images) == 2
    ax2.figure.savefig(tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 0


def test_missing_matplotlib_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"tokinteract\[plot\]"):
        plot_irs_curve(torch.tensor([0.1, 0.2]))
