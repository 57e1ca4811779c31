"""Cache-aware streaming FastConformer encoder, as NVIDIA NeMo defines it.

Module and parameter names follow NeMo's `ConformerEncoder` so that a `.nemo` state dict loads
without renaming.  Two entry points share every layer:
  * `forward`  - the whole utterance with the streaming attention mask (training, tests);
  * `stream`   - one chunk for a batch of streams, reading and returning the per-layer caches.
Shapes inside are batch-first `[B, T, d_model]`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import rows_kernel
from ..depthwise import depthwise_channels_last, depthwise_norm_silu
from ..packed_linear import linear, linear_silu, packed_linear
from ..residual_norm import add_norm

MASK_VALUE = 10000.0  # NeMo's INF_VAL: masked scores are set to -10000, not -inf


class ModelConfigError(ValueError):
    """The checkpoint describes a model this encoder cannot run as a cache-aware stream."""


@dataclass(frozen=True)
class EncoderConfig:
    feat_in: int = 80
    n_layers: int = 17
    d_model: int = 512
    feat_out: int = -1
    subsampling: str = "dw_striding"
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    causal_downsampling: bool = True
    ff_expansion_factor: int = 4
    n_heads: int = 8
    att_context_size: tuple[tuple[int, int], ...] = ((70, 13), (70, 6), (70, 1), (70, 0))
    att_context_probs: tuple[float, ...] | None = None
    att_context_style: str = "chunked_limited"
    xscaling: bool = True
    untie_biases: bool = True
    pos_emb_max_len: int = 5000
    conv_kernel_size: int = 9
    conv_norm_type: str = "layer_norm"
    use_bias: bool = True
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_emb: float = 0.0
    dropout_att: float = 0.1
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_nemo(cls, cfg: dict) -> "EncoderConfig":
        """Read NeMo's `encoder` section; refuse what cannot stream with bounded caches."""
        target = str(cfg.get("_target_", ""))
        if target and not target.endswith("ConformerEncoder"):
            raise ModelConfigError(f"encoder {target} is not a ConformerEncoder")
        if cfg.get("self_attention_model", "rel_pos") != "rel_pos":
            raise ModelConfigError(f"self_attention_model={cfg.get('self_attention_model')!r}: only rel_pos streams")
        if not cfg.get("causal_downsampling", False):
            raise ModelConfigError("causal_downsampling is false: not a cache-aware streaming model")
        if cfg.get("reduction"):
            raise ModelConfigError("encoder reduction layers cannot stream")
        if cfg.get("subsampling", "striding") not in ("dw_striding", "striding"):
            raise ModelConfigError(f"subsampling={cfg.get('subsampling')!r} is not supported")
        style = cfg.get("att_context_style", "regular")
        if style not in ("chunked_limited", "regular"):
            raise ModelConfigError(f"att_context_style={style!r} is not supported")
        ctx = cfg.get("att_context_size") or [[-1, -1]]
        ctx = [ctx] if isinstance(ctx[0], int) else ctx
        contexts = tuple((int(a), int(b)) for a, b in ctx)
        for left, right in contexts:
            if left < 0:
                raise ModelConfigError(f"att_context_size {[left, right]}: unlimited left context needs an unbounded cache")
            if right < 0:
                raise ModelConfigError(f"att_context_size {[left, right]}: unlimited right context cannot stream")
            if style == "chunked_limited" and left % (right + 1):
                raise ModelConfigError(f"att_context_size {[left, right]}: left must be a multiple of right+1")
        kernel = int(cfg.get("conv_kernel_size", 31))
        conv_ctx = cfg.get("conv_context_size")
        if conv_ctx not in ("causal", [kernel - 1, 0], (kernel - 1, 0)):
            raise ModelConfigError(f"conv_context_size={conv_ctx!r}: only causal convolutions stream")
        if int(cfg.get("global_tokens", 0) or 0):
            raise ModelConfigError("global attention tokens are not supported")
        channels = int(cfg.get("subsampling_conv_channels", -1))
        probs = cfg.get("att_context_probs")
        return cls(
            feat_in=int(cfg["feat_in"]), n_layers=int(cfg["n_layers"]), d_model=int(cfg["d_model"]),
            feat_out=int(cfg.get("feat_out", -1)), subsampling=cfg.get("subsampling", "striding"),
            subsampling_factor=int(cfg.get("subsampling_factor", 4)),
            subsampling_conv_channels=channels if channels > 0 else int(cfg["d_model"]),
            causal_downsampling=True, ff_expansion_factor=int(cfg.get("ff_expansion_factor", 4)),
            n_heads=int(cfg.get("n_heads", 4)), att_context_size=contexts,
            att_context_probs=tuple(float(p) for p in probs) if probs else None,
            att_context_style=style, xscaling=bool(cfg.get("xscaling", True)),
            untie_biases=bool(cfg.get("untie_biases", True)),
            pos_emb_max_len=int(cfg.get("pos_emb_max_len", 5000)), conv_kernel_size=kernel,
            conv_norm_type=cfg.get("conv_norm_type", "batch_norm"), use_bias=bool(cfg.get("use_bias", True)),
            dropout=float(cfg.get("dropout", 0.1)), dropout_pre_encoder=float(cfg.get("dropout_pre_encoder", 0.1)),
            dropout_emb=float(cfg.get("dropout_emb", 0.1)), dropout_att=float(cfg.get("dropout_att", 0.0)),
        )

    def to_nemo(self) -> dict:
        return {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": self.feat_in, "feat_out": self.feat_out, "n_layers": self.n_layers,
            "d_model": self.d_model, "use_bias": self.use_bias,
            "subsampling": self.subsampling, "subsampling_factor": self.subsampling_factor,
            "subsampling_conv_channels": self.subsampling_conv_channels,
            "causal_downsampling": self.causal_downsampling, "ff_expansion_factor": self.ff_expansion_factor,
            "self_attention_model": "rel_pos", "n_heads": self.n_heads,
            "att_context_size": [list(c) for c in self.att_context_size],
            "att_context_probs": list(self.att_context_probs) if self.att_context_probs else None,
            "att_context_style": self.att_context_style, "xscaling": self.xscaling,
            "untie_biases": self.untie_biases, "pos_emb_max_len": self.pos_emb_max_len,
            "conv_kernel_size": self.conv_kernel_size, "conv_norm_type": self.conv_norm_type,
            "conv_context_size": "causal", "dropout": self.dropout,
            "dropout_pre_encoder": self.dropout_pre_encoder, "dropout_emb": self.dropout_emb,
            "dropout_att": self.dropout_att,
        }

    @property
    def max_left_context(self) -> int:
        return max(left for left, _ in self.att_context_size)


# ------------------------------------------------------------------------------------------
# Causal subsampling
# ------------------------------------------------------------------------------------------
class CausalConv2D(nn.Conv2d):
    """Conv2d padded k-1 before and stride-1 after, in time and frequency (NeMo's CausalConv2D)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.kernel_size[0] - 1, self.stride[0] - 1
        return super().forward(F.pad(x, (left, right, left, right)))


def causal_conv_length(length, repeat: int, kernel: int = 3, stride: int = 2):
    """Output length of `repeat` causal stride convolutions (NeMo's calc_length, integer form)."""
    for _ in range(repeat):
        length = (length + (kernel - 1) + (stride - 1) - kernel) // stride + 1
    return length


class ConvSubsampling(nn.Module):
    """Causal `dw_striding` / `striding` 2-D conv subsampling, with NeMo's per-stage masking.

    Masking the padded tail before every stage makes a batch of different lengths give each
    stream exactly what it would get alone (NeMo's MaskedConvSequential).
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.stages = int(math.log2(cfg.subsampling_factor))
        if 2 ** self.stages != cfg.subsampling_factor:
            raise ModelConfigError(f"subsampling_factor {cfg.subsampling_factor} is not a power of 2")
        ch = cfg.subsampling_conv_channels
        layers: list[nn.Module] = []
        if cfg.subsampling == "dw_striding":
            layers += [CausalConv2D(1, ch, 3, 2), nn.ReLU(True)]
            for _ in range(self.stages - 1):
                layers += [CausalConv2D(ch, ch, 3, 2, groups=ch), nn.Conv2d(ch, ch, 1), nn.ReLU(True)]
        else:
            for i in range(self.stages):
                layers += [CausalConv2D(1 if i == 0 else ch, ch, 3, 2), nn.ReLU(True)]
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(ch * causal_conv_length(cfg.feat_in, self.stages), cfg.d_model)

    def output_length(self, length):
        return causal_conv_length(length, self.stages)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, feat] -> [B, T', d_model]; each layer computes in the dtype of its weights."""
        x = x.to(self.conv[0].weight.dtype)
        if not torch.is_grad_enabled():
            return self.infer(x, lengths)
        x = x.unsqueeze(1)
        for layer in self.conv:
            if isinstance(layer, nn.Conv2d):
                x = x.to(layer.weight.dtype)
            x = x * _time_mask(lengths, x.shape[2]).to(x.dtype)[:, None, :, None]
            x = layer(x)
            if isinstance(layer, nn.Conv2d) and layer.stride[0] > 1:
                lengths = causal_conv_length(lengths, 1)
        x = x * _time_mask(lengths, x.shape[2]).to(x.dtype)[:, None, :, None]
        return self._flatten(x), lengths

    def infer(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s maths laid out for inference speed (2-3x faster on CPU at 64 streams, bench/README
        "Roofline"): channels-last tensors; each causal convolution run by oneDNN with padding k-1 on both
        sides instead of an F.pad copy (its first outputs are exactly the causal ones: the same windows over
        the same zeros; the extra last row/column is zeroed before the next convolution reads it and cut at
        the end); a stream's tail masked in place, and only when a stream is shorter than the batch (between
        the strided convolutions every layer works per position, so masking before each of them is enough)."""
        valid_t, valid_f = x.shape[1], x.shape[2]
        x = x.unsqueeze(1).contiguous(memory_format=torch.channels_last)
        if int(lengths.min()) < valid_t:
            x = x.masked_fill(~_time_mask(lengths, valid_t)[:, None, :, None], 0.0)  # a copy: the input stays
        # Each convolution's output goes on in the next one's dtype (bf16 keeps all but the last pointwise one in
        # fp32, precision.py), cast before the ReLU between them: ReLU commutes with rounding and bf16 halves its
        # pass.
        out_dtype = self.out.weight.dtype if isinstance(self.out, nn.Linear) else x.dtype  # int8: a product module
        dtypes = [m.weight.dtype for m in self.conv if isinstance(m, nn.Conv2d)][1:] + [out_dtype]
        bf16_path = torch.bfloat16 in dtypes  # chorus' kernel computes the first convolution for the bf16 path
        applied = -1  # the index of a ReLU the first convolution applied already
        start = 0
        if bf16_path:  # the first two convolutions in one pass of chorus' kernel, where it applies
            front = _first_two_convs(x, lengths, self.conv, valid_f)
            if front is not None:
                x, lengths, valid_t, valid_f = front
                start = 3
                x = x.to(dtypes[1])
                del dtypes[:2]
        for i, layer in enumerate(self.conv):
            if i < start or i == applied:
                continue
            if isinstance(layer, CausalConv2D):
                if i:
                    x = _zero_beyond(x, lengths, valid_t, valid_f)
                lengths = causal_conv_length(lengths, 1)
                valid_t, valid_f = causal_conv_length(valid_t, 1), causal_conv_length(valid_f, 1)
                if layer.in_channels == 1 and i + 1 < len(self.conv) and isinstance(self.conv[i + 1], nn.ReLU):
                    x, applied = _first_conv_relu(x, layer, dtypes.pop(0), bf16_path), i + 1
                    continue
                x = _conv_channels_last(x, layer)
            elif isinstance(layer, nn.Conv2d):  # 1x1: a product over channels (Conv2d takes a slow path at batch 1)
                x = F.linear(x.permute(0, 2, 3, 1), layer.weight.flatten(1), layer.bias).permute(0, 3, 1, 2)
            if isinstance(layer, nn.Conv2d):
                x = x.to(dtypes.pop(0))
            else:
                x = layer(x)
        x = _zero_beyond(x, lengths, valid_t, valid_f)
        return self._flatten(x[:, :, :valid_t, :valid_f]), lengths

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, f = x.shape
        out_dtype = self.out.weight.dtype if isinstance(self.out, nn.Linear) else x.dtype  # int8: a product module
        return linear(self.out, x.transpose(1, 2).reshape(b, t, c * f).to(out_dtype))


def _conv_channels_last(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x) with padding k-1 on both sides, channels-last in and out.  A first convolution (one input
    channel) is one matrix product over the 3x3 patches: oneDNN would hand back NCHW for it, and every later
    layer would run on that slow layout."""
    if conv.in_channels > 1:
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.kernel_size[0] - 1, 1, conv.groups)
    patches = _patches(x, conv)
    b, t, f = patches.shape[:3]
    w = conv.weight.view(conv.out_channels, -1).t()
    patches = patches.reshape(b * t * f, -1)
    y = torch.mm(patches, w) if conv.bias is None else torch.addmm(conv.bias, patches, w)
    return y.view(b, t, f, conv.out_channels).permute(0, 3, 1, 2)


def _patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The padded (k-1 each side) windows of a one-channel x [B, 1, T, F] that `conv` reads: [B, T', F', kt, kf]."""
    pad = conv.kernel_size[0] - 1
    (kt, kf), (st, sf) = conv.kernel_size, conv.stride
    return F.pad(x[:, 0], (pad, pad, pad, pad)).unfold(1, kt, st).unfold(2, kf, sf)


_FIRST_CONV_BLOCK_ROWS = 2048  # fp32 rows of 256 channels: 2 MB, one core's L2


def _first_conv_relu(x: torch.Tensor, conv: nn.Conv2d, out_dtype: torch.dtype, bf16_path: bool = False
                     ) -> torch.Tensor:
    """relu(conv(x)) in `out_dtype` for the one-input-channel first convolution, channels-last out: what
    `_conv_channels_last` and the ReLU after it give, cast (ReLU commutes with rounding).  Its output is
    the largest tensor of a step (256 channels per mel bin: 90 MB fp32 at 64 streams), and written whole
    it went to memory and back four times (the bias copied in, the product added, the cast, the ReLU);
    here each block of streams is computed, rectified and cast while it is in cache, straight into the
    output.  A block holds whole streams, so a stream's result does not depend on its batch.  On the bf16
    path (`bf16_path`) chorus' kernel does it in one pass, in bf16 or, for a convolution after it that computes
    in fp32, in fp32; the fp32 path keeps torch's sums."""
    patches = _patches(x, conv)
    b, t, f = patches.shape[:3]
    fused = rows_kernel.fused("conv_taps_relu") if bf16_path and x.is_cpu and out_dtype in (
        torch.bfloat16, torch.float32) else None
    if fused is not None and x.dtype == conv.weight.dtype == torch.float32 and conv.out_channels % 16 == 0 \
            and not torch.is_grad_enabled():
        # chorus' kernel: product, bias, ReLU and cast of each output row in registers (rows_kernel.c)
        taps = patches.reshape(b * t * f, -1).contiguous()  # the overlapping windows, copied
        w = conv.weight.detach().reshape(conv.out_channels, -1).t().contiguous()
        out = torch.empty(b, t, f, conv.out_channels, dtype=out_dtype)
        if fused(taps.shape[0], taps.shape[1], conv.out_channels, taps.data_ptr(), w.data_ptr(),
                 None if conv.bias is None else conv.bias.detach().contiguous().data_ptr(), out.data_ptr(),
                 out_dtype == torch.float32):
            raise ValueError("conv_taps_relu kernel rejected its arguments")
        return out.permute(0, 3, 1, 2)
    w = conv.weight.view(conv.out_channels, -1).t()
    out = torch.empty(b, t, f, conv.out_channels, dtype=out_dtype, device=x.device)
    step = max(1, _FIRST_CONV_BLOCK_ROWS // (t * f))
    block = torch.empty(min(b, step) * t * f, conv.out_channels, dtype=x.dtype, device=x.device)  # reused: stays in cache
    for s in range(0, b, step):
        p = patches[s:s + step].reshape(-1, w.shape[0])
        y = block[:p.shape[0]]
        if conv.bias is None:
            torch.mm(p, w, out=y)
        else:
            torch.addmm(conv.bias, p, w, out=y)
        out[s:s + step].view(-1, conv.out_channels).copy_(y.clamp_min_(0.0))
    return out.permute(0, 3, 1, 2)


def _first_two_convs(x: torch.Tensor, lengths: torch.Tensor, convs: nn.Sequential, valid_f: int):
    """The bf16 path's first convolution, its ReLU and the depthwise convolution after it (`dw_striding`, both in
    fp32) as one pass of chorus' kernel (rows_kernel.c, `subsample_first_two`): its first convolution's output,
    the largest tensor of a step, stays in cache instead of going to memory and back.  x is the channels-last
    log-mel [B, 1, T, F], its tails zeroed.  Returns (the depthwise convolution's causal outputs, fp32 [B, C, T2,
    F2] channels-last, with their lengths and sizes) or None where the kernel does not apply (torch's ops then)."""
    first, depthwise = convs[0], convs[2] if len(convs) > 2 else None
    fused = rows_kernel.fused("subsample_first_two")
    if fused is None or not isinstance(depthwise, CausalConv2D) or not isinstance(convs[1], nn.ReLU) \
            or first.in_channels != 1 or depthwise.groups != depthwise.in_channels or not x.is_cpu \
            or torch.is_grad_enabled() or first.kernel_size != (3, 3) or depthwise.kernel_size != (3, 3) \
            or first.stride != (2, 2) or depthwise.stride != (2, 2) or first.out_channels % 16 \
            or any(w.dtype != torch.float32 for w in (x, first.weight, depthwise.weight)):
        return None
    b, _, t0, f0 = x.shape
    c = first.out_channels
    valid_t1, valid_f1 = causal_conv_length(t0, 1), causal_conv_length(valid_f, 1)
    lengths1 = causal_conv_length(lengths, 1)
    rows1 = lengths1.clamp(max=valid_t1).to(torch.int32).contiguous()
    t2, f2 = causal_conv_length(valid_t1, 1), causal_conv_length(valid_f1, 1)
    mel = x[:, 0].contiguous()  # channels-last with one channel: already [B, T, F] in memory
    taps0 = first.weight.detach().reshape(c, 9).t().contiguous()
    taps2 = depthwise.weight.detach().reshape(c, 9).t().contiguous()
    bias0, bias2 = (None if m.bias is None else m.bias.detach().contiguous() for m in (first, depthwise))
    out = torch.empty(b, t2, f2, c)
    weights = (taps0.data_ptr(), None if bias0 is None else bias0.data_ptr(), taps2.data_ptr(),
               None if bias2 is None else bias2.data_ptr())

    def streams(start: int, stop: int) -> int:
        return fused(stop - start, t0, f0, mel[start].data_ptr(), rows1[start].data_ptr(), valid_f1, c, *weights,
                     t2, f2, out[start].data_ptr())

    if rows_kernel.over_streams(b, streams):
        raise ValueError("subsample_first_two kernel rejected its arguments")
    return out.permute(0, 3, 1, 2), causal_conv_length(lengths1, 1), t2, f2


def _zero_beyond(x: torch.Tensor, lengths: torch.Tensor, valid_t: int, valid_f: int) -> torch.Tensor:
    """In place: zero x [B, C, T, F] past the causal sizes (valid_t, valid_f) and each stream's tail."""
    x[:, :, valid_t:].zero_()
    x[:, :, :, valid_f:].zero_()
    if int(lengths.min()) < valid_t:
        x[:, :, :valid_t].masked_fill_(~_time_mask(lengths, valid_t)[:, None, :, None], 0.0)
    return x


def _time_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


# ------------------------------------------------------------------------------------------
# Relative positional encoding and attention
# ------------------------------------------------------------------------------------------
class RelPositionalEncoding(nn.Module):
    """Sinusoids for relative positions L-1 ... -(L-1), built exactly as NeMo builds them."""

    def __init__(self, d_model: int, max_len: int, xscale: float | None, dropout: float, dropout_emb: float):
        super().__init__()
        self.d_model = d_model
        self.xscale = xscale
        self.dropout = nn.Dropout(dropout)
        self.dropout_emb = nn.Dropout(dropout_emb) if dropout_emb > 0 else None
        self.register_buffer("pe", self._table(max_len), persistent=False)

    def _table(self, length: int) -> torch.Tensor:
        positions = torch.arange(length - 1, -length, -1, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float32)
                             * -(math.log(MASK_VALUE) / self.d_model))
        pe = torch.zeros(positions.shape[0], self.d_model)
        pe[:, 0::2] = torch.sin(positions * div_term)
        pe[:, 1::2] = torch.cos(positions * div_term)
        return pe.unsqueeze(0)

    def forward(self, x: torch.Tensor, cache_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.xscale:
            x = x * self.xscale
        length = x.shape[1] + cache_len
        if 2 * length - 1 > self.pe.shape[1]:
            self.pe = self._table(length).to(self.pe.device, self.pe.dtype)
        center = self.pe.shape[1] // 2 + 1
        pos_emb = self.pe[:, center - length:center + length - 1].to(x.dtype)
        if self.dropout_emb is not None:
            pos_emb = self.dropout_emb(pos_emb)
        return self.dropout(x), pos_emb


class RelPositionMultiHeadAttention(nn.Module):
    """Transformer-XL attention with NeMo's score layout, masking and left-context cache."""

    def __init__(self, n_heads: int, d_model: int, dropout: float, use_bias: bool,
                 pos_bias_u: nn.Parameter | None, pos_bias_v: nn.Parameter | None):
        super().__init__()
        self.h = n_heads
        self.d_k = d_model // n_heads
        self.s_d_k = math.sqrt(self.d_k)
        self.linear_q = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        if pos_bias_u is None:
            pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.d_k))
            pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.d_k))
        self.pos_bias_u = pos_bias_u
        self.pos_bias_v = pos_bias_v
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def project_positions(self, pos_emb: torch.Tensor, layout: str = "") -> torch.Tensor:
        """linear_pos(pos_emb) [B, P, d]; for a shared pos_emb (B = 1) laid out by head, `layout` "dk_p" [H, d_k, P]
        (the score product's operand) or "p_dk" [H, P, d_k] (chorus' attention kernel's).  At inference it
        depends only on the length and the weights, which are the same every streaming step, so it is computed
        (and laid out) once per length."""
        def project():
            p = self.linear_pos(pos_emb)
            if not layout:
                return p
            heads = p[0].view(-1, self.h, self.d_k)
            return (heads.permute(1, 2, 0) if layout == "dk_p" else heads.transpose(0, 1)).contiguous()

        if self.training or torch.is_grad_enabled() or torch.is_autocast_enabled(pos_emb.device.type):
            return project()
        w = self.linear_pos.weight
        key = (tuple(pos_emb.shape), pos_emb.dtype, pos_emb.device, w.data_ptr(), w._version, layout)
        cached = self._pos_cache.get(key)
        if cached is None:
            if len(self._pos_cache) >= 8:
                self._pos_cache.clear()
            cached = self._pos_cache[key] = project()
        return cached

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[q, k, v] of x in one product: [B, T, 3d].  At inference the fused weight is built once
        (and again only if a weight changes); training uses the three linears as they are."""
        if getattr(self, "qkv_int8", None) is not None:  # the int8 compute path (precision.py)
            return self.qkv_int8(x)
        if self.training or torch.is_grad_enabled():
            return torch.cat([self.linear_q(x), self.linear_k(x), self.linear_v(x)], dim=-1)
        lins = (self.linear_q, self.linear_k, self.linear_v)
        key = tuple((m.weight.data_ptr(), m.weight._version, m.weight.dtype) for m in lins)
        if getattr(self, "_qkv_key", None) != key:
            weight = torch.cat([m.weight for m in lins])
            bias = torch.cat([m.bias for m in lins]) if self.linear_q.bias is not None else None
            self._qkv, self._qkv_key = (weight, bias), key
        return packed_linear(self, x, *self._qkv)

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        b, h, qlen, pos_len = x.shape
        x = F.pad(x, (1, 0)).view(b, h, -1, qlen)
        return x[:, :, 1:].view(b, h, qlen, pos_len)

    def forward(self, x: torch.Tensor, mask: "AttentionMask", pos_emb: torch.Tensor,
                kv_window=None, layer: int = 0) -> torch.Tensor:
        """x [B, T, d] queries (and the new keys/values).  Offline, keys are x itself; streaming,
        `kv_window.update(layer, [k, v] of x)` stores the chunk's projected keys and values and returns
        the window [B, C+T, 2d] (the cached frames' K and V, then the chunk's), so each frame is
        projected once.  The mask covers [B, T, C+T]."""
        d = self.h * self.d_k
        qkv = self.project_qkv(x)
        kv = qkv[..., d:] if kv_window is None else kv_window.update(layer, qkv[..., d:])
        return self.attend(qkv[..., :d], kv[..., :d], kv[..., d:], mask, pos_emb)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: "AttentionMask",
               pos_emb: torch.Tensor) -> torch.Tensor:
        """Rel-pos attention of projected q [B, T, d] over projected k, v [B, S, d].

        NeMo's scores are ((q+u).k + rel_shift((q+v).p)) / sqrt(d_k), masked to -10000, softmax,
        masked to 0.  The positional term enters scaled_dot_product_attention as an additive bias
        with the mask (-10000 added, so hidden keys get exactly zero weight as in NeMo); rows with
        every key hidden (padding) are zeroed afterwards, as NeMo's second masked_fill does."""
        b, t, s = q.shape[0], q.shape[1], k.shape[1]
        q = q.reshape(b, t, self.h, self.d_k)
        q_u, q_v = q + self.pos_bias_u, q + self.pos_bias_v
        out = self._ring_attention(q_u, q_v, k, v, mask, pos_emb)  # bf16 streaming on CPU: one kernel pass
        if out is not None:
            return linear(self.linear_out, _zero_where(out.view(b, t, self.h * self.d_k), mask.rows_hidden))
        scores = self.position_scores(q_v, pos_emb)
        k = k.reshape(b, s, self.h, self.d_k).transpose(1, 2)
        v = v.reshape(b, s, self.h, self.d_k).transpose(1, 2)
        q_u = q_u.transpose(1, 2)
        if mask.positions is None:  # keys in time order
            matrix_bd = self.rel_shift(scores)[..., :s]
        else:  # keys in the order of a ring (streaming): each key's relative position picked out
            matrix_bd = scores.gather(-1, mask.positions.expand(b, self.h, t, s))
        bias = torch.add(mask.bias, matrix_bd, alpha=1.0 / self.s_d_k)
        # The fused kernel reads k and v as strided views of the ring window: no per-head copies.
        out = F.scaled_dot_product_attention(q_u, k, v, attn_mask=bias,
                                             dropout_p=self.dropout.p if self.training else 0.0,
                                             scale=1.0 / self.s_d_k)
        out = _zero_where(out.transpose(1, 2).reshape(b, t, self.h * self.d_k), mask.rows_hidden)
        return linear(self.linear_out, out)

    def _ring_attention(self, q_u: torch.Tensor, q_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: "AttentionMask", pos_emb: torch.Tensor) -> torch.Tensor | None:
        """The whole attention of `attend` in one pass of chorus' kernel (rows_kernel.c bf16_ring_attention), for
        bf16 streaming on CPU (keys in ring order): q_u, q_v [B, T, H, d_k]; k, v [B, S, d] (views of the K/V
        ring, read where they lie); out [B, T, H, d_k], rows not yet zeroed.  Through torch the positional term
        was a product with every relative position, a gather and an add, and then torch's fused attention took
        ~15 % of a 16-stream step (AMD EPYC, no AMX).  None where torch's path is taken instead."""
        kernel = rows_kernel.fused("ring_attention")
        b, t, h, d = q_u.shape
        s = k.shape[1]
        if kernel is None or mask.positions is None or pos_emb.shape[0] != 1 or torch.is_grad_enabled() \
                or any(x.dtype != torch.bfloat16 or not x.is_cpu for x in (q_u, q_v, k, v, mask.bias)) \
                or k.stride() != v.stride() or k.stride(-1) != 1 or d % 2 \
                or mask.bias.shape != (b, 1, t, s) or mask.positions.shape != (b, 1, t, s):
            return None
        p = self.project_positions(pos_emb, "p_dk")  # [H, P, d_k]
        if p.dtype != torch.bfloat16:
            return None
        q_u, q_v, bias = q_u.contiguous(), q_v.contiguous(), mask.bias.contiguous()
        out = torch.empty(b, t, h, d, dtype=torch.bfloat16)
        if kernel(b, h, t, s, d, p.shape[1], q_u.data_ptr(), q_v.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0),
                  k.stride(1), p.data_ptr(), mask.positions_int32().data_ptr(), bias.data_ptr(), 1.0 / self.s_d_k,
                  out.data_ptr()):
            raise ValueError(f"ring_attention kernel rejected q {tuple(q_u.shape)}, k {tuple(k.shape)}, "
                             f"positions {tuple(p.shape)}")
        return out

    def position_scores(self, q_v: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """(q+v).p for every query and relative position, [B, H, T, P].  The projected positions are the
        same for every stream, so all queries of a head go through one product with them, instead of a
        batched product that first copies p once per stream (which cost more than the product)."""
        b, t = q_v.shape[:2]
        if pos_emb.shape[0] != 1:
            p = self.project_positions(pos_emb)
            p = p.view(p.shape[0], -1, self.h, self.d_k).transpose(1, 2)
            return torch.matmul(q_v.transpose(1, 2), p.transpose(-2, -1))
        p = self.project_positions(pos_emb, "dk_p")                                       # [H, d_k, P]
        scores = torch.matmul(q_v.permute(2, 0, 1, 3).reshape(self.h, b * t, self.d_k), p)  # [H, B*T, P]
        return scores.view(self.h, b, t, -1).transpose(0, 1)


@dataclass
class AttentionMask:
    """NeMo's boolean streaming mask in the forms attention uses: an additive bias [B, 1, T, S]
    (0 visible, -10000 hidden) and the query rows that see no key at all [B, T, 1].  `positions`
    [B, 1, T, S], when the keys are not in time order (a ring read as it lies), is the index of each
    query-key pair's relative position in the positional scores; None for keys in time order."""

    bias: torch.Tensor
    rows_hidden: torch.Tensor | None  # None: no row to zero
    positions: torch.Tensor | None = None

    def positions_int32(self) -> torch.Tensor:
        """`positions` as contiguous int32 [B, T, S] for chorus' kernel: made once per step, read by every layer."""
        if getattr(self, "_positions_int32", None) is None:
            self._positions_int32 = self.positions[:, 0].to(torch.int32).contiguous()
        return self._positions_int32

    @classmethod
    def of(cls, hidden: torch.Tensor, dtype: torch.dtype, positions: torch.Tensor | None = None) -> "AttentionMask":
        bias = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, -MASK_VALUE)
        return cls(bias.unsqueeze(1), _none_if_clear(hidden.all(dim=-1, keepdim=True)), positions)


# ------------------------------------------------------------------------------------------
# Conformer layer
# ------------------------------------------------------------------------------------------
class ConformerFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float, use_bias: bool):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=use_bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.linear2, self.dropout(linear_silu(self.linear1, x)))


class ConformerConvolution(nn.Module):
    """Pointwise -> GLU -> causal depthwise (with a k-1 frame cache) -> norm -> Swish -> pointwise."""

    def __init__(self, d_model: int, kernel_size: int, norm_type: str, use_bias: bool):
        super().__init__()
        self.cache_size = kernel_size - 1
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=use_bias)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, bias=use_bias)
        if norm_type == "layer_norm":
            self.batch_norm = nn.LayerNorm(d_model)
        elif norm_type == "batch_norm":
            self.batch_norm = nn.BatchNorm1d(d_model)
        else:
            raise ModelConfigError(f"conv_norm_type={norm_type!r} is not supported")
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=use_bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor, window=None, layer: int = 0) -> torch.Tensor:
        """x [B, T, d].  Streaming, `window.update(layer, glu)` stores the chunk's depthwise inputs
        and returns them after the k-1 cached ones; offline the history is k-1 zeros."""
        # The 1x1 convolutions are matrix products; F.linear avoids Conv1d's slow path at batch 1.
        x = F.glu(_pointwise(self.pointwise_conv1, x), dim=-1)
        x = _zero_where(x, None if pad_mask is None else pad_mask.unsqueeze(-1))
        x = F.pad(x, (0, 0, self.cache_size, 0)) if window is None else window.update(layer, x)  # [B, k-1+T, d]
        dtype = x.dtype  # the blocks' (bf16 keeps the depthwise convolution and its norm fp32, precision.py)
        if torch.is_grad_enabled():
            x = self.depthwise_conv(x.transpose(1, 2)).transpose(1, 2)
        else:
            fused = depthwise_norm_silu(self.depthwise_conv, self.batch_norm, x)  # bf16: one kernel pass
            if fused is not None:
                return _pointwise(self.pointwise_conv2, fused)
            x = depthwise_channels_last(self.depthwise_conv, x, out_dtype=self.batch_norm.weight.dtype)
        if isinstance(self.batch_norm, nn.LayerNorm):
            x = self.batch_norm(x)
        else:
            x = self.batch_norm(x.transpose(1, 2)).transpose(1, 2)
        return _pointwise(self.pointwise_conv2, F.silu(x).to(dtype))


def _zero_where(fresh: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """fresh.masked_fill(mask, 0) (fresh itself for mask None); at inference in place (callers pass a tensor
    they just made), which saves a copy per call; with autograd a new tensor, since `fresh` may be a view that a
    backward still needs."""
    if mask is None:
        return fresh
    return fresh.masked_fill(mask, 0.0) if torch.is_grad_enabled() else fresh.masked_fill_(mask, 0.0)


def _none_if_clear(mask: torch.Tensor) -> torch.Tensor | None:
    """None when a CPU mask marks nothing, so that a step of full chunks skips its two zero-fills per layer
    (~2 % of a 16-stream bf16 step); on another device the mask stays (the check would wait for the device)."""
    return None if mask.device.type == "cpu" and not bool(mask.any()) else mask


def _pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-size-1 Conv1d applied to channels-last x [B, T, C_in] -> [B, T, C_out]."""
    if not isinstance(conv, nn.Conv1d):  # replaced by a channels-last product (the int8 path, precision.py)
        return conv(x)
    return packed_linear(conv, x, conv.weight.squeeze(-1), conv.bias, key=conv.weight)


class ConformerLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig, pos_bias_u=None, pos_bias_v=None):
        super().__init__()
        d = cfg.d_model
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = ConformerFeedForward(d, d * cfg.ff_expansion_factor, cfg.dropout, cfg.use_bias)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConformerConvolution(d, cfg.conv_kernel_size, cfg.conv_norm_type, cfg.use_bias)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionMultiHeadAttention(cfg.n_heads, d, cfg.dropout_att, cfg.use_bias,
                                                       pos_bias_u, pos_bias_v)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = ConformerFeedForward(d, d * cfg.ff_expansion_factor, cfg.dropout, cfg.use_bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm_out = nn.LayerNorm(d)

    fp32_residual = False  # set by the bf16 path (precision.py): bf16 blocks, an fp32 residual stream and norms

    def forward(self, x, att_mask: AttentionMask, pos_emb, pad_mask, kv_window=None, conv_window=None, layer=0):
        """Offline without windows; streaming, the windows hold this layer's cached K/V and conv inputs."""
        if self.fp32_residual:
            return self._forward_fp32_residual(x, att_mask, pos_emb, pad_mask, kv_window, conv_window, layer)
        residual = x + 0.5 * self.dropout(self.feed_forward1(self.norm_feed_forward1(x)))
        x = self.norm_self_att(residual)
        residual = residual + self.dropout(self.self_attn(x, att_mask, pos_emb, kv_window, layer))
        x = self.conv(self.norm_conv(residual), pad_mask, conv_window, layer)
        residual = residual + self.dropout(x)
        residual = residual + 0.5 * self.dropout(self.feed_forward2(self.norm_feed_forward2(residual)))
        return self.norm_out(residual.to(self.norm_out.weight.dtype))

    def _forward_fp32_residual(self, x, att_mask, pos_emb, pad_mask, kv_window, conv_window, layer):
        """`forward`'s maths with each block computing in its weights' dtype (bf16) and the residual stream,
        the norms and the layer's output in fp32; each residual add and the norm after it are one pass
        (`add_norm`).  Dropout is left out: the bf16 path only runs inference."""
        block = self.feed_forward1.linear1.weight.dtype
        x = x.float()
        _, h = add_norm(x, None, 0.0, self.norm_feed_forward1, block)
        residual, h = add_norm(x, self.feed_forward1(h), 0.5, self.norm_self_att, block)
        residual, h = add_norm(residual, self.self_attn(h, att_mask, pos_emb, kv_window, layer), 1.0,
                               self.norm_conv, block, in_place=True)
        residual, h = add_norm(residual, self.conv(h, pad_mask, conv_window, layer), 1.0,
                               self.norm_feed_forward2, block, in_place=True)
        return add_norm(residual, self.feed_forward2(h), 0.5, self.norm_out, torch.float32, in_place=True)[1]


# ------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------
def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, q_valid: torch.Tensor, k_valid: torch.Tensor,
                   context: tuple[int, int], style: str) -> torch.Tensor:
    """NeMo's streaming mask from absolute frame positions; True where attention is hidden.

    q_pos [B, T], k_pos [B, S] absolute frame indices; *_valid mark real (not padded) frames.
    """
    left, right = context
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    if style == "chunked_limited":
        size = right + 1
        diff = torch.div(q, size, rounding_mode="floor") - torch.div(k, size, rounding_mode="floor")
        visible = (diff >= 0) & (diff <= left // size)
    else:
        visible = (k >= q - left) & (k <= q + right)
    visible = visible & q_valid[:, :, None] & k_valid[:, None, :]
    return ~visible


def _rel_shift_index(t: int, width: int, device) -> torch.Tensor:
    """[t, width]: for query i and key j (in time order) the index into the 2*width - 1 relative positions
    that `rel_shift` moves to column j: rel_shift applied to the indices themselves."""
    p = 2 * width - 1
    index = torch.arange(p, device=device).expand(1, 1, t, p)
    return RelPositionMultiHeadAttention.rel_shift(index)[0, 0, :, :width]


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_encode = ConvSubsampling(cfg)
        if not cfg.untie_biases:
            d_k = cfg.d_model // cfg.n_heads
            self.pos_bias_u = nn.Parameter(torch.zeros(cfg.n_heads, d_k))
            self.pos_bias_v = nn.Parameter(torch.zeros(cfg.n_heads, d_k))
        self.pos_enc = RelPositionalEncoding(cfg.d_model, cfg.pos_emb_max_len,
                                             math.sqrt(cfg.d_model) if cfg.xscaling else None,
                                             cfg.dropout_pre_encoder, cfg.dropout_emb)
        shared = (None, None) if cfg.untie_biases else (self.pos_bias_u, self.pos_bias_v)
        self.layers = nn.ModuleList(ConformerLayer(cfg, *shared) for _ in range(cfg.n_layers))
        self.out_proj = nn.Linear(cfg.d_model, cfg.feat_out) if 0 < cfg.feat_out != cfg.d_model else None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the blocks compute and the streaming state is kept in (bf16 when the encoder was cast;
        its norms and residual stream stay fp32 then)."""
        return self.layers[0].self_attn.linear_pos.weight.dtype

    @property
    def output_dim(self) -> int:
        return self.cfg.feat_out if self.out_proj is not None else self.cfg.d_model

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor, context: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole utterances: mel [B, feat, T] -> encoded [B, T', d], lengths [B]."""
        context = tuple(context or self.cfg.att_context_size[0])
        x, lengths = self.pre_encode(mel.transpose(1, 2), lengths)
        x = x.to(self.compute_dtype)
        x, pos_emb = self.pos_enc(x)
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        valid = pos < lengths[:, None]
        att_mask = AttentionMask.of(attention_mask(pos, pos, valid, valid, context, self.cfg.att_context_style),
                                    x.dtype)
        pad_mask = _none_if_clear(~valid)
        for layer in self.layers:
            x = layer(x, att_mask, pos_emb, pad_mask)
        if self.out_proj is not None:
            x = linear(self.out_proj, x)
        return x.float(), lengths

    def stream(self, x: torch.Tensor, lengths: torch.Tensor, frames_done: torch.Tensor, cache_len: int,
               kv_window, conv_window, context: tuple[int, int]) -> torch.Tensor:
        """One chunk of subsampled frames for B streams.

        x [B, T, d] (already through `pre_encode`), lengths [B] valid frames, frames_done [B]
        frames each stream committed before; `cache_len` frames of left context are attended.
        `kv_window` and `conv_window` (`FrameRingWindow`s over the slot pool) store this chunk's
        projected K/V and conv inputs per layer in place and hand back each layer's window.
        """
        b, t, _ = x.shape
        x, pos_emb = self.pos_enc(x, cache_len=cache_len)
        q_pos = frames_done[:, None] + torch.arange(t, device=x.device)[None, :]
        end = (frames_done + lengths)[:, None]
        q_valid = q_pos < end
        key_index, positions = getattr(kv_window, "key_index", None), None
        if key_index is None:  # the window in time order
            k_pos = frames_done[:, None] + torch.arange(-cache_len, t, device=x.device)[None, :]
            k_valid = (k_pos >= 0) & (k_pos < end)
        else:  # the ring as it lies: row r holds frame key_index[b, r] of the window (none past its width)
            width = cache_len + t
            k_pos = frames_done[:, None] - cache_len + key_index
            k_valid = (key_index < width) & (k_pos >= 0) & (k_pos < end)
            in_time_order = _rel_shift_index(t, width, x.device)  # [T, width] -> index into the positions
            positions = in_time_order[:, key_index.clamp(max=width - 1)].transpose(0, 1).unsqueeze(1)
        att_mask = AttentionMask.of(attention_mask(q_pos, k_pos, q_valid, k_valid, context,
                                                   self.cfg.att_context_style), x.dtype, positions)
        pad_mask = _none_if_clear(~q_valid)
        for i, layer in enumerate(self.layers):
            x = layer(x, att_mask, pos_emb, pad_mask, kv_window, conv_window, i)
        if self.out_proj is not None:
            x = linear(self.out_proj, x)
        return x.float()
