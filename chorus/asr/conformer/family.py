"""NeMo's cache-aware FastConformer as a chorus family (the contract in chorus/stream/contract.py).

`.nemo` files load into a `ConformerModel`; its `ConformerEngine` owns the slot pool and the batched
step (`ConformerStreamer`); a `ConformerStream` is one stream's host side: resampling, NeMo's
incremental log-mel, chunking, and decoding: greedy CTC or RNNT inside the step, or RNNT beam
search (fused with an n-gram LM) after it, the streams that search alike advanced together.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ...stream.chunking import FrameChunker
from ...stream.contract import (DecodingDefaults, Engine, Family, SpeechModel, Stream, StreamRequest, Token,
                                UnsupportedOption)
from ...stream.features import OnlineMel
from .. import rows_kernel
from ..dtypes import DTYPES
from ..ngram import NgramLM
from .beam import BeamConfig, Hyp, Label, RnntBeamSearch
from .checkpoint import LoadedModel, load_fastconformer
from .precision import apply_dtype
from .streaming import KV_DTYPES, ConformerStreamer, StepResult, StreamSetting, apply_kv_dtype

PACKAGE_MODELS = Path(__file__).resolve().parents[2] / "models"
BUNDLED_MODEL = PACKAGE_MODELS / "default_asr.nemo"
BUNDLED_LM = PACKAGE_MODELS / "default_asr_lm.arpa.gz"  # token n-gram over the bundled model's pieces
DEFAULT_BEAM = 8


def make_search(loaded: LoadedModel, *, beam_size: int | None = None, lm: str | None = "auto",
                lm_weight: float | None = None, length_bonus: float | None = None) -> RnntBeamSearch | None:
    """The RNNT decoding a model gets: None for greedy, else a beam search (with an n-gram LM).

    lm: "auto" = the bundled LM for the bundled model decoded with a beam, else none; "none"; or an ARPA path.
    beam_size: None = 8 when there is an LM, else 1; 1 means greedy.
    """
    bundled = Path(loaded.path).resolve() == BUNDLED_MODEL.resolve()
    if lm == "auto":  # the bundled LM, unless greedy decoding was asked for (an LM needs a beam)
        wants_beam = beam_size is None or beam_size > 1
        lm = str(BUNDLED_LM) if bundled and wants_beam and BUNDLED_LM.exists() else None
    elif lm == "none":
        lm = None
    if beam_size is None:
        beam_size = DEFAULT_BEAM if lm else 1
    if beam_size < 1:
        raise ValueError(f"beam size must be at least 1, got {beam_size}")
    if beam_size == 1:
        if lm:
            raise ValueError("an LM needs beam search: pass a beam size above 1")
        return None
    if loaded.model.joint is None:
        raise ValueError("beam search is built for RNNT heads; this model has CTC only (use beam size 1)")
    defaults = BeamConfig()
    config = BeamConfig(beam_size=beam_size,
                        lm_weight=defaults.lm_weight if lm_weight is None else lm_weight,
                        length_bonus=(defaults.length_bonus if lm else 0.0) if length_bonus is None else length_bonus)
    ngram = NgramLM.from_arpa(lm, loaded.tokenizer.pieces) if lm else None
    return RnntBeamSearch(loaded.model.joint, loaded.model.decoder, config, ngram)


def describe_decoding(decoder: str, search: RnntBeamSearch | None) -> str:
    """`rnnt`, `ctc`, `rnnt beam 8` or `rnnt beam 8 + lm`: how a result was decoded."""
    if search is None or decoder != "rnnt":
        return decoder
    return f"rnnt beam {search.config.beam_size}" + (" + lm" if search.lm is not None else "")


class ConformerModel(SpeechModel):
    family = "fastconformer"

    def __init__(self, loaded: LoadedModel, search: RnntBeamSearch | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.path = loaded.path
        self.sample_rate = loaded.model.spec.mel.sample_rate
        self.device = loaded.model.device
        self.search = search  # the default rnnt decoding (None: greedy)
        self._settings = ConformerStreamer.settings_of(loaded.model)

    @property
    def beam_size(self) -> int:
        return self.search.config.beam_size if self.search is not None else 1

    def search_for(self, beam_size: int | None) -> RnntBeamSearch | None:
        """The rnnt decoding a stream asked for: the default, greedy (1) or another beam size (with
        the default's LM, if any)."""
        if beam_size is None or beam_size == self.beam_size:
            return self.search
        if beam_size == 1:
            return None
        if self.search is None:
            return make_search(self.loaded, beam_size=beam_size, lm="none")
        return RnntBeamSearch(self.model.joint, self.model.decoder, replace(self.search.config, beam_size=beam_size),
                              self.search.lm)

    def make_engine(self, *, slots=None, memory_budget=None, name=None) -> "ConformerEngine":
        return ConformerEngine(self, slots=slots, memory_budget=memory_budget, name=name or "conformer")

    def setting_for_lookahead(self, lookahead_ms: int | None) -> StreamSetting:
        if lookahead_ms is None:
            return self._settings[tuple(self.model.spec.encoder.att_context_size[0])]
        for s in self._settings.values():
            if s.lookahead_ms == lookahead_ms:
                return s
        raise UnsupportedOption(f"lookahead {lookahead_ms} ms is not offered by this model; "
                                f"choose one of {sorted(s.lookahead_ms for s in self._settings.values())}")

    def describe(self) -> dict:
        settings = sorted(self._settings.values(), key=lambda s: s.lookahead_ms)
        return {"family": self.family, "decoders": list(self.model.decoders),
                "default_decoder": self.model.default_decoder,
                "lookahead_ms": [s.lookahead_ms for s in settings],
                "chunk_ms": {str(s.lookahead_ms): s.chunk_ms for s in settings},
                "default_lookahead_ms": self.setting_for_lookahead(None).lookahead_ms,
                "default_beam_size": self.beam_size, "lm": self.search is not None and self.search.lm is not None,
                "sample_rate": self.sample_rate, "dtype": getattr(self.model, "dtype_name", "fp32"),
                "dtypes": list(DTYPES), "kv_dtype": getattr(self.model, "kv_dtype_name", "auto"),
                "kv_dtypes": list(KV_DTYPES), "options": {}}

    def with_dtype(self, dtype: str) -> "ConformerModel":
        """Casts (bf16) or quantizes (int8) this model's encoder in place (precision.py)."""
        apply_dtype(self.model, dtype)
        return self

    def with_kv_dtype(self, kv_dtype: str) -> "ConformerModel":
        """The streaming K/V and conv state in the compute dtype ("auto") or int8 (streaming.apply_kv_dtype)."""
        apply_kv_dtype(self.model, kv_dtype)
        return self


class ConformerEngine(Engine):
    def __init__(self, model: ConformerModel, *, slots=None, memory_budget=None, name="conformer"):
        self.model = model
        self.name = name
        self.streamer = ConformerStreamer(model.model, slots=slots, memory_budget=memory_budget,
                                          device=model.device, name=name)
        self.pool = self.streamer.pool
        self.device = self.streamer.device

    def open(self, request: StreamRequest) -> "ConformerStream":
        model = self.model
        if request.options:
            raise UnsupportedOption(f"this model takes no options (got {', '.join(sorted(request.options))})")
        setting = model.setting_for_lookahead(request.lookahead_ms)
        decoder = request.decoder or model.model.default_decoder
        if decoder not in model.model.decoders:
            raise UnsupportedOption(f"decoder {decoder!r} not offered; use {list(model.model.decoders)}")
        if request.beam_size not in (None, 1) and decoder != "rnnt":
            raise UnsupportedOption("beam_size above 1 needs the rnnt decoder")
        search = model.search_for(request.beam_size) if decoder == "rnnt" else None
        return ConformerStream(self, setting, decoder, request.sample_rate, search)

    def release(self, stream: "ConformerStream") -> None:
        self.streamer.close(stream.slot)

    def step(self, streams: list["ConformerStream"]) -> list[list[Token]]:
        taken = [s.chunker.take() for s in streams]
        results = self.streamer.step([s.slot for s in streams], [c for c, _ in taken], [n for _, n in taken],
                                     streams[0].setting, [s.step_decoder for s in streams])
        beams = self._advance_beams(streams, results)
        return [s.apply(r, beam) for s, r, beam in zip(streams, results, beams)]

    @staticmethod
    def _advance_beams(streams: list["ConformerStream"], results: list[StepResult]) -> list[list[Hyp] | None]:
        """Advance the beams of the streams that search alike together; the new beams by index."""
        alike: dict[tuple, list[int]] = {}
        for i, s in enumerate(streams):
            if s.search is not None:
                alike.setdefault(s.search.batch_key, []).append(i)
        beams: list[list[Hyp] | None] = [None] * len(streams)
        for members in alike.values():
            inputs = [streams[i].beam_input(results[i]) for i in members]
            advanced = streams[members[0]].search.advance_many(*(list(column) for column in zip(*inputs)))
            for i, beam in zip(members, advanced):
                beams[i] = beam
        return beams


class ConformerStream(Stream):
    def __init__(self, engine: ConformerEngine, setting: StreamSetting, decoder: str, sample_rate: int,
                 search: RnntBeamSearch | None = None):
        model = engine.model.model
        if decoder not in model.decoders:
            raise UnsupportedOption(f"decoder {decoder!r} is not available; this model has {list(model.decoders)}")
        if search is not None and decoder != "rnnt":
            raise UnsupportedOption("beam search is built for the rnnt decoder only; use beam size 1 with ctc")
        super().__init__(engine, sample_rate, model.spec.mel.sample_rate)
        self.tokenizer = engine.model.tokenizer
        self.setting = setting
        self.decoder = decoder
        self.group_key = (engine, setting.context)
        mel = model.spec.mel
        self.frame_seconds = mel.hop_length / mel.sample_rate * model.spec.encoder.subsampling_factor
        self.features = OnlineMel(model.frontend)
        self.chunker = FrameChunker(setting.plan, model.spec.mel.n_mels)
        # With beam search the model step only encodes; the search runs after it (the engine
        # advances the beams of streams that search alike together).
        self.search = search
        self._beam = search.start_fresh(engine.device) if search is not None else None
        self._shown: Label | None = None  # the last label of the beam hypothesis in `hypothesis`
        self.settings = {"decoder": decoder, "beam_size": search.config.beam_size if search is not None else 1,
                         "lm": search is not None and search.lm is not None,
                         "lookahead_ms": setting.lookahead_ms, "chunk_ms": setting.chunk_ms, "options": {}}
        self.slot: int = engine.streamer.open()

    @property
    def decoding(self) -> str:
        return describe_decoding(self.decoder, self.search)

    # -- front end ---------------------------------------------------------------------------
    def accept_model_audio(self, samples: np.ndarray) -> None:
        self.chunker.push(self.features.accept(samples))

    def finish_input(self) -> None:
        self.chunker.push(self.features.finish())
        self.chunker.finish()

    @property
    def finished(self) -> bool:
        return self.chunker.finished

    def ready(self) -> bool:
        return not self.closed and self.chunker.ready()

    def seconds_to_ready(self) -> float | None:
        if self.finished:
            return None
        missing = self.chunker.frames_needed() - self.chunker.pending
        mel = self.engine.model.model.spec.mel
        return max(0, missing) * mel.hop_length / mel.sample_rate
    @property
    def done(self) -> bool:
        return self.chunker.finished and self.chunker.pending == 0

    # -- text --------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def starts_word(self, token_id: int) -> bool:
        return self.tokenizer.starts_word(token_id)

    # -- results -----------------------------------------------------------------------------
    @property
    def step_decoder(self) -> str | None:
        """What the batched model step decodes for this stream (None: the beam search does it)."""
        return None if self.search is not None else self.decoder

    def apply(self, result: StepResult, beam: list[Hyp] | None = None) -> list[Token]:
        """Take a step's result; returns the tokens that are new in the hypothesis.

        Greedy hypotheses only grow.  The best beam hypothesis may revise its recent tokens: the
        new ones are those after the part it shares with the previous best.  `beam`: this stream's
        beam already advanced over the result's frames."""
        self.frames_done = result.frames_done
        if self.search is None:
            new = [Token(i, f) for i, f in zip(result.tokens, result.token_frames)]
            self.hypothesis.tokens.extend(new)
            return new
        if beam is None:
            beam = self.search.advance(*self.beam_input(result))
        self._beam = beam
        return self._take_best(final=self.done)

    def beam_input(self, result: StepResult) -> tuple[list[Hyp], torch.Tensor, int]:
        """What the beam search advances over for this result: (beam, encoder frames, first frame)."""
        return self._beam, result.encoded, result.frames_done - result.encoded.shape[0]

    def _take_best(self, final: bool) -> list[Token]:
        """Make the best hypothesis the shown one, touching only the labels after the part it shares
        with the previous one (walking both label chains back to their common node)."""
        best = (self.search.best_final(self._beam) if final else self.search.best(self._beam)).last
        old, new, changed = self._shown, best, []
        while (old.depth if old else 0) > (new.depth if new else 0):
            old = old.parent
        while old is not new:
            if old is not None and old.depth == new.depth:
                old = old.parent
            changed.append(new)
            new = new.parent
        del self.hypothesis.tokens[new.depth if new else 0:]
        tokens = [Token(n.token, n.frame) for n in reversed(changed)]
        self.hypothesis.tokens.extend(tokens)
        self._shown = best
        return tokens

    def settle_utterance(self) -> list[Token]:
        """With beam search, pick the utterance's final best hypothesis (the LM's end-of-sentence
        score counted); returns the tokens that changed."""
        return self._take_best(final=True) if self.search is not None else []

    def start_next_utterance(self) -> None:
        super().start_next_utterance()
        if self.search is not None:
            self._beam = self.search.commit(self._beam)
            self._shown = None


def _is_nemo(path: Path) -> bool:
    return path.suffix == ".nemo" and path.is_file()


def load_conformer(path: Path, device: torch.device, decoding: DecodingDefaults) -> ConformerModel:
    loaded = load_fastconformer(path, device)
    rows_kernel.prepare(device)
    search = make_search(loaded, beam_size=decoding.beam_size, lm=decoding.lm, lm_weight=decoding.lm_weight,
                         length_bonus=decoding.length_bonus)
    return ConformerModel(loaded, search)


FAMILY = Family("fastconformer", "a NeMo cache-aware FastConformer .nemo file", _is_nemo, load_conformer)
