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


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
