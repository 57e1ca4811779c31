"""Small random Whisper checkpoints written in each published format, for the Whisper tests.

The vocabulary is synthetic (the 256 byte tokens, then made-up ones) but Whisper-sized, so that the
special tokens sit where Whisper's do: 50256 BPE tokens for English-only models, 50257 for
multilingual ones.  The CTranslate2 writer follows python/ctranslate2/specs/model_spec.py
(`_serialize`, binary version 6) and the Whisper converter (fused q/k/v, k/v; aliases; int8 with
per-row scales 127 / max|row|).
"""
from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import torch

from chorus.asr.whisper.model import ModelDimensions, Whisper
from chorus.asr.whisper.tokenizer import special_tokens, spell_token


def tiny_dims(multilingual: bool = False, n_mels: int = 80, layers: int = 2) -> ModelDimensions:
    return ModelDimensions(n_mels=n_mels, n_audio_ctx=1500, n_audio_state=32, n_audio_head=4, n_audio_layer=layers,
                           n_vocab=51865 if multilingual else 51864, n_text_ctx=448, n_text_state=32,
                           n_text_head=4, n_text_layer=layers)


def tiny_whisper(dims: ModelDimensions | None = None, seed: int = 0) -> Whisper:
    """A random model whose weights are on a scale that keeps activations lively."""
    torch.manual_seed(seed)
    model = Whisper(dims or tiny_dims())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("positional_embedding"):
                p.normal_(0, 0.5)
            elif p.dim() == 1:
                p.normal_(1.0 if "ln" in name and name.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0, 0.3 / p.shape[-1] ** 0.5 * (3 if p.dim() > 1 else 1))
    return model.eval()


# -- vocabulary --------------------------------------------------------------------------------

def synthetic_ranks(multilingual: bool) -> dict[bytes, int]:
    n = 50257 if multilingual else 50256
    tokens = [bytes([b]) for b in range(256)]
    tokens += [b" " + w for w in (b"the", b"and", b"so", b"my", b"fellow", b"country", b"ask", b"not")]
    i = 0
    while len(tokens) < n:
        tokens.append(f" w{i}".encode())
        i += 1
    return {t: r for r, t in enumerate(tokens)}


def vocabulary_tokens(ranks: dict[bytes, int], n_vocab: int) -> list[str]:
    """All token strings by id, as CTranslate2's vocabulary.txt and Hugging Face list them."""
    by_id = [spell_token(t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    num_languages = n_vocab - len(ranks) - 1509
    return by_id + special_tokens(num_languages)


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def write_vocabulary_txt(path: Path, tokens: list[str]) -> None:
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")


def write_tokenizer_json(path: Path, tokens: list[str], n_bpe: int) -> None:
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens[:n_bpe])},
                                         "merges": []},
            "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(tokens) if i >= n_bpe]}
    path.write_text(json.dumps(data), encoding="utf-8")


# -- OpenAI and CarelessWhisper .pt ------------------------------------------------------------

def write_openai(path: Path, model: Whisper, with_vocab: bool = True) -> Path:
    torch.save({"dims": model.dims.as_dict(), "model_state_dict": model.state_dict()}, path)
    if with_vocab:
        name = "multilingual.tiktoken" if model.is_multilingual else "gpt2.tiktoken"
        write_tiktoken(path.parent / name, synthetic_ranks(model.is_multilingual))
    return path


LORA_PROJECTIONS = ("query", "key", "value", "out")


def write_carelesswhisper(path: Path, model: Whisper, gran: int = 15, extra_gran_blocks: int = 1,
                          rank: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """CarelessWhisper's StreamingWhisper state dict: every attention projection (encoder attn,
    decoder attn and cross_attn) as `base_layer` + `lora_layer.lora_A/lora_B`.  Returns the merged
    weights the checkpoint stands for."""
    g = torch.Generator().manual_seed(seed)
    state, merged = {}, {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if len(parts) >= 5 and parts[-3] in ("attn", "cross_attn") and parts[-2] in LORA_PROJECTIONS:
            prefix, leaf = ".".join(parts[:-1]), parts[-1]
            state[f"{prefix}.base_layer.{leaf}"] = value
            if leaf == "weight":
                out_f, in_f = value.shape
                a = torch.randn(in_f, rank, generator=g) * 0.1
                b = torch.randn(rank, out_f, generator=g) * 0.1
                state[f"{prefix}.lora_layer.lora_A"] = a
                state[f"{prefix}.lora_layer.lora_B"] = b
                merged[key] = value + (a @ b).t()
        else:
            state[key] = value
    cfg = {"gran": gran, "extra_gran_blocks": extra_gran_blocks, "rank": rank, "cache_gran": True}
    torch.save({"dims": model.dims.as_dict(), "cfg": cfg, "state_dict": state}, path)
    write_tiktoken(path.parent / ("multilingual.tiktoken" if model.is_multilingual else "gpt2.tiktoken"),
                   synthetic_ranks(model.is_multilingual))
    return merged


# -- Hugging Face ----------------------------------------------------------------------------------

def hf_state(model: Whisper) -> dict[str, torch.Tensor]:
    from chorus.asr.whisper.loader import _hf_names

    ours = model.state_dict()
    return {theirs: ours[name].clone().contiguous() for name, theirs in _hf_names(model.dims).items()}


def write_huggingface(folder: Path, model: Whisper, state: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    d = model.dims
    config = {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
              "num_mel_bins": d.n_mels, "max_source_positions": d.n_audio_ctx, "d_model": d.n_audio_state,
              "encoder_attention_heads": d.n_audio_head, "encoder_layers": d.n_audio_layer,
              "vocab_size": d.n_vocab, "max_target_positions": d.n_text_ctx,
              "decoder_attention_heads": d.n_text_head, "decoder_layers": d.n_text_layer,
              "scale_embedding": False}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(hf_state(model) if state is None else state, str(folder / "model.safetensors"))
    ranks = synthetic_ranks(model.is_multilingual)
    write_tokenizer_json(folder / "tokenizer.json", vocabulary_tokens(ranks, d.n_vocab), len(ranks))
    return folder


# -- CTranslate2 ----------------------------------------------------------------------------------

_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


def ct2_variables(model: Whisper) -> dict[str, np.ndarray]:
    """The WhisperSpec variables (float32, before quantization and aliasing), named as CTranslate2 names them."""
    s = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    d = model.dims
    v: dict[str, np.ndarray] = {
        "encoder/num_heads": np.int16(d.n_audio_head), "decoder/num_heads": np.int16(d.n_text_head),
        "decoder/pre_norm": np.int8(1), "decoder/activation": np.int8(3), "decoder/alignment_layer": np.int16(-1),
        "decoder/alignment_heads": np.int16(1), "decoder/scale_embeddings": np.int8(0), "decoder/alibi": np.int8(0),
        "decoder/start_from_zero_embedding": np.int8(0),
        "encoder/conv1/weight": s["encoder.conv1.weight"], "encoder/conv1/bias": s["encoder.conv1.bias"],
        "encoder/conv2/weight": s["encoder.conv2.weight"], "encoder/conv2/bias": s["encoder.conv2.bias"],
        "encoder/position_encodings/encodings": s["encoder.positional_embedding"],
        "encoder/layer_norm/gamma": s["encoder.ln_post.weight"], "encoder/layer_norm/beta": s["encoder.ln_post.bias"],
        "decoder/embeddings/weight": s["decoder.token_embedding.weight"],
        "decoder/position_encodings/encodings": s["decoder.positional_embedding"],
        "decoder/layer_norm/gamma": s["decoder.ln.weight"], "decoder/layer_norm/beta": s["decoder.ln.bias"],
        "decoder/projection/weight": s["decoder.token_embedding.weight"].copy(),
    }

    def lin(theirs, ours):
        v[f"{theirs}/weight"] = s[f"{ours}.weight"]
        v[f"{theirs}/bias"] = s[f"{ours}.bias"]

    def norm(theirs, ours):
        v[f"{theirs}/gamma"] = s[f"{ours}.weight"]
        v[f"{theirs}/beta"] = s[f"{ours}.bias"]

    def fuse(theirs, ours):  # the converter's fuse_linear: rows stacked, a missing bias as zeros
        v[f"{theirs}/weight"] = np.concatenate([s[f"{o}.weight"] for o in ours])
        v[f"{theirs}/bias"] = np.concatenate([s.get(f"{o}.bias", np.zeros(s[f"{o}.weight"].shape[0], np.float32))
                                              for o in ours])

    for side, n in (("encoder", d.n_audio_layer), ("decoder", d.n_text_layer)):
        for i in range(n):
            t, o = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            fuse(f"{t}/self_attention/linear_0", [f"{o}.attn.query", f"{o}.attn.key", f"{o}.attn.value"])
            lin(f"{t}/self_attention/linear_1", f"{o}.attn.out")
            norm(f"{t}/self_attention/layer_norm", f"{o}.attn_ln")
            if side == "decoder":
                lin(f"{t}/attention/linear_0", f"{o}.cross_attn.query")
                fuse(f"{t}/attention/linear_1", [f"{o}.cross_attn.key", f"{o}.cross_attn.value"])
                lin(f"{t}/attention/linear_2", f"{o}.cross_attn.out")
                norm(f"{t}/attention/layer_norm", f"{o}.cross_attn_ln")
            lin(f"{t}/ffn/linear_0", f"{o}.mlp.0")
            lin(f"{t}/ffn/linear_1", f"{o}.mlp.2")
            norm(f"{t}/ffn/layer_norm", f"{o}.mlp_ln")
    return v


def ct2_optimize(variables: dict[str, np.ndarray], quantization: str = "float32"):
    """model_spec's `optimize`: alias equal variables (the later name to the first in sorted order),
    then quantize: int8 for weights that have a `_scale` slot (linear, conv, embeddings), float16/32
    for the other floats."""
    names = sorted(variables)
    aliases: dict[str, str] = {}
    for name in reversed(names):
        value = variables[name]
        for other in names:
            if other == name:
                break
            if np.ndim(value) and np.shape(variables[other]) == np.shape(value) and np.array_equal(variables[other], value):
                aliases[name] = other
                break
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name in aliases:
            continue
        value = variables[name]
        if np.ndim(value) == 0 or value.dtype != np.float32:
            out[name] = value
            continue
        if name.endswith("/weight") and quantization.startswith("int8"):
            w = value.reshape(value.shape[0], -1)
            amax = np.abs(w).max(axis=1)
            amax[amax == 0] = 127.0
            scale = (127.0 / amax).astype(np.float32)
            out[name] = np.rint(w * scale[:, None]).astype(np.int8).reshape(value.shape)
            out[name + "_scale"] = scale
        elif quantization in ("float16", "int8_float16"):
            out[name] = value.astype(np.float16)
        else:
            out[name] = value
    return out, {a: aliases[a] for a in sorted(aliases)}


def write_model_bin(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str],
                    spec: str = "WhisperSpec", revision: int = 3, version: int = 6) -> None:
    def string(f, s: str):
        f.write(struct.pack("<H", len(s.encode()) + 1))
        f.write(s.encode())
        f.write(b"\0")

    with open(path, "wb") as f:
        f.write(struct.pack("<I", version))
        string(f, spec)
        f.write(struct.pack("<I", revision))
        f.write(struct.pack("<I", len(variables)))
        for name in sorted(variables):
            value = np.asarray(variables[name])
            string(f, name)
            f.write(struct.pack("<B", value.ndim))
            for dim in value.shape:
                f.write(struct.pack("<I", dim))
            f.write(struct.pack("<B", _CT2_DTYPES.index(value.dtype.name)))
            data = np.ascontiguousarray(value).tobytes()
            f.write(struct.pack("<I", len(data)))
            f.write(data)
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            string(f, alias)
            string(f, target)


def write_ctranslate2(folder: Path, model: Whisper, quantization: str = "float32",
                      variables: dict | None = None, vocab: str = "vocabulary.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    values, aliases = ct2_optimize(ct2_variables(model) if variables is None else variables, quantization)
    write_model_bin(folder / "model.bin", values, aliases)
    d = model.dims
    ranks = synthetic_ranks(model.is_multilingual)
    tokens = vocabulary_tokens(ranks, d.n_vocab)
    config = {"alignment_heads": [[d.n_text_layer - 1, 0], [d.n_text_layer - 1, 2]],
              "lang_ids": [tokens.index(f"<|{c}|>") for c in ("en", "zh")], "suppress_ids": [],
              "suppress_ids_begin": [220, len(ranks)]}
    (folder / "config.json").write_text(json.dumps(config))
    if vocab == "vocabulary.txt":
        write_vocabulary_txt(folder / "vocabulary.txt", tokens)
    else:
        write_tokenizer_json(folder / "tokenizer.json", tokens, len(ranks))
    return folder
