"""chorus' own kernels for few-row products (chorus/asr/rows_kernel.c, fp32 and bf16): built here, equal to
F.linear, a row's result independent of the batch, and a clean fallback when they cannot be built."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chorus.asr import rows_kernel
from chorus.asr import packed_linear as pl

CAN_BUILD = (shutil.which(os.environ.get("CC", "cc")) is not None
             and torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")))
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="no C compiler or no AVX-512 on this machine")
needs_bf16 = pytest.mark.skipif(not (CAN_BUILD and rows_kernel._cpu_has_avx512_bf16()),
                                reason="no C compiler, or no AVX512-BF16 on this CPU")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The kernel decided anew, built into an empty directory; the default state is restored after."""
    monkeypatch.setenv("CHORUS_KERNEL_DIR", str(tmp_path))
    rows_kernel.reset()
    yield tmp_path
    monkeypatch.undo()
    rows_kernel.reset()


@needs_kernel
def test_builds_here():
    assert rows_kernel.status().startswith("fp32 on")


@needs_kernel
@pytest.mark.parametrize("n,k", [(40, 96), (37, 17), (16, 300), (1025, 64), (33, 5)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_equals_linear(n, k, bias, threads):
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n, bias=bias)
    packed = rows_kernel.pack(lin.weight.detach())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 3, 7, 12, 13, 25, 40):
            x = torch.randn(rows, k)
            with torch.no_grad():
                out = rows_kernel.linear(x, packed, n, lin.bias)
                assert out.shape == (rows, n)
                assert torch.allclose(out, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5), rows
    finally:
        torch.set_num_threads(previous)


@needs_kernel
def test_split_over_threads_is_bit_equal():
    """Large enough to be split between two threads; every column block is computed the same way."""
    torch.manual_seed(1)
    w, b = torch.randn(2048, 512) * 0.05, torch.randn(2048)
    packed = rows_kernel.pack(w)
    assert packed.nbytes >= 2 * rows_kernel.SPLIT_MIN_WEIGHT_BYTES
    x = torch.randn(7, 512)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = rows_kernel.linear(x, packed, 2048, b)
        torch.set_num_threads(2)
        split = rows_kernel.linear(x, packed, 2048, b)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(alone, split)


@needs_kernel
def test_a_row_does_not_depend_on_its_batch():
    """Law 2 at the level of one product: bit for bit, across the 12-row tiles."""
    torch.manual_seed(2)
    w, b = torch.randn(100, 64), torch.randn(100)
    packed = rows_kernel.pack(w)
    x = torch.randn(30, 64)
    batched = rows_kernel.linear(x, packed, 100, b)
    for r in (0, 11, 12, 29):
        assert torch.equal(rows_kernel.linear(x[r:r + 1], packed, 100, b), batched[r:r + 1])
    assert torch.equal(rows_kernel.linear(x[5:19], packed, 100, b), batched[5:19])


@needs_kernel
def test_packed_linear_uses_it_and_sees_weight_changes():
    lin = nn.Linear(96, 40)
    x = torch.randn(2, 7, 96)
    with torch.no_grad():
        before = pl.linear(lin, x)
        kinds = {kind for _, kind in lin.__dict__["_packed_weights"].entries}
        assert kinds == {"rows"}
        lin.weight.mul_(2.0)
        after = pl.linear(lin, x)
        assert torch.allclose(after - lin.bias, 2 * (before - lin.bias), rtol=1e-5, atol=1e-5)
        x_strided = torch.randn(96, 2, 7).permute(1, 2, 0)  # not contiguous: copied first
        assert torch.allclose(pl.linear(lin, x_strided), F.linear(x_strided, lin.weight, lin.bias),
                              rtol=1e-5, atol=1e-5)


@needs_kernel
def test_built_once_then_loaded(fresh):
    assert rows_kernel.status().startswith("fp32 on")
    (library,) = fresh.glob("rows_kernel-*.so")
    stamp = library.stat().st_mtime_ns
    rows_kernel.reset()
    assert rows_kernel.status().startswith("fp32 on")
    assert library.stat().st_mtime_ns == stamp and list(fresh.glob("*")) == [library]  # no rebuild, no leftovers


def test_switched_off_falls_back(fresh, monkeypatch):
    monkeypatch.setenv("CHORUS_ROWS_KERNEL", "0")
    assert rows_kernel.kernel() is None and "CHORUS_ROWS_KERNEL" in rows_kernel.status()
    lin = nn.Linear(96, 40)
    x = torch.randn(7, 96)
    with torch.no_grad():
        assert torch.allclose(pl.linear(lin, x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert "rows" not in {kind for _, kind in lin.__dict__.get("_packed_weights", pl.PackedWeights()).entries}


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")),
                    reason="no AVX-512: the kernel is off for that reason instead")
def test_a_failed_build_says_why_and_falls_back(fresh, monkeypatch):
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    assert rows_kernel.kernel() is None
    assert rows_kernel.status().startswith("off (build failed")
    assert list(fresh.glob("*")) == []  # the partial output is removed
    lin = nn.Linear(96, 40)
    x = torch.randn(7, 96)
    with torch.no_grad():
        assert torch.allclose(pl.linear(lin, x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@needs_bf16
@pytest.mark.parametrize("n,k", [(40, 96), (37, 18), (1025, 64), (16, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_equals_linear_within_one_rounding(n, k, bias):
    """fp32 sums of exact bf16 products, rounded once: within a bf16 rounding of the fp32 product of the same
    bf16 numbers, whatever the row count; and a row alone is bit-equal to the row in a batch."""
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    packed = rows_kernel.pack(lin.weight.detach())
    x = torch.randn(25, k).bfloat16()
    with torch.no_grad():
        out = rows_kernel.linear(x, packed, n, lin.bias)
        ref = F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
        assert out.dtype == torch.bfloat16 and out.shape == (25, n)
        assert ((out.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-3).all()
        for r in (0, 7, 12, 24):
            assert torch.equal(rows_kernel.linear(x[r:r + 1], packed, n, lin.bias), out[r:r + 1])


@needs_bf16
def test_bf16_products_of_one_stream_take_it_and_silu_stays_right():
    lin = nn.Linear(96, 40).to(torch.bfloat16)
    x = torch.randn(1, 7, 96).bfloat16()
    with torch.no_grad():
        y = pl.linear_silu(lin, x)
        assert {kind for _, kind in lin.__dict__["_packed_weights"].entries} == {"rows"}
        ref = F.silu(F.linear(x.float(), lin.weight.float(), lin.bias.float()))
        assert (y.float() - ref).abs().max() <= 0.02 * ref.abs().max()
        big = torch.randn(9, 7, 96).bfloat16()  # 63 rows: oneDNN (with or without AMX), with its fused swish
        assert (pl.linear_silu(lin, big).float()
                - F.silu(F.linear(big.float(), lin.weight.float(), lin.bias.float()))).abs().max() < 0.05
        assert "onednn" in {kind for _, kind in lin.__dict__["_packed_weights"].entries}


@needs_bf16
@pytest.mark.parametrize("channels,out_dtype", [(256, torch.bfloat16), (48, torch.bfloat16), (256, torch.float32)])
def test_first_convolution_kernel_equals_torch(channels, out_dtype):
    """The bf16 path's first subsampling convolution (product, bias, ReLU and cast in one pass; 48 channels:
    fewer than 8 blocks of 16) against torch's convolution: within one bf16 rounding, or fp32's own rounding for
    the fp32 output a depthwise convolution in fp32 reads, and a stream's output independent of the batch."""
    from chorus.asr.conformer.model import CausalConv2D, _first_conv_relu
    torch.manual_seed(channels)
    conv = CausalConv2D(1, channels, 3, 2).eval()
    x = torch.randn(5, 1, 33, 80).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rows_kernel.fused("conv_taps_relu") is not None
        got = _first_conv_relu(x, conv, out_dtype, bf16_path=True)
        want = torch.relu(F.conv2d(x, conv.weight, conv.bias, stride=2, padding=2))[:, :, :got.shape[2], :got.shape[3]]
        alone = _first_conv_relu(x[3:4].contiguous(memory_format=torch.channels_last), conv, out_dtype, True)
        torch_path = _first_conv_relu(x, conv, out_dtype)  # the fp32 path's: torch's sums
    assert got.dtype == out_dtype and got.shape == want.shape
    tolerance = dict(rtol=2 ** -8, atol=1e-6) if out_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.float(), want, **tolerance)
    assert torch.allclose(torch_path.float(), want, **tolerance)
    assert (got == 0).sum() > 0.3 * got.numel()   # the ReLU ran
    assert torch.equal(alone[0], got[3])


@needs_bf16
@pytest.mark.parametrize("channels,bias", [(256, True), (48, False)])
def test_first_two_subsampling_convolutions_kernel_equals_torch(channels, bias):
    """The bf16 path's first convolution, ReLU and depthwise convolution in one pass (the first convolution's
    output made row by row in cache) against torch's convolutions with the masking between them: within fp32's
    rounding, streams shorter than the batch included, and a stream's output independent of the batch and of the
    threads the batch is split over."""
    from chorus.asr.conformer.model import CausalConv2D, _first_two_convs, _time_mask, _zero_beyond, \
        causal_conv_length
    torch.manual_seed(channels)
    convs = torch.nn.Sequential(CausalConv2D(1, channels, 3, 2, bias=bias), torch.nn.ReLU(True),
                                CausalConv2D(channels, channels, 3, 2, groups=channels, bias=bias)).eval()
    lengths = torch.tensor([65, 40, 7, 64, 1])
    x = torch.randn(5, 1, 65, 80).masked_fill(~_time_mask(lengths, 65)[:, None, :, None], 0.0)
    x = x.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    with torch.no_grad():
        assert rows_kernel.fused("subsample_first_two") is not None
        try:
            torch.set_num_threads(1)
            got, got_lengths, t2, f2 = _first_two_convs(x, lengths, convs, 80)
            torch.set_num_threads(2)  # streams split over two threads
            split = _first_two_convs(x, lengths, convs, 80)[0]
        finally:
            torch.set_num_threads(threads)
        alone = _first_two_convs(x[2:3].contiguous(memory_format=torch.channels_last), lengths[2:3], convs, 80)[0]
        h = torch.relu(F.conv2d(x, convs[0].weight, convs[0].bias, stride=2, padding=2))
        lengths1 = causal_conv_length(lengths, 1)
        h = _zero_beyond(h, lengths1, causal_conv_length(65, 1), causal_conv_length(80, 1))
        want = F.conv2d(h, convs[2].weight, convs[2].bias, stride=2, padding=2, groups=channels)
    assert (t2, f2) == (causal_conv_length(65, 2), causal_conv_length(80, 2)) == tuple(got.shape[2:])
    assert torch.equal(got_lengths, causal_conv_length(lengths, 2))
    want = want[:, :, :t2, :f2]
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(alone[0], got[2]) and torch.equal(split, got)
    if not bias:  # past a stream's end the first convolution's output is zero, so the depthwise one gives zero
        assert got[4, :, 2:].abs().max() == 0 and got[4, :, :1].abs().max() > 0


@needs_bf16
@pytest.mark.parametrize("channels,bias", [(512, True), (48, False)])
def test_depthwise_norm_swish_kernel_equals_torch(channels, bias):
    """The bf16 path's depthwise convolution + layer norm + Swish in one pass against torch's ops in fp32: the
    same as their result rounded to bf16 but for the last bit of a few, and a stream independent of the batch."""
    from chorus.asr.depthwise import depthwise_channels_last, depthwise_norm_silu
    torch.manual_seed(channels)
    conv = nn.Conv1d(channels, channels, 9, groups=channels, bias=bias)
    norm = nn.LayerNorm(channels)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        window = (torch.randn(6, 15, channels) * 3).bfloat16()
        got = depthwise_norm_silu(conv, norm, window)
        want = F.silu(norm(depthwise_channels_last(conv, window, out_dtype=torch.float32)))
        alone = depthwise_norm_silu(conv, norm, window[4:5].clone())
    assert got.dtype == torch.bfloat16 and got.shape == (6, 7, channels)
    assert torch.allclose(got.float(), want, rtol=2 ** -7, atol=1e-3)
    assert (got == want.bfloat16()).float().mean() > 0.99
    assert torch.equal(alone[0], got[4])
    assert depthwise_norm_silu(conv, norm, window.float()) is None   # fp32 windows take torch's ops


@needs_bf16
@pytest.mark.parametrize("streams,heads,frames,keys,width", [(5, 4, 7, 77, 64), (3, 2, 3, 19, 18), (2, 3, 1, 1, 2)])
def test_ring_attention_kernel_equals_nemos_formula(streams, heads, frames, keys, width):
    """The bf16 attention over keys read where they lie in a ring pool (strided views), positional term included:
    NeMo's formula in fp32 on the same bf16 inputs, to within the output's rounding, and closer to it than torch's
    bf16 path (position product, gather, add, fused attention); a stream's rows do not depend on its batch."""
    from chorus.asr.conformer.model import AttentionMask, RelPositionMultiHeadAttention, _rel_shift_index
    torch.manual_seed(keys)
    d = heads * width
    attn = RelPositionMultiHeadAttention(heads, d, 0.0, True, None, None).eval()
    with torch.no_grad():
        for w in attn.parameters():
            w.normal_(0, d ** -0.5)
    attn = attn.bfloat16()
    pool = torch.randn(streams + 2, 3, keys + 1, 2 * d).bfloat16()   # [slots, layers, ring rows + trash, K|V]
    window = pool[1:1 + streams, 1, :keys]
    k, v = window[..., :d], window[..., d:]
    q_u, q_v = torch.randn(2, streams, frames, heads, width).bfloat16()
    pos_emb = torch.randn(1, 2 * keys - 1, d).bfloat16()
    key_index = torch.stack([torch.randperm(keys) for _ in range(streams)])
    positions = _rel_shift_index(frames, keys, "cpu")[:, key_index].transpose(0, 1).unsqueeze(1)
    hidden = torch.rand(streams, frames, keys) < 0.3
    hidden[..., 0] = False
    mask = AttentionMask.of(hidden, torch.bfloat16, positions)
    scale = 1.0 / attn.s_d_k
    with torch.no_grad():
        got = attn._ring_attention(q_u, q_v, k, v, mask, pos_emb)
        one = AttentionMask.of(hidden[2:3], torch.bfloat16, positions[2:3]) if streams > 2 else None
        alone = attn._ring_attention(q_u[2:3], q_v[2:3], k[2:3], v[2:3], one, pos_emb) if one else None
        p = attn.project_positions(pos_emb, "p_dk").float()                               # [H, P, d_k]
        heads_of = lambda x: x.float().reshape(streams, keys, heads, width).transpose(1, 2)  # noqa: E731
        pos_rows = p[:, positions[:, 0]].permute(1, 0, 2, 3, 4)                           # [B, H, T, S, d_k]
        content = q_u.float().transpose(1, 2) @ heads_of(k).transpose(-1, -2)
        positional = (q_v.float().transpose(1, 2)[..., None, :] * pos_rows).sum(-1)
        weights = torch.softmax(scale * (content + positional) + mask.bias.float(), dim=-1)
        exact = (weights @ heads_of(v)).transpose(1, 2)
        scores = attn.position_scores(q_v, pos_emb)
        bias = torch.add(mask.bias, scores.gather(-1, positions.expand(streams, heads, frames, keys)), alpha=scale)
        torch_bf16 = F.scaled_dot_product_attention(q_u.transpose(1, 2), heads_of(k).bfloat16(),
                                                    heads_of(v).bfloat16(), attn_mask=bias, scale=scale).transpose(1, 2)
        assert attn._ring_attention(q_u.float(), q_v.float(), k.float(), v.float(), mask, pos_emb) is None  # fp32
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (streams, frames, heads, width)
    assert torch.allclose(got.float(), exact, rtol=2 ** -7, atol=2e-3)
    assert (got.float() - exact).norm() <= (torch_bf16.float() - exact).norm()
    if alone is not None:
        assert torch.equal(alone[0], got[2])


@needs_bf16
def test_lstm_cell_kernel_equals_the_predictor_step():
    """The bf16 path's greedy label step (heads.step_emitting): the emitting streams' state as `step` gives it,
    within the kernel's sigmoid/tanh error; the others untouched; and greedy decoding through it or through
    `step` gives the same tokens here."""
    from chorus.asr.conformer.decoding import rnnt_greedy
    from chorus.asr.conformer.heads import RNNTJoint, RNNTPredictor
    from chorus.asr.dtypes import cast_to_bf16
    torch.manual_seed(0)
    pred, joint = RNNTPredictor(40, 32).eval(), RNNTJoint(24, 32, 48, 40).eval()
    cast_to_bf16(pred.prediction["dec_rnn"])
    h, c = pred.initial_state(6)
    h.normal_()
    c.normal_(std=3)
    labels, emit = torch.randint(0, 40, (6,)), torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    with torch.no_grad():
        assert pred.emitting_kernel(h) is not None
        want, (h1, c1) = pred.step(torch.where(emit, labels, pred.blank), (h, c))
        hk, ck, out = h.clone(), c.clone(), h[0].clone()
        pred.step_emitting(labels, emit, hk, ck, out)
    assert torch.allclose(hk[:, emit], h1[:, emit], atol=1e-6) and torch.allclose(ck[:, emit], c1[:, emit], atol=2e-6)
    assert torch.equal(hk[:, ~emit], h[:, ~emit]) and torch.equal(ck[:, ~emit], c[:, ~emit])
    assert torch.equal(out, hk[0])
    enc = torch.randn(6, 9, 24)
    lengths = torch.tensor([9, 9, 5, 9, 1, 7])
    state, start = pred.initial_state(6), torch.zeros(6, 32)
    with torch.no_grad():
        fused = rnnt_greedy(joint, pred, enc, lengths, state, start)
        with rows_kernel.switched_off():
            plain = rnnt_greedy(joint, pred, enc, lengths, state, start)
    assert torch.equal(fused[0], plain[0]) and (fused[0] >= 0).sum() > 5
    assert torch.allclose(fused[1][0], plain[1][0], atol=1e-5)
