"""Wire audio: raw byte frames <-> float32 mono sample arrays in [-1, 1].

Three encodings travel over the WebSocket: 16-bit little-endian PCM (the default), 32-bit little-endian float,
and 8-bit G.711 mu-law. Mu-law follows Python's former ``audioop.lin2ulaw`` / ``audioop.ulaw2lin`` bit for bit:
the 16-bit sample is shifted right by two (flooring, so -1 becomes -1 in 14 bits), clipped at 8159 (32635 in
16 bits), biased by 0x84 >> 2 and bit-inverted. Decoding is a 256-entry table; encoding a 65536-entry table
indexed by the 16-bit value.
"""

from __future__ import annotations

import numpy as np

ENCODINGS: tuple[str, ...] = ("pcm_s16le", "pcm_f32le", "mulaw")

_BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1}

# 2**-15 is exact in float32, so s16 -> float -> s16 round-trips every value.
_S16_SCALE = np.float32(1.0 / 32768.0)


class AudioFormatError(ValueError):
    """Audio bytes or parameters that do not fit the declared format."""


def _check_encoding(encoding: str) -> int:
    try:
        return _BYTES_PER_SAMPLE[encoding]
    except (KeyError, TypeError):
        raise AudioFormatError(
            f"unknown encoding {encoding!r}; supported: {', '.join(ENCODINGS)}"
        ) from None


def bytes_per_sample(encoding: str) -> int:
    """Size of one mono sample of `encoding` in bytes."""
    return _check_encoding(encoding)


def _ulaw_to_linear(codes: np.ndarray) -> np.ndarray:
    """audioop's st_ulaw2linear16, vectorised over uint8 codes; returns int16."""
    u = (~codes.astype(np.int32)) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


# audioop's seg_uend: the top of each of the 8 segments in 14-bit magnitude units.
_SEG_UEND = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)


def _linear_to_ulaw(samples: np.ndarray) -> np.ndarray:
    """audioop's lin2ulaw (st_14linear2ulaw(x >> 2)), vectorised over int16 values; returns uint8."""
    v = samples.astype(np.int32) >> 2  # arithmetic shift floors: -1..-4 all become -1
    mask = np.where(v < 0, 0x7F, 0xFF)
    v = np.minimum(np.abs(v), 8159) + (0x84 >> 2)
    seg = np.searchsorted(_SEG_UEND, v, side="left")  # first segment whose top is >= v
    uval = (seg << 4) | ((v >> (np.minimum(seg, 7) + 1)) & 0x0F)
    # Only the clipped maximum (8159 + 33 = 8192) falls past the last segment: it codes as 0x7F before inversion.
    uval = np.where(seg >= 8, 0x7F, uval)
    return (uval ^ mask).astype(np.uint8)


_ULAW_DECODE = _ulaw_to_linear(np.arange(256, dtype=np.uint8))
_ULAW_DECODE_F32 = _ULAW_DECODE.astype(np.float32) * _S16_SCALE
# Indexed by the int16 sample's bit pattern read as uint16.
_ULAW_ENCODE = _linear_to_ulaw(np.arange(65536, dtype=np.uint16).view(np.int16))


def decode(data: bytes, encoding: str) -> np.ndarray:
    """Decode one frame of `encoding` bytes into a new float32 mono array in [-1, 1].

    pcm_f32le samples outside [-1, 1] are clipped; NaN or infinity is an error.
    """
    width = _check_encoding(encoding)
    n = len(data)
    if n % width:
        raise AudioFormatError(
            f"{encoding} frame of {n} bytes is not a whole number of {width}-byte samples"
        )
    if encoding == "pcm_s16le":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) * _S16_SCALE
    if encoding == "pcm_f32le":
        x = np.frombuffer(data, dtype="<f4").astype(np.float32)  # copy: native order, writable
        if not np.isfinite(x).all():
            raise AudioFormatError("pcm_f32le frame contains NaN or infinite samples")
        return np.clip(x, -1.0, 1.0, out=x)
    return _ULAW_DECODE_F32[np.frombuffer(data, dtype=np.uint8)]


def _to_s16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)


def encode(samples: np.ndarray, encoding: str) -> bytes:
    """Encode a mono float array in [-1, 1] as `encoding` bytes.

    pcm_s16le rounds to the nearest step and clips; mulaw encodes that 16-bit value; pcm_f32le clips to [-1, 1].
    """
    _check_encoding(encoding)
    x = np.asarray(samples)
    if x.ndim != 1:
        raise AudioFormatError(f"expected mono samples (a 1-D array); got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise AudioFormatError(f"expected floating-point samples in [-1, 1]; got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise AudioFormatError("samples to encode contain NaN or infinite values")
    if encoding == "pcm_f32le":
        return np.clip(x, -1.0, 1.0).astype("<f4").tobytes()
    s16 = _to_s16(x.astype(np.float64, copy=False))
    if encoding == "pcm_s16le":
        return s16.astype("<i2").tobytes()
    return _ULAW_ENCODE[s16.view(np.uint16)].tobytes()
