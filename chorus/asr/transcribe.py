"""Transcribe files through the live streaming path (what `chorus transcribe` runs).

Each file becomes a stream fed in 20 ms pieces, exactly as a WebSocket client's audio would
arrive; several files are open at once, so their chunks are stepped as one batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..codecs import read_audio
from .conformer.beam import BeamConfig, RnntBeamSearch
from .conformer.checkpoint import LoadedModel, load_fastconformer
from .conformer.streaming import ConformerStreamer
from .ngram import NgramLM
from .streams import AsrStream, step_streams

PACKAGE_MODELS = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL_NAME = "default_asr.nemo"
DEFAULT_LM_NAME = "default_asr_lm.arpa.gz"  # token n-gram over the default model's pieces
DEFAULT_BEAM = 8


class ModelNotFound(FileNotFoundError):
    pass


def default_model_path() -> Path:
    return PACKAGE_MODELS / DEFAULT_MODEL_NAME


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    if path is None:
        path = default_model_path()
        if not path.exists():
            raise ModelNotFound(f"the bundled default model {path} is missing; pass --model PATH to a .nemo file")
    return Path(path)


def default_lm_path() -> Path:
    return PACKAGE_MODELS / DEFAULT_LM_NAME


def make_search(loaded: LoadedModel, *, beam_size: int | None = None, lm: str | None = "auto",
                lm_weight: float | None = None, length_bonus: float | None = None) -> RnntBeamSearch | None:
    """The RNNT decoding a model gets: None for greedy, else a beam search (with an n-gram LM).

    lm: "auto" = the bundled LM for the bundled model decoded with a beam, else none; "none"; or an ARPA path.
    beam_size: None = 8 when there is an LM, else 1; 1 means greedy.
    """
    bundled = Path(loaded.path).resolve() == default_model_path().resolve()
    if lm == "auto":  # the bundled LM, unless greedy decoding was asked for (an LM needs a beam)
        wants_beam = beam_size is None or beam_size > 1
        lm = str(default_lm_path()) if bundled and wants_beam and default_lm_path().exists() else None
    elif lm == "none":
        lm = None
    if beam_size is None:
        beam_size = DEFAULT_BEAM if lm else 1
    if beam_size < 1:
        raise ValueError(f"beam size must be at least 1, got {beam_size}")
    if beam_size == 1:
        if lm:
            raise ValueError("an LM needs beam search: pass a beam size above 1")
        return None
    if loaded.model.joint is None:
        raise ValueError("beam search is built for RNNT heads; this model has CTC only (use beam size 1)")
    defaults = BeamConfig()
    config = BeamConfig(beam_size=beam_size,
                        lm_weight=defaults.lm_weight if lm_weight is None else lm_weight,
                        length_bonus=(defaults.length_bonus if lm else 0.0) if length_bonus is None else length_bonus)
    ngram = NgramLM.from_arpa(lm, loaded.tokenizer.pieces) if lm else None
    return RnntBeamSearch(loaded.model.joint, loaded.model.decoder, config, ngram)


def describe_decoding(decoder: str, search: RnntBeamSearch | None) -> str:
    """`rnnt`, `ctc`, `rnnt beam 8` or `rnnt beam 8 + lm`: how a result was decoded."""
    if search is None or decoder != "rnnt":
        return decoder
    return f"rnnt beam {search.config.beam_size}" + (" + lm" if search.lm is not None else "")


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def transcribe_files(loaded: LoadedModel, engine: ConformerStreamer, files: Iterable[str], *,
                     lookahead_ms: int | None, decoder: str | None, concurrency: int = 8,
                     on_chunk: Callable[[str, AsrStream], None] | None = None,
                     search: RnntBeamSearch | None = None) -> Iterator[FileResult]:
    """Yield a result per file (in input order) as soon as it is complete.

    `search` (from `make_search`) decodes the rnnt head by beam search; None is greedy."""
    setting = engine.setting_for_lookahead(lookahead_ms)
    decoder = decoder or loaded.model.default_decoder
    search = search if decoder == "rnnt" else None
    label = describe_decoding(decoder, search)
    pending = list(enumerate(files))  # by position: the same file may be named twice
    active: list[list] = []  # position, file, stream, audio, next sample
    done: dict[int, FileResult] = {}
    next_out = 0
    piece_seconds = 0.1  # any piece size gives the same result (features are exact incrementally)
    with torch.no_grad():
        while pending or active:
            while pending and len(active) < concurrency:
                index, name = pending.pop(0)
                try:
                    audio, rate = read_audio(name)
                    stream = AsrStream(engine, loaded.tokenizer, setting, decoder, rate, search)
                except Exception as exc:  # a bad file ends that file's result, not the run
                    done[index] = FileResult(name, "", [], [], label, setting.lookahead_ms, 0.0, str(exc))
                    continue
                active.append([index, name, stream, (audio, rate), 0])
            for item in active:  # feed each open stream one piece, as a live client would
                _, name, stream, (audio, rate), pos = item
                if not stream.chunker.finished:
                    piece = max(1, int(piece_seconds * rate))
                    stream.accept_audio(audio[pos:pos + piece])
                    item[4] = pos + piece
                    if item[4] >= len(audio):
                        stream.finish()
            stepped = step_streams([item[2] for item in active])
            if on_chunk:
                for stream, _ in stepped:
                    on_chunk(next(item[1] for item in active if item[2] is stream), stream)
            still = []
            for item in active:
                index, name, stream, (audio, rate), _ = item
                if stream.done:
                    stream.close()
                    done[index] = FileResult(name, stream.text, stream.hypothesis.ids, stream.words(),
                                             label, setting.lookahead_ms, len(audio) / rate)
                else:
                    still.append(item)
            active = still
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1


def load_model(path: str | os.PathLike | None, device: str | None = None) -> LoadedModel:
    return load_fastconformer(resolve_model_path(path), pick_device(device))
