"""`/tts` (chorus.tts.v1) end to end with a real websockets client and a tiny random Piper-layout voice.

The voice's noise scales are 0 (its config), so synthesis is deterministic and every client's audio can be compared
with what the family synthesizes offline for the same text (`Voice.synthesize`, segment by segment, resampled and
encoded as the server does).  espeak-ng gives the phonemes (the tiny voice knows a few of them).
"""
from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .)")
pytest.importorskip("onnx", reason="exporting the tiny test voice needs the onnx package (pip install -e .[test])")
pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng is not installed (apt-get install espeak-ng)")

sys.path.insert(0, str(Path(__file__).parent))
from piper_factories import config, make_voice  # noqa: E402
from test_server import ServerThread  # noqa: E402

from chorus.asr.conformer.checkpoint import load_fastconformer  # noqa: E402
from chorus.asr.conformer.family import ConformerModel  # noqa: E402
from chorus.codecs import StreamingResampler, decode, encode  # noqa: E402
from chorus.server.app import AsrServer, ServerConfig  # noqa: E402
from chorus.server.registry import ModelRegistry  # noqa: E402
from chorus.stream.tts_contract import SpeechRequest  # noqa: E402
from chorus.tts.families import load_voice  # noqa: E402

SLOTS = 12
TEXTS = [
    "Hello there. How are you? I am fine, thanks.",
    "Bob is here! Is he? He is, e.g. at the bar. Hello.",
    "A ball. A bell. Hello hello hello.",
    "Oh. Ah? Hello there.\n\nA new paragraph, with a comma; and more.",
]


class VoiceServer(ServerThread):
    def __init__(self, registry, config, voices):
        import threading
        self.server = AsrServer(registry, config, voices)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        self.url = f"ws://127.0.0.1:{self.server.port}/tts"
        self.asr_url = f"ws://127.0.0.1:{self.server.port}/asr"
        self.http = f"http://127.0.0.1:{self.server.port}"

    def wait_idle(self, timeout=10.0):
        end = time.time() + timeout
        pools = [e.engine.pool for e in self.server.registry.entries() + self.server.voices.entries()]
        while time.time() < end:
            if all(p.used == 0 for p in pools) and self.server.connections == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"slots still in use: {[p.used for p in pools]}, connections {self.server.connections}")


@pytest.fixture(scope="module")
def voice_path(tmp_path_factory):
    cfg = config()
    cfg["inference"] = {"noise_scale": 0.0, "length_scale": 1.0, "noise_w": 0.0}  # deterministic
    return make_voice(tmp_path_factory.mktemp("voice"), cfg=cfg)


@pytest.fixture(scope="module")
def voice(voice_path):
    return load_voice(voice_path)


@pytest.fixture(scope="module")
def server(voice_path, model_path):
    registry = ModelRegistry()
    registry.add("default", ConformerModel(load_fastconformer(model_path)), slots=4)
    voices = ModelRegistry()
    voices.add("tiny", load_voice(voice_path), slots=SLOTS)
    voices.add("small", load_voice(voice_path), slots=1)
    srv = VoiceServer(registry, ServerConfig(port=0, idle_timeout=3.0, batch_wait_ms=5, max_text_chars=500,
                                             max_pending_text_chars=2000, tts_max_batch=8), voices)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def idle_after(request):
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").wait_idle()


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def speak(url, start: dict, pieces: list, pace: float = 0.0, end: dict | None = None):
    """Start, send text pieces (strings, or whole messages), `end` (stop by default); every message up to the
    close, audio frames as bytes, and the close code."""
    messages = []
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", **start}))
        for piece in pieces:
            await ws.send(json.dumps(piece if isinstance(piece, dict) else {"type": "text", "text": piece}))
            if pace:
                await asyncio.sleep(pace)
        await ws.send(json.dumps(end or {"type": "stop"}))
        try:
            async for m in ws:
                messages.append(json.loads(m) if isinstance(m, str) else m)
        except ConnectionClosed:
            pass
        return messages, ws.close_code


def audio_of(messages, encoding):
    """The (header, samples) pairs: each `audio` header followed by its binary frame."""
    out = []
    for k, m in enumerate(messages):
        if isinstance(m, dict) and m["type"] == "audio":
            data = messages[k + 1]
            assert isinstance(data, bytes) and len(data) == m["bytes"], (m, type(data))
            out.append((m, decode(data, encoding)))
    return out


def offline(voice, text, rate=None, encoding="pcm_f32le", **request):
    """What the family makes of the whole text, per segment, resampled and encoded as the server does."""
    out = []
    for a in voice.synthesize(text, SpeechRequest(**request)):
        if rate and rate != voice.sample_rate:
            rs = StreamingResampler(voice.sample_rate, rate)
            a = np.concatenate([rs.process(a), rs.flush()])
        out.append(decode(encode(a, encoding), encoding))
    return out


def segments_of(voice, text):
    stream = voice.make_engine(slots=1).open(SpeechRequest())
    try:
        stream.push_text(text)
        stream.finish()
        return [stream.next_segment().text for _ in range(stream.segments_made)]
    finally:
        stream.close()


def test_many_clients_get_what_the_family_synthesizes_offline(server, voice):
    cases = []
    for k in range(10):
        text = TEXTS[k % len(TEXTS)]
        rate = (16000, 22050, 8000, 48000)[k % 4]
        encoding = ("pcm_f32le", "pcm_s16le", "mulaw")[k % 3]
        speed = (1.0, 1.3)[k % 2]
        cases.append((text, rate, encoding, speed))
    batches_before = server.server.metrics.value("chorus_step_batch_size_count", model="tiny")
    singles_before = server.server.metrics.value("chorus_step_batch_size_bucket", model="tiny", le="1.0")

    async def all_clients():
        return await asyncio.gather(*(speak(server.url, {"voice": "tiny", "sample_rate": rate, "encoding": enc,
                                                         "speed": speed}, [text])
                                      for text, rate, enc, speed in cases))

    results = run(all_clients())
    for (text, rate, enc, speed), (messages, code) in zip(cases, results):
        assert code == 1000, messages[-2:]
        ready = messages[0]
        assert ready["type"] == "ready" and ready["protocol"] == "chorus.tts.v1" and ready["sample_rate"] == rate
        assert ready["family"] == "piper" and ready["encoding"] == enc and ready["speed"] == speed
        got = audio_of(messages, enc)
        want = offline(server.server.voices.get("tiny").model, text, rate, enc, speed=speed)
        assert [h["text"] for h, _ in got] == segments_of(voice, text)
        assert [h["segment"] for h, _ in got] == list(range(len(want)))
        for (header, a), b in zip(got, want):
            assert header["chars"] == [text.index(header["text"]), text.index(header["text"]) + len(header["text"])]
            assert len(a) == len(b) == header["samples"]
            tol = {"pcm_f32le": 1e-4, "pcm_s16le": 2 / 32768, "mulaw": 0.05}[enc]
            assert np.max(np.abs(a - b), initial=0) <= tol, (enc, header)
        starts = [h["start"] for h, _ in got]
        assert starts == sorted(starts) and starts[0] == 0.0
        done = messages[-1]
        assert done["type"] == "done" and done["reason"] == "stop" and done["segments"] == len(want)
    m = server.server.metrics
    steps = m.value("chorus_step_batch_size_count", model="tiny") - batches_before
    singles = m.value("chorus_step_batch_size_bucket", model="tiny", le="1.0") - singles_before
    assert steps > singles, "no step synthesized more than one stream"


def test_text_piece_by_piece_segments_like_the_whole(server, voice):
    text = TEXTS[1] + " " + TEXTS[3]
    pieces = [text[k:k + 3] for k in range(0, len(text), 3)]  # like an LLM's tokens
    messages, code = run(speak(server.url, {"voice": "tiny", "encoding": "pcm_f32le"}, pieces, pace=0.002))
    assert code == 1000
    got = audio_of(messages, "pcm_f32le")
    assert [h["text"] for h, _ in got] == segments_of(voice, text)
    want = offline(voice, text)
    assert len(got) == len(want)
    for (_, a), b in zip(got, want):
        assert a.shape == b.shape and np.max(np.abs(a - b), initial=0) <= 1e-4
    whole = np.concatenate([a for _, a in got])
    reference = np.concatenate(list(voice.voice.synthesize(text, noise_scale=0.0, noise_w=0.0)))
    assert whole.shape == reference.shape and np.max(np.abs(whole - reference)) <= 1e-4  # Piper's own result


def test_unfinished_sentence_waits_then_speaks_flush_speaks_at_once(server):
    async def scenario():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start", "voice": "tiny", "max_wait_ms": 300}))
            assert json.loads(await ws.recv())["type"] == "ready"
            t0 = time.monotonic()
            await ws.send(json.dumps({"type": "text", "text": "Hello there"}))  # no punctuation
            header = json.loads(await ws.recv())
            waited = time.monotonic() - t0
            assert header["type"] == "audio" and header["text"] == "Hello there"
            assert isinstance(await ws.recv(), bytes)
            assert waited >= 0.25, waited
            # a long wait: only flush speaks it
            await ws.send(json.dumps({"type": "text", "text": "How are you. Fine"}))
            header = json.loads(await ws.recv())  # the decided sentence comes at once
            assert header["text"] == "How are you." and isinstance(await ws.recv(), bytes)
            await ws.send(json.dumps({"type": "flush"}))
            header = json.loads(await ws.recv())
            assert header["text"] == "Fine" and isinstance(await ws.recv(), bytes)
            assert json.loads(await ws.recv()) == {"type": "flushed", "segments": 3}
            await ws.send(json.dumps({"type": "text", "text": "Hello.", "flush": True}))  # flush in the message
            header = json.loads(await ws.recv())
            assert header["text"] == "Hello." and isinstance(await ws.recv(), bytes)
            assert json.loads(await ws.recv())["type"] == "flushed"
            await ws.send(json.dumps({"type": "stop"}))
            done = json.loads(await ws.recv())
            assert done["type"] == "done" and done["segments"] == 4
            await ws.wait_closed()
            assert ws.close_code == 1000
    run(scenario())


def test_cancel_drops_queued_text_and_audio(server):
    many = " ".join(f"Hello there number {k}." for k in range(60))

    async def scenario():
        async with connect(server.url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "voice": "tiny", "max_wait_ms": 10000}))
            assert json.loads(await ws.recv())["type"] == "ready"
            for k in range(0, len(many), 400):
                await ws.send(json.dumps({"type": "text", "text": many[k:k + 400]}))
            await ws.send(json.dumps({"type": "cancel"}))
            await ws.send(json.dumps({"type": "text", "text": "Bob is here.", "flush": True}))
            await ws.send(json.dumps({"type": "stop"}))
            messages = [json.loads(m) if isinstance(m, str) else m async for m in ws]
            return messages, ws.close_code

    messages, code = run(scenario())
    assert code == 1000
    kinds = [m["type"] if isinstance(m, dict) else "bytes" for m in messages]
    assert kinds.count("cancelled") == 1
    after = messages[kinds.index("cancelled") + 1:]
    spoken = [m["text"] for m in after if isinstance(m, dict) and m["type"] == "audio"]
    assert spoken == ["Bob is here."]  # nothing of the cancelled text after the acknowledgement
    before = [m for m in messages[:kinds.index("cancelled")] if isinstance(m, dict) and m["type"] == "audio"]
    assert len(before) < 60
    assert messages[-1]["type"] == "done"
    bob = next(m for m in after if isinstance(m, dict) and m["type"] == "audio")
    assert bob["chars"][0] == len(many)  # offsets count the cancelled text too


ERRORS = [
    # (messages after connecting, error code, close code)
    (["{not json"], "bad_json", 1007),
    ([{"type": "start", "voice": "nope"}], "unknown_voice", 1008),
    ([{"type": "start", "sample_rate": 4000}], "unsupported_sample_rate", 1003),
    ([{"type": "start", "sample_rate": 400000}], "unsupported_sample_rate", 1003),
    ([{"type": "start", "encoding": "opus"}], "unsupported_encoding", 1003),
    ([{"type": "start", "speed": 10}], "unsupported_option", 1003),
    ([{"type": "start", "speed": 0}], "unsupported_option", 1003),
    ([{"type": "start", "seed": 3}], "unsupported_option", 1003),
    ([{"type": "start", "options": {"noise_scale": 7}}], "unsupported_option", 1003),
    ([{"type": "start", "options": {"temperature": 1}}], "unsupported_option", 1003),
    ([{"type": "start", "speaker": 3}], "unsupported_option", 1003),
    ([{"type": "start", "colour": "red"}], "bad_message", 1008),
    (['{"type": "start", "speed": NaN}'], "bad_message", 1008),
    (['{"type": "start", "speed": 1e999}'], "bad_message", 1008),
    ([{"type": "start", "max_wait_ms": -1}], "unsupported_option", 1003),
    ([{"type": "text", "text": "Hello."}], "not_started", 1008),
    ([{"type": "start"}, {"type": "start"}], "already_started", 1008),
    ([{"type": "start"}, {"type": "shout"}], "unknown_type", 1008),
    ([{"type": "start"}, {"type": "text", "text": 5}], "bad_message", 1008),
    ([{"type": "start"}, {"type": "text", "text": "x" * 501}], "text_too_long", 1009),
    ([{"type": "start"}] + [{"type": "text", "text": "x" * 400}] * 6, "too_much_text", 1008),
    ([{"type": "start"}, {"type": "text", "text": "Hello \x00 there."}], "unsupported_text", 1003),
    ([{"type": "start"}, '{"type": "text", "text": "\\ud800."}'], "unsupported_text", 1003),
    ([{"type": "start"}, b"\x00\x01"], "bad_message", 1008),
]


@pytest.mark.parametrize("sends,code,close", ERRORS, ids=[f"{e[1]}-{k}" for k, e in enumerate(ERRORS)])
def test_bad_input_gets_its_code_and_frees_the_slot(server, sends, code, close):
    async def scenario():
        async with connect(server.url) as ws:
            for item in sends:
                if isinstance(item, dict) and item["type"] == "start":
                    item = {"voice": "tiny", **item}
                await ws.send(item if isinstance(item, (str, bytes)) else json.dumps(item))
            messages = []
            try:
                async for m in ws:
                    messages.append(json.loads(m) if isinstance(m, str) else m)
            except ConnectionClosed:
                pass
            return messages, ws.close_code

    before = server.server.metrics.value("chorus_errors_total", code=code)
    messages, close_code = run(scenario())
    errors = [m for m in messages if isinstance(m, dict) and m["type"] == "error"]
    assert errors and errors[-1]["code"] == code, messages
    assert close_code == close
    assert server.server.metrics.value("chorus_errors_total", code=code) == before + 1
    server.wait_idle()


def test_overloaded_voice_and_idle_timeout(server):
    async def scenario():
        async with connect(server.url) as first:
            await first.send(json.dumps({"type": "start", "voice": "small"}))
            assert json.loads(await first.recv())["type"] == "ready"
            async with connect(server.url) as second:
                await second.send(json.dumps({"type": "start", "voice": "small"}))
                error = json.loads(await second.recv())
                assert error["code"] == "overloaded"
                with pytest.raises(ConnectionClosed):
                    await second.recv()
                assert second.close_code == 1013
            # the first one idles past the timeout (3 s) with nothing to speak
            error = json.loads(await first.recv())
            assert error["code"] == "idle_timeout"
    run(scenario())


def test_models_lists_voices(server):
    import urllib.request
    models = json.loads(urllib.request.urlopen(server.http + "/models").read())
    voices = [m for m in models if m.get("kind") == "tts"]
    assert [v["name"] for v in voices] == ["tiny", "small"] and voices[0]["default"] and not voices[1]["default"]
    assert voices[0]["family"] == "piper" and voices[0]["sample_rate"] == 16000 and voices[0]["slots"] == SLOTS
    assert voices[0]["options"]["noise_scale"]["default"] == 0.0 and voices[0]["speed"]["max"] == 4.0
    assert [m["name"] for m in models if m.get("kind") != "tts"] == ["default"]


def test_asr_and_tts_streams_at_once(server, voice):
    rng = np.random.default_rng(3)
    noise = (rng.standard_normal(16000 * 2) * 0.1).astype(np.float32)

    async def asr():
        async with connect(server.asr_url) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le"}))
            data = encode(noise, "pcm_s16le")
            for k in range(0, len(data), 3200):
                await ws.send(data[k:k + 3200])
                await asyncio.sleep(0.005)
            await ws.send(json.dumps({"type": "stop"}))
            messages = [json.loads(m) async for m in ws]
            return messages, ws.close_code

    async def both():
        return await asyncio.gather(asr(), *(speak(server.url, {"voice": "tiny", "encoding": "pcm_f32le"},
                                                   [TEXTS[k]], pace=0.01) for k in range(3)))

    (asr_messages, asr_code), *tts = run(both())
    assert asr_code == 1000 and asr_messages[0]["type"] == "ready" and asr_messages[-1]["type"] == "final"
    assert asr_messages[-1]["reason"] == "stop"
    for k, (messages, code) in enumerate(tts):
        assert code == 1000
        got = audio_of(messages, "pcm_f32le")
        want = offline(voice, TEXTS[k])
        assert len(got) == len(want) and all(np.max(np.abs(a - b), initial=0) <= 1e-4
                                             for (_, a), b in zip(got, want))


def test_graceful_shutdown_finishes_tts_streams(voice_path):
    voices = ModelRegistry()
    voices.add("tiny", load_voice(voice_path), slots=4)
    srv = VoiceServer(ModelRegistry(), ServerConfig(port=0, batch_wait_ms=5), voices)
    try:
        async def client():
            async with connect(srv.url) as ws:
                await ws.send(json.dumps({"type": "start", "max_wait_ms": 10000}))
                assert json.loads(await ws.recv())["type"] == "ready"
                await ws.send(json.dumps({"type": "text", "text": "Hello there. How are you? Fine"}))
                await asyncio.sleep(0.3)
                asyncio.run_coroutine_threadsafe(srv.server.shutdown(5.0), srv.loop)
                messages = [json.loads(m) if isinstance(m, str) else m async for m in ws]
                return messages, ws.close_code

        messages, code = run(client())
        assert code == 1001
        texts = [m["text"] for m in messages if isinstance(m, dict) and m["type"] == "audio"]
        assert texts == ["Hello there.", "How are you?", "Fine"]  # what was sent is spoken, the rest flushed
        assert messages[-1]["type"] == "done" and messages[-1]["reason"] == "shutdown"
        deadline = time.time() + 10
        while voices.get("tiny").engine.pool.used and time.time() < deadline:
            time.sleep(0.02)
        assert voices.get("tiny").engine.pool.used == 0
    finally:
        try:
            srv.stop()
        except Exception:  # noqa: BLE001 - shutdown already stopped it
            pass


def test_speak_demo_url_mode_writes_what_the_server_speaks(server, voice, tmp_path):
    import subprocess

    import soundfile as sf
    out = tmp_path / "remote.wav"
    text = "Hello there. How are you?\nBob is here.\n"
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "demos" / "speak.py"), "-", "--url",
                           server.url, "--voice", "tiny", "-o", str(out)], input=text.encode(), capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    audio, rate = sf.read(out, dtype="float32")
    assert rate == voice.sample_rate
    # stdin goes line by line, each line its own text message: the same sentences as the whole text
    want = np.concatenate(offline(voice, text))
    assert audio.shape == want.shape and np.max(np.abs(audio - want)) <= 1e-4
    assert "How are you?" in proc.stderr.decode()
