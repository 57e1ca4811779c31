"""Streaming resampling (chorus.codecs.resample) against one-shot soxr.resample.

libsoxr buffers input into its own blocks, so streaming in any chunking reproduces the one-shot result (measured:
bit-identical) and the total length is libsoxr's floor(n * out / in + 0.5) whatever the chunking.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from chorus.codecs import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AudioFormatError,
    StreamingResampler,
    check_sample_rate,
    read_audio,
    resample,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _signal(rate: int, seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """A linear chirp from 50 Hz to 0.45 * rate, plus seeded noise: content across the whole band."""
    n = int(rate * seconds) + 123  # not a whole number of anything
    t = np.arange(n) / rate
    f0, f1 = 50.0, 0.45 * rate
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2))
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.5 * chirp + 0.05 * noise).astype(np.float32)


def _chunk_sizes(n: int, mode: str, rng: np.random.Generator) -> list[int]:
    if mode == "oneshot":
        return [n]
    sizes: list[int] = []
    if mode == "tiny":
        # 1-sample chunks with empty chunks between them, then random sizes for the rest.
        sizes = [1, 0] * 2000
    while sum(sizes) < n:
        sizes.append(int(rng.choice([0, 1, 2, 3, 7, 160, 441, 882, 1024, 4096, rng.integers(0, 5000)])))
    sizes[-1] -= sum(sizes) - n
    return sizes


def _stream(x: np.ndarray, sizes: list[int], r: StreamingResampler) -> np.ndarray:
    out, pos = [], 0
    for k in sizes:
        y = r.process(x[pos : pos + k])
        assert y.dtype == np.float32 and y.ndim == 1
        out.append(y)
        pos += k
    assert pos == len(x)
    out.append(r.flush())
    return np.concatenate(out)


def _soxr_length(n: int, in_rate: int, out_rate: int) -> int:
    # libsoxr's rate_flush(): samples_out = samples_in / factor + .5, truncated.
    return int(n / (in_rate / out_rate) + 0.5)


@pytest.mark.parametrize("mode", ["oneshot", "random", "tiny"])
@pytest.mark.parametrize("in_rate", [8000, 44100, 48000])
def test_stream_equals_oneshot(in_rate, mode):
    x = _signal(in_rate)
    ref = soxr.resample(x, in_rate, 16000, "HQ")
    r = StreamingResampler(in_rate, 16000)
    y = _stream(x, _chunk_sizes(len(x), mode, np.random.default_rng(in_rate)), r)
    assert len(ref) == _soxr_length(len(x), in_rate, 16000)
    assert len(y) == len(ref)
    # The project's bar is 1e-4 away from the ends; soxr meets far better than that over the whole signal.
    assert np.abs(y - ref).max() <= 1e-6
    assert np.abs(ref).max() > 0.3  # the comparison is not between two silences


@pytest.mark.parametrize("in_rate", [8000, 11025, 22050, 44100, 48000])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 100, 1001])
def test_length_of_short_inputs(in_rate, n):
    x = np.random.default_rng(n).uniform(-0.5, 0.5, n).astype(np.float32)
    r = StreamingResampler(in_rate, 16000)
    y = _stream(x, [1] * n, r)
    assert len(y) == _soxr_length(n, in_rate, 16000) == len(soxr.resample(x, in_rate, 16000, "HQ"))


@pytest.mark.parametrize("in_rate", [8000, 44100, 48000])
def test_held_back_output_is_bounded(in_rate):
    """Real-time use: with 20 ms chunks, libsoxr (HQ) never holds back more than 150 ms of output."""
    r = StreamingResampler(in_rate, 16000)
    chunk = _signal(in_rate, seconds=0.02)[: in_rate // 50]
    fed = produced = 0
    worst = 0.0
    for _ in range(150):
        fed += len(chunk)
        produced += len(r.process(chunk))
        worst = max(worst, (fed * 16000 / in_rate - produced) / 16000)
    assert produced > 0
    assert worst <= 0.150, worst


def test_passthrough_is_exact_copy():
    x = _signal(16000)
    r = StreamingResampler(16000, 16000)
    assert r.passthrough
    sizes = _chunk_sizes(len(x), "random", np.random.default_rng(7))
    y = _stream(x, sizes, r)
    np.testing.assert_array_equal(y, x)
    chunk = x[:320].copy()
    out = StreamingResampler(16000, 16000).process(chunk)
    chunk[:] = 0  # the caller reuses its buffer
    np.testing.assert_array_equal(out, x[:320])
    one = resample(x, 16000, 16000)
    assert not np.shares_memory(one, x)
    np.testing.assert_array_equal(one, x)


def test_passthrough_converts_to_float32():
    x = np.linspace(-1, 1, 100)  # float64
    y = StreamingResampler(8000, 8000).process(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x.astype(np.float32))


def test_resample_helper_equals_soxr():
    x = _signal(44100, seconds=1.0)
    np.testing.assert_array_equal(resample(x, 44100, 16000), soxr.resample(x, 44100, 16000, "HQ"))
    np.testing.assert_array_equal(resample(x.astype(np.float64), 44100, 16000, "VHQ"),
                                  soxr.resample(x, 44100, 16000, "VHQ"))


@pytest.mark.parametrize("rates", [(44100, 16000), (16000, 16000)])
def test_no_input_after_flush(rates):
    r = StreamingResampler(*rates)
    r.process(np.zeros(1000, np.float32))
    r.flush()
    with pytest.raises(RuntimeError, match="after flush"):
        r.process(np.zeros(10, np.float32))
    with pytest.raises(RuntimeError, match="twice"):
        r.flush()


@pytest.mark.parametrize("bad", [0, -16000, 16000.0, "16000", True, None])
def test_rates_validated(bad):
    with pytest.raises(AudioFormatError, match="in_rate must be a positive integer"):
        StreamingResampler(bad, 16000)
    with pytest.raises(AudioFormatError, match="out_rate must be a positive integer"):
        StreamingResampler(16000, bad)
    with pytest.raises(AudioFormatError, match="must be a positive integer"):
        resample(np.zeros(10, np.float32), bad, 16000)


def test_numpy_integer_rates_accepted():
    r = StreamingResampler(np.int64(48000), np.int32(16000))
    assert (r.in_rate, r.out_rate) == (48000, 16000) and type(r.in_rate) is int
    assert len(r.process(np.zeros(4800, np.float32))) + len(r.flush()) == 1600


def test_quality_and_shape_validated():
    with pytest.raises(ValueError, match="unknown resampling quality 'XQ'"):
        StreamingResampler(48000, 16000, quality="XQ")
    with pytest.raises(AudioFormatError, match="1-D"):
        StreamingResampler(48000, 16000).process(np.zeros((480, 2), np.float32))


def test_check_sample_rate():
    assert (MIN_SAMPLE_RATE, MAX_SAMPLE_RATE) == (8000, 192000)
    for ok in (8000, 16000, 44100, 192000, np.int64(22050)):
        assert check_sample_rate(ok) == ok and type(check_sample_rate(ok)) is int
    for low_or_high in (7999, 192001, 0, -8000):
        with pytest.raises(AudioFormatError, match=f"sample rate {low_or_high} Hz is outside .*8000-192000 Hz"):
            check_sample_rate(low_or_high)
    for not_int in (16000.0, "16000", True, None):
        with pytest.raises(AudioFormatError, match="sample rate must be an integer number of Hz"):
            check_sample_rate(not_int)


# --- real recordings (../shared/data) ---------------------------------------------------------------------------


def _real_files() -> list[Path]:
    if not DATA.is_dir():
        pytest.skip("../shared/data is absent (only present on the team's machines)")
    files = [DATA / "samples" / "jfk.flac", *sorted((DATA / "fsdd").glob("*.wav"))[:1]]
    missing = [f for f in files if not f.is_file()]
    if missing or len(files) < 2:
        pytest.skip(f"expected recordings missing under {DATA}: {missing or 'fsdd/*.wav'}")
    return files


@pytest.mark.parametrize("which", ["jfk", "fsdd"])
def test_real_recordings_stream_in_20ms_chunks(which):
    path = _real_files()[0 if which == "jfk" else 1]
    x, rate = read_audio(path)
    assert rate == (44100 if which == "jfk" else 8000)
    assert sf.info(path).channels == (2 if which == "jfk" else 1)  # jfk exercises the stereo downmix
    assert x.ndim == 1 and len(x) > rate // 4
    chunk = rate // 50  # 20 ms
    r = StreamingResampler(rate, 16000)
    y = _stream(x, [chunk] * (len(x) // chunk) + [len(x) % chunk], r)
    ref = resample(x, rate, 16000)
    assert len(y) == len(ref) == _soxr_length(len(x), rate, 16000)
    assert np.abs(y - ref).max() <= 1e-6
    assert np.abs(ref).max() > 0.05  # speech, not silence
