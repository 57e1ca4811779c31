"""Audio files <-> float32 mono arrays, through soundfile (libsndfile): WAV, FLAC, OGG and whatever else it reads.

Used by the CLI (`chorus transcribe file.flac`), by evaluation recipes and by tests; the server itself only sees
wire frames (see pcm.py). Multi-channel audio is downmixed to mono by the mean of its channels.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from .pcm import AudioFormatError, _to_s16


class AudioFileError(ValueError):
    """An audio file (or in-memory file image) that cannot be read."""


def _read(source: str | io.BytesIO, name: str) -> tuple[np.ndarray, int]:
    try:
        with sf.SoundFile(source) as f:
            if f.channels < 1:
                raise AudioFileError(f"{name} has zero channels")
            if f.samplerate <= 0:
                raise AudioFileError(f"{name} declares a sample rate of {f.samplerate} Hz")
            sample_rate = int(f.samplerate)
            data = f.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as err:
        # LibsndfileError's str() repeats an "Error opening <object>" prefix; the bare message reads better.
        reason = getattr(err, "error_string", None) or str(err)
        raise AudioFileError(f"{name} is not a readable audio file: {reason}") from err
    if data.shape[1] == 1:
        mono = np.ascontiguousarray(data[:, 0])
    else:
        mono = data.mean(axis=1, dtype=np.float32)
    return mono, sample_rate


def read_audio(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Read an audio file as (float32 mono samples, sample rate in Hz)."""
    p = Path(path)
    name = f"audio file '{p}'"
    # libsndfile reports a missing file as "System error."; say what it is.
    if not p.exists():
        raise AudioFileError(f"{name} does not exist")
    if p.is_dir():
        raise AudioFileError(f"{name} is a directory, not a file")
    return _read(str(p), name)


def read_audio_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Read an in-memory audio file image (e.g. an uploaded WAV) as (float32 mono samples, sample rate in Hz)."""
    name = f"audio data of {len(data)} bytes"
    if len(data) == 0:
        raise AudioFileError("audio data is empty (0 bytes)")
    return _read(io.BytesIO(bytes(data)), name)


def write_wav(path: str | os.PathLike[str], samples: np.ndarray, sample_rate: int) -> None:
    """Write float samples in [-1, 1] (1-D mono, or 2-D [frames, channels]) as a 16-bit PCM WAV file.

    Samples are rounded and clipped to 16 bits exactly as the pcm_s16le wire encoding does.
    """
    x = np.asarray(samples)
    if x.ndim not in (1, 2):
        raise AudioFormatError(f"expected a 1-D or 2-D [frames, channels] array; got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise AudioFormatError(f"expected floating-point samples in [-1, 1]; got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise AudioFormatError("samples to write contain NaN or infinite values")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioFormatError(f"sample rate must be a positive integer number of Hz; got {sample_rate!r}")
    s16 = _to_s16(x.astype(np.float64, copy=False))
    sf.write(os.fspath(path), s16, int(sample_rate), subtype="PCM_16", format="WAV")
