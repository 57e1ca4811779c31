"""int8 K/V state (`--kv-dtype int8`, cache/quantized.py): KIVI's layout (keys per channel in groups of
frames, values per token) for FastConformer's K/V and conv rings and Whisper's paged K/V caches.

What is checked: a stream's stored bytes and dequantized windows are the same batched or alone (law 2 of
the state store, exactly) and within int8's rounding of the frames written; the streamed model stays within
a stated distance of fp32 K/V state (and really is quantized); bytes per slot are what the spec says, at the
tiny and the real size (<= 1.3 MiB); slots and pages are given back.  Accuracy on trained weights is
measured in bench/README.md ("Quantized K/V state"), not here.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chorus.asr.conformer.asr_model import FastConformerModel, ModelSpec, RNNTConfig
from chorus.asr.conformer.checkpoint import save_fastconformer
from chorus.asr.conformer.model import EncoderConfig
from chorus.asr.conformer.precision import apply_dtype
from chorus.asr.conformer.streaming import ConformerStreamer, apply_kv_dtype, conformer_state_spec
from chorus.asr.families import load_model
from chorus.asr.transcribe import stream_alone
from chorus.asr.whisper.frontend import IncrementalLogMel
from chorus.asr.whisper.runtime import WhisperRuntime, _forward, encode_window
from chorus.cache import PagedKVCache
from chorus.cache.quantized import (Int8FrameWindow, Int8KVWindow, QuantizedPagedKVCache, key_group_size,
                                    key_scale_groups)
from chorus.stream.contract import DecodingDefaults, StreamRequest
from chorus.stream.features import MelConfig
from chorus.stream.scheduler import step_ready
from factories import random_mel, tiny_model, train_tokenizer
from test_conformer_dtypes import stream
from whisper_factories import tiny_dims, tiny_whisper, write_openai

GREEDY = DecodingDefaults(beam_size=1, lm="none")


# -- the rings --------------------------------------------------------------------------------------

def _rings(slots, layers, history, d, conv_history, group):
    return dict(k=torch.zeros(slots, layers, history, d, dtype=torch.int8),
                ks=torch.zeros(slots, layers, key_scale_groups(history, group), d, dtype=torch.float16),
                v=torch.zeros(slots, layers, history, d, dtype=torch.int8),
                vs=torch.zeros(slots, layers, history),
                c=torch.zeros(slots, layers, conv_history, d, dtype=torch.int8),
                cs=torch.zeros(slots, layers, conv_history))


def _run_rings(r, streams, slots, width, history, group, layers=2):
    """Feed `streams` ([N, layers, frames, 3d]: K | V | conv input) chunk by chunk (the last one padded);
    returns per stream the windows each step handed back."""
    n_frames = streams.shape[2]
    d = streams.shape[3] // 3
    pos = [0] * len(streams)
    out = [[] for _ in streams]
    while min(pos) < n_frames:
        valid = torch.tensor([max(0, min(width, n_frames - p)) for p in pos])
        first = torch.tensor(pos)
        idx = torch.tensor(slots)
        kv = Int8KVWindow(r["k"], r["ks"], r["v"], r["vs"], idx, first, width, valid, group)
        conv = Int8FrameWindow(r["c"], r["cs"], idx, first, width, valid)
        for layer in range(layers):
            new = torch.full((len(streams), width, 3 * d), 1e3)  # padding must not reach the state
            for b, p in enumerate(pos):
                new[b, :int(valid[b])] = streams[b, layer, p:p + int(valid[b])]
            w_kv = kv.update(layer, new[..., :2 * d])
            w_conv = conv.update(layer, new[..., 2 * d:])
            for b in range(len(streams)):
                out[b].append((pos[b], int(valid[b]), w_kv[b].clone(), w_conv[b].clone()))
        pos = [p + int(v) for p, v in zip(pos, valid)]
    return out


@pytest.mark.parametrize("width", [7, 14, 2, 1, 5])
def test_int8_rings_hold_each_stream_alone_and_within_rounding(width):
    history, conv_history, layers, d = 70, 8, 2, 16
    group = key_group_size(history, 14)
    assert group == 35 and key_scale_groups(history, group) == 3
    torch.manual_seed(width)
    channel = torch.rand(3 * d) * 4 + 0.05  # keys with outlier channels, as KIVI found them
    frames = torch.randn(3, layers, 230, 3 * d) * channel
    frames[1] *= 3.0
    lengths = [230, 151, 64]
    for b, n in enumerate(lengths):
        frames[b, :, n:] = 0.0
    r = _rings(4, layers, history, d, conv_history, group)
    together = _run_rings(r, frames, [3, 0, 2], width, history, group, layers)
    for b in range(3):
        alone_rings = _rings(4, layers, history, d, conv_history, group)
        alone = _run_rings(alone_rings, frames[b:b + 1], [1], width, history, group, layers)[0]
        for (p, v, kv, cv), (p2, v2, kv2, cv2) in zip(together[b], alone):
            if v2 == 0:
                continue
            assert p == p2 and torch.equal(kv[:history], kv2[:history]) and torch.equal(cv[:conv_history],
                                                                                        cv2[:conv_history])
        # the history each step read: keys within a few quanta of their channel's group maximum, values and
        # conv inputs within half a quantum of their frame's maximum (plus fp32 rounding)
        for step, (p, v, kv, cv) in enumerate(together[b]):
            layer = step % layers
            lo = max(0, p - history)
            if p == lo or v == 0:
                continue
            ref = frames[b, layer, lo:p]
            got = kv[history - (p - lo):history]
            k_max = frames[b, layer, :, :d].abs().amax(0).clamp(min=1e-6)
            assert ((got[:, :d] - ref[:, :d]).abs() / k_max).max().item() <= 0.012
            v_tok = ref[:, d:2 * d].abs().amax(1, keepdim=True).clamp(min=1e-6)
            assert ((got[:, d:] - ref[:, d:2 * d]).abs() / v_tok).max().item() <= 0.5 / 127 + 1e-6
            c_lo = max(0, p - conv_history)
            c_ref = frames[b, layer, c_lo:p, 2 * d:]
            c_got = cv[conv_history - (p - c_lo):conv_history]
            c_tok = c_ref.abs().amax(1, keepdim=True).clamp(min=1e-6)
            assert ((c_got - c_ref).abs() / c_tok).max().item() <= 0.5 / 127 + 1e-6
    assert r["k"][1].abs().sum().item() == 0 and r["vs"][1].abs().sum().item() == 0  # an unused slot untouched


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_read_kernel_equals_torch(out_dtype):
    """An int8 ring's history read through chorus' kernel (one pass) gives torch's gather, cast and product bit for
    bit, per-row fp32 scales (values, conv inputs) and per-channel fp16 scales (keys), into a strided window."""
    from chorus.asr import rows_kernel
    from chorus.cache.quantized import read_rows
    kernel = rows_kernel.fused("int8_rows_dequant")
    if kernel is None:
        pytest.skip(f"chorus' bf16 kernels are off here ({rows_kernel.status()})")
    torch.manual_seed(0)
    b, h, c = 3, 5, 48
    q = torch.randint(-127, 128, (40, c), dtype=torch.int8)
    row_scales = torch.rand(40) / 100
    channel_scales = (torch.rand(9, c) / 100).half()
    rows = torch.randint(0, 40, (b * h,))
    srows = torch.randint(0, 9, (b * h,))
    for scales, picked in ((row_scales, None), (channel_scales, srows)):
        window = torch.zeros(b, h + 2, 2 * c, dtype=out_dtype)
        assert read_rows(kernel, q, rows, scales, picked, window[:, :h, c:])
        s = scales[rows].view(b, h, 1) if picked is None else scales[picked].float().view(b, h, c)
        want = (q[rows].float().view(b, h, c) * s).to(out_dtype)
        assert torch.equal(window[:, :h, c:], want)
        assert not window[:, :h, :c].any() and not window[:, h:].any()  # nothing written outside the view
    assert not read_rows(None, q, rows, row_scales, None, window[:, :h, c:])  # no kernel: torch's ops


def test_key_groups_fit_the_ring():
    for history, chunk in [(70, 14), (70, 7), (70, 1), (8, 4), (12, 9), (5, 5)]:
        g = key_group_size(history, chunk)
        assert (1 + math.ceil((chunk - 1) / g)) * g <= history
    with pytest.raises(ValueError):
        key_group_size(4, 9)


# -- FastConformer --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mels():
    return [random_mel(n, seed=n) for n in (650, 301, 129)]


@pytest.mark.parametrize("context", [(70, 6), (70, 13), (70, 0)])
def test_conformer_int8_kv_law2_and_near_fp32_state(mels, context, monkeypatch):
    import test_conformer_dtypes
    monkeypatch.setattr(test_conformer_dtypes, "CONTEXT", context)
    ref_engine = ConformerStreamer(tiny_model(seed=1), slots=4)
    engine = ConformerStreamer(apply_kv_dtype(tiny_model(seed=1), "int8"), slots=4)
    assert engine.pool.tensors["k_ring"].dtype == torch.int8 and "kv_ring" not in engine.pool.tensors
    together, tok_together = stream(engine, mels)
    ref, _ = stream(ref_engine, mels)
    for b, mel in enumerate(mels):
        alone, tok_alone = stream(engine, [mel])
        # law 2: the stored state of a stream depends only on its own frames; the fp32 products around it
        # differ between batch shapes by ~1e-7, which can move one int8 rounding by a quantum
        assert (together[b] - alone[0]).abs().max().item() <= 5e-3 * ref[b].abs().max().item()
        assert tok_together[b] == tok_alone[0]
        err = (together[b] - ref[b]).pow(2).mean().sqrt() / ref[b].pow(2).mean().sqrt()
        assert 0 < err.item() < 0.01  # really quantized, and close to fp32 state
    assert engine.pool.used == 0 and ref_engine.pool.used == 0


def test_conformer_bf16_compute_with_int8_kv(mels, monkeypatch):
    """bf16 compute over int8 K/V rings: near fp32, batched equals alone within the int8 state's quantum, and on
    CPUs with chorus' bf16 kernel the attention runs through it (the window says each key's place in time)."""
    from chorus.asr import rows_kernel
    from chorus.asr.conformer.model import RelPositionMultiHeadAttention
    kernel_passes = []
    ring_attention = RelPositionMultiHeadAttention._ring_attention

    def counted(self, *args):
        out = ring_attention(self, *args)
        kernel_passes.append(out is not None)
        return out

    fp32 = ConformerStreamer(tiny_model(seed=1), slots=4)
    engine = ConformerStreamer(apply_kv_dtype(apply_dtype(tiny_model(seed=1), "bf16"), "int8"), slots=4)
    monkeypatch.setattr(RelPositionMultiHeadAttention, "_ring_attention", counted)
    together, tokens = stream(engine, mels)
    assert all(kernel_passes) == (rows_kernel.fused("ring_attention") is not None) and kernel_passes
    ref, _ = stream(fp32, mels)
    for b, mel in enumerate(mels):
        err = (together[b] - ref[b]).pow(2).mean().sqrt() / ref[b].pow(2).mean().sqrt()
        assert err.item() < 0.05 and len(tokens[b]) > 0
        alone, tok_alone = stream(engine, [mel])
        assert (together[b] - alone[0]).abs().max().item() <= 2e-2 * ref[b].abs().max().item()
    assert engine.pool.used == 0


def real_size_spec(contexts) -> ModelSpec:
    """The NeMo streaming FastConformer's size (stt_en_fastconformer_hybrid_large_streaming_multi)."""
    enc = EncoderConfig(feat_in=80, n_layers=17, d_model=512, n_heads=8, conv_kernel_size=9, subsampling_factor=8,
                        subsampling_conv_channels=256, att_context_size=contexts, conv_norm_type="layer_norm")
    return ModelSpec(mel=MelConfig(), encoder=enc, vocab_size=1024,
                     rnnt=RNNTConfig(pred_hidden=640, joint_hidden=640), ctc=True)


@pytest.mark.parametrize("contexts", [((70, 13), (70, 6), (70, 1), (70, 0)), ((70, 6),)])
def test_bytes_per_slot_at_the_real_size(contexts):
    with torch.device("meta"):
        model = FastConformerModel(real_size_spec(contexts))
    fp32 = conformer_state_spec(model)
    spec = conformer_state_spec(apply_kv_dtype(model, "int8"))
    expected = {
        "k_ring": 17 * 70 * 512, "v_ring": 17 * 70 * 512,          # int8, the 70 left-context frames only
        "k_scale": 17 * 3 * 512 * 2,                                # fp16 per channel, groups of 35 frames
        "v_scale": 17 * 70 * 4,                                     # fp32 per frame
        "conv_ring": 17 * 8 * 512, "conv_scale": 17 * 8 * 4,        # the conv's 8 frames, per frame
        "mel_cache": 9 * 80 * 4, "mel_seen": 8, "frames_done": 8,
        "pred_h": 640 * 4, "pred_c": 640 * 4, "pred_out": 640 * 4, "ctc_last": 8,
    }
    assert {k: t.nbytes for k, t in spec.items()} == expected
    assert spec.bytes_per_slot == sum(expected.values()) == 1_356_304
    assert spec.bytes_per_slot <= 1.3 * 2**20 < 2.6 * 2**20 / 2 + 1  # the target: half of 2.6 MiB
    assert fp32.bytes_per_slot == (6_730_072 if len(contexts) == 4 else 5_998_936)
    assert (1 << 30) // spec.bytes_per_slot == 791  # streams in a 1 GiB state budget (fp32: 159 / 178)


def test_conformer_option_through_load_model(tmp_path):
    path = tmp_path / "tiny.nemo"
    save_fastconformer(path, tiny_model(seed=0), train_tokenizer())
    model = load_model(path, "cpu", GREEDY, "fp32", "int8")
    assert model.describe()["kv_dtype"] == "int8" and model.describe()["kv_dtypes"] == ["auto", "int8"]
    engine = model.make_engine(slots=2)
    assert engine.pool.tensors["v_ring"].dtype == torch.int8
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    s = stream_alone(engine.open(StreamRequest(lookahead_ms=480)), audio, 0.1)
    assert s.done and engine.pool.used == 0
    with pytest.raises(ValueError, match="choose one of"):
        load_model(path, "cpu", GREEDY, "fp32", "int4")
    regular = tiny_model(seed=0, contexts=((8, 2),), style="regular")
    with pytest.raises(ValueError, match="chunked_limited"):
        apply_kv_dtype(regular, "int8")


def test_added_model_options():
    from chorus.cli import _added_model
    assert _added_model("a=/m/x.nemo") == ("a", "/m/x.nemo", "fp32", "auto")
    assert _added_model("a=/m/x,y.nemo,kv_dtype=int8,dtype=bf16") == ("a", "/m/x,y.nemo", "bf16", "int8")
    assert _added_model("a=/m/x.nemo,dtype=int8") == ("a", "/m/x.nemo", "int8", "auto")


# -- paged (Whisper) ----------------------------------------------------------------------------

def _paged_run(cache, sids, schedule, k_all, v_all, truncate=True):
    """Write tokens per `schedule` (counts per stream per step; the first stream cut back to 3 tokens at
    step 5 when `truncate`); gather every layer."""
    got = []
    pos = [0] * len(sids)
    for step, counts in enumerate(schedule):
        if step == 5 and truncate:
            cache.truncate(sids[0], 3)
            pos[0] = 3
        counts_t = torch.tensor(counts)
        rows = cache.reserve(torch.tensor(sids), counts_t)
        w = rows.shape[1]
        k = torch.zeros(len(sids), w, *k_all.shape[-2:])
        v = torch.zeros_like(k)
        for b, c in enumerate(counts):
            k[b, :c] = k_all[b, pos[b]:pos[b] + c]
            v[b, :c] = v_all[b, pos[b]:pos[b] + c]
        for layer in range(2):
            cache.write(layer, rows, k * (layer + 1), v)
        cache.commit(torch.tensor(sids), counts_t)
        pos = [p + c for p, c in zip(pos, counts)]
        got.append([cache.gather(layer, torch.tensor(sids)) for layer in range(2)])
    return got


def test_quantized_pages_near_float_and_batched_equals_alone():
    torch.manual_seed(0)
    heads, hd = 3, 8
    channel = torch.rand(heads, hd) * 5 + 0.1
    k_all = torch.randn(3, 80, heads, hd) * channel
    v_all = torch.randn(3, 80, heads, hd)
    schedule = [[3, 1, 17], [1, 1, 0], [0, 1, 5], [2, 1, 16], [5, 1, 1], [1, 1, 0], [20, 2, 3], [1, 1, 1]]
    kw = dict(layers=2, heads=heads, head_dim=hd, page_size=4, pages=60, max_streams=4, max_tokens_per_stream=80)
    ref = PagedKVCache("ref", **kw)
    q = QuantizedPagedKVCache("q8", **kw)
    assert q.bytes_per_page == 2 * 2 * 4 * heads * hd + 2 * heads * hd * 2 + 2 * 4 * heads * 4
    assert q.k.dtype == torch.int8 and q.nbytes < ref.nbytes / 2
    sids_r, sids_q = [ref.open() for _ in range(3)], [q.open() for _ in range(3)]
    want = _paged_run(ref, sids_r, schedule, k_all, v_all)
    got = _paged_run(q, sids_q, schedule, k_all, v_all)
    for (w_layers, g_layers) in zip(want, got):
        for layer, ((wk, wv, wm), (gk, gv, gm)) in enumerate(zip(w_layers, g_layers)):
            assert torch.equal(wm, gm)
            assert ((gk - wk).abs() / ((layer + 1) * channel))[wm].max().item() <= 0.05
            assert ((gv - wv).abs() / wv.abs().amax(-1, keepdim=True))[wm].max().item() <= 0.5 / 127 + 1e-6
    for b in range(3):  # each stream alone stores and reads the same bytes
        alone = QuantizedPagedKVCache("alone", **kw)
        sid = alone.open()
        solo = _paged_run(alone, [sid], [[c[b]] for c in schedule], k_all[b:b + 1], v_all[b:b + 1], truncate=b == 0)
        for g_layers, a_layers in zip(got, solo):
            for (gk, gv, gm), (ak, av, am) in zip(g_layers, a_layers):
                n = int(am[0].sum())
                assert torch.equal(gk[b, :n], ak[0, :n]) and torch.equal(gv[b, :n], av[0, :n])
        alone.close(sid)
        assert alone.pages_used == 0
    for s in sids_q:
        q.close(s)
    assert q.pages_used == 0 and q.streams_open == 0


@pytest.fixture(scope="module")
def whisper_path(tmp_path_factory):
    return write_openai(tmp_path_factory.mktemp("whisper") / "tiny.pt", tiny_whisper(tiny_dims(), seed=5))


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    f = 200 + 150 * np.sin(2 * np.pi * 0.7 * t + seed)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * (1.5 + seed % 3) * t) ** 2
    wave = 0.2 * env * np.sin(2 * np.pi * np.cumsum(f) / 16000)
    return (wave + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


@torch.no_grad()
def test_whisper_int8_kv_decoder_near_float(whisper_path):
    model = load_model(whisper_path, "cpu", GREEDY)
    raw = IncrementalLogMel(model.model.dims.n_mels)
    mel = torch.cat([raw.accept(_speechlike(2.3, 3)), raw.finish()], dim=1)
    logits = {}
    for kv in ("auto", "int8"):
        rt = WhisperRuntime(model.model, 2, f"t-{kv}", kv_dtype=kv)
        h = rt.open()
        rt.pool.tensors["mel"][h[0], :, :mel.shape[1]] = mel
        for pad in (False, True):
            encode_window(rt, [h], [mel.shape[1]], [float(mel.max())], pad_to_30s=pad)
            csid, ssid = torch.tensor([h[2]]), torch.tensor([h[3]])
            cross = [rt.cross.gather(layer, csid) for layer in range(len(model.model.decoder.blocks))]
            ids = torch.tensor([[model.tokenizer.sot, 11, 23, 5, 301, 77, 9]])
            rt.self_kv.truncate(h[3], 0)
            first = _forward(rt, ids[:, :4], torch.zeros(1, dtype=torch.long), torch.tensor([4]), ssid, cross, 4)
            more = _forward(rt, ids[:, 4:], torch.tensor([4]), torch.tensor([3]), ssid, cross, 4)
            logits[kv, pad] = torch.cat([first, more], dim=1)
        rt.close(h)
        assert rt.cross.pages_used == 0 and rt.self_kv.pages_used == 0 and rt.pool.used == 0
    for pad in (False, True):
        a, b = logits["auto", pad], logits["int8", pad]
        err = (b - a).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()
        assert 0 < err.item() < 0.01, err


@pytest.mark.parametrize("mode,block", [("causal", 200), ("padded", 500)])
def test_whisper_int8_kv_law2(whisper_path, mode, block):
    model = load_model(whisper_path, "cpu", GREEDY, "fp32", "int8")
    assert model.describe()["kv_dtype"] == "int8"
    fp32_kv = sum(load_model(whisper_path, "cpu", GREEDY).kv_bytes_per_stream().values())
    assert sum(model.kv_bytes_per_stream().values()) < fp32_kv / 3
    engine = model.make_engine(slots=4)
    assert isinstance(engine.runtime.cross, QuantizedPagedKVCache)
    requests = [StreamRequest(options={"mode": mode, "block_ms": block}) for _ in range(3)]
    clips = [_speechlike(s, i) for i, s in enumerate((1.3, 2.45, 0.7))]
    alone = [stream_alone(engine.open(r), c, 0.1) for r, c in zip(requests, clips)]
    streams = [engine.open(r) for r in requests]
    pos = [0] * len(clips)
    try:
        for tick in range(200):
            for i, (s, c) in enumerate(zip(streams, clips)):
                if tick >= 2 * i and not s.finished:
                    s.accept_audio(c[pos[i]:pos[i] + 1600])
                    pos[i] += 1600
                    if pos[i] >= len(c):
                        s.finish()
            step_ready(streams)
            if all(s.done for s in streams):
                break
        for a, s in zip(alone, streams):
            assert s.done and s.hypothesis.ids == a.hypothesis.ids
    finally:
        for s in streams:
            s.close()
    rt = engine.runtime
    assert rt.pool.used == 0 and rt.enc.streams_open == rt.cross.streams_open == rt.self_kv.streams_open == 0


def test_whisper_tiny_en_bytes_per_stream():
    """tiny.en's dimensions (4 + 4 layers, 384 wide, 6 heads, 1500 frames, 448 tokens), without its weights."""
    from chorus.asr.whisper.family import WhisperModel
    from chorus.asr.whisper.model import SIZES, Whisper

    class Stub(WhisperModel):
        def __init__(self, kv):
            with torch.device("meta"):
                self.model = Whisper(SIZES["tiny.en"])
            self.kv_dtype = kv

    fp32, int8 = Stub("auto").kv_bytes_per_stream(), Stub("int8").kv_bytes_per_stream()
    assert fp32 == {"encoder": 4 * 1504 * 384 * 2 * 4, "cross": 4 * 1504 * 384 * 2 * 4, "self": 4 * 448 * 384 * 2 * 4}
    # int8 K and V, fp16 key scales per channel per 16-token page, fp32 value scales per token and head
    per_page = 4 * (16 * 384 * 2 + 384 * 2 + 16 * 6 * 4)
    assert int8 == {"encoder": 94 * per_page, "cross": 94 * per_page, "self": 28 * per_page}
    assert Stub("int8").bytes_per_stream() == 12_572_800 and Stub("auto").bytes_per_stream() == 43_427_968


# -- Whisper compute in bf16 and int8 (--dtype) ---------------------------------------------------

@torch.no_grad()
def test_whisper_bf16_and_int8_compute_near_fp32_with_either_state(whisper_path):
    fp32 = load_model(whisper_path, "cpu", GREEDY)
    raw = IncrementalLogMel(fp32.model.dims.n_mels)
    mel = torch.cat([raw.accept(_speechlike(2.3, 3)), raw.finish()], dim=1)
    ids = torch.tensor([[fp32.tokenizer.sot, 11, 23, 5, 301, 77, 9]])

    def logits(model, kv):
        rt = WhisperRuntime(model.model, 1, f"bf-{kv}", kv_dtype=kv)
        h = rt.open()
        try:
            rt.pool.tensors["mel"][h[0], :, :mel.shape[1]] = mel
            encode_window(rt, [h], [mel.shape[1]], [float(mel.max())], pad_to_30s=True)
            cross = [rt.cross.gather(layer, torch.tensor([h[2]])) for layer in range(len(model.model.decoder.blocks))]
            return _forward(rt, ids, torch.zeros(1, dtype=torch.long), torch.tensor([ids.shape[1]]),
                            torch.tensor([h[3]]), cross, 4)
        finally:
            rt.close(h)

    ref = logits(fp32, "auto")
    bf16 = load_model(whisper_path, "cpu", GREEDY, "bf16")
    assert bf16.describe()["dtype"] == "bf16" and bf16.model.decoder.token_embedding.weight.dtype == torch.bfloat16
    assert bf16.model.decoder.ln.weight.dtype == torch.float32  # layer norms compute in fp32, as openai/whisper's
    for name in ("decoder.ln.weight", "decoder.ln.bias", "encoder.ln_post.weight", "decoder.blocks.0.attn_ln.bias"):
        assert torch.equal(bf16.model.get_parameter(name), fp32.model.get_parameter(name))  # exact, not rounded
    for kv in ("auto", "int8"):
        got = logits(bf16, kv)
        assert got.dtype == torch.float32
        err = (got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
        assert 0 < err.item() < 0.05, (kv, err)
    engine = bf16.make_engine(slots=1)
    assert engine.runtime.self_kv.k.dtype == torch.bfloat16
    s = stream_alone(engine.open(StreamRequest(options={"mode": "causal", "block_ms": 200})), _speechlike(1.0, 1), 0.1)
    assert s.done and engine.runtime.pool.used == 0
    int8 = load_model(whisper_path, "cpu", GREEDY, "int8")
    assert int8.describe()["dtype"] == "int8" and int8.describe()["dtypes"] == ["fp32", "bf16", "int8"]
    assert type(int8.model.decoder.blocks[0].mlp[0]).__name__ == "Int8Linear"
    assert int8.model.decoder.token_embedding.weight.dtype == torch.float32   # the logits stay fp32
    for kv in ("auto", "int8"):
        err = (logits(int8, kv) - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
        assert 0 < err.item() < 0.05, (kv, err)
    with pytest.raises(ValueError, match="fp32, bf16, int8"):
        load_model(whisper_path, "cpu", GREEDY, "fp16")
