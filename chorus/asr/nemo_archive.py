"""The `.nemo` checkpoint format: a tar (plain since NeMo 1.7, gzip before) holding
`model_config.yaml`, `model_weights.ckpt` (a torch-saved state dict) and artifacts such as the
SentencePiece model, which the config names as `nemo:<file>`.

Reading never extracts to disk: members are read into memory by base name, so odd member
paths in an archive cannot write anywhere.
"""
from __future__ import annotations

import io
import os
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"


class NemoFormatError(ValueError):
    """The file is not a readable .nemo checkpoint; the message says what is wrong."""


@dataclass
class NemoArchive:
    config: dict
    state_dict: dict[str, torch.Tensor]
    artifacts: dict[str, bytes] = field(default_factory=dict)  # base name -> bytes

    def artifact(self, ref: str | None, what: str) -> bytes:
        """Resolve a config reference like `nemo:abc_tokenizer.model` to the member's bytes."""
        if not ref:
            raise NemoFormatError(f"model_config.yaml does not name the {what}")
        name = os.path.basename(str(ref).removeprefix("nemo:"))
        if name not in self.artifacts:
            raise NemoFormatError(f"the {what} '{name}' named in model_config.yaml is not in the archive")
        return self.artifacts[name]


def read_nemo(path: str | os.PathLike) -> NemoArchive:
    path = Path(path)
    if not path.exists():
        raise NemoFormatError(f"{path}: no such file")
    if not path.is_file():
        raise NemoFormatError(f"{path}: not a file")
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:  # detects plain or gzip tar
            for info in tar:
                if info.isfile():
                    members[os.path.basename(info.name)] = tar.extractfile(info).read()
    except (tarfile.ReadError, EOFError, OSError, ValueError) as exc:
        raise NemoFormatError(f"{path}: not a readable .nemo archive (tar or gzip tar): {exc}") from exc
    for required in (CONFIG_NAME, WEIGHTS_NAME):
        if required not in members:
            raise NemoFormatError(f"{path}: the archive has no {required}")
    try:
        config = yaml.safe_load(members.pop(CONFIG_NAME).decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise NemoFormatError(f"{path}: {CONFIG_NAME} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise NemoFormatError(f"{path}: {CONFIG_NAME} is not a mapping")
    try:
        state = torch.load(io.BytesIO(members.pop(WEIGHTS_NAME)), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle/zip
        raise NemoFormatError(f"{path}: {WEIGHTS_NAME} could not be loaded: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NemoFormatError(f"{path}: {WEIGHTS_NAME} is not a state dict of tensors")
    return NemoArchive(config=config, state_dict=state, artifacts=members)


def write_nemo(path: str | os.PathLike, config: dict, state_dict: dict[str, torch.Tensor],
               artifacts: dict[str, bytes] | None = None, gzip: bool = False) -> None:
    """Write a .nemo the way NeMo's SaveRestoreConnector does (members under `./`).

    `artifacts` maps config keys to bytes, e.g. {"tokenizer.model_path": b"..."}; each is stored
    as `<uuid>_<name>` and the config entry is set to `nemo:<uuid>_<name>`, as NeMo does.
    """
    config = _deep_copy(config)
    files: dict[str, bytes] = {}
    for key, data in (artifacts or {}).items():
        base = key.rsplit(".", 1)[-1]
        name = {"model_path": "tokenizer.model", "vocab_path": "vocab.txt",
                "spe_tokenizer_vocab": "tokenizer.vocab"}.get(base, base)
        stored = f"{uuid.uuid4().hex}_{name}"
        files[stored] = data
        _set(config, key, f"nemo:{stored}")
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buffer)
    files[WEIGHTS_NAME] = buffer.getvalue()
    files[CONFIG_NAME] = yaml.safe_dump(config, sort_keys=False).encode("utf-8")
    tmp = Path(f"{path}.tmp")
    with tarfile.open(tmp, "w:gz" if gzip else "w:") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def _set(config: dict, dotted: str, value) -> None:
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def _deep_copy(obj):
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj
