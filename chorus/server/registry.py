"""Models the server offers, by name.  Client-supplied names are looked up here, never used as paths.

An entry holds a loaded model of any family and its engine (slot pool and batched step); the server
knows them only through the family contract (chorus/stream/contract.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..stream.contract import Engine, SpeechModel


@dataclass
class ModelEntry:
    name: str
    model: SpeechModel
    engine: Engine

    def describe(self) -> dict:
        return {"name": self.name, **self.model.describe(), "slots": self.engine.pool.capacity}


class ModelRegistry:
    def __init__(self):
        self._entries: dict[str, ModelEntry] = {}
        self.default: str | None = None

    def add(self, name: str, model: SpeechModel, *, slots: int | None = None,
            memory_budget: int | None = None) -> ModelEntry:
        if name in self._entries:
            raise ValueError(f"model name {name!r} is registered twice")
        entry = ModelEntry(name, model, model.make_engine(slots=slots, memory_budget=memory_budget, name=name))
        self._entries[name] = entry
        if self.default is None:
            self.default = name
        return entry

    def get(self, name: str | None) -> ModelEntry | None:
        return self._entries.get(self.default if name is None else name)

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())
