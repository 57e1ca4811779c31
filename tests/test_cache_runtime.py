"""The shared state runtime: slot pools (fixed-size state) and paged K/V (growing state)."""
import pytest
import torch

from chorus.cache import PagedKVCache, PoolExhausted, SlotPool, StateSpec, TensorSpec


def paraformer_like_spec() -> StateSpec:
    """The shapes the streaming Paraformer will keep per stream (look-back K/V, FSMN tails, CIF)."""
    return StateSpec(
        lookback_k=TensorSpec((50, 40, 512)),       # [layers, 4 chunks x 10 frames, d]
        lookback_v=TensorSpec((50, 40, 512)),
        lookback_len=TensorSpec((), torch.long),
        fsmn_tail=TensorSpec((16, 512, 10)),        # decoder FSMN memories [layers, d, 10]
        cif_hidden=TensorSpec((512,)),
        cif_alpha=TensorSpec(()),
        overlap_frames=TensorSpec((5, 560)),
    )


def test_budget_sets_capacity_and_occupancy_counts():
    spec = StateSpec(a=TensorSpec((4, 8)), n=TensorSpec((), torch.long, fill=7))
    assert spec.bytes_per_slot == 4 * 8 * 4 + 8
    pool = SlotPool("t", spec, memory_budget=spec.bytes_per_slot * 3 + 5)
    assert pool.capacity == 3 and pool.free == 3 and pool.used == 0
    slots = [pool.acquire() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2] and pool.used == 3 and pool.free == 0
    with pytest.raises(PoolExhausted, match="no free slot"):
        pool.acquire()
    pool.release(slots[1])
    assert pool.free == 1
    with pytest.raises(ValueError, match="not in use"):
        pool.release(slots[1])
    for s in (slots[0], slots[2]):
        pool.release(s)


def test_acquire_resets_the_slot():
    pool = SlotPool("t", StateSpec(a=TensorSpec((3,)), n=TensorSpec((), torch.long, fill=7)), slots=2)
    s = pool.acquire()
    idx = pool.index([s])
    pool.write(idx, {"a": torch.ones(1, 3), "n": torch.tensor([1])})
    pool.release(s)
    s2 = pool.acquire()
    assert s2 == s
    state = pool.read(pool.index([s2]))
    assert torch.equal(state["a"], torch.zeros(1, 3)) and state["n"].item() == 7
    pool.release(s2)


def test_batched_read_write_touches_only_its_slots():
    pool = SlotPool("t", StateSpec(x=TensorSpec((2, 5))), slots=6)
    slots = [pool.acquire() for _ in range(6)]
    before = pool.tensors["x"].clone()
    storage = pool.tensors["x"].data_ptr()
    idx = pool.index([slots[4], slots[1]])
    got = pool.read(idx)["x"]
    assert got.shape == (2, 2, 5)
    pool.write(idx, {"x": got + torch.tensor([1.0, 2.0])[:, None, None]})
    after = pool.tensors["x"]
    assert after.data_ptr() == storage  # written in place, never rebuilt
    assert torch.equal(after[slots[4]], before[slots[4]] + 1) and torch.equal(after[slots[1]], before[slots[1]] + 2)
    untouched = [s for s in slots if s not in (slots[4], slots[1])]
    assert torch.equal(after[untouched], before[untouched])
    for s in slots:
        pool.release(s)


def test_other_families_fit_the_same_pool():
    spec = paraformer_like_spec()
    pool = SlotPool("paraformer", spec, memory_budget=spec.bytes_per_slot * 2)
    assert pool.capacity == 2
    assert pool.tensors["lookback_k"].shape == (2, 50, 40, 512)
    s = pool.acquire()
    pool.release(s)


def test_budget_too_small_is_an_error():
    with pytest.raises(ValueError, match="does not fit one slot"):
        SlotPool("t", StateSpec(a=TensorSpec((1000,))), memory_budget=10)


def test_paged_append_gather_and_free():
    cache = PagedKVCache("kv", layers=2, heads=2, head_dim=3, page_size=4, pages=6, max_streams=3,
                         max_tokens_per_stream=12)
    a, b = cache.open(), cache.open()
    ref = {a: [], b: []}
    for step, counts in enumerate([(5, 2), (1, 7), (3, 0)]):
        sids = torch.tensor([a, b])
        cnt = torch.tensor(counts)
        rows = cache.reserve(sids, cnt)
        width = rows.shape[1]
        new_k = torch.randn(2, width, 2, 3)
        for layer in range(2):
            cache.write(layer, rows, new_k + layer, -(new_k + layer))
        cache.commit(sids, cnt)
        for i, sid in enumerate((a, b)):
            ref[sid].append(new_k[i, :counts[i]])
    assert cache.lengths[a].item() == 9 and cache.lengths[b].item() == 9
    assert cache.pages_used == 6  # 3 pages each
    k, v, mask = cache.gather(1, torch.tensor([b, a]))
    assert k.shape == (2, 9, 2, 3) and mask.all()
    assert torch.equal(k[0], torch.cat(ref[b]) + 1) and torch.equal(v[1], -(torch.cat(ref[a]) + 1))
    with pytest.raises(PoolExhausted):
        cache.reserve(torch.tensor([a]), torch.tensor([4]))  # needs a 4th page; none free
    assert cache.pages_used == 6 and cache.lengths[a].item() == 9  # nothing half-allocated
    cache.truncate(a, 4)
    assert cache.pages_used == 4
    k, _, mask = cache.gather(0, torch.tensor([a, b]))
    assert mask.sum(1).tolist() == [4, 9]
    assert torch.equal(k[0, :4], torch.cat(ref[a])[:4])
    cache.close(a)
    cache.close(b)
    assert cache.pages_used == 0 and cache.streams_open == 0


def test_paged_gather_includes_uncommitted_tokens_and_limits():
    cache = PagedKVCache("kv", layers=1, heads=1, head_dim=2, page_size=2, memory_budget=10 ** 6, max_streams=1,
                         max_tokens_per_stream=4)
    s = cache.open()
    rows = cache.reserve(torch.tensor([s]), torch.tensor([3]))
    cache.write(0, rows, torch.ones(1, 3, 1, 2), torch.ones(1, 3, 1, 2))
    k, _, mask = cache.gather(0, torch.tensor([s]), extra=torch.tensor([3]))
    assert mask.sum().item() == 3 and torch.equal(k[0], torch.ones(3, 1, 2))
    cache.commit(torch.tensor([s]), torch.tensor([3]))
    with pytest.raises(PoolExhausted, match="exceed"):
        cache.reserve(torch.tensor([s]), torch.tensor([2]))
    with pytest.raises(PoolExhausted, match="no free stream"):
        cache.open()
    cache.close(s)
