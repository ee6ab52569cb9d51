"""sample_candidates: determinism, greedy, nucleus support, multinomial frequencies, mask."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import tokinteract as ti
from reference import ref_softmax


def _logits(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _ref_nucleus_set(logits_row, top_p, temperature=1.0):
    """Smallest set of most likely tokens whose probability mass reaches top_p (float64 loop)."""
    p = ref_softmax(logits_row, temperature).tolist()
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += p[i]
        if mass >= top_p:
            break
    return kept


def _chi2(counts, probs, n):
    return sum((c - n * q) ** 2 / (n * q) for c, q in zip(counts, probs) if q > 0)


@pytest.mark.parametrize("strategy", ["nucleus", "multinomial"])
def test_deterministic_with_generator(strategy):
    s = _logits((2, 6, 30), 0)
    a = ti.sample_candidates(s, 4, strategy=strategy, generator=torch.Generator().manual_seed(7))
    b = ti.sample_candidates(s, 4, strategy=strategy, generator=torch.Generator().manual_seed(7))
    c = ti.sample_candidates(s, 4, strategy=strategy, generator=torch.Generator().manual_seed(8))
    assert a.dtype == torch.long and a.shape == (2, 6, 4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_greedy_is_top_d_distinct():
    s = _logits((3, 5, 20), 1)
    out = ti.sample_candidates(s, 4, strategy="greedy")
    for b in range(3):
        for t in range(5):
            got = out[b, t].tolist()
            assert len(set(got)) == 4
            expected = sorted(range(20), key=lambda v: -float(s[b, t, v]))[:4]
            assert set(got) == set(expected)
    with pytest.raises(ValueError, match="num_candidates"):
        ti.sample_candidates(s, 21, strategy="greedy")


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.9])
def test_nucleus_draws_only_inside_top_p_set(top_p):
    s = _logits((2, 4, 25), 2, scale=1.5)
    out = ti.sample_candidates(s, 300, strategy="nucleus", top_p=top_p, generator=torch.Generator().manual_seed(3))
    for b in range(2):
        for t in range(4):
            kept = _ref_nucleus_set(s[b, t], top_p)
            drawn = set(out[b, t].tolist())
            assert drawn <= kept, (top_p, drawn - kept)
            # with 300 draws every kept token (mass >= ~1%) shows up: the set is really used
            p = ref_softmax(s[b, t])
            assert {i for i in kept if float(p[i]) > 0.02} <= drawn


def test_nucleus_top_p_one_is_full_distribution_and_argmax_always_kept():
    s = _logits((1, 1, 6), 4, scale=0.1)  # nearly uniform
    out = ti.sample_candidates(s, 600, strategy="nucleus", top_p=1.0, generator=torch.Generator().manual_seed(5))
    assert set(out[0, 0].tolist()) == set(range(6))
    peaked = torch.tensor([[[10.0, 0.0, 0.0, 0.0]]])
    out = ti.sample_candidates(peaked, 50, strategy="nucleus", top_p=1e-6, generator=torch.Generator().manual_seed(5))
    assert set(out[0, 0].tolist()) == {0}


def test_multinomial_frequencies_follow_distribution():
    s = torch.tensor([[[1.0, 0.0, -1.0, 2.0, 0.5]]])
    n = 20000
    out = ti.sample_candidates(s, n, strategy="multinomial", generator=torch.Generator().manual_seed(11))
    counts = torch.bincount(out.flatten(), minlength=5).tolist()
    probs = ref_softmax(s[0, 0]).tolist()
    # 4 degrees of freedom: P(chi2 > 25) ~ 5e-5; fixed seed, so deterministic
    assert _chi2(counts, probs, n) < 25.0
    # and a wrong distribution is rejected by the same bound
    assert _chi2(counts, [0.2] * 5, n) > 25.0


def test_nucleus_frequencies_follow_renormalised_truncation():
    s = torch.tensor([[[2.0, 1.5, 1.0, -1.0, -2.0, -3.0]]])
    top_p = 0.8
    kept = _ref_nucleus_set(s[0, 0], top_p)
    p = ref_softmax(s[0, 0]).tolist()
    z = sum(p[i] for i in kept)
    q = [p[i] / z if i in kept else 0.0 for i in range(6)]
    n = 20000
    out = ti.sample_candidates(s, n, strategy="nucleus", top_p=top_p, generator=torch.Generator().manual_seed(12))
    counts = torch.bincount(out.flatten(), minlength=6).tolist()
    assert all(counts[i] == 0 for i in range(6) if i not in kept)
    assert _chi2(counts, q, n) < 4 * len(kept) + 10


def test_temperature_sharpens():
    s = _logits((2, 3, 10), 13)
    out = ti.sample_candidates(s, 20, strategy="multinomial", temperature=1e-3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, s.argmax(-1, keepdim=True).expand(2, 3, 20))


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), strategy=st.sampled_from(["nucleus", "multinomial", "greedy"]))
def test_mask_fills_zero_elsewhere(seed, strategy):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 6, 9, generator=g) + 1.0
    s[..., 0] = -30.0  # token 0 is (practically) never drawn, so a 0 means "not sampled"
    mask = torch.rand(3, 6, generator=g) < 0.5
    out = ti.sample_candidates(s, 3, strategy=strategy, mask=mask, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert bool((out[mask] != 0).all())
    # sampling at masked positions is the same as sampling those rows alone (no wasted draws)
    if strategy == "greedy":
        full = ti.sample_candidates(s, 3, strategy="greedy")
        assert torch.equal(out[mask], full[mask])


def test_empty_mask_and_no_grad():
    s = _logits((2, 3, 9), 14).requires_grad_()
    out = ti.sample_candidates(s, 2, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(2, 3, 2, dtype=torch.long))
    out = ti.sample_candidates(s, 2, generator=torch.Generator().manual_seed(0))
    assert not out.requires_grad and out.grad_fn is None
    # nothing in the graph: a loss built from the logits is unaffected
    s.sum().backward()
    assert torch.equal(s.grad, torch.ones_like(s))


def test_bf16_logits():
    s = _logits((2, 3, 9), 15).bfloat16()
    out = ti.sample_candidates(s, 2, strategy="greedy")
    assert torch.equal(out[..., 0], s.float().argmax(-1))
    assert math.isfinite(float(out.sum()))


def test_nucleus_large_vocab_uses_both_the_top_k_and_the_full_sort_paths():
    """Rows whose nucleus fits in the top-k shortcut and flat rows that need the full sort."""
    from tokinteract import sampling

    V = 4 * sampling._NUCLEUS_TOPK
    peaked = _logits((1, 3, V), 21, scale=6.0)  # nucleus of a few tokens: top-k path
    flat = _logits((1, 3, V), 22, scale=0.05)  # nucleus of most of the vocabulary: full sort
    s = torch.cat([peaked, flat], dim=1)
    top_p = 0.9
    sets = [_ref_nucleus_set(s[0, t], top_p) for t in range(6)]
    assert max(len(k) for k in sets[:3]) < sampling._NUCLEUS_TOPK < min(len(k) for k in sets[3:])
    out = ti.sample_candidates(s, 4000, strategy="nucleus", top_p=top_p, generator=torch.Generator().manual_seed(4))
    for t in range(6):
        drawn = set(out[0, t].tolist())
        assert drawn <= sets[t], (t, len(drawn - sets[t]))
    # the peaked rows' frequencies follow the renormalised truncation
    for t in range(3):
        p = ref_softmax(s[0, t]).tolist()
        z = sum(p[i] for i in sets[t])
        q = [p[i] / z if i in sets[t] else 0.0 for i in range(V)]
        counts = torch.bincount(out[0, t], minlength=V).tolist()
        assert _chi2(counts, q, 4000) < 4 * len(sets[t]) + 10
    # the flat rows reach far beyond the top-k shortcut
    assert all(len(set(out[0, t].tolist())) > sampling._NUCLEUS_TOPK for t in range(3, 6))


@pytest.mark.parametrize("strategy", ["nucleus", "multinomial", "greedy"])
def test_masked_minus_inf_logits_are_accepted_and_never_drawn(strategy):
    logits = torch.randn(2, 4, 9)
    logits[..., :5] = float("-inf")  # e.g. image placeholder tokens masked out
    cand = ti.sample_candidates(logits, 3, strategy=strategy, generator=torch.Generator().manual_seed(0))
    assert bool((cand >= 5).all())
    for bad, match in ((float("nan"), "NaN or \\+inf"), (float("inf"), "NaN or \\+inf")):
        x = logits.clone()
        x[0, 1, 7] = bad
        with pytest.raises(ValueError, match=match):
            ti.sample_candidates(x, 3, strategy=strategy)
    x = logits.clone()
    x[1, 2, :] = float("-inf")  # nothing left to draw from
    with pytest.raises(ValueError, match="1 sampled row"):
        ti.sample_candidates(x, 3, strategy=strategy)
    # a fully masked row outside ``mask`` is never sampled, so it is fine
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2] = False
    ti.sample_candidates(x, 3, strategy=strategy, mask=mask)
    # greedy returns d distinct tokens: a row needs d finite logits
    if strategy == "greedy":
        y = logits.clone()
        y[0, 0, 5:8] = float("-inf")  # one finite logit left
        with pytest.raises(ValueError, match="fewer than 3 finite"):
            ti.sample_candidates(y, 3, strategy=strategy)


# ----------------------------------------------------------------------------- nucleus = its sort-based definition


def _rows(kind: str, R: int, V: int, g: torch.Generator) -> torch.Tensor:
    """Probability rows [R, V] of one shape of distribution."""
    if kind == "flat":
        logits = torch.randn(R, V, generator=g) * 0.01
    elif kind == "peaked":
        logits = torch.randn(R, V, generator=g) * 6.0
    elif kind == "medium":  # a top-p set of a few dozen to a few hundred tokens
        logits = torch.randn(R, V, generator=g) * 2.5
    elif kind == "tied":  # many exactly equal probabilities, also across a top-k boundary
        logits = torch.randint(0, 4, (R, V), generator=g).float()
    elif kind == "masked":  # -inf logits: exact zeros
        logits = torch.randn(R, V, generator=g)
        logits[torch.rand(R, V, generator=g) < 0.7] = float("-inf")
        logits[:, 0] = 0.0
    else:  # "dyadic": probabilities 1/2, 1/4, ... whose cumulative sums hit top_p exactly
        p = torch.zeros(R, V)
        for r in range(R):
            perm = torch.randperm(V, generator=g)
            p[r, perm[: min(V, 20)]] = torch.tensor([2.0 ** -(i + 1) for i in range(min(V, 20))])
            p[r, perm[0]] += 1.0 - float(p[r].sum())
        return p
    return torch.softmax(logits, dim=-1)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["flat", "peaked", "medium", "tied", "masked", "dyadic"]),
    V=st.sampled_from([3, 17, 64, 300, 2100]),
    d=st.sampled_from([1, 2, 3, 5]),
    top_p=st.sampled_from([0.05, 0.5, 0.75, 0.875, 0.9, 0.95, 0.999]),
    topk=st.sampled_from([1, 4, 16, 256]),
    fraction=st.sampled_from([1, 2, 8, 64]),
)
# found by this test (session 9): every row reaching the full sort over two rounds, permuted, was paired
# with another row's sorted probabilities
@example(seed=0, kind="medium", V=300, d=1, top_p=0.95, topk=1, fraction=64)
def test_nucleus_draws_equal_the_sort_based_reference(seed, kind, V, d, top_p, topk, fraction):
    """Same ids, including the order of equal probabilities (stable), and the same generator state
    afterwards, for every path: top-k prefixes, a grown k, the full sort (thresholds varied)."""
    from unittest import mock

    from reference import ref_nucleus_draw

    from tokinteract import sampling

    g = torch.Generator().manual_seed(seed)
    probs = torch.cat([_rows(kind, 3, V, g), _rows("peaked", 1, V, g)])
    with mock.patch.object(sampling, "_NUCLEUS_TOPK", topk), mock.patch.object(sampling, "_FULL_SORT_FRACTION", fraction):
        g1, g2 = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
        got = sampling._nucleus_draw(probs, top_p, d, g1)
    want = ref_nucleus_draw(probs, top_p, d, g2)
    assert torch.equal(got, want), (kind, V, d, top_p, topk, fraction)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_nucleus_paths_top_k_grown_k_and_full_sort_equal_the_reference():
    """At V = 8192 the three kinds of rows take the three paths (prefix lengths say which), and the
    draws of sample_candidates equal the reference on softmax(logits)."""
    from reference import ref_nucleus_draw

    from tokinteract import sampling

    V, top_p = 8192, 0.9
    g = torch.Generator().manual_seed(31)
    logits = torch.cat([torch.randn(2, V, generator=g) * 6.0, torch.randn(2, V, generator=g) * 3.0,
                        torch.randn(2, V, generator=g) * 0.01])
    probs = torch.softmax(logits, dim=-1)
    _, _, length = sampling._sorted_prefixes(probs, top_p, full_width=False)
    assert bool((length[:2] == sampling._NUCLEUS_TOPK).all())
    assert bool(((length[2:4] > sampling._NUCLEUS_TOPK) & (length[2:4] < V)).all()), length
    assert bool((length[4:] == V).all())
    for d in (1, 4):
        got = ti.sample_candidates(logits[None], d, strategy="nucleus", top_p=top_p,
                                   generator=torch.Generator().manual_seed(5))[0]
        want = ref_nucleus_draw(probs, top_p, d, torch.Generator().manual_seed(5))
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["flat", "tied", "masked", "dyadic"])
def test_full_sort_of_large_rows_is_the_stable_float_sort(kind):
    """At V >= 32,768 (the integer radix sort of the CPU kernel) the key sort gives exactly
    ``sort(descending=True, stable=True)``: values, ids, and equal probabilities by increasing id;
    flat rows then draw as the reference."""
    from reference import ref_nucleus_draw

    from tokinteract import sampling

    V = 40_000
    probs = _rows(kind, 3, V, torch.Generator().manual_seed(11))
    vals, idx = sampling._sort_descending(probs)
    want_vals, want_idx = probs.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(vals, want_vals) and torch.equal(idx, want_idx)
    assert idx.dtype == torch.long
    if kind == "flat":
        got = sampling._nucleus_draw(probs, 0.95, 4, torch.Generator().manual_seed(2))
        assert torch.equal(got, ref_nucleus_draw(probs, 0.95, 4, torch.Generator().manual_seed(2)))
