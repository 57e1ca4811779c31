"""NeMo's log-mel front end (AudioToMelSpectrogramPreprocessor), offline and incremental.

NeMo computes features over a whole utterance: pre-emphasis, a centred STFT with zero padding,
magnitude, power, mel filterbank, log with a guard.  A live stream gets audio in pieces, so
`OnlineMel` emits each frame as soon as the samples under its window have arrived and gives
the same numbers, frame for frame, as `MelFrontend.offline` on the whole utterance.

The filterbank and window are taken from the checkpoint (NeMo stores them as buffers
`preprocessor.featurizer.fb` / `.window` and uses the stored values after loading).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


class FeatureConfigError(ValueError):
    """The checkpoint's preprocessor settings cannot be streamed exactly."""


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 16000
    win_length: int = 400
    hop_length: int = 160
    n_fft: int = 512
    n_mels: int = 80
    preemph: float | None = 0.97
    mag_power: float = 2.0
    log: bool = True
    log_zero_guard_type: str = "add"
    log_zero_guard_value: float = 2.0**-24
    lowfreq: float = 0.0
    highfreq: float | None = None
    mel_norm: str | None = "slaney"
    window: str = "hann"

    @classmethod
    def from_nemo(cls, cfg: dict) -> "MelConfig":
        """Read a NeMo `preprocessor` config section; refuse settings that cannot stream."""
        target = str(cfg.get("_target_", ""))
        if target and not target.endswith("AudioToMelSpectrogramPreprocessor"):
            raise FeatureConfigError(f"preprocessor {target} is not AudioToMelSpectrogramPreprocessor")
        sr = int(cfg.get("sample_rate", 16000))
        win = cfg.get("n_window_size") or int(cfg.get("window_size", 0.02) * sr)
        hop = cfg.get("n_window_stride") or int(cfg.get("window_stride", 0.01) * sr)
        normalize = cfg.get("normalize", "per_feature")
        if normalize not in (None, "NA", "None", "none", False):
            raise FeatureConfigError(
                f"preprocessor normalize={normalize!r} needs the whole utterance; "
                "cache-aware streaming models use normalize: NA"
            )
        if int(cfg.get("frame_splicing", 1)) != 1:
            raise FeatureConfigError("preprocessor frame_splicing > 1 is not supported")
        if cfg.get("exact_pad", False):
            raise FeatureConfigError("preprocessor exact_pad=True is not supported")
        guard = cfg.get("log_zero_guard_value", 2.0**-24)
        if isinstance(guard, str):
            guard = {"tiny": torch.finfo(torch.float32).tiny, "eps": torch.finfo(torch.float32).eps}[guard]
        return cls(
            sample_rate=sr,
            win_length=int(win),
            hop_length=int(hop),
            n_fft=int(cfg.get("n_fft") or 2 ** math.ceil(math.log2(win))),
            n_mels=int(cfg.get("features", cfg.get("nfilt", 64))),
            preemph=cfg.get("preemph", 0.97),
            mag_power=float(cfg.get("mag_power", 2.0)),
            log=bool(cfg.get("log", True)),
            log_zero_guard_type=str(cfg.get("log_zero_guard_type", "add")),
            log_zero_guard_value=float(guard),
            lowfreq=float(cfg.get("lowfreq", 0.0) or 0.0),
            highfreq=cfg.get("highfreq"),
            mel_norm=cfg.get("mel_norm", "slaney"),
            window=str(cfg.get("window", "hann")),
        )

    def default_window(self) -> torch.Tensor:
        fns = {"hann": torch.hann_window, "hamming": torch.hamming_window,
               "blackman": torch.blackman_window, "bartlett": torch.bartlett_window}
        if self.window not in fns:
            raise FeatureConfigError(f"window {self.window!r} is not supported")
        return fns[self.window](self.win_length, periodic=False)

    def default_filterbank(self) -> torch.Tensor:
        import librosa

        fb = librosa.filters.mel(sr=self.sample_rate, n_fft=self.n_fft, n_mels=self.n_mels,
                                 fmin=self.lowfreq, fmax=self.highfreq or self.sample_rate / 2,
                                 norm=self.mel_norm)
        return torch.tensor(fb, dtype=torch.float32)


class MelFrontend:
    """The NeMo formula; holds the window and filterbank (from the checkpoint when given)."""

    def __init__(self, config: MelConfig, window: torch.Tensor | None = None,
                 filterbank: torch.Tensor | None = None):
        self.config = config
        window = config.default_window() if window is None else window.detach().float().reshape(-1)
        fb = config.default_filterbank() if filterbank is None else filterbank.detach().float()
        fb = fb.reshape(fb.shape[-2], fb.shape[-1])
        if window.numel() != config.win_length:
            raise FeatureConfigError(f"window has {window.numel()} taps, config says {config.win_length}")
        if fb.shape != (config.n_mels, config.n_fft // 2 + 1):
            raise FeatureConfigError(f"filterbank shape {tuple(fb.shape)} does not match the config")
        self.window = window
        self.filterbank = fb
        # torch.stft centres a short window inside the n_fft frame; do the same once here.
        left = (config.n_fft - config.win_length) // 2
        self.frame_window = torch.nn.functional.pad(window, (left, config.n_fft - config.win_length - left))
        # Extent of the non-zero window around a frame's centre, in samples.
        self.window_left = config.n_fft // 2 - left
        self.window_right = config.win_length - self.window_left

    def num_frames(self, num_samples: int) -> int:
        """NeMo's valid feature length (`get_seq_len`): the last STFT frame is masked away."""
        return num_samples // self.config.hop_length

    def preemphasis(self, x: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.preemph is None:
            return x
        prev = x[:1] if previous is None else previous.reshape(1)
        head = x[:1] if previous is None else x[:1] - self.config.preemph * prev
        return torch.cat((head, x[1:] - self.config.preemph * x[:-1]))

    def spectrum_to_mel(self, spec: torch.Tensor) -> torch.Tensor:
        """Complex STFT [..., freq, frames] -> log-mel [..., n_mels, frames], as NeMo orders the ops."""
        mag = torch.view_as_real(spec).pow(2).sum(-1).sqrt()
        if self.config.mag_power != 1.0:
            mag = mag.pow(self.config.mag_power)
        mel = torch.matmul(self.filterbank, mag)
        if not self.config.log:
            return mel
        guard = self.config.log_zero_guard_value
        if self.config.log_zero_guard_type == "add":
            return torch.log(mel + guard)
        return torch.log(torch.clamp(mel, min=guard))

    def offline(self, samples: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Whole-utterance features [n_mels, num_frames(len)] exactly as NeMo computes them."""
        x = torch.as_tensor(samples, dtype=torch.float32).reshape(-1)
        n = self.num_frames(x.numel())
        if n == 0:
            return torch.zeros(self.config.n_mels, 0)
        x = self.preemphasis(x)
        spec = torch.stft(x, self.config.n_fft, self.config.hop_length, self.config.win_length,
                          window=self.window, center=True, pad_mode="constant", return_complex=True)
        return self.spectrum_to_mel(spec)[:, :n]

    def frames(self, padded: torch.Tensor, count: int) -> torch.Tensor:
        """Log-mel of `count` frames from a signal already padded by n_fft//2 on the left."""
        cfg = self.config
        segs = padded.unfold(0, cfg.n_fft, cfg.hop_length)[:count]
        spec = torch.fft.rfft(segs * self.frame_window, dim=-1).transpose(0, 1)
        return self.spectrum_to_mel(spec)


class OnlineMel:
    """Incremental features for one stream: `accept` audio, get the frames that became ready."""

    def __init__(self, frontend: MelFrontend):
        self.frontend = frontend
        cfg = frontend.config
        self._half = cfg.n_fft // 2
        # Pre-emphasised samples, left-padded like torch.stft(center=True, pad_mode="constant").
        self._buffer = torch.zeros(self._half)
        self._buffer_start = -self._half  # sample index of _buffer[0]
        self._last_raw: torch.Tensor | None = None
        self.num_samples = 0
        self.frames_emitted = 0
        self.finished = False

    def accept(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Add audio; return the newly complete frames [n_mels, k] (k may be 0)."""
        if self.finished:
            raise RuntimeError("OnlineMel.accept after finish")
        x = torch.as_tensor(samples, dtype=torch.float32).reshape(-1)
        if x.numel():
            y = self.frontend.preemphasis(x, self._last_raw)
            self._last_raw = x[-1:].clone()
            self._buffer = torch.cat((self._buffer, y))
            self.num_samples += x.numel()
        # Frame t is final once the samples under its (non-zero) window have arrived.
        hop = self.frontend.config.hop_length
        ready = max(0, (self.num_samples - self.frontend.window_right) // hop + 1)
        return self._emit(ready)

    def finish(self) -> torch.Tensor:
        """End of audio: the remaining frames, with NeMo's zero padding on the right."""
        if self.finished:
            return torch.zeros(self.frontend.config.n_mels, 0)
        self.finished = True
        total = self.frontend.num_frames(self.num_samples)
        self._buffer = torch.cat((self._buffer, torch.zeros(self.frontend.config.n_fft)))
        return self._emit(total)

    def _emit(self, upto: int) -> torch.Tensor:
        upto = min(upto, self.frontend.num_frames(self.num_samples))
        count = upto - self.frames_emitted
        if count <= 0:
            return torch.zeros(self.frontend.config.n_mels, 0)
        hop = self.frontend.config.hop_length
        first = self.frames_emitted * hop - self._half - self._buffer_start
        need = first + (count - 1) * hop + self.frontend.config.n_fft
        seg = self._buffer[first:need]
        if seg.numel() < need - first:  # samples not yet seen sit under the zero part of the window
            seg = torch.nn.functional.pad(seg, (0, need - first - seg.numel()))
        out = self.frontend.frames(seg, count)
        self.frames_emitted = upto
        # Drop samples no later frame will read.
        keep_from = self.frames_emitted * hop - self._half - self._buffer_start
        if keep_from > 0:
            self._buffer = self._buffer[keep_from:]
            self._buffer_start += keep_from
        return out
