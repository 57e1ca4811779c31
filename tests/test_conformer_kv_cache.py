"""The projected-K/V frame rings equal the attention-input cache they replaced (NeMo's layout).

chorus used to cache, per layer, the attention *input* of the last C frames and project all of them
to K and V again every step (as NeMo does).  It now keeps projected K and V (and the depthwise conv
inputs) in frame rings written in place.  The reference below is the old path, written out here: the
attention input concatenated with the chunk, K/V projected over all of it, NeMo's explicit
softmax attention, the caches sliced from the concatenation.  Stepped over the same frames, both give
the same encoder output, and the rings hold exactly the projections of the old caches.
"""
import pytest
import torch
import torch.nn.functional as F

from chorus.asr.conformer.model import MASK_VALUE, AttentionMask, attention_mask
from chorus.asr.conformer.streaming import ConformerStreamer
from chorus.cache.ring import FrameRingWindow
from chorus.stream.chunking import whole_utterance_chunks
from factories import random_mel, tiny_model

TOL = 1e-4


def old_attention(attn, x, kv, hidden, pos_emb):
    """NeMo's RelPositionMultiHeadAttention.forward: K/V projected from the attention input kv."""
    b = x.shape[0]
    q = attn.linear_q(x).view(b, -1, attn.h, attn.d_k)
    k = attn.linear_k(kv).view(b, -1, attn.h, attn.d_k).transpose(1, 2)
    v = attn.linear_v(kv).view(b, -1, attn.h, attn.d_k).transpose(1, 2)
    p = attn.linear_pos(pos_emb).view(1, -1, attn.h, attn.d_k).transpose(1, 2)
    ac = torch.matmul((q + attn.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
    bd = attn.rel_shift(torch.matmul((q + attn.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)))
    scores = (ac + bd[..., :ac.shape[-1]]) / attn.s_d_k
    mask = hidden.unsqueeze(1)
    weights = torch.softmax(scores.masked_fill(mask, -MASK_VALUE), dim=-1).masked_fill(mask, 0.0)
    return attn.linear_out(torch.matmul(weights, v).transpose(1, 2).reshape(b, -1, attn.h * attn.d_k))


def old_stream(encoder, x, frames_done, att_cache, conv_cache, context, keep):
    """The old `ConformerEncoder.stream` for one stream: caches of attention inputs and conv inputs."""
    t, cache_len = x.shape[1], att_cache.shape[2]
    x, pos_emb = encoder.pos_enc(x, cache_len=cache_len)
    q_pos = frames_done + torch.arange(t)[None]
    k_pos = frames_done + torch.arange(-cache_len, t)[None]
    hidden = attention_mask(q_pos, k_pos, torch.ones_like(q_pos, dtype=torch.bool), k_pos >= 0, context,
                            encoder.cfg.att_context_style)
    new_att, new_conv = torch.empty_like(att_cache), torch.empty_like(conv_cache)
    for i, layer in enumerate(encoder.layers):
        residual = x + 0.5 * layer.feed_forward1(layer.norm_feed_forward1(x))
        xa = layer.norm_self_att(residual)
        kv = torch.cat([att_cache[:, i], xa], dim=1)
        end = cache_len + (t if keep is None else keep)
        new_att[:, i] = kv[:, end - cache_len:end]
        residual = residual + old_attention(layer.self_attn, xa, kv, hidden, pos_emb)
        conv = layer.conv
        y = F.glu(F.linear(layer.norm_conv(residual), conv.pointwise_conv1.weight[..., 0],
                           conv.pointwise_conv1.bias), dim=-1).transpose(1, 2)
        y = torch.cat([conv_cache[:, i], y], dim=2)
        end = conv.cache_size + (t if keep is None else keep)
        new_conv[:, i] = y[:, :, end - conv.cache_size:end]
        y = conv.batch_norm(conv.depthwise_conv(y).transpose(1, 2))
        residual = residual + F.linear(F.silu(y), conv.pointwise_conv2.weight[..., 0], conv.pointwise_conv2.bias)
        residual = residual + 0.5 * layer.feed_forward2(layer.norm_feed_forward2(residual))
        x = layer.norm_out(residual)
    return x, new_att, new_conv


def ring_window(ring, positions, rows):
    """The rows of `ring` [L, R+1, w] holding absolute positions (time order)."""
    return ring[:, torch.remainder(positions, rows)]


@pytest.mark.parametrize("variant,context", [
    (dict(), (70, 6)), (dict(), (70, 0)), (dict(contexts=((16, 3),)), (16, 3)),
    (dict(style="regular", contexts=((16, 1),)), (16, 1)),
], ids=["cl-70-6", "cl-70-0", "cl-16-3", "regular-16-1"])
def test_projected_kv_rings_equal_attention_input_cache(variant, context):
    model = tiny_model(seed=3, **variant)
    enc, cfg = model.encoder, model.spec.encoder
    engine = ConformerStreamer(model, slots=3)
    setting = engine.setting(context)
    mel = random_mel(803, seed=11)  # 101 encoder frames: every ring wraps
    sub, sub_len = enc.pre_encode(mel.T[None], torch.tensor([mel.shape[1]]))  # the frames the layers see
    total = int(sub_len[0])
    left, d = cfg.max_left_context, cfg.d_model
    kernel = cfg.conv_kernel_size - 1
    att_cache = torch.zeros(1, cfg.n_layers, left, d)
    conv_cache = torch.zeros(1, cfg.n_layers, d, kernel)
    width = context[1] + 1 if cfg.att_context_style == "chunked_limited" else 1 + context[1] * cfg.n_layers
    engine.open()  # slot 0 stays fresh beside the stream: the rings are per slot
    slot = engine.open()
    frames_done, steps = 0, 0
    try:
        for chunk, consumed in whole_utterance_chunks(setting.plan, mel):
            result = engine.step([slot], [chunk], [consumed], setting, ["rnnt"])[0]
            produced = min(width, total - frames_done)
            if produced <= 0:
                continue
            keep = None if setting.out_frames is None else setting.out_frames
            old_out, att_cache, conv_cache = old_stream(enc, sub[:, frames_done:frames_done + produced],
                                                        torch.tensor([[frames_done]]), att_cache, conv_cache,
                                                        context, keep)
            emitted = result.encoded.shape[0]
            assert (result.encoded - old_out[0, :emitted]).abs().max().item() <= TOL
            frames_done += emitted
            steps += 1
            # The rings hold the projections of the old caches, for every real frame of the window.
            kv_ring = engine.pool.tensors["kv_ring"][slot]
            conv_ring = engine.pool.tensors["conv_ring"][slot]
            positions = torch.arange(frames_done - left, frames_done)
            real = positions >= 0
            kv = ring_window(kv_ring, positions, kv_ring.shape[1] - 1)[:, real]
            for i, layer in enumerate(enc.layers):
                old_in = att_cache[0, i][real]
                want = torch.cat([layer.self_attn.linear_k(old_in), layer.self_attn.linear_v(old_in)], dim=-1)
                assert (kv[i] - want).abs().max().item() <= TOL, (steps, i)
            positions = torch.arange(frames_done - kernel, frames_done)
            real = positions >= 0
            conv = ring_window(conv_ring, positions, conv_ring.shape[1] - 1)[:, real]
            assert (conv - conv_cache[0].transpose(1, 2)[:, real]).abs().max().item() <= TOL
        assert frames_done == total and steps >= 5
        assert engine.pool.tensors["kv_ring"][0].abs().max().item() == 0.0  # the other slot untouched
    finally:
        engine.close(slot)
        engine.close(0)


def test_frame_ring_window_in_time_order_and_padding_to_trash():
    torch.manual_seed(0)
    rows, history, width = 7, 4, 3
    ring = torch.zeros(2, 2, rows + 1, width)
    seen = {0: [], 1: []}  # what each slot's ring should hold, by position
    first = torch.tensor([0, 0])
    for step in range(6):
        valid = torch.tensor([3, 1 if step % 2 else 3])  # slot 1 is short every other step
        window = FrameRingWindow(ring, torch.tensor([1, 0]), first, 3, valid, history)
        new = torch.randn(2, 3, width)
        for layer in range(2):
            got = window.update(layer, new + layer)
            for b, slot in enumerate((1, 0)):
                hist = [v + layer for v in seen[slot][-history:]]
                old = [torch.zeros(width)] * (history - len(hist)) + hist
                expect = torch.stack(old + list(new[b, :int(valid[b])] + layer))
                assert torch.equal(got[b, :history + int(valid[b])], expect)
        for b, slot in enumerate((1, 0)):
            seen[slot] += list(new[b, :int(valid[b])])
        first = first + valid
    assert ring[:, :, rows].abs().sum() > 0  # the padded frames went to the trash row
    with pytest.raises(ValueError, match="cannot hold"):
        FrameRingWindow(ring, torch.tensor([0]), torch.tensor([0]), 4, torch.tensor([4]), history)


@pytest.mark.parametrize("order", [[1, 0], [0, 1]], ids=["gathered", "view"])
def test_frame_ring_window_in_ring_order_names_each_row(order):
    """Read as it lies, a ring gives every row of each stream, and key_index names the frame of the
    time-ordered window each row holds (a view into the pool when the slots are one ascending run)."""
    torch.manual_seed(0)
    rows, history, width, t = 7, 4, 3, 3
    ring_time, ring_lies = torch.zeros(2, 2, rows + 1, width), torch.zeros(2, 2, rows + 1, width)
    idx = torch.tensor(order)
    first = torch.tensor([0, 0])
    for step in range(6):
        valid = torch.tensor([3, 1 if step % 2 else 3])
        timed = FrameRingWindow(ring_time, idx, first, t, valid, history)
        lies = FrameRingWindow(ring_lies, idx, first, t, valid, history, in_ring_order=True,
                               first_slot=0 if order == [0, 1] else None)
        new = torch.randn(2, t, width)
        for layer in range(2):
            want, got = timed.update(layer, new + layer), lies.update(layer, new + layer)
            assert got.shape == (2, rows, width)
            assert (got.data_ptr() == ring_lies[0, layer].data_ptr()) == (order == [0, 1])
            for b in range(2):
                for r in range(rows):
                    j = int(lies.key_index[b, r])
                    if j < history + t:
                        assert torch.equal(got[b, r], want[b, j])
        first = first + valid
    assert set(lies.key_index[0].tolist()) == set(range(rows))


def test_sdpa_attention_matches_nemo_softmax_with_padding():
    """The SDPA form gives NeMo's explicit attention, padded (all-hidden) query rows included."""
    model = tiny_model(seed=4)
    attn = model.encoder.layers[0].self_attn
    torch.manual_seed(1)
    x = torch.randn(2, 9, 64)
    _, pos_emb = model.encoder.pos_enc(x)
    pos = torch.arange(9).expand(2, -1)
    valid = pos < torch.tensor([[9], [5]])
    hidden = attention_mask(pos, pos, valid, valid, (4, 1), "chunked_limited")
    with torch.no_grad():
        got = attn(x, AttentionMask.of(hidden, x.dtype), pos_emb)
        want = old_attention(attn, x, x, hidden, pos_emb)
    assert (got - want).abs().max().item() <= 1e-5
