import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "recipes" / "default_asr" / "augment.py"
_spec = importlib.util.spec_from_file_location("default_asr_augment", _PATH)
aug = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aug)

SR = 16000


def speechlike(seconds=2.0, seed=0, amp=0.3):
    """Harmonic tone with a syllable-rate envelope and short pauses: a stand-in for speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 8))
    env = np.clip(np.sin(2 * np.pi * 3 * t), 0, None) ** 0.5
    x = x * env + 0.01 * rng.standard_normal(t.size)
    return (amp * x / np.max(np.abs(x))).astype(np.float32)


def check(out, n=None):
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.ndim == 1
    assert np.all(np.isfinite(out))
    assert np.max(np.abs(out)) <= 1.0 if out.size else True
    if n is not None:
        assert out.size == n


def snr_db(clean, noisy):
    noise = noisy.astype(np.float64) - clean
    return 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise ** 2))


@pytest.mark.parametrize("fn", [
    lambda x, r: aug.gain(x, r),
    lambda x, r: aug.add_noise(x, r),
    lambda x, r: aug.reverb(x, r),
    lambda x, r: aug.telephone(x, r),
    lambda x, r: aug.telephone(x, r, mu_law=True),
    lambda x, r: aug.random_augment(x, r, allow_speed=False),
])
def test_length_dtype_finite(fn):
    x = speechlike()
    for seed in range(5):
        check(fn(x, np.random.default_rng(seed)), n=x.size)


@pytest.mark.parametrize("x", [np.zeros(16000, np.float32), np.zeros(0, np.float32),
                               np.full(7, 0.5, np.float32), np.ones(3000, np.float32)])
def test_degenerate_inputs(x):
    rng = np.random.default_rng(0)
    for fn in (aug.gain, aug.add_noise, aug.reverb, aug.telephone):
        check(fn(x, rng), n=x.size)
    for seed in range(10):
        check(aug.random_augment(x, np.random.default_rng(seed)))


def test_determinism_under_seed():
    x = speechlike()
    for seed in range(20):
        a = aug.random_augment(x, np.random.default_rng(seed))
        b = aug.random_augment(x, np.random.default_rng(seed))
        np.testing.assert_array_equal(a, b)
    outs = {aug.random_augment(x, np.random.default_rng(s)).tobytes() for s in range(20)}
    assert len(outs) > 10


def test_some_utterances_left_clean():
    x = speechlike()
    clean = sum(np.array_equal(aug.random_augment(x, np.random.default_rng(s)), x) for s in range(200))
    assert 15 <= clean <= 80  # p_clean 0.2 plus chains that drew nothing


@pytest.mark.parametrize("kind", aug.NOISE_KINDS)
@pytest.mark.parametrize("target", [5.0, 20.0, 40.0])
def test_snr_as_asked(kind, target):
    x = speechlike(amp=0.1)
    y = aug.add_noise(x, np.random.default_rng(1), snr_db=target, kind=kind)
    check(y, n=x.size)
    assert abs(snr_db(x, y) - target) < 0.5


def test_random_snr_in_range():
    x = speechlike(amp=0.1)
    for seed in range(20):
        s = snr_db(x, aug.add_noise(x, np.random.default_rng(seed)))
        assert 4.5 <= s <= 40.5


def test_noise_colours():
    rng = np.random.default_rng(0)
    n = 1 << 16
    f = np.fft.rfftfreq(n, 1 / SR)

    def band_ratio(kind):
        p = np.abs(np.fft.rfft(aug.colored_noise(n, rng, kind))) ** 2
        return 10 * np.log10(p[(f > 100) & (f < 200)].mean() / p[(f > 4000) & (f < 8000)].mean())

    assert abs(band_ratio("white")) < 1.5
    assert 10 < band_ratio("pink") < 20  # ~ 10*log10(5600/150) = 15.7 dB
    assert 25 < band_ratio("brown") < 38  # twice that


def test_gain_range_and_clip_safety():
    x = speechlike(amp=0.05)
    y = aug.gain(x, np.random.default_rng(0), gain_db=6.0)
    assert np.allclose(y, x * 10 ** (6 / 20), atol=1e-6)
    y = aug.gain(x, np.random.default_rng(0), gain_db=-12.0)
    assert np.allclose(y, x * 10 ** (-12 / 20), atol=1e-6)
    loud = speechlike(amp=0.9)
    y = aug.gain(loud, np.random.default_rng(0), gain_db=6.0)
    assert np.max(np.abs(y)) <= 0.99 + 1e-6
    for seed in range(50):
        g = np.max(np.abs(aug.gain(x, np.random.default_rng(seed)))) / np.max(np.abs(x))
        assert 10 ** (-12.01 / 20) <= g <= 10 ** (6.01 / 20)


def test_reverb_keeps_timing_and_decays():
    rng = np.random.default_rng(3)
    for rt60 in (0.1, 0.4, 0.8):
        rir = aug.synthetic_rir(rng, rt60=rt60, drr_db=0.0)
        assert rir[0] == 1.0
        assert abs(np.sum(rir[1:] ** 2) - 1.0) < 1e-3  # drr 0 dB
        n = rir.size
        head, tail = np.sum(rir[1: n // 10] ** 2), np.sum(rir[-n // 10:] ** 2)
        assert tail < head * 1e-3
    x = np.zeros(SR, np.float32)
    x[5000] = 0.5
    y = aug.reverb(x, rng, rt60=0.5, drr_db=6.0)
    check(y, n=x.size)
    assert int(np.argmax(np.abs(y))) == 5000
    assert np.max(np.abs(y[:5000])) < 1e-6  # nothing before the direct path (FFT round-off only)
    s = speechlike()
    y = aug.reverb(s, rng)
    xc = np.fft.irfft(np.fft.rfft(s, 2 * s.size) * np.conj(np.fft.rfft(y, 2 * s.size)))
    assert int(np.argmax(np.abs(xc))) == 0


def test_telephone_band():
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(4 * SR)).astype(np.float32)
    y = aug.telephone(x, rng, mu_law=False)
    check(y, n=x.size)
    f = np.fft.rfftfreq(x.size, 1 / SR)
    px, py = np.abs(np.fft.rfft(x)) ** 2, np.abs(np.fft.rfft(y)) ** 2
    high = (f > 4200)
    low = (f < 100)
    mid = (f > 800) & (f < 2500)
    assert py[high].sum() < 1e-4 * px[high].sum()
    assert py[low].sum() < 0.05 * px[low].sum()
    assert 0.5 < py[mid].sum() / px[mid].sum() < 1.5
    ym = aug.telephone(x, rng, mu_law=True)
    check(ym, n=x.size)
    assert not np.array_equal(ym, y)


@pytest.mark.parametrize("factor", aug.SPEED_FACTORS)
def test_speed_changes_length(factor):
    x = speechlike(seconds=3.0)
    y = aug.speed(x, factor)
    check(y)
    assert abs(y.size - x.size / factor) <= 2


def test_fast_enough():
    x = speechlike(seconds=10.0)
    aug.random_augment(x, np.random.default_rng(0))
    t0 = time.perf_counter()
    for seed in range(20):
        aug.random_augment(x, np.random.default_rng(seed), p_clean=0.0, p_reverb=1.0, p_noise=1.0,
                           p_telephone=0.5)
    per_clip = (time.perf_counter() - t0) / 20
    assert per_clip < 0.5, per_clip  # typically ~20 ms for 10 s of audio

