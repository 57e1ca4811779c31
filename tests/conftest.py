"""Shared test fixtures.  Every test must hand back all state-pool slots it took."""
import pytest
import torch

from chorus.asr.conformer.checkpoint import save_fastconformer
from chorus.cache import live_pools
from factories import tiny_model, train_tokenizer

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


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny random hybrid model written as .nemo, for the tests that serve one."""
    path = tmp_path_factory.mktemp("model") / "tiny.nemo"
    save_fastconformer(path, tiny_model(seed=11), train_tokenizer())
    return path
