"""Fixtures for tests/mllm: tiny synthetic data, the offline tokenizer, tiny LLaVAs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from mllm_helpers import ddp_runs_on_two_ranks, make_model  # noqa: E402

from tokinteract.mllm import SyntheticConfig, build_processor, build_word_tokenizer, generate_dataset, vocabulary  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _preflight_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The preflight scan cache of these tests (and of their subprocesses) lives in a temporary folder."""
    import os

    os.environ["TOKINTERACT_CACHE_DIR"] = str(tmp_path_factory.mktemp("tokinteract-cache"))


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """12 two-turn training samples, 4 test samples, 4 captions, written once per session."""
    root = tmp_path_factory.mktemp("synth")
    paths = generate_dataset(root, n_train=12, n_test=4, n_captions=4, seed=3, config=SyntheticConfig(turns=2))
    return SimpleNamespace(root=root, **paths)


@pytest.fixture(scope="session")
def tok():
    return build_word_tokenizer(vocabulary())


@pytest.fixture()
def student(tok):
    return make_model(tok, seed=1)


@pytest.fixture()
def teacher(tok):
    return make_model(tok, seed=2, hidden=48, layers=3)


@pytest.fixture(scope="session")
def processor(tok):
    return build_processor(tok, make_model(tok))


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory, synth):
    """The 2-rank DDP runs (``mllm_helpers.DDP_RUNS``), trained in one ``torchrun`` launch per
    session; ``tests/conftest.py`` (``SHARED``) keeps the tests that read them on one xdist worker."""
    return ddp_runs_on_two_ranks(tmp_path_factory.mktemp("ddp"), synth)
