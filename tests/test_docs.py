"""The documentation cannot rot: its code runs, its figures match the library.

* Every fenced ``python`` block preceded by an HTML comment ``<!-- test -->`` in
  ``docs/**/*.md`` is executed; the blocks of one page run in order in one namespace (so a
  page can build tiny models once and use them below). ``<!-- test max-lines=20 -->`` also
  bounds the block's length (the quick start promises a loop in at most 20 lines).
* ``scripts/make_mask_figure.py`` draws exactly ``tokinteract.ribbon_mask`` and labels the
  slots as the ``TPAExpansion`` places them.
* Every ``::: module`` block of the API reference names an importable object.
"""

from __future__ import annotations

import importlib
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_BLOCK = re.compile(
    r"<!--\s*test(?P<opts>[^>]*)-->\s*\n```python[^\n]*\n(?P<code>.*?)\n```", re.DOTALL
)


def marked_blocks(text: str) -> list[tuple[str, int | None, int]]:
    """``(code, max_lines or None, line number)`` of each ``<!-- test -->`` python block."""
    out = []
    for m in _BLOCK.finditer(text):
        opts = m.group("opts")
        limit = re.search(r"max-lines=(\d+)", opts)
        line = text.count("\n", 0, m.start("code")) + 1
        out.append((m.group("code"), int(limit.group(1)) if limit else None, line))
    return out


def _pages_with_tests() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if marked_blocks(p.read_text()))


def test_block_extraction_finds_marked_blocks_only() -> None:
    text = (
        "intro\n<!-- test -->\n```python\nx = 1\n```\n"
        "```python\nnot_run()\n```\n"
        "<!-- test max-lines=3 -->\n```python\ny = x + 1\n```\n"
    )
    blocks = marked_blocks(text)
    assert [(code, limit) for code, limit, _ in blocks] == [("x = 1", None), ("y = x + 1", 3)]


def test_quickstart_has_tested_blocks() -> None:
    blocks = marked_blocks((DOCS / "quickstart.md").read_text())
    assert len(blocks) >= 3
    assert any(limit == 20 for _, limit, _ in blocks), "the plain PyTorch loop must carry max-lines=20"


@pytest.mark.parametrize("page", _pages_with_tests(), ids=lambda p: str(p.relative_to(DOCS)))
def test_doc_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = page.read_text()
    if "transformers" in text:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # as if run from the repository root
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for code, limit, line in marked_blocks(text):
        if limit is not None:
            n = len([ln for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")])
            assert n <= limit, f"{page.name}:{line}: block has {n} code lines, promised <= {limit}"
        exec(compile(code, f"{page}:{line}", "exec"), namespace)  # noqa: S102


# --- the mask figure ------------------------------------------------------------------


@pytest.fixture(scope="module")
def figure_module() -> dict[str, object]:
    return runpy.run_path(str(ROOT / "scripts" / "make_mask_figure.py"), run_name="make_mask_figure")


def test_mask_figure_example_is_the_library_mask(figure_module: dict[str, object]) -> None:
    from tokinteract import ribbon_mask

    ex = figure_module["mask_example"]()
    exp = ex.expansion
    d = figure_module["NUM_CANDIDATES"]
    assert d == 2 and exp.num_candidates == 2
    assert not bool(ex.attention_mask[0, 0]), "the example must be left-padded"
    assert torch.equal(exp.attention_mask, ribbon_mask(ex.candidate_mask, d, ex.attention_mask))
    T, T2 = exp.seq_len, exp.expanded_len
    assert len(ex.slot_labels) == len(ex.slot_kinds) == T2
    tokens = figure_module["TOKENS"]
    assert ex.slot_labels[:T] == tokens
    # Each candidate slot's label names the ground-truth token it replaces (t + 1).
    b, t, u, slot = exp.candidate_slots()
    assert len(slot) == int(ex.candidate_mask.sum()) * d > 0
    for tt, uu, ss in zip(t.tolist(), u.tolist(), slot.tolist()):
        assert ex.slot_kinds[ss] == "cand"
        assert ex.slot_labels[ss] == f"{tokens[tt + 1]}'({uu + 1})"
    # Pads attend only to themselves; a candidate never sees another candidate.
    m = exp.attention_mask[0, 0]
    for s in range(T2):
        if ex.slot_kinds[s] in ("pad", "unused"):
            assert m[s].nonzero().flatten().tolist() == [s]
        if ex.slot_kinds[s] == "cand":
            seen_cands = [k for k in m[s].nonzero().flatten().tolist() if ex.slot_kinds[k] == "cand"]
            assert seen_cands == [s]


def test_mask_figure_script_writes_pngs(figure_module: dict[str, object], tmp_path: Path) -> None:
    paths = figure_module["main"](["--out", str(tmp_path)])
    assert [p.name for p in paths] == ["ribbon_mask.png", "candidate_layout.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (DOCS / "assets" / p.name).is_file(), f"commit the rendered {p.name} under docs/assets/"


# --- the API reference ----------------------------------------------------------------


def _api_targets() -> list[str]:
    targets = []
    for page in sorted(DOCS.rglob("*.md")):
        targets += re.findall(r"^:::\s+([\w.]+)", page.read_text(), flags=re.MULTILINE)
    return targets


def test_api_pages_exist_for_core_modules() -> None:
    targets = set(_api_targets())
    for mod in ("kd", "divergence", "reduction", "sampling", "expansion", "tpa", "iva", "irs", "align_ti"):
        assert any(t == f"tokinteract.{mod}" or t.startswith(f"tokinteract.{mod}.") for t in targets), mod


@pytest.mark.parametrize("target", sorted(set(_api_targets())))
def test_api_block_targets_import(target: str) -> None:
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{target} does not import")


def test_griffe_role_rewrite() -> None:
    sys.path.insert(0, str(DOCS / "scripts"))
    try:
        from griffe_sphinx_roles import rewrite_roles
    finally:
        sys.path.pop(0)
    out = rewrite_roles("see :func:`tokinteract.kd_loss` and :class:`~TPAExpansion`.", lambda n: "x." + n)
    assert out == (
        'see <autoref identifier="x.tokinteract.kd_loss" optional><code>tokinteract.kd_loss</code></autoref>'
        ' and <autoref identifier="x.TPAExpansion" optional><code>TPAExpansion</code></autoref>.'
    )


def test_griffe_grouped_params_split() -> None:
    sys.path.insert(0, str(DOCS / "scripts"))
    try:
        from griffe_sphinx_roles import split_grouped_params
    finally:
        sys.path.pop(0)
    text = "Plot.\n\nArgs:\n    a: x.\n    cmap, alpha: look.\n        more.\n\nReturns:\n    p, q: not params."
    assert split_grouped_params(text) == (
        "Plot.\n\nArgs:\n    a: x.\n    cmap: look.\n        more.\n    alpha: look.\n        more.\n\n"
        "Returns:\n    p, q: not params."
    )


def test_snippet_includes_exist() -> None:
    """``--8<--`` includes (benchmark tables) name files that exist, with a valid start line."""
    found = 0
    for page in sorted(DOCS.rglob("*.md")):
        for path, start in re.findall(r'^\s*--8<-- "([^":]+)(?::(\d+))?:?"', page.read_text(), flags=re.MULTILINE):
            found += 1
            target = ROOT / path
            assert target.is_file(), f"{page.name} includes {path}, which does not exist"
            if start:
                lines = target.read_text().splitlines()
                assert int(start) <= len(lines), f"{page.name} includes {path} from line {start} of {len(lines)}"
                assert lines[0].startswith("# "), f"{path}: the skipped first line should be its title"
    assert found >= 1


# --- every public module and class is documented --------------------------------------

# The `make demo` driver: an application, not a library API (it is moving to examples/).
NOT_API = {"tokinteract.mllm.demo"}


def public_modules() -> list[str]:
    """Every module of the package whose dotted name has no ``_``-prefixed part."""
    import pkgutil

    import tokinteract

    names = ["tokinteract"]
    for info in pkgutil.walk_packages(tokinteract.__path__, "tokinteract.", onerror=lambda name: None):
        if not any(part.startswith("_") for part in info.name.split(".")) and info.name not in NOT_API:
            names.append(info.name)
    return names


def _public_names(mod: object) -> list[str]:
    """``__all__``, else the public functions and classes defined in the module."""
    if hasattr(mod, "__all__"):
        return list(mod.__all__)
    return [
        n for n, v in vars(mod).items()
        if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == mod.__name__
    ]  # fmt: skip


def test_public_modules_are_found() -> None:
    mods = public_modules()
    assert {"tokinteract.tpa", "tokinteract.attention", "tokinteract.hf.packed", "tokinteract.mllm.trainer"} <= set(mods)
    assert not [m for m in mods if "._" in m]


@pytest.mark.parametrize("module", public_modules())
def test_every_public_module_has_an_api_page(module: str) -> None:
    """A ``::: module`` block (or one per public object of it) on some API page."""
    pytest.importorskip("transformers") if module.startswith(("tokinteract.hf", "tokinteract.mllm")) else None
    targets = set(_api_targets())
    if module in targets:
        return
    mod = importlib.import_module(module)
    if module.count(".") == 1 and module.split(".")[1] in ("hf", "mllm"):
        # a subpackage: documented through its modules (each checked on its own)
        return
    documented_modules = [sys.modules[t] for t in targets if t in sys.modules and t != module]

    def documented(name: str) -> bool:
        obj = getattr(mod, name)
        home = getattr(obj, "__module__", None)
        if f"{module}.{name}" in targets or home in targets or f"{home}.{name}" in targets:
            return True  # a re-exported name counts as documented where it is defined
        # constants: the same object documented as a module, or by name, elsewhere
        if any(getattr(m, name, None) is obj for m in documented_modules):
            return True
        return any(
            t.endswith(f".{name}") and getattr(sys.modules.get(t.rsplit(".", 1)[0]), name, None) is obj
            for t in targets
        )

    missing = [n for n in _public_names(mod) if not documented(n)]
    assert not missing, f"{module} has no API page (no '::: {module}' block); undocumented: {missing}"


def _griffe_package():  # type: ignore[no-untyped-def]
    griffe = pytest.importorskip("griffe")
    sys.path.insert(0, str(DOCS / "scripts"))
    try:
        from griffe_sphinx_roles import FieldHelp, SphinxRoles
    finally:
        sys.path.pop(0)
    extensions = griffe.load_extensions(SphinxRoles(), FieldHelp())
    return griffe.load("tokinteract", search_paths=[str(ROOT / "src")], extensions=extensions,
                       docstring_parser="google")  # fmt: skip


def _documented_names(cls) -> set[str]:  # type: ignore[no-untyped-def]
    """Names the rendered docs describe: Args/Attributes entries and documented attributes."""
    names: set[str] = set()
    docstrings = [cls.docstring]
    if "__init__" in cls.members:
        docstrings.append(cls.members["__init__"].docstring)
    for doc in filter(None, docstrings):
        for section in doc.parse("google"):
            if section.kind.value in ("parameters", "other parameters", "attributes"):
                names |= {item.name for item in section.value}
    for name, member in cls.members.items():
        if not member.is_alias and member.is_attribute and member.docstring is not None:
            names.add(name)
    return names


def test_public_classes_document_their_constructor_arguments() -> None:
    import inspect

    pytest.importorskip("transformers")
    package = _griffe_package()
    problems = []
    checked = 0
    for module in public_modules():
        mod = importlib.import_module(module)
        for name in _public_names(mod):
            obj = getattr(mod, name)
            if not inspect.isclass(obj) or obj.__module__ != module or issubclass(obj, BaseException):
                continue
            params = [
                p.name for p in inspect.signature(obj).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]  # fmt: skip
            documented = _documented_names(package[f"{module}.{name}".removeprefix("tokinteract.")])
            checked += 1
            missing = [p for p in params if p not in documented]
            if missing:
                problems.append(f"{module}.{name}: {missing}")
    assert checked >= 15
    assert not problems, "constructor arguments without documentation:\n" + "\n".join(problems)
