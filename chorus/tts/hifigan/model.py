"""HiFi-GAN generator (Kong et al. 2020, jik876/hifi-gan `models.py`) with exact chunked streaming.

Loads the official generator files (`generator_v1`, ... : `torch.save({"generator": state_dict})`) with their
`config.json` (`resblock` "1" or "2", `upsample_rates`, `upsample_kernel_sizes`, `upsample_initial_channel`,
`resblock_kernel_sizes`, `resblock_dilation_sizes`, `num_mels`, `hop_size`, `sampling_rate`). Weight-normed
layers (`weight_g`, `weight_v`) are folded into plain weights at load (w = g v / ||v||, norm over all but dim 0,
as torch's weight_norm).

Streaming. The generator is non-causal but convolutional: an output sample depends on a bounded window of mel
frames. `receptive_field()` walks the layers backwards and gives, in mel frames, the left and right context a
chunk needs so that every layer's values inside the chunk are computed from real neighbours rather than the zero
padding at a window edge. A stream then vocodes mel frames [a, b) from mel[a - left, b + right) and keeps the
output samples [a*hop, b*hop): the same numbers as one call over the whole mel, up to float summation order.
`VocoderState` is one stream's state (the mel it still needs: the last `left` frames before its next chunk and the
frames waiting for right context), explicit so it can move into a slot pool.

Batching (law 2): `forward(mel, lengths)` zeroes each item's frames past its length at the input of every
convolution, which is what the zero padding does to the item alone, so a batched item equals itself alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LRELU_SLOPE = 0.1


class NotAHifiGan(ValueError):
    pass


@dataclass
class HifiGanConfig:
    resblock: str = "1"
    upsample_rates: tuple = (8, 8, 2, 2)
    upsample_kernel_sizes: tuple = (16, 16, 4, 4)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple = (3, 7, 11)
    resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    num_mels: int = 80
    hop_size: int = 256
    sampling_rate: int = 22050

    @staticmethod
    def from_dict(d: dict, where: str = "config") -> "HifiGanConfig":
        need = ("resblock", "upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
                "resblock_kernel_sizes", "resblock_dilation_sizes")
        missing = [k for k in need if k not in d]
        if missing:
            raise NotAHifiGan(f"{where} is not a HiFi-GAN config: no {', '.join(missing)}")
        if str(d["resblock"]) not in ("1", "2"):
            raise NotAHifiGan(f"{where}: resblock {d['resblock']!r} (HiFi-GAN has '1' and '2')")
        cfg = HifiGanConfig(
            resblock=str(d["resblock"]), upsample_rates=tuple(int(u) for u in d["upsample_rates"]),
            upsample_kernel_sizes=tuple(int(k) for k in d["upsample_kernel_sizes"]),
            upsample_initial_channel=int(d["upsample_initial_channel"]),
            resblock_kernel_sizes=tuple(int(k) for k in d["resblock_kernel_sizes"]),
            resblock_dilation_sizes=tuple(tuple(int(x) for x in ds) for ds in d["resblock_dilation_sizes"]),
            num_mels=int(d.get("num_mels", 80)), hop_size=int(d.get("hop_size", math.prod(d["upsample_rates"]))),
            sampling_rate=int(d.get("sampling_rate", 22050)))
        if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
            raise NotAHifiGan(f"{where}: upsample_rates and upsample_kernel_sizes differ in length")
        if any((k - u) % 2 for u, k in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            raise NotAHifiGan(f"{where}: an upsampling kernel minus its rate is odd (output not rate x input)")
        if math.prod(cfg.upsample_rates) != cfg.hop_size:
            raise NotAHifiGan(f"{where}: the upsampling rates multiply to {math.prod(cfg.upsample_rates)}, "
                              f"not hop_size {cfg.hop_size}")
        return cfg


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask


class ResBlock1(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d,
                                              padding=get_padding(kernel_size, d)) for d in dilation)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, 1, dilation=1,
                                              padding=get_padding(kernel_size, 1)) for _ in dilation)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = c1(_masked(F.leaky_relu(x, LRELU_SLOPE), mask))
            xt = c2(_masked(F.leaky_relu(xt, LRELU_SLOPE), mask))
            x = xt + x
        return x

    def radius(self) -> list[tuple[int, int]]:  # (kernel, dilation) of each conv in order, for the field
        return [(c.kernel_size[0], c.dilation[0]) for pair in zip(self.convs1, self.convs2) for c in pair]


class ResBlock2(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d,
                                             padding=get_padding(kernel_size, d)) for d in dilation)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for c in self.convs:
            x = c(_masked(F.leaky_relu(x, LRELU_SLOPE), mask)) + x
        return x

    def radius(self) -> list[tuple[int, int]]:
        return [(c.kernel_size[0], c.dilation[0]) for c in self.convs]


@dataclass
class VocoderState:
    """One stream's vocoder state: the mel frames it still needs and how far it has got (frames, absolute)."""
    mel: Tensor  # [num_mels, k]: frames tail_start .. tail_start + k - 1
    tail_start: int = 0
    emitted: int = 0  # frames whose audio has been returned
    finished: bool = False

    @property
    def received(self) -> int:
        return self.tail_start + self.mel.shape[-1]


@dataclass
class Field:
    left: int  # mel frames of context before a chunk
    right: int  # and after it
    per_level: list = field(default_factory=list)


class Generator(nn.Module):
    def __init__(self, cfg: HifiGanConfig):
        super().__init__()
        self.cfg = cfg
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(cfg.num_mels, cfg.upsample_initial_channel, 7, 1, padding=3)
        block = ResBlock1 if cfg.resblock == "1" else ResBlock2
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ch = cfg.upsample_initial_channel
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            ch_in, ch = cfg.upsample_initial_channel // (2 ** i), cfg.upsample_initial_channel // (2 ** (i + 1))
            self.ups.append(nn.ConvTranspose1d(ch_in, ch, k, u, padding=(k - u) // 2))
            for k_r, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(block(ch, k_r, d))
        self.conv_post = nn.Conv1d(ch, 1, 7, 1, padding=3)
        self.hop = math.prod(cfg.upsample_rates)
        self._field: Field | None = None

    # ------------------------------------------------------------------------------------------- one shot

    def forward(self, mel: Tensor, lengths: Tensor | None = None) -> Tensor:
        """mel [b, num_mels, t] -> audio [b, 1, t * hop]; with lengths, each item as if alone (rest is zeros)."""
        t = mel.shape[-1]
        masks = None
        if lengths is not None and int(lengths.min()) < t:
            masks = []
            scale = 1
            for u in (1, *self.cfg.upsample_rates):
                scale *= u
                pos = torch.arange(t * scale, device=mel.device)
                masks.append((pos.unsqueeze(0) < (lengths.to(mel.device) * scale).unsqueeze(1))
                             .unsqueeze(1).to(mel.dtype))
        m = (lambda i: None) if masks is None else (lambda i: masks[i])
        x = self.conv_pre(_masked(mel, m(0)))
        for i, up in enumerate(self.ups):
            x = up(_masked(F.leaky_relu(x, LRELU_SLOPE), m(i)))
            xs = None
            for j in range(self.num_kernels):
                y = self.resblocks[i * self.num_kernels + j](x, m(i + 1))
                xs = y if xs is None else xs + y
            x = xs / self.num_kernels
        x = self.conv_post(_masked(F.leaky_relu(x), m(len(self.ups))))
        x = torch.tanh(x)
        return x if masks is None else x * masks[-1]

    # ----------------------------------------------------------------------------------------- streaming

    def receptive_field(self) -> Field:
        """Left / right mel context that makes a chunk's audio equal to the one-shot audio (see module doc)."""
        if self._field is not None:
            return self._field
        a, b = 1000, 1001  # any chunk; intervals are shift-invariant by whole frames
        scales = [1]
        for u in self.cfg.upsample_rates:
            scales.append(scales[-1] * u)
        levels = len(self.ups)
        lo, hi = a * scales[-1], b * scales[-1] - 1  # output samples of the chunk
        needed = []  # (level, lo, hi): positions whose values must be right, in that level's units

        def conv(lo, hi, k, d=1):  # a "same" conv: input interval of an output interval
            p = get_padding(k, d)
            return lo - p, hi + (d * (k - 1) - p)

        needed.append((levels, lo, hi))
        lo, hi = conv(lo, hi, 7)  # conv_post
        needed.append((levels, lo, hi))
        for i in reversed(range(levels)):
            # resblocks in parallel, each a chain of convs: the widest chain decides
            span_l = span_r = 0
            for j in range(self.num_kernels):
                l_, r_ = 0, 0
                for k, d in self.resblocks[i * self.num_kernels + j].radius():
                    p = get_padding(k, d)
                    l_, r_ = l_ + p, r_ + d * (k - 1) - p
                span_l, span_r = max(span_l, l_), max(span_r, r_)
            lo, hi = lo - span_l, hi + span_r
            needed.append((i + 1, lo, hi))
            u, k = self.cfg.upsample_rates[i], self.cfg.upsample_kernel_sizes[i]
            p = (k - u) // 2
            lo, hi = math.ceil((lo + p - k + 1) / u), math.floor((hi + p) / u)
            needed.append((i, lo, hi))
        lo, hi = conv(lo, hi, 7)  # conv_pre
        needed.append((0, lo, hi))
        left = max(math.ceil((a * scales[lv] - l_) / scales[lv]) for lv, l_, _ in needed)
        right = max(math.ceil((h_ + 1 - b * scales[lv]) / scales[lv]) for lv, _, h_ in needed)
        self._field = Field(max(left, 0), max(right, 0), needed)
        return self._field

    def new_state(self, device=None, dtype=torch.float32) -> VocoderState:
        return VocoderState(torch.zeros(self.cfg.num_mels, 0, device=device, dtype=dtype))

    @torch.inference_mode()
    def stream(self, states: list[VocoderState], chunks: list[Tensor | None],
               final: list[bool] | None = None) -> list[Tensor]:
        """Push new mel frames ([num_mels, n] each, n may be 0 / None) into each stream and get the audio that is
        now exact ([samples] each): frames up to received - right, or all of them once the stream is final.
        The streams' windows go through the generator as one batch (padded, masked: law 2)."""
        f = self.receptive_field()
        final = final or [False] * len(states)
        windows, plans = [], []
        for st, chunk, fin in zip(states, chunks, final):
            if chunk is not None and chunk.shape[-1]:
                if st.finished:
                    raise ValueError("mel pushed into a finished vocoder stream")
                st.mel = torch.cat([st.mel, chunk.to(st.mel)], dim=-1)
            st.finished = st.finished or fin
            ready = st.received if st.finished else max(st.received - f.right, st.emitted)
            if ready <= st.emitted:
                plans.append(None)
                continue
            start = max(st.emitted - f.left, 0)
            end = st.received if st.finished else min(ready + f.right, st.received)
            window = st.mel[:, start - st.tail_start:end - st.tail_start]
            windows.append(window)
            plans.append((start, st.emitted, ready, end))
        outs: list[Tensor] = []
        audio = None
        if windows:
            lengths = torch.tensor([w.shape[-1] for w in windows])
            batch = torch.zeros(len(windows), self.cfg.num_mels, int(lengths.max()), dtype=windows[0].dtype,
                                device=windows[0].device)
            for i, w in enumerate(windows):
                batch[i, :, :w.shape[-1]] = w
            audio = self.forward(batch, lengths if len(windows) > 1 else None)[:, 0]
        k = 0
        for st, plan in zip(states, plans):
            if plan is None:
                outs.append(torch.zeros(0, dtype=st.mel.dtype, device=st.mel.device))
                continue
            start, a, b, _ = plan
            outs.append(audio[k, (a - start) * self.hop:(b - start) * self.hop].clone())
            k += 1
            st.emitted = b
            keep_from = max(b - f.left, 0)  # the next chunk's left context onwards
            st.mel = st.mel[:, keep_from - st.tail_start:]
            st.tail_start = keep_from
        return outs


def fold_weight_norm(state: dict) -> dict:
    """{x.weight_g, x.weight_v} -> x.weight = g * v / ||v|| (norm over every dim but 0), the rest as is."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight_g"):
            continue
        if key.endswith(".weight_v"):
            base = key[:-len(".weight_v")]
            g = state[base + ".weight_g"]
            v = value
            norm = v.norm(2, dim=tuple(range(1, v.dim())), keepdim=True)
            out[base + ".weight"] = g * v / norm
            continue
        if key.endswith((".parametrizations.weight.original0", ".parametrizations.weight.original1")):
            continue  # torch's newer parametrized weight_norm: handled below
        out[key] = value
    for key in list(state):
        if key.endswith(".parametrizations.weight.original0"):
            base = key[:-len(".parametrizations.weight.original0")]
            g, v = state[key], state[base + ".parametrizations.weight.original1"]
            out[base + ".weight"] = g * v / v.norm(2, dim=tuple(range(1, v.dim())), keepdim=True)
    return out


def load_hifigan(generator_path: str | Path, config: str | Path | dict | None = None) -> Generator:
    """An official HiFi-GAN generator file (`{"generator": state_dict}`) and its config.json (by default the
    `config.json` beside it), weight norm folded, every weight used."""
    generator_path = Path(generator_path)
    if config is None:
        config = generator_path.parent / "config.json"
    if not isinstance(config, dict):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise NotAHifiGan(f"cannot read the HiFi-GAN config {config}: {e}") from e
    cfg = HifiGanConfig.from_dict(config)
    ckpt = torch.load(generator_path, map_location="cpu", weights_only=True)
    state = ckpt.get("generator", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise NotAHifiGan(f"{generator_path}: no generator state dict")
    model = Generator(cfg)
    try:
        missing, unexpected = model.load_state_dict(fold_weight_norm(state), strict=False)
    except RuntimeError as e:  # shapes that do not match the config
        raise NotAHifiGan(f"{generator_path}: weights do not match the config: {e}") from e
    if missing or unexpected:
        raise NotAHifiGan(f"{generator_path}: weights do not match the config (missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]})")
    return model.eval()
