"""Shared test fixtures.  Every test must hand back all state-pool slots it took."""
import pytest
import torch

from chorus.cache import live_pools


@pytest.fixture(autouse=True)
def slots_returned():
    yield
    leaks = [repr(p) for p in live_pools() if p.used]
    assert not leaks, f"slots still in use after the test: {leaks}"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
