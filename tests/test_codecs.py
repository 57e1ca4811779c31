"""Wire encodings (chorus.codecs.pcm) and audio files (chorus.codecs.files).

Mu-law is checked against libsndfile, an independent G.711 implementation, and against audioop where the running
Python still has it.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pytest
import soundfile as sf

from chorus.codecs import (
    ENCODINGS,
    AudioFileError,
    AudioFormatError,
    bytes_per_sample,
    decode,
    encode,
    read_audio,
    read_audio_bytes,
    write_wav,
)

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = np.arange(256, dtype=np.uint8)


def _sndfile_ulaw_decode(codes: np.ndarray) -> np.ndarray:
    x, _ = sf.read(io.BytesIO(codes.tobytes()), samplerate=8000, channels=1, format="RAW", subtype="ULAW",
                   dtype="int16")
    return x


def _sndfile_ulaw_encode(x: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    sf.write(buf, x, 8000, format="RAW", subtype="ULAW")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


# --- constants and errors ------------------------------------------------------------------------------------


def test_encodings_and_widths():
    assert ENCODINGS == ("pcm_s16le", "pcm_f32le", "mulaw")
    assert [bytes_per_sample(e) for e in ENCODINGS] == [2, 4, 1]
    assert issubclass(AudioFormatError, ValueError)
    assert issubclass(AudioFileError, ValueError)


@pytest.mark.parametrize("call", [
    lambda: decode(b"\x00\x00", "opus"),
    lambda: encode(np.zeros(2, np.float32), "opus"),
    lambda: bytes_per_sample("opus"),
])
def test_unknown_encoding_rejected(call):
    with pytest.raises(AudioFormatError) as exc:
        call()
    assert str(exc.value) == "unknown encoding 'opus'; supported: pcm_s16le, pcm_f32le, mulaw"


@pytest.mark.parametrize("encoding,nbytes", [
    ("pcm_s16le", 1), ("pcm_s16le", 1001),
    ("pcm_f32le", 1), ("pcm_f32le", 2), ("pcm_f32le", 3), ("pcm_f32le", 1001), ("pcm_f32le", 1002),
    ("pcm_f32le", 1003),
])
def test_truncated_frame_rejected(encoding, nbytes):
    width = bytes_per_sample(encoding)
    with pytest.raises(AudioFormatError) as exc:
        decode(bytes(nbytes), encoding)
    assert str(exc.value) == (
        f"{encoding} frame of {nbytes} bytes is not a whole number of {width}-byte samples"
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 5, 9])
def test_f32_non_finite_rejected(bad, where):
    x = np.zeros(10, dtype="<f4")
    x[where] = bad
    with pytest.raises(AudioFormatError, match="pcm_f32le frame contains NaN or infinite samples"):
        decode(x.tobytes(), "pcm_f32le")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_encode_rejects_bad_samples(encoding):
    with pytest.raises(AudioFormatError, match="NaN or infinite"):
        encode(np.array([0.0, np.nan], np.float32), encoding)
    with pytest.raises(AudioFormatError, match="1-D"):
        encode(np.zeros((4, 2), np.float32), encoding)
    with pytest.raises(AudioFormatError, match="floating-point"):
        encode(np.zeros(4, np.int16), encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_empty(encoding):
    x = decode(b"", encoding)
    assert x.dtype == np.float32 and x.shape == (0,)
    assert encode(np.zeros(0, np.float32), encoding) == b""


# --- pcm_s16le -------------------------------------------------------------------------------------------------


def test_s16_decode_every_value_and_round_trip():
    data = ALL_INT16.astype("<i2").tobytes()
    x = decode(data, "pcm_s16le")
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, ALL_INT16.astype(np.float64) / 32768.0)
    assert x.min() == -1.0 and x.max() == 32767 / 32768
    assert encode(x, "pcm_s16le") == data


def test_s16_is_little_endian_rounds_and_clips():
    assert encode(np.array([1 / 32768], np.float32), "pcm_s16le") == b"\x01\x00"
    assert decode(b"\x00\x80", "pcm_s16le")[0] == -1.0
    x = np.array([1.4, 1.6, -1.4, -1.6, 40000.0, -40000.0], dtype=np.float64) / 32768
    got = np.frombuffer(encode(np.append(x, [1.0, -1.0, 1.5, -1.5]), "pcm_s16le"), "<i2")
    np.testing.assert_array_equal(got, [1, 2, -1, -2, 32767, -32768, 32767, -32768, 32767, -32768])


def test_s16_float_round_trip_within_half_step():
    x = np.random.default_rng(0).uniform(-1, 32767 / 32768, 10_000).astype(np.float32)  # below the clip
    y = decode(encode(x, "pcm_s16le"), "pcm_s16le")
    assert np.abs(y - x).max() <= 0.5 / 32768


# --- pcm_f32le -------------------------------------------------------------------------------------------------


def test_f32_round_trip_exact_and_little_endian():
    x = np.random.default_rng(1).uniform(-1, 1, 10_000).astype(np.float32)
    data = encode(x, "pcm_f32le")
    assert data[:4] == struct.pack("<f", x[0])
    y = decode(data, "pcm_f32le")
    assert y.dtype == np.float32 and y.flags.writeable
    np.testing.assert_array_equal(y, x)


def test_f32_out_of_range_is_clipped():
    data = np.array([1.5, -2.0, 0.25], dtype="<f4").tobytes()
    np.testing.assert_array_equal(decode(data, "pcm_f32le"), [1.0, -1.0, 0.25])
    np.testing.assert_array_equal(np.frombuffer(encode(np.array([3.0, -0.5]), "pcm_f32le"), "<f4"), [1.0, -0.5])


# --- mu-law ----------------------------------------------------------------------------------------------------

# Worked by hand from G.711 as audioop implements it: v = x >> 2 (floor); sign mask 0x7F if v < 0 else 0xFF;
# m = min(|v|, 8159) + 33; segment = first s with m <= (0x3F << s); code = ((s << 4) | ((m >> (s + 1)) & 15)) ^ mask.
MULAW_ENCODE_BY_HAND = {
    0: 0xFF,       # m = 33, s = 0, mantissa 16 & 15 = 0
    3: 0xFF,       # 3 >> 2 = 0
    4: 0xFE,       # m = 34, mantissa 1
    100: 0xF2,     # m = 58, mantissa 29 & 15 = 13 -> 0x0D ^ 0xFF
    1000: 0xCE,    # m = 283, s = 3, mantissa (283 >> 4) & 15 = 1 -> 0x31 ^ 0xFF
    -1000: 0x4E,   # same magnitude, mask 0x7F
    -1: 0x7E,      # floor: -1 >> 2 = -1, so magnitude 1 (libsndfile truncates to 0 and gives 0x7F)
    -4: 0x7E,
    32635: 0x80,   # the clip level
    32767: 0x80,
    -32768: 0x00,
}
MULAW_DECODE_BY_HAND = {
    0x00: -32124, 0x01: -31100, 0x0F: -16764, 0x10: -15996, 0x70: -120, 0x7E: -8, 0x7F: 0,
    0x80: 32124, 0x8F: 16764, 0xFE: 8, 0xFF: 0,
}


def test_mulaw_hand_computed_values():
    values = np.array(list(MULAW_ENCODE_BY_HAND), dtype=np.int16)
    got = encode(values.astype(np.float64) / 32768, "mulaw")
    assert list(got) == list(MULAW_ENCODE_BY_HAND.values())
    codes = bytes(MULAW_DECODE_BY_HAND)
    expected = np.array(list(MULAW_DECODE_BY_HAND.values()), np.float64) / 32768
    np.testing.assert_array_equal(decode(codes, "mulaw"), expected)


def test_mulaw_decode_all_codes_matches_libsndfile():
    ours = decode(ALL_CODES.tobytes(), "mulaw")
    assert ours.dtype == np.float32
    theirs = _sndfile_ulaw_decode(ALL_CODES)
    np.testing.assert_array_equal(ours * 32768, theirs)


def test_mulaw_encode_all_int16_matches_libsndfile():
    ours = np.frombuffer(encode(ALL_INT16.astype(np.float64) / 32768, "mulaw"), np.uint8)
    # audioop (our reference) drops the two low bits by flooring (x >> 2); libsndfile divides the magnitude by 4,
    # truncating. They agree exactly on x rounded down to a multiple of 4, which is what audioop encodes.
    floored = (ALL_INT16.astype(np.int32) // 4 * 4).astype(np.int16)
    np.testing.assert_array_equal(ours, _sndfile_ulaw_encode(floored))
    # Directly, they agree on all non-negative values and on multiples of 4.
    same = (ALL_INT16 >= 0) | (ALL_INT16 % 4 == 0)
    np.testing.assert_array_equal(ours[same], _sndfile_ulaw_encode(ALL_INT16)[same])


def test_mulaw_matches_audioop_when_available():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # removed from the standard library in Python 3.13
    ours = encode(ALL_INT16.astype(np.float64) / 32768, "mulaw")
    assert ours == audioop.lin2ulaw(ALL_INT16.astype("<i2").tobytes(), 2)
    theirs = np.frombuffer(audioop.ulaw2lin(ALL_CODES.tobytes(), 2), "<i2")
    np.testing.assert_array_equal(decode(ALL_CODES.tobytes(), "mulaw") * 32768, theirs)


def test_mulaw_code_round_trip():
    back = np.frombuffer(encode(decode(ALL_CODES.tobytes(), "mulaw"), "mulaw"), np.uint8)
    expected = ALL_CODES.copy()
    expected[0x7F] = 0xFF  # 0x7F is "negative zero": it decodes to 0, which encodes as positive zero
    np.testing.assert_array_equal(back, expected)


def test_mulaw_float_round_trip_error():
    x = np.random.default_rng(2).uniform(-32124 / 32768, 32124 / 32768, 20_000)
    y = decode(encode(x, "mulaw"), "mulaw").astype(np.float64)
    # 4-bit mantissa: an error under 1/16 of the magnitude, plus the smallest step near zero.
    assert np.all(np.abs(y - x) <= np.abs(x) / 16 + 16 / 32768)
    assert np.abs(y - x).max() > 1e-3  # it really is lossy


# --- files -----------------------------------------------------------------------------------------------------

FORMATS = [("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS")]


def _test_signal(n: int, sr: int, channels: int) -> np.ndarray:
    t = np.arange(n) / sr
    rng = np.random.default_rng(3)
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.3 * np.sin(2 * np.pi * 1250 * t) + 0.05 * rng.standard_normal(n)
    cols = [left, right][:channels]
    return np.stack(cols, axis=1).astype(np.float32)


@pytest.mark.parametrize("ext,fmt,subtype", FORMATS)
def test_read_audio_mono(tmp_path, ext, fmt, subtype):
    sr, n = 16000, 16000
    src = _test_signal(n, sr, 1)[:, 0]
    path = tmp_path / f"mono.{ext}"
    sf.write(path, src, sr, format=fmt, subtype=subtype)
    x, got_sr = read_audio(path)
    assert got_sr == sr and x.dtype == np.float32 and x.ndim == 1 and x.flags.c_contiguous
    ref, _ = sf.read(path, dtype="float32")
    np.testing.assert_array_equal(x, ref)
    if fmt == "OGG":
        assert abs(len(x) - n) <= 1
        m = min(len(x), n)
        snr = 10 * np.log10(np.sum(src[:m] ** 2) / np.sum((x[:m] - src[:m]) ** 2))
        assert snr > 15, snr  # lossy, but the same sound
    else:
        assert len(x) == n
        # libsndfile writes float as 16-bit with scale 32767 and reads with 1/32768: within one step.
        assert np.abs(x - src).max() <= 1 / 32768 + 1e-7


@pytest.mark.parametrize("ext,fmt,subtype", FORMATS)
def test_read_audio_stereo_downmix_is_mean(tmp_path, ext, fmt, subtype):
    sr = 44100
    src = _test_signal(sr // 2, sr, 2)
    path = tmp_path / f"stereo.{ext}"
    sf.write(path, src, sr, format=fmt, subtype=subtype)
    x, got_sr = read_audio(path)
    both, _ = sf.read(path, dtype="float32", always_2d=True)
    assert both.shape[1] == 2 and got_sr == sr
    np.testing.assert_allclose(x, both.mean(axis=1), rtol=0, atol=1e-7)
    assert np.abs(x - both[:, 0]).max() > 0.1  # not just the left channel


def test_read_audio_bytes_equals_read_audio(tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, _test_signal(8000, 8000, 2), 8000, format="FLAC")
    x, sr = read_audio(path)
    y, sr2 = read_audio_bytes(path.read_bytes())
    assert sr == sr2 == 8000
    np.testing.assert_array_equal(x, y)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioFileError) as exc:
        read_audio(path)
    assert str(path) in str(exc.value) and "does not exist" in str(exc.value)


def test_directory_is_not_audio(tmp_path):
    with pytest.raises(AudioFileError, match="is a directory"):
        read_audio(tmp_path)


@pytest.mark.parametrize("content", [np.random.default_rng(4).bytes(5000), b""], ids=["random", "empty"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(content)
    with pytest.raises(AudioFileError) as exc:
        read_audio(path)
    assert str(path) in str(exc.value) and "not a readable audio file" in str(exc.value)


def test_corrupt_bytes():
    with pytest.raises(AudioFileError, match="audio data of 5000 bytes is not a readable audio file"):
        read_audio_bytes(np.random.default_rng(5).bytes(5000))
    with pytest.raises(AudioFileError, match="empty"):
        read_audio_bytes(b"")


def test_write_wav_is_s16_and_matches_wire_encoding(tmp_path):
    x = np.random.default_rng(6).uniform(-1.2, 1.2, 4000)
    path = tmp_path / "out.wav"
    write_wav(path, x, 22050)
    info = sf.info(path)
    assert (info.format, info.subtype, info.channels, info.samplerate) == ("WAV", "PCM_16", 1, 22050)
    y, sr = read_audio(path)
    assert sr == 22050
    np.testing.assert_array_equal(y, decode(encode(x, "pcm_s16le"), "pcm_s16le"))


def test_write_wav_rejects_bad_input(tmp_path):
    with pytest.raises(AudioFormatError, match="NaN"):
        write_wav(tmp_path / "a.wav", np.array([0.0, np.inf]), 16000)
    with pytest.raises(AudioFormatError, match="sample rate"):
        write_wav(tmp_path / "a.wav", np.zeros(4), 0)
    with pytest.raises(AudioFormatError, match="sample rate"):
        write_wav(tmp_path / "a.wav", np.zeros(4), 16000.0)
