"""The documentation site builds strictly, and works offline.

* ``make test`` runs ``mkdocs build --strict`` without ``-q`` (with ``-q`` MkDocs emits no
  warnings, so strict mode counts none), and a deliberately broken cross-reference in a copy
  of the docs fails that build.
* The built site loads no script, stylesheet, font or image from another host, and every
  local one it loads exists (``scripts/site_check.py``; the browser check that formulas
  rendered is ``make docs-check``).
* The "Supported models" page is linked from the home page and the README.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = runpy.run_path(str(ROOT / "scripts" / "site_check.py"), run_name="site_check")

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")


def _mkdocs_build(config: Path, site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600, check=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    res = _mkdocs_build(ROOT / "mkdocs.yml", out, ROOT)
    assert res.returncode == 0, f"strict docs build failed:\n{res.stderr[-4000:]}"
    assert "WARNING" not in res.stderr, res.stderr[-4000:]
    return out


def test_make_test_runs_the_strict_build_without_quiet() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert recipe, "no test target in the Makefile"
    builds = [line for line in recipe.group(1).splitlines() if "mkdocs build" in line]
    assert builds, "make test does not build the docs"
    for line in builds:
        assert "--strict" in line, line
        assert not re.search(r"\s(-q|--quiet)\b", line), f"-q hides the warnings --strict counts: {line}"


def test_a_broken_reference_fails_the_strict_build(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    for linked in ("src", "benchmarks", "scripts"):
        (copy / linked).symlink_to(ROOT / linked)
    page = copy / "docs" / "quickstart.md"
    page.write_text(page.read_text() + "\nSee [the loss][tokinteract.no_such_module.NoSuchLoss].\n")
    res = _mkdocs_build(copy / "mkdocs.yml", tmp_path / "site", copy)
    assert res.returncode != 0, "a broken cross-reference did not fail mkdocs build --strict"
    assert "tokinteract.no_such_module.NoSuchLoss" in res.stderr, res.stderr[-4000:]


def test_site_loads_nothing_from_other_hosts(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert CHECK["external_resources"](site) == []


def test_site_resources_exist(site: Path) -> None:
    assert CHECK["missing_resources"](site) == []


def test_formulas_use_the_bundled_katex(site: Path) -> None:
    page = (site / "concepts" / "tpa" / "index.html").read_text()
    scripts = CHECK["html_resources"](page)
    assert any(s.endswith("javascripts/katex/katex.min.js") for s in scripts), scripts
    assert any(s.endswith("javascripts/katex/katex.min.css") for s in scripts), scripts
    assert 'class="arithmatex"' in page
    fonts = CHECK["css_urls"]((site / "javascripts" / "katex" / "katex.min.css").read_text())
    assert fonts and all((site / "javascripts" / "katex" / f).is_file() for f in fonts)


def test_resource_check_flags_other_hosts() -> None:
    """The checker itself: what it must catch and what it must let through."""
    html = (
        '<script src="https://cdn.example.org/mathjax.js"></script>'
        '<link rel="stylesheet" href="//fonts.example.com/css">'
        '<link rel="preconnect" href="https://fonts.gstatic.com">'
        '<img src="../assets/a.png"><script src="assets/x.js"></script>'
        '<a href="https://github.com/x">a link is not a resource</a>'
        '<style>@font-face{src:url(https://f.example.com/a.woff2)}</style>'
    )
    urls = CHECK["html_resources"](html)
    external = [u for u in urls if CHECK["is_external"](u)]
    assert external == [
        "https://cdn.example.org/mathjax.js",
        "//fonts.example.com/css",
        "https://fonts.gstatic.com",
        "https://f.example.com/a.woff2",
    ]
    assert "../assets/a.png" in urls and "https://github.com/x" not in urls
    assert CHECK["css_urls"]('a{b:url("fonts/k.woff2")} @import "x.css";') == ["fonts/k.woff2", "x.css"]


def test_supported_models_page_is_linked_from_home_and_readme(site: Path) -> None:
    assert (site / "models" / "index.html").is_file()
    assert "models.md" in (ROOT / "docs" / "index.md").read_text()
    assert "docs/models.md" in (ROOT / "README.md").read_text()
