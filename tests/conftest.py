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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the long tests first: the shared launches (``xdist_group``), then the other ``slow`` ones.

    With ``make test``'s two xdist workers (``--dist loadgroup --no-loadscope-reorder`` hands the
    tests out in this order, one group at a time) a long test started last would leave one core
    idle while the other finishes it. The sort is stable, so a module's tests keep their order
    (and a group its module-scoped fixture).
    """
    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("xdist_group") is not None:
            return 0
        return 1 if item.get_closest_marker("slow") is not None else 2

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
