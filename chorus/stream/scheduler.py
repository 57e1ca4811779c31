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

import collections
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

    def on_result(self, result) -> None:
        """After a step of this job's stream: what the engine's step gave it (an ASR stream's new
        tokens, possibly none; a TTS stream's next audio)."""

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


class StepCost:
    """What a step of B streams of one group costs, t(B) = fixed + per_stream * B, fitted by least
    squares over the group's recent steps (one step's fixed part is the weights read and the
    per-step overhead; the per-stream part is the streams' own compute)."""

    def __init__(self, window: int = 64):
        self.samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)

    def add(self, batch: int, seconds: float) -> None:
        self.samples.append((batch, seconds))

    def fit(self) -> tuple[float, float] | None:
        n = len(self.samples)
        if n < 4:
            return None
        mb = sum(b for b, _ in self.samples) / n
        mt = sum(t for _, t in self.samples) / n
        var = sum((b - mb) ** 2 for b, _ in self.samples)
        if var < 1e-9:  # one batch size only: no slope to see; assume a third of it is per stream
            return 2 * mt / 3, mt / 3 / mb
        slope = sum((b - mb) * (t - mt) for b, t in self.samples) / var
        slope = min(max(slope, 0.0), mt / mb)
        return mt - slope * mb, slope


def worth_waiting(ready: int, upcoming: list[float], fixed: float, per_stream: float, max_wait: float,
                  age: float, budget: float) -> float:
    """How long to wait before stepping `ready` streams, given when others become ready (`upcoming`,
    seconds from now, sorted): 0 to step now.

    Stepping now, a stream that becomes ready k-th waits for this step and then needs a step of its
    own; waiting t_k for it lets it join this one.  That saves each of the k about `fixed - t_k` and
    costs each of the ready streams `t_k + per_stream * k`; wait for the k with the largest net gain,
    if any is positive, as long as the oldest ready stream still finishes within `budget`."""
    best, gain = 0.0, 0.0
    for k, t in enumerate(upcoming, 1):
        if t > max_wait or age + t + fixed + per_stream * (ready + k) > budget:
            break
        net = k * (fixed - t) - ready * (t + per_stream * k)
        if net > gain:
            best, gain = t, net
    return best


class Scheduler:
    def __init__(self, *, batch_wait_ms: float = 0.0, max_batch: int = 64,
                 on_step: Callable[[str, int, float], None] | None = None,
                 on_audio: Callable[[Job, float], None] | None = None, latency_share: float = 0.5):
        """batch_wait_ms: the longest a round may wait for streams about to become ready, so that
        they join the step instead of waiting for the next one; it waits only when a step-cost model
        fitted on the run's own steps says the batch is worth it (`worth_waiting`), and never so long
        that the oldest ready stream would finish later than `latency_share` of its chunk after it
        became ready.  0 (the command line) steps whatever is ready at once.  on_step(model, batch
        size, seconds) and on_audio(job, seconds) are for metrics."""
        self.batch_wait = batch_wait_ms / 1000.0
        self.latency_share = latency_share
        self._costs: dict[Hashable, StepCost] = collections.defaultdict(StepCost)
        self._ready_since: dict[int, float] = {}
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
        if job.stream is not None:
            self._ready_since.pop(id(job.stream), None)

    # -- one round -------------------------------------------------------------------------
    def run_round(self) -> int:
        """Feed, step every ready stream once (grouped, batched), finish; returns streams stepped."""
        self._feed()
        stepped = 0
        if self.batch_wait:
            wait = self._batch_wait()
            if wait > 0:  # streams about to be ready are worth a short wait
                time.sleep(wait)
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
        now = time.monotonic()
        ready = []
        for j in self.jobs:
            if j.stream is not None and j.stream.ready():
                self._ready_since.setdefault(id(j.stream), now)
                ready.append(j)
        return ready

    def _batch_wait(self) -> float:
        """How long this round should wait before stepping (the longest any group asks for)."""
        ready = self._ready_jobs()
        if not ready:
            return 0.0
        now = time.monotonic()
        by_key: dict[Hashable, list[Job]] = {}
        for j in ready:
            by_key.setdefault(j.stream.group_key, []).append(j)
        wait = 0.0
        for key, members in by_key.items():
            fit = self._costs[key].fit()
            if fit is None or len(members) >= self.max_batch:
                continue
            upcoming = sorted(t for j in self.jobs
                              if j.stream is not None and not j.stream.ready() and j.stream.group_key == key
                              and (t := j.stream.seconds_to_ready()) is not None)
            chunk = min(j.stream.settings.get("chunk_ms", 1000) for j in members) / 1000
            age = now - min(self._ready_since[id(j.stream)] for j in members)
            wait = max(wait, worth_waiting(len(members), upcoming, *fit, self.batch_wait, age,
                                           self.latency_share * chunk))
        return min(wait, self.batch_wait)

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
        seconds = time.perf_counter() - t0
        self._costs[streams[0].group_key].add(len(jobs), seconds)
        self.on_step(engine.name, len(jobs), seconds)
        for s in streams:
            self._ready_since.pop(id(s), None)
        for job, tokens in zip(jobs, new_tokens):  # results by index
            self._guard(job, lambda job=job, result=tokens: job.on_result(result))
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
    def start(self, name: str = "chorus-inference") -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
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
