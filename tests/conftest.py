"""Shared test fixtures.  Every test must hand back all state-pool slots it took."""
import pytest
import torch

from chorus.cache import live_pools

# The test models are tiny: one intra-op thread is faster and steadier than a thread pool
# whose workers wait on busy cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def slots_returned():
    yield
    leaks = [repr(p) for p in live_pools() if p.used]
    assert not leaks, f"slots still in use after the test: {leaks}"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
