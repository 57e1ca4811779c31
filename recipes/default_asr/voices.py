"""Catalogue of the English synthetic voices installed on this machine (Debian packages), for the ASR corpus.

Engines, each driven through its command-line program with ``subprocess`` (no shell):

- ``espeak``: espeak-ng formant voices (accents ``en``, ``en-us``, ``en-gb-x-rp``, ``en-gb-scotland``, ``en-029``,
  ``en-gb-x-gbclan``, ``en-gb-x-gbcwmd``, ``en-us-nyc``) crossed with espeak-ng voice variants (``+m1`` .. ``+f5``,
  ``+klatt`` ...); espeak-ng driving MBROLA diphone databases (``mb-en1``, ``mb-us1``, ``mb-us3``), and reading
  English with 16 other languages' MBROLA databases (``mb-de4-en`` ...: accented, family ``mbrola_accented``).
  Rate: ``-s`` words per minute; pitch: ``-p`` (0..99).
- ``flite``: ``kal16``, ``kal`` (8 kHz), ``rms``, ``slt``. Rate: ``duration_stretch``; pitch:
  ``int_f0_target_mean`` (``rms`` ignores it).
- ``festival``: ``text2wave`` with ``kal_diphone``, ``ked_diphone`` (package festvox-kdlpc16k), ``rab_diphone``,
  ``don_diphone``, ``cmu_us_slt_arctic_hts``, and the MBROLA databases ``en1_mbrola``, ``us1_mbrola``, ``us3_mbrola``
  (family ``mbrola``). Rate: ``Duration_Stretch`` (diphone voices) or the hts_engine ``-r`` option; pitch:
  ``int_lr_params`` target F0 (diphone voices; the HTS voice has no pitch control here).

Every synthesis returns mono float32 audio at 16 kHz (resampled with soxr), with the engine's leading and trailing
silence cut to at most :data:`EDGE_SILENCE_S` and the peak set to :data:`PEAK`.

HELD-OUT VOICES: :data:`HELD_OUT` below is the one place that says which voices never appear in training or
development data: espeak-ng ``mb-us2`` (MBROLA us2, the primary test voice) and flite ``awb`` (secondary), and
:data:`HELD_OUT_ALIASES` the same speakers through other front ends (festival ``us2_mbrola``). They are unseen
speakers for the test sets; :func:`training_voices` can never return them, and :func:`test_voices` only returns them.

Run ``python recipes/default_asr/voices.py`` to check every voice and print the catalogue.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
PEAK = 0.7  # -3 dBFS; augmentation varies the level
EDGE_SILENCE_S = 0.2
TIMEOUT_S = 60

# ----------------------------------------------------------------------------------------------------------------
# THE held-out rule: (engine, model) pairs never used for train or dev. A model is the voice without its variant,
# so every espeak variant of mb-us2 ("mb-us2+f1") and every flite awb voice ("awb", "awb_time") is held out.
HELD_OUT: dict[str, tuple[str, str]] = {
    "mb-us2": ("espeak", "mb-us2"),  # primary test voice: MBROLA us2 (US male diphones) through espeak-ng
    "awb": ("flite", "awb"),  # secondary test voice: flite CMU ARCTIC awb (Scottish male, clustergen)
}


# Other front ends reading a held-out speaker's recordings are that speaker too: festival's us2_mbrola
# speaks with the MBROLA us2 diphones, festival's cmu_us_awb_cg with the awb ARCTIC voice.
HELD_OUT_ALIASES: set[tuple[str, str]] = {("festival", "us2_mbrola"), ("festival", "cmu_us_awb_cg")}


def is_held_out(engine: str, model: str) -> bool:
    """True when a voice of this engine and model is a held-out test voice (or the same speaker)."""
    if (engine, model) in HELD_OUT_ALIASES:
        return True
    for eng, mod in HELD_OUT.values():
        if engine == eng and (model == mod or model.startswith(mod + "+") or model.startswith(mod + "_")):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------


def _postprocess(audio: np.ndarray, sr: int) -> np.ndarray:
    """Mono float32 at 16 kHz, edge silence trimmed, peak normalised."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if sr != SAMPLE_RATE:
        audio = soxr.resample(audio, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    if audio.size == 0 or not np.all(np.isfinite(audio)):
        return np.zeros(0, np.float32)
    peak = float(np.max(np.abs(audio)))
    if peak <= 1e-6:
        return np.zeros(0, np.float32)
    # trim: 10 ms frames more than 45 dB under the loudest frame are silence
    hop = SAMPLE_RATE // 100
    n = audio.size // hop
    if n > 0:
        frames = audio[: n * hop].reshape(n, hop)
        energy = (frames ** 2).mean(axis=1)
        loud = np.flatnonzero(energy > energy.max() * 10 ** (-45 / 10))
        margin = int(EDGE_SILENCE_S * SAMPLE_RATE)
        start = max(0, loud[0] * hop - margin)
        end = min(audio.size, (loud[-1] + 1) * hop + margin)
        audio = audio[start:end]
    return (audio * (PEAK / peak)).astype(np.float32)


def _read_wav(path: str) -> tuple[np.ndarray, int]:
    audio, sr = sf.read(path, dtype="float32", always_2d=False)
    return audio, sr


@dataclass(frozen=True)
class Voice:
    """One synthetic voice. ``synthesize(text, rate_factor, pitch)`` returns (float32 audio, 16000).

    ``rate_factor`` > 1 speaks faster; ``pitch`` multiplies the voice's mean F0 where the engine can (1.0 = as is).
    """

    name: str  # unique, e.g. "espeak:en-us+m3", "flite:slt", "festival:kal_diphone"
    engine: str  # "espeak" | "flite" | "festival"
    model: str  # engine voice id, e.g. "en-us+m3", "slt", "kal_diphone"
    family: str  # sampling family: "espeak", "mbrola", "mbrola_accented", "flite", "festival"
    base_f0: float = 0.0  # flite / festival diphone: the F0 (Hz) that pitch=1 asks for
    pitch_control: bool = True
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def held_out(self) -> bool:
        return is_held_out(self.engine, self.model)

    def synthesize(self, text: str, rate_factor: float = 1.0, pitch: float = 1.0) -> tuple[np.ndarray, int]:
        text = " ".join(text.split())
        if not text:
            raise ValueError("empty text")
        with tempfile.TemporaryDirectory(prefix="chorus_tts_") as tmp:
            wav = os.path.join(tmp, "out.wav")
            if self.engine == "espeak":
                self._espeak(text, rate_factor, pitch, wav)
            elif self.engine == "flite":
                self._flite(text, rate_factor, pitch, wav)
            elif self.engine == "festival":
                self._festival(text, rate_factor, pitch, wav, tmp)
            else:
                raise ValueError(f"unknown engine {self.engine}")
            if not os.path.exists(wav) or os.path.getsize(wav) <= 44:
                raise RuntimeError(f"{self.name}: no audio produced")
            audio, sr = _read_wav(wav)
        audio = _postprocess(audio, sr)
        if audio.size == 0:
            raise RuntimeError(f"{self.name}: silent output")
        return audio, SAMPLE_RATE

    # -- engines -------------------------------------------------------------------------------------------------

    @staticmethod
    def _run(cmd: list[str], stdin: str | None = None) -> None:
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S)
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited {r.returncode}: {r.stderr.strip()[:300]}")
        err = r.stderr.strip()
        if err and ("error" in err.lower() or "unbound" in err.lower()):
            raise RuntimeError(f"{cmd[0]}: {err[:300]}")

    def _espeak(self, text: str, rate: float, pitch: float, wav: str) -> None:
        wpm = int(round(175 * rate))
        # espeak-ng -p: about 5.8 steps per semitone around the default 50 (measured)
        p = int(round(50 + 5.8 * 12 * math.log2(max(pitch, 1e-3))))
        p = min(99, max(0, p))
        self._run(["espeak-ng", "-v", self.model, "-s", str(wpm), "-p", str(p), "-w", wav, "--stdin"], stdin=text)

    def _flite(self, text: str, rate: float, pitch: float, wav: str) -> None:
        cmd = ["flite", "-voice", self.model, "--setf", f"duration_stretch={1.0 / rate:.3f}"]
        if self.pitch_control and self.base_f0:
            cmd += ["--setf", f"int_f0_target_mean={self.base_f0 * pitch:.1f}"]
        cmd += ["-t", text, "-o", wav]
        self._run(cmd)

    def _festival(self, text: str, rate: float, pitch: float, wav: str, tmp: str) -> None:
        txt = os.path.join(tmp, "in.txt")
        with open(txt, "w", encoding="ascii", errors="ignore") as f:
            f.write(text + "\n")
        cmd = ["text2wave", "-eval", f"(voice_{self.model})"]
        if self.extra.get("hts"):
            cmd += ["-eval", f'(set! hts_engine_params (append hts_engine_params (list (list "-r" {rate:.3f}))))']
        else:
            stretch = self.extra.get("base_stretch", 1.0) / rate
            cmd += ["-eval", f"(Parameter.set 'Duration_Stretch {stretch:.3f})"]
            if self.pitch_control and self.base_f0:
                mean, std = self.base_f0 * pitch, self.extra.get("f0_std", 14) * pitch
                cmd += ["-eval", f"(set! int_lr_params '((target_f0_mean {mean:.1f}) (target_f0_std {std:.1f}) "
                                 f"(model_f0_mean 170) (model_f0_std 34)))"]
        cmd += [txt, "-o", wav]
        self._run(cmd)


# ----------------------------------------------------------------------------------------------------------------
# the catalogue

ESPEAK_ACCENTS = ["en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                  "en-us-nyc"]
# espeak-ng voice variants that still sound like a person speaking (no whisper, robots, or effects)
ESPEAK_VARIANTS = ["", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
                   "klatt", "klatt2", "klatt3", "klatt4", "Andy", "Annie", "Alicia", "Lee", "Michael", "steph",
                   "linda", "john", "edward", "max", "paul", "robert", "david", "shelby", "travis", "victor",
                   "grandpa", "grandma", "adam", "benjamin", "caleb", "belinda", "aunty", "iven", "rob", "norbert",
                   "quincy"]
MBROLA_VOICES = ["mb-en1", "mb-us1", "mb-us2", "mb-us3"]
# festival's front end driving the English MBROLA databases (festvox-en1, -us1, -us3): the same speakers as
# espeak-ng's mb-en1/us1/us3 with another phonetiser and prosody; (model, mean F0 of the voice in Hz)
FESTIVAL_MBROLA_VOICES = [("en1_mbrola", 105.0), ("us1_mbrola", 180.0), ("us3_mbrola", 107.0)]
# espeak-ng reading English through other languages' MBROLA databases (mbrola-af1, -de1 ...): foreign-accented,
# but 16 more speakers of the diphone-concatenation kind that the held-out mb-us2 is
MBROLA_ACCENTED_VOICES = ["mb-af1-en", "mb-de1-en", "mb-de2-en", "mb-de3-en", "mb-de4-en", "mb-de5-en",
                          "mb-de6-en", "mb-fr1-en", "mb-fr4-en", "mb-gr2-en", "mb-hu1-en", "mb-nl2-en", "mb-pl1-en",
                          "mb-ro1-en", "mb-sw1-en", "mb-sw2-en"]

# share of the training utterances per family (split evenly over the family's voices that work)
FAMILY_WEIGHTS = {"espeak": 0.28, "mbrola": 0.25, "mbrola_accented": 0.10, "flite": 0.20, "festival": 0.17}


def all_voices() -> list[Voice]:
    """Every voice of the catalogue, the held-out ones included (not yet checked to work)."""
    voices: list[Voice] = []
    for acc in ESPEAK_ACCENTS:
        for var in ESPEAK_VARIANTS:
            model = f"{acc}+{var}" if var else acc
            voices.append(Voice(f"espeak:{model}", "espeak", model, "espeak"))
    for mb in MBROLA_VOICES:
        voices.append(Voice(f"espeak:{mb}", "espeak", mb, "mbrola"))
    for model, f0 in FESTIVAL_MBROLA_VOICES:
        voices.append(Voice(f"festival:{model}", "festival", model, "mbrola", base_f0=f0,
                            extra={"base_stretch": 1.0, "f0_std": 14}))
    for mb in MBROLA_ACCENTED_VOICES:
        voices.append(Voice(f"espeak:{mb}", "espeak", mb, "mbrola_accented"))
    voices += [
        Voice("flite:kal16", "flite", "kal16", "flite", base_f0=95.0),
        Voice("flite:kal", "flite", "kal", "flite", base_f0=95.0),
        Voice("flite:rms", "flite", "rms", "flite", pitch_control=False),  # ignores int_f0_target_mean
        Voice("flite:slt", "flite", "slt", "flite", base_f0=170.0),
        Voice("flite:awb", "flite", "awb", "flite", base_f0=133.0),
        Voice("festival:kal_diphone", "festival", "kal_diphone", "festival", base_f0=105.0,
              extra={"base_stretch": 1.05, "f0_std": 14}),
        Voice("festival:ked_diphone", "festival", "ked_diphone", "festival", base_f0=105.0,
              extra={"base_stretch": 1.0, "f0_std": 15}),
        # British male diphone voices (festvox-rablpc16k, festvox-don), added after the shipped model's first
        # 34,000 steps: more diphone speakers, the kind of engine the held-out MBROLA voice is
        Voice("festival:rab_diphone", "festival", "rab_diphone", "festival", base_f0=105.0,
              extra={"base_stretch": 1.0, "f0_std": 14}),
        Voice("festival:don_diphone", "festival", "don_diphone", "festival", base_f0=105.0,
              extra={"base_stretch": 1.0, "f0_std": 14}),
        Voice("festival:cmu_us_slt_arctic_hts", "festival", "cmu_us_slt_arctic_hts", "festival",
              pitch_control=False, extra={"hts": True}),
    ]
    return voices


def training_voices(voices: list[Voice] | None = None) -> list[Voice]:
    """The voices allowed in train and dev: never a held-out one."""
    out = [v for v in (all_voices() if voices is None else voices) if not v.held_out]
    assert not any(is_held_out(v.engine, v.model) for v in out)
    return out


def test_voices(voices: list[Voice] | None = None) -> dict[str, Voice]:
    """{"mb-us2": voice, "awb": voice}: the held-out voices, keyed as in :data:`HELD_OUT`."""
    by_key = {(v.engine, v.model): v for v in (all_voices() if voices is None else voices)}
    return {key: by_key[pair] for key, pair in HELD_OUT.items() if pair in by_key}


def voice_weights(voices: list[Voice]) -> np.ndarray:
    """Sampling probability of each voice: :data:`FAMILY_WEIGHTS` split evenly within each family."""
    counts: dict[str, int] = {}
    for v in voices:
        counts[v.family] = counts.get(v.family, 0) + 1
    w = np.array([FAMILY_WEIGHTS.get(v.family, 0.1) / counts[v.family] for v in voices], dtype=np.float64)
    return w / w.sum()


CHECK_TEXT = "the quick brown fox jumps over the lazy dog, and then it runs away."


def _espeak_variant_dir() -> str | None:
    try:
        out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if "Data at:" not in out:
        return None
    return os.path.join(out.split("Data at:", 1)[1].strip(), "voices", "!v")


def check_voice(voice: Voice) -> tuple[bool, str]:
    """Synthesize a test sentence; ok when the audio is finite, not silent and of a plausible length.
    An espeak-ng variant must exist as a file (espeak-ng silently ignores an unknown variant)."""
    if voice.engine == "espeak" and "+" in voice.model:
        vdir = _espeak_variant_dir()
        variant = voice.model.split("+", 1)[1]
        if vdir and not os.path.exists(os.path.join(vdir, variant)):
            return False, f"espeak-ng variant {variant!r} not installed"
    try:
        audio, sr = voice.synthesize(CHECK_TEXT, 1.0, 1.0)
    except Exception as e:  # noqa: BLE001 - any failure means the voice is unusable
        return False, f"{type(e).__name__}: {e}"
    dur = audio.size / sr
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    if not (1.5 <= dur <= 10.0):
        return False, f"implausible duration {dur:.2f} s"
    if rms < 0.01:
        return False, f"nearly silent (rms {rms:.4f})"
    return True, f"{dur:.2f} s, rms {rms:.3f}"


def check_voices(voices: list[Voice], workers: int = 1) -> tuple[list[Voice], dict[str, str]]:
    """(voices that work, {name: reason} for those that do not)."""
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as ex:
            results = list(ex.map(check_voice, voices))
    else:
        results = [check_voice(v) for v in voices]
    ok = [v for v, (good, _) in zip(voices, results) if good]
    failed = {v.name: msg for v, (good, msg) in zip(voices, results) if not good}
    return ok, failed


def main() -> None:
    voices = all_voices()
    ok, failed = check_voices(voices, workers=2)
    for v in voices:
        status = "FAILED " + failed[v.name] if v.name in failed else "ok"
        tag = " [HELD OUT]" if v.held_out else ""
        print(f"{v.name:<40}{v.family:<16}{status}{tag}")
    print(f"{len(ok)}/{len(voices)} voices work; training voices: {len(training_voices(ok))}; "
          f"test voices: {sorted(test_voices(ok))}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
