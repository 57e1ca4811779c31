"""Preallocated slot pools: one `[slots, *shape]` tensor per state name, one slot per stream.

A stream acquires a slot when it opens and releases it when it closes, errors or drops.  A
batched step reads the slots of its streams with one `index_select` per state tensor and writes
them back with one `index_copy_`, so the pool itself is never rebuilt or copied.
"""
from __future__ import annotations

import threading
import weakref

import torch

from .spec import StateSpec

_LIVE_POOLS: weakref.WeakSet = weakref.WeakSet()


class PoolExhausted(RuntimeError):
    """No free slot (or page) is left within the memory budget."""


def live_pools() -> list:
    """Every slot pool and paged cache alive in this process (tests check nothing is left in use)."""
    return list(_LIVE_POOLS)


def _register(pool) -> None:
    _LIVE_POOLS.add(pool)


class SlotPool:
    def __init__(self, name: str, spec: StateSpec, *, slots: int | None = None,
                 memory_budget: int | None = None, device: str | torch.device = "cpu"):
        if slots is None:
            if memory_budget is None:
                raise ValueError("give either slots or memory_budget")
            slots = memory_budget // max(1, spec.bytes_per_slot)
        elif memory_budget is not None and slots * spec.bytes_per_slot > memory_budget:
            raise ValueError(f"{slots} slots of {spec.bytes_per_slot} bytes exceed the budget {memory_budget}")
        if slots < 1:
            raise ValueError(f"pool {name!r}: the budget does not fit one slot of {spec.bytes_per_slot} bytes")
        self.name = name
        self.spec = spec
        self.capacity = int(slots)
        self.device = torch.device(device)
        self.tensors = {k: torch.full((self.capacity, *t.shape), t.fill, dtype=t.dtype, device=self.device)
                        for k, t in spec.items()}
        self._free = list(range(self.capacity - 1, -1, -1))  # pop() hands out low slots first
        self._in_use: set[int] = set()
        self._lock = threading.Lock()
        _register(self)

    # -- occupancy -------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return len(self._in_use)

    @property
    def free(self) -> int:
        return self.capacity - len(self._in_use)

    @property
    def nbytes(self) -> int:
        return self.capacity * self.spec.bytes_per_slot

    # -- lifetime --------------------------------------------------------------------------
    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise PoolExhausted(f"pool {self.name!r} has no free slot ({self.capacity} in use)")
            slot = self._free.pop()
            self._in_use.add(slot)
        self.reset([slot])
        return slot

    def release(self, slot: int) -> None:
        with self._lock:
            if slot not in self._in_use:
                raise ValueError(f"slot {slot} of pool {self.name!r} is not in use")
            self._in_use.remove(slot)
            self._free.append(slot)

    def reset(self, slots: list[int] | torch.Tensor) -> None:
        """Put the given slots back to their fresh-stream values."""
        idx = self._index(slots)
        for k, t in self.spec.items():
            self.tensors[k].index_fill_(0, idx, t.fill)

    # -- batched access --------------------------------------------------------------------
    def index(self, slots: list[int] | torch.Tensor) -> torch.Tensor:
        return self._index(slots)

    def read(self, idx: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The state of the streams at slot indices `idx` as `[B, *shape]` tensors (copies)."""
        return {k: self.tensors[k].index_select(0, idx) for k in (names or self.spec)}

    def write(self, idx: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Store `[B, *shape]` values into the slots `idx`, in place."""
        for k, v in values.items():
            self.tensors[k].index_copy_(0, idx, v.to(self.tensors[k].dtype))

    def _index(self, slots) -> torch.Tensor:
        if isinstance(slots, torch.Tensor):
            return slots.to(device=self.device, dtype=torch.long)
        return torch.as_tensor(list(slots), dtype=torch.long, device=self.device)

    def __repr__(self) -> str:
        return (f"SlotPool({self.name!r}, used={self.used}/{self.capacity}, "
                f"{self.nbytes / 2**20:.1f} MiB, {self.spec!r})")
