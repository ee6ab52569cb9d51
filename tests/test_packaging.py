"""The package a user installs: ``python -m build`` output, installed into a fresh venv.

* The wheel and the sdist build from the repository (no network: ``--no-isolation`` with the
  setuptools of the running environment) and their metadata passes ``twine check``.
* The wheel holds the ``tokinteract`` package with ``py.typed`` and nothing else: no tests,
  docs, benchmarks, examples, data or demo outputs.
* Installed into a fresh virtual environment, the wheel imports ``tokinteract``,
  ``tokinteract.hf`` and ``tokinteract.mllm`` from that environment (not from the source
  tree) and ``tokinteract-train --help`` runs. The fresh venv reaches the already installed
  dependencies (torch 2.13.0 from the pinned local wheel, transformers, ...) through a
  ``.pth`` line, the way ``--system-site-packages`` would, and pip installs
  ``tokinteract[hf,mllm]`` with ``--no-index``: it succeeds only if every requirement of the
  package and of both extras is already satisfied, so a missing or wrong requirement fails here
  without downloading anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, check=False)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    # Build from a copy of the tracked files so the worktree gets no build/ or egg-info.
    src = tmp_path_factory.mktemp("src")
    files = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    _run(sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", out, src)
    return out


def _wheel(dist: Path) -> Path:
    (wheel,) = dist.glob("tokinteract-*-py3-none-any.whl")
    return wheel


def test_build_makes_sdist_and_wheel_that_pass_twine(dist: Path) -> None:
    pytest.importorskip("twine")
    assert len(list(dist.glob("tokinteract-*.tar.gz"))) == 1
    out = _run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir()))
    assert out.count("PASSED") == 2, out


def test_wheel_holds_the_package_only(dist: Path) -> None:
    names = zipfile.ZipFile(_wheel(dist)).namelist()
    assert "tokinteract/py.typed" in names
    assert "tokinteract/__init__.py" in names and "tokinteract/hf/__init__.py" in names
    assert "tokinteract/mllm/__init__.py" in names
    meta = [n for n in names if n.startswith("tokinteract-") and ".dist-info/" in n]
    stray = [n for n in names if not n.startswith("tokinteract/") and n not in meta]
    assert stray == [], f"files outside the package: {stray}"
    bad = [n for n in names if n.endswith((".pyc", ".png", ".json", ".csv", ".safetensors", ".bin", ".pt"))]
    assert bad == [], f"data or build outputs in the wheel: {bad}"
    assert not [n for n in names if "/tests/" in n or n.startswith("tests/")]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_sdist_holds_no_tests_docs_or_outputs(dist: Path) -> None:
    (sdist,) = dist.glob("tokinteract-*.tar.gz")
    names = [n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n]
    top = {n.split("/", 1)[0] for n in names}
    assert top <= {"src", "README.md", "CHANGELOG.md", "LICENSE", "MANIFEST.in", "constraints.txt", "pyproject.toml",
                   "setup.cfg", "PKG-INFO"}, top  # fmt: skip
    assert "src/tokinteract/py.typed" in names


def test_wheel_installs_and_imports_in_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    site = Path(_run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # The running environment's site-packages as a plain path entry: its distributions are
    # visible, its .pth files (the editable install of the source tree) are not processed.
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    wheel = _wheel(dist)
    _run(sys.executable, "-m", "pip", "--python", py, "install", "--no-index", "--quiet",
         f"tokinteract[hf,mllm] @ {wheel.as_uri()}", env=env)  # fmt: skip
    code = (
        "import pathlib, tokinteract, tokinteract.hf, tokinteract.mllm, torch\n"
        "print(tokinteract.__file__); print(torch.__version__)\n"
        "print(tokinteract.AlignTILoss.__name__, tokinteract.hf.tpa_forward.__name__,"
        " tokinteract.mllm.DistillationTrainer.__name__)\n"
    )
    out = _run(py, "-c", code, cwd=tmp_path, env=env).splitlines()
    assert Path(out[0]).is_relative_to(site), f"tokinteract imported from {out[0]}, not the installed wheel"
    assert out[1].startswith("2.13.0"), out[1]
    assert out[2] == "AlignTILoss tpa_forward DistillationTrainer"
    assert (Path(out[0]).parent / "py.typed").is_file()
    assert "usage" in _run(venv / "bin" / "tokinteract-train", "--help", cwd=tmp_path, env=env).lower()


def test_install_docs_name_the_wheel_that_is_built(dist: Path) -> None:
    name = _wheel(dist).name
    for doc in ("README.md", "docs/index.md"):
        assert f"dist/{name}[hf,mllm]" in (ROOT / doc).read_text(), f"{doc} names another wheel than {name}"
