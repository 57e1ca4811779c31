"""FunASR's streaming Paraformer: SANM encoder, CIF predictor, SANM decoder.

Module and parameter names follow FunASR (`SANMEncoderChunkOpt`, `CifPredictorV2`,
`ParaformerSANMDecoder`) so that a FunASR `model.pt` loads with strict key checking.  The
maths is FunASR's `forward_chunk` path, written for a batch of streams whose chunks may
differ in length: every layer takes a validity mask, and the per-stream caches are fixed-size,
right-aligned buffers with a length (streaming.py keeps them in a SlotPool).  At inference on CPU the
products go through packed weights and chorus' few-row kernels (asr/packed_linear.py) and the FSMN
blocks through channels-last multiply-adds (asr/depthwise.py), as the FastConformer's do.

Shapes are batch-first: features `[B, T, 560]`, hidden `[B, T, d]`, attention `[B, h, T, d_k]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..depthwise import depthwise_channels_last
from ..packed_linear import linear


class ModelConfigError(ValueError):
    """The directory describes a model this family cannot run as FunASR streams it."""


@dataclass(frozen=True)
class ParaformerConfig:
    vocab_size: int
    input_size: int = 560            # n_mels * lfr_m
    d_model: int = 512               # encoder_conf.output_size (decoder and predictor use it too)
    enc_heads: int = 4
    enc_units: int = 2048
    enc_blocks: int = 50
    enc_kernel: int = 11
    enc_sanm_shfit: int = 0
    dec_heads: int = 4
    dec_units: int = 2048
    dec_blocks: int = 16
    dec_kernel: int = 11
    dec_sanm_shfit: int = 5
    cif_l_order: int = 1
    cif_r_order: int = 1
    cif_threshold: float = 1.0
    cif_smooth_factor: float = 1.0
    cif_noise_threshold: float = 0.0
    tail_threshold: float = 0.45
    sos: int = 1
    eos: int = 2
    blank_id: int = 0
    ctc: bool = False                # ctc_weight > 0: FunASR builds a CTC head (unused by greedy streaming)
    share_embedding: bool = False    # FunASR then drops decoder.embed


class LayerNorm(nn.LayerNorm):
    """FunASR's LayerNorm: eps 1e-12 (not torch's 1e-5)."""

    def __init__(self, n: int):
        super().__init__(n, eps=1e-12)


def _fsmn_pads(kernel: int, shfit: int) -> tuple[int, int]:
    left = (kernel - 1) // 2 + (shfit if shfit > 0 else 0)
    return left, kernel - 1 - left


def masked_softmax_attend(q, k, v, key_valid):
    """softmax(q k^T) v over the valid keys; FunASR fills masked scores with -inf then zeroes them.

    q is already scaled by d_k^-0.5 (FunASR scales q, not the scores).  key_valid: [B, 1|Tq, Tk].
    """
    scores = torch.matmul(q, k.transpose(-2, -1))
    masked = ~key_valid[:, None]
    attn = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1).masked_fill(masked, 0.0)
    return torch.matmul(attn, v)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.reshape(b, t, h, d // h).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, t, dk = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dk)


def tail_gather(buf: torch.Tensor, new: torch.Tensor, new_len: torch.Tensor, dim: int) -> torch.Tensor:
    """The last `buf.shape[dim]` entries of cat(buf, new[:new_len]) per stream (right-aligned buffers).

    buf's valid entries are right-aligned, so cat(buf, new) holds each stream's history
    contiguously up to position C + new_len[b]; one gather keeps the C entries that end there.
    """
    cap = buf.shape[dim]
    z = torch.cat([buf, new], dim=dim)
    idx = new_len[:, None] + torch.arange(cap, device=buf.device)[None, :]  # [B, C]
    shape = [1] * z.dim()
    shape[0], shape[dim] = idx.shape[0], cap
    idx = idx.view(shape).expand(*[z.shape[i] if i != dim else cap for i in range(z.dim())])
    return z.gather(dim, idx)


def right_valid(lengths: torch.Tensor, cap: int) -> torch.Tensor:
    """[B, cap] mask of the right-aligned valid entries of a buffer."""
    return torch.arange(cap, device=lengths.device)[None, :] >= (cap - lengths)[:, None]


def left_valid(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


# -- encoder ---------------------------------------------------------------------------------

class PositionwiseFeedForward(nn.Module):
    def __init__(self, d: int, units: int):
        super().__init__()
        self.w_1 = nn.Linear(d, units)
        self.w_2 = nn.Linear(units, d)

    def forward(self, x):
        return linear(self.w_2, torch.relu(linear(self.w_1, x)))


class MultiHeadedAttentionSANM(nn.Module):
    """Self-attention plus an FSMN memory block (a depthwise conv over the values)."""

    def __init__(self, n_head: int, in_feat: int, n_feat: int, kernel: int, shfit: int):
        super().__init__()
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q_k_v = nn.Linear(in_feat, n_feat * 3)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.fsmn_block = nn.Conv1d(n_feat, n_feat, kernel, groups=n_feat, bias=False)
        self.pads = _fsmn_pads(kernel, shfit)

    def qkv(self, x):
        q, k, v = linear(self.linear_q_k_v, x).split(self.h * self.d_k, dim=-1)
        return _heads(q, self.h), _heads(k, self.h), _heads(v, self.h), v

    def fsmn(self, v, valid):
        # FunASR runs the FSMN on the chunk alone, zero-padded: there is no FSMN cache in the
        # encoder (the 5-frame feature overlap between chunks gives it left context instead).
        v = v * valid[:, :, None].to(v.dtype)
        x = depthwise_channels_last(self.fsmn_block, F.pad(v, (0, 0, *self.pads)))
        return x + v

    def attend(self, q_h, k_h, v_h, key_valid):
        return linear(self.linear_out, _merge(masked_softmax_attend(q_h * self.d_k ** -0.5, k_h, v_h, key_valid)))


class EncoderLayerSANM(nn.Module):
    def __init__(self, in_size: int, size: int, cfg: ParaformerConfig):
        super().__init__()
        self.in_size, self.size = in_size, size
        self.self_attn = MultiHeadedAttentionSANM(cfg.enc_heads, in_size, size, cfg.enc_kernel, cfg.enc_sanm_shfit)
        self.feed_forward = PositionwiseFeedForward(size, cfg.enc_units)
        self.norm1 = LayerNorm(in_size)
        self.norm2 = LayerNorm(size)

    def forward(self, x, valid, attn_fn):
        """attn_fn(q_h, k_h, v_h) -> attention output; it owns the keys the chunk may see."""
        residual = x
        q_h, k_h, v_h, v = self.self_attn.qkv(self.norm1(x))
        att = attn_fn(q_h, k_h, v_h) + self.self_attn.fsmn(v, valid)
        # The first layer maps 560 -> d and so has no residual around its attention.
        x = residual + att if self.in_size == self.size else att
        return x + self.feed_forward(self.norm2(x)), k_h, v_h


def stream_positions(start: torch.Tensor, count: int, depth: int) -> torch.Tensor:
    """StreamSinusoidalPositionEncoder: positions start+1 .. start+count, computed as FunASR does.

    FunASR builds the table for 1..start+count and slices it; every entry is elementwise, so
    computing only the slice gives the same float32 values.  Returns [B, count, depth].
    """
    pos = (start[:, None] + torch.arange(1, count + 1, device=start.device)[None, :]).to(torch.float32)
    inc = torch.log(torch.tensor([10000.0])) / (depth / 2 - 1)
    inv = torch.exp(torch.arange(depth / 2).to(torch.float32) * -inc).to(start.device)
    scaled = pos[:, :, None] * inv[None, None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=2)


class SANMEncoderChunkOpt(nn.Module):
    def __init__(self, cfg: ParaformerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoders0 = nn.ModuleList([EncoderLayerSANM(cfg.input_size, cfg.d_model, cfg)])
        self.encoders = nn.ModuleList([EncoderLayerSANM(cfg.d_model, cfg.d_model, cfg)
                                       for _ in range(cfg.enc_blocks - 1)])
        self.after_norm = LayerNorm(cfg.d_model)

    @property
    def layers(self) -> list[EncoderLayerSANM]:
        return [*self.encoders0, *self.encoders]

    def embed(self, feats: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """xs *= sqrt(d_model) (the encoder width, not the 560 input width), then positions."""
        return feats * self.cfg.d_model ** 0.5 + stream_positions(start, feats.shape[1], feats.shape[2])

    def forward(self, x, valid, attn_fns):
        """x [B, T, 560] embedded, valid [B, T]; attn_fns[i](q_h, k_h, v_h) owns layer i's keys
        (the chunk's own, plus a look-back cache or a cross-chunk mask).  Returns the output
        [B, T, d] and each layer's chunk keys and values (for the caller's caches)."""
        ks, vs = [], []
        x = x.to(self.compute_dtype)
        for layer, attn_fn in zip(self.layers, attn_fns):
            x, k_h, v_h = layer(x, valid, attn_fn)
            ks.append(k_h)
            vs.append(v_h)
        return self.after_norm(x.to(self.after_norm.weight.dtype)), ks, vs

    @property
    def compute_dtype(self) -> torch.dtype:
        """The layers' dtype (precision.py): bf16, or fp32 (also for int8, whose products take fp32 in)."""
        return self.encoders0[0].norm1.weight.dtype


# -- predictor -------------------------------------------------------------------------------

class CifPredictorV2(nn.Module):
    def __init__(self, cfg: ParaformerConfig):
        super().__init__()
        self.cfg = cfg
        self.cif_conv1d = nn.Conv1d(cfg.d_model, cfg.d_model, cfg.cif_l_order + cfg.cif_r_order + 1)
        self.cif_output = nn.Linear(cfg.d_model, 1)

    def alphas(self, hidden, valid):
        """Per-frame weights; the conv sees the chunk alone, zero-padded (as FunASR's forward_chunk)."""
        h = hidden * valid[:, :, None].to(hidden.dtype)
        ctx = F.pad(h.transpose(1, 2), (self.cfg.cif_l_order, self.cfg.cif_r_order))
        out = torch.relu(self.cif_conv1d(ctx)).transpose(1, 2)
        a = torch.sigmoid(self.cif_output(out))
        a = torch.relu(a * self.cfg.cif_smooth_factor - self.cfg.cif_noise_threshold).squeeze(-1)
        return a * valid.to(a.dtype)


def cif_fire(hidden, alphas, integrate, frames, threshold, valid=None):
    """Continuous integrate-and-fire over time for a batch, FunASR's loop vectorised over streams.

    hidden [B, T, d], alphas [B, T]; integrate [B], frames [B, d] carried in; positions where
    valid [B, T] is False (batch padding) change nothing.  Each operation is
    the float32 operation FunASR's scalar loop does, so results are bitwise the same.
    Returns (embeds [B, N, d], counts [B], fire_t [B, N] frame index of each fire, integrate, frames).
    """
    b, t_len, d = hidden.shape
    fired, fire_mask = [], []
    for t in range(t_len):
        a, h = alphas[:, t], hidden[:, t]
        total = a + integrate
        fire = ~(total < threshold)
        if valid is not None:
            v = valid[:, t]
            fire = fire & v
            total = torch.where(v, total, integrate)
            a = a * v.to(a.dtype)
        emitted = frames + (threshold - integrate)[:, None] * h
        after = total - threshold
        frames = torch.where(fire[:, None], after[:, None] * h, frames + a[:, None] * h)
        integrate = torch.where(fire, after, total)
        fired.append(emitted)
        fire_mask.append(fire)
    if not fired:
        z = hidden.new_zeros(b, 0, d)
        return z, torch.zeros(b, dtype=torch.long, device=hidden.device), \
            torch.zeros(b, 0, dtype=torch.long, device=hidden.device), integrate, frames
    fired = torch.stack(fired, 1)             # [B, T, d]
    fire_mask = torch.stack(fire_mask, 1)     # [B, T]
    counts = fire_mask.sum(1)
    n = int(counts.max())
    # Compact the fired rows to the front, in time order.
    order = torch.sort((~fire_mask).to(torch.int8), dim=1, stable=True).indices[:, :n]
    embeds = fired.gather(1, order[:, :, None].expand(-1, -1, d))
    keep = left_valid(counts, n)
    embeds = embeds * keep[:, :, None].to(embeds.dtype)
    return embeds, counts, order, integrate, frames


# -- decoder ---------------------------------------------------------------------------------

class PositionwiseFeedForwardDecoderSANM(nn.Module):
    def __init__(self, d: int, units: int):
        super().__init__()
        self.w_1 = nn.Linear(d, units)
        self.w_2 = nn.Linear(units, d, bias=False)
        self.norm = LayerNorm(units)

    def forward(self, x):
        return linear(self.w_2, self.norm(torch.relu(linear(self.w_1, x))))


class MultiHeadedAttentionSANMDecoder(nn.Module):
    """The decoder's FSMN "self-attention": a causal depthwise conv over the token sequence."""

    def __init__(self, d: int, kernel: int, shfit: int):
        super().__init__()
        self.fsmn_block = nn.Conv1d(d, d, kernel, groups=d, bias=False)
        self.kernel = kernel


class MultiHeadedAttentionCrossAtt(nn.Module):
    def __init__(self, n_head: int, d: int):
        super().__init__()
        self.h, self.d_k = n_head, d // n_head
        self.linear_q = nn.Linear(d, d)
        self.linear_k_v = nn.Linear(d, d * 2)
        self.linear_out = nn.Linear(d, d)

    def kv(self, memory):
        k, v = linear(self.linear_k_v, memory).split(self.h * self.d_k, dim=-1)
        return _heads(k, self.h), _heads(v, self.h)


class DecoderLayerSANM(nn.Module):
    def __init__(self, cfg: ParaformerConfig, attn: bool):
        super().__init__()
        d = cfg.d_model
        self.feed_forward = PositionwiseFeedForwardDecoderSANM(d, cfg.dec_units)
        self.norm1 = LayerNorm(d)
        if attn:
            self.self_attn = MultiHeadedAttentionSANMDecoder(d, cfg.dec_kernel, cfg.dec_sanm_shfit)
            self.src_attn = MultiHeadedAttentionCrossAtt(cfg.dec_heads, d)
            self.norm2 = LayerNorm(d)
            self.norm3 = LayerNorm(d)


class ParaformerSANMDecoder(nn.Module):
    def __init__(self, cfg: ParaformerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if not cfg.share_embedding:
            # Only training's sampler reads the embedding; kept so FunASR's keys load.
            self.embed = nn.Sequential(nn.Embedding(cfg.vocab_size, d))
        self.decoders = nn.ModuleList([DecoderLayerSANM(cfg, True) for _ in range(cfg.dec_blocks)])
        self.decoders3 = nn.ModuleList([DecoderLayerSANM(cfg, False)])
        self.after_norm = LayerNorm(d)
        self.output_layer = nn.Linear(d, cfg.vocab_size)

    def forward(self, tgt, tgt_len, fsmn_cache, memory, key_valid, k_cache=None, v_cache=None):
        """FunASR ParaformerSANMDecoder.forward_chunk for a batch.

        tgt [B, N, d] acoustic embeddings (tgt_len valid); fsmn_cache [L, B, d, k-1] the last
        k-1 FSMN inputs of each layer (zeros for a fresh stream = FunASR's left padding, as the
        decoder FSMN has no right padding); memory [B, T, d]; k_cache/v_cache [L, B, h, C, d_k]
        cross-attention look-back put before the memory's keys; key_valid [B, 1|N, C+T].
        Returns (log-probs [B, N, V], new fsmn cache, per-layer memory keys, values).
        """
        dtype = self.decoders[0].norm1.weight.dtype   # bf16 or fp32 (precision.py)
        x, memory, fsmn_cache = tgt.to(dtype), memory.to(dtype), fsmn_cache.to(dtype)
        new_fsmn, mem_k, mem_v = [], [], []
        for i, layer in enumerate(self.decoders):
            residual = x
            t = layer.norm2(layer.feed_forward(layer.norm1(x)))
            z = torch.cat([fsmn_cache[i], t.transpose(1, 2)], dim=2)       # [B, d, k-1+N]
            new_fsmn.append(tail_gather(fsmn_cache[i], t.transpose(1, 2), tgt_len, dim=2))
            x = residual + (depthwise_channels_last(layer.self_attn.fsmn_block, z.transpose(1, 2)) + t)
            src = layer.src_attn
            q = _heads(linear(src.linear_q, layer.norm3(x)), src.h) * src.d_k ** -0.5
            k_h, v_h = src.kv(memory)
            mem_k.append(k_h)
            mem_v.append(v_h)
            if k_cache is not None:
                k_h, v_h = torch.cat([k_cache[i], k_h], dim=2), torch.cat([v_cache[i], v_h], dim=2)
            x = x + linear(src.linear_out, _merge(masked_softmax_attend(q, k_h, v_h, key_valid)))
        for layer in self.decoders3:
            x = layer.feed_forward(layer.norm1(x))   # no residual: FunASR's last layer has no attention
        logp = torch.log_softmax(linear(self.output_layer, self.after_norm(x.to(self.after_norm.weight.dtype))), dim=-1)
        return logp, torch.stack(new_fsmn), mem_k, mem_v


class CTC(nn.Module):
    """FunASR builds it when ctc_weight > 0; greedy streaming never reads it."""

    def __init__(self, cfg: ParaformerConfig):
        super().__init__()
        self.ctc_lo = nn.Linear(cfg.d_model, cfg.vocab_size)


class ParaformerStreamingModel(nn.Module):
    """The weights of a FunASR ParaformerStreaming model, under FunASR's state_dict names."""

    def __init__(self, cfg: ParaformerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = SANMEncoderChunkOpt(cfg)
        self.predictor = CifPredictorV2(cfg)
        self.decoder = ParaformerSANMDecoder(cfg)
        if cfg.ctc:
            self.ctc = CTC(cfg)
