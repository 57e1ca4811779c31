"""Matcha-TTS (flow-matching TTS, shivammehta25/Matcha-TTS) from its Lightning `.ckpt` files, in plain PyTorch.

`load_matcha(path)` reads a checkpoint without running any of its pickled code (`checkpoint.py`);
`MatchaTTS.synthesise(ids, lengths, n_timesteps, temperature, noise=...)` gives Matcha's mel;
`text_to_ids(text)` is Matcha's english_cleaners2 front end through the espeak-ng program (`text.py`).
"""
from .checkpoint import NotAMatchaCheckpoint, hparams_to_plain, load_lightning_checkpoint, load_matcha
from .model import MatchaConfig, MatchaTTS, fix_len
from .text import ESPEAK_MISSING, SYMBOLS, EspeakMissing, english_cleaners2, intersperse, text_to_ids

__all__ = ["ESPEAK_MISSING", "EspeakMissing", "MatchaConfig", "MatchaTTS", "NotAMatchaCheckpoint", "SYMBOLS",
           "english_cleaners2", "fix_len", "hparams_to_plain", "intersperse", "load_lightning_checkpoint",
           "load_matcha", "text_to_ids"]
