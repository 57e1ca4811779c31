#!/usr/bin/env python3
"""Abuse on `chorus serve`: flooding clients, abrupt disconnects, SIGTERM; each against a same-run baseline.

    python bench/abuse.py                       # all three parts, ~3-4 min on 2 cores
    python bench/abuse.py --parts flood --seconds 30 --flooders 1,2,4
    python bench/abuse.py --parts disconnect,sigterm --cycles 2000 --json /tmp/abuse.json

The server is a subprocess, `python -m chorus.cli serve --port 0 --device cpu ...` with the bundled default
model and its default decoding (RNNT beam 8 + LM); its port is read from the "chorus serving [...] on
ws://127.0.0.1:PORT/asr" line it logs on stderr.  Everything stays on 127.0.0.1 and every load is bounded
in count and time.

flood       One server for the part.  A real-time client (16 kHz pcm_s16le in 20 ms frames, frame k sent at
            t0 + (k+1) x 20 ms, jfk.flac looped (or the bundled sample), --seconds of audio, lookahead
            --lookahead-ms, interim results, endpointing off, then `stop`) runs alone, then beside 1 and 2
            (--flooders) clients that send a long recording (jfk + the bundled sample, looped) in
            --flood-frame-ms frames as fast as the connection takes them, from a separate process (so the
            real-time client's event loop is not theirs), started --flood-lead seconds before it; then alone
            again.  Figures for the real-time client:
              latency  arrival of a `partial`/`final` minus the send time of the frame holding the result's
                       `end` (as bench/load.py); the `stop` final is left out.  p50, p95, worst, and worst
                       after the first 2 s of audio (the first chunk waits for a whole chunk of audio).
              gap      time between consecutive results (a partial comes only when the text changes).
              slip     how late the client sent its frames (p95): the load generator shares the 2 cores.
            For each flooder, over the real-time client's streaming window: audio sent (completed `send`s)
            and audio transcribed (the advance of its results' `end`), and at the window's end the totals and
            their difference ("held": the server's backlog plus the kernel's socket queues).  For the server:
            peak RSS growth over the RSS just before the scenario (VmRSS from /proc/PID/status every 50 ms), the
            peak of chorus_backlog_seconds{stat="max"} (GET /metrics every 200 ms), the peak audio in the
            kernel's queues of the connections to the server (/proc/net/tcp, every 200 ms: the server sockets'
            receive queues, the clients' send queues), and its CPU in cores (and the machine's).
            The target: the real-time stream keeps every result under its chunk length (560 ms at 480 ms).
disconnect  A second server with --max-connections (8).  --cycles (1000) abrupt disconnects, --concurrency (4) at
            a time, kinds in a seeded shuffle, equally many of each: drop before `start`; right after `start`;
            mid-audio (ready, then 0.1-1.5 s of audio sent in a burst, 0-300 ms pause); after `finalize` (0.5 s
            of audio, finalize, drop before its final); stop-then-drop (0.5 s of audio, `stop`, drop before the
            final).  "Drop" is `ws.transport.abort()`: the TCP connection goes without a close frame.  Counted:
            HTTP 503 (and any other refusal), the server's RSS every 100 cycles, and, once the server is idle,
            chorus_connections, chorus_open_streams and chorus_slots{state="used"} (all must be 0) and how long
            it took to get there.  Then --near-limit-cycles (300) at --max-connections - 1 at a time, where a
            503 is retried after 50 ms (a count that never came down would lock a cycle out after 100 tries),
            and, on the idle server, how long each kind of dropped connection stays counted (5 of each, alone);
            then one ordinary stream (1 s of audio, `stop`) must get its final and close 1000.
sigterm     On the disconnect server (after its cycles): 4 streams mid-audio, 2 at real-time pace and 2 sending
            100 ms frames as fast as the connection takes them (each holding up to --max-buffered-seconds of
            unencoded audio, plus what the kernel queues), then SIGTERM after --sigterm-after seconds.  Per
            stream: audio sent by SIGTERM, the final's reason and `end`, the close code, the time from SIGTERM to
            the final and to the close; a connection attempted 0.2 s after SIGTERM; the time from SIGTERM to the
            process's exit (against --grace, the server's --shutdown-grace) and its exit status.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SR = 16000
FRAME_S = 0.02
FRAME_SAMPLES = int(SR * FRAME_S)
PORT_LINE = re.compile(r"chorus serving .* on wss?://[^\s:]+:(\d+)/asr")


# ------------------------------------------------------------------------------------------
# audio
# ------------------------------------------------------------------------------------------
def _read16k(path: Path) -> np.ndarray:
    from chorus.codecs import read_audio, resample

    x, sr = read_audio(path)
    return resample(x, sr, SR)


def _int16(x: np.ndarray) -> np.ndarray:
    return np.clip(x * 32767.0, -32768, 32767).astype("<i2")


def realtime_track() -> tuple[str, np.ndarray]:
    jfk = DATA / "samples" / "jfk.flac"
    path = jfk if jfk.exists() else REPO / "chorus" / "samples" / "held_out_voice.flac"
    return path.name, _int16(_read16k(path))


def flood_track() -> np.ndarray:
    """A 'long recording': jfk (if present) and the bundled sample with short gaps, looped to >= 120 s."""
    parts = []
    for p in (DATA / "samples" / "jfk.flac", REPO / "chorus" / "samples" / "held_out_voice.flac"):
        if p.exists():
            parts += [_read16k(p), np.zeros(int(0.3 * SR), np.float32)]
    one = np.concatenate(parts)
    return _int16(np.tile(one, int(math.ceil(120 * SR / len(one)))))


# ------------------------------------------------------------------------------------------
# the server subprocess
# ------------------------------------------------------------------------------------------
def http_get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def parse_metrics(text: str) -> dict[tuple, float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\w+)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def gauge(m: dict, name: str, **want: str) -> float:
    return sum(v for (n, labels), v in m.items()
               if n == name and all(dict(labels).get(k) == w for k, w in want.items()))


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    return (sum(vals[:8]) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


MODEL = "fastconformer"  # --model: the bundled FastConformer by name (the figures were taken with it)


def set_model(name: str) -> None:
    global MODEL
    MODEL = name


class Server:
    def __init__(self, name: str, extra: list[str], workdir: Path):
        self.name = name
        self.log_path = workdir / f"server-{name}.log"
        self.args = [sys.executable, "-m", "chorus.cli", "serve", "--device", "cpu", "--port", "0",
                     "--model", MODEL, *extra]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.port: int | None = None
        self._up = threading.Event()
        self._log = open(self.log_path, "w")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
                                     env=env, text=True, errors="replace")
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self._log.write(line)
            self._log.flush()
            m = PORT_LINE.search(line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._up.set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/asr"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_up(self, timeout: float = 300.0) -> float:
        end = time.monotonic() + timeout
        while not self._up.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"server {self.name} did not come up ({self.proc.poll()}):\n{self.log_tail()}")
        assert http_get(self.http + "/healthz").strip() == "ok"
        return time.monotonic() - self.t_start

    def metrics(self) -> dict[tuple, float]:
        return parse_metrics(http_get(self.http + "/metrics"))

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def cpu(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def counts(self) -> dict[str, float]:
        m = self.metrics()
        return {"connections": gauge(m, "chorus_connections"), "open_streams": gauge(m, "chorus_open_streams"),
                "slots_used": gauge(m, "chorus_slots", state="used")}

    def wait_idle(self, timeout: float = 60.0) -> tuple[float | None, dict]:
        """Seconds until connections, open streams and used slots are all 0 (None if not within timeout)."""
        t0 = time.monotonic()
        while True:
            c = self.counts()
            if not any(c.values()):
                return time.monotonic() - t0, c
            if time.monotonic() - t0 > timeout:
                return None, c
            time.sleep(0.1)

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Sampler:
    """Samples the server's VmRSS every 50 ms and its backlog gauge every 200 ms, in threads."""

    def __init__(self, server: Server):
        self.server = server
        self.rss: list[tuple[float, float]] = []
        self.backlog: list[tuple[float, float]] = []
        self.kernel: list[tuple[float, int, int]] = []  # (t, server rx queue bytes, client tx queue bytes)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rss, daemon=True),
                         threading.Thread(target=self._backlog, daemon=True)]
        for t in self._threads:
            t.start()

    def _rss(self) -> None:
        while not self._stop.wait(0.05):
            self.rss.append((time.monotonic(), self.server.rss_mb()))

    def _backlog(self) -> None:
        while not self._stop.wait(0.2):
            try:
                m = self.server.metrics()
            except OSError:
                continue
            self.backlog.append((time.monotonic(), gauge(m, "chorus_backlog_seconds", stat="max")))
            self.kernel.append((time.monotonic(), *tcp_queues(self.server.port)))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def tcp_queues(port: int) -> tuple[int, int]:
    """Bytes the kernel holds on 127.0.0.1 TCP connections to `port` (/proc/net/tcp): (unread by the server:
    the server sockets' receive queues, unsent by the clients: the client sockets' send queues)."""
    rx = tx = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state != "01":  # ESTABLISHED
                continue
            txq, rxq = (int(x, 16) for x in fields[4].split(":"))
            if int(local.split(":")[1], 16) == port:
                rx += rxq
            elif int(remote.split(":")[1], 16) == port:
                tx += txq
    return rx, tx


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


# ------------------------------------------------------------------------------------------
# flood: the real-time client (this process) and the flooders (a child process)
# ------------------------------------------------------------------------------------------
def start_msg(lookahead_ms: int, endpointing: bool = False) -> str:
    return json.dumps({"type": "start", "sample_rate": SR, "encoding": "pcm_s16le", "lookahead_ms": lookahead_ms,
                       "interim_results": True, "endpointing": endpointing})


async def realtime_client(url: str, track: np.ndarray, seconds: float, lookahead_ms: int) -> dict:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    n_frames = int(round(seconds / FRAME_S))
    audio = track[np.arange(n_frames * FRAME_SAMPLES) % len(track)].tobytes()
    sent_at = np.full(n_frames, np.nan)
    out = {"latencies": [], "ends": [], "arrivals": [], "slips": [], "error": None, "close": None,
           "chunk_ms": None, "stop_ms": None, "frames": 0}
    t0_box: list[float] = []
    stop_sent: list[float] = []
    streaming = [True]
    ready = asyncio.get_running_loop().create_future()

    async def reader(ws):
        try:
            async for raw in ws:
                now = time.monotonic()
                if not isinstance(raw, str):
                    continue
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "ready":
                    out["chunk_ms"] = msg.get("chunk_ms")
                    if not ready.done():
                        ready.set_result(now)
                elif kind in ("partial", "final"):
                    if kind == "final" and msg.get("reason") in ("stop", "finalize"):
                        out["stop_ms"] = (now - stop_sent[0]) * 1e3 if stop_sent else None
                        continue
                    k = min(math.ceil(round(msg["end"] * SR) / FRAME_SAMPLES) - 1, n_frames - 1)
                    t = sent_at[k] if k >= 0 else t0_box[0]
                    if math.isnan(t):  # not sent yet: its scheduled time
                        t = t0_box[0] + (k + 1) * FRAME_S
                    out["latencies"].append(now - t)
                    out["ends"].append(msg["end"])
                    if streaming[0]:
                        out["arrivals"].append(now)
                elif kind == "error":
                    out["error"] = msg.get("code")
                    if not ready.done():
                        ready.set_exception(RuntimeError(f"error before ready: {msg}"))
        except ConnectionClosed:
            pass
        out["close"] = ws.close_code
        if not ready.done():
            ready.set_exception(RuntimeError(f"closed before ready ({ws.close_code})"))

    async with connect(url, compression=None, open_timeout=30, max_size=1 << 22) as ws:
        rd = asyncio.create_task(reader(ws))
        await ws.send(start_msg(lookahead_ms))
        t_start = time.monotonic()
        out["ready_ms"] = (await asyncio.wait_for(ready, 30) - t_start) * 1e3
        t0 = time.monotonic()
        t0_box.append(t0)
        for k in range(n_frames):
            target = t0 + (k + 1) * FRAME_S
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if rd.done():
                break
            await ws.send(audio[k * FRAME_SAMPLES * 2:(k + 1) * FRAME_SAMPLES * 2])
            now = time.monotonic()
            sent_at[k] = now
            out["slips"].append(now - target)
            out["frames"] = k + 1
        out["window"] = (t0, time.monotonic())
        streaming[0] = False
        if not rd.done():
            stop_sent.append(time.monotonic())
            await ws.send(json.dumps({"type": "stop"}))
            try:
                await asyncio.wait_for(asyncio.shield(rd), 30)
            except asyncio.TimeoutError:
                out["error"] = out["error"] or "stop_timeout"
                rd.cancel()
    return out


async def _flood_many(url: str, n: int, frame_ms: int, lookahead_ms: int, stop_evt, q) -> dict:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    track = flood_track().tobytes()
    step = int(SR * frame_ms / 1000) * 2
    sent = [0] * n            # bytes handed to ws.send and returned
    ends = [0.0] * n
    errors: list = [None] * n
    closes: list = [None] * n
    readies = [asyncio.Event() for _ in range(n)]
    conns: list = [None] * n
    stopping = asyncio.Event()
    timeline: list[tuple[float, list[float], list[float]]] = []

    async def reader(i, ws):
        try:
            async for raw in ws:
                if isinstance(raw, str):
                    msg = json.loads(raw)
                    if msg.get("type") == "ready":
                        readies[i].set()
                    elif msg.get("type") in ("partial", "final"):
                        ends[i] = max(ends[i], msg["end"])
                    elif msg.get("type") == "error":
                        errors[i] = msg.get("code")
        except ConnectionClosed:
            pass
        closes[i] = ws.close_code

    async def flooder(i):
        ws = await connect(url, compression=None, open_timeout=30, max_size=1 << 22)
        conns[i] = ws
        rd = asyncio.create_task(reader(i, ws))
        await ws.send(start_msg(lookahead_ms, endpointing=True))
        pos = (i * len(track) // max(n, 1)) // 2 * 2
        try:
            while not stopping.is_set():
                if pos + step > len(track):
                    pos = 0
                await ws.send(track[pos:pos + step])
                pos += step
                sent[i] += step
        except ConnectionClosed:
            errors[i] = errors[i] or f"closed {ws.close_code}"
        await rd

    async def sample():
        while not stopping.is_set():
            timeline.append((time.monotonic(), [b / 2 / SR for b in sent], list(ends)))
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(flooder(i)) for i in range(n)]
    smp = asyncio.create_task(sample())
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
    q.put("ready")
    while not stop_evt.is_set():
        await asyncio.sleep(0.05)
    stopping.set()
    await smp
    timeline.append((time.monotonic(), [b / 2 / SR for b in sent], list(ends)))
    for ws in conns:  # go without a close frame: the server is not reading these sockets anyway
        if ws is not None:
            ws.transport.abort()
    await asyncio.wait(tasks, timeout=10)
    return {"timeline": timeline, "errors": errors, "closes": closes}


def flood_child(url: str, n: int, frame_ms: int, lookahead_ms: int, stop_evt, q) -> None:
    sys.path.insert(0, str(REPO))
    try:
        q.put(asyncio.run(_flood_many(url, n, frame_ms, lookahead_ms, stop_evt, q)))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        q.put({"failed": f"{type(exc).__name__}: {exc}"})


def at(timeline, t: float) -> tuple[list[float], list[float]]:
    """The flooders' (sent s, transcribed s) at time t: the last sample at or before t."""
    best = timeline[0]
    for s in timeline:
        if s[0] <= t:
            best = s
    return best[1], best[2]


def flood_scenario(server: Server, track: np.ndarray, n_flood: int, args) -> dict:
    label = "alone" if n_flood == 0 else f"+{n_flood} flooder" + ("s" if n_flood > 1 else "")
    idle_before, _ = server.wait_idle(60)
    rss0 = server.rss_mb()
    sampler = Sampler(server)
    cpu0, busy0, w0 = server.cpu(), machine_busy_seconds(), time.monotonic()
    child = None
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    stop_evt = ctx.Event()
    if n_flood:
        child = ctx.Process(target=flood_child, args=(server.url, n_flood, args.flood_frame_ms, args.lookahead_ms,
                                                      stop_evt, q), daemon=True)
        child.start()
        first = q.get(timeout=120)
        if first != "ready":
            raise RuntimeError(f"flooders failed: {first}")
        time.sleep(args.flood_lead)
    rt = asyncio.run(realtime_client(server.url, track, args.seconds, args.lookahead_ms))
    flood = None
    if child is not None:
        stop_evt.set()
        flood = q.get(timeout=60)
        child.join(30)
        if "failed" in flood:
            raise RuntimeError(f"flooders failed: {flood['failed']}")
    sampler.stop()
    wall = time.monotonic() - w0
    cpu, busy = (server.cpu() - cpu0) / wall, (machine_busy_seconds() - busy0) / wall
    idle_after, counts = server.wait_idle(60)
    lat = np.asarray(rt["latencies"]) * 1e3
    ends = np.asarray(rt["ends"])
    gaps = np.diff(rt["arrivals"]) * 1e3 if len(rt["arrivals"]) > 1 else np.asarray([])
    p = {"scenario": label, "flooders": n_flood, "results": int(len(lat)),
         "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "max_ms": float(lat.max()) if len(lat) else float("nan"),
         "max_after_2s_ms": float(lat[ends > 2.0].max()) if (ends > 2.0).any() else float("nan"),
         "gap_p95_ms": pct(gaps, 95), "gap_max_ms": float(gaps.max()) if len(gaps) else float("nan"),
         "slip_p95_ms": pct(np.asarray(rt["slips"]) * 1e3, 95), "stop_final_ms": rt["stop_ms"],
         "rt_error": rt["error"], "rt_close": rt["close"], "chunk_ms": rt["chunk_ms"],
         "rss_before_mb": rss0, "rss_peak_growth_mb": max((r for _, r in sampler.rss), default=rss0) - rss0,
         "backlog_max_peak_s": max((b for _, b in sampler.backlog), default=float("nan")),
         "kernel_server_rx_peak_s": max((r for _, r, _ in sampler.kernel), default=0) / 2 / SR,
         "kernel_client_tx_peak_s": max((t for _, _, t in sampler.kernel), default=0) / 2 / SR,
         "ready_ms": rt["ready_ms"],
         "server_cores": cpu, "machine_cores": busy, "idle_after_s": idle_after, "counts_after": counts,
         "flooders_detail": []}
    if flood:
        t0, t1 = rt["window"]
        (s0, e0), (s1, e1) = at(flood["timeline"], t0), at(flood["timeline"], t1)
        for i in range(n_flood):
            p["flooders_detail"].append({
                "sent_in_window_s": s1[i] - s0[i], "transcribed_in_window_s": e1[i] - e0[i],
                "sent_total_s": s1[i], "transcribed_total_s": e1[i], "held_s": s1[i] - e1[i],
                "window_s": t1 - t0, "error": flood["errors"][i]})
    return p


def print_flood(points: list[dict], chunk_ms: int) -> None:
    base = points[0]
    print(f"\nflood: the real-time client ({base['results']} results alone); target: every result < {chunk_ms} ms")
    print(f"{'scenario':>12} | {'p50':>4} {'p95':>4} {'worst':>5} {'w>2s':>4} ms | x alone: {'p95':>5} {'worst':>5} | "
          f"{'gap p95':>7} {'max':>5} ms | {'slip':>4} | {'RSS':>5} {'backlog':>7} {'kernel':>11} | {'srv':>4} {'all':>4}")
    for p in points:
        print(f"{p['scenario']:>12} | {p['p50_ms']:4.0f} {p['p95_ms']:4.0f} {p['max_ms']:5.0f} "
              f"{p['max_after_2s_ms']:4.0f} ms |          {p['p95_ms'] / base['p95_ms']:5.2f} "
              f"{p['max_ms'] / base['max_ms']:5.2f} | {p['gap_p95_ms']:7.0f} {p['gap_max_ms']:5.0f} ms | "
              f"{p['slip_p95_ms']:4.1f} | {p['rss_peak_growth_mb']:+5.1f} {p['backlog_max_peak_s']:6.2f}s "
              f"{p['kernel_server_rx_peak_s']:5.0f}/{p['kernel_client_tx_peak_s']:<4.0f}s | "
              f"{p['server_cores']:4.2f} {p['machine_cores']:4.2f}" + (f"  rt error {p['rt_error']}" if p["rt_error"] else ""))
    print("  (RSS: server's peak RSS growth, MB; backlog: peak of chorus_backlog_seconds{stat=max}; kernel: peak audio "
          "in the kernel's socket queues, server receive / clients' send; srv, all: server and machine CPU, cores)")
    for p in points:
        for i, f in enumerate(p["flooders_detail"]):
            print(f"  {p['scenario']}, flooder {i}: in the {f['window_s']:.1f} s window sent {f['sent_in_window_s']:.1f} s, "
                  f"transcribed {f['transcribed_in_window_s']:.1f} s ({f['transcribed_in_window_s'] / f['window_s']:.1f}x "
                  f"real time); totals sent {f['sent_total_s']:.1f} s, transcribed {f['transcribed_total_s']:.1f} s, "
                  f"held {f['held_s']:.1f} s" + (f"; {f['error']}" if f["error"] else ""))
    worst = max(p["max_ms"] for p in points)
    print(f"  every result under the chunk ({chunk_ms} ms) in every scenario: {'yes' if worst < chunk_ms else 'NO'} "
          f"(worst {worst:.0f} ms)")


# ------------------------------------------------------------------------------------------
# disconnects
# ------------------------------------------------------------------------------------------
KINDS = ("before_start", "after_start", "mid_audio", "after_finalize", "stop_then_drop")


async def one_cycle(kind: str, url: str, audio: bytes, rng: random.Random, tally: dict, lookahead_ms: int) -> str:
    """One connection that ends with an abort; returns 'ok', 'http_NNN' or what else went wrong."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    def count(key: str) -> str:
        tally[key] = tally.get(key, 0) + 1
        return key

    try:
        ws = await connect(url, compression=None, open_timeout=20, close_timeout=1)
    except InvalidStatus as exc:
        return count(f"http_{exc.response.status_code}")
    except Exception as exc:  # noqa: BLE001 - counted
        return count(f"connect {type(exc).__name__}")
    try:
        if kind != "before_start":
            await ws.send(start_msg(lookahead_ms))
            if kind == "after_start":
                await asyncio.sleep(rng.uniform(0, 0.02))
            else:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
                if msg.get("type") != "ready":
                    return count(f"no ready: {msg.get('code')}")
                secs = rng.uniform(0.1, 1.5) if kind == "mid_audio" else 0.5
                pos = rng.randrange(0, len(audio) - int(secs * SR) * 2) // 2 * 2
                for k in range(int(round(secs / FRAME_S))):
                    await ws.send(audio[pos + k * FRAME_SAMPLES * 2:pos + (k + 1) * FRAME_SAMPLES * 2])
                if kind == "mid_audio":
                    await asyncio.sleep(rng.uniform(0, 0.3))
                elif kind == "after_finalize":
                    await ws.send(json.dumps({"type": "finalize"}))
                else:
                    await ws.send(json.dumps({"type": "stop"}))
        return count("ok")
    except Exception as exc:  # noqa: BLE001 - counted
        return count(f"{kind} {type(exc).__name__}")
    finally:
        ws.transport.abort()  # no close frame: the TCP connection just goes


async def disconnect_cycles(server: Server, audio: bytes, cycles: int, concurrency: int, seed: int,
                            lookahead_ms: int, retry_503: bool = False) -> dict:
    """`cycles` abrupt disconnects, `concurrency` at a time.  With retry_503 a refused cycle is tried again after
    50 ms (at most 100 times: a connection count that never comes down would lock it out)."""
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(cycles)]
    rng.shuffle(kinds)
    tally: dict[str, int] = {}
    done = [0]
    retried: list[int] = []
    locked_out = [0]
    rss_marks: list[tuple[int, float]] = []
    it = iter(kinds)
    t0 = time.monotonic()

    async def worker(w: int):
        wr = random.Random(seed * 100 + w)
        for kind in it:
            tries = 0
            while await one_cycle(kind, server.url, audio, wr, tally, lookahead_ms) == "http_503" and retry_503:
                tries += 1
                if tries >= 100:
                    locked_out[0] += 1
                    break
                await asyncio.sleep(0.05)
            if tries:
                retried.append(tries)
            done[0] += 1
            if done[0] % 100 == 0:
                rss_marks.append((done[0], server.rss_mb()))

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return {"tally": tally, "rss_marks": rss_marks, "seconds": time.monotonic() - t0, "cycles": cycles,
            "concurrency": concurrency, "kinds": {k: kinds.count(k) for k in KINDS}, "retried_cycles": len(retried),
            "max_retries": max(retried, default=0), "locked_out": locked_out[0]}


def linger(server: Server, audio: bytes, reps: int, seed: int, lookahead_ms: int) -> dict[str, list[float]]:
    """For each kind alone on an idle server: ms from the client's abort until chorus_connections is back to 0."""
    rng = random.Random(seed)
    out: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(reps):
        for kind in KINDS:
            asyncio.run(one_cycle(kind, server.url, audio, rng, {}, lookahead_ms))
            t = time.monotonic()
            while server.counts()["connections"] > 0 and time.monotonic() - t < 10:
                time.sleep(0.005)
            out[kind].append((time.monotonic() - t) * 1e3)
    return out


async def ordinary_stream(url: str, audio: bytes, lookahead_ms: int) -> dict:
    from websockets.asyncio.client import connect

    finals = []
    async with connect(url, compression=None, open_timeout=20) as ws:
        await ws.send(start_msg(lookahead_ms))
        for k in range(50):
            await ws.send(audio[k * FRAME_SAMPLES * 2:(k + 1) * FRAME_SAMPLES * 2])
        await ws.send(json.dumps({"type": "stop"}))
        async for raw in ws:
            if isinstance(raw, str):
                msg = json.loads(raw)
                if msg.get("type") == "final":
                    finals.append(msg.get("reason"))
    return {"finals": finals, "close": ws.close_code}


def disconnect_part(server: Server, audio: bytes, args) -> dict:
    server.wait_idle(30)
    rss_start = server.rss_mb()
    r = asyncio.run(disconnect_cycles(server, audio, args.cycles, args.concurrency, args.seed, args.lookahead_ms))
    t = time.monotonic()
    idle_s, counts = server.wait_idle(30)
    r.update(rss_start_mb=rss_start, idle_after_s=idle_s, counts=counts, settle_wait_s=time.monotonic() - t,
             rss_idle_mb=server.rss_mb())
    out = {"main": r}
    if args.near_limit_cycles:
        near = asyncio.run(disconnect_cycles(server, audio, args.near_limit_cycles, args.max_connections - 1,
                                             args.seed + 1, args.lookahead_ms, retry_503=True))
        t = time.monotonic()
        idle_s, counts = server.wait_idle(30)
        near.update(idle_after_s=idle_s, counts=counts, settle_wait_s=time.monotonic() - t, rss_idle_mb=server.rss_mb())
        out["near_limit"] = near
        out["linger_ms"] = linger(server, audio, 5, args.seed, args.lookahead_ms)
    out["ordinary"] = asyncio.run(ordinary_stream(server.url, audio, args.lookahead_ms))
    server.wait_idle(30)
    out["counts_after_ordinary"] = server.counts()
    return out


def print_disconnect(d: dict, max_conn: int) -> None:
    r = d["main"]
    t = r["tally"]
    n = sum(t.values())
    marks = dict(r["rss_marks"])
    first, last = marks.get(100, float("nan")), marks.get(max(marks) if marks else 0, float("nan"))
    c = r["counts"]
    print(f"\ndisconnect: {n} cycles ({', '.join(f'{k} {v}' for k, v in r['kinds'].items())}), {r['concurrency']} at a "
          f"time, --max-connections {max_conn}, {r['seconds']:.1f} s ({n / r['seconds']:.0f} cycles/s)")
    others = {k: v for k, v in t.items() if k not in ("ok", "http_503")}
    print(f"  completed as planned: {t.get('ok', 0)}; HTTP 503: {t.get('http_503', 0)}; other failures: "
          f"{others if others else 'none'}")
    print(f"  after the cycles: connections {c['connections']:.0f}, open streams {c['open_streams']:.0f}, slots used "
          f"{c['slots_used']:.0f} ({'idle' if r['idle_after_s'] is not None else 'NOT idle'} {r['settle_wait_s']:.2f} s "
          f"after the last cycle)")
    print(f"  server RSS: {r['rss_start_mb']:.1f} MB before, {first:.1f} MB after 100 cycles, {last:.1f} MB after "
          f"{max(marks) if marks else 0} ({last - first:+.1f} MB, x{last / first:.3f}), {r['rss_idle_mb']:.1f} MB idle; "
          f"every 100: {' '.join(f'{v:.0f}' for _, v in sorted(r['rss_marks']))}")
    if "near_limit" in d:
        q = d["near_limit"]
        qt = q["tally"]
        qc = q["counts"]
        print(f"  near the limit: {q['cycles']} cycles, {q['concurrency']} at a time, a refused cycle retried after 50 ms: "
              f"{qt.get('ok', 0)} completed, {qt.get('http_503', 0)} attempts answered 503, {q['retried_cycles']} cycles "
              f"retried (at most {q['max_retries']} times), {q['locked_out']} locked out; then connections "
              f"{qc['connections']:.0f}, open streams {qc['open_streams']:.0f}, slots used {qc['slots_used']:.0f}")
        print("  how long one dropped connection stays counted (ms from the abort to chorus_connections 0, idle server): "
              + "; ".join(f"{k} {np.median(v):.0f} (max {max(v):.0f})" for k, v in d["linger_ms"].items()))
    o = d["ordinary"]
    print(f"  an ordinary stream afterwards: finals {o['finals']}, close {o['close']}; then {d['counts_after_ordinary']}")


# ------------------------------------------------------------------------------------------
# SIGTERM
# ------------------------------------------------------------------------------------------
async def sigterm_part(server: Server, track: np.ndarray, args) -> dict:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    audio = track[np.arange(120 * SR) % len(track)].tobytes()
    n = 4
    streams = [{"kind": "real-time" if i < 2 else "fast", "sent_s": 0.0, "final": None, "close": None,
                "t_final": None, "t_close": None, "other": []} for i in range(n)]
    ready_all = [asyncio.Event() for _ in range(n)]
    term_at: list[float] = []

    async def stream(i: int):
        s = streams[i]
        async with connect(server.url, compression=None, open_timeout=20, max_size=1 << 22) as ws:
            async def reader():
                try:
                    async for raw in ws:
                        if isinstance(raw, str):
                            msg = json.loads(raw)
                            if msg.get("type") == "ready":
                                ready_all[i].set()
                            elif msg.get("type") == "final" and msg.get("reason") == "shutdown":
                                s["final"] = msg
                                s["t_final"] = time.monotonic()
                            elif msg.get("type") in ("final", "error"):
                                s["other"].append(msg.get("reason") or msg.get("code"))
                except ConnectionClosed:
                    pass
                s["close"] = ws.close_code
                s["t_close"] = time.monotonic()

            rd = asyncio.create_task(reader())
            await ws.send(start_msg(args.lookahead_ms))
            await ready_all[i].wait()
            fast = s["kind"] == "fast"
            step = (FRAME_SAMPLES * 5 if fast else FRAME_SAMPLES) * 2
            t0 = time.monotonic()
            pos = (i * 4 * SR * 2) % len(audio)
            k = 0
            try:
                while not rd.done() and k * step < len(audio) - pos:
                    if not fast:
                        await asyncio.sleep(max(0.0, t0 + (k + 1) * FRAME_S - time.monotonic()))
                    await ws.send(audio[pos + k * step:pos + (k + 1) * step])
                    k += 1
                    if not term_at:
                        s["sent_s"] = k * step / 2 / SR
            except ConnectionClosed:
                pass
            await asyncio.wait_for(rd, args.grace + 15)

    tasks = [asyncio.create_task(stream(i)) for i in range(n)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready_all)), 30)
    await asyncio.sleep(args.sigterm_after)
    backlog = gauge(await asyncio.to_thread(server.metrics), "chorus_backlog_seconds", stat="sum")
    kernel_rx = tcp_queues(server.port)[0] / 2 / SR
    term_at.append(time.monotonic())
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    try:  # a newcomer during the shutdown
        ws = await connect(server.url, compression=None, open_timeout=5)
        late = "accepted"
        await ws.close()
    except InvalidStatus as exc:
        late = f"HTTP {exc.response.status_code}"
    except Exception as exc:  # noqa: BLE001 - reported
        late = type(exc).__name__
    await asyncio.gather(*tasks, return_exceptions=True)
    rc = await asyncio.to_thread(server.proc.wait, args.grace + 30)
    t_exit = time.monotonic()
    t = term_at[0]
    return {"streams": [{"kind": s["kind"], "sent_at_sigterm_s": s["sent_s"],
                         "final_reason": s["final"]["reason"] if s["final"] else None,
                         "final_end_s": s["final"]["end"] if s["final"] else None,
                         "final_after_ms": (s["t_final"] - t) * 1e3 if s["t_final"] else None,
                         "close": s["close"], "close_after_ms": (s["t_close"] - t) * 1e3 if s["t_close"] else None,
                         "other": s["other"]} for s in streams],
            "backlog_sum_at_sigterm_s": backlog, "newcomer": late, "exit_status": rc, "grace_s": args.grace,
            "kernel_rx_at_sigterm_s": kernel_rx,
            "exit_after_ms": (t_exit - t) * 1e3}


def print_sigterm(r: dict) -> None:
    print(f"\nsigterm: 4 streams mid-audio; at SIGTERM the server held {r['backlog_sum_at_sigterm_s']:.1f} s of unencoded "
          f"audio over them and its sockets' receive queues {r['kernel_rx_at_sigterm_s']:.1f} s")
    print(f"{'stream':>10} | {'sent s':>6} {'final end':>9} | {'reason':>8} {'close':>5} | {'final ms':>8} {'close ms':>8}")
    for s in r["streams"]:
        fe = f"{s['final_end_s']:.2f}" if s["final_end_s"] is not None else "-"
        fa = f"{s['final_after_ms']:.0f}" if s["final_after_ms"] is not None else "-"
        ca = f"{s['close_after_ms']:.0f}" if s["close_after_ms"] is not None else "-"
        print(f"{s['kind']:>10} | {s['sent_at_sigterm_s']:6.2f} {fe:>9} | {str(s['final_reason']):>8} "
              f"{str(s['close']):>5} | {fa:>8} {ca:>8}" + (f"  also {s['other']}" if s["other"] else ""))
    ok = all(s["final_reason"] == "shutdown" and s["close"] == 1001 for s in r["streams"])
    print(f"  every stream: final 'shutdown' + close 1001: {'yes' if ok else 'NO'}; a connection 0.2 s after SIGTERM: "
          f"{r['newcomer']}; exit status {r['exit_status']} {r['exit_after_ms']:.0f} ms after SIGTERM "
          f"(--shutdown-grace {r['grace_s']:g} s: {'within' if r['exit_after_ms'] <= r['grace_s'] * 1e3 + 1000 else 'OVER'})")


# ------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="flood,disconnect,sigterm")
    ap.add_argument("--seconds", type=float, default=20.0, help="audio the real-time client streams per scenario")
    ap.add_argument("--lookahead-ms", type=int, default=480)
    ap.add_argument("--flooders", default="1,2", help="flooder counts, each a scenario after the alone baseline")
    ap.add_argument("--flood-frame-ms", type=int, default=100, help="frame length the flooders send")
    ap.add_argument("--flood-lead", type=float, default=3.0, help="seconds the flooders run before the real-time client")
    ap.add_argument("--max-buffered-seconds", type=float, default=None, help="passed to the flood server if given")
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=4, help="disconnect cycles at a time (half the limit)")
    ap.add_argument("--near-limit-cycles", type=int, default=300,
                    help="then this many at --max-connections - 1 at a time, 503s retried (0: skip)")
    ap.add_argument("--max-connections", type=int, default=8)
    ap.add_argument("--sigterm-after", type=float, default=3.0, help="seconds of streaming before SIGTERM")
    ap.add_argument("--grace", type=float, default=10.0, help="the server's --shutdown-grace")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=MODEL, help="what the server serves (a path or a bundled name)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()
    set_model(args.model)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    sys.path.insert(0, str(REPO))

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    name, track = realtime_track()
    print(f"machine: {cpu}, {os.cpu_count()} cores; bundled default model, default decoding (beam 8 + LM); "
          f"real-time audio {name}; lookahead {args.lookahead_ms} ms", flush=True)
    report: dict = {"machine": cpu, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    workdir = Path(tempfile.mkdtemp(prefix="chorus-abuse-"))
    t_all = time.monotonic()
    servers: list[Server] = []
    try:
        if "flood" in parts:
            extra = ["--max-buffered-seconds", str(args.max_buffered_seconds)] if args.max_buffered_seconds else []
            srv = Server("flood", extra, workdir)
            servers.append(srv)
            print(f"flood server up in {srv.wait_up():.1f} s (port {srv.port})", flush=True)
            asyncio.run(realtime_client(srv.url, track, 3.0, args.lookahead_ms))  # warm-up: first-call costs
            points = []
            for n in [0] + [int(x) for x in args.flooders.split(",") if x.strip()] + [0]:
                p = flood_scenario(srv, track, n, args)
                if n == 0 and points:
                    p["scenario"] = "alone again"
                points.append(p)
                print(f"  {p['scenario']}: p95 {p['p95_ms']:.0f} ms, worst {p['max_ms']:.0f} ms", flush=True)
            report["flood"] = points
            print_flood(points, points[0]["chunk_ms"] or 560)
            srv.stop()
        if "disconnect" in parts or "sigterm" in parts:
            srv = Server("disconnect", ["--max-connections", str(args.max_connections),
                                        "--shutdown-grace", str(args.grace)], workdir)
            servers.append(srv)
            print(f"\ndisconnect/sigterm server up in {srv.wait_up():.1f} s (port {srv.port})", flush=True)
            if "disconnect" in parts:
                audio = track[np.arange(30 * SR) % len(track)].tobytes()
                r = disconnect_part(srv, audio, args)
                report["disconnect"] = r
                print_disconnect(r, args.max_connections)
            if "sigterm" in parts:
                r = asyncio.run(sigterm_part(srv, track, args))
                report["sigterm"] = r
                print_sigterm(r)
    finally:
        for s in servers:
            s.stop()
        print(f"\nserver logs in {workdir}; whole run {time.monotonic() - t_all:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
