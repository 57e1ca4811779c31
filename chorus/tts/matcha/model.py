"""Matcha-TTS (Mehta et al. 2024) as plain PyTorch modules, with Matcha's module and parameter names.

The state dict of a Matcha `.ckpt` (`MatchaTTS` from matcha/models/matcha_tts.py) loads into `MatchaTTS` here with
`strict=True`. What runs:

* **text encoder** (`TextEncoder`, glow-tts with rotary positions): embedding x sqrt(channels), ConvReluNorm prenet,
  transformer layers (1x1-conv attention with RoPE on half of each head's channels, -1e4 masking, channel
  LayerNorm eps 1e-4), `proj_m` (the mean mel mu_x) and the duration predictor `proj_w` (log durations);
* **length regulation** (`MatchaTTS.encode`): durations ceil(exp(logw)) x length_scale, glow-tts' monotonic path,
  mu_y = path^T mu_x; the frame count is padded to a multiple of 4 for the U-Net (`fix_len`);
* **flow-matching decoder** (`Decoder`, Matcha's 1D U-Net): sinusoidal time embedding + MLP, down / mid / up blocks
  of a ResNet block (Conv-GroupNorm-Mish) and transformer blocks (diffusers' BasicTransformerBlock: LayerNorm,
  self-attention, LayerNorm, feed-forward with SnakeBeta), one stride-2 downsampling, a transposed-conv upsampling;
* **Euler ODE** from noise x temperature at t=0 to t=1 in n_timesteps steps (`euler`, Matcha's `solve_euler`
  step for step), then denormalisation mel = x * mel_std + mel_mean.

Two quirks of the reference are kept because the weights were trained with them:

* the decoder's transformer blocks hand their 0/1 frame mask to diffusers' attention, which *adds* it to the
  scores: real frames get +1, padded frames +0, so padded frames are attended to;
* GroupNorm statistics run over all of an utterance's frames, padded ones included.

Both depend on how much padding there is, so a batch would not equal its items alone. Here every item of a batch
sees exactly what it sees alone: its GroupNorm statistics and its attention keys stop at its own padded length
(`fix_len` of its frame count), and frames past that are given -inf in attention (law 2: batched equals alone).
With one item, the computation is the reference's, op for op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------------------- helpers

def sequence_mask(lengths: Tensor, max_length: int | None = None) -> Tensor:
    if max_length is None:
        max_length = int(lengths.max())
    x = torch.arange(max_length, dtype=lengths.dtype, device=lengths.device)
    return x.unsqueeze(0) < lengths.unsqueeze(1)


def fix_len(length: int, downsamplings: int = 2) -> int:
    """Matcha's fix_len_compatibility: the frame count padded to a multiple of 2**downsamplings."""
    factor = 2 ** downsamplings
    return int(math.ceil(length / factor) * factor)


def generate_path(duration: Tensor, mask: Tensor) -> Tensor:
    """glow-tts' monotonic alignment from (fractional) durations [b, t_x] and mask [b, t_x, t_y]."""
    b, t_x, t_y = mask.shape
    cum = torch.cumsum(duration, 1)
    path = sequence_mask(cum.view(b * t_x), t_y).to(mask.dtype).view(b, t_x, t_y)
    path = path - F.pad(path, [0, 0, 1, 0, 0, 0])[:, :-1]
    return path * mask


# ------------------------------------------------------------------------------------------------ text encoder

class LayerNorm(nn.Module):
    """Normalisation over channels (dim 1), glow-tts style."""

    def __init__(self, channels: int, eps: float = 1e-4):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mean = torch.mean(x, 1, keepdim=True)
        variance = torch.mean((x - mean) ** 2, 1, keepdim=True)
        x = (x - mean) * torch.rsqrt(variance + self.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.gamma.view(*shape) + self.beta.view(*shape)


class ConvReluNorm(nn.Module):
    def __init__(self, channels: int, kernel_size: int = 5, n_layers: int = 3):
        super().__init__()
        self.conv_layers = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2) for _ in range(n_layers))
        self.norm_layers = nn.ModuleList(LayerNorm(channels) for _ in range(n_layers))
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        x_org = x
        for conv, norm in zip(self.conv_layers, self.norm_layers):
            x = torch.relu(norm(conv(x * x_mask)))
        return (x_org + self.proj(x)) * x_mask


class DurationPredictor(nn.Module):
    def __init__(self, in_channels: int, filter_channels: int, kernel_size: int):
        super().__init__()
        self.conv_1 = nn.Conv1d(in_channels, filter_channels, kernel_size, padding=kernel_size // 2)
        self.norm_1 = LayerNorm(filter_channels)
        self.conv_2 = nn.Conv1d(filter_channels, filter_channels, kernel_size, padding=kernel_size // 2)
        self.norm_2 = LayerNorm(filter_channels)
        self.proj = nn.Conv1d(filter_channels, 1, 1)

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        x = self.norm_1(torch.relu(self.conv_1(x * x_mask)))
        x = self.norm_2(torch.relu(self.conv_2(x * x_mask)))
        return self.proj(x * x_mask) * x_mask


def rope(x: Tensor, d: int, base: int = 10_000) -> Tensor:
    """Rotary positions on the first d channels of x [b, h, t, c] (labml's module, as Matcha uses it)."""
    t = x.shape[2]
    theta = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device).float() / d))
    idx = torch.einsum("n,d->nd", torch.arange(t, device=x.device).float(), theta)
    idx = torch.cat([idx, idx], dim=1)
    cos, sin = idx.cos(), idx.sin()  # [t, d]
    x_rope, x_pass = x[..., :d], x[..., d:]
    neg_half = torch.cat([-x_rope[..., d // 2:], x_rope[..., :d // 2]], dim=-1)
    return torch.cat([x_rope * cos + neg_half * sin, x_pass], dim=-1)


class MultiHeadAttention(nn.Module):
    def __init__(self, channels: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.k_channels = channels // n_heads
        self.rope_dim = int(self.k_channels * 0.5)
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        b, d, t = x.shape
        q, k, v = (conv(x).view(b, self.n_heads, self.k_channels, t).transpose(2, 3)
                   for conv in (self.conv_q, self.conv_k, self.conv_v))
        q, k = rope(q, self.rope_dim), rope(k, self.rope_dim)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.k_channels)
        scores = scores.masked_fill(attn_mask == 0, -1e4)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.conv_o(out.transpose(2, 3).contiguous().view(b, d, t))


class FFN(nn.Module):
    def __init__(self, channels: int, filter_channels: int, kernel_size: int):
        super().__init__()
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel_size, padding=kernel_size // 2)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        x = torch.relu(self.conv_1(x * x_mask))
        return self.conv_2(x * x_mask) * x_mask


class Encoder(nn.Module):
    def __init__(self, channels: int, filter_channels: int, n_heads: int, n_layers: int, kernel_size: int):
        super().__init__()
        self.attn_layers = nn.ModuleList(MultiHeadAttention(channels, n_heads) for _ in range(n_layers))
        self.norm_layers_1 = nn.ModuleList(LayerNorm(channels) for _ in range(n_layers))
        self.ffn_layers = nn.ModuleList(FFN(channels, filter_channels, kernel_size) for _ in range(n_layers))
        self.norm_layers_2 = nn.ModuleList(LayerNorm(channels) for _ in range(n_layers))

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        attn_mask = x_mask.unsqueeze(2) * x_mask.unsqueeze(-1)
        for attn, norm1, ffn, norm2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers,
                                           self.norm_layers_2):
            x = x * x_mask
            x = norm1(x + attn(x, attn_mask))
            x = norm2(x + ffn(x, x_mask))
        return x * x_mask


class TextEncoder(nn.Module):
    def __init__(self, cfg: "MatchaConfig"):
        super().__init__()
        ch = cfg.n_channels
        self.n_channels = ch
        self.n_spks = cfg.n_spks
        extra = cfg.spk_emb_dim if cfg.n_spks > 1 else 0
        self.emb = nn.Embedding(cfg.n_vocab, ch)
        self.prenet = ConvReluNorm(ch) if cfg.prenet else None
        self.encoder = Encoder(ch + extra, cfg.filter_channels, cfg.n_heads, cfg.n_layers, cfg.kernel_size)
        self.proj_m = nn.Conv1d(ch + extra, cfg.n_feats, 1)
        self.proj_w = DurationPredictor(ch + extra, cfg.filter_channels_dp, cfg.dp_kernel_size)

    def forward(self, x: Tensor, x_lengths: Tensor, spks: Tensor | None = None):
        x = self.emb(x) * math.sqrt(self.n_channels)
        x = x.transpose(1, -1)
        x_mask = sequence_mask(x_lengths, x.size(2)).unsqueeze(1).to(x.dtype)
        if self.prenet is not None:
            x = self.prenet(x, x_mask)
        if self.n_spks > 1:
            x = torch.cat([x, spks.unsqueeze(-1).repeat(1, 1, x.shape[-1])], dim=1)
        x = self.encoder(x, x_mask)
        mu = self.proj_m(x) * x_mask
        logw = self.proj_w(x, x_mask)
        return mu, logw, x_mask


# ------------------------------------------------------------------------------------------------ the decoder

@dataclass
class Frames:
    """Per-item frame layout at one U-Net resolution: the 0/1 mask and each item's padded length alone."""
    mask: Tensor  # [b, 1, t]
    alone: list[int]  # each item's frame count when it runs alone (its fix_len, halved per downsampling)
    bias: Tensor | None = field(default=None)  # [b, 1, 1, t] additive attention bias

    @property
    def exact(self) -> bool:  # every item spans the whole tensor: the reference's ops apply as they are
        return all(n == self.mask.shape[-1] for n in self.alone)

    def attention_bias(self) -> Tensor:
        if self.bias is None:
            bias = self.mask.unsqueeze(1).clone()  # diffusers adds the 0/1 mask to the scores
            if not self.exact:
                t = torch.arange(self.mask.shape[-1], device=bias.device)
                beyond = t.unsqueeze(0) >= torch.tensor(self.alone, device=bias.device).unsqueeze(1)
                bias = bias.masked_fill(beyond[:, None, None, :], float("-inf"))
            self.bias = bias
        return self.bias

    def halve(self) -> "Frames":
        return Frames(self.mask[:, :, ::2], [(n + 1) // 2 for n in self.alone])


def group_norm(norm: nn.GroupNorm, x: Tensor, frames: Frames) -> Tensor:
    """GroupNorm whose statistics cover each item's own frames (all of them when the item is alone)."""
    if frames.exact:
        return norm(x)
    b, c, t = x.shape
    g = norm.num_groups
    valid = (torch.arange(t, device=x.device).unsqueeze(0)
             < torch.tensor(frames.alone, device=x.device).unsqueeze(1)).to(x.dtype)  # [b, t]
    xg = x.view(b, g, c // g, t)
    m = valid[:, None, None, :]
    count = m.sum(-1, keepdim=True) * (c // g)
    mean = (xg * m).sum((-1, -2), keepdim=True) / count
    var = (((xg - mean) * m) ** 2).sum((-1, -2), keepdim=True) / count
    xg = (xg - mean) / torch.sqrt(var + norm.eps)
    return xg.view(b, c, t) * norm.weight.view(1, -1, 1) + norm.bias.view(1, -1, 1)


class Block1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish())

    def forward(self, x: Tensor, frames: Frames) -> Tensor:
        conv, norm, act = self.block
        return act(group_norm(norm, conv(x * frames.mask), frames)) * frames.mask


class ResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block1D(dim, dim_out)
        self.block2 = Block1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, frames: Frames, time_emb: Tensor) -> Tensor:
        h = self.block1(x, frames)
        h = h + self.mlp(time_emb).unsqueeze(-1)
        h = self.block2(h, frames)
        return h + self.res_conv(x * frames.mask)


class Downsample1D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def sinusoidal_embedding(t: Tensor, dim: int, scale: float = 1000) -> Tensor:
    if t.dim() < 1:
        t = t.unsqueeze(0)
    half = dim // 2
    emb = math.log(10000) / (half - 1)
    emb = torch.exp(torch.arange(half, device=t.device).float() * -emb)
    emb = scale * t.unsqueeze(1) * emb.unsqueeze(0)
    return torch.cat((emb.sin(), emb.cos()), dim=-1)


class Projection(nn.Module):
    """diffusers' feed-forward input projections: GELU / GEGLU / ApproximateGELU (each a `proj` Linear)."""

    def __init__(self, dim: int, inner: int, kind: str):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(dim, inner * 2 if kind == "geglu" else inner)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        if self.kind == "gelu":
            return F.gelu(x)
        if self.kind == "gelu-approximate":
            return F.gelu(x, approximate="tanh")
        if self.kind == "geglu":
            h, gate = x.chunk(2, dim=-1)
            return h * F.gelu(gate)
        return x * torch.sigmoid(1.702 * x)  # geglu-approximate: diffusers' ApproximateGELU


class SnakeBeta(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)
        self.alpha = nn.Parameter(torch.zeros(inner))  # log scale, as Matcha trains them
        self.beta = nn.Parameter(torch.zeros(inner))

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        alpha, beta = torch.exp(self.alpha), torch.exp(self.beta)
        return x + (1.0 / (beta + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


ACTIVATIONS = ("snakebeta", "gelu", "gelu-approximate", "geglu", "geglu-approximate")


class FeedForward(nn.Module):
    def __init__(self, dim: int, act_fn: str, mult: int = 4):
        super().__init__()
        inner = dim * mult
        act = SnakeBeta(dim, inner) if act_fn == "snakebeta" else Projection(dim, inner, act_fn)
        self.net = nn.ModuleList([act, nn.Identity(), nn.Linear(inner, dim)])  # [1] is a Dropout in Matcha

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class Attention(nn.Module):
    """diffusers' Attention as BasicTransformerBlock builds it (no q/k/v bias, to_out = Linear + Dropout)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, self.heads, -1).transpose(1, 2) for lin in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class BasicTransformerBlock(nn.Module):
    attention = Attention  # a subclass may bring its own (CosyVoice's adds a cached path)

    def __init__(self, dim: int, heads: int, dim_head: int, act_fn: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = self.attention(dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, act_fn)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x), bias) + x
        return self.ff(self.norm3(x)) + x


class Decoder(nn.Module):
    """Matcha's U-Net estimator of the flow's velocity (components/decoder.py, transformer blocks)."""

    def __init__(self, in_channels: int, out_channels: int, channels=(256, 256), attention_head_dim: int = 64,
                 n_blocks: int = 1, num_mid_blocks: int = 2, num_heads: int = 4, act_fn: str = "snake"):
        super().__init__()
        channels = tuple(channels)
        self.in_channels = in_channels
        time_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(in_channels, time_dim)

        def blocks(dim):
            return nn.ModuleList(BasicTransformerBlock(dim, num_heads, attention_head_dim, act_fn)
                                 for _ in range(n_blocks))

        self.down_blocks = nn.ModuleList()
        out_ch = in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            last = i == len(channels) - 1
            down = nn.Conv1d(out_ch, out_ch, 3, padding=1) if last else Downsample1D(out_ch)
            self.down_blocks.append(nn.ModuleList([ResnetBlock1D(in_ch, out_ch, time_dim), blocks(out_ch), down]))
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock1D(channels[-1], out_ch, time_dim), blocks(out_ch)])
            for _ in range(num_mid_blocks))
        up = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(up) - 1):
            last = i == len(up) - 2
            upsample = nn.Conv1d(up[i + 1], up[i + 1], 3, padding=1) if last else Upsample1D(up[i + 1])
            self.up_blocks.append(nn.ModuleList([ResnetBlock1D(2 * up[i], up[i + 1], time_dim), blocks(up[i + 1]),
                                                 upsample]))
        self.final_block = Block1D(up[-1], up[-1])
        self.final_proj = nn.Conv1d(up[-1], out_channels, 1)

    @staticmethod
    def _transformers(blocks: nn.ModuleList, x: Tensor, frames: Frames) -> Tensor:
        x = x.transpose(1, 2)
        for block in blocks:
            x = block(x, frames.attention_bias())
        return x.transpose(1, 2)

    def forward(self, x: Tensor, frames: Frames, mu: Tensor, t: Tensor, spks: Tensor | None = None) -> Tensor:
        t = self.time_mlp(sinusoidal_embedding(t, self.in_channels))
        x = torch.cat([x, mu], dim=1)
        if spks is not None:
            x = torch.cat([x, spks.unsqueeze(-1).expand(-1, -1, x.shape[-1])], dim=1)
        hiddens, levels = [], [frames]
        for resnet, blocks, down in self.down_blocks:
            f = levels[-1]
            x = self._transformers(blocks, resnet(x, f, t), f)
            hiddens.append(x)
            x = down(x * f.mask)
            levels.append(f.halve())
        levels = levels[:-1]
        f = levels[-1]
        for resnet, blocks in self.mid_blocks:
            x = self._transformers(blocks, resnet(x, f, t), f)
        for resnet, blocks, upsample in self.up_blocks:
            f = levels.pop()
            x = resnet(torch.cat([x, hiddens.pop()], dim=1), f, t)
            x = upsample(self._transformers(blocks, x, f) * f.mask)
        x = self.final_block(x, f)
        return self.final_proj(x * f.mask) * frames.mask


def euler(velocity, x: Tensor, n_timesteps: int) -> Tensor:
    """Matcha's solve_euler: fixed steps over torch.linspace(0, 1, n + 1), t and dt carried as Matcha does."""
    t_span = torch.linspace(0, 1, n_timesteps + 1, device=x.device)
    t, dt = t_span[0], t_span[1] - t_span[0]
    for step in range(1, len(t_span)):
        x = x + dt * velocity(x, t)
        t = t + dt
        if step < len(t_span) - 1:
            dt = t_span[step + 1] - t
    return x


# ------------------------------------------------------------------------------------------------ the model

@dataclass
class MatchaConfig:
    """What a Matcha checkpoint's hyper-parameters say about the network (configs/model/*.yaml)."""
    n_vocab: int = 178
    n_feats: int = 80
    n_spks: int = 1
    spk_emb_dim: int = 64
    # encoder (encoder.encoder_params / duration_predictor_params)
    n_channels: int = 192
    filter_channels: int = 768
    filter_channels_dp: int = 256
    n_heads: int = 2
    n_layers: int = 6
    kernel_size: int = 3
    dp_kernel_size: int = 3
    prenet: bool = True
    # decoder
    channels: tuple = (256, 256)
    attention_head_dim: int = 64
    n_blocks: int = 1
    num_mid_blocks: int = 2
    num_heads: int = 2
    act_fn: str = "snakebeta"
    # data statistics
    mel_mean: float = 0.0
    mel_std: float = 1.0
    # not needed to synthesise, kept for describe()
    sigma_min: float = 1e-4
    out_size: int | None = None
    sample_rate: int = 22050
    hop_length: int = 256


class CFM(nn.Module):
    def __init__(self, cfg: MatchaConfig):
        super().__init__()
        in_ch = 2 * cfg.n_feats + (cfg.spk_emb_dim if cfg.n_spks > 1 else 0)
        self.estimator = Decoder(in_ch, cfg.n_feats, cfg.channels, cfg.attention_head_dim, cfg.n_blocks,
                                 cfg.num_mid_blocks, cfg.num_heads, cfg.act_fn)


@dataclass
class Encoded:
    mu_y: Tensor  # [b, n_feats, t] (t = fix_len of the longest)
    mask: Tensor  # [b, 1, t]
    lengths: Tensor  # [b] frame counts
    durations: Tensor  # [b, t_x] frames per input symbol (w_ceil, x length_scale)
    spks: Tensor | None  # [b, spk_emb_dim] speaker embeddings


class MatchaTTS(nn.Module):
    def __init__(self, cfg: MatchaConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.n_spks > 1:
            self.spk_emb = nn.Embedding(cfg.n_spks, cfg.spk_emb_dim)
        self.encoder = TextEncoder(cfg)
        self.decoder = CFM(cfg)
        self.register_buffer("mel_mean", torch.tensor(float(cfg.mel_mean)))
        self.register_buffer("mel_std", torch.tensor(float(cfg.mel_std)))

    @torch.inference_mode()
    def encode(self, x: Tensor, x_lengths: Tensor, spks: Tensor | None = None, length_scale: float = 1.0) -> Encoded:
        """Text ids [b, t_x] to the aligned encoder output mu_y (Matcha's synthesise up to the decoder)."""
        if self.cfg.n_spks > 1:
            if spks is None:
                raise ValueError("this Matcha model has several speakers: pass speaker ids")
            spks = self.spk_emb(spks.long())
        else:
            spks = None
        mu_x, logw, x_mask = self.encoder(x, x_lengths, spks)
        w = torch.exp(logw) * x_mask
        w_ceil = torch.ceil(w) * length_scale
        y_lengths = torch.clamp_min(torch.sum(w_ceil, [1, 2]), 1).long()
        t_y = fix_len(int(y_lengths.max()))
        y_mask = sequence_mask(y_lengths, t_y).unsqueeze(1).to(x_mask.dtype)
        attn_mask = x_mask.unsqueeze(-1) * y_mask.unsqueeze(2)
        attn = generate_path(w_ceil.squeeze(1), attn_mask.squeeze(1))
        mu_y = torch.matmul(attn.transpose(1, 2), mu_x.transpose(1, 2)).transpose(1, 2)
        return Encoded(mu_y, y_mask, y_lengths, w_ceil.squeeze(1), spks)

    @torch.inference_mode()
    def decode(self, enc: Encoded, noise: Tensor | list[Tensor] | None = None, n_timesteps: int = 10,
               temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """The flow from noise x temperature to the normalised mel [b, n_feats, t] (t as enc.mu_y).

        noise: standard normal noise, one [n_feats, >= length] tensor per item (or a [b, n_feats, >= length]
        tensor); only each item's first `length` frames matter. None draws it with torch.randn (generator)."""
        b, n_feats, t = enc.mu_y.shape
        z = torch.zeros_like(enc.mu_y)
        for i in range(b):
            n = int(enc.lengths[i])
            if noise is None:
                z[i, :, :n] = torch.randn(n_feats, n, generator=generator, device=z.device, dtype=z.dtype)
                continue
            item = noise[i]
            if item.shape[0] != n_feats or item.shape[-1] < n:
                raise ValueError(f"noise for item {i} must be [{n_feats}, >= {n}], got {list(item.shape)}")
            z[i, :, :n] = item[:, :n].to(z)
        z = z * temperature
        frames = Frames(enc.mask, [fix_len(int(n)) for n in enc.lengths])
        estimator = self.decoder.estimator
        return euler(lambda x, tt: estimator(x, frames, enc.mu_y, tt, enc.spks), z, n_timesteps)

    def denormalize(self, mel: Tensor) -> Tensor:
        return mel * self.mel_std + self.mel_mean

    @torch.inference_mode()
    def synthesise(self, x: Tensor, x_lengths: Tensor, n_timesteps: int = 10, temperature: float = 1.0,
                   spks: Tensor | None = None, length_scale: float = 1.0, noise=None,
                   generator: torch.Generator | None = None) -> dict:
        """Matcha's synthesise: ids [b, t_x] to {"mel" [b, n_feats, max length] denormalised, "mel_lengths",
        "decoder_outputs" (normalised), "encoder_outputs" (mu_y), "durations"}. Each item equals itself alone."""
        enc = self.encode(x, x_lengths, spks, length_scale)
        out = self.decode(enc, noise, n_timesteps, temperature, generator)
        t = int(enc.lengths.max())
        out = out[:, :, :t]
        return {"encoder_outputs": enc.mu_y[:, :, :t], "decoder_outputs": out, "mel": self.denormalize(out),
                "mel_lengths": enc.lengths, "durations": enc.durations}
