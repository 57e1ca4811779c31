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


def depthwise_channels_last(conv: nn.Conv1d, window: torch.Tensor) -> torch.Tensor:
    """`conv` (depthwise, stride 1, no padding) over a channels-last window [B, k-1+T, C] -> [B, T, C].

    Summed in fp32 from the bias on, in tap order, the order oneDNN sums in (equal to `conv` in fp32 here);
    a bf16 window is cast once, and the result is returned in the window's dtype."""
    k = conv.kernel_size[0]
    t = window.shape[1] - k + 1
    w = conv.weight[:, 0].t().float().contiguous()  # [k, C]
    dtype, window = window.dtype, window.float()  # cast once, not in each multiply-add (bf16)
    first = window[:, :t]
    out = first * w[0] if conv.bias is None else torch.addcmul(conv.bias.float(), first, w[0])
    out = out.float()
    for j in range(1, k):
        out.addcmul_(window[:, j:j + t], w[j])
    return out.to(dtype)
