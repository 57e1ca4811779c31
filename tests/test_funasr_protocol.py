"""FunASR's WebSocket protocol (online mode) on chorus' port, through the same sessions as /asr.

The client here is written from FunASR's protocol document (runtime/docs/websocket_protocol.md) and
the way its Python client (runtime/python/websocket/funasr_wss_client.py) cuts and sends audio:
connect to ws://HOST:PORT/ with the `binary` subprotocol, send the JSON configuration, PCM16 frames
of 60 * chunk_size[1] / chunk_interval ms, then {"is_speaking": false, "is_end": true}, and
concatenate the `text` of every `online` result.
"""
import asyncio
import json
import urllib.request

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chorus.asr.conformer.checkpoint import load_fastconformer
from chorus.asr.conformer.family import ConformerModel
from chorus.asr.families import load_model
from chorus.asr.transcribe import transcribe_files
from chorus.server.app import ServerConfig
from chorus.server.registry import ModelRegistry
from chorus.stream.contract import StreamRequest
from paraformer_factories import speechlike, write_tiny_dir
from test_server import ServerThread, run, stream_file

RESULT_FIELDS = {"mode", "text", "wav_name", "is_final"}


@pytest.fixture(scope="module")
def para_dir(tmp_path_factory):
    return write_tiny_dir(tmp_path_factory.mktemp("paraformer") / "model", seed=3)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    paths = []
    for i, (seconds, rate) in enumerate(((2.45, 16000), (1.3, 8000), (3.1, 16000))):
        path = folder / f"clip{i}.wav"
        audio = speechlike(seconds, seed=40 + i, rate=rate).numpy()
        sf.write(path, audio, rate, subtype="PCM_16")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def server(para_dir, model_path):
    registry = ModelRegistry()
    registry.add("paraformer", load_model(para_dir), slots=4)  # the default model
    registry.add("conformer", ConformerModel(load_fastconformer(model_path)), slots=2)
    srv = ServerThread(registry, ServerConfig(port=0, batch_wait_ms=5, idle_timeout=5.0))
    srv.root = f"ws://127.0.0.1:{srv.server.port}"
    yield srv
    srv.stop()


def pcm16(path):
    audio, rate = sf.read(path, dtype="int16")
    return audio.tobytes(), rate


def first_message(rate, wav_name="demo", mode="online", **overrides):
    """FunASR's client's first message (funasr_wss_client.py, record_from_scp)."""
    return {"mode": mode, "chunk_size": [5, 10, 5], "chunk_interval": 10, "encoder_chunk_look_back": 4,
            "decoder_chunk_look_back": 0, "audio_fs": rate, "wav_name": wav_name, "wav_format": "pcm",
            "is_speaking": True, "hotwords": "", "itn": True, **overrides}


async def funasr_client(url, pcm: bytes, first: dict, *, end=None, subprotocols=("binary",), stride=None,
                        pace=0.001):
    """Send as FunASR's client does; read results until the end-of-input acknowledgement (is_end)."""
    rate, chunk = first.get("audio_fs", 16000), first.get("chunk_size", [5, 10, 5])
    stride = stride or int(60 * chunk[1] / first.get("chunk_interval", 10) / 1000 * rate * 2)
    results = []
    async with connect(url, subprotocols=list(subprotocols) or None) as ws:
        async def read():
            async for m in ws:
                results.append(json.loads(m))
                if results[-1].get("is_end"):
                    return

        reader = asyncio.create_task(read())
        await ws.send(json.dumps(first))
        for i in range(0, len(pcm), stride):
            await ws.send(pcm[i:i + stride])
            await asyncio.sleep(pace)
        await ws.send(json.dumps(end or {"is_speaking": False, "is_end": True}))
        await asyncio.wait_for(reader, 30)
        return results, ws.subprotocol


def transcribe(engine, path, **request):
    return list(transcribe_files(engine, [str(path)], StreamRequest(**request)))[0].text


def test_online_results_equal_chorus_transcribe(server, para_dir, clips):
    model = load_model(para_dir)
    options = {"chunk_size": [5, 10, 5], "encoder_chunk_look_back": 4, "decoder_chunk_look_back": 0}
    expected = [transcribe(model.make_engine(slots=1), c, options=options) for c in clips]

    async def clients():
        sends = []
        for i, c in enumerate(clips):
            pcm, rate = pcm16(c)
            sends.append(funasr_client(server.root + "/", pcm, first_message(rate, f"wav{i}")))
        return await asyncio.gather(*sends)

    for (results, subprotocol), text, i in zip(run(clients()), expected, range(len(clips))):
        assert subprotocol == "binary"
        *texts, ack = results
        assert ack == {"mode": "online", "wav_name": f"wav{i}", "is_final": True, "is_end": True}
        assert all(set(m) == RESULT_FIELDS and m["mode"] == "online" and m["wav_name"] == f"wav{i}" for m in texts)
        assert [m["is_final"] for m in texts] == [False] * (len(texts) - 1) + [True]
        assert "".join(m["text"] for m in texts) == text and text
        assert all(m["text"] for m in texts[:-1]) and len(texts) >= 3  # new text per chunk, not the whole
    server.wait_idle()
    metrics = urllib.request.urlopen(server.http + "/metrics").read().decode()
    assert 'chorus_streams_total{model="paraformer"} 3.0' in metrics


def test_browser_style_client_two_segments_no_subprotocol_odd_frames(server, para_dir, clips):
    """FunASR's HTML5 client: no subprotocol, frames of any byte length, an end message that repeats
    the configuration and has no is_end; then a second segment on the same connection."""
    engine = load_model(para_dir).make_engine(slots=1)
    options = {"chunk_size": [5, 10, 5], "encoder_chunk_look_back": 4, "decoder_chunk_look_back": 1}
    expected = [transcribe(engine, c, options=options) for c in (clips[0], clips[2])]
    end = {"chunk_size": [5, 10, 5], "wav_name": "h5", "is_speaking": False, "chunk_interval": 10, "mode": "online"}

    async def client():
        results = []
        async with connect(server.root + "/funasr") as ws:
            assert ws.subprotocol is None
            await ws.send(json.dumps({"chunk_size": [5, 10, 5], "wav_name": "h5", "is_speaking": True,
                                      "chunk_interval": 10, "itn": False, "mode": "online",
                                      "encoder_chunk_look_back": 4, "decoder_chunk_look_back": 1}))
            for n, clip in enumerate((clips[0], clips[2])):
                if n:
                    await ws.send(json.dumps({"is_speaking": True}))
                pcm, _ = pcm16(clip)
                for i in range(0, len(pcm), 999):  # odd sizes: samples straddle frames
                    await ws.send(pcm[i:i + 999])
                await ws.send(json.dumps(end))
                segment = []
                while not segment or not segment[-1]["is_final"]:
                    segment.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
                results.append(segment)
        return results

    for segment, text in zip(run(client()), expected):
        assert all(set(m) == RESULT_FIELDS and m["wav_name"] == "h5" for m in segment)
        assert "".join(m["text"] for m in segment) == text and text
    server.wait_idle()
    page = urllib.request.urlopen(server.http + "/")  # a plain GET on "/" is still the browser demo
    assert b"<html" in page.read().lower()


def test_a_fastconformer_through_funasr_protocol(server, model_path, clips):
    """Another family: chunk_size picks the lookahead whose chunk is nearest 60 * chunk_size[1] ms;
    decoding is greedy, so that each result's new text only ever grows."""
    described = next(m for m in json.loads(urllib.request.urlopen(server.http + "/models").read())
                     if m["name"] == "conformer")
    lookahead = min(described["chunk_ms"], key=lambda k: abs(described["chunk_ms"][k] - 600))
    expected = transcribe(ConformerModel(load_fastconformer(model_path)).make_engine(slots=1), clips[0],
                          lookahead_ms=int(lookahead), beam_size=1)
    pcm, rate = pcm16(clips[0])
    results, _ = run(funasr_client(server.root + "/?model=conformer", pcm, first_message(rate)))
    *texts, ack = results
    assert ack["is_end"] and texts[-1]["is_final"] and "".join(m["text"] for m in texts) == expected
    server.wait_idle()


BAD_FIRST = [
    (first_message(16000, mode="2pass"), "unsupported_option", 1003, "offline model"),
    (first_message(16000, mode="offline"), "unsupported_option", 1003, "offline model"),
    (first_message(16000, mode="nearline"), "unsupported_option", 1003, "unknown mode"),
    ({k: v for k, v in first_message(16000).items() if k != "mode"}, "bad_message", 1008, "no mode"),
    (first_message(16000, chunk_size=[1, 2, 3]), "unsupported_option", 1003, "chunk_size"),
    (first_message(16000, chunk_size=[5, 0, 5]), "unsupported_option", 1003, "chunk_size"),
    (first_message(16000, chunk_size="five"), "bad_message", 1008, "chunk_size"),
    (first_message(16000, encoder_chunk_look_back=9), "unsupported_option", 1003, "encoder_chunk_look_back"),
    (first_message(16000, wav_format="mp3"), "unsupported_encoding", 1003, "PCM"),
    (first_message(4000), "unsupported_sample_rate", 1003, "4000"),
    ({"type": "start"}, "bad_message", 1008, "/asr"),
    ({"hello": 1}, "bad_message", 1008, "FunASR's configuration"),
    ("not json", "bad_json", 1007, "JSON"),
    (b"\x00\x00" * 800, "not_started", 1008, "audio"),
]


@pytest.mark.parametrize("first,code,close,words", BAD_FIRST)
def test_bad_first_messages_get_a_json_error_and_a_close_code(server, first, code, close, words):
    async def client():
        async with connect(server.root + "/", subprotocols=["binary"]) as ws:
            await ws.send(first if isinstance(first, (str, bytes)) else json.dumps(first))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return reply, ws.close_code

    reply, closed = run(client())
    assert reply["code"] == code and words in reply["error"] and closed == close, reply
    assert reply["is_end"] is True and reply["is_final"] is False and reply["text"] == ""
    server.wait_idle()


def test_unknown_model_and_the_chorus_protocol_beside_it(server, clips):
    async def unknown():
        async with connect(server.root + "/?model=nope", subprotocols=["binary"]) as ws:
            await ws.send(json.dumps(first_message(16000)))
            reply = json.loads(await ws.recv())
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return reply, ws.close_code

    reply, closed = run(unknown())
    assert reply["code"] == "unknown_model" and closed == 1008
    pcm, _ = pcm16(clips[0])  # chorus' own protocol on /asr, same port, at the same time
    msgs = run(stream_file(server.root + "/asr", pcm, {"model": "paraformer", "endpointing": False}, 3200))
    assert msgs[0]["type"] == "ready" and msgs[-1] == {"closed": 1000}
    server.wait_idle()


def test_a_client_that_drops_mid_stream_returns_its_slot(server, clips):
    pcm, rate = pcm16(clips[2])

    async def client():
        async with connect(server.root + "/", subprotocols=["binary"]) as ws:
            await ws.send(json.dumps(first_message(rate)))
            for i in range(0, len(pcm) // 2, 3200):
                await ws.send(pcm[i:i + 3200])
            await asyncio.sleep(0.2)
            ws.transport.abort()  # no close frame, no is_speaking false

    run(client())
    server.wait_idle()
    assert np.all([e.engine.pool.used == 0 for e in server.server.registry.entries()])


def test_shutdown_sends_the_last_result_as_final_and_closes_1001(para_dir, clips):
    """SIGTERM's path (AsrServer.shutdown): the audio sent is transcribed, the last result has
    is_final true, then close 1001 — the same machinery as /asr."""
    registry = ModelRegistry()
    registry.add("paraformer", load_model(para_dir), slots=2)
    srv = ServerThread(registry, ServerConfig(port=0, batch_wait_ms=5))
    options = {"chunk_size": [5, 10, 5], "encoder_chunk_look_back": 4, "decoder_chunk_look_back": 0}
    expected = transcribe(load_model(para_dir).make_engine(slots=1), clips[2], options=options)
    pcm, rate = pcm16(clips[2])

    async def client():
        results = []
        async with connect(f"ws://127.0.0.1:{srv.server.port}/", subprotocols=["binary"]) as ws:
            await ws.send(json.dumps(first_message(rate)))
            await ws.send(pcm)
            await asyncio.sleep(0.3)
            asyncio.run_coroutine_threadsafe(srv.server.shutdown(), srv.loop)
            try:
                async for m in ws:
                    results.append(json.loads(m))
            except ConnectionClosed:
                pass
            return results, ws.close_code

    try:
        results, code = run(client())
        assert code == 1001 and results[-1]["is_final"] and not any(m["is_final"] for m in results[:-1])
        assert "".join(m["text"] for m in results) == expected and expected
        srv.wait_idle()
    finally:
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        srv.thread.join(10)
