"""The bf16 path's fused residual add + layer norm (chorus/asr/residual_norm.py, `bf16_add_layer_norm` in
rows_kernel.c): the fp32 residual exactly as torch adds it, the norm as torch's within rounding, a row's result
independent of the batch, and the same maths without the kernel."""
import os
import shutil
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chorus.asr import rows_kernel
from chorus.asr.residual_norm import add_norm

needs_kernel = pytest.mark.skipif(
    not (shutil.which(os.environ.get("CC", "cc")) is not None
         and torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))
         and rows_kernel._cpu_has_avx512_bf16()
         and os.environ.get("CHORUS_ROWS_KERNEL", "1").lower() not in ("0", "off", "false", "no")),
    reason="no C compiler, no AVX512-BF16 on this CPU, or CHORUS_ROWS_KERNEL=0: add_norm takes torch's ops")


def make_norm(width: int, seed: int) -> nn.LayerNorm:
    torch.manual_seed(seed)
    norm = nn.LayerNorm(width)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def reference(residual, y, alpha, norm):
    r = residual if y is None else residual + alpha * y.float()
    return r, F.layer_norm(r, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


@needs_kernel
def test_kernel_is_on_here():
    assert rows_kernel.fused("add_layer_norm") is not None


@pytest.mark.parametrize("width", [64, 512, 80])    # 80: not a multiple of 64 (the kernel's unrolled sums)
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("kernel", [True, False])
def test_matches_torch(width, alpha, kernel):
    if kernel and rows_kernel.fused("add_layer_norm") is None:
        pytest.skip("no kernel on this machine")
    norm = make_norm(width, seed=width)
    residual = torch.randn(3, 7, width) * 4 + 2   # an offset mean, as a residual stream has
    y = torch.randn(3, 7, width).bfloat16()
    want_r, want = reference(residual, y, alpha, norm)
    with torch.no_grad(), (nullcontext() if kernel else rows_kernel.switched_off()):
        r, out32 = add_norm(residual, y, alpha, norm, torch.float32)
        _, out16 = add_norm(residual, y, alpha, norm, torch.bfloat16)
    assert torch.equal(r, want_r)                       # the residual add is exact in fp32
    assert out32.dtype == torch.float32 and out16.dtype == torch.bfloat16
    assert torch.allclose(out32, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out16, out32.bfloat16())         # one rounding, of the fp32 result


@needs_kernel
def test_in_place_and_without_an_add():
    norm = make_norm(64, seed=3)
    residual = torch.randn(5, 64)
    y = torch.randn(5, 64).bfloat16()
    before = residual.clone()
    with torch.no_grad():
        r, _ = add_norm(residual, y, 1.0, norm, torch.bfloat16)
        assert r is not residual and torch.equal(residual, before)
        r, out = add_norm(residual, None, 0.0, norm, torch.bfloat16)
        assert r is residual and torch.allclose(out.float(), reference(before, None, 0, norm)[1], atol=2e-2)
        r, _ = add_norm(residual, y, 0.5, norm, torch.float32, in_place=True)
        assert r is residual and torch.equal(residual, before + 0.5 * y.float())


@needs_kernel
def test_a_row_does_not_depend_on_the_batch():
    norm = make_norm(512, seed=5)
    residual = torch.randn(16, 7, 512) * 3
    y = torch.randn(16, 7, 512).bfloat16()
    with torch.no_grad():
        r, out = add_norm(residual, y, 0.5, norm, torch.bfloat16)
        for b in (0, 9, 15):
            r1, out1 = add_norm(residual[b:b + 1].clone(), y[b:b + 1].clone(), 0.5, norm, torch.bfloat16)
            assert torch.equal(r1[0], r[b]) and torch.equal(out1[0], out[b])


def test_autograd_takes_torch():
    """Training never runs the kernel: gradients flow through torch's ops."""
    norm = make_norm(64, seed=6)
    residual = torch.randn(2, 64, requires_grad=True)
    y = torch.randn(2, 64).bfloat16()
    r, out = add_norm(residual, y, 0.5, norm, torch.float32)
    out.sum().backward()
    assert residual.grad is not None and norm.weight.grad is not None

