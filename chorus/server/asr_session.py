"""One transcription stream on the server: a job of the scheduler (chorus/stream/scheduler.py).

The event loop only appends raw audio frames to `inbox` and forwards results; everything else
(decoding bytes, resampling, features, stepping, endpointing) happens on the inference thread,
which owns `stream`.  Results reach the loop through the `post` callback.  The session knows the
model only through the family contract: any family's stream works here.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable

import numpy as np

from ..codecs import AudioFormatError, bytes_per_sample, decode
from ..stream.contract import Stream, StreamRequest, Token, UnsupportedOption
from ..stream.endpointing import Endpointer
from ..stream.scheduler import StepFailed
from .protocol import ProtocolError, StartRequest, seconds
from .registry import ModelEntry


class AsrSession:
    def __init__(self, stream_id: str, request: StartRequest, entry: ModelEntry, post: Callable[[dict], None],
                 on_failure: Callable[["AsrSession", ProtocolError], None] = lambda s, e: None,
                 max_backlog_seconds: float = 10.0):
        self.id = stream_id
        self.request = request
        self.entry = entry
        self.stream_request = StreamRequest(request.sample_rate, request.lookahead_ms, request.decoder,
                                            request.beam_size, request.options)
        self.post = post                    # thread-safe: delivers a message to the client
        self.on_failure = on_failure        # called on the inference thread when the stream fails
        # Audio frames and flush markers, in the order the client sent them.
        self.inbox: collections.deque = collections.deque()
        self._inbox_bytes = 0
        self.received_bytes = 0             # audio bytes read from the client so far
        self._lock = threading.Lock()
        self.bytes_per_second = request.sample_rate * bytes_per_sample(request.encoding)
        self.encoded_seconds = 0.0          # audio seconds the model has encoded (set on the inference thread)
        self.max_backlog_seconds = max_backlog_seconds
        self.backlog_limit = max_backlog_seconds  # set at open, from the stream's chunk
        self.chunk_bytes = 0                # one chunk of the client's audio (set at open)
        self.settings: dict = {}            # the stream's settings in force (for `ready`)
        # -- owned by the inference thread --------------------------------------------------
        self.stream: Stream | None = None
        self.endpointer: Endpointer | None = None
        self.time_offset = 0.0        # audio seconds of earlier segments (before a `finalize`)
        self.flush: str | None = None  # "finalize" or "stop" while the stream is being flushed
        self.utterance = 0
        self.last_partial = ""
        self.closed = False
        self._on_flushed: Callable[[str], None] | None = None

    # -- loop side ---------------------------------------------------------------------------
    def push_audio(self, frame: bytes) -> None:
        with self._lock:
            self.inbox.append(frame)
            self._inbox_bytes += len(frame)
            self.received_bytes += len(frame)

    def push_flush(self, kind: str, on_flushed: Callable[[str], None]) -> None:
        """`finalize` or `stop`, ordered after the audio sent before it."""
        with self._lock:
            self.inbox.append((kind, on_flushed))

    @property
    def buffered_seconds(self) -> float:
        """Audio received but not yet taken by the stream's front end."""
        return self._inbox_bytes / self.bytes_per_second

    @property
    def backlog_seconds(self) -> float:
        """Audio received but not yet encoded: what the server holds for this stream (the inbox,
        the front end's and chunker's buffers).  The connection stops reading above its bound."""
        return max(0.0, self.received_bytes / self.bytes_per_second - self.encoded_seconds)

    # -- inference thread --------------------------------------------------------------------
    def open(self) -> None:
        """Take a slot (raises PoolExhausted) and set up the stream (raises ProtocolError for
        options the model does not offer)."""
        try:
            self.stream = self.entry.engine.open(self.stream_request)
        except UnsupportedOption as exc:
            raise ProtocolError("unsupported_option", str(exc)) from None
        self.settings = self.stream.settings
        # What the connection lets the stream hold unencoded: at least two whole chunks, or a small
        # bound would leave the stream unable to make its next step.
        self.backlog_limit = max(self.max_backlog_seconds, 2 * self.settings["chunk_ms"] / 1000 + 0.25)
        self.chunk_bytes = int(self.settings["chunk_ms"] / 1000 * self.bytes_per_second)
        self.endpointer = Endpointer(self.request.endpointing, self.stream.frame_seconds * 1000)

    # -- the scheduler's job -----------------------------------------------------------------
    def feed(self) -> float:
        return self.pull_audio() / self.bytes_per_second

    def on_result(self, tokens: list[Token]) -> None:
        self.after_step(tokens)
        self.finish_flush_if_done()

    def after_round(self) -> None:
        if self.flush is not None and self.stream is not None and not self.stream.ready():
            self.finish_flush_if_done()  # a flushed stream with nothing left to encode

    def fail(self, error: Exception) -> None:
        self.close()
        if isinstance(error, StepFailed):
            error = ProtocolError("internal", str(error))
        elif not isinstance(error, ProtocolError):  # the type only: no server internals to the client
            error = ProtocolError("internal", f"result handling failed: {type(error).__name__}")
        self.on_failure(self, error)

    def pull_audio(self) -> int:
        """Decode and feed the inbox until the next chunk is ready (or up to a flush marker);
        returns the audio bytes taken.  Taking no more than the next chunk needs keeps a client
        that sends faster than real time from costing the inference thread more than one
        chunk's front-end work per round; the rest waits in the inbox, which the connection
        bounds by no longer reading (TCP backpressure).  The frames taken are decoded, resampled
        and turned into features together (up to a chunk's worth at a time), not frame by frame:
        the results are the same however the audio is cut, and the per-call cost is paid once."""
        taken = 0
        while self.inbox and self.stream is not None and self.flush is None and not self.stream.ready():
            frames, marker = self._take_frames(max(self.chunk_bytes, 1))
            if frames:
                self._accept(frames)
                taken += sum(map(len, frames))
            if marker is not None:
                self._start_flush(*marker)
                break
        return taken

    def _take_frames(self, budget: int) -> tuple[list[bytes], tuple | None]:
        """Audio frames from the inbox up to `budget` bytes, and the flush marker that ends them, if any."""
        frames, size = [], 0
        with self._lock:
            while self.inbox and size < budget:
                item = self.inbox.popleft()
                if not isinstance(item, bytes):
                    return frames, item
                frames.append(item)
                size += len(item)
                self._inbox_bytes -= len(item)
        return frames, None

    def _accept(self, frames: list[bytes]) -> None:
        width = bytes_per_sample(self.request.encoding)
        for frame in frames:  # each frame must hold whole samples, even where two halves would join
            if len(frame) % width:
                raise ProtocolError("bad_audio", f"{self.request.encoding} frame of {len(frame)} bytes is not a "
                                                 f"whole number of {width}-byte samples")
        try:
            samples = decode(b"".join(frames), self.request.encoding)
        except AudioFormatError as exc:
            raise ProtocolError("bad_audio", str(exc)) from None
        if self.request.endpointing.energy_threshold_db is not None:
            start = 0
            for frame in frames:  # the energy rule looks at each frame as the client cut it
                end = start + len(frame) // width
                self._note_energy(samples[start:end], self.stream.samples_in + end)
                start = end
        self.stream.accept_audio(samples)

    def _note_energy(self, samples: np.ndarray, end_sample: int) -> None:
        threshold = self.request.endpointing.energy_threshold_db
        if threshold is None or not len(samples):
            return
        rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)) + 1e-12)
        if 20 * np.log10(rms) > threshold:
            end_s = end_sample / self.request.sample_rate
            self.endpointer.note_energy(int(end_s / self.stream.frame_seconds), True)

    def _start_flush(self, kind: str, on_flushed: Callable[[str], None]) -> None:
        """No more audio for this segment: encode what is buffered, then `finish_flush_if_done`."""
        self.flush = kind
        self._on_flushed = on_flushed
        self.stream.finish()

    def after_step(self, new_tokens: list[Token]) -> None:
        stream, ep = self.stream, self.endpointer
        self.encoded_seconds = self.time_offset + stream.audio_time(stream.frames_done)
        for t in new_tokens:
            ep.note_token(t.frame)
        if ep.should_end(stream.frames_done):
            self._emit_final("endpoint")
            return
        if self.request.interim_results and new_tokens:
            text = self._text()
            if text != self.last_partial:
                self.last_partial = text
                self.post(self._result("partial", text))

    def finish_flush_if_done(self) -> bool:
        """After the flushed audio is encoded: final result, then reset (finalize) or close (stop)."""
        if self.flush is None or not self.stream.done:
            return False
        kind, self.flush = self.flush, None
        self._emit_final(kind, always=True)
        self.time_offset += self.stream.audio_seconds
        self.encoded_seconds = self.time_offset
        self.stream.close()
        self.stream = None
        if kind == "finalize":  # the connection goes on with a fresh model state
            self.open()
        self._on_flushed(kind)
        return True

    def close(self) -> None:
        """Return the slot (idempotent)."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.closed = True

    # -- results -----------------------------------------------------------------------------
    def _text(self) -> str:
        return self.stream.text.strip()

    def _emit_final(self, reason: str, always: bool = False) -> None:
        self.stream.settle_utterance()
        text = self._text()
        if text or always:
            self.post(self._result("final", text, reason))
            self.utterance += 1
        self.stream.start_next_utterance()  # bounded memory: an utterance's tokens go with its final
        self.endpointer.start_next(self.stream.frames_done)
        self.last_partial = ""

    def _result(self, kind: str, text: str, reason: str | None = None) -> dict:
        stream = self.stream
        start = self.time_offset + stream.audio_time(self.endpointer.utterance_start)
        end = self.time_offset + stream.audio_time(stream.frames_done)
        msg = {"type": kind, "utterance": self.utterance, "text": text,
               "start": seconds(start), "end": seconds(end)}
        if reason:
            msg["reason"] = reason
        if self.request.word_times:
            msg["words"] = stream.words(self.time_offset)
        return msg
