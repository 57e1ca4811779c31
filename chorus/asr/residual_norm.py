"""The bf16 path's residual stream in fp32: `r + alpha y`, then the next block's layer norm, in one pass.

With `--dtype bf16` a FastConformer layer's products run in bf16, but the residual stream they add into and
the layer norms that read it stay fp32 (autocast's mix): the residual is not rounded to bf16 at every add,
and the norms keep their exact fp32 weights.  In torch that mix costs a pass per cast and per mixed-dtype add
(4-17 % of a 16-64 stream step, measured before this module), more than the all-bf16 step; chorus' kernel
(`bf16_add_layer_norm` in rows_kernel.c) does the add, the norm and the cast to bf16 in one pass over each row.
Without the kernel (no AVX512-BF16, another device, autograd) torch computes the same maths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import rows_kernel

_MAX_WIDTH = 8192  # the kernel's row buffer


def add_norm(residual: torch.Tensor, y: torch.Tensor | None, alpha: float, norm: nn.LayerNorm,
             out_dtype: torch.dtype, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, norm(r) in `out_dtype`) with r = residual + alpha * y in fp32 (r = residual when y is None).

    `residual` is fp32 [..., D]; `y` a block's output in any float dtype.  With `in_place`, r is written
    into `residual` (the caller owns it); otherwise r is a new tensor (or `residual` itself when y is None)."""
    kernel = rows_kernel.fused("add_layer_norm")
    if kernel is not None and _kernel_takes(residual, y, norm, out_dtype):
        width = residual.shape[-1]
        if y is None:
            result = residual
        else:
            result = residual if in_place else torch.empty_like(residual)
        out = torch.empty(residual.shape, dtype=out_dtype)
        if kernel(residual.numel() // width, width, residual.data_ptr(), None if y is None else y.data_ptr(),
                  alpha, None if y is None else result.data_ptr(), norm.weight.data_ptr(), norm.bias.data_ptr(),
                  norm.eps, out.data_ptr(), out_dtype == torch.bfloat16):
            raise ValueError(f"add_layer_norm kernel rejected {tuple(residual.shape)}")
        return result, out
    if y is not None:
        r = residual.add_(y, alpha=alpha) if in_place and not torch.is_grad_enabled() else \
            torch.add(residual, y.to(residual.dtype), alpha=alpha)
    else:
        r = residual
    return r, F.layer_norm(r, norm.normalized_shape, norm.weight, norm.bias, norm.eps).to(out_dtype)


def _kernel_takes(residual: torch.Tensor, y: torch.Tensor | None, norm: nn.LayerNorm, out_dtype) -> bool:
    """Contiguous CPU tensors of the kernel's dtypes, no autograd, a norm over the last dimension with fp32
    affine weights; the norm's part is checked again only when its weights' storage or dtype change."""
    weight, bias = norm.weight, norm.bias
    if weight is None or bias is None:
        return False
    stamp = (weight.data_ptr(), weight.dtype, bias.data_ptr(), bias.dtype)
    if norm.__dict__.get("_add_norm_checked") != stamp:
        width = norm.normalized_shape[-1]
        if not (weight.dtype == bias.dtype == torch.float32 and weight.is_cpu and len(norm.normalized_shape) == 1
                and width % 16 == 0 and 16 <= width <= _MAX_WIDTH and weight.is_contiguous() and bias.is_contiguous()):
            return False
        norm.__dict__["_add_norm_checked"] = stamp
    return (residual.dtype == torch.float32 and residual.is_cpu and residual.is_contiguous()
            and residual.shape[-1] == weight.shape[0] and residual.numel() > 0 and not torch.is_grad_enabled()
            and (y is None or (y.dtype == torch.bfloat16 and y.is_contiguous() and y.shape == residual.shape))
            and out_dtype in (torch.bfloat16, torch.float32))
