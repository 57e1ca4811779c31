"""Models the server offers, by name.  Client-supplied names are looked up here, never used as paths."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..asr.conformer.checkpoint import LoadedModel
from ..asr.conformer.streaming import ConformerStreamer
from ..asr.tokenizer import SentencePieceTokenizer


@dataclass
class ModelEntry:
    name: str
    loaded: LoadedModel
    engine: ConformerStreamer

    @property
    def tokenizer(self) -> SentencePieceTokenizer:
        return self.loaded.tokenizer

    def describe(self) -> dict:
        model = self.loaded.model
        default = self.engine.setting_for_lookahead(None)
        settings = sorted(self.engine.settings.values(), key=lambda s: s.lookahead_ms)
        return {"name": self.name, "decoders": list(model.decoders), "default_decoder": model.default_decoder,
                "lookahead_ms": [s.lookahead_ms for s in settings],
                "chunk_ms": {str(s.lookahead_ms): s.chunk_ms for s in settings},
                "default_lookahead_ms": default.lookahead_ms,
                "sample_rate": model.spec.mel.sample_rate, "slots": self.engine.pool.capacity}


class ModelRegistry:
    def __init__(self):
        self._entries: dict[str, ModelEntry] = {}
        self.default: str | None = None

    def add(self, name: str, loaded: LoadedModel, *, slots: int | None = None, memory_budget: int | None = None,
            device: str | torch.device = "cpu") -> ModelEntry:
        if name in self._entries:
            raise ValueError(f"model name {name!r} is registered twice")
        engine = ConformerStreamer(loaded.model, slots=slots, memory_budget=memory_budget, device=device, name=name)
        entry = ModelEntry(name, loaded, engine)
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
