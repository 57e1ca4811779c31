"""Read CTranslate2's `model.bin` (binary format version 6), as python/ctranslate2/specs/model_spec.py
writes it and src/models/model.cc reads it.

Layout (little-endian; a string is a uint16 length counting a trailing NUL, then the bytes and the NUL):
    uint32 binary version (6) | string spec name | uint32 spec revision | uint32 variable count
    per variable: string name | uint8 rank | uint32 dims[rank] | uint8 dtype id | uint32 byte count | data
    uint32 alias count | per alias: string alias | string variable name
dtype ids follow include/ctranslate2/types.h: float32, int8, int16, int32, float16, bfloat16.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BINARY_VERSION = 6
DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_TORCH = {"float32": torch.float32, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
          "float16": torch.float16, "bfloat16": torch.bfloat16}


class CT2FormatError(ValueError):
    """Not a CTranslate2 model.bin this reader understands."""


@dataclass
class CT2Model:
    spec: str
    revision: int
    variables: dict[str, torch.Tensor]   # as stored (int8 weights stay int8; their `_scale` is a variable)
    aliases: dict[str, str]              # alias -> variable name

    def get(self, name: str) -> torch.Tensor:
        return self.variables[self.aliases.get(name, name)]


class _Reader:
    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CT2FormatError(f"{self.path}: truncated at byte {self.pos} (wanted {n} more)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = self.take(n)
        if n == 0 or raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: malformed string at byte {self.pos - n}")
        return raw[:-1].decode("utf-8")


def read_model_bin(path: str | Path) -> CT2Model:
    path = Path(path)
    data = path.read_bytes()
    r = _Reader(data, str(path))
    (version,) = r.unpack("I")
    if version != BINARY_VERSION:
        raise CT2FormatError(f"{path}: CTranslate2 binary version {version}; this reader reads version {BINARY_VERSION}")
    spec = r.string()
    (revision,) = r.unpack("I")
    (count,) = r.unpack("I")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(count):
        name = r.string()
        (rank,) = r.unpack("B")
        shape = r.unpack(f"{rank}I") if rank else ()
        (type_id,) = r.unpack("B")
        (nbytes,) = r.unpack("I")
        if type_id >= len(DTYPES):
            raise CT2FormatError(f"{path}: variable {name} has unknown dtype id {type_id}")
        dtype = _TORCH[DTYPES[type_id]]
        want = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        if nbytes != want:
            raise CT2FormatError(f"{path}: variable {name} holds {nbytes} bytes, its shape {shape} needs {want}")
        raw = bytearray(r.take(nbytes))
        t = torch.frombuffer(raw, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        variables[name] = t.reshape(shape)
    (n_alias,) = r.unpack("I")
    aliases = {}
    for _ in range(n_alias):
        alias = r.string()
        target = r.string()
        if target not in variables:
            raise CT2FormatError(f"{path}: alias {alias} names a missing variable {target}")
        aliases[alias] = target
    if r.pos != len(data):
        raise CT2FormatError(f"{path}: {len(data) - r.pos} bytes after the alias table")
    return CT2Model(spec, revision, variables, aliases)


def dequantize(model: CT2Model, name: str) -> torch.Tensor:
    """A weight as float32: int8/int16 weights are divided by their per-row `<name>_scale`
    (CTranslate2 stores round(w * scale), scale = 127 / max|row|)."""
    w = model.get(name)
    if w.dtype in (torch.int8, torch.int16):
        scale_name = name + "_scale"
        if scale_name not in model.variables and scale_name not in model.aliases:
            raise CT2FormatError(f"quantized weight {name} has no {scale_name}")
        scale = model.get(scale_name).float()
        shape = (-1,) + (1,) * (w.dim() - 1)
        return w.float() / (scale.reshape(shape) if scale.dim() else scale)
    return w.float()
