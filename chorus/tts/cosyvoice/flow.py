"""CosyVoice 2's flow (`CausalMaskedDiffWithXvec`): speech tokens to mel, in plain PyTorch.

Module and parameter names are CosyVoice's, so `flow.pt` loads with `strict=True` (`checkpoint.py`).  Two paths
over the same weights:

* the **reference path** (`CosyVoiceFlow.inference`, each module's `forward`): CosyVoice's own computation over a
  whole sequence, masks built as CosyVoice builds them (`subsequent_chunk_mask` when streaming, full attention
  otherwise; espnet's `rel_shift`), used for CosyVoice's recompute schedule (`reference.py`), the non-streaming
  output and the exact final chunk;
* the **cached path** (each module's `stream`): only a chunk's new positions, with the attention K/V of the
  positions before it read in place from the stream's slot (`kv.py`: contiguous per slot, no mask) and the causal
  convolutions' left context from the stream's slot (`streaming.py` drives it).

Everything is chunk-causal in streaming mode (the pre-lookahead convolution sees the next `pre_lookahead_len`
tokens, which CosyVoice hands it as `context`), so a chunk's outputs depend only on what came before it and its
own lookahead: the cached path gives the reference path's streamed chunks.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..matcha.model import Attention as MatchaAttention
from ..matcha.model import BasicTransformerBlock as MatchaBlock
from ..matcha.model import TimestepEmbedding, sinusoidal_embedding
from .config import EncoderConfig, EstimatorConfig, FlowConfig
from .kv import LayerKV, rel_shift_view, scale_of


def chunk_mask(size: int, chunk: int, device=None, left: int | None = None) -> Tensor:
    """CosyVoice's `subsequent_chunk_mask`: position i sees every position before the end of its chunk; with `left`
    (wenet's `num_left_chunks`, which CosyVoice's own version ignores) none before chunk i // chunk - left."""
    pos = torch.arange(size, device=device)
    mask = pos.unsqueeze(0) < ((pos // chunk + 1) * chunk).unsqueeze(1)
    if left is not None:
        mask &= pos.unsqueeze(0) >= ((pos // chunk - left).clamp(min=0) * chunk).unsqueeze(1)
    return mask


def rel_pos_table(n: int, d: int) -> Tensor:
    """espnet's relative positional encoding, rows for relative positions n-1 ... -(n-1) (`[2n-1, d]`),
    computed as EspnetRelPositionalEncoding.extend_pe computes it (a row does not depend on n)."""
    position = torch.arange(0, n, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    pos = torch.zeros(n, d)
    neg = torch.zeros(n, d)
    pos[:, 0::2] = torch.sin(position * div_term)
    pos[:, 1::2] = torch.cos(position * div_term)
    neg[:, 0::2] = torch.sin(-1 * position * div_term)
    neg[:, 1::2] = torch.cos(-1 * position * div_term)
    return torch.cat([torch.flip(pos, [0]), neg[1:]], dim=0)


# -- the encoder ----------------------------------------------------------------------------------------------

class LinearEmbed(nn.Module):
    """LinearNoSubsampling + EspnetRelPositionalEncoding's scaling (`out` = Linear, LayerNorm, Dropout)."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Identity())
        self.xscale = math.sqrt(odim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x) * self.xscale


class RelPositionAttention(nn.Module):
    """RelPositionMultiHeadedAttention (Transformer-XL style biases u and v, espnet's rel_shift)."""

    def __init__(self, heads: int, dim: int):
        super().__init__()
        self.h, self.d_k = heads, dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))
        self._pos: Tensor | None = None  # linear_pos of the relative table, grown on demand
        self._pos_key: tuple = ()      # the weight's version it was computed from

    def _heads(self, lin: nn.Linear, x: Tensor) -> Tensor:
        return lin(x).view(x.shape[0], x.shape[1], self.h, self.d_k)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bd: Tensor, mask: Tensor) -> Tensor:
        # q [B, H, Tq, dk], k/v [B, H, Tk, dk], bd [B, H, Tq, Tk], mask [B, Tq, Tk]
        ac = torch.matmul(q + self.pos_bias_u[None, :, None], k.transpose(-2, -1))
        scores = (ac + bd) / math.sqrt(self.d_k)
        m = ~mask.unsqueeze(1)
        attn = torch.softmax(scores.masked_fill(m, -float("inf")), dim=-1).masked_fill(m, 0.0)
        x = torch.matmul(attn, v).transpose(1, 2).reshape(q.shape[0], q.shape[2], self.h * self.d_k)
        return self.linear_out(x)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Reference: the whole sequence `[B, T, D]` with a `[B or 1, T, T]` mask, as CosyVoice computes it."""
        t = x.shape[1]
        q, k, v = (self._heads(lin, x).transpose(1, 2) for lin in (self.linear_q, self.linear_k, self.linear_v))
        pos_emb = rel_pos_table(t, x.shape[2]).to(x)[None]
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)
        bd = torch.matmul(q + self.pos_bias_v[None, :, None], p.transpose(-2, -1))
        bd = self._rel_shift(bd)
        return self._attend(q, k, v, bd, mask.expand(x.shape[0], t, t))

    @staticmethod
    def _rel_shift(x: Tensor) -> Tensor:
        b, h, t1, t2 = x.shape
        padded = torch.cat([x.new_zeros(b, h, t1, 1), x], dim=-1).view(b, h, t2 + 1, t1)
        return padded[:, :, 1:].reshape(b, h, t1, t2)[:, :, :, : t2 // 2 + 1]

    def _pos_proj(self, top: int, bottom: int) -> Tensor:
        """linear_pos of the table's rows for relative positions top ... bottom (descending), `[top-bottom+1, H, dk]`;
        the projected table is kept and grown on demand (its rows do not depend on its size)."""
        w = self.linear_pos.weight
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        have = 0 if self._pos is None or self._pos_key != key else (self._pos.shape[0] + 1) // 2
        need = max(top, -bottom) + 1
        if have < need:
            size = max(need, 2 * have, 64)
            with torch.no_grad():
                self._pos = self.linear_pos(rel_pos_table(size, w.shape[1]).to(w)).view(-1, self.h, self.d_k)
            self._pos_key, have = key, size
        return self._pos[have - 1 - top: have - bottom]  # row k of the table is relative position have-1-k

    def stream(self, x: Tensor, kv: LayerKV) -> Tensor:
        """A chunk's new positions `[B, W, D]`; earlier K/V are read in place from the stream's slot.  Each piece
        of new positions (one encoder chunk) attends, unmasked, to the keys it sees; its relative-position term
        covers only the relative positions it spans (a strided view of the projected table's product)."""
        b_, w, _ = x.shape
        q = self._heads(self.linear_q, x).transpose(1, 2)
        ks, vs = kv.write(self._heads(self.linear_k, x).transpose(1, 2), self._heads(self.linear_v, x).transpose(1, 2))
        qu, qv = q + self.pos_bias_u[None, :, None], q + self.pos_bias_v[None, :, None]
        scale = scale_of(self.d_k)
        out = x.new_zeros(b_, w, self.h, self.d_k)
        for b, pieces in enumerate(kv.step.pieces):
            for c in pieces:
                p = self._pos_proj(c.e - 1 - c.lo, c.a - c.e + 1)  # [R, H, dk], R = (e - a) + (e - lo) - 1
                bd = rel_shift_view(torch.matmul(qv[b, :, c.qa:c.qe], p.permute(1, 2, 0)), c.e - c.lo)
                k, v = ks[b][0, :, c.ra:c.re], vs[b][0, :, c.ra:c.re]
                scores = torch.baddbmm(bd, qu[b, :, c.qa:c.qe], k.transpose(1, 2), beta=scale, alpha=scale)
                out[b, c.qa:c.qe] = torch.bmm(scores.softmax(-1), v).transpose(0, 1)
        return self.linear_out(out.reshape(b_, w, -1))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """ConformerEncoderLayer as CosyVoice 2 configures it: pre-norm self-attention and FFN only."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.output_size
        self.self_attn = RelPositionAttention(cfg.attention_heads, d)
        self.feed_forward = PositionwiseFeedForward(d, cfg.linear_units)
        self.norm_ff = nn.LayerNorm(d, eps=1e-12)
        self.norm_mha = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask)
        return x + self.feed_forward(self.norm_ff(x))

    def stream(self, x: Tensor, kv: LayerKV) -> Tensor:
        x = x + self.self_attn.stream(self.norm_mha(x), kv)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """conv1 sees a token and the `lookahead` after it; conv2 is causal (kernel 3)."""

    def __init__(self, channels: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Reference: x `[1, T, D]`, context `[1, L, D]` (the next tokens) or None (zeros after the end)."""
        h = x.transpose(1, 2)
        if context is not None:
            h = torch.cat([h, context.transpose(1, 2)], dim=2)
        h = F.pad(h, (0, x.shape[1] + self.lookahead - h.shape[2]))
        h = F.leaky_relu(self.conv1(h))
        h = self.conv2(F.pad(h, (2, 0)))
        return h.transpose(1, 2) + x

    def stream(self, x: Tensor, counts: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        """x `[B, W + L, D]`: each stream's new tokens then its lookahead (zero rows after the end), already
        embedded; tail `[B, 2, D]`: conv1's last two outputs.  Returns `[B, W, D]` and the new tail."""
        h = F.leaky_relu(self.conv1(x.transpose(1, 2)))               # [B, D, W]
        h = torch.cat([tail.transpose(1, 2), h], dim=2)                # [B, D, 2 + W]
        out = self.conv2(h).transpose(1, 2) + x[:, : x.shape[1] - self.lookahead]
        return out, _last(h.transpose(1, 2), counts, 2)


def _last(seq: Tensor, counts: Tensor, n: int) -> Tensor:
    """Rows counts[b] .. counts[b] + n - 1 of seq `[B, n + W, C]` (the last n rows before each stream's padding,
    counting the n rows of carried context at the front)."""
    idx = counts.to(seq.device)[:, None] + torch.arange(n, device=seq.device)[None]
    return torch.gather(seq, 1, idx[:, :, None].expand(-1, -1, seq.shape[2]))


class Upsample1D(nn.Module):
    """Nearest x2, then a causal convolution (kernel 2 * stride + 1, left padding)."""

    def __init__(self, channels: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, stride * 2 + 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, C, 2T]
        x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(x, (self.stride * 2, 0)))

    def stream(self, x: Tensor, counts: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        """x `[B, W, C]` new tokens; tail `[B, 4, C]`: the last upsampled rows.  Returns `[B, 2W, C]`, tail."""
        up = torch.cat([tail, x.repeat_interleave(self.stride, dim=1)], dim=1)
        out = self.conv(up.transpose(1, 2)).transpose(1, 2)
        return out, _last(up, counts * self.stride, 2 * self.stride)


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, pre_lookahead_len: int):
        super().__init__()
        d = cfg.output_size
        self.cfg = cfg
        self.embed = LinearEmbed(cfg.input_size, d)
        self.pre_lookahead_layer = PreLookaheadLayer(d, pre_lookahead_len)
        self.encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_blocks))
        self.up_layer = Upsample1D(d)
        self.up_embed = LinearEmbed(d, d)
        self.up_encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_up_blocks))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, xs: Tensor, context: Tensor | None, streaming: bool, left_chunks: int | None = None) -> Tensor:
        """Reference, one utterance `[1, T, D_in]` -> `[1, 2T, D]` (`left_chunks`: see `chunk_mask`)."""
        t = xs.shape[1]
        chunk = self.cfg.static_chunk_size
        full = lambda n: torch.ones(1, n, n, dtype=torch.bool, device=xs.device)  # noqa: E731
        xs = self.embed(xs)
        ctx = self.embed(context) if context is not None else None
        mask = chunk_mask(t, chunk, xs.device, left_chunks)[None] if streaming else full(t)
        xs = self.pre_lookahead_layer(xs, ctx)
        for layer in self.encoders:
            xs = layer(xs, mask)
        xs = self.up_layer(xs.transpose(1, 2)).transpose(1, 2)
        t = xs.shape[1]
        xs = self.up_embed(xs)
        mask = chunk_mask(t, chunk * self.up_layer.stride, xs.device, left_chunks)[None] if streaming else full(t)
        for layer in self.up_encoders:
            xs = layer(xs, mask)
        return self.after_norm(xs)


# -- the estimator --------------------------------------------------------------------------------------------

class CausalConv1d(nn.Conv1d):
    """Left-padded convolution; in the cached path the padding is the stream's previous frames."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__(cin, cout, kernel)
        self.context = kernel - 1

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.context, 0)))

    def stream(self, x: Tensor, st: "ConvStates") -> Tensor:
        i = st.next_index()
        z = torch.cat([st.states[i], x], dim=2)
        st.states[i] = _last(z.transpose(1, 2), st.counts, self.context).transpose(1, 2)
        return super().forward(z)


class ConvStates:
    """The left context of every CausalConv1d of the estimator for one ODE step, in forward order."""

    def __init__(self, states: list[Tensor], counts: Tensor):
        self.states, self.counts, self._i = states, counts, 0

    def next_index(self) -> int:
        self._i += 1
        return self._i - 1


class CausalBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.Sequential(CausalConv1d(dim, dim_out, 3), _Transpose(), nn.LayerNorm(dim_out),
                                   _Transpose(), nn.Mish())

    def _tail(self, h: Tensor) -> Tensor:
        return F.mish(self.block[2](h.transpose(1, 2)).transpose(1, 2))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self._tail(self.block[0](x * mask)) * mask

    def stream(self, x: Tensor, st: ConvStates) -> Tensor:
        return self._tail(self.block[0].stream(x, st))


class _Transpose(nn.Identity):
    """Placeholder for CosyVoice's Transpose(1, 2) (no weights), keeping the Sequential's indices."""


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, mask: Tensor, t: Tensor) -> Tensor:
        h = self.block1(x, mask) + self.mlp(t).unsqueeze(-1)
        return self.block2(h, mask) + self.res_conv(x * mask)

    def stream(self, x: Tensor, t: Tensor, st: ConvStates) -> Tensor:
        h = self.block1.stream(x, st) + self.mlp(t).unsqueeze(-1)
        return self.block2.stream(h, st) + self.res_conv(x)


class Attention(MatchaAttention):
    """Matcha's (diffusers') attention, plus the cached path: a chunk's queries against the stream's K/V."""

    def stream(self, x: Tensor, kv: LayerKV) -> Tensor:
        b, w, _ = x.shape
        q, k, v = (lin(x).view(b, w, self.heads, -1).transpose(1, 2) for lin in (self.to_q, self.to_k, self.to_v))
        return self.to_out[0](kv.attend(q, k, v).reshape(b, w, -1))


class BasicTransformerBlock(MatchaBlock):
    """Matcha's transformer block (its forward takes a `[B, 1, T, T]` mask), plus the cached path."""

    attention = Attention

    def stream(self, x: Tensor, kv: LayerKV) -> Tensor:
        x = self.attn1.stream(self.norm1(x), kv) + x
        return self.ff(self.norm3(x)) + x


class CausalConditionalDecoder(nn.Module):
    """The velocity estimator: a one-level causal U-Net (CosyVoice 2 ships channels [256])."""

    def __init__(self, cfg: EstimatorConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels[0]
        temb = ch * 4

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(BasicTransformerBlock(ch, cfg.num_heads, cfg.attention_head_dim, cfg.act_fn)
                                 for _ in range(cfg.n_blocks))

        self.time_mlp = TimestepEmbedding(cfg.in_channels, temb)
        self.down_blocks = nn.ModuleList([nn.ModuleList([CausalResnetBlock1D(cfg.in_channels, ch, temb), blocks(),
                                                         CausalConv1d(ch, ch, 3)])])
        self.mid_blocks = nn.ModuleList(nn.ModuleList([CausalResnetBlock1D(ch, ch, temb), blocks()])
                                        for _ in range(cfg.num_mid_blocks))
        self.up_blocks = nn.ModuleList([nn.ModuleList([CausalResnetBlock1D(2 * ch, ch, temb), blocks(),
                                                       CausalConv1d(ch, ch, 3)])])
        self.final_block = CausalBlock1D(ch, ch)
        self.final_proj = nn.Conv1d(ch, cfg.out_channels, 1)

    @property
    def attention_layers(self) -> int:
        return self.cfg.n_blocks * (2 + self.cfg.num_mid_blocks)

    def conv_channels(self) -> list[int]:
        """Input channels of every CausalConv1d in forward order (the cached path's left contexts)."""
        return [m.in_channels for m in self.modules() if isinstance(m, CausalConv1d)]

    def _levels(self):
        (down_res, down_tf, down_conv), = self.down_blocks
        (up_res, up_tf, up_conv), = self.up_blocks
        return down_res, down_tf, down_conv, up_res, up_tf, up_conv

    def _inputs(self, x, mu, t, spks, cond):
        t = self.time_mlp(sinusoidal_embedding(t, self.cfg.in_channels).to(t.dtype))
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[2]), cond], dim=1)
        return h, t

    def forward(self, x, mask, mu, t, spks, cond, streaming: bool, left_chunks: int | None = None) -> Tensor:
        """Reference (Matcha/CosyVoice's forward): x, mu, cond `[B, 80, T]`, mask `[B, 1, T]`, t `[B]`."""
        down_res, down_tf, down_conv, up_res, up_tf, up_conv = self._levels()
        h, t = self._inputs(x, mu, t, spks, cond)
        n = x.shape[2]
        keys = mask.bool().expand(-1, n, -1)  # [B, T, T]: padding
        attn = keys & chunk_mask(n, self.cfg.static_chunk_size, x.device, left_chunks)[None] if streaming else keys
        attn = attn[:, None]  # one mask for every head

        def transformers(blocks, h):
            h = h.transpose(1, 2)
            for block in blocks:
                h = block(h, attn)
            return h.transpose(1, 2)

        h = transformers(down_tf, down_res(h, mask, t))
        skip = h
        h = down_conv(h * mask)
        for res, blocks in self.mid_blocks:
            h = transformers(blocks, res(h, mask, t))
        h = torch.cat([h[:, :, : skip.shape[-1]], skip], dim=1)
        h = transformers(up_tf, up_res(h, mask, t))
        h = up_conv(h * mask)
        h = self.final_block(h, mask)
        return self.final_proj(h * mask) * mask

    def stream(self, x, mu, t, spks, cond, kv: Iterator[LayerKV], st: ConvStates) -> Tensor:
        """New frames only: x, mu, cond `[B, 80, W]`; `kv` hands out the attention layers' K/V in forward order
        (the batch's entries stream-major, each stream's CFG halves side by side)."""
        down_res, down_tf, down_conv, up_res, up_tf, up_conv = self._levels()
        h, t = self._inputs(x, mu, t, spks, cond)

        def transformers(blocks, h):
            h = h.transpose(1, 2)
            for block in blocks:
                h = block.stream(h, next(kv))
            return h.transpose(1, 2)

        h = transformers(down_tf, down_res.stream(h, t, st))
        skip = h
        h = down_conv.stream(h, st)
        for res, blocks in self.mid_blocks:
            h = transformers(blocks, res.stream(h, t, st))
        h = torch.cat([h, skip], dim=1)
        h = transformers(up_tf, up_res.stream(h, t, st))
        h = up_conv.stream(h, st)
        h = self.final_block.stream(h, st)
        return self.final_proj(h)


# -- the flow -------------------------------------------------------------------------------------------------

def ode_schedule(n_timesteps: int, scheduler: str) -> list[tuple[Tensor, Tensor]]:
    """(t, dt) of each Euler step, accumulated in float32 exactly as CausalConditionalCFM.solve_euler does."""
    t_span = torch.linspace(0, 1, n_timesteps + 1, dtype=torch.float32)
    if scheduler == "cosine":
        t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
    t, dt = t_span[0].unsqueeze(0), t_span[1] - t_span[0]
    out = []
    for step in range(1, n_timesteps + 1):
        out.append((t.clone(), dt.clone()))
        t = t + dt
        if step < n_timesteps:
            dt = t_span[step + 1] - t
    return out


def flow_noise(frames: int, channels: int = 80) -> Tensor:
    """CausalConditionalCFM.rand_noise: `randn(1, 80, frames)` right after seeding with 0."""
    return torch.randn(1, channels, frames, generator=torch.Generator().manual_seed(0))


class CausalConditionalCFM(nn.Module):
    """The conditional flow matching decoder: holds the estimator (`decoder.estimator.*` in flow.pt)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.estimator = CausalConditionalDecoder(cfg.estimator)


class CosyVoiceFlow(nn.Module):
    """CausalMaskedDiffWithXvec: token embedding, upsampling conformer encoder, CFM decoder with CFG."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleConformerEncoder(cfg.encoder, cfg.pre_lookahead_len)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = CausalConditionalCFM(cfg)
        self.schedule = ode_schedule(cfg.n_timesteps, cfg.t_scheduler)
        self.register_buffer("rand_noise", flow_noise(cfg.noise_frames, cfg.output_size), persistent=False)

    def speaker(self, embedding: Tensor) -> Tensor:
        """`[B, spk_embed_dim]` x-vectors -> the estimator's `spks` (F.normalize, then the affine layer)."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def cfg_velocity(self, v: Tensor) -> Tensor:
        cond, uncond = v.chunk(2, dim=0)
        r = self.cfg.inference_cfg_rate
        return (1.0 + r) * cond - r * uncond

    @torch.inference_mode()
    def inference(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                  streaming: bool, finalize: bool, left_chunks: int | None = None) -> Tensor:
        """CausalMaskedDiffWithXvec.inference for one utterance: token `[1, N]`, prompt_token `[1, P]`,
        prompt_feat `[1, F, 80]`, embedding `[1, 192]` -> mel `[1, 80, 2 (P + N) - F]` (minus the context's
        frames when not finalizing: the last `pre_lookahead_len` tokens are then only lookahead).  `left_chunks`
        (streaming only): each chunk sees only that many chunks before it in every attention layer (None: all of
        them, CosyVoice 2's `num_decoding_left_chunks: -1`)."""
        spks = self.speaker(embedding)
        token = torch.cat([prompt_token, token], dim=1)
        x = self.input_embedding(token.clamp(min=0))
        if finalize:
            context = None
        else:
            lookahead = self.cfg.pre_lookahead_len
            x, context = x[:, :-lookahead], x[:, -lookahead:]
        h = self.encoder_proj(self.encoder(x, context, streaming, left_chunks))
        mel_len1, total = prompt_feat.shape[1], h.shape[1]
        if total > self.cfg.noise_frames:
            raise ValueError(f"{total} mel frames: CosyVoice's fixed noise covers {self.cfg.noise_frames}")
        conds = torch.zeros(1, total, self.cfg.output_size, dtype=h.dtype, device=h.device)
        conds[:, :mel_len1] = prompt_feat
        mu, cond = h.transpose(1, 2), conds.transpose(1, 2)
        mask = torch.ones(1, 1, total, dtype=h.dtype, device=h.device)
        x = self.rand_noise[:, :, :total].to(h)
        zeros = torch.zeros_like(mu)
        est = self.decoder.estimator
        for t, dt in self.schedule:
            t_in = t.to(h).expand(2)
            v = est(torch.cat([x, x]), torch.cat([mask, mask]), torch.cat([mu, zeros]), t_in,
                    torch.cat([spks, torch.zeros_like(spks)]), torch.cat([cond, zeros]), streaming, left_chunks)
            x = x + dt.to(h) * self.cfg_velocity(v)
        return x[:, :, mel_len1:].float()
