"""Bad inputs get a ValueError/TypeError that names the argument, what was expected and what was given.

Under pytest the jaxtyping import hook checks shapes first and may raise its own TypeError for
a shape mismatch, so :func:`test_own_messages_without_the_hook` also runs every case in a plain
subprocess (no hook), where our own messages must appear; that subprocess also blocks
``transformers`` to prove the core never imports it.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

import tokinteract as ti

ROOT = pathlib.Path(__file__).resolve().parents[1]
# every top-level module of the package is core (tokinteract.hf and tokinteract.mllm are not)
CORE = sorted(p.stem for p in (ROOT / "src" / "tokinteract").glob("*.py"))
# tokinteract.compat is the one sanctioned boundary: it imports transformers lazily, inside the
# functions the adapter calls; importing it must still not import transformers (checked below).
COMPAT = "compat"


def _l(*shape, v=None):
    x = torch.randn(*shape)
    if v is not None:
        x.view(-1)[: len(v)] = torch.tensor(v)
    return x


def _lab(b, t):
    lab = torch.randint(0, 5, (b, t))
    lab[:, 0] = -100
    return lab


def _nonfinite(n_nan, n_inf, shape=(2, 3, 5)):
    x = torch.randn(*shape)
    flat = x.view(-1)
    flat[:n_nan] = float("nan")
    flat[n_nan : n_nan + n_inf] = float("inf")
    return x


def _expansion():
    return ti.tpa_expand(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, 2, dtype=torch.long),
                         torch.tensor([[True, False, True, False]]))


# (id, call, exception type, regexes that must all appear in the message, shape case?)
# A "shape case" may be pre-empted by the jaxtyping hook's TypeError under pytest.
Case = tuple[str, Callable[[], object], type, list[str], bool]
CASES: list[Case] = [
    # vocabulary sizes differ: both sizes named
    ("vocab_divergence", lambda: ti.token_divergence(_l(2, 3, 5), _l(2, 3, 7)), ValueError,
     ["student_logits", "teacher_logits", r"\b5\b", r"\b7\b", "vocab_size"], False),
    ("vocab_kd", lambda: ti.kd_loss(_l(2, 3, 5), _l(2, 3, 7), _lab(2, 3)), ValueError, [r"\b5\b", r"\b7\b"], False),
    ("vocab_iva", lambda: ti.iva_loss(_l(2, 3, 5), _l(2, 3, 7), torch.ones(2, 3)), ValueError, [r"\b5\b", r"\b7\b"], False),
    ("vocab_tpa", lambda: ti.tpa_loss(_l(1, 8, 5), _l(1, 8, 7), _expansion()), ValueError, [r"\b5\b", r"\b7\b"], False),
    ("vocab_size_too_big", lambda: ti.kd_loss(_l(2, 3, 5), _l(2, 3, 7), _lab(2, 3), vocab_size=6), ValueError,
     ["vocab_size=6", r"\b5\b", r"\b7\b"], False),
    ("vocab_size_zero", lambda: ti.token_divergence(_l(2, 3, 5), _l(2, 3, 5), vocab_size=0), ValueError,
     ["vocab_size", ">= 1", r"\b0\b"], False),
    # mismatched batch / sequence shapes
    ("seq_mismatch", lambda: ti.token_divergence(_l(2, 3, 5), _l(2, 4, 5)), ValueError,
     ["teacher_logits", r"\(2, 3\)", r"\(2, 4, 5\)"], True),
    ("batch_mismatch_kd", lambda: ti.kd_loss(_l(2, 3, 5), _l(3, 3, 5), _lab(2, 3)), ValueError,
     ["teacher_logits", r"\(2, 3\)", r"\(3, 3, 5\)"], True),
    ("labels_mismatch", lambda: ti.kd_loss(_l(2, 3, 5), _l(2, 3, 5), _lab(2, 4)), ValueError,
     ["labels", r"\(2, 3\)", r"\(2, 4\)"], True),
    ("labels_mismatch_sft", lambda: ti.sft_loss(_l(2, 3, 5), _lab(3, 3)), ValueError, ["labels", r"\(3, 3\)"], True),
    ("logits_ndim", lambda: ti.token_divergence(_l(3, 5), _l(3, 5)), ValueError,
     ["student_logits", "3 dimensions", r"\(3, 5\)"], True),
    ("weights_mismatch", lambda: ti.iva_loss(_l(2, 3, 5), _l(2, 3, 5), torch.ones(2, 4)), ValueError,
     ["weights", r"\(2, 4\)"], True),
    ("sample_mask_mismatch", lambda: ti.sample_candidates(_l(2, 3, 5), 2, mask=torch.ones(2, 4, dtype=torch.bool)),
     ValueError, ["mask", r"\(2, 4\)"], True),
    ("expand_mask_mismatch", lambda: ti.tpa_expand(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, 2, dtype=torch.long),
                                                   torch.zeros(2, 4, dtype=torch.bool)), ValueError, ["candidate_mask", r"\(2, 4\)"], True),
    ("expand_attention_mismatch", lambda: ti.ribbon_mask(torch.zeros(2, 3, dtype=torch.bool), 2, torch.ones(2, 4, dtype=torch.bool)),
     ValueError, ["attention_mask", r"\(2, 4\)"], True),
    ("tpa_logits_not_expanded", lambda: ti.tpa_loss(_l(1, 4, 5), _l(1, 4, 5), _expansion()), ValueError,
     ["logits", r"\(1, 8\)", r"\(1, 4, 5\)"], False),
    ("visual_importance_rows", lambda: ti.visual_importance(torch.rand(2, 3, 4), torch.ones(2, 2, dtype=torch.bool),
                                                            torch.ones(2, 4, dtype=torch.bool)), ValueError,
     ["instruction_mask", r"\(2, 3\)", r"\(2, 2\)"], True),
    # d < 1
    ("d_zero_sample", lambda: ti.sample_candidates(_l(2, 3, 5), 0), ValueError, ["num_candidates", ">= 1", r"\b0\b"], False),
    ("d_negative_ribbon", lambda: ti.ribbon_mask(torch.zeros(1, 3, dtype=torch.bool), -1), ValueError,
     ["num_candidates", ">= 1", "-1"], False),
    ("d_zero_expand", lambda: ti.tpa_expand(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, 0, dtype=torch.long),
                                            torch.zeros(1, 3, dtype=torch.bool)), ValueError, ["candidates", "d >= 1", r"\(1, 3, 0\)"], False),
    ("d_float", lambda: ti.sample_candidates(_l(2, 3, 5), 2.0), TypeError, ["num_candidates", "int", "float"], True),
    # top_p outside (0, 1]
    *[(f"top_p_{p}", (lambda p=p: ti.sample_candidates(_l(2, 3, 5), 2, top_p=p)), ValueError,
       ["top_p", re.escape("(0, 1]"), re.escape(repr(p))], False) for p in (0.0, -0.5, 1.5, float("nan"))],
    # temperature <= 0
    *[(f"temperature_{name}_{tau}", fn, ValueError, ["temperature", "> 0", re.escape(repr(tau))], False)
      for tau in (0.0, -1.0, float("inf"))
      for name, fn in (
          ("divergence", lambda tau=tau: ti.token_divergence(_l(2, 3, 5), _l(2, 3, 5), temperature=tau)),
          ("kd", lambda tau=tau: ti.kd_loss(_l(2, 3, 5), _l(2, 3, 5), _lab(2, 3), temperature=tau)),
          ("sample", lambda tau=tau: ti.sample_candidates(_l(2, 3, 5), 2, temperature=tau)),
          ("module", lambda tau=tau: ti.AlignTILoss(temperature=tau)),
      )],
    # other options
    ("kind", lambda: ti.kd_loss(_l(2, 3, 5), _l(2, 3, 5), _lab(2, 3), kind="kl"), ValueError, ["kind", "'kl'", "fkl"], False),
    ("beta", lambda: ti.token_divergence(_l(2, 3, 5), _l(2, 3, 5), kind="jsd", beta=1.5), ValueError,
     ["beta", re.escape("[0, 1]"), "1.5"], False),
    ("alpha", lambda: ti.token_divergence(_l(2, 3, 5), _l(2, 3, 5), kind="skew_fkl", alpha=1.0), ValueError,
     ["alpha", re.escape("[0, 1)"), "1.0"], False),
    ("strategy", lambda: ti.sample_candidates(_l(2, 3, 5), 2, strategy="beam"), ValueError, ["strategy", "'beam'"], False),
    # candidate_mask on a pad position / on the last position
    ("cand_on_pad", lambda: ti.tpa_expand(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, 2, dtype=torch.long),
                                          torch.tensor([[True, True, False, False]]), torch.tensor([[0, 1, 1, 1]])),
     ValueError, ["candidate_mask", r"\b1 pad position", "attention_mask"], False),
    ("cand_on_pad_ribbon", lambda: ti.ribbon_mask(torch.tensor([[False, False, True, False]]), 2,
                                                  torch.tensor([[True, True, False, False]])),
     ValueError, ["candidate_mask", "pad"], False),
    ("cand_on_last", lambda: ti.tpa_expand(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, 2, dtype=torch.long),
                                           torch.tensor([[False, True, False, True]])), ValueError,
     ["candidate_mask", "last position"], False),
    ("attention_mask_values", lambda: ti.ribbon_mask(torch.zeros(1, 3, dtype=torch.bool), 2, torch.tensor([[0, 2, 1]])),
     ValueError, ["attention_mask", "0/1"], False),
    # non-finite logits: the message says how many
    ("nonfinite_student", lambda: ti.token_divergence(_nonfinite(2, 1), _l(2, 3, 5)), ValueError,
     ["student_logits", r"\b3 non-finite", r"\b30\b"], False),
    ("nonfinite_teacher_kd", lambda: ti.kd_loss(_l(2, 3, 5), _nonfinite(0, 2), torch.full((2, 3), 1)), ValueError,
     ["teacher_logits", r"\b2 non-finite"], False),
    ("nonfinite_sft", lambda: ti.sft_loss(_nonfinite(1, 0), torch.full((2, 3), 1)), ValueError,
     ["student_logits", r"\b1 non-finite"], False),
    ("nonfinite_sample", lambda: ti.sample_candidates(_nonfinite(4, 0), 2), ValueError, ["student_logits", r"\b4 non-finite"], False),
    ("nonfinite_attn", lambda: ti.visual_importance(_nonfinite(1, 0, (2, 3, 3)), torch.ones(2, 3, dtype=torch.bool),
                                                    torch.ones(2, 3, dtype=torch.bool)), ValueError, ["attn", r"\b1 non-finite"], False),
    # wrong types
    ("not_a_tensor", lambda: ti.token_divergence([[[0.0]]], _l(1, 1, 1)), TypeError, ["student_logits", "Tensor", "list"], True),
    ("integer_logits", lambda: ti.kd_loss(torch.ones(2, 3, 5, dtype=torch.long), _l(2, 3, 5), _lab(2, 3)), TypeError,
     ["student_logits", "floating-point", "int64"], True),
    ("float_labels", lambda: ti.kd_loss(_l(2, 3, 5), _l(2, 3, 5), torch.ones(2, 3)), TypeError, ["labels", "integer", "float32"], True),
    ("int_candidate_mask", lambda: ti.ribbon_mask(torch.zeros(1, 3, dtype=torch.long), 2), TypeError,
     ["candidate_mask", "bool", "int64"], True),
    ("temperature_str", lambda: ti.token_divergence(_l(2, 3, 5), _l(2, 3, 5), temperature="1"), TypeError,
     ["temperature", "number", "str"], True),
    ("expansion_type", lambda: ti.tpa_loss(_l(1, 8, 5), _l(1, 8, 5), None), TypeError, ["expansion", "TPAExpansion", "NoneType"], True),
    ("align_ti_expansion_type", lambda: ti.AlignTILoss(iva=0)(_l(1, 8, 5), _l(1, 8, 5), _lab(1, 8), expansion="x"),
     TypeError, ["expansion", "TPAExpansion", "str"], True),
    ("num_items_negative", lambda: ti.kd_loss(_l(2, 3, 5), _l(2, 3, 5), _lab(2, 3), num_items=-2), ValueError,
     ["num_items", ">= 0", "-2"], False),
    ("align_weight_negative", lambda: ti.AlignTILoss(tpa=-0.5), ValueError, ["tpa", ">= 0", "-0.5"], False),
]


def check_case(case: Case, *, strict: bool) -> None:
    """Run one case; ``strict`` (no hook) requires our exception type and every pattern."""
    name, fn, exc, patterns, shape_case = case
    try:
        fn()
    except (ValueError, TypeError) as err:
        msg = str(err)
        hooked = "jaxtyping" in type(err).__module__ or "Type-check" in msg
        if hooked and shape_case and not strict:
            return  # the annotation checker refused it first: also a TypeError naming the argument
        if not isinstance(err, exc):
            raise AssertionError(f"{name}: expected {exc.__name__}, got {type(err).__name__}: {msg}") from err
        missing = [p for p in patterns if not re.search(p, msg)]
        if missing:
            raise AssertionError(f"{name}: message {msg!r} lacks {missing}") from err
        return
    raise AssertionError(f"{name}: no error raised")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case):
    check_case(case, strict=False)


def test_checks_survive_python_O_and_use_no_assert():
    # no `assert` statements in the core: validation must survive python -O
    for mod in CORE:
        tree = ast.parse((ROOT / "src" / "tokinteract" / f"{mod}.py").read_text())
        asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        assert not asserts, f"{mod}.py uses assert at lines {asserts}"


def test_core_source_never_imports_transformers():
    for mod in CORE:
        if mod == COMPAT:
            tree = ast.parse((ROOT / "src" / "tokinteract" / f"{mod}.py").read_text())
            top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert not any(
                (a.name if isinstance(n, ast.Import) else (n.module or "")).split(".")[0] == "transformers"
                for n in top for a in (n.names if isinstance(n, ast.Import) else [n])
            ), "compat may import transformers only inside its functions"
            continue
        tree = ast.parse((ROOT / "src" / "tokinteract" / f"{mod}.py").read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in ("transformers", "accelerate") for n in names), (mod, names)


_SCRIPT = r"""
import sys
sys.modules["transformers"] = None  # any `import transformers` now raises ImportError
sys.path.insert(0, {tests!r})
import importlib
import tokinteract
for mod in {core!r}:
    importlib.import_module("tokinteract" if mod == "__init__" else "tokinteract." + mod)
import test_errors
for case in test_errors.CASES:
    test_errors.check_case(case, strict=True)
# the functions run end to end without transformers
import torch
s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
lab = torch.randint(0, 9, (2, 4)); lab[:, 0] = -100
print("OK", len(test_errors.CASES), float(tokinteract.kd_loss(s, t, lab)))
"""

_SCRIPT_NO_BLOCKER = r"""
import sys, importlib
import tokinteract
for mod in {core!r}:
    importlib.import_module("tokinteract" if mod == "__init__" else "tokinteract." + mod)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "accelerate"))
print("LOADED", bad)
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_own_messages_without_the_hook():
    """Every case, in a plain interpreter (no jaxtyping hook), with transformers unimportable."""
    res = _run(_SCRIPT.format(tests=str(ROOT / "tests"), core=CORE))
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip().startswith(f"OK {len(CASES)}"), res.stdout
    # the hook really was off there: a shape case raised our ValueError, not jaxtyping's TypeError
    res2 = _run(
        "import torch, tokinteract as ti\n"
        "try:\n    ti.token_divergence(torch.zeros(2, 3, 5), torch.zeros(2, 4, 5))\n"
        "except ValueError as e:\n    print('OWN', e)\n"
    )
    assert res2.stdout.startswith("OWN teacher_logits"), res2.stdout + res2.stderr


def test_importing_the_core_loads_no_transformers():
    res = _run(_SCRIPT_NO_BLOCKER.format(core=CORE))
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip() == "LOADED []", res.stdout
