"""Training data for the default model: manifests, duration buckets, augmentation, features."""
from __future__ import annotations

import math

import numpy as np
import torch

from chorus.asr.evaluate import read_manifest  # noqa: F401  (re-exported for train.py)
from chorus.codecs import read_audio, resample
from chorus.stream.features import MelFrontend

import augment


# Sources whose clips are one spoken word (a digit): nothing to align, so no use to start an epoch with.
ISOLATED_WORD_SOURCES = frozenset({"digits", "fsdd"})


def duration_batches(rows: list[dict], max_seconds: float, max_items: int, rng: np.random.Generator,
                     jitter: float = 0.1, shortest_first: bool = False) -> list[list[int]]:
    """Group utterances of similar length so that padded audio per batch stays under max_seconds.

    Batches come in random order, or shortest first (SortaGrad: an easier start for CTC/RNNT). Shortest
    first orders the sentences only; the batches of isolated words go to random places among them. In
    duration order the ~9,000 digit clips would fill the first ~180 batches, and a from-scratch run that
    began that way (digits while the learning rate warmed up, then sentences) never left the blank plateau.
    """
    durations = np.array([r["duration"] for r in rows])
    order = np.argsort(durations * (1 + jitter * rng.random(len(rows))))
    if not shortest_first:
        batches = _pack(order, durations, max_seconds, max_items)
        rng.shuffle(batches)
        return batches
    isolated = np.array([r.get("source") in ISOLATED_WORD_SOURCES for r in rows], dtype=bool)
    batches = _pack(order[~isolated[order]], durations, max_seconds, max_items)
    for batch in _pack(order[isolated[order]], durations, max_seconds, max_items):
        batches.insert(int(rng.integers(0, len(batches) + 1)), batch)
    return batches


def _pack(order: np.ndarray, durations: np.ndarray, max_seconds: float, max_items: int) -> list[list[int]]:
    """Consecutive rows of `order` in batches of at most max_items and max_seconds of padded audio."""
    batches, current, longest = [], [], 0.0
    for i in order:
        d = durations[i]
        if current and (max(longest, d) * (len(current) + 1) > max_seconds or len(current) >= max_items):
            batches.append(current)
            current, longest = [], 0.0
        current.append(int(i))
        longest = max(longest, d)
    if current:
        batches.append(current)
    return batches


def pad_silence(audio: np.ndarray, rng: np.random.Generator, rate: int, p: float = 0.6,
                max_seconds: float = 0.6) -> np.ndarray:
    """Random silence before and after (many synthetic clips start right at speech onset; live
    audio does not), so the model learns to stay blank through pauses."""
    if rng.random() >= p:
        return audio
    before, after = (int(rng.uniform(0, max_seconds) * rate) for _ in range(2))
    return np.concatenate([np.zeros(before, np.float32), audio, np.zeros(after, np.float32)])


def spec_augment(mel: torch.Tensor, rng: np.random.Generator, freq_masks: int = 2, freq_width: int = 15,
                 time_masks: int = 5, time_fraction: float = 0.05) -> torch.Tensor:
    """NeMo-style SpecAugment on one utterance [n_mels, T]: masked frequency and time bands.

    NeMo masks with 0.0, which is neutral for its per-feature normalized features; this model's
    log-mel is not normalized (streaming), where 0.0 is a very loud band (speech sits around -10).
    Masks take the utterance's mean instead."""
    mel = mel.clone()
    fill = float(mel.mean())
    n_mels, t = mel.shape
    for _ in range(freq_masks):
        w = int(rng.integers(0, freq_width + 1))
        f0 = int(rng.integers(0, max(1, n_mels - w)))
        mel[f0:f0 + w] = fill
    max_w = max(1, int(time_fraction * t))
    for _ in range(time_masks):
        w = int(rng.integers(0, max_w + 1))
        t0 = int(rng.integers(0, max(1, t - w)))
        mel[:, t0:t0 + w] = fill
    return mel


def vtlp_warp(freqs: np.ndarray, alpha: float, nyquist: float, f_hi: float = 4800.0) -> np.ndarray:
    """Piecewise-linear frequency warp of VTLP (Jaitly & Hinton 2013; Kaldi's VTLN): f -> alpha * f up to a
    boundary, then a straight line to Nyquist, so that [0, Nyquist] maps onto itself."""
    boundary = f_hi * min(alpha, 1.0) / alpha
    upper = nyquist - (nyquist - alpha * boundary) / (nyquist - boundary) * (nyquist - freqs)
    return np.where(freqs <= boundary, alpha * freqs, upper)


def vtlp_filterbank(filterbank: torch.Tensor, alpha: float, sample_rate: int) -> torch.Tensor:
    """A filterbank that hears a voice as if its vocal tract were 1/alpha as long.

    Filter m of the result weighs FFT frequency f as filter m weighs vtlp_warp(f) (alpha * f below the
    boundary): a formant at f shows in the features where one at alpha * f would, so alpha > 1 moves formants up."""
    n_bins = filterbank.shape[-1]
    freqs = np.linspace(0.0, sample_rate / 2, n_bins)
    warped = vtlp_warp(freqs, alpha, sample_rate / 2)
    fb = filterbank.double().numpy()
    out = np.stack([np.interp(warped, freqs, row) for row in fb])
    return torch.from_numpy(out).to(filterbank.dtype)


def band_centres(filterbank: torch.Tensor, sample_rate: int) -> np.ndarray:
    """Centre frequency (Hz) of each mel band: the weighted mean of the frequencies it sums."""
    fb = filterbank.double().numpy()
    freqs = np.linspace(0.0, sample_rate / 2, fb.shape[-1])
    return (fb @ freqs) / np.maximum(fb.sum(axis=1), 1e-12)


def spectral_tilt(mel: torch.Tensor, db_per_octave: float, centres: np.ndarray, mag_power: float) -> torch.Tensor:
    """Log-mel [n_mels, T] of the same audio through a filter of db_per_octave slope around 1 kHz.

    Voices differ in how fast their spectrum falls with frequency (breathy, pressed, a diphone
    database's recording chain); the log-mel of power spectra is shifted by the gain in nats."""
    gain_db = db_per_octave * np.log2(np.maximum(centres, 50.0) / 1000.0)
    nats = gain_db * math.log(10) / 20 * mag_power  # dB of amplitude -> ln of |X| ** mag_power
    return mel + torch.as_tensor(nats, dtype=mel.dtype)[:, None]


class UtteranceDataset(torch.utils.data.Dataset):
    """Yields (log-mel [n_mels, T], token ids) with on-the-fly audio and spectrum augmentation."""

    def __init__(self, rows: list[dict], tokenizer, frontend: MelFrontend, *, train: bool, seed: int = 0,
                 vtlp: float = 0.0, tilt: float = 0.0):
        self.rows = rows
        self.tokenizer = tokenizer
        self.frontend = frontend
        self.train = train  # augment (silence, audio effects, SpecAugment)
        self.seed = seed
        self.epoch = 0
        self.vtlp = vtlp  # probability of a warped filterbank per training utterance
        self._warped: dict[float, MelFrontend] = {}
        self.tilt = tilt  # probability of a random spectral tilt (+-3 dB per octave) per training utterance
        self._centres = band_centres(frontend.filterbank, frontend.config.sample_rate)

    def frontend_for(self, rng: np.random.Generator) -> MelFrontend:
        """The plain frontend, or (with probability vtlp) one with a VTLP-warped filterbank; factors are
        drawn from 0.88..1.12 in steps of 0.01 so that the few distinct filterbanks are built once."""
        if not (self.train and self.vtlp > 0 and rng.random() < self.vtlp):
            return self.frontend
        alpha = round(float(rng.uniform(0.88, 1.12)), 2)
        if alpha not in self._warped:
            fb = vtlp_filterbank(self.frontend.filterbank, alpha, self.frontend.config.sample_rate)
            self._warped[alpha] = MelFrontend(self.frontend.config, self.frontend.window, fb)
        return self._warped[alpha]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        audio, rate = read_audio(row["audio_filepath"])
        if rate != self.frontend.config.sample_rate:
            audio = resample(audio, rate, self.frontend.config.sample_rate)
        rng = np.random.default_rng((self.seed, self.epoch, i))
        if self.train or row.get("augment"):  # (repeated copies of real speech are always augmented)
            audio = pad_silence(audio, rng, self.frontend.config.sample_rate)
            audio = augment.random_augment(audio, rng)
        mel = self.frontend_for(rng).offline(audio)
        if self.train and self.tilt > 0 and rng.random() < self.tilt:
            mel = spectral_tilt(mel, float(rng.uniform(-3.0, 3.0)), self._centres, self.frontend.config.mag_power)
        if self.train:
            mel = spec_augment(mel, rng)
        return mel, torch.tensor(self.tokenizer.encode(row["text"]), dtype=torch.long)


def collate(items):
    mels, tokens = zip(*items)
    b = len(items)
    t_max = max(m.shape[1] for m in mels)
    u_max = max(1, max(len(t) for t in tokens))
    mel = torch.zeros(b, mels[0].shape[0], t_max)
    target = torch.zeros(b, u_max, dtype=torch.long)
    for i, (m, t) in enumerate(zip(mels, tokens)):
        mel[i, :, :m.shape[1]] = m
        target[i, :len(t)] = t
    return (mel, torch.tensor([m.shape[1] for m in mels]), target,
            torch.tensor([len(t) for t in tokens]))


def repeat_source(rows: list[dict], source: str, times: int) -> list[dict]:
    """The rows plus (times - 1) augmented copies of those from `source`.

    FSDD is the only real speech in the corpus and a sliver of it (1,440 short clips among ~25,000
    utterances); repeating it, each copy with its own audio augmentation, weighs real voices more."""
    extra = [dict(r, augment=True) for r in rows if r.get("source") == source]
    return rows + extra * (times - 1)


def hours(rows: list[dict]) -> float:
    return sum(r["duration"] for r in rows) / 3600.0


def steps_per_epoch(rows: list[dict], max_seconds: float) -> int:
    return max(1, math.ceil(sum(r["duration"] for r in rows) / (0.8 * max_seconds)))
