"""The family contract: what a streaming model family provides, and all the rest of chorus knows of it.

A family is a folder (`asr/conformer/`, `asr/paraformer/`, ...) that provides:
  * a `Family` entry: its name, how to recognise its checkpoint format, and its loader;
  * a `SpeechModel` (the loaded checkpoint): it describes its options and makes an `Engine`;
  * an `Engine`: the model's slot pool in the shared state runtime (`chorus.cache`), which opens
    streams (one slot each, taken at open and given back once at close) and advances a batch of
    streams that share a group key by one chunk each, reading and writing their slots in place;
  * a `Stream`: one stream's host side, its front end (resampling, features, chunking), its group
    key and its hypothesis (committed tokens with frame times, which the family turns into text).
Each family also has an offline forward over a whole utterance with the streaming mask, which its
tests compare the streamed outputs with (law 1), and tests that streams stepped together equal
each stream alone (law 2); see docs/architecture.md.

The scheduler (`chorus.stream.scheduler`), the server, `chorus transcribe` and `chorus eval` use
only what is here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Mapping

import numpy as np
import torch

from ..cache import SlotPool
from ..codecs.resample import StreamingResampler


class UnsupportedOption(ValueError):
    """A stream option the model does not offer (the protocol's `unsupported_option`)."""


@dataclass
class Token:
    id: int
    frame: int  # the stream's frame (in `Stream.frame_seconds` units) where the token was emitted


@dataclass
class Hypothesis:
    tokens: list[Token] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]


@dataclass(frozen=True)
class StreamRequest:
    """What a client (or the command line) asks of one stream; the family checks it at `open`."""

    sample_rate: int = 16000
    lookahead_ms: int | None = None   # None: the model's default
    decoder: str | None = None        # None: the model's default
    beam_size: int | None = None      # None: the model's default decoding
    options: Mapping = field(default_factory=dict)  # family-specific settings (e.g. Paraformer's chunk_size)


@dataclass(frozen=True)
class DecodingDefaults:
    """Decoding a model gets unless a stream asks otherwise (`--beam`, `--lm`, ... on the command line).
    A family that has no such decoding refuses what it cannot do with a ValueError."""

    beam_size: int | None = None
    lm: str | None = "auto"
    lm_weight: float | None = None
    length_bonus: float | None = None


class Stream(ABC):
    """One stream's host side: audio in at the client's rate, a hypothesis out.

    The family's subclass owns the front end and the chunking; this base keeps what every family
    shares: resampling to the model's rate, the sample count, the hypothesis and its word times.
    """

    engine: "Engine"
    group_key: Hashable       # streams with equal keys may share a step (the engine is part of it)
    frame_seconds: float      # seconds per frame of `Token.frame` and `frames_done`
    settings: dict            # the settings in force, as the protocol's `ready` reports them

    def __init__(self, engine: "Engine", sample_rate: int, model_rate: int):
        self.engine = engine
        self.sample_rate = sample_rate
        self.resampler = StreamingResampler(sample_rate, model_rate)
        self.samples_in = 0
        self.frames_done = 0
        self.hypothesis = Hypothesis()
        self._closed = False

    # -- input -----------------------------------------------------------------------------
    def accept_audio(self, samples: np.ndarray) -> None:
        """Audio at the stream's sample rate, float32 mono."""
        if self.finished:
            raise RuntimeError("audio after the end of the stream")
        self.samples_in += len(samples)
        self.accept_model_audio(self.resampler.process(samples))

    def finish(self) -> None:
        """No more audio: flush the resampler and the front end."""
        if not self.finished:
            self.accept_model_audio(self.resampler.flush())
            self.finish_input()

    @abstractmethod
    def accept_model_audio(self, samples: np.ndarray) -> None:
        """Audio at the model's rate into the front end."""

    @abstractmethod
    def finish_input(self) -> None:
        """The front end's end of stream."""

    @property
    @abstractmethod
    def finished(self) -> bool:
        """`finish` was called."""

    @abstractmethod
    def ready(self) -> bool:
        """A chunk is ready for the next step."""

    def seconds_to_ready(self) -> float | None:
        """Seconds of audio (at the model's rate) the stream still needs before its next chunk is
        ready; None when unknown.  The scheduler uses it to decide whether a batch is worth waiting for."""
        return None

    @property
    @abstractmethod
    def done(self) -> bool:
        """All audio received and encoded."""

    # -- text ------------------------------------------------------------------------------
    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Token ids to text."""

    @abstractmethod
    def starts_word(self, token_id: int) -> bool:
        """Whether a token begins a new word (for word times)."""

    @property
    def text(self) -> str:
        return self.decode(self.hypothesis.ids)

    @property
    def decoding(self) -> str:
        """How results are decoded, for reports (`rnnt beam 8 + lm`, `ctc`, ...)."""
        return str(self.settings.get("decoder", ""))

    def settle_utterance(self) -> list[Token]:
        """An utterance ends here (endpoint, finalize): settle its hypothesis; returns the tokens
        that changed (a family with a revisable hypothesis, such as beam search, overrides it)."""
        return []

    def start_next_utterance(self) -> None:
        """Drop the finished utterance's tokens (bounded memory); the model state goes on."""
        self.hypothesis.tokens.clear()

    def words(self, offset: float = 0.0) -> list[dict]:
        """Words of the hypothesis with start/end seconds (from their tokens' frames)."""
        groups: list[dict] = []
        for t in self.hypothesis.tokens:
            if not groups or self.starts_word(t.id):
                groups.append({"ids": [], "start": t.frame})
            groups[-1]["ids"].append(t.id)
            groups[-1]["end"] = t.frame + 1
        out = []
        for g in groups:
            text = self.decode(g["ids"]).strip()
            if text:
                start, end = (self.audio_time(g[k]) for k in ("start", "end"))
                out.append({"word": text, "start": round(offset + start, 3), "end": round(offset + end, 3)})
        return out

    # -- time ------------------------------------------------------------------------------
    @property
    def audio_seconds(self) -> float:
        return self.samples_in / self.sample_rate

    def audio_time(self, frame: int) -> float:
        """Seconds at a frame boundary, never past the audio received (the last frames of a
        stream may cover the front end's padding)."""
        return min(frame * self.frame_seconds, self.audio_seconds)

    @property
    def seconds_decoded(self) -> float:
        return self.frames_done * self.frame_seconds

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Give the slot back; safe to call more than once."""
        if not self._closed:
            self._closed = True
            self.engine.release(self)

    @property
    def closed(self) -> bool:
        return self._closed


class Engine(ABC):
    """One model's runtime: its slot pool and its batched step (only the inference thread calls it)."""

    name: str
    pool: SlotPool
    device: torch.device

    @abstractmethod
    def open(self, request: StreamRequest) -> Stream:
        """A new stream with its own slot.  Raises `UnsupportedOption` for options the model does
        not offer, `chorus.cache.PoolExhausted` when no slot is free."""

    @abstractmethod
    def release(self, stream: Stream) -> None:
        """Return the stream's slot (called once, by `Stream.close`)."""

    @abstractmethod
    def step(self, streams: list[Stream]) -> list[list[Token]]:
        """Advance streams that share one group key and are ready by one chunk each, as one batch;
        returns each stream's new hypothesis tokens, by index."""


class SpeechModel(ABC):
    """A loaded checkpoint of a family."""

    family: str
    path: str
    sample_rate: int
    device: torch.device

    @abstractmethod
    def make_engine(self, *, slots: int | None = None, memory_budget: int | None = None,
                    name: str | None = None) -> Engine:
        """The model's runtime with a slot pool of `slots` streams (or as many as fit the budget)."""

    @abstractmethod
    def describe(self) -> dict:
        """What `/models` shows: the family and the options a stream may choose."""

    def default_lookahead_ms(self) -> int | None:
        return self.describe().get("default_lookahead_ms")

    def with_dtype(self, dtype: str) -> "SpeechModel":
        """This model computing in `dtype` ("fp32", "bf16", "int8": `--dtype`).  A family that offers
        more than fp32 overrides this; the others refuse."""
        if dtype != "fp32":
            raise ValueError(f"--dtype {dtype}: the {self.family} family computes in fp32 only")
        return self

    def with_kv_dtype(self, kv_dtype: str) -> "SpeechModel":
        """This model keeping its K/V state in `kv_dtype` ("auto": the compute dtype; "int8": `--kv-dtype`).
        A family that offers int8 state overrides this; the others refuse."""
        if kv_dtype != "auto":
            raise ValueError(f"--kv-dtype {kv_dtype}: the {self.family} family keeps its state in its compute dtype")
        return self


@dataclass(frozen=True)
class Family:
    """An entry of the loader table: how to recognise a checkpoint of this family and load it."""

    name: str
    formats: str                                  # what a user passes, for error messages
    detect: Callable[[Path], bool]                # cheap: file name, directory layout
    load: Callable[[Path, torch.device, DecodingDefaults], SpeechModel]
