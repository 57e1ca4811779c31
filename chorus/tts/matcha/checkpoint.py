"""Reading Matcha-TTS `.ckpt` files (PyTorch Lightning checkpoints) without running any of their code.

A Lightning checkpoint is a `torch.save` zip whose `data.pkl` holds a dict: `state_dict` (the weights),
`hyper_parameters` (MatchaTTS' init arguments: ints, omegaconf `DictConfig`s for encoder / decoder / cfm /
data_statistics, a `functools.partial` for the optimizer), and training state (optimizer, loops, callbacks).
`torch.load(weights_only=True)` refuses the omegaconf and functools globals, and an unrestricted unpickler would
import and call whatever the file names. `load_lightning_checkpoint` reads it with `RestrictedUnpickler`:

* torch's tensor machinery (the rebuild functions, storages read from the zip records by torch's own `_load`,
  dtypes, `torch.Size`, `OrderedDict`) and a few builtins are allowed as they are;
* every other global (omegaconf classes, `functools.partial`, `posix.system`, anything) becomes an inert
  `Stub` class: calling it, building it or setting its state only records the arguments.
  Nothing from outside torch is imported, and no code named by the file runs.

`hparams_to_plain` then turns the recorded omegaconf nodes into plain dicts / lists / scalars, resolving simple
`${a.b}` interpolations against the recorded config tree.
"""
from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.serialization as ts


class Stub:
    """An inert stand-in for a global the checkpoint names: records how it was built, never runs anything.

    find_class hands out one subclass per name (`stub_class`), so pickle's NEWOBJ, REDUCE, BUILD, SETITEMS and
    APPENDS all work on it; every one of them only stores what it is given."""

    qualname = "?"
    args: tuple = ()
    kwargs: dict = {}
    state: Any = None

    def __init__(self, *args, **kwargs):  # REDUCE: the "call"
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state):  # BUILD
        self.state = state

    @property
    def items(self) -> list:  # APPEND(S) on a stubbed list subclass
        if "_items" not in self.__dict__:
            self.__dict__["_items"] = []
        return self.__dict__["_items"]

    @property
    def extra(self) -> dict:  # SETITEM(S) on a stubbed dict subclass
        if "_extra" not in self.__dict__:
            self.__dict__["_extra"] = {}
        return self.__dict__["_extra"]

    def append(self, item):
        self.items.append(item)

    def extend(self, items):
        self.items.extend(items)

    def __setitem__(self, key, value):
        self.extra[key] = value

    def __repr__(self) -> str:
        return f"Stub({self.qualname})"


_STUB_CLASSES: dict[str, type] = {}


def stub_class(module: str, name: str) -> type:
    qualname = f"{module}.{name}"
    cls = _STUB_CLASSES.get(qualname)
    if cls is None:
        cls = type("Stub_" + re.sub(r"\W", "_", qualname), (Stub,), {"qualname": qualname, "__module__": __name__})
        _STUB_CLASSES[qualname] = cls
    return cls


def _reconstructor(cls, base=None, state=None):
    """copyreg._reconstructor, inert: only Stub classes are built this way here."""
    if isinstance(cls, type) and issubclass(cls, Stub):
        return Stub.__new__(cls)
    raise pickle.UnpicklingError(f"copyreg._reconstructor for {cls!r} is not allowed")


def _allowed() -> dict[str, Any]:
    u = torch._utils
    rc: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set, "builtins.frozenset": frozenset, "builtins.bytearray": bytearray,
        "builtins.complex": complex, "builtins.slice": slice,
        "copyreg._reconstructor": _reconstructor,
        "torch.Size": torch.Size, "torch.device": torch.device,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "_codecs.encode": _codecs_encode,
    }
    for fn in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
               "_rebuild_parameter_with_state"):
        if hasattr(u, fn):
            rc[f"torch._utils.{fn}"] = getattr(u, fn)
    if hasattr(ts, "_get_layout"):
        rc["torch.serialization._get_layout"] = ts._get_layout
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
                  torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128):
        rc[str(dtype)] = dtype
    for layout in (torch.strided,):
        rc[str(layout)] = layout
    return rc


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    """Protocol-2 pickles write bytes as _codecs.encode(str, 'latin1'); only that is done here."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("_codecs.encode with unexpected arguments")
    return obj.encode(encoding, errors)


class RestrictedUnpickler(pickle.Unpickler):
    """Allows torch's tensor globals and harmless builtins; any other global becomes a Stub class."""

    _ALLOWED: dict[str, Any] | None = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed()
        obj = RestrictedUnpickler._ALLOWED.get(f"{module}.{name}")
        if obj is not None:
            return obj
        return stub_class(str(module), str(name))


class _PickleModule:
    """What torch.serialization._load takes as pickle_module: only Unpickler is used."""
    Unpickler = RestrictedUnpickler
    load = None
    __name__ = "chorus_restricted_pickle"


class NotAMatchaCheckpoint(ValueError):
    pass


def load_lightning_checkpoint(path: str | Path) -> dict:
    """The checkpoint's top-level dict, tensors on the CPU, every non-torch object as an inert Stub."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise NotAMatchaCheckpoint(f"{path} is not a torch zip checkpoint (Lightning writes torch.save zips)")
    with open(path, "rb") as f, ts._open_zipfile_reader(f) as reader:
        obj = ts._load(reader, "cpu", _PickleModule)
    if not isinstance(obj, dict):
        raise NotAMatchaCheckpoint(f"{path}: the checkpoint is not a dict")
    return obj


# ------------------------------------------------------------------------------ omegaconf nodes to plain values

_NODE_VALUE = re.compile(r"^omegaconf\.nodes\.")
_INTERP = re.compile(r"^\$\{([A-Za-z0-9_.]+)\}$")


def _state(stub: Stub) -> dict:
    st = stub.state
    if isinstance(st, tuple) and len(st) == 2 and isinstance(st[1], dict):  # (dict state, slots state)
        merged = dict(st[0] or {})
        merged.update(st[1])
        return merged
    return st if isinstance(st, dict) else {}


def _root(stub: Stub) -> Any:
    node, seen = stub, set()
    while isinstance(node, Stub) and id(node) not in seen:
        seen.add(id(node))
        parent = _state(node).get("_parent")
        if parent is None:
            return node
        node = parent
    return node


def _plain(obj: Any, root: Any = None, depth: int = 0) -> Any:
    if depth > 64:
        raise NotAMatchaCheckpoint("hyper-parameters nested too deep")
    if isinstance(obj, Stub):
        st = _state(obj)
        if obj.qualname == "omegaconf.dictconfig.DictConfig":
            content = st.get("_content")
            if not isinstance(content, dict):
                return None
            r = root if root is not None else _root(obj)
            return {k: _plain(v, r, depth + 1) for k, v in content.items()}
        if obj.qualname == "omegaconf.listconfig.ListConfig":
            content = st.get("_content")
            r = root if root is not None else _root(obj)
            return [_plain(v, r, depth + 1) for v in content] if isinstance(content, (list, tuple)) else None
        if _NODE_VALUE.match(obj.qualname):
            value = _plain(st.get("_val"), root, depth + 1)
            m = _INTERP.match(value) if isinstance(value, str) else None
            if m and root is not None:
                return _lookup(_plain(root, root, depth + 1), m.group(1))
            return value
        if obj.qualname == "functools.partial":
            # partial's state: (func, args, kwargs, dict)
            st = obj.state if isinstance(obj.state, tuple) else ()
            func = st[0] if st else (obj.args[0] if obj.args else None)
            return {"_partial_": getattr(func, "qualname", repr(func)),
                    **({k: _plain(v, root, depth + 1) for k, v in st[2].items()}
                       if len(st) > 2 and isinstance(st[2], dict) else {})}
        return obj
    if isinstance(obj, dict):
        return {k: _plain(v, root, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, root, depth + 1) for v in obj)
    if isinstance(obj, str):
        m = _INTERP.match(obj)
        if m and root is not None:
            return _lookup(_plain(root, root, depth + 1), m.group(1))
    return obj


def _lookup(tree: Any, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def hparams_to_plain(hparams: Any) -> dict:
    """Lightning's hyper_parameters (a dict, an AttributeDict or a DictConfig, as Stubs) as plain Python."""
    if isinstance(hparams, Stub) and hparams.qualname.endswith("AttributeDict"):
        hparams = hparams.extra or _state(hparams)
    out = _plain(hparams)
    if not isinstance(out, dict):
        raise NotAMatchaCheckpoint("the checkpoint's hyper_parameters are not a mapping")
    return out


def read_bytes_pickle(data: bytes) -> Any:
    """Unpickle bytes with the restricted unpickler (no tensors): for tests and tools."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


# ------------------------------------------------------------------------------------------- Matcha's model

def matcha_config(hp: dict, where: str = "checkpoint"):
    """MatchaConfig from MatchaTTS' hyper-parameters (as `hparams_to_plain` gives them), with refusals."""
    from .model import ACTIVATIONS, MatchaConfig

    def need(cond, what):
        if not cond:
            raise NotAMatchaCheckpoint(f"{where} is not a Matcha-TTS checkpoint: {what}")

    for key in ("n_vocab", "n_feats", "encoder", "decoder", "cfm"):
        need(key in hp, f"hyper_parameters lack {key!r}")
    enc, dec, cfm = hp["encoder"], hp["decoder"] or {}, hp["cfm"] or {}
    need(isinstance(enc, dict) and isinstance(enc.get("encoder_params"), dict), "no encoder.encoder_params")
    ep, dp = enc["encoder_params"], enc.get("duration_predictor_params") or {}
    for block in ("down_block_type", "mid_block_type", "up_block_type"):
        if dec.get(block, "transformer") != "transformer":
            raise NotAMatchaCheckpoint(f"{where}: decoder {block}={dec[block]!r} is not supported (only 'transformer')")
    act = dec.get("act_fn", "snake")
    if act not in ACTIVATIONS:
        raise NotAMatchaCheckpoint(f"{where}: decoder act_fn={act!r} is not supported ({', '.join(ACTIVATIONS)})")
    if cfm.get("solver", "euler") != "euler":
        raise NotAMatchaCheckpoint(f"{where}: cfm solver {cfm.get('solver')!r} is not supported (only 'euler')")
    stats = hp.get("data_statistics") or {"mel_mean": 0.0, "mel_std": 1.0}
    n_spks = int(hp.get("n_spks") or 1)
    return MatchaConfig(
        n_vocab=int(hp["n_vocab"]), n_feats=int(hp["n_feats"]), n_spks=n_spks,
        spk_emb_dim=int(hp.get("spk_emb_dim") or 64),
        n_channels=int(ep["n_channels"]), filter_channels=int(ep["filter_channels"]),
        filter_channels_dp=int(dp.get("filter_channels_dp", ep.get("filter_channels_dp", 256))),
        n_heads=int(ep["n_heads"]), n_layers=int(ep["n_layers"]), kernel_size=int(ep["kernel_size"]),
        dp_kernel_size=int(dp.get("kernel_size", 3)), prenet=bool(ep.get("prenet", True)),
        channels=tuple(int(c) for c in dec.get("channels", (256, 256))),
        attention_head_dim=int(dec.get("attention_head_dim", 64)), n_blocks=int(dec.get("n_blocks", 1)),
        num_mid_blocks=int(dec.get("num_mid_blocks", 2)), num_heads=int(dec.get("num_heads", 4)), act_fn=act,
        mel_mean=float(stats["mel_mean"]), mel_std=float(stats["mel_std"]),
        sigma_min=float(cfm.get("sigma_min", 1e-4)), out_size=hp.get("out_size"),
    )


def load_matcha(path: str | Path):
    """A Matcha-TTS Lightning `.ckpt` as (MatchaTTS in eval mode, its plain hyper-parameters).

    Every weight of the network must be in the checkpoint and none may be left over (strict); the
    data statistics come from the `mel_mean` / `mel_std` buffers."""
    from .model import MatchaTTS

    ckpt = load_lightning_checkpoint(path)
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise NotAMatchaCheckpoint(f"{path}: no state_dict / hyper_parameters (not a Lightning checkpoint)")
    hp = hparams_to_plain(ckpt["hyper_parameters"])
    cfg = matcha_config(hp, str(path))
    model = MatchaTTS(cfg)
    state = {k: v for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not match the hyper-parameters
        raise NotAMatchaCheckpoint(f"{path}: weights do not match the hyper-parameters: {e}") from e
    if missing or unexpected:
        raise NotAMatchaCheckpoint(f"{path}: weights do not match the configured Matcha-TTS "
                                   f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    cfg.mel_mean, cfg.mel_std = float(model.mel_mean), float(model.mel_std)
    return model.eval(), hp
