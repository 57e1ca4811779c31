"""Read and write a FunASR streaming Paraformer model directory, exactly as FunASR lays it out.

A directory holds config.yaml (FunASR's training config), model.pt (the state dict), tokens.json
(the token list), am.mvn (CMVN) and optionally configuration.json, whose `file_path_metas`
may rename those files.  Nothing is executed: YAML is read with safe_load, JSON with json, the
weights with torch.load(weights_only=True), and every weight must be used and none missing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .frontend import FrontendConfig, ParaformerFrontend, load_cmvn, write_cmvn
from .model import ModelConfigError, ParaformerConfig, ParaformerStreamingModel


@dataclass
class ParaformerBundle:
    """What a model directory gives: the model (eval mode), its front end and token list."""

    model: ParaformerStreamingModel
    frontend: ParaformerFrontend
    tokens: list[str]
    config: dict  # config.yaml as read

    def ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.tokens[i] for i in ids]


def _need(section: dict, key: str, value, what: str) -> None:
    got = section.get(key, value)
    if got != value:
        raise ModelConfigError(f"{what}: {key}={got!r} is not supported (streaming Paraformer needs {value!r})")


def config_from_funasr(cfg: dict, vocab_size: int) -> tuple[ParaformerConfig, FrontendConfig]:
    """Map FunASR's config.yaml onto ours, refusing what FunASR would not stream this way."""
    if not isinstance(cfg, dict):
        raise ModelConfigError("config.yaml is not a mapping")
    model = cfg.get("model")
    if model != "ParaformerStreaming":
        raise ModelConfigError(f"model {model!r} is not a streaming Paraformer (need model: ParaformerStreaming)")
    for key, want in (("encoder", "SANMEncoderChunkOpt"), ("decoder", "ParaformerSANMDecoder"),
                      ("predictor", "CifPredictorV2"), ("frontend", "WavFrontendOnline")):
        if cfg.get(key) != want:
            raise ModelConfigError(f"{key} {cfg.get(key)!r} is not supported (need {key}: {want})")
    if cfg.get("normalize") not in (None, "null"):
        raise ModelConfigError(f"normalize {cfg.get('normalize')!r} is not supported (FunASR's streaming models have none)")
    enc = dict(cfg.get("encoder_conf") or {})
    dec = dict(cfg.get("decoder_conf") or {})
    pre = dict(cfg.get("predictor_conf") or {})
    fe = dict(cfg.get("frontend_conf") or {})
    mc = dict(cfg.get("model_conf") or {})
    _need(enc, "input_layer", "pe_online", "encoder_conf")
    _need(enc, "selfattention_layer_type", "sanm", "encoder_conf")
    _need(enc, "normalize_before", True, "encoder_conf")
    _need(enc, "concat_after", False, "encoder_conf")
    _need(enc, "positionwise_layer_type", "linear", "encoder_conf")
    if enc.get("interctc_layer_idx"):
        raise ModelConfigError("encoder_conf: interctc_layer_idx is not supported")
    _need(dec, "input_layer", "embed", "decoder_conf")
    _need(dec, "normalize_before", True, "decoder_conf")
    _need(dec, "concat_after", False, "decoder_conf")
    _need(dec, "use_output_layer", True, "decoder_conf")
    _need(dec, "wo_input_layer", False, "decoder_conf")
    if dec.get("lora_list"):
        raise ModelConfigError("decoder_conf: lora_list is not supported")
    blocks = int(dec.get("num_blocks", 6))
    att = int(dec.get("att_layer_num", 6))
    if blocks != att:
        # FunASR's forward_chunk skips a single extra non-attention layer (`> 1`), and the extra
        # layers' FSMN has right padding that its streaming cache treats inconsistently.
        raise ModelConfigError(f"decoder_conf: num_blocks={blocks} != att_layer_num={att} is not supported")
    kernel = int(dec.get("kernel_size", 21))
    shfit = dec.get("sanm_shfit", 0)
    shfit = (kernel - 1) // 2 if shfit is None else int(shfit)
    left = (kernel - 1) // 2 + (shfit if shfit > 0 else 0)
    if left != kernel - 1:
        raise ModelConfigError(
            f"decoder_conf: kernel_size={kernel}, sanm_shfit={shfit} gives the decoder FSMN look-ahead; "
            f"FunASR streams only causal decoder FSMNs (sanm_shfit >= {kernel - 1 - (kernel - 1) // 2})")
    enc_kernel = int(enc.get("kernel_size", 11))
    enc_shfit = int(enc.get("sanm_shfit", 0) or 0)
    if (enc_kernel - 1) // 2 + max(enc_shfit, 0) > enc_kernel - 1:
        raise ModelConfigError(f"encoder_conf: sanm_shfit={enc_shfit} exceeds the kernel")
    fcfg = FrontendConfig(
        fs=int(fe.get("fs", 16000)), window=str(fe.get("window", "hamming")),
        n_mels=int(fe.get("n_mels", 80)), frame_length=int(fe.get("frame_length", 25)),
        frame_shift=int(fe.get("frame_shift", 10)), lfr_m=int(fe.get("lfr_m", 1)),
        lfr_n=int(fe.get("lfr_n", 1)), dither=float(fe.get("dither", 1.0)))
    if fcfg.fs != 16000 or fcfg.frame_length != 25 or fcfg.frame_shift != 10:
        raise ModelConfigError("frontend_conf: only fs 16000, frame_length 25, frame_shift 10 are supported")
    if fcfg.lfr_n != 6:
        # The chunk loop cuts audio into chunk_size[1] * 960-sample strides, 960 = one LFR frame.
        raise ModelConfigError(f"frontend_conf: lfr_n={fcfg.lfr_n} is not supported (FunASR's chunk loop assumes 6)")
    if not fe.get("snip_edges", True):
        raise ModelConfigError("frontend_conf: snip_edges false is not supported")
    if fcfg.window not in ("hamming", "hanning", "povey", "rectangular", "blackman"):
        raise ModelConfigError(f"frontend_conf: window {fcfg.window!r} is not a kaldi window")
    d = int(enc.get("output_size", 256))
    if int(pre.get("idim", d)) != d:
        raise ModelConfigError(f"predictor_conf: idim {pre.get('idim')} != encoder output_size {d}")
    ctc_weight = float(mc.get("ctc_weight", 0.5))
    pcfg = ParaformerConfig(
        vocab_size=vocab_size, input_size=fcfg.dim, d_model=d,
        enc_heads=int(enc.get("attention_heads", 4)), enc_units=int(enc.get("linear_units", 2048)),
        enc_blocks=int(enc.get("num_blocks", 6)), enc_kernel=enc_kernel, enc_sanm_shfit=enc_shfit,
        dec_heads=int(dec.get("attention_heads", 4)), dec_units=int(dec.get("linear_units", 2048)),
        dec_blocks=blocks, dec_kernel=kernel, dec_sanm_shfit=shfit,
        cif_l_order=int(pre.get("l_order", 1)), cif_r_order=int(pre.get("r_order", 1)),
        cif_threshold=float(pre.get("threshold", 1.0)), cif_smooth_factor=float(pre.get("smooth_factor", 1.0)),
        cif_noise_threshold=float(pre.get("noise_threshold", 0.0)),
        tail_threshold=float(pre.get("tail_threshold", 0.0)),
        sos=int(mc.get("sos", 1) if mc.get("sos", 1) is not None else vocab_size - 1),
        eos=int(mc.get("eos", 2) if mc.get("eos", 2) is not None else vocab_size - 1),
        blank_id=int(mc.get("blank_id", 0)),
        ctc=ctc_weight > 0.0, share_embedding=bool(mc.get("share_embedding", False)))
    if ctc_weight == 1.0:
        raise ModelConfigError("model_conf: ctc_weight 1.0 means FunASR builds no decoder")
    return pcfg, fcfg


def _files(path: Path) -> dict[str, Path]:
    names = {"config": "config.yaml", "init_param": "model.pt", "token_list": "tokens.json", "cmvn_file": "am.mvn"}
    meta_path = path / "configuration.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8")).get("file_path_metas") or {}
        for key in ("config", "init_param"):
            if isinstance(meta.get(key), str):
                names[key] = meta[key]
        if isinstance((meta.get("tokenizer_conf") or {}).get("token_list"), str):
            names["token_list"] = meta["tokenizer_conf"]["token_list"]
        if isinstance((meta.get("frontend_conf") or {}).get("cmvn_file"), str):
            names["cmvn_file"] = meta["frontend_conf"]["cmvn_file"]
    out = {}
    for key, name in names.items():
        p = (path / name).resolve()
        if path.resolve() not in p.parents:
            raise ValueError(f"{meta_path}: {key} {name!r} points outside the model directory")
        if not p.is_file():
            raise FileNotFoundError(f"{path}: the model directory has no {name} ({key})")
        out[key] = p
    return out


def _state_dict(obj) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("model.pt does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_funasr_dir(path: str | Path, device: str | torch.device = "cpu") -> ParaformerBundle:
    """Load a FunASR ParaformerStreaming directory (strict: every weight used, none missing)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    files = _files(path)
    cfg = yaml.safe_load(files["config"].read_text(encoding="utf-8"))
    tokens = json.loads(files["token_list"].read_text(encoding="utf-8"))
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{files['token_list']}: not a JSON list of tokens")
    pcfg, fcfg = config_from_funasr(cfg, len(tokens))
    model = ParaformerStreamingModel(pcfg)
    state = _state_dict(torch.load(files["init_param"], map_location="cpu", weights_only=True))
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unused = sorted(set(state) - set(want))
    if missing or unused:
        raise ValueError(f"{files['init_param']}: weights do not match the config: "
                         f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                         f"unused {unused[:6]}{'...' if len(unused) > 6 else ''}")
    bad = [k for k in want if want[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"{files['init_param']}: shape mismatch for {bad[:6]} "
                         f"(e.g. {bad[0]}: {tuple(state[bad[0]].shape)} vs {tuple(want[bad[0]].shape)})")
    model.load_state_dict(state, strict=True)
    frontend = ParaformerFrontend(fcfg, load_cmvn(files["cmvn_file"]))
    return ParaformerBundle(model.to(device).eval(), frontend, tokens, cfg)


def funasr_config(pcfg: ParaformerConfig, fcfg: FrontendConfig) -> dict:
    """config.yaml as FunASR writes it for a streaming Paraformer (its template's fields)."""
    return {
        "model": "ParaformerStreaming",
        "model_conf": {"ctc_weight": 0.3 if pcfg.ctc else 0.0, "lsm_weight": 0.1,
                       "length_normalized_loss": True, "predictor_weight": 1.0, "predictor_bias": 1,
                       "sampling_ratio": 0.75, "sos": pcfg.sos, "eos": pcfg.eos,
                       "share_embedding": pcfg.share_embedding},
        "encoder": "SANMEncoderChunkOpt",
        "encoder_conf": {"output_size": pcfg.d_model, "attention_heads": pcfg.enc_heads,
                         "linear_units": pcfg.enc_units, "num_blocks": pcfg.enc_blocks, "dropout_rate": 0.1,
                         "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.1,
                         "input_layer": "pe_online", "pos_enc_class": "SinusoidalPositionEncoder",
                         "normalize_before": True, "kernel_size": pcfg.enc_kernel,
                         "sanm_shfit": pcfg.enc_sanm_shfit, "selfattention_layer_type": "sanm",
                         "chunk_size": [12, 15], "stride": [8, 10], "pad_left": [0, 0],
                         "encoder_att_look_back_factor": [4, 4], "decoder_att_look_back_factor": [1, 1]},
        "decoder": "ParaformerSANMDecoder",
        "decoder_conf": {"attention_heads": pcfg.dec_heads, "linear_units": pcfg.dec_units,
                         "num_blocks": pcfg.dec_blocks, "dropout_rate": 0.1, "positional_dropout_rate": 0.1,
                         "self_attention_dropout_rate": 0.1, "src_attention_dropout_rate": 0.1,
                         "att_layer_num": pcfg.dec_blocks, "kernel_size": pcfg.dec_kernel,
                         "sanm_shfit": pcfg.dec_sanm_shfit},
        "predictor": "CifPredictorV2",
        "predictor_conf": {"idim": pcfg.d_model, "threshold": pcfg.cif_threshold, "l_order": pcfg.cif_l_order,
                           "r_order": pcfg.cif_r_order, "tail_threshold": pcfg.tail_threshold},
        "frontend": "WavFrontendOnline",
        "frontend_conf": {"fs": fcfg.fs, "window": fcfg.window, "n_mels": fcfg.n_mels,
                          "frame_length": fcfg.frame_length, "frame_shift": fcfg.frame_shift,
                          "dither": fcfg.dither, "lfr_m": fcfg.lfr_m, "lfr_n": fcfg.lfr_n},
        "specaug": "SpecAugLFR",
        "specaug_conf": {"apply_time_warp": False, "time_warp_window": 5, "time_warp_mode": "bicubic",
                         "apply_freq_mask": True, "freq_mask_width_range": [0, 30], "lfr_rate": 6,
                         "num_freq_mask": 1, "apply_time_mask": True, "time_mask_width_range": [0, 12],
                         "num_time_mask": 1},
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
        "ctc_conf": {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True, "ignore_nan_grad": True},
        "normalize": None,
    }


def save_funasr_dir(path: str | Path, model: ParaformerStreamingModel, tokens: list[str],
                    cmvn: tuple[torch.Tensor, torch.Tensor], frontend: FrontendConfig | None = None,
                    *, wrap: str | None = None) -> Path:
    """Write a model directory in FunASR's layout (config.yaml, model.pt, tokens.json, am.mvn,
    configuration.json).  wrap="state_dict"/"model" nests the weights as some checkpoints do."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fcfg = frontend or FrontendConfig()
    if len(tokens) != model.cfg.vocab_size:
        raise ValueError(f"{len(tokens)} tokens for a vocabulary of {model.cfg.vocab_size}")
    (path / "config.yaml").write_text(yaml.safe_dump(funasr_config(model.cfg, fcfg), sort_keys=False),
                                      encoding="utf-8")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({wrap: state} if wrap else state, path / "model.pt")
    (path / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False), encoding="utf-8")
    write_cmvn(path / "am.mvn", *cmvn)
    (path / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "auto-speech-recognition",
        "model": {"type": "funasr"}, "pipeline": {"type": "funasr-pipeline"},
        "file_path_metas": {"init_param": "model.pt", "config": "config.yaml",
                            "tokenizer_conf": {"token_list": "tokens.json"},
                            "frontend_conf": {"cmvn_file": "am.mvn"}},
    }, indent=2), encoding="utf-8")
    return path


__all__ = ["ParaformerBundle", "config_from_funasr", "funasr_config", "load_funasr_dir", "save_funasr_dir",
           "ModelConfigError", "ParaformerConfig", "FrontendConfig"]
