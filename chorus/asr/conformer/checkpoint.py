"""Load and save NeMo cache-aware FastConformer checkpoints (.nemo) for chorus."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..nemo_archive import NemoFormatError, read_nemo, write_nemo
from ..tokenizer import SentencePieceTokenizer, TokenizerError
from .asr_model import FastConformerModel, ModelSpec
from .model import ModelConfigError


@dataclass
class LoadedModel:
    model: FastConformerModel
    tokenizer: SentencePieceTokenizer
    config: dict
    path: str


def load_fastconformer(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Read a .nemo file into a FastConformerModel, checking that every weight is used."""
    archive = read_nemo(path)
    try:
        spec = ModelSpec.from_nemo(archive.config)
    except (KeyError, TypeError) as exc:
        raise ModelConfigError(f"{path}: model_config.yaml lacks a required entry: {exc}") from exc
    except ModelConfigError as exc:
        raise ModelConfigError(f"{path}: not a cache-aware streaming FastConformer: {exc}") from exc
    tok_cfg = archive.config.get("tokenizer") or {}
    if tok_cfg.get("type", "bpe") != "bpe":
        raise ModelConfigError(f"{path}: tokenizer type {tok_cfg.get('type')!r} is not supported (bpe only)")
    try:
        tokenizer = SentencePieceTokenizer(archive.artifact(tok_cfg.get("model_path"), "SentencePiece tokenizer"))
    except TokenizerError as exc:
        raise NemoFormatError(f"{path}: {exc}") from exc
    if tokenizer.vocab_size != spec.vocab_size:
        raise ModelConfigError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, "
                               f"the model's output layer {spec.vocab_size}")
    state = dict(archive.state_dict)
    if spec.rnnt is None:  # CTC-only NeMo models keep the CTC head under `decoder`
        state = {("ctc_" + k if k.startswith("decoder.decoder_layers") else k): v for k, v in state.items()}
    model = FastConformerModel(spec)
    _check_derived_buffers(model, state, path)
    missing, unused = _key_mismatch(model, state)
    if missing or unused:
        raise NemoFormatError(f"{path}: weights do not match the model described by its config; "
                              f"missing: {_preview(missing)}; not used: {_preview(unused)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise NemoFormatError(f"{path}: weights do not fit the configured model: {exc}") from exc
    return LoadedModel(model.to(device).eval(), tokenizer, archive.config, str(path))


def _check_derived_buffers(model: FastConformerModel, state: dict, path) -> None:
    """Older NeMo versions saved the relative-position table `encoder.pos_enc.pe`; it is not a
    weight but a function of d_model, so it is checked against ours and then dropped."""
    pe = state.pop("encoder.pos_enc.pe", None)
    if pe is None:
        return
    ours = model.encoder.pos_enc._table((pe.shape[1] + 1) // 2)
    if pe.shape != ours.shape or not torch.allclose(pe.float(), ours, atol=1e-5):
        raise NemoFormatError(f"{path}: encoder.pos_enc.pe differs from NeMo's sinusoid table")


def _key_mismatch(model: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict().keys())
    return sorted(expected - state.keys()), sorted(state.keys() - expected)


def _preview(keys: list[str], n: int = 6) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def nemo_config(spec: ModelSpec) -> dict:
    """A complete model_config.yaml for `spec`, in the layout NeMo's own configs use."""
    mel = spec.mel
    cfg: dict = {
        "sample_rate": mel.sample_rate,
        "tokenizer": {"dir": None, "type": "bpe"},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": mel.sample_rate, "normalize": "NA",
            "window_size": mel.win_length / mel.sample_rate, "window_stride": mel.hop_length / mel.sample_rate,
            "window": mel.window, "features": mel.n_mels, "n_fft": mel.n_fft, "frame_splicing": 1,
            "dither": 1.0e-05, "pad_to": 0, "preemph": mel.preemph, "log": mel.log,
            "log_zero_guard_type": mel.log_zero_guard_type, "log_zero_guard_value": mel.log_zero_guard_value,
            "mag_power": mel.mag_power, "lowfreq": mel.lowfreq, "highfreq": mel.highfreq,
            "mel_norm": mel.mel_norm,
        },
        "encoder": spec.encoder.to_nemo(),
        "target": spec.target,
    }
    if spec.rnnt:
        r = spec.rnnt
        cfg["model_defaults"] = {"enc_hidden": spec.encoder.d_model, "pred_hidden": r.pred_hidden,
                                 "joint_hidden": r.joint_hidden}
        cfg["decoder"] = {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder", "normalization_mode": None,
            "random_state_sampling": False, "blank_as_pad": True, "vocab_size": spec.vocab_size,
            "prednet": {"pred_hidden": r.pred_hidden, "pred_rnn_layers": r.pred_rnn_layers, "t_max": None,
                        "dropout": r.pred_dropout},
        }
        cfg["joint"] = {
            "_target_": "nemo.collections.asr.modules.RNNTJoint", "log_softmax": None,
            "preserve_memory": False, "fuse_loss_wer": True, "fused_batch_size": 4,
            "num_classes": spec.vocab_size, "vocabulary": [],
            "jointnet": {"encoder_hidden": spec.encoder.d_model, "pred_hidden": r.pred_hidden,
                         "joint_hidden": r.joint_hidden, "activation": r.activation, "dropout": r.joint_dropout},
        }
        cfg["decoding"] = {"strategy": "greedy_batch", "greedy": {"max_symbols": r.max_symbols}}
    ctc_decoder = {"_target_": "nemo.collections.asr.modules.ConvASRDecoder",
                   "feat_in": spec.encoder.d_model, "num_classes": spec.vocab_size, "vocabulary": []}
    if spec.ctc and spec.rnnt:
        cfg["aux_ctc"] = {"ctc_loss_weight": 0.3, "use_cer": False, "ctc_reduction": "mean_batch",
                          "decoder": ctc_decoder, "decoding": {"strategy": "greedy"}}
    elif spec.ctc:
        cfg["decoder"] = ctc_decoder
        cfg["decoding"] = {"strategy": "greedy"}
    return cfg


def save_fastconformer(path: str | os.PathLike, model: FastConformerModel, tokenizer: SentencePieceTokenizer,
                       extra_config: dict | None = None, gzip: bool = False,
                       weights_dtype: torch.dtype = torch.float32) -> None:
    """Write `model` as a .nemo that NeMo (and chorus) can restore.

    `weights_dtype=torch.float16` stores the floating weights at half the size; both loaders
    copy them into a float32 model (load_state_dict casts), so the model still runs in fp32.
    """
    cfg = nemo_config(model.spec)
    vocab = [tokenizer.piece(i) for i in range(tokenizer.vocab_size)]
    for section in ("joint", "aux_ctc"):
        if section in cfg:
            target = cfg[section]["decoder"] if section == "aux_ctc" else cfg[section]
            target["vocabulary"] = vocab
    if spec_ctc_only := (model.spec.ctc and not model.spec.rnnt):
        cfg["decoder"]["vocabulary"] = vocab
    cfg.update(extra_config or {})
    state = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    if spec_ctc_only:
        state = {k.removeprefix("ctc_"): v for k, v in state.items()}
    artifacts = {
        "tokenizer.model_path": tokenizer.model_proto,
        "tokenizer.vocab_path": "\n".join(vocab).encode("utf-8") + b"\n",
        "tokenizer.spe_tokenizer_vocab": "".join(f"{p}\t0\n" for p in vocab).encode("utf-8"),
    }
    write_nemo(path, cfg, state, artifacts, gzip=gzip)
