"""Matcha-TTS + HiFi-GAN as a voice family in the TTS contract (chorus/stream/tts_contract.py).

A Matcha voice is a pair: a Matcha `.ckpt` (the acoustic model: text -> mel) and a HiFi-GAN generator file with its
`config.json` beside it (the vocoder: mel -> audio). How a user names the pair (`load(path, vocoder=None)`):

* a directory holding one `*.ckpt`, one generator file (named `generator*` or `g_*`, as jik876/hifi-gan names
  them: `generator_v1`, `g_02500000`) and the generator's `config.json`: `--voice matcha_ljspeech/`;
* a `.ckpt` file alone, when the generator and its `config.json` sit in the same directory: `--voice model.ckpt`;
* a `.ckpt` file and the generator given apart: `chorus speak --voice model.ckpt --vocoder generator_v1`,
  `chorus serve --voice NAME=model.ckpt,vocoder=generator_v1` (the config.json beside the generator; a
  directory for `vocoder` means the generator inside it).

The mel channels of the two must agree (Matcha's `n_feats`, HiFi-GAN's `num_mels`); the voice's rate is the
vocoder's `sampling_rate`.

Streaming. A step takes the ready streams (any settings: the group key is the engine); for those with no sentence
in progress it phonemizes their next sentence (espeak-ng runs side by side) and synthesizes the mels in one batch
per setting (`n_timesteps`, `temperature`, length scale: one value per `MatchaTTS.decode` call; a batch of
different lengths equals each item alone, see matcha/model.py).  Each stream then pushes the next
`chunk_frames` mel frames of its sentence into its HiFi-GAN stream state (`VocoderState`, one per sentence,
explicit, held by the stream), all streams' windows in one batched `Generator.stream` call, and the step returns
the audio that is now exact: the first chunk of a sentence as soon as its mel and the vocoder's right context are
there, the rest one chunk per step (so other streams' sentences interleave), the last with `last=True`.  The
chunks of a sentence, back to back, equal the one-shot vocoder on the whole mel (float summation order aside).
The stream's slot in the pool holds no tensors (the vocoder state is a few dozen mel frames on the stream);
it is the admission, as for Piper.

Options: `speed` (length_scale = 1 / speed), `speaker` (multi-speaker checkpoints, by number), `seed` (the initial
noise of each sentence is drawn, [n_feats, frames], from a `torch.Generator` seeded once per stream: the same seed
and text give the same audio; without one a random seed is drawn and reported in `settings`), and `options`:
`n_timesteps` (Euler steps of the ODE, 10 by default), `temperature` (the noise's scale, 0.667 by default as in
Matcha's command line), `chunk_frames` (mel frames vocoded per step, 32 by default).  What `synthesize` returns is
what Matcha's own inference gives for each sentence with that noise (`MatchaTTS.synthesise`, then the vocoder on
the whole mel); Matcha's optional denoiser is not applied.
"""
from __future__ import annotations

import math
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ...cache import SlotPool
from ...cache.spec import StateSpec
from ...codecs.resample import StreamingResampler
from ...stream.tts_contract import (AudioChunk, Mark, SpeechRequest, TtsEngine, TtsStream, UnsupportedOption, Voice,
                                    VoiceFamily)
from ..hifigan import Generator, NotAHifiGan, VocoderState, load_hifigan
from .checkpoint import NotAMatchaCheckpoint, load_matcha
from .model import MatchaTTS
from .text import text_to_ids

MIN_SPEED, MAX_SPEED = 0.25, 4.0
MAX_STEPS = 100
MAX_TEMPERATURE = 2.0
MAX_CHUNK = 1024
DEFAULTS = {"n_timesteps": 10, "temperature": 0.667, "chunk_frames": 32}


class NotAMatchaVoice(ValueError):
    pass


def find_vocoder(where: Path) -> Path:
    """The one HiFi-GAN generator file (`generator*` or `g_*`) in directory `where`, with config.json beside it."""
    found = sorted(p for p in where.iterdir() if p.is_file() and p.name.startswith(("generator", "g_"))
                   and p.suffix not in (".json", ".txt", ".md"))
    if len(found) != 1:
        raise NotAMatchaVoice(f"{where}: a Matcha voice needs exactly one HiFi-GAN generator file (generator* or "
                              f"g_*) with its config.json here, or --vocoder; found "
                              f"{', '.join(p.name for p in found) or 'none'}")
    return found[0]


class MatchaVoice(Voice):
    family = "matcha"

    def __init__(self, model: MatchaTTS, vocoder: Generator, path: Path, vocoder_path: Path):
        if model.cfg.n_feats != vocoder.cfg.num_mels:
            raise NotAMatchaVoice(f"{path} makes {model.cfg.n_feats}-channel mels but the vocoder {vocoder_path} "
                                  f"takes {vocoder.cfg.num_mels}")
        self.model = model
        self.vocoder = vocoder
        self.path = str(path)
        self.vocoder_path = str(vocoder_path)
        self.sample_rate = vocoder.cfg.sampling_rate
        self.name = path.stem if path.suffix == ".ckpt" else path.name

    def describe(self) -> dict:
        return {"family": self.family, "voice": self.name, "sample_rate": self.sample_rate,
                "vocoder": Path(self.vocoder_path).name, "speakers": self.model.cfg.n_spks,
                "speed": {"min": MIN_SPEED, "max": MAX_SPEED, "default": 1.0}, "seed": True, "batching": True,
                "options": {"n_timesteps": {"min": 1, "max": MAX_STEPS, "default": DEFAULTS["n_timesteps"]},
                            "temperature": {"min": 0.0, "max": MAX_TEMPERATURE, "default": DEFAULTS["temperature"]},
                            "chunk_frames": {"min": 1, "max": MAX_CHUNK, "default": DEFAULTS["chunk_frames"]}}}

    def make_engine(self, *, slots: int | None = None, memory_budget: int | None = None,
                    name: str | None = None) -> "MatchaEngine":
        return MatchaEngine(self, slots or 64, name or self.name)

    # -- requests ---------------------------------------------------------------------------------------
    def check(self, request: SpeechRequest) -> dict:
        """The settings a request asks for; `UnsupportedOption` for what this voice does not offer."""
        speed = request.speed
        if isinstance(speed, bool) or not (isinstance(speed, (int, float)) and math.isfinite(speed)
                                           and MIN_SPEED <= speed <= MAX_SPEED):
            raise UnsupportedOption(f"speed {speed} is outside {MIN_SPEED}..{MAX_SPEED}")
        unknown = sorted(set(request.options) - set(DEFAULTS))
        if unknown:
            raise UnsupportedOption(f"unknown option(s) {', '.join(map(repr, unknown[:5]))}; a Matcha voice takes "
                                    f"{', '.join(DEFAULTS)}")
        opts = dict(DEFAULTS)
        for key in ("n_timesteps", "chunk_frames"):
            value = request.options.get(key)
            if value is None:
                continue
            top = MAX_STEPS if key == "n_timesteps" else MAX_CHUNK
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise UnsupportedOption(f"option {key} must be a whole number in 1..{top}")
            opts[key] = value
        value = request.options.get("temperature")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and 0.0 <= value <= MAX_TEMPERATURE):
                raise UnsupportedOption(f"option temperature must be a number in 0..{MAX_TEMPERATURE}")
            opts["temperature"] = float(value)
        n_spks = self.model.cfg.n_spks
        speaker = request.speaker
        if isinstance(speaker, str) and speaker.strip().isdigit():
            speaker = int(speaker)
        if speaker is None:
            speaker = 0
        if isinstance(speaker, bool) or not isinstance(speaker, int) or not 0 <= speaker < n_spks:
            raise UnsupportedOption(f"speaker {request.speaker!r}: this voice has speakers 0..{n_spks - 1} "
                                    f"(by number)" if n_spks > 1 else f"speaker {request.speaker!r}: this voice "
                                                                      f"has one speaker")
        seed = request.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
            raise UnsupportedOption("seed must be a whole number in 0..2**63-1")
        return {"length_scale": 1.0 / float(speed), "speaker": speaker,
                "seed": secrets.randbits(63) if seed is None else seed, **opts}

    # -- synthesis --------------------------------------------------------------------------------------
    def mels(self, ids: list[list[int]], noise: list[torch.Tensor] | list[torch.Generator], speakers: list[int],
             n_timesteps: int, temperature: float, length_scale: float) -> list[torch.Tensor]:
        """Each item's denormalised mel [n_feats, frames], in one batch: ids, and per item either its noise or the
        generator to draw it from ([n_feats, frames] standard normal, once the frame count is known)."""
        x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
        for i, seq in enumerate(ids):
            x[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        lengths = torch.tensor([len(seq) for seq in ids])
        spks = torch.tensor(speakers) if self.model.cfg.n_spks > 1 else None
        with torch.inference_mode():
            enc = self.model.encode(x, lengths, spks, length_scale)
            z = [n if isinstance(n, torch.Tensor) else
                 torch.randn(self.model.cfg.n_feats, int(enc.lengths[i]), generator=n)
                 for i, n in enumerate(noise)]
            out = self.model.denormalize(self.model.decode(enc, z, n_timesteps, temperature))
        return [out[i, :, :int(enc.lengths[i])].clone() for i in range(len(ids))]

    def segments(self, text: str, request: SpeechRequest) -> list[Mark]:
        segmenter = MatchaStream.__new__(MatchaStream)  # the stream's segmentation, without an engine or slot
        TtsStream.__init__(segmenter, None, self.sample_rate, request)
        segmenter.push_text(text)
        segmenter.flush()
        return [s.mark for s in segmenter._segments]

    def synthesize(self, text: str, request: SpeechRequest = SpeechRequest()) -> list[np.ndarray]:
        """Offline: each segment alone, Matcha then the vocoder on the whole mel, the noise drawn in order from one
        generator seeded with the request's seed (what a stream with that seed makes)."""
        s = self.check(request)
        gen = torch.Generator().manual_seed(s["seed"])
        out = []
        for mark in self.segments(text, request):
            mel = self.mels([text_to_ids(mark.text)], [gen], [s["speaker"]], s["n_timesteps"], s["temperature"],
                            s["length_scale"])[0]
            with torch.inference_mode():
                out.append(self.vocoder(mel[None])[0, 0].numpy().astype(np.float32))
        return out


class MatchaStream(TtsStream):
    def __init__(self, engine: "MatchaEngine", request: SpeechRequest, slot: int, settings: dict):
        super().__init__(engine, engine.voice.sample_rate, request)
        self.voice = engine.voice
        self.slot = slot
        self.opts = settings
        self.generator = torch.Generator().manual_seed(settings["seed"])  # this stream's noise, sentence by sentence
        self.group_key = engine  # settings differ freely: the step groups the synthesis calls itself
        self.settings = {"speed": request.speed, "speaker": settings["speaker"], "seed": settings["seed"],
                         "options": {k: settings[k] for k in DEFAULTS}}
        # the sentence being vocoded: its mark, whole mel, frames pushed so far, vocoder state, resampler
        self.current: Mark | None = None
        self.mel: torch.Tensor | None = None
        self.pushed = 0
        self.vocoder_state: VocoderState | None = None
        self._resampler: StreamingResampler | None = None

    @property
    def synth_key(self) -> tuple:
        return self.opts["n_timesteps"], self.opts["temperature"], self.opts["length_scale"]

    def begin(self, mark: Mark, mel: torch.Tensor) -> None:
        self.current, self.mel, self.pushed = mark, mel, 0
        self.vocoder_state = self.voice.vocoder.new_state()
        self._resampler = (StreamingResampler(self.model_rate, self.sample_rate)
                           if self.sample_rate != self.model_rate else None)

    def next_frames(self) -> tuple[torch.Tensor, bool]:
        """The mel frames to push this step (the first chunk with the vocoder's right context) and whether they
        end the sentence."""
        n = self.opts["chunk_frames"] + (self.voice.vocoder.receptive_field().right if self.pushed == 0 else 0)
        end = min(self.pushed + n, self.mel.shape[-1])
        frames = self.mel[:, self.pushed:end]
        self.pushed = end
        return frames, end == self.mel.shape[-1]

    def emit(self, audio: torch.Tensor, last: bool) -> AudioChunk:
        audio = audio.numpy().astype(np.float32)
        if self._resampler is not None:
            audio = self._resampler.process(audio)
            if last:
                audio = np.concatenate([audio, self._resampler.flush()])
        mark = self.current
        if last:
            self.segments_done += 1
            self.current = self.mel = self.vocoder_state = self._resampler = None
        self.samples_out += len(audio)
        return AudioChunk(audio, mark, last)

    # a sentence being vocoded counts as work: ready, not done, not idle; a cancel drops it too
    def ready(self) -> bool:
        return (self.current is not None or bool(self._segments)) and not self.paused and not self._closed

    @property
    def done(self) -> bool:
        return super().done and self.current is None

    @property
    def idle(self) -> bool:
        return super().idle and self.current is None

    def cancel(self, skipped_chars: int = 0) -> int:
        dropped = super().cancel(skipped_chars)
        if self.current is not None:
            self.current = self.mel = self.vocoder_state = self._resampler = None
            dropped += 1
        return dropped


class MatchaEngine(TtsEngine):
    def __init__(self, voice: MatchaVoice, slots: int, name: str):
        self.voice = voice
        self.name = name
        self.pool = SlotPool(name, StateSpec(), slots=slots)  # the vocoder state lives on the stream
        self._phonemizers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="matcha-espeak")

    def open(self, request: SpeechRequest) -> MatchaStream:
        settings = self.voice.check(request)
        slot = self.pool.acquire()
        return MatchaStream(self, request, slot, settings)

    def release(self, stream: MatchaStream) -> None:
        self.pool.release(stream.slot)

    def step(self, streams: list[MatchaStream]) -> list[AudioChunk]:
        starting = [s for s in streams if s.current is None]
        if starting:
            marks = [s.next_segment() for s in starting]
            if len(marks) > 1:  # espeak-ng is a process per call: run them side by side
                ids = list(self._phonemizers.map(lambda m: text_to_ids(m.text), marks))
            else:
                ids = [text_to_ids(marks[0].text)]
            groups: dict[tuple, list[int]] = {}
            for k, s in enumerate(starting):
                groups.setdefault(s.synth_key, []).append(k)
            for (n_timesteps, temperature, length_scale), members in groups.items():
                mels = self.voice.mels([ids[k] for k in members], [starting[k].generator for k in members],
                                       [starting[k].opts["speaker"] for k in members], n_timesteps, temperature,
                                       length_scale)
                for k, mel in zip(members, mels):
                    starting[k].begin(marks[k], mel)
        pushes = [s.next_frames() for s in streams]
        audio = self.voice.vocoder.stream([s.vocoder_state for s in streams], [p[0] for p in pushes],
                                          [p[1] for p in pushes])
        return [s.emit(a, last) for s, a, (_, last) in zip(streams, audio, pushes)]


def _detect(path: Path) -> bool:
    if path.is_dir():
        return len(list(path.glob("*.ckpt"))) == 1
    return path.suffix == ".ckpt"


def load(path: Path, vocoder: str | Path | None = None) -> MatchaVoice:
    """A Matcha voice from a directory or a `.ckpt` (+ `vocoder`, the HiFi-GAN generator file or its directory)."""
    path = Path(path)
    ckpt = path
    if path.is_dir():
        found = sorted(path.glob("*.ckpt"))
        if len(found) != 1:
            raise NotAMatchaVoice(f"{path}: a Matcha voice directory holds exactly one .ckpt (found {len(found)})")
        ckpt = found[0]
    if vocoder is None:
        generator = find_vocoder(ckpt.parent)
    else:
        vocoder = Path(vocoder)
        if not vocoder.exists():
            raise NotAMatchaVoice(f"vocoder {vocoder} does not exist")
        generator = find_vocoder(vocoder) if vocoder.is_dir() else vocoder
    config = generator.parent / "config.json"
    if not config.exists():
        raise NotAMatchaVoice(f"{generator}: no config.json beside the HiFi-GAN generator")
    model, _ = load_matcha(ckpt)
    return MatchaVoice(model, load_hifigan(generator, config), path, generator)


FAMILY = VoiceFamily("matcha", "a Matcha-TTS voice (model.ckpt with a HiFi-GAN generator and its config.json beside "
                     "it or given as vocoder, or a directory holding the three)", _detect, load)

__all__ = ["FAMILY", "MatchaEngine", "MatchaStream", "MatchaVoice", "NotAHifiGan", "NotAMatchaCheckpoint",
           "NotAMatchaVoice", "find_vocoder", "load"]
