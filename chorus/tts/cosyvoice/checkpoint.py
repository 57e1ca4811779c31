"""Reading a CosyVoice 2 model directory: `cosyvoice2.yaml` (as data), `flow.pt` and `hift.pt` (state dicts).

CosyVoice saves each module's `state_dict()` with `torch.save`; it is read back with `weights_only=True`, every
weight used and none left over (missing, unexpected and wrongly shaped names are listed in the error).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import FlowConfig, read_cosyvoice_yaml
from .flow import CosyVoiceFlow

YAML_NAME = "cosyvoice2.yaml"


class NotACosyVoiceModel(ValueError):
    """The path is not a CosyVoice 2 model directory (or a file in it is not what CosyVoice writes)."""


def is_cosyvoice2_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and all((p / name).is_file() for name in (YAML_NAME, "flow.pt", "hift.pt"))


def _few(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable pickle is the same user error
        raise NotACosyVoiceModel(f"{path}: not a readable state dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NotACosyVoiceModel(f"{path}: expected a state dict of tensors")
    return state


def load_strict(model: torch.nn.Module, state: dict, path: Path) -> None:
    """load_state_dict(strict=True) with an error that names what is missing, left over or of the wrong shape."""
    own = model.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
              for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if shapes:
        problems.append(f"wrong shape: {_few(shapes, 3)}")
    if problems:
        raise NotACosyVoiceModel(f"{path}: does not fit the yaml's sizes: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def read_model_yaml(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / YAML_NAME
    if not path.is_file():
        raise NotACosyVoiceModel(f"{model_dir}: no {YAML_NAME}")
    try:
        return read_cosyvoice_yaml(path)
    except ValueError as exc:
        raise NotACosyVoiceModel(str(exc)) from None


def flow_config(doc: dict) -> FlowConfig:
    if "flow" not in doc:
        raise NotACosyVoiceModel(f"{YAML_NAME}: no flow: section")
    try:
        return FlowConfig.from_mapping(doc["flow"])
    except ValueError as exc:
        raise NotACosyVoiceModel(f"{YAML_NAME}: {exc}") from None


def load_flow(path: str | os.PathLike, config: FlowConfig | None = None) -> CosyVoiceFlow:
    """flow.pt -> CosyVoiceFlow (eval, float32); `config` defaults to CosyVoice2-0.5B's sizes."""
    path = Path(path)
    model = CosyVoiceFlow(config or FlowConfig())
    load_strict(model, load_state(path), path)
    return model.eval()
