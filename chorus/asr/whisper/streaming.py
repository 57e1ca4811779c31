"""CarelessWhisper's causal encoder, streamed block by block.

The offline forward is `AudioEncoder.forward(mel, block_causal_mask(n, gran, extra_gran_blocks))`:
blocks of `gran` encoder frames (20 ms each), the first `extra_gran_blocks + 1` blocks merged; a
frame attends to its own block and every block before it.  Streamed, each block is encoded once:

* the conv stem runs incrementally: encoder frame t reads conv1 outputs 2t-1..2t+1, which read
  mel frames 2t-2..2t+2, so a block of frames [t0, t1) needs mel frames 2t0-2..2t1 (one 10 ms frame
  past its own 2(t1 - t0)).  The state keeps the last two mel frames before the block (`mel_tail`);
  at the start conv1 output -1 is conv2's zero padding, and at the end of the stream mel frames
  and conv1 outputs past the mel are the convolutions' zero padding, as in the offline forward;
* every layer attends over its cached K/V (the blocks before) and the block's own frames, with no
  mask inside the block; the block's K/V are appended.

`EncoderState` holds one stream's (or a batch of streams at the same position's) state as tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .loader import CausalConfig
from .model import AudioEncoder, KVCache


@dataclass
class EncoderState:
    mel_tail: Tensor                    # [B, n_mels, 2]: mel frames 2t0-2, 2t0-1 (zeros before the start)
    frames_done: int = 0                # encoder frames encoded so far (t0)
    kv: KVCache = field(default_factory=list)  # per layer (k, v) [B, frames_done, D]

    @classmethod
    def fresh(cls, encoder: AudioEncoder, batch: int = 1) -> "EncoderState":
        p = encoder.conv1.weight
        return cls(torch.zeros(batch, p.shape[1], 2, dtype=p.dtype, device=p.device))


@torch.no_grad()
def encode_block(encoder: AudioEncoder, state: EncoderState, mel: Tensor, n_frames: int,
                 mel_valid: int | None = None) -> Tensor:
    """Encode the next `n_frames` encoder frames.  `mel` holds mel frames 2t0 .. 2(t0 + n_frames)
    (`2 n_frames + 1` frames; t0 = state.frames_done); at the end of a stream only the first
    `mel_valid` of them are real and the rest are the convolutions' zero padding.  Returns
    `[B, n_frames, D]` and advances `state` in place."""
    t0, n = state.frames_done, n_frames
    need = 2 * n + 1
    if mel.shape[-1] != need:
        raise ValueError(f"{n} encoder frames need {need} mel frames, got {mel.shape[-1]}")
    if t0 + n > encoder.positional_embedding.shape[0]:
        raise ValueError(f"the encoder holds {encoder.positional_embedding.shape[0]} frames (30 s)")
    valid = need if mel_valid is None else mel_valid
    if valid < need:
        mel = mel.clone()
        mel[..., valid:] = 0
    x = torch.cat([state.mel_tail, mel], dim=-1)                # mel 2t0-2 .. 2t1
    h = F.gelu(F.conv1d(x, encoder.conv1.weight, encoder.conv1.bias))  # conv1 outputs 2t0-1 .. 2t1-1
    if t0 == 0:
        h[..., 0] = 0                                           # conv2's left padding
    if valid < need:
        h[..., valid + 1:] = 0                                  # conv1 outputs past the mel: conv2's right padding
    h = F.gelu(F.conv1d(h, encoder.conv2.weight, encoder.conv2.bias, stride=2))  # frames t0 .. t1-1
    x = (h.permute(0, 2, 1) + encoder.positional_embedding[t0:t0 + n]).to(h.dtype)
    new: KVCache = []
    for i, block in enumerate(encoder.blocks):
        x, kv = block(x, past=state.kv[i] if state.kv else None)
        new.append(kv)
    state.kv = new
    state.mel_tail = x_tail(mel, n)
    state.frames_done = t0 + n
    return encoder.ln_post(x)


def x_tail(mel: Tensor, n: int) -> Tensor:
    """Mel frames 2t1-2, 2t1-1 of a block's input (the next block's left context)."""
    return mel[..., 2 * n - 2:2 * n].clone()


class CausalEncoderStream:
    """One stream's mel in, encoded blocks out: the first block is `(extra_gran_blocks + 1) * gran`
    frames, the next ones `gran`; `finish` encodes what is left (a shorter last block)."""

    def __init__(self, encoder: AudioEncoder, causal: CausalConfig):
        self.encoder, self.causal = encoder, causal
        self.state = EncoderState.fresh(encoder)
        self.pending = self.state.mel_tail.new_zeros(1, self.state.mel_tail.shape[1], 0)  # mel from 2t0 on
        self.finished = False

    def next_block(self) -> int:
        return self.causal.first_block if self.state.frames_done == 0 else self.causal.gran

    def accept(self, mel: Tensor) -> list[Tensor]:
        """Mel frames `[n_mels, k]` (or `[1, n_mels, k]`); returns the blocks now encoded, `[1, n, D]` each."""
        if self.finished:
            raise RuntimeError("mel after finish")
        mel = mel if mel.dim() == 3 else mel[None]
        self.pending = torch.cat([self.pending, mel.to(self.pending.dtype)], dim=-1)
        out = []
        while self.pending.shape[-1] >= 2 * self.next_block() + 1:
            n = self.next_block()
            out.append(encode_block(self.encoder, self.state, self.pending[..., :2 * n + 1], n))
            self.pending = self.pending[..., 2 * n:]
        return out

    def finish(self) -> list[Tensor]:
        """Encode the frames the remaining mel gives (ceil(k / 2), as the offline stem does)."""
        self.finished = True
        k = self.pending.shape[-1]
        n = (k + 1) // 2
        if n == 0:
            return []
        mel = F.pad(self.pending, (0, 2 * n + 1 - k))
        return [encode_block(self.encoder, self.state, mel, n, mel_valid=k)]
