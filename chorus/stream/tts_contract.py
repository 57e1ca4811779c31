"""The TTS family contract: what a speech-synthesis family provides, and all the rest of chorus knows of it.

The text-to-speech twin of `contract.py`.  A TTS family is a folder (`tts/piper/`, ...) that provides:
  * a `VoiceFamily` entry: its name, how to recognise its voice format, and its loader (`tts/families.py`
    lists them);
  * a `Voice` (the loaded voice): `describe()` for `/models` (family, sample rate, speakers, options such as
    speed or a flow-matching family's ODE steps, with their allowed values and defaults) and
    `make_engine(slots=...)`;
  * a `TtsEngine`: the voice's runtime.  It owns a `SlotPool` of the shared state runtime (`chorus.cache`):
    a family with per-stream state keeps it there; a family without any (Piper: every sentence is synthesized
    from scratch) still takes one empty slot per stream, so that admission control (`overloaded`) and the
    slot accounting are those of ASR.  `open(SpeechRequest)` -> a `TtsStream`, `release(stream)`, and
    `step(streams)`: each stream's next audio chunk (`AudioChunk`, with the `Mark` saying which text it
    speaks), by index, for streams that share a group key, batched where the family can;
  * a `TtsStream`: one stream's host side.  Text comes in pieces (`push_text`, as an LLM streams it); the base
    class cuts it into segments (sentences, by the family's `sentence_ends`), holding an unfinished sentence
    until its end is decided by the text after it, a `flush`, or a bounded wait (`tick`); `ready()` when a
    segment waits to be synthesized; `done` once `finish`ed and everything is synthesized.  Output audio is
    resampled to the rate the client asked for (`chorus.codecs.StreamingResampler`, per segment).

The scheduler (`chorus.stream.scheduler`) steps TTS streams exactly like ASR streams (`ready`, `group_key`,
`engine.step`, results by index); the server's `/tts` sessions are its jobs.
"""
from __future__ import annotations

import collections
import re
import time
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Mapping

import numpy as np

from ..cache import SlotPool
from ..codecs.resample import StreamingResampler
from .contract import UnsupportedOption


class UnsupportedText(ValueError):
    """Text the voice cannot speak (control characters, unassigned code points, symbols it has no phoneme
    for): the protocol's `unsupported_text`."""


class UnsupportedInput(ValueError):
    """Input of a kind the voice does not take: text for a token-to-wave voice (CosyVoice 2), speech tokens for
    a text voice (the protocol's `unsupported_input`)."""


class BadTokens(ValueError):
    """Speech tokens a token-to-wave voice cannot use: out of its vocabulary, or more than it can hold (the
    protocol's `bad_tokens`)."""


@dataclass(frozen=True)
class SpeechRequest:
    """What a client (or the command line) asks of one TTS stream; the family checks it at `open`."""

    sample_rate: int | None = None        # output rate; None: the voice's own
    speed: float = 1.0                    # speaking rate (1.0: the voice's)
    speaker: int | str | None = None      # a multi-speaker voice's speaker (name or number)
    seed: int | None = None               # for families whose sampling can be seeded
    options: Mapping = field(default_factory=dict)  # family-specific settings (see `Voice.describe`)
    max_wait: float = 1.0                 # seconds an unfinished sentence waits for more text


@dataclass(frozen=True)
class Mark:
    """Which text an audio chunk speaks: segment number, its text (stripped), and its span in the stream's text
    (character offsets into everything `push_text` received, cancelled text included)."""

    segment: int
    text: str
    start: int
    end: int
    raw: str = field(default="", compare=False, repr=False)  # the text as received, with its trailing whitespace
                                                              # (a blank line after a sentence changes how it
                                                              # ends): what the family speaks


@dataclass
class AudioChunk:
    audio: np.ndarray  # float32 mono at the stream's output rate
    mark: Mark
    last: bool = True  # the last chunk of its segment


@dataclass
class _Segment:
    mark: Mark
    queued_at: float


_DEFAULT_END = re.compile(r"[.!?\u3002\uff01\uff1f]+[\"')\]]*\s+(?=\S)")


class TtsStream(ABC):
    """One TTS stream's host side: text in (pieces), segments out, audio resampled to the client's rate."""

    engine: "TtsEngine"
    group_key: Hashable   # streams with equal keys may share a step (the engine is part of it)
    settings: dict        # the settings in force, as the protocol's `ready` reports them

    def __init__(self, engine: "TtsEngine", model_rate: int, request: SpeechRequest):
        self.engine = engine
        self.model_rate = model_rate
        self.sample_rate = request.sample_rate or model_rate
        self.max_wait = request.max_wait
        self.paused = False              # set by the consumer (a slow reader): not ready while paused
        self._pending = ""               # text of the unfinished sentence
        self._pending_start = 0          # its offset in the stream's text
        self._last_text = 0.0            # when text last arrived (monotonic)
        self._segments: collections.deque[_Segment] = collections.deque()
        self.chars_in = 0                # characters received
        self.segments_made = 0
        self.segments_done = 0
        self.samples_out = 0             # output samples produced
        self._finished = False
        self._closed = False

    # -- text in ----------------------------------------------------------------------------
    def push_text(self, text: str, now: float | None = None) -> None:
        """More text (any piece of it); raises `UnsupportedText` for what the voice cannot speak."""
        if self._finished:
            raise RuntimeError("text after the end of the stream")
        self.check_text(text)
        self._pending += text
        self.chars_in += len(text)
        self._last_text = time.monotonic() if now is None else now
        self._cut(final=False)

    def push_tokens(self, tokens: list[int]) -> None:
        """Speech tokens, for a token-to-wave family (CosyVoice 2 overrides this); a text voice refuses them."""
        raise UnsupportedInput("this voice speaks text; it takes no speech tokens")

    def flush(self) -> None:
        """Speak what is pending now, unfinished sentence included."""
        self._cut(final=True)

    def finish(self) -> None:
        """No more text: flush, then `done` once everything is synthesized."""
        self.flush()
        self._finished = True

    def cancel(self, skipped_chars: int = 0) -> int:
        """Drop pending text and unsynthesized segments at once; returns how many segments were dropped.
        Offsets and segment numbers go on counting (`skipped_chars`: text the consumer dropped before it got
        here, which offsets count too)."""
        dropped = len(self._segments)
        self._segments.clear()
        self.chars_in += skipped_chars
        self._pending_start += len(self._pending) + skipped_chars
        self._pending = ""
        return dropped

    def tick(self, now: float | None = None) -> None:
        """The bounded wait: an unfinished sentence with no new text for `max_wait` seconds is spoken."""
        now = time.monotonic() if now is None else now
        if self._pending.strip() and now - self._last_text >= self.max_wait:
            self._cut(final=True)

    def _cut(self, final: bool) -> None:
        ends = [len(self._pending)] if final else self.sentence_ends(self._pending)
        start = 0
        for end in ends:
            piece = self._pending[start:end]
            if piece.strip():
                lead = len(piece) - len(piece.lstrip())
                text = piece.strip()
                offset = self._pending_start + start + lead
                self._segments.append(_Segment(Mark(self.segments_made, text, offset, offset + len(text), piece),
                                               time.monotonic()))
                self.segments_made += 1
            start = end
        self._pending = self._pending[start:]
        self._pending_start += start

    def sentence_ends(self, text: str) -> list[int]:
        """Where the sentences of `text` that are surely complete end (the start of the text after each, past
        its whitespace), in order; the family's override follows its own sentence rules.  The default: sentence
        punctuation followed by whitespace and more text."""
        return [m.end() for m in _DEFAULT_END.finditer(text)]

    def check_text(self, text: str) -> None:
        """Refuse characters no voice can speak: control characters other than tab and newlines, surrogates,
        private-use and unassigned code points.  A family adds its own rules."""
        for ch in text:
            cat = unicodedata.category(ch)
            if (cat == "Cc" and ch not in "\t\n\r") or cat in ("Cs", "Co", "Cn"):
                raise UnsupportedText(f"character U+{ord(ch):04X} ({cat}) cannot be spoken")

    # -- the scheduler's view ---------------------------------------------------------------
    def ready(self) -> bool:
        return bool(self._segments) and not self.paused and not self._closed

    def seconds_to_ready(self) -> float | None:
        return None

    @property
    def pending_chars(self) -> int:
        """Text received and not yet synthesized (the unfinished sentence and queued segments)."""
        return len(self._pending) + sum(len(s.mark.text) for s in self._segments)

    @property
    def idle(self) -> bool:
        """Nothing pending or queued."""
        return not self._segments and not self._pending.strip()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def done(self) -> bool:
        return self._finished and not self._segments

    def next_segment(self) -> Mark:
        """For the engine's step: the next segment to synthesize."""
        return self._segments.popleft().mark

    def output(self, audio: np.ndarray, mark: Mark) -> AudioChunk:
        """For the engine's step: a segment's audio at the model's rate -> the chunk at the output rate."""
        audio = np.asarray(audio, dtype=np.float32)
        if self.sample_rate != self.model_rate:
            rs = StreamingResampler(self.model_rate, self.sample_rate)
            audio = np.concatenate([rs.process(audio), rs.flush()])
        self.segments_done += 1
        self.samples_out += len(audio)
        return AudioChunk(audio, mark)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Give the slot back; safe to call more than once."""
        if not self._closed:
            self._closed = True
            self.engine.release(self)

    @property
    def closed(self) -> bool:
        return self._closed


class TtsEngine(ABC):
    """One voice's runtime: its slot pool and its batched step (only the inference thread calls it)."""

    name: str
    pool: SlotPool

    @abstractmethod
    def open(self, request: SpeechRequest) -> TtsStream:
        """A new stream with its own slot.  Raises `UnsupportedOption` for options the voice does not offer,
        `chorus.cache.PoolExhausted` when no slot is free."""

    @abstractmethod
    def release(self, stream: TtsStream) -> None:
        """Return the stream's slot (called once, by `TtsStream.close`)."""

    @abstractmethod
    def step(self, streams: list[TtsStream]) -> list[AudioChunk]:
        """Synthesize the next segment of each stream (all ready, sharing one group key), as one batch where the
        family can; returns each stream's chunk, by index."""


class Voice(ABC):
    """A loaded voice of a TTS family."""

    family: str
    path: str
    sample_rate: int

    @abstractmethod
    def make_engine(self, *, slots: int | None = None, memory_budget: int | None = None,
                    name: str | None = None) -> TtsEngine:
        """The voice's runtime with a slot pool of `slots` streams."""

    @abstractmethod
    def describe(self) -> dict:
        """What `/models` shows: the family, the voice, its sample rate and the options a stream may choose."""

    @abstractmethod
    def synthesize(self, text: str, request: SpeechRequest = SpeechRequest()) -> list[np.ndarray]:
        """Offline: the audio of each segment the stream would make of `text` sent whole and flushed, at the
        voice's rate (what a stream's chunks equal, before resampling)."""


@dataclass(frozen=True)
class VoiceFamily:
    """An entry of the TTS loader table."""

    name: str
    formats: str                        # what a user passes, for error messages
    detect: Callable[[Path], bool]      # cheap: file name, layout
    load: Callable[[Path], Voice]


__all__ = ["AudioChunk", "BadTokens", "Mark", "SpeechRequest", "UnsupportedInput", "TtsEngine", "TtsStream", "UnsupportedOption",
           "UnsupportedText", "Voice", "VoiceFamily"]
