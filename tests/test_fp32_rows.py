"""chorus' own fp32 kernel for few-row products (chorus/asr/fp32_rows.c): built here, equal to F.linear,
a row's result independent of the batch, and a clean fallback when it cannot be built."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chorus.asr import fp32_rows
from chorus.asr import packed_linear as pl

CAN_BUILD = (shutil.which(os.environ.get("CC", "cc")) is not None
             and torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")))
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="no C compiler or no AVX-512 on this machine")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The kernel decided anew, built into an empty directory; the default state is restored after."""
    monkeypatch.setenv("CHORUS_KERNEL_DIR", str(tmp_path))
    fp32_rows.reset()
    yield tmp_path
    monkeypatch.undo()
    fp32_rows.reset()


@needs_kernel
def test_builds_here():
    assert fp32_rows.status() == "on"


@needs_kernel
@pytest.mark.parametrize("n,k", [(40, 96), (37, 17), (16, 300), (1025, 64), (33, 5)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_equals_linear(n, k, bias, threads):
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n, bias=bias)
    packed = fp32_rows.pack(lin.weight.detach())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 3, 7, 12, 13, 25, 40):
            x = torch.randn(rows, k)
            with torch.no_grad():
                out = fp32_rows.linear(x, packed, n, lin.bias)
                assert out.shape == (rows, n)
                assert torch.allclose(out, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5), rows
    finally:
        torch.set_num_threads(previous)


@needs_kernel
def test_split_over_threads_is_bit_equal():
    """Large enough to be split between two threads; every column block is computed the same way."""
    torch.manual_seed(1)
    w, b = torch.randn(2048, 512) * 0.05, torch.randn(2048)
    packed = fp32_rows.pack(w)
    assert packed.nbytes >= 2 * fp32_rows.SPLIT_MIN_WEIGHT_BYTES
    x = torch.randn(7, 512)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = fp32_rows.linear(x, packed, 2048, b)
        torch.set_num_threads(2)
        split = fp32_rows.linear(x, packed, 2048, b)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(alone, split)


@needs_kernel
def test_a_row_does_not_depend_on_its_batch():
    """Law 2 at the level of one product: bit for bit, across the 12-row tiles."""
    torch.manual_seed(2)
    w, b = torch.randn(100, 64), torch.randn(100)
    packed = fp32_rows.pack(w)
    x = torch.randn(30, 64)
    batched = fp32_rows.linear(x, packed, 100, b)
    for r in (0, 11, 12, 29):
        assert torch.equal(fp32_rows.linear(x[r:r + 1], packed, 100, b), batched[r:r + 1])
    assert torch.equal(fp32_rows.linear(x[5:19], packed, 100, b), batched[5:19])


@needs_kernel
def test_packed_linear_uses_it_and_sees_weight_changes():
    lin = nn.Linear(96, 40)
    x = torch.randn(2, 7, 96)
    with torch.no_grad():
        before = pl.linear(lin, x)
        kinds = {kind for _, kind in lin.__dict__["_packed_weights"].entries}
        assert kinds == {"fp32_rows"}
        lin.weight.mul_(2.0)
        after = pl.linear(lin, x)
        assert torch.allclose(after - lin.bias, 2 * (before - lin.bias), rtol=1e-5, atol=1e-5)
        x_strided = torch.randn(96, 2, 7).permute(1, 2, 0)  # not contiguous: copied first
        assert torch.allclose(pl.linear(lin, x_strided), F.linear(x_strided, lin.weight, lin.bias),
                              rtol=1e-5, atol=1e-5)


@needs_kernel
def test_built_once_then_loaded(fresh):
    assert fp32_rows.status() == "on"
    (library,) = fresh.glob("fp32_rows-*.so")
    stamp = library.stat().st_mtime_ns
    fp32_rows.reset()
    assert fp32_rows.status() == "on"
    assert library.stat().st_mtime_ns == stamp and list(fresh.glob("*")) == [library]  # no rebuild, no leftovers


def test_switched_off_falls_back(fresh, monkeypatch):
    monkeypatch.setenv("CHORUS_FP32_KERNEL", "0")
    assert fp32_rows.kernel() is None and "CHORUS_FP32_KERNEL" in fp32_rows.status()
    lin = nn.Linear(96, 40)
    x = torch.randn(7, 96)
    with torch.no_grad():
        assert torch.allclose(pl.linear(lin, x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert "fp32_rows" not in {kind for _, kind in lin.__dict__.get("_packed_weights", pl.PackedWeights()).entries}


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")),
                    reason="no AVX-512: the kernel is off for that reason instead")
def test_a_failed_build_says_why_and_falls_back(fresh, monkeypatch):
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    assert fp32_rows.kernel() is None
    assert fp32_rows.status().startswith("off (build failed")
    assert list(fresh.glob("*")) == []  # the partial output is removed
    lin = nn.Linear(96, 40)
    x = torch.randn(7, 96)
    with torch.no_grad():
        assert torch.allclose(pl.linear(lin, x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
