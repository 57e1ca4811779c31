"""Word and character error rates of the live streaming path over a manifest (`chorus eval`).

A manifest is NeMo's JSON-lines format: one `{"audio_filepath": ..., "text": ...}` per line,
relative paths resolved against the manifest's folder.  Hypotheses and references go through
the same `normalize_text` that prepared the training transcripts.

`read_manifest` checks every line it returns (JSON object, `audio_filepath` and `text` strings, the
audio file there and readable) and raises `ManifestError` naming the manifest, the line and the file,
so `chorus eval` can refuse a bad manifest before it loads a model.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..stream.contract import Engine, StreamRequest
from .textnorm import normalize_text
from .transcribe import check_input_file, transcribe_files


CJK = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")


def normalize_for_scoring(text: str) -> str:
    """`normalize_text` for English; Chinese characters (which it would drop) are kept, one "word"
    each, so that a WER over Chinese text is its character error rate (as FunASR scores it)."""
    if not CJK.search(text):
        return normalize_text(text)
    words = []
    for part in CJK.split(text):
        words += [part] if CJK.fullmatch(part) else normalize_text(part).split()
    return " ".join(words)


@dataclass
class Score:
    manifest: str
    lookahead_ms: int
    decoder: str
    utterances: int
    wer: float
    cer: float
    audio_seconds: float
    exact: float = 0.0  # share of utterances transcribed exactly (for isolated words: words right)
    errors: list[dict] = field(default_factory=list)  # the worst utterances, for reading

    def as_json(self) -> dict:
        return {"manifest": self.manifest, "lookahead_ms": self.lookahead_ms, "decoder": self.decoder,
                "utterances": self.utterances, "wer": round(self.wer, 4), "cer": round(self.cer, 4),
                "exact": round(self.exact, 4),
                "audio_seconds": round(self.audio_seconds, 1), "worst": self.errors}


class ManifestError(ValueError):
    """A manifest that cannot be scored: one line naming the manifest, the line number and the file."""


def _manifest_rows(path: str | Path, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, row) for each non-empty line, checked; audio paths resolved against the manifest's folder."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    if not path.is_file():
        raise ManifestError(f"manifest {path} is not a file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{where}: not a JSON object ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{where}: not a JSON object")
            for key in ("audio_filepath", "text"):
                if not isinstance(row.get(key), str):
                    what = "has no" if key not in row else "has a non-string"
                    raise ManifestError(f"{where}: {what} {key!r} "
                                        '(each line is {"audio_filepath": ..., "text": ...})')
            audio = Path(row["audio_filepath"])
            row["audio_filepath"] = str(audio if audio.is_absolute() else path.parent / audio)
            problem = check_input_file(row["audio_filepath"])
            if problem:
                relative = "" if audio.is_absolute() else " (relative paths are read from the manifest's folder)"
                raise ManifestError(f"{where}: audio file {problem}{relative}")
            rows.append((number, row))
            if limit and len(rows) >= limit:
                break
    return rows


def read_manifest(path: str | Path, limit: int | None = None) -> list[dict]:
    """The rows of a JSON-lines manifest (the first `limit`), checked; raises ManifestError on a bad line."""
    return [row for _, row in _manifest_rows(path, limit)]


def score_manifest(engine: Engine, manifest: str | Path, request: StreamRequest = StreamRequest(), *,
                   limit: int | None = None, concurrency: int = 16, progress=None) -> Score:
    """Stream every utterance of a manifest through the live path (any family) and score it."""
    import jiwer

    numbered = _manifest_rows(manifest, limit)
    rows = [row for _, row in numbered]
    refs, hyps, worst, seconds = [], [], [], 0.0
    label, lookahead_ms = request.decoder or "", request.lookahead_ms
    results = transcribe_files(engine, [r["audio_filepath"] for r in rows], request, concurrency=concurrency)
    for (number, row), result in zip(numbered, results):
        label, lookahead_ms = result.decoder, result.lookahead_ms
        if result.error:
            raise ManifestError(f"{manifest} line {number}: audio file {row['audio_filepath']}: {result.error}")
        ref, hyp = normalize_for_scoring(row["text"]), normalize_for_scoring(result.text)
        refs.append(ref)
        hyps.append(hyp)
        seconds += result.duration
        if ref != hyp:
            worst.append({"file": row["audio_filepath"], "ref": ref, "hyp": hyp,
                          "wer": round(jiwer.wer(ref, hyp) if ref else 1.0, 3)})
        if progress:
            progress(1)
    worst.sort(key=lambda w: -w["wer"])
    exact = sum(r == h for r, h in zip(refs, hyps)) / max(1, len(refs))
    return Score(str(manifest), lookahead_ms, label, len(rows), jiwer.wer(refs, hyps),
                 jiwer.cer(refs, hyps), seconds, exact, worst[:10])
