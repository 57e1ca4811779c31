"""FunASR's WavFrontendOnline: kaldi fbank, low frame rate (LFR) stacking and CMVN, incrementally.

What FunASR computes, per stream:
  * fbank: kaldi fbank (kaldi-native-fbank, as FunASR's C++ runtime and its torchaudio-free
    fallback use) on the float waveform scaled by 32768 (int16 range), hamming window,
    25 ms / 10 ms, 80 mel bins, snip_edges, no dither at inference;
  * LFR m=7 n=6: output frame j stacks fbank rows 6j .. 6j+6 of the sequence padded on the left
    with (m-1)//2 = 3 copies of the first frame; a window is emitted once its 7 rows exist, and at
    the end of the stream every window whose centre row is a real frame is emitted, padded on the
    right with copies of the last frame (ceil(T / 6) frames in all, like the offline WavFrontend);
  * CMVN from am.mvn: (x + shift) * scale, over the 560 stacked dimensions.
Each fbank frame depends on its own 400 samples only, so feeding audio in pieces of any size gives
the same frames as the whole utterance (tested).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import torch


@dataclass(frozen=True)
class FrontendConfig:
    fs: int = 16000
    window: str = "hamming"
    n_mels: int = 80
    frame_length: int = 25
    frame_shift: int = 10
    lfr_m: int = 7
    lfr_n: int = 6
    dither: float = 0.0  # as configured; inference always uses 0 (FunASR's dither is random noise)

    @property
    def dim(self) -> int:
        return self.n_mels * self.lfr_m

    @property
    def samples_per_lfr_frame(self) -> int:
        """960 at 16 kHz: one LFR frame advances lfr_n fbank shifts (60 ms)."""
        return self.lfr_n * self.fs * self.frame_shift // 1000


def load_cmvn(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read am.mvn (Kaldi nnet text: the vector after <AddShift> and after <Rescale>)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    found = {}
    for i, line in enumerate(lines):
        head = line.split()[:1]
        if head and head[0] in ("<AddShift>", "<Rescale>") and i + 1 < len(lines):
            nxt = lines[i + 1].split()
            if nxt and nxt[0] == "<LearnRateCoef>":
                found[head[0]] = [float(v) for v in nxt[3:-1]]  # "<LearnRateCoef> 0 [ v ... ]"
    if set(found) != {"<AddShift>", "<Rescale>"}:
        raise ValueError(f"{path}: not a FunASR am.mvn (needs <AddShift> and <Rescale> vectors)")
    means = torch.tensor(found["<AddShift>"], dtype=torch.float32)
    scale = torch.tensor(found["<Rescale>"], dtype=torch.float32)
    if means.shape != scale.shape:
        raise ValueError(f"{path}: <AddShift> has {len(means)} values, <Rescale> {len(scale)}")
    return means, scale


def write_cmvn(path: str | Path, means: torch.Tensor, scale: torch.Tensor) -> None:
    """Write am.mvn in the layout FunASR's load_cmvn reads."""
    n = len(means)

    def vec(v):
        return " ".join(repr(float(x)) for x in v.tolist())
    Path(path).write_text(
        "<Nnet>\n"
        f"<Splice> {n} {n}\n[ 0 ]\n"
        f"<AddShift> {n} {n}\n<LearnRateCoef> 0 [ {vec(means)} ]\n"
        f"<Rescale> {n} {n}\n<LearnRateCoef> 0 [ {vec(scale)} ]\n"
        "</Nnet>\n", encoding="utf-8")


class ParaformerFrontend:
    """Shared, read-only: options and CMVN.  `online()` gives one stream's incremental state."""

    def __init__(self, cfg: FrontendConfig, cmvn: tuple[torch.Tensor, torch.Tensor]):
        means, scale = cmvn
        if means.numel() != cfg.dim:
            raise ValueError(f"am.mvn has {means.numel()} dims, the front end makes {cfg.dim}")
        self.cfg = cfg
        self.means, self.scale = means.float(), scale.float()
        opts = knf.FbankOptions()
        opts.frame_opts.samp_freq = float(cfg.fs)
        opts.frame_opts.frame_length_ms = float(cfg.frame_length)
        opts.frame_opts.frame_shift_ms = float(cfg.frame_shift)
        opts.frame_opts.dither = 0.0
        opts.frame_opts.snip_edges = True
        opts.frame_opts.window_type = cfg.window
        opts.mel_opts.num_bins = cfg.n_mels
        opts.energy_floor = 0.0
        self.opts = opts

    def fbank(self, samples) -> torch.Tensor:
        on = knf.OnlineFbank(self.opts)
        on.accept_waveform(self.cfg.fs, _scaled(samples))
        on.input_finished()
        return _frames(on, 0, on.num_frames_ready, self.cfg.n_mels)

    def cmvn(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.means) * self.scale

    def offline(self, samples) -> torch.Tensor:
        """The whole utterance at once: [ceil(T/6), 560] features (T fbank frames)."""
        fb = self.fbank(samples)
        m, n = self.cfg.lfr_m, self.cfg.lfr_n
        t = fb.shape[0]
        if t == 0:
            return torch.zeros(0, self.cfg.dim)
        rows = torch.cat([fb[:1].expand((m - 1) // 2, -1), fb])
        t_lfr = -(-t // n)
        need = (t_lfr - 1) * n + m
        if need > rows.shape[0]:
            rows = torch.cat([rows, rows[-1:].expand(need - rows.shape[0], -1)])
        win = rows.unfold(0, m, n)[:t_lfr]                   # [t_lfr, n_mels, m]
        return self.cmvn(win.transpose(1, 2).reshape(t_lfr, -1))

    def online(self) -> "OnlineFeatures":
        return OnlineFeatures(self)


def _scaled(samples) -> np.ndarray:
    x = torch.as_tensor(samples, dtype=torch.float32).reshape(-1)
    return (x * (1 << 15)).numpy()  # FunASR: waveform * (1 << 15), in float32


def _frames(on, start: int, stop: int, n_mels: int) -> torch.Tensor:
    if stop <= start:
        return torch.zeros(0, n_mels)
    return torch.from_numpy(np.stack([on.get_frame(i) for i in range(start, stop)]))


class OnlineFeatures:
    """One stream: audio pieces in, LFR+CMVN frames out as soon as their 7 rows exist."""

    def __init__(self, frontend: ParaformerFrontend):
        self.fe = frontend
        self._fbank = knf.OnlineFbank(frontend.opts)
        self._taken = 0                    # fbank frames read from knf
        self._rows: torch.Tensor | None = None   # pending rows, starting at the next window
        self.samples = 0                   # samples accepted so far
        self.emitted = 0                   # LFR frames handed out so far
        self.finished = False

    def accept(self, samples) -> torch.Tensor:
        """Append float samples in [-1, 1]; return the new feature frames [k, 560]."""
        if self.finished:
            raise RuntimeError("the stream's features are finished")
        x = _scaled(samples)
        self.samples += x.shape[0]
        if x.shape[0]:
            self._fbank.accept_waveform(self.fe.cfg.fs, x)
        ready = self._fbank.num_frames_ready
        new = _frames(self._fbank, self._taken, ready, self.fe.cfg.n_mels)
        self._taken = ready
        if new.shape[0]:
            if self._rows is None:
                # FunASR's splice cache starts as (m-1)//2 copies of the first frame.
                self._rows = torch.cat([new[:1].expand((self.fe.cfg.lfr_m - 1) // 2, -1), new])
            else:
                self._rows = torch.cat([self._rows, new])
        return self._emit(final=False)

    def finish(self) -> torch.Tensor:
        """End of audio: the windows whose centre row is real, right-padded with the last frame."""
        out = self._emit(final=True)
        self.finished = True
        return out

    def _emit(self, final: bool) -> torch.Tensor:
        m, n = self.fe.cfg.lfr_m, self.fe.cfg.lfr_n
        rows = self._rows
        if rows is None:
            return torch.zeros(0, self.fe.cfg.dim)
        if final:
            count = max(0, -(-(rows.shape[0] - (m - 1) // 2) // n))
            need = (count - 1) * n + m
            if count and need > rows.shape[0]:
                rows = torch.cat([rows, rows[-1:].expand(need - rows.shape[0], -1)])
        else:
            count = (rows.shape[0] - m) // n + 1 if rows.shape[0] >= m else 0
        if count == 0:
            return torch.zeros(0, self.fe.cfg.dim)
        win = rows.unfold(0, m, n)[:count]
        self._rows = rows[count * n:] if not final else None
        self.emitted += count
        return self.fe.cmvn(win.transpose(1, 2).reshape(count, -1))
