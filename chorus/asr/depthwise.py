"""Depthwise (per-channel) 1-D convolutions over channels-last windows, for inference.

A streaming step convolves a few frames per stream.  `nn.Conv1d` with `groups=channels` wants channels first and
goes through oneDNN's grouped convolution, which at these sizes costs more than the arithmetic (the
FastConformer's depthwise convolution ran 1.2-2x faster this way at 1-64 streams; the Paraformer's FSMN blocks,
kernel 11 over 512 channels, took ~350 us a call through Conv1d at one stream).  Here the convolution is k
multiply-adds of shifted views of the window, with no transposed copies.
"""
from __future__ import annotations

import torch
from torch import nn

from . import rows_kernel


def depthwise_channels_last(conv: nn.Conv1d, window: torch.Tensor, out_dtype: torch.dtype | None = None
                            ) -> torch.Tensor:
    """`conv` (depthwise, stride 1, no padding) over a channels-last window [B, k-1+T, C] -> [B, T, C].

    Summed in fp32 from the bias on, in tap order, the order oneDNN sums in (equal to `conv` in fp32 here);
    a bf16 window is cast once, and the result is returned in `out_dtype` (default: the window's dtype)."""
    k = conv.kernel_size[0]
    t = window.shape[1] - k + 1
    w = _taps(conv)  # [k, C]
    dtype, window = window.dtype, window.float()  # cast once, not in each multiply-add (bf16)
    first = window[:, :t]
    out = first * w[0] if conv.bias is None else torch.addcmul(conv.bias.float(), first, w[0])
    out = out.float()
    for j in range(1, k):
        out.addcmul_(window[:, j:j + t], w[j])
    return out.to(out_dtype or dtype)


def depthwise_norm_silu(conv: nn.Conv1d, norm: nn.Module, window: torch.Tensor) -> torch.Tensor | None:
    """silu(norm(conv(window))) in bf16 through chorus' kernel (rows_kernel.c), for a bf16 window [B, k-1+T, C]
    with an fp32 depthwise `conv` and LayerNorm `norm` (the FastConformer's bf16 path), or None where the
    kernel does not apply (the caller then takes torch's ops)."""
    kernel = rows_kernel.fused("depthwise_norm_silu")
    if (kernel is None or torch.is_grad_enabled() or not isinstance(norm, nn.LayerNorm)
            or window.dtype != torch.bfloat16 or not window.is_cpu or not window.is_contiguous()
            or conv.weight.dtype != torch.float32 or norm.weight is None or norm.bias is None
            or norm.weight.dtype != torch.float32 or norm.bias.dtype != torch.float32
            or (conv.bias is not None and conv.bias.dtype != torch.float32)):
        return None
    b, frames, channels = window.shape
    k = conv.kernel_size[0]
    if channels % 16 or not 16 <= channels <= 8192 or frames < k or norm.normalized_shape != (channels,):
        return None
    t = frames - k + 1
    out = torch.empty(b, t, channels, dtype=torch.bfloat16)
    if kernel(b, t, k, channels, window.data_ptr(), _taps(conv).data_ptr(),
              None if conv.bias is None else conv.bias.data_ptr(), norm.weight.data_ptr(), norm.bias.data_ptr(),
              norm.eps, out.data_ptr()):
        raise ValueError(f"depthwise_norm_silu kernel rejected window {tuple(window.shape)}")
    return out


def _taps(conv: nn.Conv1d) -> torch.Tensor:
    """conv's weight as fp32 [k, C], contiguous: at inference built once per weight (and again if it changes)."""
    weight = conv.weight
    if torch.is_grad_enabled():
        return weight[:, 0].t().float().contiguous()
    stamp = (weight.data_ptr(), weight._version, weight.dtype)
    cached = conv.__dict__.get("_depthwise_taps")
    if cached is None or cached[0] != stamp:
        cached = conv.__dict__["_depthwise_taps"] = (stamp, weight.detach()[:, 0].t().float().contiguous())
    return cached[1]
