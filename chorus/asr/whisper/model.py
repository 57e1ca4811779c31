"""OpenAI Whisper: log-mel front end, audio encoder and text decoder, as openai/whisper computes them.

Module and parameter names are openai/whisper's (`encoder.blocks.0.attn.query.weight`, ...), so an
OpenAI `.pt` state dict loads with strict key checking; the other formats are mapped onto these
names by loader.py.  Unlike openai/whisper the K/V caches are explicit tensors passed in and
returned (no forward hooks), so that a slot pool can hold them:

* cross-attention K/V: `TextDecoder.cross_kv(audio_features)`, one `(k, v)` per layer, `[B, T_audio, D]`;
* self-attention K/V: one `(k, v)` per layer, `[B, T_past, D]`, grown by each `TextDecoder.forward`;
* encoder K/V (block-causal streaming): one `(k, v)` per layer, grown block by block.

The encoder takes an optional attention mask: None is Whisper's full attention, and
`block_causal_mask` is CarelessWhisper's block-causal mask (blocks of `gran` encoder frames, the
first `extra_gran_blocks + 1` blocks merged).

Shapes are batch-first: mel `[B, n_mels, T]`, hidden `[B, T, D]`, attention `[B, H, T, D/H]`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE      # 480000 samples in 30 s
N_FRAMES = N_SAMPLES // HOP_LENGTH          # 3000 mel frames
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH   # 100 (10 ms mel frames)
ENCODER_FRAME_SECONDS = 2 * HOP_LENGTH / SAMPLE_RATE  # 0.02 (the stem has stride 2)

KVCache = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def is_multilingual(self) -> bool:
        return self.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.n_vocab - 51765 - int(self.is_multilingual)


def _dims(n_mels, state, heads, enc_layers, dec_layers, n_vocab) -> ModelDimensions:
    return ModelDimensions(n_mels, 1500, state, heads, enc_layers, n_vocab, 448, state, heads, dec_layers)


# The released checkpoints (openai/whisper's `_MODELS`), for reference and tests.
SIZES: dict[str, ModelDimensions] = {
    "tiny.en": _dims(80, 384, 6, 4, 4, 51864), "tiny": _dims(80, 384, 6, 4, 4, 51865),
    "base.en": _dims(80, 512, 8, 6, 6, 51864), "base": _dims(80, 512, 8, 6, 6, 51865),
    "small.en": _dims(80, 768, 12, 12, 12, 51864), "small": _dims(80, 768, 12, 12, 12, 51865),
    "medium.en": _dims(80, 1024, 16, 24, 24, 51864), "medium": _dims(80, 1024, 16, 24, 24, 51865),
    "large-v1": _dims(80, 1280, 20, 32, 32, 51865), "large-v2": _dims(80, 1280, 20, 32, 32, 51865),
    "large-v3": _dims(128, 1280, 20, 32, 32, 51866), "large-v3-turbo": _dims(128, 1280, 20, 32, 4, 51866),
}


# -- front end -----------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _mel_filters_np(n_mels: int) -> np.ndarray:
    import librosa  # the Slaney filterbank whisper's assets/mel_filters.npz was saved from

    if n_mels not in (80, 128):
        raise ValueError(f"n_mels={n_mels}: Whisper uses 80 or 128 mel bins")
    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels).astype(np.float32)


def mel_filters(n_mels: int, device: torch.device | str = "cpu") -> Tensor:
    """`[n_mels, 201]`, exactly whisper's `mel_filters.npz` (librosa.filters.mel, sr 16000, n_fft 400)."""
    return torch.from_numpy(_mel_filters_np(n_mels)).to(device)


def pad_or_trim(array, length: int = N_SAMPLES, *, axis: int = -1):
    """Zero-pad or cut to `length` along `axis` (30 s of samples by default), as whisper does."""
    if torch.is_tensor(array):
        if array.shape[axis] > length:
            array = array.narrow(axis, 0, length)
        if array.shape[axis] < length:
            pad = [0, 0] * array.ndim
            pad[2 * (array.ndim - 1 - (axis % array.ndim)) + 1] = length - array.shape[axis]
            array = F.pad(array, pad)
        return array
    array = np.asarray(array)
    if array.shape[axis] > length:
        array = array.take(indices=range(length), axis=axis)
    if array.shape[axis] < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - array.shape[axis])
        array = np.pad(array, widths)
    return array


def log_mel_spectrogram(audio, n_mels: int = 80, padding: int = 0) -> Tensor:
    """16 kHz float audio `[..., N]` to whisper's log-mel `[..., n_mels, N // 160]`: |STFT|^2 (hann 400,
    hop 160, centred, reflect padding, last frame dropped), mel, log10 clamped at 1e-10, floored at
    the clip's maximum - 8, then (x + 4) / 4."""
    audio = torch.as_tensor(audio, dtype=torch.float32) if not torch.is_tensor(audio) else audio
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel_spec = mel_filters(n_mels, audio.device) @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# -- layers --------------------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> Tensor:
    """The encoder's fixed positional embedding (whisper's `sinusoids`)."""
    assert channels % 2 == 0
    log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2, device="cpu"))
    scaled_time = torch.arange(length, device="cpu")[:, np.newaxis] * inv_timescales[np.newaxis, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def block_causal_mask(n_ctx: int, gran: int, extra_gran_blocks: int = 0,
                      device: torch.device | str = "cpu") -> Tensor:
    """CarelessWhisper's encoder mask as booleans (True = may attend): frame i sees every frame of
    its own block and the blocks before it; blocks are `gran` frames, the first one
    `(extra_gran_blocks + 1) * gran`."""
    first = gran * (extra_gran_blocks + 1)
    i = torch.arange(n_ctx, device=device)
    end = torch.where(i < first, torch.full_like(i, first), (i // gran + 1) * gran)
    return i[None, :] < end[:, None]


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.key(x), self.value(x)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """Scaled dot-product attention of `[B, Tq, D]` queries over `[B, Tk, D]` keys and values;
        `mask` is boolean (True = may attend), broadcast to `[B, H, Tq, Tk]`."""
        b, tq, d = q.shape
        h = self.n_head
        q = q.view(b, tq, h, -1).transpose(1, 2)
        k = k.view(b, k.shape[1], h, -1).transpose(1, 2)
        v = v.view(b, v.shape[1], h, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.out(a.transpose(1, 2).flatten(start_dim=2))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = LayerNorm(n_state) if cross_attention else None
        n_mlp = n_state * 4
        self.mlp = nn.Sequential(nn.Linear(n_state, n_mlp), nn.GELU(), nn.Linear(n_mlp, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: Tensor, *, past: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None,
                causal: bool = False, cross: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One block over `x`; `past` is this layer's cached self-attention K/V (prepended); returns
        the output and the self-attention K/V including `x`'s."""
        h = self.attn_ln(x)
        k, v = self.attn.kv(h)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        x = x + self.attn.attend(self.attn.query(h), k, v, mask, causal)
        if self.cross_attn is not None:
            assert cross is not None, "a decoder block needs the cross-attention K/V"
            x = x + self.cross_attn.attend(self.cross_attn.query(self.cross_attn_ln(x)), *cross)
        x = x + self.mlp(self.mlp_ln(x))
        return x, (k, v)


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = LayerNorm(n_state)

    def stem(self, mel: Tensor) -> Tensor:
        """`[B, n_mels, T]` mel to `[B, ceil(T / 2), D]` (two GELU convolutions, the second stride 2)."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x))
        return x.permute(0, 2, 1)

    def forward(self, mel: Tensor, mask: Tensor | None = None) -> Tensor:
        """The offline encoder.  With `mask=None` and 3000 mel frames it is whisper's encoder; a
        shorter mel is encoded with the first positions (CarelessWhisper's training path)."""
        x = self.stem(mel)
        n = x.shape[1]
        if n > self.positional_embedding.shape[0]:
            raise ValueError(f"{mel.shape[-1]} mel frames: more than the encoder's {2 * self.positional_embedding.shape[0]}")
        x = (x + self.positional_embedding[:n]).to(x.dtype)
        if mask is not None:
            mask = mask[:n, :n]
        for block in self.blocks:
            x, _ = block(x, mask=mask)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head, cross_attention=True)
                                     for _ in range(n_layer)])
        self.ln = LayerNorm(n_state)

    def cross_kv(self, audio_features: Tensor) -> KVCache:
        """Each layer's cross-attention K/V of the encoder output, computed once per utterance."""
        return [block.cross_attn.kv(audio_features) for block in self.blocks]

    def forward(self, tokens: Tensor, cross: KVCache, past: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """`[B, T]` tokens after `past` (per layer `[B, T_past, D]` K/V, or None) to float logits
        `[B, T, n_vocab]` and the self-attention K/V including these tokens."""
        offset = past[0][0].shape[1] if past else 0
        n = tokens.shape[-1]
        x = self.token_embedding(tokens) + self.positional_embedding[offset:offset + n]
        x = x.to(cross[0][0].dtype)
        mask, causal = None, False
        if n > 1 and offset == 0:
            causal = True
        elif n > 1:  # several new tokens after a cache: each sees the past and the new ones before it
            mask = torch.ones(n, offset + n, dtype=torch.bool, device=x.device).tril(offset)
        new: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, past=past[i] if past else None, mask=mask, causal=causal, cross=cross[i])
            new.append(kv)
        x = self.ln(x)
        logits = (x @ self.token_embedding.weight.to(x.dtype).t()).float()
        return logits, new


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                    dims.n_audio_layer)
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                   dims.n_text_layer)
        # openai/whisper's default: every head of the last half of the decoder layers
        self.alignment_heads: list[tuple[int, int]] = [
            (layer, head) for layer in range(dims.n_text_layer // 2, dims.n_text_layer)
            for head in range(dims.n_text_head)]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def is_multilingual(self) -> bool:
        return self.dims.is_multilingual

    @property
    def num_languages(self) -> int:
        return self.dims.num_languages

    def embed_audio(self, mel: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.encoder(mel, mask)

    def logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        return self.decoder(tokens, self.decoder.cross_kv(audio_features))[0]

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        """The offline forward: mel `[B, n_mels, 3000]` and tokens `[B, T]` to logits `[B, T, n_vocab]`."""
        return self.logits(tokens, self.encoder(mel))
