"""On-the-fly audio augmentation for ASR training (float32 mono 16 kHz numpy audio, numpy ``Generator``).

All functions are vectorised (numpy FFTs, scipy filters, soxr resampling): they run inside the training data
loader. None of them moves the speech in time except :func:`speed`, which changes the length by design (the
transcript stays valid: the same words, faster or slower). Reverberation keeps the direct path at lag 0, so word
timings do not shift.

    rng = np.random.default_rng(seed)
    audio = random_augment(audio, rng)

The functions take and return float32 arrays; outputs are finite and within [-1, 1].
"""

from __future__ import annotations

import numpy as np
import soxr
from scipy import signal

SAMPLE_RATE = 16000
NOISE_KINDS = ("white", "pink", "brown")
SPEED_FACTORS = (0.9, 1.0, 1.1)

_TEL_SOS = signal.butter(4, [300.0, 3400.0], btype="bandpass", fs=SAMPLE_RATE, output="sos")


def _finish(audio: np.ndarray) -> np.ndarray:
    audio = np.nan_to_num(np.asarray(audio, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False)


def _peak(audio: np.ndarray) -> float:
    return float(np.max(np.abs(audio))) if audio.size else 0.0


def _power(audio: np.ndarray) -> float:
    return float(np.mean(np.square(audio, dtype=np.float64))) if audio.size else 0.0


# ----------------------------------------------------------------------------------------------------------------


def gain(audio: np.ndarray, rng: np.random.Generator, low_db: float = -12.0, high_db: float = 6.0,
         gain_db: float | None = None, max_peak: float = 0.99) -> np.ndarray:
    """Scale by a random gain in [low_db, high_db] dB; a gain that would clip is lowered to reach ``max_peak``."""
    if gain_db is None:
        gain_db = float(rng.uniform(low_db, high_db))
    g = 10.0 ** (gain_db / 20.0)
    peak = _peak(audio)
    if peak * g > max_peak and peak > 0:
        g = max_peak / peak
    return _finish(audio * np.float32(g))


def colored_noise(n: int, rng: np.random.Generator, kind: str = "white", sr: int = SAMPLE_RATE) -> np.ndarray:
    """Unit-variance noise: white (flat), pink (power 1/f) or brown (power 1/f^2), shaped in the frequency domain."""
    if n <= 0:
        return np.zeros(0, np.float32)
    if kind == "white":
        x = rng.standard_normal(n)
    else:
        exponent = {"pink": 0.5, "brown": 1.0}[kind]  # amplitude ~ f^-exponent
        m = n // 2 + 1
        spec = rng.standard_normal(m) + 1j * rng.standard_normal(m)
        f = np.fft.rfftfreq(n, d=1.0 / sr)
        f = np.maximum(f, 20.0)  # no energy pile-up below 20 Hz
        spec *= f ** -exponent
        spec[0] = 0.0
        x = np.fft.irfft(spec, n)
    x = x - x.mean()
    std = x.std()
    return (x / std if std > 0 else x).astype(np.float32)


def add_noise(audio: np.ndarray, rng: np.random.Generator, snr_db: float | None = None, kind: str | None = None,
              snr_low: float = 5.0, snr_high: float = 40.0) -> np.ndarray:
    """Add white / pink / brown noise at ``snr_db`` (random in [snr_low, snr_high] when None) relative to the
    power of the whole signal. The result is not rescaled, except to avoid clipping (which keeps the SNR)."""
    if kind is None:
        kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
    if snr_db is None:
        snr_db = float(rng.uniform(snr_low, snr_high))
    p = _power(audio)
    if p <= 0:
        return _finish(audio)
    noise = colored_noise(audio.size, rng, kind)
    noise *= np.float32(np.sqrt(p / 10.0 ** (snr_db / 10.0)))
    out = audio + noise
    peak = _peak(out)
    if peak > 0.99:
        out *= np.float32(0.99 / peak)
    return _finish(out)


def synthetic_rir(rng: np.random.Generator, rt60: float | None = None, drr_db: float | None = None,
                  sr: int = SAMPLE_RATE) -> np.ndarray:
    """A room impulse response: a unit direct path at lag 0, then after a short pre-delay a tail of Gaussian
    noise decaying by 60 dB in ``rt60`` seconds (random in [0.1, 0.8]), at a direct-to-reverberant energy ratio
    ``drr_db`` (random in [-3, 12] dB)."""
    if rt60 is None:
        rt60 = float(rng.uniform(0.1, 0.8))
    if drr_db is None:
        drr_db = float(rng.uniform(-3.0, 12.0))
    n = max(2, int(rt60 * 1.2 * sr))
    t = np.arange(n) / sr
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60)  # ln(1000): -60 dB of amplitude at rt60
    predelay = int(rng.uniform(0.002, 0.012) * sr)
    tail[: predelay + 1] = 0.0
    energy = float(np.sum(tail ** 2))
    if energy > 0:
        tail *= np.sqrt(10.0 ** (-drr_db / 10.0) / energy)
    tail[0] = 1.0
    return tail.astype(np.float32)


def reverb(audio: np.ndarray, rng: np.random.Generator, rt60: float | None = None,
           drr_db: float | None = None) -> np.ndarray:
    """Convolve with :func:`synthetic_rir`; the output has the input's length and timing (direct path at lag 0)
    and the input's peak level."""
    if audio.size == 0:
        return _finish(audio)
    rir = synthetic_rir(rng, rt60, drr_db)
    out = signal.fftconvolve(audio, rir, mode="full")[: audio.size]
    peak_in, peak_out = _peak(audio), _peak(out)
    if peak_out > 0:
        out = out * (peak_in / peak_out)
    return _finish(out)


def _mu_law(audio: np.ndarray, mu: float = 255.0) -> np.ndarray:
    """8-bit mu-law companding round trip (G.711 style quantisation)."""
    x = np.clip(audio, -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    q = np.round((y + 1.0) * 127.5) / 127.5 - 1.0
    return np.sign(q) * np.expm1(np.abs(q) * np.log1p(mu)) / mu


def telephone(audio: np.ndarray, rng: np.random.Generator, mu_law: bool | None = None) -> np.ndarray:
    """Telephone channel: 300-3400 Hz band-pass, down to 8 kHz and back to 16 kHz, optionally 8-bit mu-law."""
    if audio.size == 0:
        return _finish(audio)
    if mu_law is None:
        mu_law = bool(rng.random() < 0.5)
    x = signal.sosfilt(_TEL_SOS, audio.astype(np.float64))
    x8 = soxr.resample(x.astype(np.float32), SAMPLE_RATE, 8000, quality="HQ")
    if mu_law:
        peak = _peak(x8)
        if peak > 0:
            x8 = (_mu_law(x8 / peak) * peak).astype(np.float32)
    y = soxr.resample(x8, 8000, SAMPLE_RATE, quality="HQ")
    # the band-pass and two resamplings keep the length within a sample or two; make it exact
    if y.size >= audio.size:
        y = y[: audio.size]
    else:
        y = np.pad(y, (0, audio.size - y.size))
    return _finish(y)


def speed(audio: np.ndarray, factor: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Speed perturbation by resampling (tempo and pitch together, as Kaldi's): the output lasts
    ``len(audio) / factor`` samples."""
    if factor == 1.0 or audio.size == 0:
        return _finish(audio)
    out = soxr.resample(audio.astype(np.float32), sr * factor, sr, quality="HQ")
    return _finish(out)


# ----------------------------------------------------------------------------------------------------------------


def random_augment(audio: np.ndarray, rng: np.random.Generator, *, p_clean: float = 0.2, p_speed: float = 0.4,
                   p_reverb: float = 0.3, p_noise: float = 0.5, p_telephone: float = 0.1, p_gain: float = 0.8,
                   allow_speed: bool = True) -> np.ndarray:
    """A random chain: speed (0.9 / 1.1) -> reverberation -> noise -> telephone band -> gain. With probability
    ``p_clean`` the audio comes back untouched. ``allow_speed=False`` keeps the length (e.g. when the loader has
    already bucketed by length)."""
    audio = np.asarray(audio, dtype=np.float32)
    if rng.random() < p_clean:
        return _finish(audio)
    if allow_speed and rng.random() < p_speed:
        audio = speed(audio, float(rng.choice([0.9, 1.1])))
    if rng.random() < p_reverb:
        audio = reverb(audio, rng)
    if rng.random() < p_noise:
        audio = add_noise(audio, rng)
    if rng.random() < p_telephone:
        audio = telephone(audio, rng)
    if rng.random() < p_gain:
        audio = gain(audio, rng)
    return _finish(audio)
