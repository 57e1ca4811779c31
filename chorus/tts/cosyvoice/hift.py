"""CosyVoice 2's HiFT vocoder (HiFTNet: a neural source filter and an iSTFT head), from `hift.pt` as CosyVoice ships it.

The generator turns an 80-bin mel at 50 frames/s into 24 kHz audio (480 samples a frame):

* an F0 predictor (five weight-normed k3 convolutions with ELU, a linear layer, |.|) gives one F0 per mel frame;
* the NSF source (CosyVoice's `SourceModuleHnNSF` with `SineGen2`): F0 and its 8 harmonics repeated to the sample
  rate, their phase accumulated at the frame rate (linear interpolation down, cumulative sum, linear interpolation
  up), a random initial phase per harmonic, Gaussian noise (small where voiced, sine_amp / 3 where not), merged to
  one channel by a linear layer and tanh;
* the filter: conv_pre, then per upsampling stage a leaky ReLU, a transposed convolution, the source's STFT
  (n_fft 16, hop 4) downsampled to the stage's rate and passed through a Snake ResBlock added in, and the mean of
  three Snake ResBlocks; conv_post gives log-magnitude and phase of a 16-point spectrum, inverted by iSTFT and
  clamped to +-audio_limit.

Noise. The source draws, in this order, the harmonics' initial phases (uniform), the additive noise (normal, one
per sample and harmonic) and a noise branch that inference never uses (normal, one per sample), which we draw
anyway: CosyVoice takes all three from the global torch RNG, and drawing the same numbers in the same order (and
the same memory layout: see `NsfSource.draw`) from a `torch.Generator` seeded alike gives the same audio.
`inference(..., generator=None)` uses the global RNG, as CosyVoice does; a list of generators gives each item of
a batch its own.

Checkpoint. `hift.pt` is a plain state dict with CosyVoice's module names (a `generator.` prefix, as a GAN
checkpoint has it, is dropped as CosyVoice drops it). Weight norm is stored as torch's parametrization
(`x.parametrizations.weight.original0/1`) in what CosyVoice 2 saves, and as `x.weight_g / x.weight_v` by older
torch; both load, folded into plain weights (w = g v / ||v||, computed as torch computes it on each forward).
Sizes come from the yaml's `hift:` section, read as plain numbers (`HiftConfig.from_mapping`); CosyVoice 3's
causal HiFT and CosyVoice 1's 22.05 kHz source (`SineGen`) are refused by name, not approximated.

Parity (bench/cosyvoice_parity.py): on a checkpoint CosyVoice built and saved, HiftStreamer fed CosyVoice's mel
chunks gives CosyVoice2Model.token2wav's audio bit for bit (same weights, same draws in the same memory layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chorus.tts.hifigan.model import get_padding


TAG_KEY = "!"  # where config.read_cosyvoice_yaml keeps a mapping's HyperPyYAML tag


class NotAHift(ValueError):
    """A checkpoint or config that is not CosyVoice 2's HiFT generator, with what was wrong."""


@dataclass
class F0PredictorConfig:
    num_class: int = 1
    in_channels: int = 80
    cond_channels: int = 512


@dataclass
class HiftConfig:
    """The yaml's `hift:` arguments; the defaults are CosyVoice 2's (examples/libritts/cosyvoice2/conf)."""
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple = (8, 5, 3)
    upsample_kernel_sizes: tuple = (16, 11, 7)
    istft_params: dict = field(default_factory=lambda: {"n_fft": 16, "hop_len": 4})
    resblock_kernel_sizes: tuple = (3, 7, 11)
    resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple = (7, 7, 11)
    source_resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_predictor: F0PredictorConfig = field(default_factory=F0PredictorConfig)

    @property
    def n_fft(self) -> int:
        return int(self.istft_params["n_fft"])

    @property
    def hop_len(self) -> int:
        return int(self.istft_params["hop_len"])

    @property
    def upsample_scale(self) -> int:
        """Output samples per mel frame (480 for CosyVoice 2)."""
        return math.prod(self.upsample_rates) * self.hop_len

    @staticmethod
    def from_mapping(mapping: dict, where: str = "hift") -> "HiftConfig":
        """The yaml's `hift:` section as plain numbers and lists (tags dropped); absent keys keep the defaults."""
        if not isinstance(mapping, dict):
            raise NotAHift(f"{where}: expected a mapping of HiFT arguments, got {type(mapping).__name__}")
        mapping = dict(mapping)
        _check_tag(mapping.pop(TAG_KEY, None), "HiFTGenerator", where)
        if "conv_pre_look_right" in mapping:
            raise NotAHift(f"{where}: conv_pre_look_right is CosyVoice 3's causal HiFT (CausalHiFTGenerator), "
                           "which chorus does not implement")
        known = {f.name for f in fields(HiftConfig)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise NotAHift(f"{where}: unknown HiFT argument(s) {', '.join(unknown)}")

        def number(key, kind):
            value = mapping[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise NotAHift(f"{where}.{key}: expected a number, got {value!r}")
            if kind is int and value != int(value):
                raise NotAHift(f"{where}.{key}: expected an integer, got {value!r}")
            return kind(value)

        def ints(key, nested=False):
            value = mapping[key]
            try:
                if nested:
                    return tuple(tuple(_as_int(x) for x in inner) for inner in value)
                return tuple(_as_int(x) for x in value)
            except (TypeError, ValueError):
                raise NotAHift(f"{where}.{key}: expected a list of {'lists of ' if nested else ''}integers, "
                               f"got {value!r}") from None

        cfg = HiftConfig()
        for f in fields(HiftConfig):
            if f.name not in mapping:
                continue
            if f.name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes",
                          "source_resblock_kernel_sizes"):
                setattr(cfg, f.name, ints(f.name))
            elif f.name in ("resblock_dilation_sizes", "source_resblock_dilation_sizes"):
                setattr(cfg, f.name, ints(f.name, nested=True))
            elif f.name == "istft_params":
                p = mapping["istft_params"]
                if not isinstance(p, dict) or set(p) != {"n_fft", "hop_len"}:
                    raise NotAHift(f"{where}.istft_params: expected n_fft and hop_len, got {p!r}")
                cfg.istft_params = {"n_fft": _checked_int(p["n_fft"], f"{where}.istft_params.n_fft"),
                                    "hop_len": _checked_int(p["hop_len"], f"{where}.istft_params.hop_len")}
            elif f.name == "f0_predictor":
                p = mapping["f0_predictor"]
                if isinstance(p, dict):
                    p = dict(p)
                    _check_tag(p.pop(TAG_KEY, None), "ConvRNNF0Predictor", f"{where}.f0_predictor")
                names = {g.name for g in fields(F0PredictorConfig)}
                if not isinstance(p, dict) or set(p) - names:
                    raise NotAHift(f"{where}.f0_predictor: expected {', '.join(sorted(names))}, got {p!r}")
                cfg.f0_predictor = F0PredictorConfig(
                    **{k: _checked_int(v, f"{where}.f0_predictor.{k}") for k, v in p.items()})
            elif f.name in ("nsf_alpha", "nsf_sigma", "nsf_voiced_threshold", "lrelu_slope", "audio_limit"):
                setattr(cfg, f.name, number(f.name, float))
            else:
                setattr(cfg, f.name, number(f.name, int))
        cfg.check(where)
        return cfg

    def check(self, where: str = "hift") -> None:
        if self.sampling_rate == 22050:
            raise NotAHift(f"{where}: sampling_rate 22050 is CosyVoice 1's HiFT (the SineGen source), which chorus "
                           "does not implement; CosyVoice 2's runs at 24000")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise NotAHift(f"{where}: upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise NotAHift(f"{where}: resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if not (len(self.source_resblock_kernel_sizes) == len(self.source_resblock_dilation_sizes)
                == len(self.upsample_rates)):
            raise NotAHift(f"{where}: one source ResBlock per upsampling stage is needed "
                           f"({len(self.upsample_rates)} stages, {len(self.source_resblock_kernel_sizes)} kernels, "
                           f"{len(self.source_resblock_dilation_sizes)} dilation lists)")
        if any((k - u) % 2 for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes)):
            raise NotAHift(f"{where}: an upsampling kernel minus its rate is odd (output not rate x input)")
        if self.f0_predictor.in_channels != self.in_channels or self.f0_predictor.num_class != 1:
            raise NotAHift(f"{where}.f0_predictor: in_channels must be the mel's ({self.in_channels}) and "
                           f"num_class 1")
        if self.base_channels % (2 ** len(self.upsample_rates)):
            raise NotAHift(f"{where}: base_channels {self.base_channels} does not halve "
                           f"{len(self.upsample_rates)} times")


def _check_tag(tag, cls: str, where: str) -> None:
    """The yaml's `!new:module.Class` tag (kept as data by the safe reader), when there is one, must name `cls`
    (CosyVoice 3's CausalHiFTGenerator and CausalConvRNNF0Predictor are other designs)."""
    if tag is not None and str(tag).rsplit(".", 1)[-1] != cls:
        raise NotAHift(f"{where}: {tag} is not CosyVoice 2's {cls}, which is what chorus implements")


def _as_int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x != int(x):
        raise ValueError(x)
    return int(x)


def _checked_int(x, where: str) -> int:
    try:
        return _as_int(x)
    except ValueError:
        raise NotAHift(f"{where}: expected an integer, got {x!r}") from None


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, alpha per channel on a linear scale (BigVGAN's Snake, alpha_logscale=False)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Per dilation: Snake, dilated conv, Snake, conv, residual."""

    def __init__(self, channels: int, kernel_size: int, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                              padding=get_padding(kernel_size, d)) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, padding=get_padding(kernel_size, 1))
                                    for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x)))) + x
        return x


class F0Predictor(nn.Module):
    """CosyVoice's ConvRNNF0Predictor: one F0 (Hz, >= 0) per mel frame. condnet keeps the nn.Sequential numbering
    (convolutions at 0, 2, 4, 6, 8; ELUs between) so the checkpoint's names load as they are."""

    def __init__(self, cfg: F0PredictorConfig):
        super().__init__()
        layers = []
        for i in range(5):
            layers += [nn.Conv1d(cfg.in_channels if i == 0 else cfg.cond_channels, cfg.cond_channels, 3, padding=1),
                       nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg.cond_channels, cfg.num_class)

    def forward(self, mel: Tensor) -> Tensor:  # [B, 80, T] -> [B, T]
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))


class NsfSource(nn.Module):
    """SourceModuleHnNSF with SineGen2: F0 at the sample rate [B, L, 1] -> one excitation channel [B, L, 1]."""

    def __init__(self, cfg: HiftConfig):
        super().__init__()
        self.sampling_rate = cfg.sampling_rate
        self.upsample_scale = cfg.upsample_scale
        self.harmonics = cfg.nb_harmonics + 1
        self.sine_amp = cfg.nsf_alpha
        self.noise_std = cfg.nsf_sigma
        self.voiced_threshold = cfg.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.harmonics, 1)

    def draw(self, batch: int, length: int, generators) -> tuple[Tensor, Tensor]:
        """(initial phases [B, H], unit normal noise [B, L, H]) in CosyVoice's order of draws: from one generator
        (or the global RNG: None) for the whole batch, or from each item's own generator (a list), item by item,
        so that a stream batched with others draws what it draws alone."""
        if not isinstance(generators, (list, tuple)):
            initial = torch.rand(batch, self.harmonics, generator=generators)
            # CosyVoice draws this with randn_like on its sines, whose memory is [B, H, L] (a transpose of the
            # interpolation's output); torch fills memory in order, and a non-contiguous tensor by another
            # algorithm than a contiguous one, so the same layout is needed for the same numbers.
            noise = torch.empty(batch, self.harmonics, length).transpose(1, 2).normal_(generator=generators)
            torch.randn(batch, length, 1, generator=generators)  # CosyVoice's unused noise branch: keeps draws aligned
            return initial, noise
        if len(generators) != batch:
            raise ValueError(f"{len(generators)} generators for a batch of {batch}")
        drawn = [self.draw(1, length, g) for g in generators]
        return torch.cat([d[0] for d in drawn]), torch.cat([d[1] for d in drawn])

    def forward(self, f0: Tensor, generator=None) -> Tensor:
        b, length, _ = f0.shape
        initial, unit_noise = self.draw(b, length, generator)
        multiples = torch.arange(1, self.harmonics + 1, dtype=f0.dtype, device=f0.device)
        rad = (f0 * multiples / self.sampling_rate) % 1  # [B, L, H] cycles per sample
        initial = initial.to(f0.device)
        initial[:, 0] = 0  # the fundamental starts at phase 0, the harmonics at random phases
        rad[:, 0, :] = rad[:, 0, :] + initial
        # The phase is accumulated at the frame rate and interpolated back up, as SineGen2 does (not per sample).
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / self.upsample_scale, mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad, dim=1) * 2 * math.pi
        phase = F.interpolate(phase.transpose(1, 2) * self.upsample_scale, scale_factor=self.upsample_scale,
                              mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * self.sine_amp
        voiced = (f0 > self.voiced_threshold).to(torch.float32)
        noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
        sines = sines * voiced + noise_amp * unit_noise.to(sines.device)
        return torch.tanh(self.l_linear(sines))


class HiftGenerator(nn.Module):
    """CosyVoice 2's HiFTGenerator (non-causal), inference only. Module names are CosyVoice's."""

    def __init__(self, cfg: HiftConfig | None = None):
        super().__init__()
        cfg = cfg or HiftConfig()
        cfg.check()
        self.cfg = cfg
        base, n_fft = cfg.base_channels, cfg.n_fft
        self.f0_predictor = F0Predictor(cfg.f0_predictor)
        self.m_source = NsfSource(cfg)
        self.conv_pre = nn.Conv1d(cfg.in_channels, base, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(base // 2 ** i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        # The source's STFT frames run at the last stage's rate; stage i takes them downsampled to its own rate.
        down = [1] + list(cfg.upsample_rates[::-1][:-1])
        cum = [math.prod(down[:j + 1]) for j in range(len(down))][::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(cum, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)):
            ch = base // 2 ** (i + 1)
            self.source_downs.append(nn.Conv1d(n_fft + 2, ch, 1) if u == 1
                                     else nn.Conv1d(n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, d)
            for i in range(len(self.ups)) for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = nn.Conv1d(base // 2 ** len(self.ups), n_fft + 2, 7, padding=3)
        # scipy's periodic Hann (get_window('hann', n_fft, fftbins=True)), as CosyVoice builds it, in float32
        self.register_buffer("stft_window", torch.hann_window(n_fft, periodic=True, dtype=torch.float64).float(),
                             persistent=False)

    @property
    def sampling_rate(self) -> int:
        return self.cfg.sampling_rate

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.upsample_scale

    def source(self, mel: Tensor, generator=None) -> Tensor:
        """mel [B, 80, T] -> the NSF excitation [B, 1, T * 480]; `generator`: one torch.Generator (or None, the
        global RNG) for the batch, or a list with one per item."""
        f0 = self.f0_predictor(mel)
        f0 = f0.repeat_interleave(self.cfg.upsample_scale, dim=1)[:, :, None]  # nearest upsampling to samples
        return self.m_source(f0, generator).transpose(1, 2)

    def decode(self, mel: Tensor, source: Tensor) -> Tensor:
        """mel [B, 80, T] and excitation [B, 1, T * 480] -> audio [B, T * 480]."""
        cfg = self.cfg
        spec = torch.view_as_real(torch.stft(source.squeeze(1), cfg.n_fft, cfg.hop_len, cfg.n_fft,
                                             window=self.stft_window, return_complex=True))
        s_stft = torch.cat([spec[..., 0], spec[..., 1]], dim=1)
        x = self.conv_pre(mel)
        k = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # one more frame: the STFT's centred frame count
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * k](x)
            for j in range(1, k):
                xs += self.resblocks[i * k + j](x)
            x = xs / k
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as CosyVoice has it
        half = cfg.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :half]), max=1e2)
        phase = torch.sin(x[:, half:])
        audio = torch.istft(torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase)),
                            cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.stft_window)
        return torch.clamp(audio, -cfg.audio_limit, cfg.audio_limit)

    @torch.inference_mode()
    def inference(self, mel: Tensor, cache_source: Tensor | None = None,
                  generator=None) -> tuple[Tensor, Tensor]:
        """CosyVoice's `inference(speech_feat, cache_source)`: (audio [B, T * 480], excitation [B, 1, T * 480]).
        The excitation's first samples are replaced by `cache_source` (the previous chunk's tail), as CosyVoice
        does to avoid a glitch where chunks meet; the noise comes from `generator` (the global RNG if None)."""
        if mel.dim() != 3 or mel.shape[1] != self.cfg.in_channels:
            raise ValueError(f"HiFT takes a mel [B, {self.cfg.in_channels}, T], got {tuple(mel.shape)}")
        s = self.source(mel, generator)
        if cache_source is not None and cache_source.shape[2]:
            s[:, :, :cache_source.shape[2]] = cache_source
        return self.decode(mel, s), s


def load_hift(path: str | Path, config: HiftConfig | dict | None = None) -> HiftGenerator:
    """CosyVoice's `hift.pt` (a plain state dict) with the yaml's `hift:` sizes (a HiftConfig, the section as a
    dict, or None for CosyVoice 2's defaults): weight norm folded, every weight used, none missing."""
    path = Path(path)
    cfg = config if isinstance(config, HiftConfig) else HiftConfig.from_mapping(config or {})
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        raise NotAHift(f"cannot read {path} as a torch state dict: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise NotAHift(f"{path}: not a plain state dict of tensors (CosyVoice's hift.pt is one)")
    state = {k[len("generator."):] if k.startswith("generator.") else k: v for k, v in state.items()}
    model = HiftGenerator(cfg)
    folded = fold_weight_norm(state, path)
    own = model.state_dict()
    missing = sorted(set(own) - set(folded))
    unexpected = sorted(set(folded) - set(own))
    if missing or unexpected:
        raise NotAHift(f"{path}: weights do not match a HiFT generator of this config"
                       + (f"; missing {_few(missing)}" if missing else "")
                       + (f"; unexpected {_few(unexpected)}" if unexpected else ""))
    wrong = [f"{k} {tuple(folded[k].shape)} (config wants {tuple(v.shape)})" for k, v in own.items()
             if folded[k].shape != v.shape]
    if wrong:
        raise NotAHift(f"{path}: weight shapes do not match the config: {_few(wrong)}")
    model.load_state_dict({k: v.float() for k, v in folded.items()}, strict=True)
    return model.eval()


WEIGHT_NORM_PAIRS = ((".parametrizations.weight.original0", ".parametrizations.weight.original1"),  # torch >= 2.1
                     (".weight_g", ".weight_v"))                                                 # older torch


def fold_weight_norm(state: dict, path: Path) -> dict:
    """Weight-normed layers' (g, v) -> weight, with torch._weight_norm: what torch computes from them on every
    forward in CosyVoice, so the weights are the same floats (F0 and the source's phase are sensitive to them)."""
    out = dict(state)
    for g_suffix, v_suffix in WEIGHT_NORM_PAIRS:
        for key in [k for k in state if k.endswith(g_suffix) or k.endswith(v_suffix)]:
            if key not in out:
                continue
            base = key[:-len(g_suffix)] if key.endswith(g_suffix) else key[:-len(v_suffix)]
            g, v = out.pop(base + g_suffix, None), out.pop(base + v_suffix, None)
            if g is None or v is None:
                raise NotAHift(f"{path}: {key} has no {base + (v_suffix if v is None else g_suffix)} "
                               "(weight norm needs both)")
            if base + ".weight" in out:
                raise NotAHift(f"{path}: {base}.weight is stored both plain and weight-normed")
            out[base + ".weight"] = torch._weight_norm(v.float(), g.float(), 0)
    return out


def _few(items: list, n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


@dataclass
class _HiftCache:
    mel: Tensor     # [1, 80, mel_cache_len]: the last mel frames, vocoded again in front of the next chunk
    source: Tensor  # [1, 1, source_cache_len]: their excitation, reused so the source does not jump
    speech: Tensor  # [1, source_cache_len]: the audio held back, cross-faded into the next chunk's start


class HiftStreamer:
    """One stream's HiFT half of CosyVoice2Model.token2wav: each `push` vocodes the new mel behind the previous
    chunk's last `mel_cache_len` frames, puts the cached excitation in front of the new one, cross-fades the first
    `source_cache_len` samples with the audio held back last time (a Hamming window, CosyVoice's fade_in_out), and,
    unless `finalize`, holds back the last `source_cache_len` samples for the next call. So the audio returned is
    CosyVoice's, sample for sample, given the same mel chunks and the same noise: `generator` is a torch.Generator,
    a seed, or None (the global RNG, as CosyVoice draws it)."""

    def __init__(self, hift: HiftGenerator, mel_cache_len: int = 8, source_cache_len: int | None = None,
                 generator: torch.Generator | int | None = None):
        self.hift = hift
        self.mel_cache_len = mel_cache_len
        self.source_cache_len = (mel_cache_len * hift.samples_per_frame if source_cache_len is None
                                 else source_cache_len)
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        self.generator = generator
        # np.hamming, as CosyVoice's speech_window: float64 weights, the fade computed in float64, stored float32
        self.window = torch.from_numpy(np.hamming(2 * self.source_cache_len))
        self.cache: _HiftCache | None = None
        self.finished = False

    def push(self, mel: Tensor, finalize: bool = False) -> Tensor:
        """mel [1, 80, T] (the new frames only) -> audio [1, samples]. After `finalize` the stream is done."""
        return HiftStreamer.push_many([self], [mel], [finalize])[0]

    @staticmethod
    def push_many(streamers: list["HiftStreamer"], mels: list[Tensor], finalize: list[bool]) -> list[Tensor]:
        """`push` for several streams of one vocoder: those whose vocoded windows have the same length (and the same
        cached excitation length) go through HiFT as one batch, each with its own noise; the audio of each equals
        its `push` alone up to a batched convolution's summation order (F0 rounding moves the accumulated phase:
        under 1e-4 in the tests)."""
        if not (len(streamers) == len(mels) == len(finalize)):
            raise ValueError("push_many takes one mel and one finalize flag per streamer")
        hift = streamers[0].hift if streamers else None
        windows, groups = [], {}
        for i, (st, mel) in enumerate(zip(streamers, mels)):
            if st.hift is not hift:
                raise ValueError("push_many batches streams of one HiftGenerator")
            if st.finished:
                raise RuntimeError("this HiFT stream was finalized")
            if mel.dim() != 3 or mel.shape[0] != 1 or mel.shape[1] != hift.cfg.in_channels:
                raise ValueError(f"push takes a mel [1, {hift.cfg.in_channels}, T], got {tuple(mel.shape)}")
            full = mel if st.cache is None else torch.cat([st.cache.mel, mel], dim=2)
            cached = 0 if st.cache is None else st.cache.source.shape[2]
            windows.append(full)
            groups.setdefault((full.shape[2], cached), []).append(i)
        out: list[Tensor | None] = [None] * len(streamers)
        for (_, cached), idx in groups.items():
            mel = torch.cat([windows[i] for i in idx])
            cache_source = torch.cat([streamers[i].cache.source for i in idx]) if cached else None
            gens = [streamers[i].generator for i in idx]
            if len(idx) == 1 or all(g is None for g in gens):
                gens = gens[0] if len(idx) == 1 else None
            speech, source = hift.inference(mel, cache_source, gens)
            for row, i in enumerate(idx):
                out[i] = streamers[i]._after(windows[i], speech[row:row + 1], source[row:row + 1], finalize[i])
        return out

    def _after(self, mel: Tensor, speech: Tensor, source: Tensor, finalize: bool) -> Tensor:
        if self.cache is not None:
            speech = self._fade(speech, self.cache.speech)
        if finalize:
            self.cache, self.finished = None, True
            return speech
        n = self.source_cache_len
        self.cache = _HiftCache(mel[:, :, -self.mel_cache_len:], source[:, :, -n:], speech[:, -n:])
        return speech[:, :-n]

    def _fade(self, fade_in: Tensor, fade_out: Tensor) -> Tensor:
        n = self.window.shape[0] // 2
        head = (fade_in[..., :n].double() * self.window[:n].to(fade_in.device)
                + fade_out[..., -n:].double() * self.window[n:].to(fade_in.device))
        return torch.cat([head.to(fade_in.dtype), fade_in[..., n:]], dim=-1)
