#!/usr/bin/env python3
"""Load on `chorus serve`: N real-time WebSocket clients, batched server vs unbatched server, same run.

    python bench/load.py --random-size small                       # sweep N = 1, 2, 4, ... until p95 >= chunk
    python bench/load.py --random-size real --seconds 20
    python bench/load.py --model path/to/model.nemo --clients 1,4,16 --seconds 30
    python bench/load.py --random-size real --write-model /tmp/real.nemo   # build the model once, then --model

The server runs as a subprocess (`python -m chorus.cli serve ...`), so its CPU use is its own and it
is exactly what a deployment runs.  Two servers are started on the same model and kept up for the
whole run; every point is run on both ("variants", interleaved):
  batched:    the defaults (--max-batch 64, --batch-wait-ms 10);
  unbatched:  --max-batch 1 (each ready stream is stepped alone; the batch wait is left at its default).
(--variants also knows `nowait`: batched with --batch-wait-ms 0, `unbatched-nowait`, `greedy`: batched
with --beam 1, the baseline for a model whose default decoding is beam search, such as the bundled one, and
`wait50` / `greedy-wait50`: the scheduler may wait up to 50 ms for streams about to be ready.)
--baseline-root DIR adds `before`: a server run from another checkout (the same model and the first variant's
flags), so a change is measured against the code before it in the same run.  The batched step itself is timed
in this process first (--step-capacity): the largest B whose step fits in the chunk is the N the server's
capacity is compared with.

The clients (one process, asyncio, websockets' asyncio client): each streams 16 kHz pcm_s16le in
20 ms binary frames at real-time pace (frame k is sent at t0 + (k+1) x 20 ms, when a microphone
would have captured its last sample) for --seconds, with `interim_results: true` and
`endpointing: false`, then sends `stop` and waits for the final and the close.  Client i plays
jfk.flac or a track of FSDD digit recordings (alternating), from a random offset, looped; client
starts are staggered evenly over one chunk period, so streams are out of phase (chunks become ready
at different times, the hard case for a batching scheduler).

Figures per point:
  latency    arrival time of a `partial`/`final` minus the wall time at which the audio sample at the
             result's `end` was sent (the frame holding it).  The results of `stop` are left out (their
             latency is reported apart).  NB: with 8x causal subsampling the chunk whose results end at
             `end` is computable from audio up to about `end` - 54 ms (480 ms lookahead), so an idle
             server shows ~ step time - 54 ms; a frame not yet sent at arrival counts from its
             scheduled send time (latency may be negative).
  no-result  chunks that produced no message: the server sends a partial only when the text changes;
             latency comes from the results that did come.
  batches    from GET /metrics, the chorus_step_batch_size and chorus_step_seconds histograms,
             differenced between the start of the run and the moment every client finished sending.
  kept up    chunks the server stepped (sum of batch sizes) vs chunks the sent audio made ready, at
             the end of sending: kept up when at most one chunk per stream is left ("behind"; "bklg"
             is that backlog in audio seconds per stream).  "pulled" is the audio the server's streams
             took in (chorus_audio_seconds_total) over the audio sent: below 100% means the server
             stopped reading sockets (its backpressure); "slip" (p95, ms) is how late the clients
             managed to send their frames (TCP backpressure or a busy load generator).
  CPU        server process (utime+stime from /proc), this load generator, and the whole machine
             (/proc/stat), in cores; with 2 cores, the clients' CPU competes with the server's.
  health     round trip of GET /healthz every 100 ms during the run: stalls of the server's event loop.
A point passes when p95 latency < chunk length, the server kept up, and no stream failed.  The sweep
doubles N until both variants fail (then --refine bisects between the last pass and the first fail).

Random models (--random-size; weights seeded, nothing downloaded):
  real:  the size of NeMo's stt_en_fastconformer_hybrid_large_streaming_multi: 17 layers, d_model 512,
         8 heads, conv kernel 9, dw_striding x8 with 256 channels, ff x4, hybrid RNNT (640/640) + CTC,
         1024-token SentencePiece vocabulary, att_context_size [[70,13],[70,6],[70,1],[70,0]];
  small: the bundled default model's size (recipes/default_asr/train.py "small"): 8 layers,
         d_model 144, 4 heads, 64 subsampling channels, RNNT 256/256 + CTC, 256 tokens, same contexts.
Random weights make greedy decoders emit on every frame (RNNT: max_symbols labels per frame), which
would make decoding cost unrealistic.  The heads are calibrated with bench/conformer_streaming.py's
`calibrate_heads` on encoder outputs of the audio (input projections re-centred, then): RNNT blank
bias bisected to --tokens-per-frame labels per 80 ms frame (default 0.25, about
3 tokens/s, like a trained English model on read speech), CTC blank bias shifted by the matching
quantile.  Random heads that emit at all emit in bursts (a frame that emits one label emits
max_symbols of them: ~3% of frames, 10 labels each), unlike a trained model (mostly one label per
emitting frame); so the random models' greedy RNNT gets max_symbols 1 (--max-symbols): ~20% of frames
emit one label, the text changes on most chunks and most chunks give a partial.  The decoding cost
is that of a trained model's ~0.25 labels/frame (NeMo's max_symbols 10 costs one more joint
evaluation per emitted label, small next to the encoder).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SR = 16000
FRAME_S = 0.02
FRAME_SAMPLES = int(SR * FRAME_S)
CONTEXTS = ((70, 13), (70, 6), (70, 1), (70, 0))  # 1040, 480, 80, 0 ms lookahead
# name: (d_model, layers, heads, subsampling channels, pred/joint hidden, vocab)
SIZES = {"real": (512, 17, 8, 256, 640, 1024), "small": (144, 8, 4, 64, 256, 256)}
VARIANTS = {
    "batched": [],
    "unbatched": ["--max-batch", "1"],
    "nowait": ["--batch-wait-ms", "0"],
    "unbatched-nowait": ["--max-batch", "1", "--batch-wait-ms", "0"],
    "greedy": ["--beam", "1"],  # batched; for the bundled model, whose default decoding is beam 8 + LM
    "greedy-wait50": ["--beam", "1", "--batch-wait-ms", "50"],  # the scheduler may wait up to 50 ms for a batch
    "wait50": ["--batch-wait-ms", "50"],
}


# ------------------------------------------------------------------------------------------
# audio
# ------------------------------------------------------------------------------------------
def load_sources(seed: int = 0) -> list[np.ndarray]:
    """16 kHz mono int16 tracks: jfk.flac, and ~60 FSDD digit takes (four speakers) with short gaps."""
    from chorus.codecs import read_audio, resample

    tracks = []
    jfk = DATA / "samples" / "jfk.flac"
    if jfk.exists():
        x, sr = read_audio(jfk)
        tracks.append(resample(x, sr, SR))
    fsdd = sorted((DATA / "fsdd").glob("*.wav"))
    if fsdd:
        rng = random.Random(seed)
        pieces = []
        for p in rng.sample(fsdd, min(60, len(fsdd))):
            x, sr = read_audio(p)
            pieces += [resample(x, sr, SR), np.zeros(int(rng.uniform(0.1, 0.4) * SR), np.float32)]
        tracks.append(np.concatenate(pieces))
    if not tracks:  # no shared data: seeded noise bursts, still out of phase per client
        rng = np.random.default_rng(seed)
        tracks.append((rng.standard_normal(SR * 20) * 0.05).astype(np.float32))
    return [np.clip(t * 32767.0, -32768, 32767).astype("<i2") for t in tracks]


# ------------------------------------------------------------------------------------------
# random models
# ------------------------------------------------------------------------------------------
def build_random_model(size: str, path: Path, seed: int, tokens_per_frame: float, max_symbols: int) -> dict:
    import torch

    from chorus.asr.conformer.asr_model import FastConformerModel, ModelSpec, RNNTConfig
    from chorus.asr.conformer.checkpoint import save_fastconformer
    from chorus.asr.conformer.model import EncoderConfig
    from chorus.stream.features import MelConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conformer_streaming import calibrate_heads, synthetic_tokenizer  # the same calibration as that bench

    d, layers, heads, ch, hidden, vocab = SIZES[size]
    torch.manual_seed(seed)
    enc = EncoderConfig(feat_in=80, n_layers=layers, d_model=d, n_heads=heads, conv_kernel_size=9,
                        subsampling="dw_striding", subsampling_factor=8, subsampling_conv_channels=ch,
                        ff_expansion_factor=4, att_context_size=CONTEXTS, att_context_style="chunked_limited",
                        conv_norm_type="layer_norm")
    spec = ModelSpec(mel=MelConfig(), encoder=enc, vocab_size=vocab,
                     rnnt=RNNTConfig(pred_hidden=hidden, joint_hidden=hidden, max_symbols=max_symbols), ctc=True)
    model = FastConformerModel(spec).eval()
    tokenizer = synthetic_tokenizer(vocab, seed)
    clips = [t[:SR * 12].astype(np.float32) / 32768.0 for t in load_sources(seed)]
    with torch.no_grad():
        info = calibrate_heads(model, clips, (70, 6), tokens_per_frame)
    params = sum(p.numel() for p in model.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_fastconformer(path, model, tokenizer)
    info.update(size=size, max_symbols=max_symbols, params_m=round(params / 1e6, 1), d_model=d, layers=layers, heads=heads,
                subsampling_channels=ch, pred_joint_hidden=hidden, vocab=vocab, seed=seed)
    return info


# ------------------------------------------------------------------------------------------
# the batched step alone
# ------------------------------------------------------------------------------------------
def step_capacity(model_path: Path, lookahead_ms: int, sizes: list[int], threads: int | None,
                  beam: int | None = None) -> dict:
    """Median wall time of one batched step of B streams (synchronized: every stream has a chunk), through
    the family contract, in this process, for each B; the model steps and decodes as the server does
    (`beam`: the server's --beam)."""
    import statistics

    import torch

    from chorus.asr.families import load_model
    from chorus.stream.contract import DecodingDefaults, StreamRequest

    if threads:
        torch.set_num_threads(threads)
    model = load_model(model_path, "cpu", DecodingDefaults(beam_size=beam))
    engine = model.make_engine(slots=max(sizes))
    request = StreamRequest(lookahead_ms=lookahead_ms)
    audio = (np.random.default_rng(0).standard_normal(SR * 30) * 0.1).astype(np.float32)
    out = {}
    with torch.no_grad():
        for b in [min(sizes)] + sizes:  # the first size twice: the first round pays one-off costs
            streams = [engine.open(request) for _ in range(b)]
            times = []
            try:
                pos = 0
                for rep in range(6):
                    for s in streams:  # each stream gets its next chunk's audio, at its own offset
                        while not s.ready():
                            s.accept_audio(audio[pos % (SR * 29):pos % (SR * 29) + 1600])
                            pos += 1600
                    t0 = time.perf_counter()
                    engine.step(streams)
                    if rep >= 1:  # the first step of a stream differs (and warms up)
                        times.append(time.perf_counter() - t0)
            finally:
                for s in streams:
                    s.close()
            out[b] = 1000 * statistics.median(times)
            print(f"  batched step, B={b:>3}: {out[b]:7.1f} ms", flush=True)
    return {"step_ms": out, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------
# the server subprocess
# ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def parse_metrics(text: str) -> dict[tuple, float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\w+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, name: str, model: Path, extra: list[str], slots: int, workdir: Path, env: dict,
                 root: Path = REPO):
        self.name = name
        self.port = free_port()
        self.log_path = workdir / f"server-{name}.log"
        self.args = [sys.executable, "-m", "chorus.cli", "serve", "--model", str(model), "--device", "cpu",
                     "--port", str(self.port), "--slots", str(slots), "--max-connections", str(slots + 16),
                     "--idle-timeout", "120", *extra]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, cwd=root, env=env)
        self.url = f"ws://127.0.0.1:{self.port}/asr"
        self.http = f"http://127.0.0.1:{self.port}"

    def wait_up(self, timeout: float = 300.0) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if http_get(self.http + "/healthz", 2).strip() == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server {self.name} did not come up:\n{self.log_tail()}")

    def metrics(self) -> dict[tuple, float]:
        return parse_metrics(http_get(self.http + "/metrics"))

    def wait_idle(self, timeout: float = 60.0) -> None:
        end = time.time() + timeout
        while time.time() < end:
            m = self.metrics()
            open_streams = sum(v for (n, _), v in m.items() if n == "chorus_open_streams")
            conns = sum(v for (n, _), v in m.items() if n == "chorus_connections")
            if open_streams == 0 and conns == 0:
                return
            time.sleep(0.2)
        print(f"  warning: server {self.name} still has streams open after {timeout:g} s", file=sys.stderr)

    def cpu(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# ------------------------------------------------------------------------------------------
# the clients
# ------------------------------------------------------------------------------------------
@dataclass
class ClientResult:
    latencies: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)  # the `end` of each result in `latencies`
    partials: int = 0
    finals: int = 0
    results_in_stream: int = 0
    ready_latency: float | None = None
    stop_latency: float | None = None
    frames_sent: int = 0
    covered_at_end: float = 0.0      # latest `end` received when sending ended
    sent_at_end: float = 0.0
    chunk_ms: int | None = None
    lookahead_ms: int | None = None
    slips: list[float] = field(default_factory=list)  # actual - scheduled send time, per frame
    error: str | None = None          # error code from the server, or a client-side failure
    close_code: int | None = None


def chunks_ready(samples: int, lookahead_ms: int, chunk_ms: int) -> int:
    """Chunks the server can step from `samples` of 16 kHz audio (8x subsampling, chunked_limited)."""
    mel = max(0, min((samples - 200) // 160 + 1, samples // 160))  # OnlineMel: 25 ms window, 10 ms hop
    size = chunk_ms // 10
    first = size - 7
    return 0 if mel < first else 1 + (mel - first) // size


async def run_client(i: int, url: str, track: np.ndarray, offset: int, start_at: float, seconds: float,
                     lookahead_ms: int, all_sent: asyncio.Event, sent_count: list[int], n_clients: int,
                     stop_timeout: float) -> ClientResult:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    res = ClientResult()
    n_frames = int(round(seconds / FRAME_S))
    idx = (offset + np.arange(n_frames * FRAME_SAMPLES)) % len(track)
    audio = track[idx].tobytes()
    sent_at = np.full(n_frames, np.nan)
    t0_box: list[float] = []
    ready = asyncio.get_running_loop().create_future()
    stop_sent: list[float] = []
    streaming = [True]
    counted = [False]

    def done_sending() -> None:
        streaming[0] = False
        res.sent_at_end = res.frames_sent * FRAME_S
        if not counted[0]:
            counted[0] = True
            sent_count[0] += 1
            if sent_count[0] >= n_clients:
                all_sent.set()

    def frame_time(k: int) -> float:
        t = sent_at[k] if 0 <= k < n_frames else float("nan")
        if math.isnan(t):  # not sent (yet): its scheduled time
            t = t0_box[0] + (k + 1) * FRAME_S if t0_box else float("nan")
        return t

    async def reader(ws):
        try:
            async for raw in ws:
                now = time.monotonic()
                if not isinstance(raw, str):
                    continue
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "ready":
                    res.chunk_ms, res.lookahead_ms = msg.get("chunk_ms"), msg.get("lookahead_ms")
                    if not ready.done():
                        ready.set_result(now)
                elif kind in ("partial", "final"):
                    res.partials += kind == "partial"
                    res.finals += kind == "final"
                    if kind == "final" and msg.get("reason") in ("stop", "finalize"):
                        if stop_sent:
                            res.stop_latency = now - stop_sent[0]
                        continue
                    k = math.ceil(round(msg["end"] * SR) / FRAME_SAMPLES) - 1
                    if t0_box:
                        res.latencies.append(now - frame_time(k))
                        res.ends.append(msg["end"])
                    if streaming[0]:
                        res.results_in_stream += 1
                        res.covered_at_end = max(res.covered_at_end, msg["end"])
                elif kind == "error":
                    res.error = msg.get("code")
                    if not ready.done():
                        ready.set_exception(RuntimeError(f"error before ready: {msg}"))
        except ConnectionClosed:
            pass
        res.close_code = ws.close_code
        if not ready.done():
            ready.set_exception(RuntimeError(f"closed before ready ({ws.close_code})"))

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    try:
        async with connect(url, compression=None, open_timeout=60, max_size=1 << 22) as ws:
            t_start = time.monotonic()
            rd = asyncio.create_task(reader(ws))
            await ws.send(json.dumps({"type": "start", "sample_rate": SR, "encoding": "pcm_s16le",
                                      "lookahead_ms": lookahead_ms, "interim_results": True,
                                      "endpointing": False}))
            res.ready_latency = await asyncio.wait_for(ready, 60) - t_start
            t0 = time.monotonic()
            t0_box.append(t0)
            for k in range(n_frames):
                target = t0 + (k + 1) * FRAME_S
                delay = target - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if rd.done():  # the server closed the stream
                    break
                await ws.send(audio[k * FRAME_SAMPLES * 2:(k + 1) * FRAME_SAMPLES * 2])
                now = time.monotonic()
                sent_at[k] = now
                res.slips.append(now - target)
                res.frames_sent = k + 1
            done_sending()
            await all_sent.wait()  # the run's metrics are scraped at this point, then everyone stops
            await asyncio.sleep(0.05)
            if not rd.done():
                stop_sent.append(time.monotonic())
                try:
                    await ws.send(json.dumps({"type": "stop"}))
                    await asyncio.wait_for(asyncio.shield(rd), stop_timeout)
                except asyncio.TimeoutError:
                    res.error = res.error or "stop_timeout"
                except ConnectionClosed:
                    pass
            if not rd.done():
                rd.cancel()
    except InvalidStatus as exc:
        res.error = f"http_{exc.response.status_code}"
    except Exception as exc:  # noqa: BLE001 - counted and reported
        res.error = res.error or f"{type(exc).__name__}: {exc}"[:80]
    finally:
        done_sending()  # (a client that failed early must not hold the others back)
    return res


async def health_probe(host: str, port: int, stop: asyncio.Event, rtts: list[float]) -> None:
    while not stop.is_set():
        t = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await writer.drain()
            await reader.read()
            writer.close()
            rtts.append(time.monotonic() - t)
        except OSError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass


# ------------------------------------------------------------------------------------------
# one point
# ------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def hist_diff(before: dict, after: dict, name: str) -> tuple[dict[str, float], float, float]:
    """Per-bucket counts (non-cumulative), sum and count of a histogram between two scrapes."""
    def get(m, suffix, le=None):
        tot = 0.0
        for (n, labels), v in m.items():
            if n != name + suffix:
                continue
            d = dict(labels)
            if le is not None and d.get("le") != le:
                continue
            tot += v
        return tot

    les = sorted({dict(labels)["le"] for (n, labels) in after if n == name + "_bucket"},
                 key=lambda s: float("inf") if s == "+Inf" else float(s))
    buckets, prev = {}, 0.0
    for le in les:
        cum = get(after, "_bucket", le) - get(before, "_bucket", le)
        buckets[le] = cum - prev
        prev = cum
    return buckets, get(after, "_sum") - get(before, "_sum"), get(after, "_count") - get(before, "_count")


async def run_point_async(server: Server, tracks: list[np.ndarray], n: int, seconds: float, lookahead_ms: int,
                          chunk_s: float, seed: int, stop_timeout: float) -> dict:
    rng = random.Random(seed * 1000 + n)
    all_sent = asyncio.Event()
    sent_count = [0]
    probe_stop = asyncio.Event()
    rtts: list[float] = []
    before = await asyncio.to_thread(server.metrics)
    cpu0 = (server.cpu(), time.process_time(), machine_busy_seconds(), time.monotonic())
    base = time.monotonic() + 0.2
    tasks = []
    for i in range(n):
        track = tracks[i % len(tracks)]
        tasks.append(asyncio.create_task(run_client(
            i, server.url, track, rng.randrange(len(track)), base + i * chunk_s / n, seconds, lookahead_ms,
            all_sent, sent_count, n, stop_timeout)))
    probe = asyncio.create_task(health_probe("127.0.0.1", server.port, probe_stop, rtts))
    await all_sent.wait()
    mid = await asyncio.to_thread(server.metrics)
    cpu1 = (server.cpu(), time.process_time(), machine_busy_seconds(), time.monotonic())
    probe_stop.set()
    results: list[ClientResult] = await asyncio.gather(*tasks)
    await probe
    wall = cpu1[3] - cpu0[3]

    buckets, batch_sum, steps = hist_diff(before, mid, "chorus_step_batch_size")
    _, step_sum, _ = hist_diff(before, mid, "chorus_step_seconds")
    lat = [x for r in results for x in r.latencies]
    lat_late = [x for r in results for x, e in zip(r.latencies, r.ends) if e > 2.0]
    worst = max(((x, e) for r in results for x, e in zip(r.latencies, r.ends)), default=(float("nan"), None))
    sent_s = sum(r.frames_sent for r in results) * FRAME_S
    pulled_s = (sum(v for (k, _), v in mid.items() if k == "chorus_audio_seconds_total")
                - sum(v for (k, _), v in before.items() if k == "chorus_audio_seconds_total"))
    slips = [x for r in results for x in r.slips]
    chunk_ms = next((r.chunk_ms for r in results if r.chunk_ms), int(round(chunk_s * 1000)))
    la_ms = next((r.lookahead_ms for r in results if r.lookahead_ms is not None), lookahead_ms)
    available = sum(chunks_ready(r.frames_sent * FRAME_SAMPLES, la_ms, chunk_ms) for r in results)
    in_stream = sum(r.results_in_stream for r in results)
    errors: dict[str, int] = {}
    closes: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
        closes[str(r.close_code)] = closes.get(str(r.close_code), 0) + 1
    behind = available - batch_sum
    lags = [r.sent_at_end - r.covered_at_end for r in results if r.frames_sent]
    p95 = pct(lat, 95)
    kept_up = behind <= n  # at most one chunk per stream not yet stepped when sending ended
    ok = (not errors) and kept_up and bool(lat) and p95 < chunk_s
    stop_lat = [r.stop_latency for r in results if r.stop_latency is not None]
    return {
        "variant": server.name, "n": n, "seconds": seconds, "wall": round(wall, 2),
        "latency_ms": {"p50": pct(lat, 50) * 1e3, "p95": p95 * 1e3, "max": max(lat) * 1e3 if lat else float("nan"),
                       "count": len(lat), "max_at_end_s": worst[1], "p95_after_2s": pct(lat_late, 95) * 1e3},
        "audio_sent_s": round(sent_s, 2), "audio_pulled_s": round(pulled_s, 2),
        "backlog_s_per_stream": max(0, behind) * chunk_ms / 1000 / n,
        "results_per_s": in_stream / wall if wall else 0.0,
        "partials": sum(r.partials for r in results), "finals": sum(r.finals for r in results),
        "chunks_available": available, "chunks_stepped": int(batch_sum), "behind_chunks": int(behind),
        "no_result_chunks": max(0, int(batch_sum) - in_stream),
        "no_result_frac": max(0, batch_sum - in_stream) / batch_sum if batch_sum else float("nan"),
        "steps": int(steps), "mean_batch": batch_sum / steps if steps else float("nan"),
        "batch_buckets": {k: int(v) for k, v in buckets.items() if v},
        "max_batch_bucket": max((k for k, v in buckets.items() if v),
                                key=lambda s: float("inf") if s == "+Inf" else float(s), default=None),
        "mean_step_ms": step_sum / steps * 1e3 if steps else float("nan"),
        "step_busy": step_sum / wall if wall else float("nan"),
        "server_cores": (cpu1[0] - cpu0[0]) / wall, "client_cores": (cpu1[1] - cpu0[1]) / wall,
        "machine_cores": (cpu1[2] - cpu0[2]) / wall,
        "lag_max_s": max(lags) if lags else float("nan"),
        "send_slip_ms": {"p95": pct(slips, 95) * 1e3, "max": max(slips) * 1e3 if slips else float("nan")},
        "ready_ms_max": max((r.ready_latency for r in results if r.ready_latency is not None), default=float("nan")) * 1e3,
        "stop_final_ms": {"p50": pct(stop_lat, 50) * 1e3, "max": max(stop_lat) * 1e3 if stop_lat else float("nan")},
        "health_ms": {"p50": pct(rtts, 50) * 1e3, "p95": pct(rtts, 95) * 1e3,
                      "max": max(rtts) * 1e3 if rtts else float("nan"), "count": len(rtts)},
        "errors": errors, "close_codes": closes, "kept_up": kept_up, "ok": ok, "chunk_ms": chunk_ms,
    }


def run_point(server: Server, tracks, n, seconds, lookahead_ms, chunk_s, seed, stop_timeout) -> dict:
    server.wait_idle()
    out = asyncio.run(run_point_async(server, tracks, n, seconds, lookahead_ms, chunk_s, seed, stop_timeout))
    server.wait_idle()
    return out


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------
HEADER = (f"{'variant':>16} {'N':>3} | {'p50':>6} {'p95':>6} {'max':>6} ms | {'res/s':>6} {'nores':>5} | "
          f"{'batch':>5} {'maxb':>4} {'steps/s':>7} {'step ms':>7} {'busy':>5} | {'srv':>4} {'cli':>4} {'all':>4} cores"
          f" | {'behind':>6} {'bklg s':>6} {'pulled':>6} {'slip':>5} {'hlth':>5} | ok  errors")


def row(p: dict) -> str:
    lat = p["latency_ms"]
    err = ",".join(f"{k}x{v}" for k, v in p["errors"].items()) or "-"
    return (f"{p['variant']:>16} {p['n']:>3} | {lat['p50']:6.0f} {lat['p95']:6.0f} {lat['max']:6.0f} ms | "
            f"{p['results_per_s']:6.1f} {100 * p['no_result_frac']:4.0f}% | {p['mean_batch']:5.2f} "
            f"{str(p['max_batch_bucket']):>4} {p['steps'] / p['wall']:7.1f} {p['mean_step_ms']:7.1f} "
            f"{100 * p['step_busy']:4.0f}% | {p['server_cores']:4.2f} {p['client_cores']:4.2f} "
            f"{p['machine_cores']:4.2f} cores | {p['behind_chunks']:>6} {p['backlog_s_per_stream']:6.2f} "
            f"{100 * p['audio_pulled_s'] / max(p['audio_sent_s'], 1e-9):5.0f}% "
            f"{p['send_slip_ms']['p95']:5.1f} {p['health_ms']['p95']:5.1f} | {'yes' if p['ok'] else 'NO ':3} {err}")


def summarize(points: list[dict], variants: list[str], chunk_ms: int) -> dict:
    best = {}
    for v in variants:
        passed = [p["n"] for p in points if p["variant"] == v and p["ok"]]
        failed = [p["n"] for p in points if p["variant"] == v and not p["ok"]]
        best[v] = {"largest_n_ok": max(passed) if passed else 0, "smallest_n_failed": min(failed) if failed else None}
    print(f"\nlargest N with p95 latency < chunk ({chunk_ms} ms), server kept up, no errors:")
    for v in variants:
        b = best[v]
        more = f" (failed at {b['smallest_n_failed']})" if b["smallest_n_failed"] else " (never failed in the sweep)"
        print(f"  {v:>16}: {b['largest_n_ok']}{more}")
    if "batched" in variants and len(variants) > 1:
        ref = {p["n"]: p for p in points if p["variant"] == "batched"}
        for v in variants:
            if v == "batched":
                continue
            print(f"\n{v} / batched, per N (p95 latency ratio, inference-busy ratio, server CPU ratio):")
            for p in sorted((p for p in points if p["variant"] == v), key=lambda p: p["n"]):
                b = ref.get(p["n"])
                if not b:
                    continue
                print(f"  N={p['n']:>3}: p95 {p['latency_ms']['p95']:7.0f} / {b['latency_ms']['p95']:6.0f} ms = "
                      f"{p['latency_ms']['p95'] / b['latency_ms']['p95']:5.2f}x   busy "
                      f"{p['step_busy'] / b['step_busy']:5.2f}x   server CPU "
                      f"{p['server_cores'] / b['server_cores']:5.2f}x")
            nb, nu = best["batched"]["largest_n_ok"], best[v]["largest_n_ok"]
            print(f"  largest N: batched {nb} vs {v} {nu}" + (f" = {nb / nu:.2f}x" if nu else ""))
    return best


# ------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a .nemo to serve")
    src.add_argument("--random-size", choices=sorted(SIZES), help="build a seeded random model of this size")
    ap.add_argument("--write-model", type=Path, help="with --random-size: write the model here and exit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens-per-frame", type=float, default=0.25, help="calibration target for random models")
    ap.add_argument("--max-symbols", type=int, default=1, help="greedy RNNT labels per frame of random models")
    ap.add_argument("--clients", default="1,2,4,8,16,32,64",
                    help="comma-separated N; the sweep stops a variant at its first failing N")
    ap.add_argument("--no-stop", action="store_true", help="run every N even after a variant failed")
    ap.add_argument("--refine", type=int, default=0, help="bisection steps between the last pass and first fail")
    ap.add_argument("--seconds", type=float, default=20.0, help="audio each client streams per point")
    ap.add_argument("--lookahead-ms", type=int, default=480, help="0, 80, 480 or 1040 (chunks 80..1120 ms)")
    ap.add_argument("--variants", default="batched,unbatched", help=f"from {sorted(VARIANTS)}")
    ap.add_argument("--server-threads", type=int, default=None,
                    help="OMP/MKL threads of the server process (default: torch's default)")
    ap.add_argument("--warmup-seconds", type=float, default=4.0)
    ap.add_argument("--stop-timeout", type=float, default=20.0)
    ap.add_argument("--json", type=Path, help="write every point here")
    ap.add_argument("--baseline-root", type=Path,
                    help="another checkout of chorus (e.g. `git worktree add /tmp/before <commit>`): adds the "
                         "variant `before`, its batched server with default flags, to the same run")
    ap.add_argument("--step-capacity", default="1,2,4,8,12,16,24,32,48,64",
                    help="batch sizes B at which to time the batched step itself, in this process (the N at "
                         "which it reaches per-stream RTF 1 is what the server is compared with); '' to skip")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    workdir = Path(tempfile.mkdtemp(prefix="chorus-load-"))
    info: dict = {}
    try:
        if args.random_size:
            path = args.write_model or workdir / f"random-{args.random_size}.nemo"
            t = time.time()
            info = build_random_model(args.random_size, path, args.seed, args.tokens_per_frame, args.max_symbols)
            print(f"random {args.random_size} model: {json.dumps(info)} ({time.time() - t:.0f} s) -> {path}",
                  flush=True)
            if args.write_model:
                return 0
        else:
            path = args.model
        return sweep(args, path, workdir, info)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def sweep(args, model_path: Path, workdir: Path, info: dict) -> int:
    ns = [int(x) for x in args.clients.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if args.server_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.server_threads)
    threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                             capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores; server torch threads {threads}; "
          f"model {model_path.name} {json.dumps(info) if info else ''}")
    print(f"clients: 20 ms pcm_s16le frames at real time for {args.seconds:g} s, lookahead {args.lookahead_ms} ms, "
          f"interim results, no endpointing; variants {variants}", flush=True)
    tracks = load_sources(args.seed)
    flags = VARIANTS[variants[0]]
    beam = int(flags[flags.index("--beam") + 1]) if "--beam" in flags else None
    capacity = step_capacity(model_path, args.lookahead_ms, [int(b) for b in args.step_capacity.split(",") if b],
                             args.server_threads, beam) if args.step_capacity else None
    slots = max(ns) + 2
    servers = {v: Server(v, model_path, VARIANTS[v], slots, workdir, env) for v in variants}
    if args.baseline_root:
        base_env = dict(env, PYTHONPATH=str(args.baseline_root.resolve()))
        servers["before"] = Server("before", model_path, VARIANTS[variants[0]], slots, workdir, base_env,
                                   root=args.baseline_root)  # with the first variant's flags
        variants.append("before")
    points: list[dict] = []
    try:
        for s in servers.values():
            s.wait_up()
        chunk_ms = None
        for s in servers.values():  # warm up (first-call costs) and learn the chunk length
            w = run_point(s, tracks, 2, args.warmup_seconds, args.lookahead_ms, 0.5, args.seed + 99,
                          args.stop_timeout)
            if w["errors"]:
                print(f"warm-up on {s.name} had errors: {w['errors']}\n{s.log_tail()}", file=sys.stderr)
                return 1
            chunk_ms = w["chunk_ms"]
        chunk_s = chunk_ms / 1000
        print(f"chunk {chunk_ms} ms; a point passes when p95 < {chunk_ms} ms, the server kept up, no errors\n")
        print(HEADER, flush=True)
        alive = {v: True for v in variants}

        def measure(v: str, n: int) -> dict:
            p = run_point(servers[v], tracks, n, args.seconds, args.lookahead_ms, chunk_s, args.seed,
                          args.stop_timeout)
            points.append(p)
            print(row(p), flush=True)
            if p["errors"]:
                print(f"    close codes {p['close_codes']}", flush=True)
            return p

        for j, n in enumerate(ns):
            order = [v for v in variants if alive[v] or args.no_stop]
            if not order:
                break
            if j % 2:
                order.reverse()  # interleave, so drift does not favour one variant
            for v in order:
                p = measure(v, n)
                if not p["ok"]:
                    alive[v] = False
        for v in variants:  # bisect between the last pass and the first failure
            for _ in range(args.refine):
                ok = [p["n"] for p in points if p["variant"] == v and p["ok"]]
                bad = [p["n"] for p in points if p["variant"] == v and not p["ok"]]
                lo, hi = (max(ok) if ok else 0), (min(bad) if bad else None)
                if hi is None or hi - lo <= 1:
                    break
                measure(v, (lo + hi) // 2)
        best = summarize(points, variants, chunk_ms)
        if capacity:
            fits = [b for b, t in capacity["step_ms"].items() if t <= chunk_ms]
            capacity["n_rtf1"] = max(fits) if fits else 0
            print(f"\nthe batched step itself: per-stream RTF 1 (a step of B streams within the {chunk_ms} ms chunk) "
                  f"up to B = {capacity['n_rtf1']} (step ms by B: "
                  + ", ".join(f"{b}: {t:.0f}" for b, t in capacity["step_ms"].items()) + ")")
            for v in variants:
                n = best[v]["largest_n_ok"]
                if capacity["n_rtf1"]:
                    print(f"  {v:>16}: largest N {n} = {100 * n / capacity['n_rtf1']:.0f} % of it")
            best["step_capacity"] = capacity
        if args.json:
            args.json.write_text(json.dumps({"model": str(model_path), "model_info": info, "machine": cpu,
                                             "cores": os.cpu_count(), "server_torch_threads": threads,
                                             "seconds": args.seconds, "lookahead_ms": args.lookahead_ms,
                                             "chunk_ms": chunk_ms, "points": points, "best": best,
                                             "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    finally:
        for s in servers.values():
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
