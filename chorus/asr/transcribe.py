"""Transcribe files through the live streaming path (what `chorus transcribe` runs).

Each file becomes a stream fed in pieces, as a WebSocket client's audio would arrive, through the
one scheduler; several files are open at once, so their chunks are stepped as one batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..codecs import read_audio
from ..stream.contract import Engine, Stream, StreamRequest
from ..stream.scheduler import Scheduler, run_to_end, step_ready


def check_input_file(path: str | os.PathLike) -> str | None:
    """None when `path` is a readable file, else what is wrong, as "PATH does not exist" and the like.

    Only the path is checked (cheap, before any model is loaded); a file that is there but is not audio
    gets its error from `transcribe_files`, as that file's result."""
    p = Path(path)
    if not p.exists():
        return f"{path} does not exist"
    if not p.is_file():
        return f"{path} is not a file" + (" (a directory)" if p.is_dir() else "")
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    return None


@dataclass
class FileResult:
    file: str
    text: str
    tokens: list[int]
    words: list[dict]
    decoder: str
    lookahead_ms: int
    duration: float
    error: str | None = None

    def as_json(self) -> dict:
        out = {"file": self.file, "text": self.text, "tokens": self.tokens, "words": self.words,
               "decoder": self.decoder, "lookahead_ms": self.lookahead_ms, "duration": round(self.duration, 3)}
        if self.error:
            out["error"] = self.error
        return out


class _FileJob:
    """One file streamed as a live client's audio would arrive, in pieces, as its stream needs them."""

    piece_seconds = 0.1  # any piece size gives the same result (features are exact incrementally)

    def __init__(self, index: int, name: str, audio, rate: int, stream: Stream,
                 on_chunk: Callable[[str, Stream], None] | None):
        self.index, self.name, self.audio, self.rate = index, name, audio, rate
        self.stream = stream
        self.position = 0
        self.on_chunk = on_chunk
        self.error: Exception | None = None

    def feed(self) -> float:
        stream, taken = self.stream, 0
        piece = max(1, int(self.piece_seconds * self.rate))
        while not stream.finished and not stream.ready():
            stream.accept_audio(self.audio[self.position:self.position + piece])
            taken += min(piece, len(self.audio) - self.position)
            self.position += piece
            if self.position >= len(self.audio):
                stream.finish()
        return taken / self.rate

    def on_result(self, tokens) -> None:
        if self.on_chunk:
            self.on_chunk(self.name, self.stream)

    def after_round(self) -> None:
        pass

    def fail(self, error: Exception) -> None:
        self.error = error


def transcribe_files(engine: Engine, files: Iterable[str], request: StreamRequest = StreamRequest(), *,
                     concurrency: int = 8, on_chunk: Callable[[str, Stream], None] | None = None,
                     max_batch: int = 64) -> Iterator[FileResult]:
    """Yield a result per file (in input order) as soon as it is complete.

    Every file is a stream opened with `request` (its sample rate is the file's), fed through the
    one scheduler as a live client's audio, so their chunks share batched steps."""
    probe = engine.open(request)  # checks the request and says how results are decoded
    label, lookahead_ms = probe.decoding, probe.settings.get("lookahead_ms")
    probe.close()
    pending = list(enumerate(files))  # by position: the same file may be named twice
    scheduler = Scheduler(max_batch=max_batch)
    active: list[_FileJob] = []
    done: dict[int, FileResult] = {}
    next_out = 0
    with torch.no_grad():
        while pending or active:
            while pending and len(active) < concurrency:
                index, name = pending.pop(0)
                try:
                    audio, rate = read_audio(name)
                    stream = engine.open(replace(request, sample_rate=rate))
                except Exception as exc:  # a bad file ends that file's result, not the run
                    done[index] = FileResult(name, "", [], [], label, lookahead_ms, 0.0, str(exc))
                    continue
                active.append(_FileJob(index, name, audio, rate, stream, on_chunk))
                scheduler.add(active[-1])
            scheduler.run_round()
            for job in [j for j in active if j.stream.done or j.error]:
                active.remove(job)
                scheduler.discard(job)
                job.stream.close()
                stream = job.stream
                done[job.index] = FileResult(job.name, stream.text.strip(), stream.hypothesis.ids, stream.words(),
                                             label, lookahead_ms, len(job.audio) / job.rate,
                                             str(job.error) if job.error else None)
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1


@torch.no_grad()
def transcribe_samples(engine: Engine, samples, sample_rate: int, request: StreamRequest = StreamRequest(),
                       piece_seconds: float = 0.02) -> Stream:
    """Stream one recording through the live path in `piece_seconds` pieces, stepping as soon as
    a chunk is ready (as a lone live client); returns the closed stream."""
    return stream_alone(engine.open(replace(request, sample_rate=sample_rate)), samples, piece_seconds)


def stream_alone(stream: Stream, samples, piece_seconds: float = 0.02) -> Stream:
    """Feed an open stream a recording in pieces, stepping it alone whenever a chunk is ready; closes it."""
    try:
        piece = max(1, int(piece_seconds * stream.sample_rate))
        for i in range(0, len(samples), piece):
            stream.accept_audio(samples[i:i + piece])
            while stream.ready():
                step_ready([stream])
        stream.finish()
        run_to_end([stream])
    finally:
        stream.close()
    return stream
