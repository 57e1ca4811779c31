"""Cutting one stream's feature frames into the chunks a streaming model steps on."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkPlan:
    """How many feature frames a step needs and how many it consumes.

    The first step of a stream may differ from the rest (NeMo's causal subsampling takes
    1 + 8k frames first, then 8 + 8k).  A step reads `size` frames and consumes `shift` of them;
    the rest stay for the next step (right context).
    """

    first_size: int
    size: int
    first_shift: int
    shift: int


class FrameChunker:
    """Pending feature frames of one stream, handed out per a ChunkPlan."""

    def __init__(self, plan: ChunkPlan, n_features: int):
        self.plan = plan
        self._pending = torch.zeros(0, n_features)
        self.consumed = 0  # frames consumed by steps so far
        self.received = 0
        self.finished = False

    def push(self, frames: torch.Tensor) -> None:
        """Append frames [n_features, k] (the layout the front end produces)."""
        if frames.shape[1]:
            self._pending = torch.cat([self._pending, frames.T])
            self.received += frames.shape[1]

    def finish(self) -> None:
        self.finished = True

    @property
    def pending(self) -> int:
        return self._pending.shape[0]

    def _need(self) -> tuple[int, int]:
        first = self.consumed == 0
        return (self.plan.first_size, self.plan.first_shift) if first else (self.plan.size, self.plan.shift)

    def frames_needed(self) -> int:
        """Frames the next step reads."""
        return self._need()[0]

    def ready(self) -> bool:
        size, _ = self._need()
        return self.pending >= size or (self.finished and self.pending > 0)

    def take(self) -> tuple[torch.Tensor, int]:
        """The next chunk [frames, n_features] and how many of its frames it consumes."""
        size, shift = self._need()
        chunk = self._pending[:size]
        consumed = min(shift, chunk.shape[0])
        self._pending = self._pending[consumed:]
        self.consumed += consumed
        return chunk, consumed


def whole_utterance_chunks(plan: ChunkPlan, mel: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Every (chunk, consumed) step of a stream whose features [n_features, T] are all known."""
    chunker = FrameChunker(plan, mel.shape[0])
    chunker.push(mel)
    chunker.finish()
    chunks = []
    while chunker.ready():
        chunks.append(chunker.take())
    return chunks
