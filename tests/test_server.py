"""The WebSocket server end to end with a real websockets client."""
import asyncio
import json
import shutil
import ssl
import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chorus.asr.conformer.checkpoint import load_fastconformer
from chorus.asr.conformer.family import ConformerModel, make_search
from chorus.asr.transcribe import transcribe_files
from chorus.codecs import encode
from chorus.server.app import AsrServer, ServerConfig
from chorus.server.registry import ModelRegistry
from chorus.stream.contract import StreamRequest

SLOTS = 20


class ServerThread:
    """The server on its own event loop in a background thread, as `chorus serve` runs it."""

    def __init__(self, registry, config):
        self.server = AsrServer(registry, config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        self.url = f"ws://127.0.0.1:{self.server.port}/asr"
        self.http = f"http://127.0.0.1:{self.server.port}"

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def wait_idle(self, timeout=10.0):
        """Every stream closed and every slot back in its pool."""
        end = time.time() + timeout
        pools = [e.engine.pool for e in self.server.registry.entries()]
        while time.time() < end:
            if all(p.used == 0 for p in pools) and self.server.connections == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"slots still in use: {[p.used for p in pools]}, connections {self.server.connections}")


@pytest.fixture(scope="module")
def server(model_path):
    registry = ModelRegistry()
    registry.add("default", ConformerModel(load_fastconformer(model_path)), slots=SLOTS)
    registry.add("second", ConformerModel(load_fastconformer(model_path)), slots=2)
    srv = ServerThread(registry, ServerConfig(port=0, max_frame_bytes=64 * 1024, idle_timeout=2.0,
                                              batch_wait_ms=5))
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def idle_after(request):
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").wait_idle()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def stream_file(url, data: bytes, start: dict, piece: int, pace: float = 0.0):
    """Send a start message and audio bytes in pieces; return every message up to the close."""
    messages = []
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", **start}))
        messages.append(json.loads(await ws.recv()))
        for i in range(0, len(data), piece):
            await ws.send(data[i:i + piece])
            if pace:
                await asyncio.sleep(pace)
        await ws.send(json.dumps({"type": "stop"}))
        async for m in ws:
            messages.append(json.loads(m))
        messages.append({"closed": ws.close_code})
    return messages


def finals_text(messages):
    return " ".join(m["text"] for m in messages if m.get("type") == "final").strip()


def test_http_routes(server):
    assert urllib.request.urlopen(server.http + "/healthz").read() == b"ok\n"
    metrics = urllib.request.urlopen(server.http + "/metrics").read().decode()
    assert 'chorus_slots{model="default",state="free"} 20.0' in metrics
    assert "chorus_connections 0.0" in metrics and 'chorus_backlog_seconds{model="default",stat="max"} 0.0' in metrics
    models = json.loads(urllib.request.urlopen(server.http + "/models").read())
    assert [m["name"] for m in models] == ["default", "second"] and [m["default"] for m in models] == [True, False]
    assert models[0]["chunk_ms"]["480"] == 560 and models[0]["default_lookahead_ms"] == 1040
    page = urllib.request.urlopen(server.http + "/")
    assert page.headers["Content-Type"] == "text/html; charset=utf-8" and b"<html" in page.read().lower()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.http + "/../../etc/passwd")
    assert err.value.code == 404


def test_protocol_round_trip(server):
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(16000 * 2) * 0.1).astype(np.float32)
    msgs = run(stream_file(server.url, encode(audio, "pcm_s16le"),
                           {"lookahead_ms": 480, "word_times": True, "decoder": "rnnt"}, 640))
    ready = msgs[0]
    assert ready["type"] == "ready" and ready["protocol"] == "chorus.asr.v1"
    assert ready["lookahead_ms"] == 480 and ready["chunk_ms"] == 560 and ready["decoder"] == "rnnt"
    partials = [m for m in msgs if m.get("type") == "partial"]
    finals = [m for m in msgs if m.get("type") == "final"]
    assert partials and finals and finals[-1]["reason"] == "stop"
    assert all(m["start"] <= m["end"] for m in partials + finals)
    assert finals[-1]["end"] == pytest.approx(2.0, abs=0.09)
    assert finals[-1]["words"] and all(w["start"] < w["end"] for w in finals[-1]["words"])
    assert msgs[-1] == {"closed": 1000}


def _write_clip(path, seconds, rate, subtype, seed):
    rng = np.random.default_rng(seed)
    audio = (rng.standard_normal(int(seconds * rate)) * 0.2).clip(-1, 1).astype(np.float32)
    sf.write(path, audio, rate, subtype=subtype)


def test_sixteen_clients_match_chorus_transcribe(server, model_path, tmp_path):
    """Different files, rates and encodings, at once; each gets what `chorus transcribe` gives."""
    kinds = [(8000, "PCM_16", "pcm_s16le"), (16000, "FLOAT", "pcm_f32le"), (44100, "ULAW", "mulaw"),
             (48000, "PCM_16", "pcm_s16le"), (22050, "FLOAT", "pcm_f32le"), (16000, "ULAW", "mulaw")]
    clips = []
    for i in range(16):
        rate, subtype, encoding = kinds[i % len(kinds)]
        path = tmp_path / f"clip{i}.wav"
        _write_clip(path, 0.7 + 0.23 * i, rate, subtype, seed=i)
        raw = sf.read(path, dtype="float32")[0]
        data = raw.astype("<f4").tobytes() if encoding == "pcm_f32le" else encode(raw, encoding)
        clips.append((path, rate, encoding, data))
    loaded = load_fastconformer(model_path)
    engine = ConformerModel(loaded).make_engine(slots=16)
    expected = {str(r.file): r.text for r in transcribe_files(engine, [str(c[0]) for c in clips],
                                                              StreamRequest(lookahead_ms=80, decoder="ctc"))}

    async def all_clients():
        return await asyncio.gather(*[
            stream_file(server.url, data, {"sample_rate": rate, "encoding": enc, "lookahead_ms": 80,
                                           "decoder": "ctc", "endpointing": False},
                        piece=(rate // 25) * {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1}[enc],
                        pace=0.002)
            for _, rate, enc, data in clips])

    metrics = server.server.metrics

    def steps_over_one():  # steps of more than one stream so far
        return (metrics.value("chorus_step_batch_size_count", model="default")
                - metrics.value("chorus_step_batch_size_bucket", model="default", le="1.0"))

    before = steps_over_one()
    results = run(all_clients())
    for (path, *_), msgs in zip(clips, results):
        assert msgs[-1] == {"closed": 1000}
        assert [m["reason"] for m in msgs if m.get("type") == "final"] == ["stop"]
        assert finals_text(msgs) == expected[str(path)].strip(), path
    assert steps_over_one() > before, "never batched"


def test_beam_search_clients_match_chorus_transcribe(server, model_path, tmp_path):
    """Clients asking for beam search get what `chorus transcribe --beam 4` gives, batched with a greedy one."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"beam{i}.wav")
        _write_clip(paths[-1], 1.1 + 0.4 * i, 16000, "PCM_16", seed=40 + i)
    loaded = load_fastconformer(model_path)
    expected = {}
    for beam in (1, 4):
        engine = ConformerModel(loaded, make_search(loaded, beam_size=beam)).make_engine(slots=3)
        results = transcribe_files(engine, [str(p) for p in paths], StreamRequest(lookahead_ms=480, decoder="rnnt"))
        expected[beam] = [r.text.strip() for r in results]
    assert expected[1] != expected[4]

    async def clients():
        return await asyncio.gather(*[
            stream_file(server.url, encode(sf.read(p, dtype="float32")[0], "pcm_s16le"),
                        {"lookahead_ms": 480, "endpointing": False, **({"beam_size": beam} if beam else {})},
                        piece=1280, pace=0.002)
            for p in paths for beam in (None, 4)])

    results = run(clients())
    for k, msgs in enumerate(results):
        beam = 4 if k % 2 else 1
        assert msgs[0]["beam_size"] == beam and msgs[0]["lm"] is False
        assert finals_text(msgs) == expected[beam][k // 2]


def test_beam_search_stream_goes_on_across_endpoints(server):
    """Each endpoint keeps the best hypothesis' state and starts the next utterance empty."""
    audio = encode((np.random.default_rng(8).standard_normal(16000 * 3) * 0.1).astype(np.float32), "pcm_s16le")
    msgs = run(stream_file(server.url, audio, {"beam_size": 3, "endpointing": {"max_utterance_ms": 800}}, 3200))
    finals = [m for m in msgs if m.get("type") == "final"]
    assert [m["utterance"] for m in finals] == list(range(len(finals)))
    assert finals[0]["reason"] == "endpoint" and finals[0]["text"]
    assert finals[-1]["reason"] == "stop" and msgs[-1] == {"closed": 1000}


def test_finalize_then_continue_and_endpoint_by_length(server):
    rng = np.random.default_rng(5)
    audio = encode((rng.standard_normal(16000 * 3) * 0.1).astype(np.float32), "pcm_s16le")

    async def client():
        out = []
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start", "interim_results": False,
                                      "endpointing": {"max_utterance_ms": 1000}}))
            out.append(json.loads(await ws.recv()))
            await ws.send(audio[:32000])
            await ws.send(json.dumps({"type": "finalize"}))
            await ws.send(json.dumps({"type": "keepalive"}))
            await ws.send(audio[32000:])
            await ws.send(json.dumps({"type": "stop"}))
            async for m in ws:
                out.append(json.loads(m))
        return out

    msgs = run(client())
    finals = [m for m in msgs if m.get("type") == "final"]
    assert not [m for m in msgs if m.get("type") == "partial"]  # interim_results off
    reasons = [m["reason"] for m in finals]
    assert "finalize" in reasons and reasons[-1] == "stop" and "endpoint" in reasons
    assert [m["utterance"] for m in finals] == list(range(len(finals)))
    after = finals[reasons.index("finalize") + 1]
    assert after["start"] >= 1.0  # times continue after a finalize
    for a, b in zip(finals, finals[1:]):
        assert a["end"] <= b["start"] + 1e-6


@pytest.mark.parametrize("send, code, close", [
    (["not json"], "bad_json", 1007),
    (['["a", "list"]'], "bad_json", 1007),
    (['{"no_type": 1}'], "bad_message", 1008),
    (['{"type": "dance"}'], "unknown_type", 1008),
    ([b"\x00\x01"], "not_started", 1008),
    (['{"type": "stop"}'], "not_started", 1008),
    (['{"type": "start", "model": "../../etc/passwd"}'], "unknown_model", 1008),
    (['{"type": "start", "encoding": "opus"}'], "unsupported_encoding", 1003),
    (['{"type": "start", "sample_rate": 4000}'], "unsupported_sample_rate", 1003),
    (['{"type": "start", "sample_rate": 16000.5}'], "bad_message", 1008),
    (['{"type": "start", "lookahead_ms": 300}'], "unsupported_option", 1003),
    (['{"type": "start", "beam_size": 0}'], "unsupported_option", 1003),
    (['{"type": "start", "beam_size": 17}'], "unsupported_option", 1003),
    (['{"type": "start", "beam_size": 4, "decoder": "ctc"}'], "unsupported_option", 1003),
    (['{"type": "start", "beam_size": "4"}'], "bad_message", 1008),
    (['{"type": "start", "colour": "red"}'], "bad_message", 1008),
    (['{"type": "start", "endpointing": {"silence_after_speech_ms": -5}}'], "bad_message", 1008),
    (['{"type": "start"}', '{"type": "start"}'], "already_started", 1008),
    (['{"type": "start"}', '{"type": "dance"}'], "unknown_type", 1008),
    (['{"type": "start"}', b"\x00\x01\x02"], "bad_audio", 1007),
    (['{"type": "start", "encoding": "pcm_f32le"}', np.array([0.1, np.nan], "<f4").tobytes()], "bad_audio", 1007),
    (['{"type": "start", "encoding": "pcm_f32le"}', np.array([np.inf], "<f4").tobytes()], "bad_audio", 1007),
    (['{"type": "start"}', b"\x00" * (64 * 1024 + 2)], "frame_too_large", 1009),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_ends_that_stream_only(server, send, code, close):
    async def bystander():
        """A healthy stream running while the bad one fails; it must finish untouched."""
        audio = encode((np.random.default_rng(1).standard_normal(16000) * 0.1).astype(np.float32), "pcm_s16le")
        return await stream_file(server.url, audio, {"endpointing": False}, 3200, pace=0.01)

    async def bad_client():
        async with connect(server.url) as ws:
            replies = []
            for i, item in enumerate(send):
                await ws.send(item)
                if i < len(send) - 1:  # a start that the server accepts before the bad message
                    replies.append(json.loads(await ws.recv()))
            try:
                async for m in ws:
                    replies.append(json.loads(m))
            except ConnectionClosed:
                pass
            return replies, ws.close_code, ws.close_reason

    async def both():
        return await asyncio.gather(bystander(), bad_client())

    good, (replies, close_code, reason) = run(both())
    errors = [m for m in replies if m.get("type") == "error"]
    assert len(errors) == 1 and errors[0]["code"] == code and errors[0]["message"]
    assert close_code == close
    assert good[-1] == {"closed": 1000} and good[0]["type"] == "ready"
    assert urllib.request.urlopen(server.http + "/healthz").read() == b"ok\n"


def test_very_large_frame_is_closed_by_the_library(server):
    async def client():
        async with connect(server.url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "start"}))
            await ws.recv()
            await ws.send(b"\x00" * (3 * 64 * 1024))
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.recv()
            return ws.close_code
    assert run(client()) == 1009


def test_client_vanishing_mid_stream_returns_the_slot(server):
    async def client():
        ws = await connect(server.url)
        await ws.send(json.dumps({"type": "start"}))
        await ws.recv()
        await ws.send(b"\x00\x01" * 8000)
        ws.transport.abort()  # no close handshake
    run(client())
    server.wait_idle()


def test_idle_timeout(server):
    async def client():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start"}))
            await ws.recv()
            msgs = []
            try:
                async for m in ws:
                    msgs.append(json.loads(m))
            except ConnectionClosed:
                pass
            return msgs, ws.close_code
    msgs, code = run(client())
    assert msgs[-1]["code"] == "idle_timeout" and code == 1008


def test_overload_answers_1013_and_existing_streams_go_on(server):
    async def scenario():
        holders = []
        for _ in range(2):
            ws = await connect(server.url)
            await ws.send(json.dumps({"type": "start", "model": "second"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            holders.append(ws)
        async with connect(server.url) as third:
            await third.send(json.dumps({"type": "start", "model": "second"}))
            reply = json.loads(await third.recv())
            with pytest.raises(ConnectionClosed):
                await third.recv()
            code = third.close_code
        for ws in holders:  # the admitted streams still work
            await ws.send(b"\x00\x00" * 16000)
            await ws.send(json.dumps({"type": "stop"}))
            finals = [json.loads(m) async for m in ws]
            assert finals[-1]["type"] == "final" and ws.close_code == 1000
        return reply, code
    reply, code = run(scenario())
    assert reply["code"] == "overloaded" and code == 1013


def test_auth_and_origins(model_path):
    registry = ModelRegistry()
    registry.add("default", ConformerModel(load_fastconformer(model_path)), slots=2)
    srv = ServerThread(registry, ServerConfig(port=0, auth_tokens=("s3cret",),
                                              allowed_origins=("https://app.example",)))
    try:
        async def attempts():
            with pytest.raises(InvalidStatus) as e1:
                async with connect(srv.url):
                    pass
            with pytest.raises(InvalidStatus) as e2:
                async with connect(srv.url, additional_headers={"Authorization": "Bearer nope"}):
                    pass
            async with connect(srv.url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
                await ws.send(json.dumps({"type": "start"}))
                assert json.loads(await ws.recv())["type"] == "ready"
            async with connect(srv.url + "?token=s3cret", origin="https://app.example") as ws:
                await ws.send(json.dumps({"type": "stop"}))
                await ws.recv()
            with pytest.raises(InvalidStatus) as e3:
                async with connect(srv.url + "?token=s3cret", origin="https://evil.example"):
                    pass
            return e1.value.response.status_code, e2.value.response.status_code, e3.value.response.status_code
        assert run(attempts()) == (401, 401, 403)
        srv.wait_idle()
    finally:
        srv.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed to make a test certificate")
def test_tls(model_path, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    registry = ModelRegistry()
    registry.add("default", ConformerModel(load_fastconformer(model_path)), slots=1)
    srv = ServerThread(registry, ServerConfig(port=0, tls_cert=str(cert), tls_key=str(key)))
    try:
        context = ssl.create_default_context(cafile=str(cert))

        async def client():
            async with connect(srv.url.replace("ws://", "wss://"), ssl=context) as ws:
                await ws.send(json.dumps({"type": "start"}))
                return json.loads(await ws.recv())["type"]
        assert run(client()) == "ready"
        page = urllib.request.urlopen(srv.http.replace("http://", "https://") + "/healthz", context=context)
        assert page.read() == b"ok\n"
        srv.wait_idle()
    finally:
        srv.stop()
