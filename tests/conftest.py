"""Shared test settings: deterministic seeds and hypothesis profiles.

Runtime shape checking is switched on for the whole package by the pytest option
``--jaxtyping-packages=tokinteract,beartype.beartype`` (see pyproject.toml);
``tests/test_typing_canary.py`` proves it is really on.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    # In CI (CI=true) the examples are derandomized so a run is reproducible; local runs explore.
    derandomize=bool(os.environ.get("CI")),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# torch's intra-op threads: OMP_NUM_THREADS when set (``make test`` sets 1: its two xdist workers then
# use one core each instead of four threads contending for two cores), else up to 2
THREADS = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _threads():  # type: ignore[no-untyped-def]
    """Give every test :data:`THREADS` torch threads back afterwards: a test (or a module fixture)
    that sets its own count must not change the count of the tests that run after it in this worker."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


SHARED = {
    "tests/mllm/test_mllm_cli.py::test_ddp_two_processes_gloo_identical_weights": "ddp",  # ddp_runs
    "tests/mllm/test_mllm_lora.py::test_lora_ddp_two_processes_identical_weights": "ddp",
    "tests/mllm/test_mllm_faults.py::test_same_seed_bit_identical": "determinism",  # determinism_runs
    "tests/mllm/test_mllm_faults.py::test_demo_scale_runs_repeat": "determinism",
    "tests/mllm/test_mllm_fsdp.py::": "fsdp",
    "tests/mllm/test_mllm_faults_distributed.py::": "faults_distributed",
    "tests/mllm/test_mllm_demo.py::": "demo",  # the smoke run
    "tests/test_site.py::": "site",  # the strict build
    "tests/test_packaging.py::": "packaging",  # sdist + wheel
}
"""Tests (node-id prefixes) that read one expensive module- or session-scoped launch, by group:
under xdist each group is one unit of work, run by one worker, so the launch is paid once.
(pytest-xdist's own ``xdist_group`` mark does nothing with pytest 9: it renames ``item._nodeid``,
which pytest 9 no longer reads.)"""


def _scope(nodeid: str) -> str:
    """The unit of work of ``nodeid``: its :data:`SHARED` group, else the test alone."""
    return next((group for prefix, group in SHARED.items() if nodeid.startswith(prefix)), nodeid)


def pytest_xdist_make_scheduler(config: pytest.Config, log):  # type: ignore[no-untyped-def]
    """``-n N``: the tests handed out one by one in collection order (``--no-loadscope-reorder``), each
    :data:`SHARED` group as one unit."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduler(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return Scheduler(config, log)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move every object alive after collection (modules, test items, their fixtures' code) to the
    garbage collector's permanent generation (``gc.freeze``), so that a full collection only walks what
    the tests create. ``transformers.Trainer.train`` runs one at its start (accelerate's
    ``free_memory``), ~0.25 s with the imported stack tracked: a large share of a tiny demo run's time
    (measured in CHANGELOG.md). Frozen objects that later become cyclic garbage are not freed: a few
    test items, the price of the speed."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the long tests first: the :data:`SHARED` groups, then the other ``slow`` ones.

    With ``make test``'s two xdist workers a long test started last would leave one core idle
    while the other finishes it. The sort is stable, so a module's tests keep their order (and
    a module-scoped fixture its tests together).
    """
    def rank(item: pytest.Item) -> int:
        if _scope(item.nodeid) != item.nodeid:
            return 0
        return 1 if item.get_closest_marker("slow") is not None else 2

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
