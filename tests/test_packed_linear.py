"""Inference products through oneDNN-packed weights, and the channels-last depthwise convolution.

fp32 products take chorus' own kernel when it is built (tests/test_rows_kernel.py); the oneDNN tests here
switch it off, so that this path stays tested where the kernel cannot be built."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chorus.asr import rows_kernel
from chorus.asr import packed_linear as pl
from chorus.asr.depthwise import depthwise_channels_last

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture
def onednn_only(monkeypatch):
    """fp32 products through oneDNN (or F.linear), as on a machine where fp32_rows cannot be built."""
    monkeypatch.setenv("CHORUS_ROWS_KERNEL", "0")
    rows_kernel.reset()
    yield
    monkeypatch.delenv("CHORUS_ROWS_KERNEL")
    rows_kernel.reset()


def _lin(seed=0, d_in=96, d_out=40, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_linear_in_fp32(bias, onednn_only):
    lin = _lin(bias=bias)
    x = torch.randn(2, 7, 96)
    with torch.no_grad():
        ref = F.linear(x, lin.weight, lin.bias)
        out = pl.linear(lin, x)
    assert "_packed_weights" in lin.__dict__  # it did take the packed path
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_packed_bf16_close_to_fp32():
    lin = _lin()
    x = torch.randn(1, 7, 96)
    with torch.no_grad():
        ref = F.linear(x, lin.weight, lin.bias)
        lin.to(torch.bfloat16)
        out = pl.linear(lin, x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()


def test_training_and_other_batch_sizes_take_f_linear(onednn_only):
    lin = _lin()
    x = torch.randn(1, 7, 96)
    y = pl.linear(lin, x)  # grad enabled: the plain product, with autograd
    assert y.grad_fn is not None and "_packed_weights" not in lin.__dict__
    with torch.no_grad():
        x = torch.randn(pl.PACKED_MIN_ROWS - 1, 96)
        assert torch.equal(pl.linear(lin, x), F.linear(x, lin.weight, lin.bias))
    assert "_packed_weights" not in lin.__dict__


@pytest.mark.parametrize("rows", [pl.PACKED_BLOCK_ROWS + 1, 3 * pl.PACKED_BLOCK_ROWS - 5])
def test_large_products_go_through_in_blocks(rows, onednn_only):
    lin = _lin()
    x = torch.randn(rows, 96)
    with torch.no_grad():
        out = pl.linear(lin, x)
        ref = F.linear(x, lin.weight, lin.bias)
        assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
        # each block is a product of its own: a row's result is what the same row gives in a small batch
        assert torch.allclose(out[-7:], pl.linear(lin, x[-7:]), rtol=1e-6, atol=1e-6)
        lin.to(torch.bfloat16)
        fused = pl.linear_silu(lin, x.bfloat16())  # the swish post-op, in blocks too
        assert (fused.float() - F.silu(ref)).abs().max() <= 0.02 * ref.abs().max()


def test_weight_changes_are_seen(onednn_only):
    lin = _lin()
    x = torch.randn(5, 96)
    with torch.no_grad():
        before = pl.linear(lin, x)
        assert "_packed_weights" in lin.__dict__
        lin.weight.mul_(2.0)  # in place: a new version
        after = pl.linear(lin, x)
        assert torch.allclose(after - lin.bias, 2 * (before - lin.bias), rtol=1e-5, atol=1e-5)
        lin.weight.data = torch.zeros_like(lin.weight)  # a new tensor under the same Parameter
        assert torch.allclose(pl.linear(lin, x), lin.bias.expand(5, -1))


def test_copies_pack_their_own_weights(onednn_only):
    lin = _lin()
    x = torch.randn(5, 96)
    with torch.no_grad():
        pl.linear(lin, x)
        twin = copy.deepcopy(lin)
        twin.weight.zero_()
        assert torch.allclose(pl.linear(twin, x), twin.bias.expand(5, -1))
        assert torch.allclose(pl.linear(lin, x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        back = pickle.loads(pickle.dumps(lin))
        assert torch.allclose(pl.linear(back, x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_conv1d_view_is_keyed_by_its_parameter(onednn_only):
    torch.manual_seed(1)
    conv = nn.Conv1d(32, 64, 1)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        out = pl.packed_linear(conv, x, conv.weight.squeeze(-1), conv.bias, key=conv.weight)
        assert torch.allclose(out, conv(x.transpose(1, 2)).transpose(1, 2), rtol=1e-5, atol=1e-5)
        assert len(conv.__dict__["_packed_weights"].entries) == 1
        pl.packed_linear(conv, x, conv.weight.squeeze(-1), conv.bias, key=conv.weight)  # a new view: same entry
        assert len(conv.__dict__["_packed_weights"].entries) == 1


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch,t", [(1, 7), (5, 3)])
def test_depthwise_channels_last_equals_conv1d(bias, batch, t):
    torch.manual_seed(2)
    conv = nn.Conv1d(48, 48, 9, groups=48, bias=bias)
    window = torch.randn(batch, 8 + t, 48)
    with torch.no_grad():
        ref = conv(window.transpose(1, 2)).transpose(1, 2)
        out = depthwise_channels_last(conv, window)
    assert out.shape == (batch, t, 48)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
