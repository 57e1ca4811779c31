"""The shared state runtime: per-stream state specs, slot pools, paged K/V."""
from .paged import PagedKVCache
from .pool import PoolExhausted, SlotPool, live_pools
from .spec import StateSpec, TensorSpec

__all__ = ["PagedKVCache", "PoolExhausted", "SlotPool", "StateSpec", "TensorSpec", "live_pools"]
