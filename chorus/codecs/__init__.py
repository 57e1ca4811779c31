"""Bytes <-> float32 audio: wire encodings (pcm_s16le, pcm_f32le, mu-law), audio files, stateful resampling."""

from .files import AudioFileError, read_audio, read_audio_bytes, write_wav
from .pcm import ENCODINGS, AudioFormatError, bytes_per_sample, decode, encode
from .resample import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    QUALITIES,
    StreamingResampler,
    check_sample_rate,
    resample,
)

__all__ = [
    "ENCODINGS",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "QUALITIES",
    "AudioFileError",
    "AudioFormatError",
    "StreamingResampler",
    "bytes_per_sample",
    "check_sample_rate",
    "decode",
    "encode",
    "read_audio",
    "read_audio_bytes",
    "resample",
    "write_wav",
]
