"""What one stream's state is: named tensors of fixed shape and dtype (a model's state spec)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch


@dataclass(frozen=True)
class TensorSpec:
    """One per-stream state tensor; `fill` is its value for a fresh stream."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    fill: float = 0.0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class StateSpec(Mapping[str, TensorSpec]):
    """An ordered, immutable mapping of state names to tensor specs."""

    def __init__(self, **tensors: TensorSpec):
        self._tensors = dict(tensors)

    def __getitem__(self, name: str) -> TensorSpec:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def bytes_per_slot(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}"
                          for k, v in self._tensors.items())
        return f"StateSpec({inner})"
