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

FAMILIES: tuple[Family, ...] = (FASTCONFORMER, PARAFORMER)


class ModelNotFound(FileNotFoundError):
    pass


def default_model_path() -> Path:
    return BUNDLED_MODEL


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    if path is None:
        path = default_model_path()
        if not path.exists():
            raise ModelNotFound(f"the bundled default model {path} is missing; pass --model PATH")
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
               decoding: DecodingDefaults = DecodingDefaults()) -> SpeechModel:
    """Load a checkpoint of any family (the bundled default model when `path` is None)."""
    path = resolve_model_path(path)
    return family_of(path).load(path, pick_device(device), decoding)
