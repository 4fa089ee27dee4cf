"""Shared settings: hypothesis profile and small helpers for the core suite."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "snapkv",
    deadline=None,
    max_examples=int(os.environ.get("SNAPKV_HYPOTHESIS_EXAMPLES", "150")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("snapkv")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def no_grad():
    """Run a test without autograd (model tests: ``pytestmark = pytest.mark.usefixtures("no_grad")``)."""
    with torch.no_grad():
        yield
