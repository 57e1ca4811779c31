"""Offline greedy decoding, as openai/whisper's `decode` does it with temperature 0 and
`without_timestamps=True`: the start-of-transcript sequence and <|notimestamps|>, then argmax
tokens with whisper's default logit filters (`SuppressBlank` at the first sampled token,
`SuppressTokens` "-1": the non-speech tokens and sot/sot_prev/sot_lm/transcribe/translate/nospeech),
at most `n_text_ctx // 2` tokens, stopping at <|endoftext|>.  The K/V caches are explicit tensors
(the encoder output's cross-attention K/V computed once; self-attention K/V grown per token).

Language detection is not done: a multilingual model decodes in the tokenizer's language
(English unless told otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .model import N_FRAMES, N_SAMPLES, Whisper, log_mel_spectrogram, pad_or_trim
from .tokenizer import Tokenizer


@dataclass
class GreedyResult:
    tokens: list[int]          # sampled text tokens, up to (not including) <|endoftext|>
    text: str
    sum_logprob: float
    avg_logprob: float


def suppress_tokens(tokenizer: Tokenizer) -> list[int]:
    """whisper's `_get_suppress_tokens` for suppress_tokens="-1"."""
    ids = set(tokenizer.non_speech_tokens)
    ids.update([tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev,
                tokenizer.sot_lm, tokenizer.no_speech])
    return sorted(ids)


@torch.no_grad()
def greedy_decode(model: Whisper, tokenizer: Tokenizer, audio_features: Tensor,
                  sample_len: int | None = None) -> list[GreedyResult]:
    """Greedy decoding of a batch of encoder outputs `[B, T, D]` (one utterance each)."""
    n_ctx = model.dims.n_text_ctx
    sample_len = sample_len or n_ctx // 2
    initial = list(tokenizer.sot_sequence_including_notimestamps)
    sample_begin = len(initial)
    b = audio_features.shape[0]
    device = audio_features.device
    blank = tokenizer.encode(" ") + [tokenizer.eot]
    suppress = suppress_tokens(tokenizer)
    eot = tokenizer.eot

    tokens = torch.tensor([initial] * b, device=device)
    sum_logprobs = torch.zeros(b, device=device)
    cross = model.decoder.cross_kv(audio_features)
    past = None
    for _ in range(sample_len):
        step_in = tokens if past is None else tokens[:, -1:]
        logits, past = model.decoder(step_in, cross, past)
        logits = logits[:, -1]
        if tokens.shape[1] == sample_begin:
            logits[:, blank] = -np.inf
        logits[:, suppress] = -np.inf
        next_tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        current = logprobs[torch.arange(b, device=device), next_tokens]
        sum_logprobs += current * (tokens[:, -1] != eot)
        next_tokens[tokens[:, -1] == eot] = eot
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
        if (tokens[:, -1] == eot).all() or tokens.shape[-1] > n_ctx:
            break
    results = []
    for row, lp in zip(tokens.tolist(), sum_logprobs.tolist()):
        sampled = row[sample_begin:]
        sampled = sampled[:sampled.index(eot)] if eot in sampled else sampled
        results.append(GreedyResult(sampled, tokenizer.decode(sampled).strip(), lp, lp / (len(sampled) + 1)))
    return results


def mel_30s(audio: np.ndarray | Tensor, n_mels: int) -> Tensor:
    """The README way of openai/whisper: audio padded or cut to 30 s, then its log-mel `[n_mels, 3000]`."""
    audio = torch.as_tensor(np.asarray(audio, dtype=np.float32)) if not torch.is_tensor(audio) else audio
    mel = log_mel_spectrogram(pad_or_trim(audio.float(), N_SAMPLES), n_mels)
    assert mel.shape[-1] == N_FRAMES
    return mel


@torch.no_grad()
def transcribe_30s(model: Whisper, tokenizer: Tokenizer, audio: np.ndarray | Tensor) -> GreedyResult:
    """One utterance of at most 30 s of 16 kHz audio, decoded greedily without timestamps."""
    p = next(model.parameters())
    mel = mel_30s(audio, model.dims.n_mels).to(p.device, p.dtype)
    features = model.encoder(mel[None])
    return greedy_decode(model, tokenizer, features)[0]
