"""What one client must not be able to do to the others: leak connections, stall the scheduler,
crash a session with odd JSON; and what a process manager's SIGTERM must get (a graceful stop)."""
import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chorus.asr.conformer.checkpoint import load_fastconformer
from chorus.asr.conformer.family import ConformerModel
from chorus.codecs import encode
from chorus.server.app import ServerConfig
from chorus.server.asr_session import AsrSession
from chorus.server.registry import ModelRegistry
from test_server import ServerThread, run


def speech(seconds: float, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode((rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32), "pcm_s16le")


@pytest.fixture
def make_server(model_path):
    servers = []

    def make(slots=4, **config):
        registry = ModelRegistry()
        registry.add("default", ConformerModel(load_fastconformer(model_path)), slots=slots)
        servers.append(ServerThread(registry, ServerConfig(port=0, batch_wait_ms=5, **config)))
        return servers[-1]

    yield make
    for srv in servers:
        srv.stop()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def stop_then_drop(url: str, audio: bytes) -> None:
    """start, ready, 0.5 s of audio, stop, then drop TCP before the final arrives (no close frame)."""
    ws = await connect(url)
    await ws.send(json.dumps({"type": "start"}))
    await ws.recv()
    await ws.send(audio)
    await ws.send(json.dumps({"type": "stop"}))
    ws.transport.abort()


def test_stop_then_drop_releases_the_connection(make_server):
    """Each such cycle used to leave the connection counted for good (the stop path waited on an
    outbox whose writer had ended), so a small --max-connections soon answered 503 to everyone."""
    srv = make_server(max_connections=4)
    audio = speech(0.5)

    async def cycles():
        for _ in range(40):
            await stop_then_drop(srv.url, audio)
            await asyncio.sleep(0.01)

    run(cycles())  # an InvalidStatus (503) here is the leak
    srv.wait_idle()
    assert srv.server.connections == 0 and srv.server.metrics.value("chorus_connections") == 0


def test_a_thousand_abrupt_disconnects_leave_nothing_behind(make_server):
    """Mixed ways to vanish: before start, after start, mid-audio, after finalize, after stop.
    Connections, slots and pages all return to 0 and memory stays flat."""
    srv = make_server(slots=8, max_connections=8)
    audio = speech(0.3, seed=3)

    async def vanish(kind: int):
        ws = await connect(srv.url)
        if kind > 0:
            await ws.send(json.dumps({"type": "start"}))
            await ws.recv()
        if kind > 1:
            await ws.send(audio)
        if kind == 3:
            await ws.send(json.dumps({"type": "finalize"}))
        if kind == 4:
            await ws.send(json.dumps({"type": "stop"}))
        ws.transport.abort()

    async def cycles(n, start=0):
        for i in range(start, start + n):
            await asyncio.gather(*(vanish((i * 4 + k) % 5) for k in range(4)))

    run(cycles(25))  # warm up allocators and caches
    srv.wait_idle()
    before = rss_bytes()
    run(cycles(225, start=25))  # 250 rounds of 4 clients: 1000 disconnects
    srv.wait_idle()
    grown = rss_bytes() - before
    assert grown < 24 * 2**20, f"memory grew {grown / 2**20:.1f} MiB over 900 disconnects"
    assert srv.server.connections == 0 and not srv.server._sessions
    pool = srv.server.registry.get("default").engine.pool
    assert pool.used == 0


@pytest.mark.parametrize("bad", ['{"type": "start", "endpointing": {"energy_threshold_db": NaN}}',
                                 '{"type": "start", "endpointing": {"energy_threshold_db": -Infinity}}',
                                 '{"type": "start", "endpointing": {"silence_after_speech_ms": 1e999}}',
                                 '{"type": "start", "sample_rate": ' + "1" * 5000 + "}",
                                 '{"type": "keepalive", "n": ' + "9" * 400 + "}"],
                         ids=["nan", "-inf", "1e999", "5000-digit-int", "400-digit-int-later"])
def test_odd_numbers_are_bad_messages_and_free_everything(make_server, bad):
    """Non-finite numbers (Python's json reads NaN) used to silence the stream; a 5000-digit integer
    ended in `internal`.  Both are the client's error: `bad_message`, close 1008."""
    srv = make_server(max_connections=2)

    async def client():
        async with connect(srv.url) as ws:
            if "keepalive" in bad:
                await ws.send(json.dumps({"type": "start"}))
                assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(bad)
            msgs = []
            try:
                async for m in ws:
                    msgs.append(json.loads(m))
            except ConnectionClosed:
                pass
            return msgs, ws.close_code

    msgs, code = run(client())
    assert [m["code"] for m in msgs if m["type"] == "error"] == ["bad_message"] and code == 1008
    srv.wait_idle()


def test_errors_do_not_echo_what_the_client_sent(make_server):
    srv = make_server()
    start = {"type": "start", **{f"key_{i:05d}": i for i in range(10_000)}}

    async def client():
        async with connect(srv.url, max_size=None) as ws:
            await ws.send(json.dumps(start))
            reply = await ws.recv()
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return reply, ws.close_code

    reply, code = run(client())
    error = json.loads(reply)
    assert error["code"] == "bad_message" and code == 1008
    assert len(reply) < 500 and "key_00000" in error["message"] and "9995 more" in error["message"]
    srv.wait_idle()


def test_a_result_that_cannot_be_sent_ends_the_stream_visibly(make_server, monkeypatch, caplog):
    """A message the server cannot serialize must not kill the writer silently: the stream ends
    with `internal` (1011), it is logged, and the slot and the connection are returned."""
    srv = make_server()
    result = AsrSession._result
    monkeypatch.setattr(AsrSession, "_result", lambda self, *a, **kw: {**result(self, *a, **kw), "x": float("nan")})

    async def client():
        async with connect(srv.url) as ws:
            await ws.send(json.dumps({"type": "start", "endpointing": False}))
            await ws.recv()
            await ws.send(speech(1.0))
            await ws.send(json.dumps({"type": "stop"}))
            msgs = []
            try:
                async for m in ws:
                    msgs.append(json.loads(m))
            except ConnectionClosed:
                pass
            return msgs, ws.close_code

    msgs, code = run(client())
    assert msgs[-1]["type"] == "error" and msgs[-1]["code"] == "internal" and code == 1011
    assert "could not send a message" in caplog.text
    srv.wait_idle()


def test_a_flood_is_bounded_and_a_real_time_stream_keeps_its_latency(make_server):
    """One client sends audio as fast as it can: the server takes in no more than its bound ahead
    of what it has encoded (TCP pushes back), and a real-time stream beside it keeps getting its
    results within a chunk."""
    srv = make_server(max_buffered_seconds=2.0)
    peaks = {"flood": 0.0, "live": 0.0}
    kinds: dict[str, str] = {}
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            for sid, (session, _) in list(srv.server._sessions.items()):
                kind = kinds.get(sid)
                if kind:
                    peaks[kind] = max(peaks[kind], session.backlog_seconds)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    live_done = asyncio.Event()
    flood_audio = speech(4.0, seed=7)

    async def flood():
        async with connect(srv.url) as ws:
            await ws.send(json.dumps({"type": "start", "endpointing": False, "lookahead_ms": 80,
                                      "interim_results": False}))
            kinds[json.loads(await ws.recv())["stream_id"]] = "flood"
            sent = 0.0
            while not live_done.is_set():
                for i in range(0, len(flood_audio), 6400):  # 0.2 s frames, no pacing
                    await ws.send(flood_audio[i:i + 6400])
                    sent += 0.2
            # Reset rather than close: what the kernel still buffers is discarded, not transcribed.
            ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                             struct.pack("ii", 1, 0))
            ws.transport.abort()
            return sent

    async def live():
        await asyncio.sleep(0.5)  # the flood is in full swing
        audio = speech(4.0, seed=8)
        async with connect(srv.url) as ws:
            await ws.send(json.dumps({"type": "start", "endpointing": False, "lookahead_ms": 480}))
            kinds[json.loads(await ws.recv())["stream_id"]] = "live"
            sent_at = []
            results = []

            async def read():
                async for m in ws:
                    results.append((time.monotonic(), json.loads(m)))

            reader = asyncio.create_task(read())
            t0 = time.monotonic()
            for k, i in enumerate(range(0, len(audio), 640)):  # 20 ms frames at real-time pace
                await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.02 - time.monotonic()))
                await ws.send(audio[i:i + 640])
                sent_at.append(time.monotonic())
            await ws.send(json.dumps({"type": "stop"}))
            await reader
            live_done.set()
            lags = [t - sent_at[min(len(sent_at) - 1, int(round(m["end"] / 0.02)) - 1)]
                    for t, m in results if m["type"] == "partial" and m["end"] > 0.2]
            return lags, ws.close_code

    async def both():
        return await asyncio.gather(flood(), live())

    sent, (lags, code) = run(both())
    sampling.set()
    sampler.join()
    limit = 2.0  # the configured bound (above two chunks plus 0.25 s, so it is the one in force)
    print(f"flood sent {sent:.1f} s; peak backlog {peaks}; live result lag max {max(lags):.3f} s")
    assert code == 1000 and lags
    assert sent > 2 * limit  # the flooder did try to send far ahead
    assert peaks["flood"] <= limit + 0.2 + 0.05, peaks  # the bound plus one 200 ms frame
    assert peaks["live"] <= 2 * 0.56 + 0.1, peaks       # never more than two 560 ms chunks behind
    assert max(lags) < 0.56, lags                        # every result within its chunk (it was 3.6 s)
    srv.wait_idle()


def test_sigterm_flushes_finals_closes_1001_and_exits_0(model_path):
    """What containers and process managers send: stop accepting, finish open streams, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "chorus.cli", "serve", "--model", str(model_path), "--port", "0",
                             "--beam", "1", "--shutdown-grace", "10"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            found = re.search(r"ws://127\.0\.0\.1:(\d+)/asr", line)
            if found and "serving" in line:
                port = int(found.group(1))
                break
        assert port, "the server did not say where it listens"
        url = f"ws://127.0.0.1:{port}/asr"

        async def client():
            async with connect(url) as ws:
                await ws.send(json.dumps({"type": "start", "endpointing": False, "lookahead_ms": 480}))
                await ws.recv()
                await ws.send(speech(1.5, seed=2))
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                msgs = []
                try:
                    async for m in ws:
                        msgs.append(json.loads(m))
                except ConnectionClosed:
                    pass
                with pytest.raises((OSError, InvalidStatus)):  # no new connections
                    async with connect(url, open_timeout=2):
                        pass
                return msgs, ws.close_code

        msgs, code = run(client())
        finals = [m for m in msgs if m["type"] == "final"]
        assert code == 1001 and len(finals) == 1 and finals[0]["reason"] == "shutdown"
        assert finals[0]["end"] == pytest.approx(1.5, abs=0.09)  # every sample sent was transcribed
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_shutdown_keeps_its_grace_with_a_fast_sender(make_server):
    """Audio a fast sender left queued in the socket is not read once the server stops: the stream
    gets its final for what the server had taken in, and the shutdown ends within its grace."""
    srv = make_server(max_buffered_seconds=2.0)
    audio = speech(4.0, seed=11)
    result = {}

    async def flooder():
        async with connect(srv.url) as ws:
            await ws.send(json.dumps({"type": "start", "endpointing": False, "interim_results": False}))
            await ws.recv()
            sent = 0.0

            async def send_forever():
                nonlocal sent
                while True:
                    for i in range(0, len(audio), 6400):
                        await ws.send(audio[i:i + 6400])
                        sent += 0.2

            sender = asyncio.create_task(send_forever())
            await asyncio.sleep(1.0)  # the socket buffers fill up behind the server's bound
            t0 = time.monotonic()
            shutdown = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(srv.server.shutdown(3.0), srv.loop))
            msgs = []
            try:
                async for m in ws:
                    msgs.append(json.loads(m))
            except ConnectionClosed:
                pass
            sender.cancel()
            await shutdown
            result.update(msgs=msgs, code=ws.close_code, seconds=time.monotonic() - t0, sent=sent)

    run(flooder())
    finals = [m for m in result["msgs"] if m["type"] == "final"]
    assert result["code"] == 1001 and [f["reason"] for f in finals] == ["shutdown"]
    assert result["seconds"] < 3.0 + 1.0, result["seconds"]
    assert finals[0]["end"] < result["sent"] - 2.0  # what was queued in the kernel was not transcribed
    srv.wait_idle()
