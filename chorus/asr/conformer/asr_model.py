"""A whole NeMo FastConformer ASR model: front end buffers, encoder, RNNT and/or CTC heads.

Attribute names mirror NeMo's model classes (`preprocessor.featurizer`, `encoder`, `decoder`,
`joint`, `ctc_decoder`) so a NeMo state dict loads with `strict=True`: every weight is used
and none is missing.  Hybrid RNNT+CTC, RNNT-only and CTC-only BPE checkpoints are accepted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...stream.features import FeatureConfigError, MelConfig, MelFrontend
from .decoding import ctc_offline, rnnt_offline
from .heads import CTCHead, RNNTJoint, RNNTPredictor
from .model import ConformerEncoder, EncoderConfig, ModelConfigError

HYBRID = "nemo.collections.asr.models.hybrid_rnnt_ctc_bpe_models.EncDecHybridRNNTCTCBPEModel"
RNNT = "nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel"
CTC = "nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE"


@dataclass(frozen=True)
class RNNTConfig:
    pred_hidden: int = 640
    pred_rnn_layers: int = 1
    pred_dropout: float = 0.2
    joint_hidden: int = 640
    activation: str = "relu"
    joint_dropout: float = 0.2
    max_symbols: int = 10


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build the network, read from (or written to) a NeMo config."""

    mel: MelConfig
    encoder: EncoderConfig
    vocab_size: int
    rnnt: RNNTConfig | None
    ctc: bool

    @classmethod
    def from_nemo(cls, cfg: dict) -> "ModelSpec":
        target = str(cfg.get("target", ""))
        kind = target.rsplit(".", 1)[-1]
        if kind not in ("EncDecHybridRNNTCTCBPEModel", "EncDecRNNTBPEModel", "EncDecCTCModelBPE"):
            raise ModelConfigError(
                f"model class {target or '(none)'} is not a BPE FastConformer RNNT/CTC/hybrid model")
        for key in ("preprocessor", "encoder"):
            if key not in cfg:
                raise ModelConfigError(f"model_config.yaml has no '{key}' section")
        try:
            mel = MelConfig.from_nemo(cfg["preprocessor"])
        except FeatureConfigError as exc:
            raise ModelConfigError(str(exc)) from exc
        encoder = EncoderConfig.from_nemo(cfg["encoder"])
        if encoder.feat_in != mel.n_mels:
            raise ModelConfigError(f"encoder feat_in {encoder.feat_in} != preprocessor features {mel.n_mels}")
        rnnt = None
        if kind != "EncDecCTCModelBPE":
            dec, joint = cfg.get("decoder", {}), cfg.get("joint", {})
            prednet, jointnet = dec.get("prednet", {}), joint.get("jointnet", {})
            greedy = (cfg.get("decoding") or {}).get("greedy") or {}
            rnnt = RNNTConfig(
                pred_hidden=int(prednet["pred_hidden"]), pred_rnn_layers=int(prednet.get("pred_rnn_layers", 1)),
                pred_dropout=float(prednet.get("dropout", 0.0) or 0.0),
                joint_hidden=int(jointnet["joint_hidden"]), activation=str(jointnet.get("activation", "relu")),
                joint_dropout=float(jointnet.get("dropout", 0.0) or 0.0),
                max_symbols=int(greedy.get("max_symbols", 10) or 10),
            )
            if not dec.get("blank_as_pad", True):
                raise ModelConfigError("RNNT decoders with blank_as_pad=false are not supported")
            if int(prednet.get("rnn_hidden_size", -1) or -1) > 0:
                raise ModelConfigError("RNNT prediction networks with a projected LSTM are not supported")
            vocab = int(dec.get("vocab_size") or joint["num_classes"])
        else:
            vocab = int(cfg["decoder"]["num_classes"])
        ctc = kind != "EncDecRNNTBPEModel"
        if kind == "EncDecHybridRNNTCTCBPEModel":
            ctc_vocab = int(cfg["aux_ctc"]["decoder"]["num_classes"])
            if ctc_vocab != vocab:
                raise ModelConfigError(f"CTC vocabulary {ctc_vocab} != RNNT vocabulary {vocab}")
        return cls(mel=mel, encoder=encoder, vocab_size=vocab, rnnt=rnnt, ctc=ctc)

    @property
    def target(self) -> str:
        if self.rnnt and self.ctc:
            return HYBRID
        return RNNT if self.rnnt else CTC


class _Featurizer(nn.Module):
    def __init__(self, mel: MelConfig):
        super().__init__()
        self.register_buffer("window", mel.default_window())
        self.register_buffer("fb", mel.default_filterbank().unsqueeze(0))


class _Preprocessor(nn.Module):
    def __init__(self, mel: MelConfig):
        super().__init__()
        self.featurizer = _Featurizer(mel)


class FastConformerModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.preprocessor = _Preprocessor(spec.mel)
        self.encoder = ConformerEncoder(spec.encoder)
        self.decoder = self.joint = self.ctc_decoder = None
        if spec.rnnt:
            r = spec.rnnt
            self.decoder = RNNTPredictor(spec.vocab_size, r.pred_hidden, r.pred_rnn_layers, r.pred_dropout)
            self.joint = RNNTJoint(self.encoder.output_dim, r.pred_hidden, r.joint_hidden, spec.vocab_size,
                                   r.activation, r.joint_dropout)
        if spec.ctc:
            self.ctc_decoder = CTCHead(self.encoder.output_dim, spec.vocab_size)
        self._frontend: MelFrontend | None = None

    @property
    def decoders(self) -> tuple[str, ...]:
        return tuple(name for name, head in (("rnnt", self.joint), ("ctc", self.ctc_decoder)) if head is not None)

    @property
    def default_decoder(self) -> str:
        return self.decoders[0]

    @property
    def device(self) -> torch.device:
        return self.preprocessor.featurizer.fb.device

    @property
    def blank(self) -> int:
        return self.spec.vocab_size

    @property
    def frontend(self) -> MelFrontend:
        """The mel front end with the checkpoint's own window and filterbank."""
        if self._frontend is None:
            f = self.preprocessor.featurizer
            self._frontend = MelFrontend(self.spec.mel, f.window.cpu(), f.fb.cpu())
        return self._frontend

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._frontend = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def transcribe_offline(self, mel: torch.Tensor, lengths: torch.Tensor, context: tuple[int, int],
                           decoder: str) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """Whole-utterance encoder outputs and greedy tokens with the streaming mask of `context`."""
        encoded, enc_len = self.encoder(mel, lengths, context)
        if decoder == "ctc":
            return encoded, enc_len, ctc_offline(self.ctc_decoder, encoded, enc_len)
        return encoded, enc_len, rnnt_offline(self.joint, self.decoder, encoded, enc_len,
                                              self.spec.rnnt.max_symbols)
