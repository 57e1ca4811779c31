"""Small models and checkpoints built by the tests themselves (nothing is downloaded)."""
from __future__ import annotations

import io

import sentencepiece as spm
import torch

from chorus.asr.conformer.asr_model import FastConformerModel, ModelSpec, RNNTConfig
from chorus.asr.conformer.model import EncoderConfig
from chorus.asr.tokenizer import SentencePieceTokenizer
from chorus.stream.features import MelConfig

MULTI_LOOKAHEAD = ((70, 13), (70, 6), (70, 1), (70, 0))
TEXT = [
    "and so my fellow americans ask not what your country can do for you",
    "ask what you can do for your country",
    "the quick brown fox jumps over the lazy dog",
    "zero one two three four five six seven eight nine",
    "hello world this is a streaming speech test",
]


def train_tokenizer(vocab_size: int = 32) -> SentencePieceTokenizer:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 3), model_writer=out, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=-1,
                                   minloglevel=2)
    return SentencePieceTokenizer(out.getvalue())


def tiny_spec(*, contexts=MULTI_LOOKAHEAD, style="chunked_limited", vocab_size=32, rnnt=True, ctc=True,
              d_model=64, n_layers=2, norm="layer_norm", untie_biases=True, subsampling="dw_striding") -> ModelSpec:
    enc = EncoderConfig(feat_in=80, n_layers=n_layers, d_model=d_model, n_heads=4, subsampling=subsampling,
                        subsampling_conv_channels=32, conv_kernel_size=9, att_context_size=tuple(contexts),
                        att_context_style=style, conv_norm_type=norm, untie_biases=untie_biases)
    return ModelSpec(mel=MelConfig(), encoder=enc, vocab_size=vocab_size,
                     rnnt=RNNTConfig(pred_hidden=32, joint_hidden=32) if rnnt else None, ctc=ctc)


def tiny_model(seed: int = 0, **spec_kw) -> FastConformerModel:
    """A random model whose every weight matters and whose greedy output mixes blanks and tokens."""
    torch.manual_seed(seed)
    model = FastConformerModel(tiny_spec(**spec_kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
        _calibrate_blank(model)
    return model


def _calibrate_blank(model: FastConformerModel) -> None:
    """Shift the blank logits so that about half the frames of a random input are blank."""
    blank = model.spec.vocab_size
    mel = random_mel(400, seed=999)[None]
    encoded, _ = model.encoder(mel, torch.tensor([400]), model.spec.encoder.att_context_size[0])
    encoded = encoded[0]
    if model.ctc_decoder is not None:
        logits = model.ctc_decoder(encoded[None])[0]
        margin = logits[:, :blank].max(-1).values - logits[:, blank]
        model.ctc_decoder.decoder_layers[0].bias[blank] += _between(margin, 0.5)
    if model.joint is not None:
        sos = torch.full((1,), blank)
        g, _ = model.decoder.step(sos, model.decoder.initial_state(1))
        logits = model.joint(model.joint.enc(encoded), model.joint.pred(g))
        margin = logits[:, :blank].max(-1).values - logits[:, blank]
        model.joint.joint_net[-1].bias[blank] += _between(margin, 0.6)


def _between(values: torch.Tensor, q: float) -> torch.Tensor:
    """A threshold halfway between two neighbouring values near quantile q, so no frame sits
    exactly on the blank/token tie (where rounding could flip a greedy decision)."""
    v = values.flatten().sort().values
    k = min(max(int(q * (len(v) - 1)), 0), len(v) - 2)
    return (v[k] + v[k + 1]) / 2


def random_mel(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(80, frames, generator=g)


# -- the FastConformer family through the contract (engine, streams), for the tests ---------------

def conformer_engine(model, tokenizer=None, *, slots: int = 2, search=None):
    """A ConformerEngine over a FastConformerModel (or a LoadedModel) with `slots` slots."""
    from chorus.asr.conformer.checkpoint import LoadedModel
    from chorus.asr.conformer.family import ConformerModel

    loaded = model if isinstance(model, LoadedModel) else LoadedModel(model, tokenizer or train_tokenizer(), {}, "")
    return ConformerModel(loaded, search).make_engine(slots=slots)


def conformer_stream(engine, setting, decoder: str = "rnnt", rate: int = 16000, search=None):
    """One stream with an explicit setting and search (the server picks them from a request)."""
    from chorus.asr.conformer.family import ConformerStream

    return ConformerStream(engine, setting, decoder, rate, search)


def stream_samples(engine, samples, rate, setting, decoder="rnnt", search=None, piece_seconds=0.02):
    """One recording through the live path, stepped as soon as a chunk is ready; the closed stream."""
    from chorus.asr.transcribe import stream_alone

    return stream_alone(conformer_stream(engine, setting, decoder, rate, search), samples, piece_seconds)
