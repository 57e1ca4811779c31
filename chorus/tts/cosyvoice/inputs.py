"""Files a user gives `chorus speak` for a CosyVoice 2 voice: speech tokens, speaker embedding, prompt mel.

Formats, by suffix: `.npy` (numpy, no pickles), `.pt` (a tensor, read with weights_only=True), anything else
text: numbers separated by whitespace or commas (a prompt mel: one line per frame).  Shapes as CosyVoice holds
them are accepted with their batch dimension of 1 (`[1, N]` tokens, `[1, 192]` embedding, `[1, F, 80]` mel).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch


def _read(path: Path, text_rows: bool) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{path}: not a plain .npy array ({exc})") from None
    if suffix == ".pt":
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{path}: not a readable tensor file ({type(exc).__name__})") from None
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: holds a {type(value).__name__}, expected one tensor")
        return value.detach().float().numpy() if value.is_floating_point() else value.numpy()
    text = path.read_text(encoding="utf-8")
    rows = [r for r in (line.strip() for line in text.splitlines()) if r and not r.startswith("#")]
    try:
        values = [[float(x) for x in re.split(r"[\s,]+", r) if x] for r in rows]
    except ValueError as exc:
        raise ValueError(f"{path}: expected numbers separated by spaces or commas ({exc})") from None
    if text_rows:
        if len({len(r) for r in values}) > 1:
            raise ValueError(f"{path}: rows of different lengths")
        return np.asarray(values, dtype=np.float32).reshape(len(values), -1)
    return np.asarray([x for r in values for x in r], dtype=np.float64)


def read_tokens(path: str | os.PathLike) -> list[int]:
    arr = _read(Path(path), text_rows=False)
    arr = arr.reshape(-1) if arr.ndim == 2 and arr.shape[0] == 1 else arr
    if arr.ndim != 1:
        raise ValueError(f"{path}: speech tokens must be a list of integers, got shape {arr.shape}")
    if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"{path}: speech tokens must be whole numbers")
    return [int(x) for x in arr]


def read_embedding(path: str | os.PathLike) -> list[float]:
    arr = _read(Path(path), text_rows=False)
    arr = arr.reshape(-1) if arr.ndim == 2 and arr.shape[0] == 1 else arr
    if arr.ndim != 1:
        raise ValueError(f"{path}: a speaker embedding is one vector, got shape {arr.shape}")
    return [float(x) for x in arr]


def read_mel(path: str | os.PathLike) -> list[list[float]]:
    arr = _read(Path(path), text_rows=True)
    arr = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
    if arr.ndim != 2:
        raise ValueError(f"{path}: a prompt mel is [frames, 80], got shape {arr.shape}")
    return np.asarray(arr, dtype=np.float32).tolist()
