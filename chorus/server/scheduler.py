"""The inference thread: collects streams with a whole chunk ready and steps them as one batch.

Connections talk to it only through `submit` (a callable run on this thread).  Each round it
feeds newly arrived audio into the streams (each takes only what its next chunk needs, so a client
that sends faster than real time costs one chunk's work per round, like any other stream), waits a
bounded time for more streams of the same model and setting to become ready, steps each group (at
most `max_batch` streams at once, one chunk per stream), and hands results back through the
sessions' `post` callbacks.  Model compute never touches the event loop, and only this thread
touches stream state and the pools.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from ..asr.streams import step_streams
from .asr_session import AsrSession
from .metrics import ServerMetrics
from .protocol import ProtocolError

log = logging.getLogger("chorus.scheduler")


class Scheduler:
    def __init__(self, metrics: ServerMetrics, *, batch_wait_ms: float = 10.0, max_batch: int = 64,
                 on_failure: Callable[[AsrSession, ProtocolError], None] | None = None):
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_batch = max_batch
        self.sessions: set[AsrSession] = set()
        self.on_failure = on_failure or (lambda s, e: None)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="chorus-inference", daemon=True)
        self.metrics = metrics

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the inference thread (ordered with the other submissions)."""
        self._commands.put(fn)
        self._wake.set()

    def notify(self) -> None:
        """New audio arrived."""
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(timeout=0.05)
            self._wake.clear()
            self._drain_commands()
            self._feed()
            ready = [s for s in self.sessions if s.stream is not None and s.stream.ready()]
            if ready:
                if self.batch_wait and len(ready) < self._active():
                    time.sleep(self.batch_wait)  # bounded wait for the rest of the batch
                    self._drain_commands()
                    self._feed()
                self._step_ready()
                self._wake.set()  # more chunks may already be waiting
            self._finish_flushes()
        self._drain_commands()  # the last drops: slots go back even when the server stops

    def _active(self) -> int:
        return sum(1 for s in self.sessions if s.stream is not None and s.flush is None)

    def _drain_commands(self) -> None:
        while True:
            try:
                fn = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except Exception:  # a command must never kill the inference thread
                log.exception("scheduler command failed")

    def _feed(self) -> None:
        for s in list(self.sessions):
            try:
                taken = s.pull_audio()
            except ProtocolError as exc:
                self._fail(s, exc)
                continue
            if taken:
                self.metrics.audio_seconds.labels(s.entry.name).inc(taken / s.bytes_per_second)

    def _step_ready(self) -> None:
        ready = [s for s in self.sessions if s.stream is not None and s.stream.ready()]
        groups: dict[tuple, list[AsrSession]] = {}
        for s in ready:
            groups.setdefault((s.entry.name, s.setting.context), []).append(s)
        for (model, _), group in groups.items():
            for i in range(0, len(group), self.max_batch):
                batch = group[i:i + self.max_batch]
                t0 = time.perf_counter()
                try:
                    stepped = step_streams([s.stream for s in batch])
                except Exception as exc:
                    log.exception("step failed")
                    for s in batch:
                        self._fail(s, ProtocolError("internal", f"inference failed: {type(exc).__name__}"))
                    continue
                self.metrics.step_seconds.labels(model).observe(time.perf_counter() - t0)
                self.metrics.batch_sizes.labels(model).observe(len(batch))
                by_stream = {id(st): tokens for st, tokens in stepped}
                for s in batch:
                    try:
                        s.after_step(by_stream.get(id(s.stream), []))
                        s.finish_flush_if_done()
                    except Exception as exc:
                        log.exception("result handling failed")
                        self._fail(s, ProtocolError("internal", f"result handling failed: {type(exc).__name__}"))

    def _finish_flushes(self) -> None:
        for s in list(self.sessions):  # flushed streams with nothing left to encode
            if s.flush is not None and s.stream is not None and not s.stream.ready():
                try:
                    s.finish_flush_if_done()
                except Exception as exc:
                    log.exception("flush failed")
                    self._fail(s, ProtocolError("internal", f"flush failed: {type(exc).__name__}"))

    def _fail(self, session: AsrSession, error: ProtocolError) -> None:
        session.close()
        self.sessions.discard(session)
        self.on_failure(session, error)
