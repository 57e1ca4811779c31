"""Word and character error rates of the live streaming path over a manifest (`chorus eval`).

A manifest is NeMo's JSON-lines format: one `{"audio_filepath": ..., "text": ...}` per line,
relative paths resolved against the manifest's folder.  Hypotheses and references go through
the same `normalize_text` that prepared the training transcripts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .conformer.beam import RnntBeamSearch
from .conformer.checkpoint import LoadedModel
from .conformer.streaming import ConformerStreamer
from .textnorm import normalize_text
from .transcribe import transcribe_files


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


def read_manifest(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            audio = Path(row["audio_filepath"])
            row["audio_filepath"] = str(audio if audio.is_absolute() else path.parent / audio)
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def score_manifest(loaded: LoadedModel, engine: ConformerStreamer, manifest: str | Path, *,
                   lookahead_ms: int | None, decoder: str | None, limit: int | None = None,
                   concurrency: int = 16, progress=None, search: RnntBeamSearch | None = None) -> Score:
    import jiwer

    rows = read_manifest(manifest, limit)
    refs, hyps, worst, seconds = [], [], [], 0.0
    setting = engine.setting_for_lookahead(lookahead_ms)
    decoder = decoder or loaded.model.default_decoder
    label = decoder
    for row, result in zip(rows, transcribe_files(loaded, engine, [r["audio_filepath"] for r in rows],
                                                  lookahead_ms=setting.lookahead_ms, decoder=decoder,
                                                  concurrency=concurrency, search=search)):
        label = result.decoder
        if result.error:
            raise RuntimeError(f"{row['audio_filepath']}: {result.error}")
        ref, hyp = normalize_text(row["text"]), normalize_text(result.text)
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
    return Score(str(manifest), setting.lookahead_ms, label, len(rows), jiwer.wer(refs, hyps),
                 jiwer.cer(refs, hyps), seconds, exact, worst[:10])
