"""One `/tts` stream on the server: a job of the scheduler (chorus/stream/scheduler.py), like `AsrSession`.

The event loop only appends the client's messages to `inbox` (text pieces, flush and stop markers) and sends
what the inference thread posts; everything else (segmenting, synthesis, resampling, encoding) happens on the
inference thread, which owns `stream`.  The session knows the voice only through the TTS contract
(chorus/stream/tts_contract.py).

`cancel` acts at once on the loop side: queued text is dropped from the inbox, audio not yet sent is dropped from
the outbox (by epoch: every audio message carries the cancel epoch it was made in), and a marker tells the
inference thread to drop the stream's pending text and segments; a step already running finishes, but its
audio carries the old epoch and is not sent.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable

from ..codecs import bytes_per_sample, encode
from ..stream.scheduler import StepFailed
from ..stream.tts_contract import (AudioChunk, BadTokens, SpeechRequest, TtsStream, UnsupportedInput,
                                   UnsupportedOption, UnsupportedText)
from .protocol import ProtocolError, seconds
from .registry import ModelEntry
from .tts_protocol import TtsStart


class TtsSession:
    def __init__(self, stream_id: str, request: TtsStart, entry: ModelEntry, post: Callable[[dict], None],
                 on_failure: Callable[["TtsSession", ProtocolError], None] = lambda s, e: None,
                 unsent_bytes: Callable[[], int] = lambda: 0, max_unsent_seconds: float = 10.0):
        self.id = stream_id
        self.request = request
        self.entry = entry
        self.speech_request = SpeechRequest(request.sample_rate, request.speed, request.speaker, request.seed,
                                            request.options, request.max_wait_ms / 1000)
        self.post = post                    # thread-safe: delivers a message to the client
        self.on_failure = on_failure
        self.unsent_bytes = unsent_bytes    # audio bytes posted and not yet sent to the client (the outbox)
        self.inbox: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self.inbox_chars = 0
        self.epoch = 0                      # cancels so far (loop side)
        self.settings: dict = {}
        self.sample_rate = 0                # output rate (set at open)
        self.max_unsent_bytes = 1 << 20
        self.max_unsent_seconds = max_unsent_seconds
        self.busy = False                   # text or audio on its way (the idle timeout waits)
        # -- owned by the inference thread --------------------------------------------------
        self.stream: TtsStream | None = None
        self._epoch = 0                     # the last cancel the inference thread has applied
        self._flushes: collections.deque[int] = collections.deque()  # segments each flush waits for
        self._dropped = 0                   # segments dropped by cancels
        self._stop: tuple[str, Callable[[str], None]] | None = None
        self.closed = False

    # -- loop side ---------------------------------------------------------------------------
    def push_text(self, text: str, flush: bool = False) -> None:
        with self._lock:
            self.inbox.append(text)
            self.inbox_chars += len(text)
            if flush:
                self.inbox.append(("flush",))
            self.busy = True

    def push_tokens(self, tokens: list[int], flush: bool = False) -> None:
        """Speech tokens for a token-to-wave voice (checked by the stream on the inference thread)."""
        with self._lock:
            self.inbox.append(("tokens", tokens))
            self.inbox_chars += len(tokens)
            if flush:
                self.inbox.append(("flush",))
            self.busy = True

    def push_flush(self) -> None:
        with self._lock:
            self.inbox.append(("flush",))
            self.busy = True

    def push_stop(self, reason: str, on_done: Callable[[str], None]) -> None:
        with self._lock:
            self.inbox.append(("stop", reason, on_done))
            self.busy = True

    def cancel(self) -> int:
        """Drop the queued text at once (the inference thread drops the stream's); returns the new epoch."""
        with self._lock:
            self.epoch += 1
            self.inbox = collections.deque(item for item in self.inbox if isinstance(item, tuple)
                                           and item[0] == "stop")
            self.inbox.appendleft(("cancel", self.epoch, self.inbox_chars))  # offsets count the dropped text
            self.inbox_chars = 0
        return self.epoch

    @property
    def queued_chars(self) -> int:
        """Text received and not yet spoken (read on the loop: an estimate, for the limit)."""
        stream = self.stream
        return self.inbox_chars + (stream.pending_chars if stream is not None else 0)

    # -- inference thread --------------------------------------------------------------------
    def open(self) -> None:
        try:
            self.stream = self.entry.engine.open(self.speech_request)
        except UnsupportedOption as exc:
            raise ProtocolError("unsupported_option", str(exc)) from None
        self.sample_rate = self.stream.sample_rate
        self.settings = self.stream.settings
        self.max_unsent_bytes = max(1 << 20, int(self.max_unsent_seconds * self.sample_rate
                                                 * bytes_per_sample(self.request.encoding)))

    def feed(self) -> float:
        stream = self.stream
        if stream is None:
            return 0.0
        while True:
            with self._lock:
                if not self.inbox:
                    break
                item = self.inbox.popleft()
                if isinstance(item, str):
                    self.inbox_chars -= len(item)
            if isinstance(item, str):
                try:
                    stream.push_text(item)
                except UnsupportedText as exc:
                    raise ProtocolError("unsupported_text", str(exc)) from None
                except UnsupportedInput as exc:
                    raise ProtocolError("unsupported_input", str(exc)) from None
            elif item[0] == "tokens":
                with self._lock:
                    self.inbox_chars -= len(item[1])
                try:
                    stream.push_tokens(item[1])
                except UnsupportedInput as exc:
                    raise ProtocolError("unsupported_input", str(exc)) from None
                except BadTokens as exc:
                    raise ProtocolError("bad_tokens", str(exc)) from None
            elif item[0] == "flush":
                stream.flush()
                self._flushes.append(stream.segments_made)
            elif item[0] == "cancel":
                dropped = stream.cancel(item[2])
                self._dropped += dropped
                self._flushes.clear()
                self._epoch = item[1]
                self.post({"type": "cancelled", "segments_dropped": dropped, "_epoch": item[1]})
            else:  # stop: the rest is spoken, then `done`
                stream.finish()
                self._stop = (item[1], item[2])
        stream.tick()
        stream.paused = self.unsent_bytes() > self.max_unsent_bytes  # a slow reader: synthesize no further ahead
        return 0.0

    def on_result(self, chunk: AudioChunk) -> None:
        stream, mark = self.stream, chunk.mark
        data = encode(chunk.audio, self.request.encoding)
        start = (stream.samples_out - len(chunk.audio)) / self.sample_rate
        self.post({"type": "audio", "segment": mark.segment, "text": mark.text, "chars": [mark.start, mark.end],
                   "samples": len(chunk.audio), "bytes": len(data), "start": seconds(start),
                   "duration": seconds(len(chunk.audio) / self.sample_rate), "_binary": data, "_epoch": self._epoch})
        self._settle()

    def after_round(self) -> None:
        if self.stream is not None and not self.stream.ready():
            self._settle()

    def _settle(self) -> None:
        stream = self.stream
        settled = stream.segments_done + self._dropped
        while self._flushes and settled >= self._flushes[0]:
            self._flushes.popleft()
            self.post({"type": "flushed", "segments": settled})
        if self._stop is not None and stream.done:
            reason, on_done = self._stop
            self._stop = None
            self.post({"type": "done", "reason": reason, "segments": stream.segments_done,
                       "seconds": seconds(stream.samples_out / self.sample_rate)})
            on_done(reason)
        with self._lock:
            self.busy = bool(self.inbox) or not stream.idle

    def fail(self, error: Exception) -> None:
        self.close()
        if isinstance(error, StepFailed):
            error = ProtocolError("internal", str(error))
        elif not isinstance(error, ProtocolError):
            error = ProtocolError("internal", f"synthesis failed: {type(error).__name__}")
        self.on_failure(self, error)

    def close(self) -> None:
        """Return the slot (idempotent)."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.closed = True
