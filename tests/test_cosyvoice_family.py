"""CosyVoice 2 as a TTS family: a model directory in CosyVoice's layout streamed from speech tokens through the
engine, `/tts` and `chorus speak`, the audio equal to CosyVoice's token2wav schedule (recomputed flow chunks, then
HiFT with its caches and cross-fade), streams batched equal to each alone."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).parent))
from cosyvoice_factories import write_cosyvoice2_dir  # noqa: E402
from test_tts_server import VoiceServer  # noqa: E402

from chorus.cli import main  # noqa: E402
from chorus.codecs import decode  # noqa: E402
from chorus.server.app import ServerConfig  # noqa: E402
from chorus.server.registry import ModelRegistry  # noqa: E402
from chorus.stream.tts_contract import BadTokens, SpeechRequest, UnsupportedInput, UnsupportedOption  # noqa: E402
from chorus.tts.cosyvoice.family import CosyVoice2Voice  # noqa: E402
from chorus.tts.cosyvoice.hift import HiftStreamer  # noqa: E402
from chorus.tts.cosyvoice.reference import recompute_stream  # noqa: E402
from chorus.tts.families import family_of, load_voice  # noqa: E402

AUDIO_TOL = 1e-3  # mel within 1e-4 (test_cosyvoice_flow); HiFT turns it into audio


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cosyvoice2")
    write_cosyvoice2_dir(root)
    return root


@pytest.fixture(scope="module")
def voice(model_dir):
    return load_voice(model_dir)


def inputs(seed: int, n: int, prompt: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (n,), generator=g).tolist()
    opts = {"embedding": torch.randn(192, generator=g).tolist()}
    if prompt:
        opts["prompt_tokens"] = torch.randint(0, 100, (prompt,), generator=g).tolist()
        opts["prompt_mel"] = torch.randn(2 * prompt, 80, generator=g).tolist()
    return tokens, opts


def cosyvoice_audio(voice, tokens, opts, seed, final="exact", left_chunks=None) -> np.ndarray:
    """CosyVoice2Model.tts(stream=True)'s schedule: each chunk's flow recomputed from the start, then HiFT."""
    ptok = opts.get("prompt_tokens", [])
    feat = torch.tensor(opts["prompt_mel"]) if ptok else None
    mels = recompute_stream(voice.flow, tokens, torch.tensor(opts["embedding"]), ptok, feat, final, left_chunks)
    hift = HiftStreamer(voice.hift, generator=torch.Generator().manual_seed(seed))
    return np.concatenate([hift.push(m, finalize=k == len(mels) - 1)[0].numpy() for k, m in enumerate(mels)])


def stream_alone(voice, tokens, opts, seed, pieces=(), final="exact", max_seconds=10):
    engine = voice.make_engine(slots=1, max_seconds=max_seconds)
    s = engine.open(SpeechRequest(seed=seed, options={**opts, "final": final}))
    cuts = [0, *pieces, len(tokens)]
    chunks = []
    for a, b in zip(cuts, cuts[1:]):
        s.push_tokens(tokens[a:b])
        while s.ready():
            chunks.append(engine.step([s])[0])
    s.finish()
    while not s.done:
        chunks.append(engine.step([s])[0])
    s.close()
    assert engine.pool.used == 0
    return chunks


def test_detected_and_described(model_dir, voice):
    assert family_of(model_dir).name == "cosyvoice2"
    assert isinstance(voice, CosyVoice2Voice) and voice.sample_rate == 24000
    d = voice.describe()
    assert d["input"] == "speech_tokens" and d["options"]["final"]["default"] == "exact"
    (model_dir / "other").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="not a voice"):
        family_of(model_dir / "other")


@pytest.mark.parametrize("final,prompt", [("exact", 7), ("flat", 0)])
def test_streamed_audio_equals_cosyvoice_schedule(voice, final, prompt):
    tokens, opts = inputs(1, 200, prompt)
    want = cosyvoice_audio(voice, tokens, opts, seed=5, final=final)
    chunks = stream_alone(voice, tokens, opts, seed=5, pieces=(10, 47, 90, 160, 199), final=final)
    got = np.concatenate([c.audio for c in chunks])
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True] and len(chunks) == 4
    assert [(c.mark.start, c.mark.end) for c in chunks][0][0] == 0 and chunks[-1].mark.end == 200
    assert got.shape == want.shape and np.abs(got - want).max() < AUDIO_TOL
    assert np.abs(got).max() > 0.01


def test_streams_batched_equal_each_alone(voice):
    """Three streams of different lengths, prompts and final modes, tokens arriving unevenly, stepped together."""
    cases = [(inputs(2, 130, 7), "exact"), (inputs(3, 70, 0), "flat"), (inputs(4, 100, 30), "flat")]
    alone = [np.concatenate([c.audio for c in stream_alone(voice, t, o, seed=k, final=f)])
             for k, ((t, o), f) in enumerate(cases)]
    engine = voice.make_engine(slots=3, max_seconds=10)
    streams = [engine.open(SpeechRequest(seed=k, options={**o, "final": f})) for k, ((t, o), f) in enumerate(cases)]
    fed = [0, 0, 0]
    out = [[], [], []]
    shared = 0
    for rnd in range(40):
        for k, ((t, _), _) in enumerate(cases):
            n = min(len(t), fed[k] + 9 * (k + 1))
            if n > fed[k]:
                streams[k].push_tokens(t[fed[k]:n])
                fed[k] = n
                if n == len(t):
                    streams[k].finish()
        ready = [s for s in streams if s.ready()]
        if not ready and all(s.done for s in streams):
            break
        if ready:
            shared += len(ready) > 1
            for s, chunk in zip(ready, engine.step(ready)):
                out[streams.index(s)].append(chunk.audio)
    for s in streams:
        s.close()
    assert shared >= 2 and engine.pool.used == 0
    for k in range(3):
        got = np.concatenate(out[k])
        assert got.shape == alone[k].shape and np.abs(got - alone[k]).max() < AUDIO_TOL


def test_left_chunks_option(voice):
    """left_chunks=L: each chunk attends to the L chunks before it (wenet's masks, CosyVoice's schedule otherwise);
    an L that covers the whole utterance gives the default's audio exactly; a bounded stream with a flat final may
    run past the engine's max_seconds; values the engine cannot hold are refused."""
    assert voice.describe()["options"]["left_chunks"]["default"] == -1
    tokens, opts = inputs(9, 200, 7)
    want = cosyvoice_audio(voice, tokens, opts, seed=3, final="flat", left_chunks=1)
    bounded = stream_alone(voice, tokens, {**opts, "left_chunks": 1}, seed=3, final="flat", max_seconds=12)
    got = np.concatenate([c.audio for c in bounded])
    assert got.shape == want.shape and np.abs(got - want).max() < AUDIO_TOL
    default = np.concatenate([c.audio for c in stream_alone(voice, tokens, opts, seed=3, final="flat", max_seconds=30)])
    assert np.abs(got - default).max() > 1e-3
    engine = voice.make_engine(slots=1, max_seconds=30)
    most = engine.streamer.max_left_chunks(7)
    assert most * 25 > len(tokens) + 7
    for final in ("flat", "exact"):
        a = stream_alone(voice, tokens, {**opts, "left_chunks": most}, seed=3, final=final, max_seconds=30)
        b = stream_alone(voice, tokens, {**opts, "left_chunks": -1}, seed=3, final=final, max_seconds=30)
        assert all(np.array_equal(x.audio, y.audio) for x, y in zip(a, b)) and len(a) == len(b)

    engine = voice.make_engine(slots=1, max_seconds=10)  # 500 frames: a ring of 125 tokens, room for L = 0
    for bad, match in [(-2, "-1 .* or a whole number"), (True, "whole number"), (1.5, "whole number"),
                       (1, "at most 0 with this engine")]:
        with pytest.raises(UnsupportedOption, match=match):
            engine.open(SpeechRequest(options={**opts, "left_chunks": bad}))
    s = engine.open(SpeechRequest(options={**opts, "left_chunks": 0, "final": "flat"}))
    assert s.settings["options"]["left_chunks"] == 0
    s.push_tokens(list(range(100)) * 4)  # 16 s: past the engine's 10 s, held in a bounded ring
    n = 0
    while s.ready():
        n += len(engine.step([s])[0].audio)
    assert n > 12 * 24000
    s.close()
    full = engine.open(SpeechRequest(options=opts))
    assert full.settings["options"]["left_chunks"] == -1
    with pytest.raises(BadTokens, match="more than 243 tokens"):
        full.push_tokens(list(range(100)) * 4)
    full.close()
    assert engine.pool.used == 0


def test_utterances_one_after_another_on_a_stream(voice):
    t1, opts = inputs(6, 60, 7)
    t2 = inputs(7, 40, 0)[0]
    engine = voice.make_engine(slots=1, max_seconds=10)
    s = engine.open(SpeechRequest(seed=1, options=opts))
    s.push_tokens(t1)
    s.flush()
    s.push_tokens(t2)
    s.finish()
    chunks = []
    while not s.done:
        chunks.append(engine.step([s])[0])
    s.close()
    assert [c.mark.segment for c in chunks if c.last] == [0, 1] and s.segments_done == 2
    first = [c for c in chunks if c.mark.segment == 0]
    alone = stream_alone(voice, t1, opts, seed=1)
    assert np.abs(np.concatenate([c.audio for c in first]) - np.concatenate([c.audio for c in alone])).max() < AUDIO_TOL


def test_bad_requests_and_tokens(voice):
    engine = voice.make_engine(slots=1, max_seconds=4)
    tokens, opts = inputs(8, 10, 3)
    for bad, match in [({}, "embedding .* is required"), ({"embedding": [0.0] * 10}, "192 floats"),
                       ({**opts, "prompt_mel": opts["prompt_mel"][:-1]}, "2 per prompt token"),
                       ({**opts, "prompt_tokens": [1, 2, 300]}, "outside the vocabulary"),
                       ({**opts, "final": "sometimes"}, "exact, flat"), ({**opts, "colour": 1}, "unknown option")]:
        with pytest.raises(UnsupportedOption, match=match):
            engine.open(SpeechRequest(options=bad))
    with pytest.raises(UnsupportedOption, match="speed"):
        engine.open(SpeechRequest(speed=1.5, options=opts))
    assert engine.pool.used == 0
    s = engine.open(SpeechRequest(options=opts))
    s.push_tokens([1, 2, 3])  # short of a hop: waiting on the client, so idle (the server's idle timeout runs)
    assert s.idle and not s.ready() and not s.done
    s.flush()
    assert s.ready() and not s.idle
    s.cancel()
    with pytest.raises(BadTokens, match="100 is outside the vocabulary 0..99"):
        s.push_tokens([1, 100])
    with pytest.raises(UnsupportedInput):
        s.push_text("hello")
    with pytest.raises(BadTokens, match="more than 97 tokens"):
        s.push_tokens(list(range(98)))
    s.close()
    assert engine.pool.used == 0


# -- /tts and chorus speak ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(model_dir, voice):
    voices = ModelRegistry()
    voices.add("cosy", voice, slots=3)
    srv = VoiceServer(ModelRegistry(), ServerConfig(port=0, idle_timeout=5.0, batch_wait_ms=5, tts_max_batch=8),
                      voices)
    yield srv
    srv.stop()


async def session(url, start, messages):
    out = []
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "voice": "cosy", **start}))
        async def read():
            try:
                async for m in ws:
                    out.append(json.loads(m) if isinstance(m, str) else m)
            except ConnectionClosed:
                pass

        reader = asyncio.create_task(read())
        try:
            for m in messages:
                await ws.send(json.dumps(m))
                await asyncio.sleep(0.01)
        except ConnectionClosed:  # the server ended the stream (an error): what it said is read all the same
            pass
        await reader
        return out, ws.close_code


def test_tokens_over_tts_equal_the_engine(server, voice):
    cases = [inputs(9, 120, 7), inputs(10, 80, 0)]

    async def both():
        runs = []
        for k, (tokens, opts) in enumerate(cases):
            msgs = [{"type": "tokens", "tokens": tokens[i:i + 20]} for i in range(0, len(tokens), 20)]
            runs.append(session(server.url, {"seed": k, "encoding": "pcm_f32le", "options": opts},
                                msgs + [{"type": "stop"}]))
        return await asyncio.gather(*runs)

    results = asyncio.run(asyncio.wait_for(both(), 120))
    for k, (messages, code) in enumerate(results):
        assert code == 1000, messages
        ready = messages[0]
        assert ready["type"] == "ready" and ready["family"] == "cosyvoice2" and ready["options"]["final"] == "exact"
        audio = [decode(messages[i + 1], "pcm_f32le") for i, m in enumerate(messages)
                 if isinstance(m, dict) and m["type"] == "audio"]
        heads = [m for m in messages if isinstance(m, dict) and m["type"] == "audio"]
        assert heads[0]["chars"] == [0, 43 if k == 0 else 25] and heads[-1]["chars"][1] == len(cases[k][0])
        want = np.concatenate([c.audio for c in stream_alone(voice, *cases[k], seed=k)])
        got = np.concatenate(audio)
        assert got.shape == want.shape and np.abs(got - want).max() < AUDIO_TOL
        assert messages[-1]["type"] == "done"
    server.wait_idle()


@pytest.mark.parametrize("start,sends,code,close", [
    ({"options": {}}, [], "unsupported_option", 1003),
    ({"options": {"embedding": [1.0] * 5}}, [], "unsupported_option", 1003),
    (None, [{"type": "tokens", "tokens": [1, 2, 100]}], "bad_tokens", 1007),
    (None, [{"type": "tokens", "tokens": [1, "2"]}], "bad_message", 1008),
    (None, [{"type": "tokens", "tokens": [1.5]}], "bad_message", 1008),
    (None, [{"type": "text", "text": "Hello."}], "unsupported_input", 1003),
])
def test_bad_input_over_tts_gets_its_code_and_frees_the_slot(server, start, sends, code, close):
    _, opts = inputs(11, 1, 0)
    messages, close_code = asyncio.run(asyncio.wait_for(
        session(server.url, start or {"options": opts}, sends + [{"type": "stop"}]), 30))
    errors = [m for m in messages if isinstance(m, dict) and m["type"] == "error"]
    assert errors and errors[-1]["code"] == code, messages
    assert close_code == close
    server.wait_idle()


def test_chorus_speak_tokens_file(model_dir, voice, tmp_path, capsys):
    tokens, opts = inputs(12, 90, 7)
    (tmp_path / "tokens.txt").write_text(" ".join(map(str, tokens)) + "\n")
    np.save(tmp_path / "emb.npy", np.asarray(opts["embedding"], dtype=np.float32))
    torch.save(torch.tensor([opts["prompt_tokens"]]), tmp_path / "ptok.pt")  # [1, P], as CosyVoice holds it
    np.save(tmp_path / "pmel.npy", np.asarray([opts["prompt_mel"]], dtype=np.float32))  # [1, F, 80]
    out = tmp_path / "out.wav"
    rc = main(["speak", "--model", str(model_dir), "--tokens", str(tmp_path / "tokens.txt"), "--embedding",
               str(tmp_path / "emb.npy"), "--prompt-tokens", str(tmp_path / "ptok.pt"), "--prompt-mel",
               str(tmp_path / "pmel.npy"), "--seed", "3", "--option", "final=flat", "-o", str(out)])
    assert rc == 0
    got, rate = sf.read(out, dtype="float32")
    want = np.concatenate([c.audio for c in stream_alone(voice, tokens, opts, seed=3, final="flat")])
    assert rate == 24000 and got.shape == want.shape
    assert np.abs(got - np.clip(want, -1, 1)).max() < 2 / 32768 + AUDIO_TOL
    rc = main(["speak", "--model", str(model_dir), "--tokens", str(tmp_path / "tokens.txt"), "-o", str(out)])
    assert rc == 2 and "embedding" in capsys.readouterr().err
