"""The Piper family in the TTS contract (chorus/stream/tts_contract.py): voice, engine, stream, loader entry.

A Piper stream cuts its text into sentences by the rules Piper's own front end uses (`clause_spans`: espeak-ng's
clauses, a sentence ends at `.`, `?`, `!` or a blank line unless a lower-case word follows a dot), so text sent
piece by piece is spoken sentence by sentence exactly as the whole text is by `PiperVoice.synthesize`.  Piper has
no per-stream model state: a step phonemizes each stream's next sentence (espeak-ng runs, in parallel threads)
and synthesizes them in one padded onnxruntime call where the graph allows it (`PiperVoice.can_batch`), else one
by one; each sentence is peak-normalized as Piper does.

Options: `speed` (length_scale / speed), `speaker` (multi-speaker voices), `noise_scale` and `noise_w` (the
voice's config by default; 0 and 0 make synthesis deterministic).  Piper's graph draws its own noise, so a
`seed` cannot be honoured: it is refused (`unsupported_option`).  Streams whose scales or speaker differ cannot
share a call (`scales` is one tensor per call), so they are part of the group key.
"""
from __future__ import annotations

import math
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ...cache import SlotPool
from ...cache.spec import StateSpec
from ...stream.tts_contract import (AudioChunk, SpeechRequest, TtsEngine, TtsStream, UnsupportedOption,
                                    UnsupportedText, Voice, VoiceFamily)
from .phonemize import clause_spans
from .voice import NotAPiperVoice, PiperVoice, normalize

MIN_SPEED, MAX_SPEED = 0.25, 4.0
MAX_NOISE = 2.0
_OPTIONS = ("noise_scale", "noise_w")


class PiperModel(Voice):
    family = "piper"

    def __init__(self, voice: PiperVoice):
        self.voice = voice
        self.path = str(voice.model_path)
        self.sample_rate = voice.sample_rate
        self.name = voice.model_path.name[:-len(".onnx")]

    def describe(self) -> dict:
        c = self.voice.config
        return {"family": self.family, "voice": self.name, "sample_rate": self.sample_rate,
                "speakers": sorted(c.speaker_id_map, key=c.speaker_id_map.get) or c.num_speakers,
                "speed": {"min": MIN_SPEED, "max": MAX_SPEED, "default": 1.0}, "seed": False,
                "batching": self.voice.can_batch,
                "options": {"noise_scale": {"min": 0.0, "max": MAX_NOISE, "default": c.noise_scale},
                            "noise_w": {"min": 0.0, "max": MAX_NOISE, "default": c.noise_w}}}

    def make_engine(self, *, slots: int | None = None, memory_budget: int | None = None,
                    name: str | None = None, batch: bool = True) -> "PiperEngine":
        return PiperEngine(self, slots or 64, name or self.name, batch)

    def check(self, request: SpeechRequest) -> tuple[tuple[float, float, float], int | None]:
        """The request's scales and speaker id; `UnsupportedOption` for what Piper does not offer."""
        speed = request.speed
        if not (isinstance(speed, (int, float)) and math.isfinite(speed) and MIN_SPEED <= speed <= MAX_SPEED):
            raise UnsupportedOption(f"speed {speed} is outside {MIN_SPEED}..{MAX_SPEED}")
        if request.seed is not None:
            raise UnsupportedOption("Piper voices draw their own noise and cannot be seeded; set options "
                                    "noise_scale and noise_w to 0 for repeatable audio")
        unknown = sorted(set(request.options) - set(_OPTIONS))
        if unknown:
            raise UnsupportedOption(f"unknown option(s) {', '.join(map(repr, unknown[:5]))}; a Piper voice takes "
                                    f"{', '.join(_OPTIONS)}")
        values = {}
        for key in _OPTIONS:
            value = request.options.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= MAX_NOISE:
                raise UnsupportedOption(f"option {key} must be a number in 0..{MAX_NOISE}")
            values[key] = float(value)
        if self.voice.config.num_speakers <= 1 and request.speaker not in (None, 0):
            raise UnsupportedOption(f"speaker {request.speaker!r}: this voice has one speaker")
        try:
            sid = self.voice._speaker(request.speaker)
        except ValueError as exc:
            raise UnsupportedOption(str(exc)) from None
        scales = self.voice.scales(float(speed), values.get("noise_scale"), values.get("noise_w"))
        return tuple(float(x) for x in scales), sid

    def synthesize(self, text: str, request: SpeechRequest = SpeechRequest()) -> list[np.ndarray]:
        scales, sid = self.check(request)
        segmenter = PiperStream.__new__(PiperStream)  # the stream's segmentation, without an engine or slot
        TtsStream.__init__(segmenter, None, self.sample_rate, request)
        segmenter.model = self
        segmenter.push_text(text)
        segmenter.finish()
        out = []
        while segmenter._segments:
            out.append(self.speak_segment([self.voice.sentence_ids(segmenter.next_segment().raw)], scales, sid,
                                          batch=False)[0])
        return out

    def speak_segment(self, items: list[list[list[int]]], scales, sid, batch: bool) -> list[np.ndarray]:
        """Each item's sentences (id lists) -> its audio, each sentence normalized, concatenated."""
        flat = [(i, ids) for i, sentences in enumerate(items) for ids in sentences]
        audio: list[np.ndarray | None] = [None] * len(flat)
        scales = np.array(scales, dtype=np.float32)
        if batch and self.voice.can_batch and len(flat) > 1:
            for group in _length_groups([len(ids) for _, ids in flat]):
                for k, a in zip(group, self.voice._run([flat[k][1] for k in group], scales, sid)):
                    audio[k] = a
        else:
            for k, (_, ids) in enumerate(flat):
                audio[k] = self.voice._run([ids], scales, sid)[0]
        out: list[list[np.ndarray]] = [[] for _ in items]
        for (i, _), a in zip(flat, audio):
            out[i].append(normalize(a))
        return [np.concatenate(parts) if parts else np.zeros(0, np.float32) for parts in out]


def _length_groups(lengths: list[int], ratio: float = 1.5) -> list[list[int]]:
    """Indices grouped so that a padded call pads no item past `ratio` times its own length (padding is work)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for k in order:
        if groups and lengths[k] <= ratio * lengths[groups[-1][0]]:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


class PiperStream(TtsStream):
    model: PiperModel

    def __init__(self, engine: "PiperEngine", request: SpeechRequest, slot: int, scales, sid):
        super().__init__(engine, engine.model.sample_rate, request)
        self.model = engine.model
        self.slot = slot
        self.scales, self.sid = scales, sid
        self.group_key = (engine, scales, sid)
        self.settings = {"speed": request.speed, "speaker": sid, "seed": None,
                         "options": {"noise_scale": scales[0], "noise_w": scales[2]}}

    def sentence_ends(self, text: str) -> list[int]:
        spans = clause_spans(text)
        # every clause but the last is decided by the text after it
        return [nxt for clause, nxt in spans[:-1] if clause.ends_sentence]

    def check_text(self, text: str) -> None:
        super().check_text(text)
        if self.model.voice.config.phoneme_type == "text":  # the text's code points are the phonemes
            known = self.model.voice.config.phoneme_id_map
            for ch in unicodedata.normalize("NFD", text):
                if ch not in known and not ch.isspace():
                    raise UnsupportedText(f"character U+{ord(ch):04X} is not in the voice's phoneme set")


class PiperEngine(TtsEngine):
    def __init__(self, model: PiperModel, slots: int, name: str, batch: bool = True):
        self.model = model
        self.name = name
        self.batch = batch
        self.pool = SlotPool(name, StateSpec(), slots=slots)  # no model state: the slot is the admission
        self._phonemizers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="piper-espeak")

    def open(self, request: SpeechRequest) -> PiperStream:
        scales, sid = self.model.check(request)
        slot = self.pool.acquire()
        return PiperStream(self, request, slot, scales, sid)

    def release(self, stream: PiperStream) -> None:
        self.pool.release(stream.slot)

    def step(self, streams: list[PiperStream]) -> list[AudioChunk]:
        marks = [s.next_segment() for s in streams]
        voice = self.model.voice
        if len(marks) > 1:  # espeak-ng is a process per call: run them side by side
            items = list(self._phonemizers.map(lambda m: voice.sentence_ids(m.raw), marks))
        else:
            items = [voice.sentence_ids(marks[0].raw)]
        first = streams[0]
        audio = self.model.speak_segment(items, first.scales, first.sid, self.batch)
        return [s.output(a, m) for s, a, m in zip(streams, audio, marks)]


def _detect(path: Path) -> bool:
    if path.is_dir():
        return len(list(path.glob("*.onnx"))) == 1 and any(path.glob("*.onnx.json"))
    return path.suffix == ".onnx" and path.with_name(path.name + ".json").exists()


def _load(path: Path) -> PiperModel:
    return PiperModel(PiperVoice(path))


FAMILY = VoiceFamily("piper", "a Piper voice (X.onnx with X.onnx.json beside it)", _detect, _load)

__all__ = ["FAMILY", "NotAPiperVoice", "PiperEngine", "PiperModel", "PiperStream"]
