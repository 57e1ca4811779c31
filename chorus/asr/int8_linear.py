"""int8 matrix products for the `--dtype int8` compute path of every ASR family.

`Int8Linear` computes y = x W^T + b as int8 x int8 -> int32 with `torch._int_mm` (ATen's integer GEMM,
oneDNN/VNNI on x86; what torchao's int8 dynamic-activation path calls): the weight quantized once per
output channel (symmetric), the activations per token at each call (dynamic, symmetric), the int32 sums
scaled back to fp32.  Each token is quantized on its own and its sums are exact, so a token's output
does not depend on the other rows of the call: batched equals alone, and streaming equals offline,
hold in int8 as they do in fp32.  Neither the deprecated `torch.ao.quantization` eager API nor its
quantized tensors.
"""
from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel and x quantized per token at each call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight_t", torch.round(weight / scale[:, None]).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def of(cls, module: nn.Module) -> "Int8Linear":
        """From an nn.Linear or a kernel-1 nn.Conv1d (applied channels-last)."""
        weight = module.weight.squeeze(-1) if isinstance(module, nn.Conv1d) else module.weight
        return cls(weight, module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).float()
        # As few passes over the activations as possible: at 64 streams the quantize and dequantize
        # passes, not the integer product, were most of the time.  abs().amax is the inf-norm bit for bit
        # and ~10x faster than torch.linalg.vector_norm(x, inf, dim=1) here (bench/README.md, "Compute dtypes").
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
        xq = torch.div(x, x_scale).round_().to(torch.int8)
        y = torch.mul(torch._int_mm(xq, self.weight_t), self.weight_scale).mul_(x_scale)  # int32 -> fp32
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features)


@torch.no_grad()
def quantize_linears(module: nn.Module, keep: tuple[nn.Module, ...] = ()) -> int:
    """Replace (in place) every nn.Linear inside `module` by its Int8Linear, except the modules in
    `keep` (and what they contain).  Returns how many were replaced."""
    kept = {id(m) for k in keep for m in k.modules()}
    count = 0
    for parent in list(module.modules()):
        if id(parent) in kept:
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child) not in kept:
                setattr(parent, name, Int8Linear.of(child))
                count += 1
    return count
