"""The one scheduler: every ready stream advances in batched steps, whoever feeds it.

The server, `chorus transcribe` and `chorus eval` all run their streams through `Scheduler`.  A
round feeds each job (a job moves its own input into its stream: a connection's received audio, a
file's next piece; each stream takes only what its next chunk needs), collects the streams with a
chunk ready, groups them once by their group key, steps each group as one batch (at most
`max_batch` streams, one chunk each) and hands every stream its new tokens by index.

The server runs the rounds on its own inference thread (`start`; connections talk to it only
through `submit`, a callable run on that thread), so model compute never touches the event loop;
the command line runs them inline (`run_round`).  Only this thread touches stream state and pools.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Hashable, Iterable, Protocol

from .contract import Stream, Token

log = logging.getLogger("chorus.scheduler")


class StepFailed(RuntimeError):
    """The batched step raised: every stream of that batch fails with this."""


class Job(Protocol):
    """What the scheduler drives: one stream and whoever feeds it and reads its results."""

    stream: Stream | None   # None between segments (after a finalize) or once closed

    def feed(self) -> float:
        """Move available input into the stream (only what its next chunk needs); returns the
        audio seconds taken.  An exception fails the job."""

    def on_tokens(self, tokens: list[Token]) -> None:
        """After a step of this job's stream: its new tokens (possibly none)."""

    def after_round(self) -> None:
        """Once per round, stepped or not: flushes, completion."""

    def fail(self, error: Exception) -> None:
        """The job failed (its input, or its step); the scheduler has dropped it."""


def group_ready(streams: Iterable[Stream], max_batch: int = 64) -> list[list[int]]:
    """The indices of the ready streams, grouped once by group key, in batches of at most max_batch."""
    groups: dict[Hashable, list[int]] = {}
    for i, s in enumerate(streams):
        if s.ready():
            groups.setdefault(s.group_key, []).append(i)
    return [members[k:k + max_batch] for members in groups.values() for k in range(0, len(members), max_batch)]


def step_ready(streams: list[Stream], max_batch: int = 64) -> list[tuple[Stream, list[Token]]]:
    """Step every ready stream once, batching those that share a group key; (stream, new tokens)."""
    out = []
    for batch in group_ready(streams, max_batch):
        members = [streams[i] for i in batch]
        out += zip(members, members[0].engine.step(members))
    return out


def run_to_end(streams: list[Stream]) -> None:
    """Step until every stream (already finished with input) is fully decoded."""
    while any(s.ready() for s in streams):
        step_ready(streams)


class Scheduler:
    def __init__(self, *, batch_wait_ms: float = 0.0, max_batch: int = 64,
                 on_step: Callable[[str, int, float], None] | None = None,
                 on_audio: Callable[[Job, float], None] | None = None):
        """batch_wait_ms: how long a round may wait for more streams to become ready when fewer
        than all active ones are (a bounded wait for the rest of the batch); on_step(model, batch
        size, seconds) and on_audio(job, seconds) are for metrics."""
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_batch = max_batch
        self.jobs: list[Job] = []
        self.on_step = on_step or (lambda model, size, seconds: None)
        self.on_audio = on_audio or (lambda job, seconds: None)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- jobs (on the scheduler's thread) ----------------------------------------------------
    def add(self, job: Job) -> None:
        self.jobs.append(job)

    def discard(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)

    # -- one round -------------------------------------------------------------------------
    def run_round(self) -> int:
        """Feed, step every ready stream once (grouped, batched), finish; returns streams stepped."""
        self._feed()
        stepped = 0
        if self.batch_wait and self._ready_jobs() and len(self._ready_jobs()) < self._active():
            time.sleep(self.batch_wait)  # bounded wait for the rest of the batch
            self._drain_commands()
            self._feed()
        jobs = self._ready_jobs()
        for batch in group_ready([j.stream for j in jobs], self.max_batch):
            members = [jobs[i] for i in batch]
            stepped += self._step(members)
        for job in list(self.jobs):
            self._guard(job, job.after_round)
        return stepped

    def _ready_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.stream is not None and j.stream.ready()]

    def _active(self) -> int:
        """Streams that may still become ready this round (not flushing to their end)."""
        return sum(1 for j in self.jobs if j.stream is not None and not j.stream.finished)

    def _feed(self) -> None:
        for job in list(self.jobs):
            try:
                taken = job.feed()
            except Exception as exc:  # the job's input was bad: it alone ends
                self._fail(job, exc)
                continue
            if taken:
                self.on_audio(job, taken)

    def _step(self, jobs: list[Job]) -> int:
        streams = [j.stream for j in jobs]
        engine = streams[0].engine
        t0 = time.perf_counter()
        try:
            new_tokens = engine.step(streams)
        except Exception as exc:
            log.exception("step failed")
            for job in jobs:
                self._fail(job, StepFailed(f"inference failed: {type(exc).__name__}"))
            return 0
        self.on_step(engine.name, len(jobs), time.perf_counter() - t0)
        for job, tokens in zip(jobs, new_tokens):  # results by index
            self._guard(job, lambda job=job, tokens=tokens: job.on_tokens(tokens))
        return len(jobs)

    def _guard(self, job: Job, fn: Callable[[], None]) -> None:
        if job not in self.jobs:
            return
        try:
            fn()
        except Exception as exc:
            log.exception("result handling failed")
            self._fail(job, exc)

    def _fail(self, job: Job, error: Exception) -> None:
        self.discard(job)
        job.fail(error)

    # -- the inference thread (the server) ---------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chorus-inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the inference thread (ordered with the other submissions)."""
        self._commands.put(fn)
        self._wake.set()

    def notify(self) -> None:
        """New input arrived."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(timeout=0.05)
            self._wake.clear()
            self._drain_commands()
            if self.run_round():
                self._wake.set()  # more chunks may already be waiting
        self._drain_commands()  # the last drops: slots go back even when the server stops

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
