"""CosyVoice 2's `cosyvoice2.yaml`, read as data: numbers and structure, no constructor ever run.

The shipped yaml is HyperPyYAML: `!new:pkg.Class` / `!name:` / `!apply:` build objects and `!ref <key>` refers to
other keys (`!ref <chunk_size> * <token_mel_ratio>` is arithmetic).  `read_cosyvoice_yaml` parses it with a safe
loader for which every tag is plain data (a tagged mapping stays a mapping, its tag kept under `"!"`), then
resolves `!ref` to the referred value, evaluating arithmetic over numbers only (an AST walk, never `eval`).
`FlowConfig.from_mapping(doc["flow"])` takes the sizes of the flow (`CausalMaskedDiffWithXvec`); the HiFT
section is read by `hift.py`.
"""
from __future__ import annotations

import ast
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

TAG_KEY = "!"


class Ref(str):
    """An unresolved `!ref` expression."""


class _DataLoader(yaml.SafeLoader):
    """SafeLoader for which any `!tag` is data: constructors named in the file are never called."""


def _tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> Any:
    tag = "!" + tag_suffix
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        return Ref(value) if tag == "!ref" else {TAG_KEY: tag, "value": value}
    if isinstance(node, yaml.SequenceNode):
        return {TAG_KEY: tag, "args": loader.construct_sequence(node, deep=True)}
    value = loader.construct_mapping(node, deep=True)
    return {TAG_KEY: tag, **value}


_DataLoader.add_multi_constructor("!", _tagged)
# HyperPyYAML writes floats like 1e-06, which YAML 1.1's resolver leaves as strings
_DataLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _arith(node: ast.AST, expr: str) -> Any:
    if isinstance(node, ast.Expression):
        return _arith(node.body, expr)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _arith(node.operand, expr)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left, expr), _arith(node.right, expr))
    raise ValueError(f"!ref {expr!r}: only arithmetic over numbers is read")


def _lookup(doc: Mapping, key: str, expr: str) -> Any:
    value: Any = doc
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ValueError(f"!ref {expr!r}: no key {key!r} in the yaml")
        value = value[part]
    return value


def _resolve(value: Any, doc: Mapping, depth: int = 0) -> Any:
    if depth > 32:
        raise ValueError("!ref nesting too deep (a cycle?)")
    if isinstance(value, Ref):
        expr = str(value).strip()
        refs = re.findall(r"<([^<>]+)>", expr)
        whole = re.fullmatch(r"<([^<>]+)>", expr)
        if whole:  # a plain reference: any value, e.g. a number or a string
            return _resolve(_lookup(doc, whole.group(1), expr), doc, depth + 1)
        numbers = {}
        for i, key in enumerate(refs):
            target = _resolve(_lookup(doc, key, expr), doc, depth + 1)
            if isinstance(target, bool) or not isinstance(target, (int, float)):
                raise ValueError(f"!ref {expr!r}: {key!r} is not a number")
            numbers[key] = target
        text = re.sub(r"<([^<>]+)>", lambda m: repr(numbers[m.group(1)]), expr)
        return _arith(ast.parse(text, mode="eval"), expr)
    if isinstance(value, Mapping):
        return {k: _resolve(v, doc, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, doc, depth) for v in value]
    return value


def read_cosyvoice_yaml(path: str | os.PathLike) -> dict:
    """The yaml as plain data with `!ref`s resolved; tags kept as `"!"` entries, nothing constructed."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        doc = yaml.load(text, Loader=_DataLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not readable YAML ({exc})") from None
    if not isinstance(doc, Mapping):
        raise ValueError(f"{path}: expected a mapping at the top")
    return _resolve(doc, doc)


def _section(mapping: Mapping, key: str, where: str, tag: str | None = None) -> Mapping:
    value = mapping.get(key)
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}.{key}: missing or not a mapping")
    if tag is not None and value.get(TAG_KEY, "").rsplit(".", 1)[-1] != tag:
        raise ValueError(f"{where}.{key}: expected a {tag}, found {value.get(TAG_KEY)!r}")
    return value


def _get(mapping: Mapping, key: str, default: Any, kind: type, where: str) -> Any:
    value = mapping.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{where}.{key}: expected {kind.__name__}, found {value!r}")
    return value


@dataclass(frozen=True)
class EncoderConfig:
    """UpsampleConformerEncoder: linear embedding, espnet rel-pos attention, no macaron FFN or conv module."""

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4        # fixed in CosyVoice's code (not in the yaml)
    static_chunk_size: int = 25   # tokens; the up-encoder uses twice this in mel frames


@dataclass(frozen=True)
class EstimatorConfig:
    """CausalConditionalDecoder (the flow-matching U-Net, one resolution level in CosyVoice 2)."""

    in_channels: int = 320
    out_channels: int = 80
    channels: tuple[int, ...] = (256,)
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    act_fn: str = "gelu"
    static_chunk_size: int = 50   # mel frames


@dataclass(frozen=True)
class FlowConfig:
    """CausalMaskedDiffWithXvec with its CausalConditionalCFM; defaults are CosyVoice2-0.5B's."""

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    spk_emb_dim: int = 80         # the CFM's projected speaker embedding
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    n_timesteps: int = 10         # fixed in CosyVoice's flow.inference
    noise_frames: int = 50 * 300  # CausalConditionalCFM.rand_noise = randn(1, 80, 15000) under seed 0
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)

    @classmethod
    def from_mapping(cls, flow: Mapping, where: str = "flow") -> "FlowConfig":
        """Sizes from the yaml's `flow:` section (resolved by `read_cosyvoice_yaml`); refuses other designs."""
        if flow.get(TAG_KEY, "").rsplit(".", 1)[-1] != "CausalMaskedDiffWithXvec":
            raise ValueError(f"{where}: expected CosyVoice 2's CausalMaskedDiffWithXvec, found {flow.get(TAG_KEY)!r}")
        d = cls()
        enc = _section(flow, "encoder", where, "UpsampleConformerEncoder")
        ew = f"{where}.encoder"
        for key, want in (("input_layer", "linear"), ("pos_enc_layer_type", "rel_pos_espnet"),
                          ("selfattention_layer_type", "rel_selfattn")):
            if enc.get(key, want) != want:
                raise ValueError(f"{ew}.{key}: only {want!r} is implemented, found {enc.get(key)!r}")
        for key, want in (("use_cnn_module", False), ("macaron_style", False), ("normalize_before", True)):
            if enc.get(key) is not want:
                raise ValueError(f"{ew}.{key}: only {want} is implemented (CosyVoice 2), found {enc.get(key)!r}")
        if enc.get("activation_type", "swish") != "swish":
            raise ValueError(f"{ew}.activation_type: only 'swish' is implemented")
        de = EncoderConfig()
        encoder = EncoderConfig(
            input_size=_get(enc, "input_size", de.input_size, int, ew),
            output_size=_get(enc, "output_size", de.output_size, int, ew),
            attention_heads=_get(enc, "attention_heads", de.attention_heads, int, ew),
            linear_units=_get(enc, "linear_units", de.linear_units, int, ew),
            num_blocks=_get(enc, "num_blocks", de.num_blocks, int, ew),
            static_chunk_size=_get(enc, "static_chunk_size", de.static_chunk_size, int, ew))
        cfm = _section(flow, "decoder", where, "CausalConditionalCFM")
        cw = f"{where}.decoder"
        params = cfm.get("cfm_params", {})
        params = params.get("content", params) if isinstance(params, Mapping) else {}
        if params.get("solver", "euler") != "euler":
            raise ValueError(f"{cw}.cfm_params.solver: only 'euler' is implemented")
        est = _section(cfm, "estimator", cw, "CausalConditionalDecoder")
        sw = f"{cw}.estimator"
        dd = EstimatorConfig()
        channels = est.get("channels", list(dd.channels))
        if not (isinstance(channels, list) and len(channels) == 1 and isinstance(channels[0], int)):
            raise ValueError(f"{sw}.channels: only one level (CosyVoice 2's [256]) is implemented, found {channels!r}")
        estimator = EstimatorConfig(
            in_channels=_get(est, "in_channels", dd.in_channels, int, sw),
            out_channels=_get(est, "out_channels", dd.out_channels, int, sw),
            channels=tuple(channels),
            attention_head_dim=_get(est, "attention_head_dim", dd.attention_head_dim, int, sw),
            n_blocks=_get(est, "n_blocks", dd.n_blocks, int, sw),
            num_mid_blocks=_get(est, "num_mid_blocks", dd.num_mid_blocks, int, sw),
            num_heads=_get(est, "num_heads", dd.num_heads, int, sw),
            act_fn=_get(est, "act_fn", dd.act_fn, str, sw),
            static_chunk_size=_get(est, "static_chunk_size", dd.static_chunk_size, int, sw))
        if estimator.act_fn not in ("gelu", "gelu-approximate", "geglu", "geglu-approximate", "snakebeta"):
            raise ValueError(f"{sw}.act_fn: unknown activation {estimator.act_fn!r}")
        cfg = cls(
            input_size=_get(flow, "input_size", d.input_size, int, where),
            output_size=_get(flow, "output_size", d.output_size, int, where),
            spk_embed_dim=_get(flow, "spk_embed_dim", d.spk_embed_dim, int, where),
            vocab_size=_get(flow, "vocab_size", d.vocab_size, int, where),
            token_mel_ratio=_get(flow, "token_mel_ratio", d.token_mel_ratio, int, where),
            pre_lookahead_len=_get(flow, "pre_lookahead_len", d.pre_lookahead_len, int, where),
            spk_emb_dim=_get(cfm, "spk_emb_dim", d.spk_emb_dim, int, cw),
            inference_cfg_rate=_get(params, "inference_cfg_rate", d.inference_cfg_rate, float, f"{cw}.cfm_params"),
            t_scheduler=_get(params, "t_scheduler", d.t_scheduler, str, f"{cw}.cfm_params"),
            encoder=encoder, estimator=estimator)
        cfg.check()
        return cfg

    def check(self) -> None:
        e, s = self.encoder, self.estimator
        if self.token_mel_ratio != 2:
            raise ValueError(f"flow.token_mel_ratio: the encoder upsamples by 2, found {self.token_mel_ratio}")
        if e.input_size != self.input_size or e.output_size != e.input_size:
            raise ValueError("flow: the pre-lookahead layer needs input_size == encoder input_size == output_size")
        if s.static_chunk_size != e.static_chunk_size * self.token_mel_ratio:
            raise ValueError(f"flow: the estimator's static_chunk_size {s.static_chunk_size} is not "
                             f"{self.token_mel_ratio} x the encoder's {e.static_chunk_size}")
        if s.in_channels != 4 * self.output_size or self.spk_emb_dim != self.output_size:
            raise ValueError("flow: the estimator's input is [x, mu, spks, cond], 4 x output_size channels")
        if self.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"flow.decoder.cfm_params.t_scheduler: unknown {self.t_scheduler!r}")
        if e.output_size % e.attention_heads:
            raise ValueError("flow.encoder: output_size is not a multiple of attention_heads")
