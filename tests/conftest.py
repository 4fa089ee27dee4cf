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


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: tiny models gain nothing from more, and rounding is stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
