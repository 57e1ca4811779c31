"""FunASR's streaming Paraformer as a chorus family (the contract in chorus/stream/contract.py).

A FunASR model directory loads into a `ParaformerModel`; its `ParaformerEngine` owns the slot pool
and the batched step (`ParaformerStreamer`); a `ParaformerAsrStream` is one stream's host side:
resampling to 16 kHz, FunASR's online front end cut into chunks as FunASR's loop cuts them, and
the tokens turned into text as FunASR does.

A stream's settings are FunASR's: `chunk_size` ([0, 10, 5] or [5, 10, 5]: 600 ms chunks with 300 ms
of look-ahead), `encoder_chunk_look_back` (0-4 chunks) and `decoder_chunk_look_back` (0-1), chosen
per stream in `StreamRequest.options`; the default is FunASR's own example, [0, 10, 5], 4, 1.
Decoding is greedy, as FunASR's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...stream.contract import (DecodingDefaults, Engine, Family, SpeechModel, Stream, StreamRequest, Token,
                                UnsupportedOption)
from .. import rows_kernel
from ..dtypes import DTYPES
from .loader import ParaformerBundle, load_funasr_dir
from .precision import apply_dtype
from .streaming import ChunkSetting, ParaformerStream, ParaformerStreamer
from .text import starts_word, tokens_to_text

CHUNK_SIZES = ((0, 10, 5), (5, 10, 5))
MAX_ENCODER_LOOK_BACK = 4
MAX_DECODER_LOOK_BACK = 1
DEFAULT_SETTING = ChunkSetting((0, 10, 5), 4, 1)
LFR_SECONDS = 0.06  # one LFR frame: 6 fbank frames of 10 ms
OPTION_NAMES = ("chunk_size", "encoder_chunk_look_back", "decoder_chunk_look_back")


def setting_from_options(options: dict, lookahead_ms: int | None = None) -> ChunkSetting:
    """A stream's ChunkSetting from its request options (FunASR's names), checked."""
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise UnsupportedOption(f"unknown option(s) {', '.join(sorted(unknown))}; this model takes "
                                f"{', '.join(OPTION_NAMES)}")
    chunk = options.get("chunk_size", list(DEFAULT_SETTING.chunk_size))
    if not isinstance(chunk, (list, tuple)) or tuple(chunk) not in CHUNK_SIZES:
        raise UnsupportedOption(f"chunk_size {chunk!r} is not offered; use one of {[list(c) for c in CHUNK_SIZES]}")
    enc = options.get("encoder_chunk_look_back", DEFAULT_SETTING.encoder_look_back)
    dec = options.get("decoder_chunk_look_back", DEFAULT_SETTING.decoder_look_back)
    for name, value, top in (("encoder_chunk_look_back", enc, MAX_ENCODER_LOOK_BACK),
                             ("decoder_chunk_look_back", dec, MAX_DECODER_LOOK_BACK)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
            raise UnsupportedOption(f"{name} {value!r} is not offered; use an integer in 0..{top}")
    setting = ChunkSetting(tuple(chunk), enc, dec)
    if lookahead_ms is not None and lookahead_ms != lookahead_of(setting):
        raise UnsupportedOption(f"lookahead {lookahead_ms} ms is not offered by this model; it looks "
                                f"{lookahead_of(setting)} ms ahead (chunk_size sets it)")
    return setting


def lookahead_of(setting: ChunkSetting) -> int:
    return round(setting.chunk_size[2] * LFR_SECONDS * 1000)


def chunk_ms_of(setting: ChunkSetting) -> int:
    return round(setting.chunk_size[1] * LFR_SECONDS * 1000)


class ParaformerModel(SpeechModel):
    family = "paraformer"

    def __init__(self, bundle: ParaformerBundle, path: str):
        self.bundle = bundle
        self.path = path
        self.sample_rate = bundle.frontend.cfg.fs
        self.device = next(bundle.model.parameters()).device
        self.tokens = bundle.tokens

    def with_dtype(self, dtype: str) -> "ParaformerModel":
        """Casts (bf16) or quantizes (int8) the model in place (precision.py); engines made after it
        keep their caches in the new dtype."""
        apply_dtype(self.bundle.model, dtype)
        return self

    def make_engine(self, *, slots=None, memory_budget=None, name=None) -> "ParaformerEngine":
        return ParaformerEngine(self, slots=slots, memory_budget=memory_budget, name=name or "paraformer")

    def describe(self) -> dict:
        return {"family": self.family, "decoders": ["paraformer"], "default_decoder": "paraformer",
                "lookahead_ms": [lookahead_of(DEFAULT_SETTING)],
                "chunk_ms": {str(lookahead_of(DEFAULT_SETTING)): chunk_ms_of(DEFAULT_SETTING)},
                "default_lookahead_ms": lookahead_of(DEFAULT_SETTING), "default_beam_size": 1, "lm": False,
                "sample_rate": self.sample_rate,
                "dtype": getattr(self.bundle.model, "dtype_name", "fp32"), "dtypes": list(DTYPES),
                "kv_dtype": "auto", "kv_dtypes": ["auto"],
                "options": {"chunk_size": [list(c) for c in CHUNK_SIZES],
                            "encoder_chunk_look_back": list(range(MAX_ENCODER_LOOK_BACK + 1)),
                            "decoder_chunk_look_back": list(range(MAX_DECODER_LOOK_BACK + 1)),
                            "default": {"chunk_size": list(DEFAULT_SETTING.chunk_size),
                                        "encoder_chunk_look_back": DEFAULT_SETTING.encoder_look_back,
                                        "decoder_chunk_look_back": DEFAULT_SETTING.decoder_look_back}}}


class ParaformerEngine(Engine):
    def __init__(self, model: ParaformerModel, *, slots=None, memory_budget=None, name="paraformer"):
        self.model = model
        self.name = name
        # The pool is sized for the largest settings a stream may pick.
        sizes = [ChunkSetting(c, MAX_ENCODER_LOOK_BACK, MAX_DECODER_LOOK_BACK) for c in CHUNK_SIZES]
        self.streamer = ParaformerStreamer(model.bundle.model, settings=sizes, slots=slots,
                                           memory_budget=memory_budget, device=model.device, name=name)
        self.pool = self.streamer.pool
        self.device = self.streamer.device

    def open(self, request: StreamRequest) -> "ParaformerAsrStream":
        if request.decoder not in (None, "paraformer"):
            raise UnsupportedOption(f"decoder {request.decoder!r} not offered; use ['paraformer']")
        if request.beam_size not in (None, 1):
            raise UnsupportedOption("this model decodes greedily (beam_size 1)")
        setting = setting_from_options(dict(request.options), request.lookahead_ms)
        return ParaformerAsrStream(self, setting, request.sample_rate)

    def release(self, stream: "ParaformerAsrStream") -> None:
        self.streamer.close(stream.slot)

    def step(self, streams: list["ParaformerAsrStream"]) -> list[list[Token]]:
        taken = [s.chunks.take() for s in streams]
        results = self.streamer.step([s.slot for s in streams], [f for f, _ in taken], [f for _, f in taken],
                                     streams[0].setting)
        out = []
        for s, r in zip(streams, results):
            new = [Token(t, f) for t, f in zip(r.tokens, r.token_frames)]
            s.hypothesis.tokens.extend(new)
            s.frames_done = r.frames_done
            s.stepped_final = s.stepped_final or r.final
            out.append(new)
        return out


class ParaformerAsrStream(Stream):
    def __init__(self, engine: ParaformerEngine, setting: ChunkSetting, sample_rate: int):
        super().__init__(engine, sample_rate, engine.model.sample_rate)
        self.setting = setting
        self.group_key = (engine, setting)
        self.frame_seconds = LFR_SECONDS
        self.chunks = ParaformerStream(engine.model.bundle.frontend, setting)
        self.tokens = engine.model.tokens
        self.stepped_final = False
        self.settings = {"decoder": "paraformer", "beam_size": 1, "lm": False,
                         "lookahead_ms": lookahead_of(setting), "chunk_ms": chunk_ms_of(setting),
                         "options": {"chunk_size": list(setting.chunk_size),
                                     "encoder_chunk_look_back": setting.encoder_look_back,
                                     "decoder_chunk_look_back": setting.decoder_look_back}}
        self.slot: int = engine.streamer.open()

    def accept_model_audio(self, samples: np.ndarray) -> None:
        if len(samples):
            self.chunks.accept(samples)

    def finish_input(self) -> None:
        self.chunks.finish()

    @property
    def finished(self) -> bool:
        return self.chunks.finished

    def ready(self) -> bool:
        return not self.closed and self.chunks.ready()

    def seconds_to_ready(self) -> float | None:
        if self.finished:
            return None
        stride = self.setting.stride_samples
        missing = (self.chunks.chunks_out + 1) * stride - self.chunks.features.samples
        return max(0, missing) / self.engine.model.sample_rate

    @property
    def done(self) -> bool:
        return self.stepped_final

    def decode(self, ids: list[int]) -> str:
        return tokens_to_text([self.tokens[i] for i in ids])

    def starts_word(self, token_id: int) -> bool:
        return True  # words() below knows the previous token

    def words(self, offset: float = 0.0) -> list[dict]:
        out, previous = [], None
        for t in self.hypothesis.tokens:
            piece = self.tokens[t.id]
            start, end = self.audio_time(t.frame), self.audio_time(t.frame + 1)
            if out and not starts_word(previous, piece):
                out[-1]["ids"].append(t.id)
                out[-1]["end"] = end
            else:
                out.append({"ids": [t.id], "start": start, "end": end})
            previous = piece
        words = []
        for w in out:
            text = self.decode(w["ids"])
            if text:
                words.append({"word": text, "start": round(offset + w["start"], 3),
                              "end": round(offset + w["end"], 3)})
        return words


def _is_funasr_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file()  # the loader names any file that is missing


def load_paraformer(path: Path, device: torch.device, decoding: DecodingDefaults) -> ParaformerModel:
    if decoding.beam_size not in (None, 1):
        raise ValueError(f"{path}: a Paraformer decodes greedily; --beam is for FastConformer RNNT heads")
    if decoding.lm not in (None, "auto", "none"):
        raise ValueError(f"{path}: a Paraformer takes no language model")
    model = ParaformerModel(load_funasr_dir(path, device), str(path))
    rows_kernel.prepare(device)
    return model


FAMILY = Family("paraformer", "a FunASR streaming Paraformer model directory (config.yaml, model.pt, tokens.json, "
                "am.mvn)", _is_funasr_dir, load_paraformer)
