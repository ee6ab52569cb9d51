"""Exposure-bias metrics (Appendix B.4) on tiny models."""

from __future__ import annotations

import pytest
import torch

from tokinteract.hf import exposure_bias
from tokinteract.hf.exposure import _generate


def _kl_rows(lt, ls):
    pt, lpt, lps = lt.double().softmax(-1), lt.double().log_softmax(-1), ls.double().log_softmax(-1)
    return (pt * (lpt - lps)).sum(-1)


@torch.no_grad()
def test_student_equal_teacher_gives_zero_errors(tiny):
    model = tiny.llava("sdpa")
    ids, am, px = tiny.image_batch((8, 6), 9, padding="right")
    resp = torch.randint(10, tiny.VOCAB, (2, 4))
    batch = {"input_ids": ids, "attention_mask": am, "pixel_values": px, "response_ids": resp}
    out = exposure_bias(model, model, [batch], max_new_tokens=5, do_sample=True, seed=3)
    for curve in (out.r, out.e, out.e_test, out.ex_acc_err):
        assert curve.shape == (5,) and bool((curve == 0).all())
    assert out.e_train.shape == (5,) and bool((out.e_train == 0).all())
    assert out.count_r.tolist() == [2] * 5 and out.count_train.tolist() == [2, 2, 2, 2, 0]


@pytest.mark.parametrize("kind,padding", [("qwen2", "left"), ("qwen2", "right"), ("llava", "left")])
@torch.no_grad()
def test_e_train_equals_direct_kl(tiny, kind, padding):
    if kind == "llava":
        teacher, student = tiny.llava("sdpa", seed=1), tiny.llava("eager", seed=2)
        ids, am, px = tiny.image_batch((8, 6), 9, padding=padding)
        extra = {"pixel_values": px}
    else:
        teacher, student = tiny.qwen2("sdpa", seed=1), tiny.qwen2("eager", seed=2)
        ids, am = tiny.text_batch((6, 4), 7, padding=padding)
        extra = {}
    resp = torch.randint(10, tiny.VOCAB, (2, 5))
    rmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    out = exposure_bias(teacher, student, [{"input_ids": ids, "attention_mask": am, "response_ids": resp,
                                            "response_mask": rmask, **extra}], max_new_tokens=5)
    per_step = torch.zeros(5, dtype=torch.float64)
    count = torch.zeros(5)
    for b in range(2):
        n = int(rmask[b].sum())
        seq = torch.cat([ids[b, am[b]], resp[b, :n]])[None]
        P = int(am[b].sum())
        x = {k: v[b : b + 1] for k, v in extra.items()}
        lt = teacher(input_ids=seq, **x).logits[0, P - 1 : P - 1 + n]
        ls = student(input_ids=seq, **x).logits[0, P - 1 : P - 1 + n]
        per_step[:n] += _kl_rows(lt, ls)
        count[:n] += 1
    want = (per_step / count).cumsum(0).float()
    torch.testing.assert_close(out.e_train, want, atol=1e-5, rtol=0)
    assert float(out.e_train[-1]) > 0
    # R and E are accumulated positive KLs, and %ExAccErr follows Eq. 11
    assert bool((out.r.diff() >= 0).all()) and bool((out.e.diff() >= 0).all()) and float(out.e[0]) > 0
    torch.testing.assert_close(out.ex_acc_err, (out.r - out.e) / out.e * 100)


@pytest.mark.parametrize("padding", ["left", "right"])
@torch.no_grad()
def test_cached_generation_equals_naive_greedy_loop(tiny, padding):
    model = tiny.qwen3("eager")
    ids, am = tiny.text_batch((6, 3), 6, padding=padding)
    from tokinteract.hf.exposure import _left_align

    lids, lam = _left_align(ids, am)
    got = _generate(model, lids, lam, {}, 6, do_sample=False, temperature=1.0, generator=None)
    for b in range(2):
        seq = ids[b, am[b]][None]
        for t in range(6):
            nxt = model(input_ids=seq).logits[0, -1].argmax()
            assert int(got[b, t]) == int(nxt), (b, t)
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)


@torch.no_grad()
def test_r_equals_direct_kl_on_the_student_prefix_and_seed_reproducibility(tiny):
    teacher, student = tiny.qwen2("sdpa", seed=1), tiny.qwen2("sdpa", seed=2)
    ids, am = tiny.text_batch((5, 5), 5)
    kw = dict(max_new_tokens=4, do_sample=True, temperature=1.5, seed=11)
    a = exposure_bias(teacher, student, [{"input_ids": ids, "attention_mask": am}], **kw)
    b = exposure_bias(teacher, student, [{"input_ids": ids, "attention_mask": am}], **kw)
    torch.testing.assert_close(a.r, b.r, atol=0, rtol=0)
    torch.testing.assert_close(a.e, b.e, atol=0, rtol=0)
    assert a.e_train is None and bool(torch.isfinite(a.ex_acc_err).all())
    gen = torch.Generator().manual_seed(11)
    toks = _generate(student, ids, am, {}, 4, do_sample=True, temperature=1.5, generator=gen)
    seq = torch.cat([ids, toks], 1)
    lt, ls = teacher(input_ids=seq).logits[:, 4:8], student(input_ids=seq).logits[:, 4:8]
    torch.testing.assert_close(a.r, _kl_rows(lt, ls).mean(0).cumsum(0).float(), atol=1e-5, rtol=0)


@torch.no_grad()
def test_eos_stops_counting(tiny):
    model = tiny.qwen2("sdpa")
    ids, am = tiny.text_batch((5, 5), 5)
    first = _generate(model, ids, am, {}, 1, do_sample=False, temperature=1.0, generator=None)[:, 0]
    out = exposure_bias(model, tiny.qwen2("sdpa", seed=3), [{"input_ids": ids, "attention_mask": am}],
                        max_new_tokens=3, eos_token_id=int(first[0]))
    # teacher prefixes (E) start with `first`: row 0 produced EOS at step 1
    assert out.count_e[0] == 2 and out.count_e[1] == 2 - int((first == first[0]).sum())
    assert out.count_e.tolist()[1:] == [1, 1]


def test_exposure_checks_arguments(tiny):
    model = tiny.qwen2("sdpa")
    with pytest.raises(ValueError, match="max_new_tokens"):
        exposure_bias(model, model, [], max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one batch"):
        exposure_bias(model, model, [], max_new_tokens=2)
