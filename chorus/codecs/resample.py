"""Sample-rate conversion for streams: clients send 8-48 kHz, models want 16 kHz (and TTS returns its own rate).

`StreamingResampler` wraps libsoxr's streaming API (`soxr.ResampleStream`). python-soxr's one-shot
`soxr.resample` drives the same libsoxr state machine over the whole signal, and libsoxr buffers input into its
own blocks, so the streamed output does not depend on how the input was chunked: the concatenation of every
`process` result and `flush` equals the one-shot result, and its length is libsoxr's
floor(n_in * out_rate / in_rate + 0.5). The price is latency: libsoxr holds back up to ~115 ms at 8 <-> 16 kHz and
~40 ms at 44.1/48 -> 16 kHz (HQ) until enough input arrives or `flush` is called.
"""

from __future__ import annotations

import numpy as np
import soxr

from .pcm import AudioFormatError

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000

QUALITIES: tuple[str, ...] = ("QQ", "LQ", "MQ", "HQ", "VHQ")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_sample_rate(rate: int) -> int:
    """Validate a client-declared sample rate; return it as an int."""
    if not _is_int(rate):
        raise AudioFormatError(f"sample rate must be an integer number of Hz; got {rate!r}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioFormatError(
            f"sample rate {int(rate)} Hz is outside the supported range {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )
    return int(rate)


def _check_rate(rate: int, what: str) -> int:
    if not _is_int(rate) or rate <= 0:
        raise AudioFormatError(f"{what} must be a positive integer number of Hz; got {rate!r}")
    return int(rate)


def _check_quality(quality: str) -> str:
    if quality not in QUALITIES:
        raise ValueError(f"unknown resampling quality {quality!r}; supported: {', '.join(QUALITIES)}")
    return quality


def _as_mono_f32(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise AudioFormatError(f"expected mono samples (a 1-D array); got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


class StreamingResampler:
    """Resample one mono stream chunk by chunk; `flush` once at its end to get the held-back tail."""

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate = _check_rate(in_rate, "in_rate")
        self.out_rate = _check_rate(out_rate, "out_rate")
        self.quality = _check_quality(quality)
        self._stream: soxr.ResampleStream | None = None
        if self.in_rate != self.out_rate:
            self._stream = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality=quality)
        self._flushed = False

    @property
    def passthrough(self) -> bool:
        """True when the rates are equal and audio is copied through unchanged."""
        return self._stream is None

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Feed a chunk (any length, including 0); return the float32 output that is ready now."""
        if self._flushed:
            raise RuntimeError("StreamingResampler.process() called after flush()")
        x = _as_mono_f32(chunk)
        if self._stream is None:
            return x.copy()  # never a view: the caller may reuse its buffer
        return self._stream.resample_chunk(x)

    def flush(self) -> np.ndarray:
        """End the stream: return the remaining output. Call once; `process` is refused afterwards."""
        if self._flushed:
            raise RuntimeError("StreamingResampler.flush() called twice")
        self._flushed = True
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


def resample(x: np.ndarray, in_rate: int, out_rate: int, quality: str = "HQ") -> np.ndarray:
    """Resample a whole mono signal at once (a copy when the rates are equal)."""
    in_rate = _check_rate(in_rate, "in_rate")
    out_rate = _check_rate(out_rate, "out_rate")
    _check_quality(quality)
    a = _as_mono_f32(x)
    if in_rate == out_rate:
        return a.copy()
    return soxr.resample(a, in_rate, out_rate, quality)
