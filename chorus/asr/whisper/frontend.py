"""Whisper's log-mel front end, incrementally.

`IncrementalLogMel` emits each 10 ms frame of whisper's `log_mel_spectrogram` as soon as the 400
samples under its (centred) window have arrived: the start is reflect-padded as `torch.stft`
pads it; the end is padded with zeros, as `transcribe_30s` (openai/whisper's README path) pads
every clip with zeros to 30 s before its STFT.  A stream of N samples gives ceil(N / 160) frames
(the frames whose centre lies in the audio).  The frames come out as raw log10 power
(`log10(max(mel, 1e-10))`), before whisper's two clip-level steps.

Whisper floors the log-mel at (the clip's maximum - 8) and scales it, `(max(x, M - 8) + 4) / 4`,
where M is the maximum over the whole 30 s clip.  A stream cannot know the maximum of audio it
has not heard; `RunningMax` keeps the maximum of the frames heard so far (over the whole stream,
never reset) and `normalise` floors with it.  How that departs from offline: a frame is floored
at (max so far - 8) instead of (clip max - 8), so while the loudest frame is still to come the
floor is lower and quiet frames (silence, noise below the later floor) keep more detail than the
offline mel gives them.  Frames more than 8 below the final maximum are the only ones affected,
and only in the blocks encoded before the maximum arrived: in `window` mode every block
re-normalises the whole window with the current maximum, so the last block of a window equals the
offline floor; in `causal` mode each block is floored once, with the maximum at its time.  Its effect
on the transcripts is not measured separately yet (the streamed WERs in the README include it).
"""
from __future__ import annotations

import numpy as np
import torch

from .model import HOP_LENGTH, N_FFT, mel_filters

PAD = N_FFT // 2  # 200 samples each side of a frame's centre


class IncrementalLogMel:
    def __init__(self, n_mels: int = 80):
        self.n_mels = n_mels
        self.filters = mel_filters(n_mels).double()
        self.window = torch.hann_window(N_FFT, dtype=torch.float64)
        self.samples = 0          # real samples received
        self.frames_out = 0
        self._started = False
        self._head: np.ndarray | None = None   # the first samples until the start's reflection can be built
        self._virtual: np.ndarray = np.zeros(0, np.float32)  # reflected start + audio, from `_voff` on
        self._voff = 0
        self.finished = False

    def accept(self, samples: np.ndarray) -> torch.Tensor:
        """Float32 16 kHz samples; returns the new raw log10 frames `[n_mels, k]`."""
        if self.finished:
            raise RuntimeError("audio after finish")
        samples = np.asarray(samples, np.float32)
        self.samples += len(samples)
        self._append(samples)
        return self._emit(limit=None)

    def finish(self) -> torch.Tensor:
        """The frames whose centre lies in the audio, with zeros after its end."""
        self.finished = True
        if not self._started:  # fewer than 201 samples: the zeros after them are reflected too
            head = np.zeros(0, np.float32) if self._head is None else self._head
            self._start(np.concatenate([head, np.zeros(PAD + 1 - len(head), np.float32)]))
        self._virtual = np.concatenate([self._virtual, np.zeros(PAD + N_FFT, np.float32)])
        return self._emit(limit=-(-self.samples // HOP_LENGTH))

    def _append(self, samples: np.ndarray) -> None:
        if not self._started:
            self._head = samples if self._head is None else np.concatenate([self._head, samples])
            if len(self._head) > PAD:
                self._start(self._head)
            return
        self._virtual = np.concatenate([self._virtual, samples])

    def _start(self, head: np.ndarray) -> None:
        self._started, self._head = True, None
        self._virtual = np.concatenate([head[1:PAD + 1][::-1], head]).astype(np.float32)

    def _emit(self, limit: int | None) -> torch.Tensor:
        have = (self._voff + len(self._virtual) - N_FFT) // HOP_LENGTH + 1 if len(self._virtual) else 0
        end = max(self.frames_out, have if limit is None else min(have, limit))
        n = end - self.frames_out
        if n <= 0:
            return torch.zeros(self.n_mels, 0)
        start = self.frames_out * HOP_LENGTH - self._voff
        x = torch.from_numpy(self._virtual[start:start + (n - 1) * HOP_LENGTH + N_FFT].astype(np.float64))
        frames = x.unfold(0, N_FFT, HOP_LENGTH) * self.window
        power = torch.fft.rfft(frames, dim=-1).abs() ** 2
        logmel = torch.clamp(self.filters @ power.T, min=1e-10).log10().float()
        self.frames_out = end
        keep = self.frames_out * HOP_LENGTH - self._voff  # drop what no later frame reads
        self._virtual = self._virtual[keep:]
        self._voff += keep
        return logmel


def normalise(raw: torch.Tensor, maximum: float | torch.Tensor) -> torch.Tensor:
    """Whisper's floor and scale with a given maximum: `(max(x, M - 8) + 4) / 4`."""
    if torch.is_tensor(maximum) and maximum.dim() > 0:
        maximum = maximum.view(-1, *([1] * (raw.dim() - 1)))
    return (torch.maximum(raw, torch.as_tensor(maximum, dtype=raw.dtype) - 8.0) + 4.0) / 4.0


FLOOR = -10.0  # log10 of the 1e-10 clamp: what silence (the zero padding) gives before the floor
