"""Load a Whisper checkpoint in any of the formats it is published in; the format is picked from the path.

* OpenAI `.pt`: `{"dims": ..., "model_state_dict": ...}` (openai/whisper's `load_model`);
* CarelessWhisper / WhisperRT `.pt`: `{"dims", "cfg": {"gran", "rank", "extra_gran_blocks", ...},
  "state_dict"}`, whose attention projections are LoRA-wrapped (`<proj>.base_layer.weight/bias`,
  `<proj>.lora_layer.lora_A` `[in, r]`, `lora_B` `[r, out]`, output `base(x) + x @ A @ B * alpha / r`
  with alpha = r): merged here into plain weights, `W + (A @ B)^T`;
* Hugging Face directory: `config.json` (`model_type: whisper`) and `model.safetensors` with
  `WhisperForConditionalGeneration` names; vocabulary from `tokenizer.json` or `vocab.json`;
* CTranslate2 directory (faster-whisper's): `model.bin` (see ct2.py), `config.json` (alignment heads,
  suppress ids, language ids), `vocabulary.txt` or `tokenizer.json`.  Fused q/k/v and k/v
  projections are split back; int8 weights are dequantized with their scales.

Every weight is used and none is missing (ValueError naming them); torch files are read with
`weights_only=True`.  An OpenAI `.pt` carries no vocabulary: the tokenizer is read from whisper's
`gpt2.tiktoken` / `multilingual.tiktoken` (or a `tokenizer.json`, `vocab.json`, `vocabulary.txt`)
next to the file, or from `vocab=`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .ct2 import CT2FormatError, dequantize, read_model_bin
from .model import ModelDimensions, Whisper
from .tokenizer import Tokenizer, read_ranks


class WhisperCheckpointError(ValueError):
    """Not a Whisper checkpoint, or one whose weights do not match its dimensions."""


@dataclass(frozen=True)
class CausalConfig:
    """CarelessWhisper's block-causal encoder: blocks of `gran` encoder frames (20 ms each), the first
    `extra_gran_blocks + 1` blocks encoded as one."""

    gran: int
    extra_gran_blocks: int = 0

    @property
    def first_block(self) -> int:
        return self.gran * (self.extra_gran_blocks + 1)


@dataclass
class WhisperBundle:
    model: Whisper
    tokenizer: Tokenizer | None
    format: str                          # openai | carelesswhisper | huggingface | ctranslate2
    causal: CausalConfig | None = None   # set for CarelessWhisper checkpoints
    config: dict = field(default_factory=dict)

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise WhisperCheckpointError(
                "this checkpoint has no vocabulary: put whisper's gpt2.tiktoken (English-only models) or "
                "multilingual.tiktoken next to it, or pass vocab=")
        return self.tokenizer


VOCAB_FILES = ("vocabulary.txt", "tokenizer.json", "vocab.json")


def detect_format(path: str | Path) -> str:
    """openai / carelesswhisper (a torch file; told apart by its keys at load), huggingface or
    ctranslate2 (directories); raises WhisperCheckpointError for anything else."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.bin").is_file():
            return "ctranslate2"
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return "huggingface"
        raise WhisperCheckpointError(
            f"{path}: not a Whisper model directory (CTranslate2: model.bin + config.json; "
            "Hugging Face: config.json + model.safetensors)")
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
        return "torch"
    raise WhisperCheckpointError(f"{path}: not a Whisper checkpoint (an OpenAI or CarelessWhisper .pt file, "
                                 "a Hugging Face or a CTranslate2 directory)")


def load_whisper(path: str | Path, vocab: str | Path | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> WhisperBundle:
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "torch":
        bundle = _load_torch(path)
    elif fmt == "huggingface":
        bundle = _load_huggingface(path)
    else:
        bundle = _load_ctranslate2(path)
    vocab_path = Path(vocab) if vocab is not None else _find_vocab(path, bundle.model.dims)
    if vocab_path is not None:
        ranks = read_ranks(vocab_path)
        bundle.tokenizer = Tokenizer.from_ranks(ranks, bundle.model.dims.n_vocab, bundle.model.is_multilingual)
    bundle.model.to(device=device, dtype=dtype).eval()
    return bundle


def _find_vocab(path: Path, dims: ModelDimensions) -> Path | None:
    folder = path if path.is_dir() else path.parent
    names = VOCAB_FILES if path.is_dir() else (
        ("multilingual.tiktoken" if dims.is_multilingual else "gpt2.tiktoken"),) + VOCAB_FILES
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def _build(dims: ModelDimensions, state: dict[str, torch.Tensor], source: str) -> Whisper:
    """A model from a state dict in our (openai/whisper's) names: every weight used, none missing."""
    with torch.device("meta"):
        model = Whisper(dims)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unused = sorted(set(state) - set(expected))
    if missing or unused:
        raise WhisperCheckpointError(f"{source}: weights do not match Whisper {dims}: "
                                     f"missing {_names(missing)}; unused {_names(unused)}")
    bad = [f"{k} {tuple(state[k].shape)} (want {tuple(s)})" for k, s in expected.items() if state[k].shape != s]
    if bad:
        raise WhisperCheckpointError(f"{source}: wrong shapes: {_names(bad)}")
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model


def _names(names: list[str], limit: int = 12) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _dims_from(raw, source: str) -> ModelDimensions:
    try:
        return ModelDimensions(**{k: int(raw[k]) for k in ModelDimensions.__dataclass_fields__})
    except (KeyError, TypeError, ValueError) as e:
        raise WhisperCheckpointError(f"{source}: bad `dims` ({e})") from None


# -- torch files: OpenAI and CarelessWhisper ------------------------------------------------------

def _load_torch(path: Path) -> WhisperBundle:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickles with code, zip errors, ...
        raise WhisperCheckpointError(f"{path}: not a loadable weights-only torch file ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "dims" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise WhisperCheckpointError(f"{path}: not a Whisper checkpoint (no `dims`; has {keys})")
    dims = _dims_from(ckpt["dims"], str(path))
    if "model_state_dict" in ckpt and "cfg" not in ckpt:
        return WhisperBundle(_build(dims, dict(ckpt["model_state_dict"]), str(path)), None, "openai")
    if "cfg" in ckpt and "state_dict" in ckpt:
        cfg = dict(ckpt["cfg"])
        try:
            causal = CausalConfig(int(cfg["gran"]), int(cfg.get("extra_gran_blocks", 0)))
        except (KeyError, TypeError, ValueError):
            raise WhisperCheckpointError(f"{path}: CarelessWhisper `cfg` without an integer `gran`") from None
        state = merge_lora(dict(ckpt["state_dict"]), str(path))
        return WhisperBundle(_build(dims, state, str(path)), None, "carelesswhisper", causal, cfg)
    raise WhisperCheckpointError(f"{path}: has `dims` but neither `model_state_dict` (OpenAI) nor "
                                 "`cfg` + `state_dict` (CarelessWhisper)")


def merge_lora(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """CarelessWhisper's LoRA-wrapped projections folded into plain weights (alpha = rank: scale 1)."""
    out: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if ".base_layer." in key:
            prefix, leaf = key.split(".base_layer.")
            lora.setdefault(prefix, {})[leaf] = value
        elif ".lora_layer." in key:
            prefix, leaf = key.split(".lora_layer.")
            lora.setdefault(prefix, {})[leaf] = value
        else:
            out[key] = value
    for prefix, parts in lora.items():
        if "weight" not in parts or "lora_A" not in parts or "lora_B" not in parts:
            raise WhisperCheckpointError(f"{source}: LoRA layer {prefix} lacks base_layer.weight, lora_A or lora_B "
                                         f"(has {sorted(parts)})")
        w, a, b = parts.pop("weight").float(), parts.pop("lora_A").float(), parts.pop("lora_B").float()
        if a.shape != (w.shape[1], a.shape[1]) or b.shape != (a.shape[1], w.shape[0]):
            raise WhisperCheckpointError(f"{source}: LoRA {prefix}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} "
                                         f"do not fit a {tuple(w.shape)} weight")
        out[f"{prefix}.weight"] = w + (a @ b).t()
        if "bias" in parts:
            out[f"{prefix}.bias"] = parts.pop("bias")
        if parts:
            raise WhisperCheckpointError(f"{source}: LoRA layer {prefix} has unused entries {sorted(parts)}")
    return out


# -- Hugging Face ---------------------------------------------------------------------------------

def _hf_names(dims: ModelDimensions) -> dict[str, str]:
    """Our name -> WhisperForConditionalGeneration's."""
    names = {}

    def linear(ours, theirs, bias=True):
        names[f"{ours}.weight"] = f"{theirs}.weight"
        if bias:
            names[f"{ours}.bias"] = f"{theirs}.bias"

    def attn(ours, theirs):
        linear(f"{ours}.query", f"{theirs}.q_proj")
        linear(f"{ours}.key", f"{theirs}.k_proj", bias=False)
        linear(f"{ours}.value", f"{theirs}.v_proj")
        linear(f"{ours}.out", f"{theirs}.out_proj")

    for side, n in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(n):
            o, t = f"{side}.blocks.{i}", f"model.{side}.layers.{i}"
            attn(f"{o}.attn", f"{t}.self_attn")
            linear(f"{o}.attn_ln", f"{t}.self_attn_layer_norm")
            if side == "decoder":
                attn(f"{o}.cross_attn", f"{t}.encoder_attn")
                linear(f"{o}.cross_attn_ln", f"{t}.encoder_attn_layer_norm")
            linear(f"{o}.mlp.0", f"{t}.fc1")
            linear(f"{o}.mlp.2", f"{t}.fc2")
            linear(f"{o}.mlp_ln", f"{t}.final_layer_norm")
    linear("encoder.conv1", "model.encoder.conv1")
    linear("encoder.conv2", "model.encoder.conv2")
    names["encoder.positional_embedding"] = "model.encoder.embed_positions.weight"
    linear("encoder.ln_post", "model.encoder.layer_norm")
    names["decoder.token_embedding.weight"] = "model.decoder.embed_tokens.weight"
    names["decoder.positional_embedding"] = "model.decoder.embed_positions.weight"
    linear("decoder.ln", "model.decoder.layer_norm")
    return names


def _load_huggingface(path: Path) -> WhisperBundle:
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") != "whisper":
        raise WhisperCheckpointError(f"{path}: config.json model_type {cfg.get('model_type')!r} is not 'whisper'")
    try:
        dims = ModelDimensions(
            n_mels=cfg["num_mel_bins"], n_audio_ctx=cfg["max_source_positions"], n_audio_state=cfg["d_model"],
            n_audio_head=cfg["encoder_attention_heads"], n_audio_layer=cfg["encoder_layers"],
            n_vocab=cfg["vocab_size"], n_text_ctx=cfg["max_target_positions"], n_text_state=cfg["d_model"],
            n_text_head=cfg["decoder_attention_heads"], n_text_layer=cfg["decoder_layers"])
    except KeyError as e:
        raise WhisperCheckpointError(f"{path}: config.json lacks {e}") from None
    if cfg.get("scale_embedding"):
        raise WhisperCheckpointError(f"{path}: scale_embedding is not Whisper's")
    theirs = load_file(str(path / "model.safetensors"))
    theirs = {k[len("model."):] if k.startswith("model.model.") else k: v for k, v in theirs.items()}
    state, missing = {}, []
    for ours, name in _hf_names(dims).items():
        if name in theirs:
            state[ours] = theirs.pop(name)
        else:
            missing.append(name)
    if missing:
        raise WhisperCheckpointError(f"{path}: model.safetensors lacks {_names(missing)}")
    proj = theirs.pop("proj_out.weight", None)
    if proj is not None and not torch.equal(proj, state.get("decoder.token_embedding.weight", proj)):
        raise WhisperCheckpointError(f"{path}: proj_out.weight is not tied to the token embedding")
    if theirs:
        raise WhisperCheckpointError(f"{path}: unused weights {_names(sorted(theirs))}")
    bundle = WhisperBundle(_build(dims, state, str(path)), None, "huggingface", config=cfg)
    gen = path / "generation_config.json"
    if gen.is_file():
        heads = json.loads(gen.read_text()).get("alignment_heads")
        if heads:
            bundle.model.alignment_heads = [tuple(h) for h in heads]
    return bundle


# -- CTranslate2 ----------------------------------------------------------------------------------

# scalar variables the Whisper spec writes, and the values Whisper's maths needs
_CT2_SCALARS = {"decoder/activation": 3,   # GELU (common_spec.Activation)
                "decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/alibi": 0,
                "decoder/start_from_zero_embedding": 0}
_CT2_FREE_SCALARS = ("encoder/num_heads", "decoder/num_heads", "decoder/alignment_heads", "decoder/alignment_layer")


def _load_ctranslate2(path: Path) -> WhisperBundle:
    try:
        ct = read_model_bin(path / "model.bin")
    except CT2FormatError as e:
        raise WhisperCheckpointError(str(e)) from None
    if ct.spec != "WhisperSpec":
        raise WhisperCheckpointError(f"{path}: a CTranslate2 {ct.spec}, not a WhisperSpec")
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        if name not in ct.variables and name not in ct.aliases:
            raise WhisperCheckpointError(f"{path}: model.bin lacks {name}")
        used.add(name)
        if f"{name}_scale" in ct.variables or f"{name}_scale" in ct.aliases:
            used.add(f"{name}_scale")
        return dequantize(ct, name)

    def scalar(name: str) -> int:
        used.add(name)
        if name not in ct.variables:
            raise WhisperCheckpointError(f"{path}: model.bin lacks {name}")
        return int(ct.variables[name].item())

    for name, want in _CT2_SCALARS.items():
        if name in ct.variables and scalar(name) != want:
            raise WhisperCheckpointError(f"{path}: {name}={scalar(name)} is not Whisper's ({want})")
    n_enc = _count_layers(ct, "encoder")
    n_dec = _count_layers(ct, "decoder")
    emb = get("decoder/embeddings/weight")
    conv1 = get("encoder/conv1/weight")
    enc_pos = get("encoder/position_encodings/encodings")
    dec_pos = get("decoder/position_encodings/encodings")
    dims = ModelDimensions(n_mels=conv1.shape[1], n_audio_ctx=enc_pos.shape[0], n_audio_state=conv1.shape[0],
                           n_audio_head=scalar("encoder/num_heads"), n_audio_layer=n_enc, n_vocab=emb.shape[0],
                           n_text_ctx=dec_pos.shape[0], n_text_state=emb.shape[1],
                           n_text_head=scalar("decoder/num_heads"), n_text_layer=n_dec)
    state = {"encoder.conv1.weight": conv1, "encoder.conv1.bias": get("encoder/conv1/bias"),
             "encoder.conv2.weight": get("encoder/conv2/weight"), "encoder.conv2.bias": get("encoder/conv2/bias"),
             "encoder.positional_embedding": enc_pos, "decoder.positional_embedding": dec_pos,
             "decoder.token_embedding.weight": emb}

    def norm(ours, theirs):
        state[f"{ours}.weight"] = get(f"{theirs}/gamma")
        state[f"{ours}.bias"] = get(f"{theirs}/beta")

    def linear(ours, theirs):
        state[f"{ours}.weight"] = get(f"{theirs}/weight")
        state[f"{ours}.bias"] = get(f"{theirs}/bias")

    def split(ours: list[str], theirs: str):
        """A fused projection ([q;] k; v stacked by rows) back into ours; the key has no bias."""
        w, b = get(f"{theirs}/weight"), get(f"{theirs}/bias")
        n = w.shape[0] // len(ours)
        for i, name in enumerate(ours):
            state[f"{name}.weight"] = w[i * n:(i + 1) * n]
            if name.endswith(".key"):
                if b[i * n:(i + 1) * n].abs().max() != 0:
                    raise WhisperCheckpointError(f"{path}: {theirs} has a key bias; Whisper's key projection has none")
            else:
                state[f"{name}.bias"] = b[i * n:(i + 1) * n]

    norm("encoder.ln_post", "encoder/layer_norm")
    norm("decoder.ln", "decoder/layer_norm")
    for side, n in (("encoder", n_enc), ("decoder", n_dec)):
        for i in range(n):
            o, t = f"{side}.blocks.{i}", f"{side}/layer_{i}"
            split([f"{o}.attn.query", f"{o}.attn.key", f"{o}.attn.value"], f"{t}/self_attention/linear_0")
            linear(f"{o}.attn.out", f"{t}/self_attention/linear_1")
            norm(f"{o}.attn_ln", f"{t}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{o}.cross_attn.query", f"{t}/attention/linear_0")
                split([f"{o}.cross_attn.key", f"{o}.cross_attn.value"], f"{t}/attention/linear_1")
                linear(f"{o}.cross_attn.out", f"{t}/attention/linear_2")
                norm(f"{o}.cross_attn_ln", f"{t}/attention/layer_norm")
            linear(f"{o}.mlp.0", f"{t}/ffn/linear_0")
            linear(f"{o}.mlp.2", f"{t}/ffn/linear_1")
            norm(f"{o}.mlp_ln", f"{t}/ffn/layer_norm")
    # the output projection is tied to the token embedding (an alias, or an equal copy)
    proj = "decoder/projection/weight"
    if ct.aliases.get(proj) != "decoder/embeddings/weight":
        if proj not in ct.variables or not torch.equal(get(proj), emb):
            raise WhisperCheckpointError(f"{path}: {proj} is not tied to decoder/embeddings/weight")
    used.add(proj)
    if "decoder/projection/bias" in ct.variables:
        if get("decoder/projection/bias").abs().max() != 0:
            raise WhisperCheckpointError(f"{path}: decoder/projection/bias is not zero; Whisper's output has no bias")
    used.update(n for n in _CT2_FREE_SCALARS if n in ct.variables)
    left = sorted(n for n in list(ct.variables) + list(ct.aliases) if n not in used and
                  not (ct.variables.get(n) is not None and ct.variables[n].dim() == 0 and ct.variables[n].item() == 0))
    if left:
        raise WhisperCheckpointError(f"{path}: unused variables in model.bin: {_names(left)}")
    model = _build(dims, state, str(path))
    cfg = {}
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("alignment_heads"):
            model.alignment_heads = [tuple(h) for h in cfg["alignment_heads"]]
    return WhisperBundle(model, None, "ctranslate2", config=cfg)


def _count_layers(ct, side: str) -> int:
    n = 0
    while any(k.startswith(f"{side}/layer_{n}/") for k in ct.variables):
        n += 1
    return n
