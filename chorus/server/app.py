"""`chorus serve`: the WebSocket speech server (websockets asyncio API).

Routes on one port: `GET /asr` upgrades to the streaming protocol (docs/protocol.md); `GET /tts` to the
speech-synthesis protocol (`chorus.tts.v1`, `tts_session.TtsSession`); a WebSocket
upgrade on `/` or `/funasr` speaks FunASR's protocol (online mode), translated onto the same
sessions by `funasr_protocol.FunAsrAdapter`; `/healthz`, `/metrics` (Prometheus) and `/` (the
browser demo) are plain HTTP.  The event loop only moves bytes and messages; the `Scheduler`
thread runs the models.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import http
import itertools
import json
import logging
import mimetypes
import secrets
import signal
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from ..cache import PoolExhausted
from .asr_session import AsrSession
from .funasr_protocol import SUBPROTOCOL, FunAsrAdapter, is_funasr_path
from .metrics import ServerMetrics
from .protocol import PROTOCOL, ProtocolError, dumps, parse_start, parse_text
from .registry import ModelRegistry
from .tts_protocol import PROTOCOL as TTS_PROTOCOL, parse_tts_start, parse_tts_text, parse_tts_tokens
from .tts_session import TtsSession
from ..stream.scheduler import Scheduler

log = logging.getLogger("chorus.server")
WEB_ROOT = Path(__file__).resolve().parent / "web"  # the browser demo; demos/web links here


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    max_frame_bytes: int = 1 << 20          # larger binary/text frames close the stream with 1009
    max_connections: int = 256
    max_session_seconds: float = 4 * 3600.0  # wall-clock length of one connection
    idle_timeout: float = 30.0               # seconds with neither audio nor keepalive
    max_buffered_seconds: float = 10.0       # unencoded audio per stream before we stop reading (at least
                                             # two chunks, so that a stream can always make its next step)
    max_pending_messages: int = 512          # results a client has not read before it is dropped
    auth_tokens: tuple[str, ...] = ()        # bearer tokens; empty = no auth
    allowed_origins: tuple[str, ...] = ()    # browser Origin allow-list; empty = any
    batch_wait_ms: float = 10.0
    max_batch: int = 64
    tts_max_batch: int = 1                   # TTS streams per synthesis step: Piper on a CPU is faster one by one
    web_root: Path | None = field(default_factory=lambda: WEB_ROOT if WEB_ROOT.exists() else None)
    tls_cert: str | None = None              # serve wss:// and https:// with this certificate chain
    tls_key: str | None = None
    shutdown_grace: float = 10.0             # seconds open streams get to flush their finals on SIGTERM
    # The kernel's receive buffer per connection.  Linux autotunes it up to tens of MB on loopback, which is
    # audio the server reads (and transcribes) even after the client has gone; 256 KiB holds 8 s of 16 kHz
    # pcm_s16le and still carries a stream at full speed.
    socket_receive_buffer: int = 256 * 1024
    max_text_chars: int = 4096               # characters in one /tts `text` message (text_too_long)
    max_pending_text_chars: int = 65536      # text a /tts stream may hold not yet spoken (too_much_text)
    tts_max_wait_ms: int = 1000              # default wait for the rest of an unfinished sentence


class AsrServer:
    def __init__(self, registry: ModelRegistry, config: ServerConfig | None = None,
                 voices: ModelRegistry | None = None):
        self.registry = registry
        self.voices = voices if voices is not None else ModelRegistry()  # TTS voices, by name (/tts)
        self.config = config or ServerConfig()
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(
            batch_wait_ms=self.config.batch_wait_ms, max_batch=self.config.max_batch,
            on_step=lambda model, size, seconds: (self.metrics.batch_sizes.labels(model).observe(size),
                                                  self.metrics.step_seconds.labels(model).observe(seconds)),
            on_audio=lambda session, seconds: self.metrics.audio_seconds.labels(session.entry.name).inc(seconds))
        # Synthesis runs on a thread of its own (the same scheduler code), so that a long TTS step
        # never holds the ASR streams' steps; onnxruntime and torch release the GIL while they compute.
        self.tts_scheduler = Scheduler(
            max_batch=self.config.tts_max_batch,
            on_step=lambda model, size, seconds: (self.metrics.batch_sizes.labels(model).observe(size),
                                                  self.metrics.step_seconds.labels(model).observe(seconds)))
        self._tts: dict[str, tuple[TtsSession, "_Outbox"]] = {}
        self._ids = itertools.count(1)
        self.connections = 0
        self._sessions: dict[str, tuple[AsrSession, "_Outbox"]] = {}
        self._handlers: dict[asyncio.Task, ServerConnection] = {}  # one per open connection
        self._receivers: set[_Receiver] = set()
        self._shutdown_deadline = 0.0  # loop time by which a shutdown closes every connection
        self._going_away: asyncio.Event | None = None  # set on shutdown: every handler finishes its stream
        self.loop: asyncio.AbstractEventLoop | None = None
        self.metrics.add_live_gauges(self._live_gauges)
        self._server = None

    def _live_gauges(self):
        entries = self.registry.entries()
        sessions = [s for s, _ in list(self._sessions.values())]
        backlog = {}
        for e in entries:
            mine = [s.backlog_seconds for s in sessions if s.entry is e]
            backlog[(e.name, "sum")] = sum(mine)
            backlog[(e.name, "max")] = max(mine, default=0.0)
        return [
            ("chorus_open_streams", "Streams open now", ("model",), {e.name: e.engine.pool.used for e in entries}),
            ("chorus_slots", "State-pool slots per model", ("model", "state"),
             {**{(e.name, "used"): e.engine.pool.used for e in entries},
              **{(e.name, "free"): e.engine.pool.free for e in entries}}),
            ("chorus_connections", "Open WebSocket connections", (), {(): self.connections}),
            ("chorus_backlog_seconds", "Audio received but not yet encoded, over a model's streams (sum, max)",
             ("model", "stat"), backlog),
            ("chorus_tts_open_streams", "TTS streams open now", ("voice",),
             {e.name: e.engine.pool.used for e in self.voices.entries()}),
            ("chorus_tts_slots", "TTS stream slots per voice", ("voice", "state"),
             {**{(e.name, "used"): e.engine.pool.used for e in self.voices.entries()},
              **{(e.name, "free"): e.engine.pool.free for e in self.voices.entries()}}),
        ]

    # -- lifetime ----------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._going_away = asyncio.Event()
        self.scheduler.start()
        self.tts_scheduler.start(name="chorus-tts")
        cfg = self.config
        ssl_context = None
        if cfg.tls_cert:  # browsers allow the microphone only on https:// (or localhost)
            ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        self._server = await serve(
            self._handle, cfg.host, cfg.port, ssl=ssl_context, process_request=self._process_request,
            compression=None, select_subprotocol=self._select_subprotocol,
            max_size=2 * cfg.max_frame_bytes, max_queue=8,  # past 2x the library itself closes with 1009
            origins=[None, *cfg.allowed_origins] if cfg.allowed_origins else None)
        self.port = self._server.sockets[0].getsockname()[1]
        for sock in self._server.sockets:  # accepted connections inherit the listening socket's size
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.socket_receive_buffer)

    async def stop(self) -> None:
        """Close at once: every connection gets close 1001 without its final (see `shutdown`)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.scheduler.stop()
        self.tts_scheduler.stop()

    async def shutdown(self, grace: float | None = None) -> None:
        """Graceful stop (SIGTERM): accept nothing new, let every open stream flush its audio and
        send its final (`reason: "shutdown"`), close each with 1001, then stop.  Streams still
        busy after `grace` seconds are closed without their final."""
        grace = self.config.shutdown_grace if grace is None else grace
        if self._server is None:
            return
        self._shutdown_deadline = self.loop.time() + grace
        self._server.close(close_connections=False)  # stop listening; open connections go on
        self._going_away.set()
        for receiver in list(self._receivers):
            receiver.leave()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=grace)
        if self._handlers:  # past the grace: close what is left without its final
            log.warning("closing %d stream(s) still busy after %g s", len(self._handlers), grace)
            closing = [asyncio.ensure_future(ws.close(1001, "server shutting down")) for ws in self._handlers.values()]
            await asyncio.wait(closing, timeout=2.0)
            for task in list(self._handlers):
                task.cancel()
            await asyncio.wait(list(self._handlers), timeout=2.0)
        await self.stop()

    async def serve_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        await self.start()
        s = "s" if self.config.tls_cert else ""
        log.info("chorus serving %s on ws%s://%s:%d/asr (FunASR's protocol: ws%s://%s:%d/; browser demo: "
                 "http%s://%s:%d/)", self.registry.names(), s, self.config.host, self.port, s, self.config.host,
                 self.port, s, self.config.host, self.port)
        if self.voices.names():
            log.info("voices %s on ws%s://%s:%d/tts", self.voices.names(), s, self.config.host, self.port)
        signalled = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, signalled.set)
        try:
            await signalled.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.remove_signal_handler(sig)
        log.info("shutting down: finishing %d open stream(s), at most %g s", len(self._handlers),
                 self.config.shutdown_grace)
        await self.shutdown()

    # -- plain HTTP --------------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urllib.parse.urlsplit(request.path)
        path = url.path
        if path == "/healthz":
            return _response(200, "ok\n", "text/plain")
        if path == "/metrics":
            return _response(200, self.metrics.render(), self.metrics.content_type)
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if path in ("/asr", "/tts") or (upgrade and is_funasr_path(path)):  # FunASR's clients upgrade on "/"
            if not self._authorized(request, url):
                return _response(401, "missing or wrong bearer token\n", "text/plain")
            if self._going_away is not None and self._going_away.is_set():
                return _response(503, "the server is shutting down\n", "text/plain")
            if self.connections >= self.config.max_connections:
                return _response(503, "too many connections, try again later\n", "text/plain")
            return None  # continue with the WebSocket handshake
        if path == "/models":
            models = [dict(e.describe(), default=e.name == self.registry.default) for e in self.registry.entries()]
            models += [dict(e.describe(), kind="tts", default=e.name == self.voices.default)
                       for e in self.voices.entries()]
            return _response(200, json.dumps(models), "application/json")
        return self._static(path)

    def _authorized(self, request: Request, url) -> bool:
        if not self.config.auth_tokens:
            return True
        given = None
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        else:  # browsers cannot set headers on a WebSocket: accept ?token=
            given = urllib.parse.parse_qs(url.query).get("token", [None])[0]
        return given is not None and any(hmac.compare_digest(given, t) for t in self.config.auth_tokens)

    def _static(self, path: str) -> Response:
        root = self.config.web_root
        if root is None:
            return _response(404, "no web demo here\n", "text/plain")
        name = "index.html" if path in ("", "/") else path.lstrip("/")
        target = (root / name).resolve()
        if root.resolve() not in target.parents or not target.is_file():
            return _response(404, "not found\n", "text/plain")
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return _response(200, target.read_bytes(), ctype)

    def _select_subprotocol(self, connection: ServerConnection, offered) -> str | None:
        """FunASR's clients offer `binary`: accept it on FunASR's paths; chorus' protocol has none."""
        if SUBPROTOCOL in offered and is_funasr_path(urllib.parse.urlsplit(connection.request.path).path):
            return SUBPROTOCOL
        return None

    def _receiver(self, ws: ServerConnection) -> "_Receiver":
        receiver = _Receiver(ws, self.loop, self._going_away, self.config.idle_timeout,
                             self.config.max_session_seconds)
        self._receivers.add(receiver)
        return receiver

    def _adapter_for(self, ws: ServerConnection) -> FunAsrAdapter | None:
        """The translation for FunASR's protocol, or None for chorus' own (`/asr`)."""
        url = urllib.parse.urlsplit(ws.request.path)
        if not is_funasr_path(url.path):
            return None
        model = urllib.parse.parse_qs(url.query).get("model", [None])[0]

        def describe(name):
            entry = self.registry.get(name)
            return None if entry is None else entry.describe()
        return FunAsrAdapter(describe, model)

    # -- connections: accounting shared by /asr, FunASR's protocol and /tts ----------------
    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        self._handlers[asyncio.current_task()] = ws
        try:
            if urllib.parse.urlsplit(ws.request.path).path == "/tts":
                await self._handle_tts(ws)
            else:
                await self._handle_asr(ws)
        finally:  # every way out of a connection comes through here: the count is returned
            self._handlers.pop(asyncio.current_task(), None)
            self.connections -= 1

    # -- the streaming protocol (both: chorus' own, and FunASR's through its adapter) ---------
    async def _handle_asr(self, ws: ServerConnection) -> None:
        session: AsrSession | None = None
        adapter = self._adapter_for(ws)
        outbox = _Outbox(ws, self.config.max_pending_messages, on_broken=lambda: self.metrics.errors.labels(
            "internal").inc(), translate=adapter.translate if adapter else None)
        writer = asyncio.create_task(outbox.run())
        receiver = self._receiver(ws)
        started = time.monotonic()
        try:
            while True:
                remaining = self.config.max_session_seconds - (time.monotonic() - started)
                if remaining <= 0:
                    raise ProtocolError("session_limit", f"session longer than {self.config.max_session_seconds:g} s")
                message = await receiver.next()
                if message is _TIMED_OUT:
                    if time.monotonic() - started >= self.config.max_session_seconds:
                        continue
                    raise ProtocolError("idle_timeout", f"no audio or keepalive for {self.config.idle_timeout:g} s")
                if message is _LEAVING:  # shutdown: flush what was sent, send the final, close 1001
                    if session is not None:
                        left = max(0.1, self._shutdown_deadline - self.loop.time())
                        try:
                            await self._finish(ws, outbox, await self._flush(session, "shutdown"),
                                               1001, "server shutting down", left)
                        except ProtocolError:  # past the grace: closed without its final
                            await _close_discarding(ws, 1001, "server shutting down")
                    else:
                        await ws.close(1001, "server shutting down")
                    return
                if outbox.failed:
                    raise ProtocolError("too_slow", "the client is not reading results")
                if len(message) > self.config.max_frame_bytes:
                    raise ProtocolError("frame_too_large", f"frame of {len(message)} bytes exceeds the limit of "
                                                           f"{self.config.max_frame_bytes} bytes")
                if isinstance(message, bytes):
                    if session is None:
                        raise ProtocolError("not_started", "audio before start")
                    if adapter is not None:
                        message = adapter.audio(message)
                    if len(message):
                        session.push_audio(message)
                        self.scheduler.notify()
                        await self._hold_back(session, outbox)
                    continue
                for msg in adapter.incoming(message) if adapter is not None else [parse_text(message)]:
                    kind = msg["type"]
                    if kind == "start":
                        if session is not None:
                            raise ProtocolError("already_started", "the stream is already started")
                        session = await self._start(msg, outbox)
                    elif kind == "keepalive":
                        continue
                    elif kind in ("finalize", "stop"):
                        if session is None:
                            raise ProtocolError("not_started", f"{kind} before start")
                        done = await self._flush(session, kind)
                        if kind == "stop":
                            await self._finish(ws, outbox, done, 1000, "stopped", 60.0)
                            return
                    else:
                        raise ProtocolError("unknown_type", f"unknown message type {kind!r}")
        except ProtocolError as exc:
            await self._close_with(ws, outbox, exc)
        except ConnectionClosed:
            pass
        except Exception as exc:  # keep the server up; tell the client
            log.exception("connection handler failed")
            await self._close_with(ws, outbox, ProtocolError("internal", f"server error: {type(exc).__name__}"))
        finally:
            # Every way out of a connection comes through here: the slot and the count are returned.
            if session is not None:
                self._sessions.pop(session.id, None)
                self.scheduler.submit(lambda s=session: self._drop(s))
            writer.cancel()
            self._receivers.discard(receiver)
            receiver.close()

    async def _hold_back(self, session: AsrSession, outbox: "_Outbox") -> None:
        """Backpressure: while the stream holds more unencoded audio than its bound, stop reading
        from the socket (TCP pushes back on the client) until the model catches up."""
        while (session.backlog_seconds > session.backlog_limit
               and not (outbox.failed or outbox.closed or session.closed)):
            await asyncio.sleep(0.01)

    async def _finish(self, ws: ServerConnection, outbox: "_Outbox", flushed: asyncio.Future, code: int,
                      reason: str, timeout: float) -> None:
        """End a stream whose flush was requested: wait for its final (or for the client to go),
        let the outbox send it, and close.  Nothing here waits without a bound."""
        gone = asyncio.ensure_future(ws.wait_closed())
        try:
            await asyncio.wait([flushed, gone], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not flushed.done() and ws.state is not State.CLOSED:
            raise ProtocolError("internal", f"the final result took longer than {timeout:g} s")
        try:
            await asyncio.wait_for(outbox.drain(), timeout=10.0)
        except asyncio.TimeoutError:
            pass
        await _close_discarding(ws, code, reason)

    async def _close_with(self, ws: ServerConnection, outbox: "_Outbox", error: ProtocolError) -> None:
        """Send the error and close, reading (and dropping) what the client already sent so that
        its close frame is seen instead of waiting out the close timeout."""
        self.metrics.errors.labels(error.code).inc()
        closing = asyncio.create_task(outbox.fail_with(error))
        try:
            async for _ in ws:
                pass
        except ConnectionClosed:
            pass
        await closing

    async def _open_on(self, scheduler: Scheduler, session, busy: str) -> None:
        """Open a session's stream (its slot) on the scheduler's thread and make it a job there; a full
        pool is `overloaded`, a refused option the session's own ProtocolError."""
        opened = self.loop.create_future()

        def open_on_thread():
            try:
                session.open()
            except Exception as exc:  # noqa: BLE001 - reported to the client
                self.loop.call_soon_threadsafe(_settle, opened, exc)
                return
            scheduler.add(session)
            self.loop.call_soon_threadsafe(_settle, opened, None)

        scheduler.submit(open_on_thread)
        error = await opened
        if isinstance(error, PoolExhausted):
            raise ProtocolError("overloaded", busy)
        if isinstance(error, ProtocolError):
            raise error
        if error is not None:
            raise ProtocolError("internal", f"could not open the stream: {type(error).__name__}")

    async def _start(self, msg: dict, outbox: "_Outbox") -> AsrSession:
        req = parse_start(msg)
        entry = self.registry.get(req.model)
        if entry is None:
            raise ProtocolError("unknown_model", f"unknown model {req.model!r}; available: {self.registry.names()}")
        stream_id = f"{next(self._ids):x}-{secrets.token_hex(4)}"
        session = AsrSession(stream_id, req, entry, outbox.post_threadsafe(self.loop), self._on_session_failure,
                             max_backlog_seconds=self.config.max_buffered_seconds)
        await self._open_on(self.scheduler, session, f"all {entry.engine.pool.capacity} streams of model "
                                                      f"{entry.name!r} are busy; try again later")
        self._sessions[stream_id] = (session, outbox)
        self.metrics.streams.labels(entry.name).inc()
        outbox.send({"type": "ready", "protocol": PROTOCOL, "stream_id": stream_id, "model": entry.name,
                     "family": entry.model.family, "sample_rate": req.sample_rate, "encoding": req.encoding,
                     **session.settings, "interim_results": req.interim_results, "word_times": req.word_times,
                     "endpointing": req.endpointing.as_json()})
        return session

    async def _flush(self, session: AsrSession, kind: str) -> asyncio.Future:
        done = self.loop.create_future()
        session.push_flush(kind, lambda k: self.loop.call_soon_threadsafe(_settle, done, k))
        self.scheduler.notify()
        return done

    def _drop(self, session: AsrSession | TtsSession, scheduler: Scheduler | None = None) -> None:
        """On the inference thread: the connection is gone; return the slot."""
        session.close()
        (scheduler or self.scheduler).discard(session)

    def _on_session_failure(self, session: AsrSession, error: ProtocolError) -> None:
        """On the inference thread: a stream failed (bad audio, model error)."""
        entry = self._sessions.get(session.id)
        if entry is None or self.loop is None:
            return
        _, outbox = entry
        self.metrics.errors.labels(error.code).inc()
        asyncio.run_coroutine_threadsafe(outbox.fail_with(error), self.loop)


    # -- /tts: the speech-synthesis protocol (chorus.tts.v1) -----------------------------------
    async def _handle_tts(self, ws: ServerConnection) -> None:
        """Text in (JSON messages, pieces at a time), audio out (an `audio` header, then its binary frame).
        The same limits, outbox, accounting and shutdown as `/asr`; synthesis runs on the inference thread."""
        session: TtsSession | None = None
        outbox = _Outbox(ws, self.config.max_pending_messages,
                         on_broken=lambda: self.metrics.errors.labels("internal").inc())
        writer = asyncio.create_task(outbox.run())
        receiver = self._receiver(ws)
        started = time.monotonic()
        cfg = self.config
        try:
            while True:
                remaining = cfg.max_session_seconds - (time.monotonic() - started)
                if remaining <= 0:
                    raise ProtocolError("session_limit", f"session longer than {cfg.max_session_seconds:g} s")
                message = await receiver.next()
                if message is _TIMED_OUT:
                    if time.monotonic() - started >= cfg.max_session_seconds:
                        continue
                    if session is not None and (session.busy or outbox.items):  # speaking: not idle
                        continue
                    raise ProtocolError("idle_timeout", f"no text or keepalive for {cfg.idle_timeout:g} s")
                if message is _LEAVING:  # shutdown: speak what was sent, `done`, close 1001
                    if session is not None:
                        left = max(0.1, self._shutdown_deadline - self.loop.time())
                        try:
                            await self._finish(ws, outbox, self._tts_stop(session, "shutdown"), 1001,
                                               "server shutting down", left)
                        except ProtocolError:  # past the grace: closed without its `done`
                            await _close_discarding(ws, 1001, "server shutting down")
                    else:
                        await ws.close(1001, "server shutting down")
                    return
                if outbox.failed:
                    raise ProtocolError("too_slow", "the client is not reading audio")
                if len(message) > cfg.max_frame_bytes:
                    raise ProtocolError("frame_too_large", f"frame of {len(message)} bytes exceeds the limit of "
                                                           f"{cfg.max_frame_bytes} bytes")
                if isinstance(message, bytes):
                    raise ProtocolError("bad_message", "/tts takes JSON text messages only, no binary frames")
                msg = parse_text(message)
                kind = msg["type"]
                if kind == "start":
                    if session is not None:
                        raise ProtocolError("already_started", "the stream is already started")
                    session = await self._start_tts(msg, outbox)
                    continue
                if kind == "keepalive":
                    continue
                if kind not in ("text", "tokens", "flush", "cancel", "stop"):
                    raise ProtocolError("unknown_type", f"unknown message type {kind!r}")
                if session is None:
                    raise ProtocolError("not_started", f"{kind} before start")
                if kind == "text":
                    text, flush = parse_tts_text(msg, cfg.max_text_chars)
                    if session.queued_chars + len(text) > cfg.max_pending_text_chars:
                        raise ProtocolError("too_much_text", f"more than {cfg.max_pending_text_chars} characters "
                                                             f"of text waiting to be spoken")
                    session.push_text(text, flush)
                elif kind == "tokens":  # a token-to-wave voice (CosyVoice 2): speech tokens from the user's LLM
                    tokens, flush = parse_tts_tokens(msg, cfg.max_text_chars)
                    if session.queued_chars + len(tokens) > cfg.max_pending_text_chars:
                        raise ProtocolError("too_much_text", f"more than {cfg.max_pending_text_chars} tokens and "
                                                             f"characters waiting to be spoken")
                    session.push_tokens(tokens, flush)
                elif kind == "flush":
                    session.push_flush()
                elif kind == "cancel":
                    outbox.cancel_epoch(session.cancel())
                else:  # stop: speak the rest, `done`, close 1000
                    await self._finish(ws, outbox, self._tts_stop(session, "stop"), 1000, "stopped",
                                       max(1.0, cfg.max_session_seconds - (time.monotonic() - started)))
                    return
                self.tts_scheduler.notify()
        except ProtocolError as exc:
            await self._close_with(ws, outbox, exc)
        except ConnectionClosed:
            pass
        except Exception as exc:  # keep the server up; tell the client
            log.exception("connection handler failed")
            await self._close_with(ws, outbox, ProtocolError("internal", f"server error: {type(exc).__name__}"))
        finally:
            if session is not None:
                self._tts.pop(session.id, None)
                self.tts_scheduler.submit(lambda s=session: self._drop(s, self.tts_scheduler))
            writer.cancel()
            self._receivers.discard(receiver)
            receiver.close()

    def _tts_stop(self, session: TtsSession, reason: str) -> asyncio.Future:
        done = self.loop.create_future()
        session.push_stop(reason, lambda r: self.loop.call_soon_threadsafe(_settle, done, r))
        self.tts_scheduler.notify()
        return done

    async def _start_tts(self, msg: dict, outbox: "_Outbox") -> TtsSession:
        req = parse_tts_start(msg, self.config.tts_max_wait_ms)
        entry = self.voices.get(req.voice)
        if entry is None:
            raise ProtocolError("unknown_voice", f"unknown voice {req.voice!r}; available: {self.voices.names()}")
        stream_id = f"{next(self._ids):x}-{secrets.token_hex(4)}"
        session = TtsSession(stream_id, req, entry, outbox.post_threadsafe(self.loop), self._on_tts_failure,
                             unsent_bytes=lambda: outbox.pending_bytes,
                             max_unsent_seconds=self.config.max_buffered_seconds)
        await self._open_on(self.tts_scheduler, session, f"all {entry.engine.pool.capacity} streams of voice "
                                                          f"{entry.name!r} are busy; try again later")
        self._tts[stream_id] = (session, outbox)
        self.metrics.streams.labels(entry.name).inc()
        outbox.send({"type": "ready", "protocol": TTS_PROTOCOL, "stream_id": stream_id, "voice": entry.name,
                     "family": entry.model.family, "sample_rate": session.sample_rate, "encoding": req.encoding,
                     "voice_sample_rate": entry.model.sample_rate, **session.settings,
                     "max_wait_ms": req.max_wait_ms, "max_text_chars": self.config.max_text_chars})
        return session

    def _on_tts_failure(self, session: TtsSession, error: ProtocolError) -> None:
        """On the inference thread: a TTS stream failed (unsupported text, synthesis error)."""
        entry = self._tts.get(session.id)
        if entry is None or self.loop is None:
            return
        self.metrics.errors.labels(error.code).inc()
        asyncio.run_coroutine_threadsafe(entry[1].fail_with(error), self.loop)


class _Outbox:
    """Messages to one client, sent in order by one task.

    A partial result replaces a partial still waiting to be sent, so a slow reader gets the
    latest text rather than a backlog; a reader too slow even for that is dropped.  Once the
    writer has ended (the connection closed, or a message could not be sent), nothing waits on
    it: `send` drops messages and `drain` returns at once.  `translate` (FunASR's adapter) turns each
    message into the client's protocol as it is sent, so merged partials translate as one.
    """

    def __init__(self, ws: ServerConnection, limit: int, on_broken: Callable[[], None] = lambda: None,
                 translate: Callable[[dict], list[dict]] | None = None):
        self.ws = ws
        self.epoch = 0           # messages of an older `_epoch` (a TTS cancel) are dropped unsent
        self.pending_bytes = 0   # binary payloads queued and not yet sent
        self.limit = limit
        self.translate = translate or (lambda msg: [msg])
        self.items: collections.deque[dict] = collections.deque()
        self.failed = False      # the client does not read: the handler ends the stream (too_slow)
        self.closed = False      # the writer has ended
        self._on_broken = on_broken
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False

    def send(self, msg: dict) -> None:
        if self.closed or msg.get("_epoch", self.epoch) < self.epoch:
            return
        if msg["type"] == "partial" and self.items and self.items[-1]["type"] == "partial":
            self.items[-1] = msg
        elif len(self.items) >= self.limit:
            self.failed = True
            return
        else:
            self.items.append(msg)
            self.pending_bytes += len(msg.get("_binary", b""))
        self._idle.clear()
        self._wake.set()

    def post_threadsafe(self, loop: asyncio.AbstractEventLoop):
        return lambda msg: loop.call_soon_threadsafe(self.send, msg)

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self.items:
                    msg = self.items.popleft()
                    binary = msg.get("_binary")
                    if binary is not None or "_epoch" in msg:  # a TTS message: private keys stay here
                        self.pending_bytes -= len(binary or b"")
                        await self.ws.send(dumps({k: v for k, v in msg.items() if not k.startswith("_")}))
                        if binary is not None:
                            await self.ws.send(binary)  # the audio right after its header
                        continue
                    for out in self.translate(msg):
                        await self.ws.send(dumps(out))
                self._idle.set()
        except ConnectionClosed:
            pass
        except Exception as exc:  # a message that cannot be sent ends the stream, visibly
            log.exception("could not send a message to the client; closing the stream")
            self._on_broken()
            error = ProtocolError("internal", f"server error: could not send a result ({type(exc).__name__})")
            try:
                for out in self.translate(error.as_message()):
                    await self.ws.send(dumps(out))
            except ConnectionClosed:
                pass
            await self.ws.close(error.close_code, error.message[:100])  # the handler's recv ends with it
        finally:
            self.closed = True
            self.items.clear()
            self._idle.set()

    def cancel_epoch(self, epoch: int) -> None:
        """A TTS cancel: drop every queued message of an older epoch (audio not yet sent) at once."""
        self.epoch = epoch
        kept = collections.deque(m for m in self.items if m.get("_epoch", epoch) >= epoch)
        self.pending_bytes = sum(len(m.get("_binary", b"")) for m in kept)
        self.items = kept

    async def drain(self) -> None:
        await self._idle.wait()

    async def fail_with(self, error: ProtocolError) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            await asyncio.wait_for(self.drain(), timeout=2.0)
            if not self.closed:
                for out in self.translate(error.as_message()):
                    await self.ws.send(dumps(out))
        except (ConnectionClosed, asyncio.TimeoutError):
            pass
        # A close reason is at most 123 bytes of UTF-8.
        await self.ws.close(error.close_code, error.message.encode()[:120].decode(errors="ignore"))


_TIMED_OUT, _LEAVING = object(), object()


async def _close_discarding(ws: ServerConnection, code: int, reason: str) -> None:
    """Close, reading and dropping what the client still sends, so that its close frame (which may
    sit behind audio queued in the socket) is seen at once instead of after the close timeout."""
    closing = asyncio.ensure_future(ws.close(code, reason))
    try:
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass
    await closing


class _Receiver:
    """A connection's next frame, with its idle timeout, its session limit and the server's shutdown,
    at the cost of a plain `recv` per frame: one timer per connection interrupts a waiting `recv`
    (websockets' recv may be cancelled without losing data) instead of a task and a wait per frame,
    which doubled the event loop's cost of a 20 ms audio frame (measured: 53-59 against 27-28 us)."""

    def __init__(self, ws: ServerConnection, loop: asyncio.AbstractEventLoop, going_away: asyncio.Event,
                 idle: float, session: float):
        self.ws, self.loop, self.going_away, self.idle = ws, loop, going_away, idle
        self.task = asyncio.current_task()
        self.deadline = loop.time() + session
        self.last = loop.time()
        self.receiving = False
        self.interrupt = None  # _TIMED_OUT or _LEAVING while a recv is being interrupted
        self._timer = loop.call_at(min(self.last + idle, self.deadline), self._check)

    def _check(self) -> None:
        now = self.loop.time()
        due = min(self.last + self.idle, self.deadline)
        if now >= due and self.receiving and self.interrupt is None:
            self.interrupt = _TIMED_OUT
            self.task.cancel()
            self.last = now  # a handler that goes on (a TTS stream still speaking) gets a fresh period
            due = min(now + self.idle, self.deadline)
        elif now >= due:  # busy with a frame or held back, not idle
            due = now + self.idle
        self._timer = self.loop.call_at(max(due, now + 0.01), self._check)

    def leave(self) -> None:
        """The server is shutting down: a waiting recv returns `_LEAVING`."""
        if self.receiving and self.interrupt is None:
            self.interrupt = _LEAVING
            self.task.cancel()

    async def next(self):
        """The next frame, `_TIMED_OUT` (idle or past the session limit) or `_LEAVING`."""
        if self.going_away.is_set():  # frames still queued (a fast sender's) are not read once the server stops
            return _LEAVING
        self.receiving = True
        try:
            message = await self.ws.recv()  # raises ConnectionClosed when the client is gone
        except asyncio.CancelledError:
            if self.interrupt is None:
                raise
            if hasattr(self.task, "uncancel"):
                self.task.uncancel()
            reason, self.interrupt = self.interrupt, None
            return reason
        finally:
            self.receiving = False
        self.last = self.loop.time()
        return message

    def close(self) -> None:
        self._timer.cancel()


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _response(status: int, body, content_type: str) -> Response:
    data = body.encode() if isinstance(body, str) else body
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(data))),
                       ("Cache-Control", "no-store")])
    return Response(status, http.HTTPStatus(status).phrase, headers, data)
