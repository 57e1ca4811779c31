"""Models the server offers, by name.  Client-supplied names are looked up here, never used as paths."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..asr.conformer.beam import RnntBeamSearch
from ..asr.conformer.checkpoint import LoadedModel
from ..asr.conformer.streaming import ConformerStreamer
from ..asr.tokenizer import SentencePieceTokenizer
from ..asr.transcribe import make_search


@dataclass
class ModelEntry:
    name: str
    loaded: LoadedModel
    engine: ConformerStreamer
    search: RnntBeamSearch | None = None  # the default rnnt decoding (None: greedy)

    @property
    def beam_size(self) -> int:
        return self.search.config.beam_size if self.search is not None else 1

    def search_for(self, beam_size: int | None) -> RnntBeamSearch | None:
        """The rnnt decoding a client asked for: the default, greedy (1) or another beam size (with
        the default's LM, if any)."""
        if beam_size is None or beam_size == self.beam_size:
            return self.search
        if beam_size == 1:
            return None
        if self.search is None:
            return make_search(self.loaded, beam_size=beam_size, lm="none")
        model = self.loaded.model
        return RnntBeamSearch(model.joint, model.decoder, replace(self.search.config, beam_size=beam_size),
                              self.search.lm)

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
                "default_lookahead_ms": default.lookahead_ms, "default_beam_size": self.beam_size,
                "lm": self.search is not None and self.search.lm is not None,
                "sample_rate": model.spec.mel.sample_rate, "slots": self.engine.pool.capacity}


class ModelRegistry:
    def __init__(self):
        self._entries: dict[str, ModelEntry] = {}
        self.default: str | None = None

    def add(self, name: str, loaded: LoadedModel, *, slots: int | None = None, memory_budget: int | None = None,
            device: str | torch.device = "cpu", search: RnntBeamSearch | None = None) -> ModelEntry:
        if name in self._entries:
            raise ValueError(f"model name {name!r} is registered twice")
        engine = ConformerStreamer(loaded.model, slots=slots, memory_budget=memory_budget, device=device, name=name)
        entry = ModelEntry(name, loaded, engine, search)
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
