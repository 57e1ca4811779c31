"""/tts under load: time to first audio and real-time factor for 1, 4 and 16 concurrent clients, default voice.

Each configuration starts its own `chorus serve` (a subprocess: the clients' Python does not share the server's
GIL), batched (`--max-batch 64`: the ready streams of a round share one padded onnxruntime call) and one by one
(`--max-batch 1`), in the same run.  Every client opens /tts, sends the same 3-sentence paragraph as
bench/tts_piper.py in one `text` message and `stop`, and reads the audio.  Per client: time to first audio
(start of sending the text -> first audio frame), RTF (time to `done` / seconds of audio).  Medians over clients
and --repeats rounds are printed, with the p90 of the first-audio times and the server's audio throughput.

    .venv/bin/python bench/tts_server.py [--clients 1,4,16] [--repeats 2] [--voice X.onnx]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from websockets.asyncio.client import connect

PARAGRAPH = ("The quick brown fox jumps over the lazy dog. Streaming speech servers answer while the user is "
             "still talking, so every millisecond counts. This paragraph has three sentences of different lengths.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_batch: int, voice: str | None, slots: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "chorus.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--voice-slots", str(slots)]
    if voice:
        cmd += ["--no-default-voice", "--voice", voice]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"chorus serve exited with {proc.returncode}")
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("chorus serve did not start")


async def client(url: str) -> tuple[float, float, float]:
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start"}))
        ready = json.loads(await ws.recv())
        rate, width = ready["sample_rate"], 2
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "text", "text": PARAGRAPH}))
        await ws.send(json.dumps({"type": "stop"}))
        first, samples = None, 0
        async for m in ws:
            if isinstance(m, bytes):
                if first is None and m:
                    first = time.perf_counter() - t0
                samples += len(m) // width
            elif json.loads(m)["type"] == "done":
                took = time.perf_counter() - t0
        seconds = samples / rate
        return first, took / seconds, seconds


async def round_of(url: str, n: int) -> list[tuple[float, float, float]]:
    return await asyncio.gather(*(client(url) for _ in range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--voice", default=None, help="a Piper voice (default: the installed en_US-joe-medium)")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    print(f"{os.cpu_count()} CPUs; paragraph of {len(PARAGRAPH)} characters, 3 sentences; medians over clients "
          f"and {args.repeats} rounds")
    print(f"{'mode':12} {'clients':>7} {'first audio p50':>16} {'p90':>8} {'RTF p50':>8} {'audio s/s':>10}")
    for name, max_batch in (("batched", 64), ("max-batch 1", 1)):
        proc, port = start_server(max_batch, args.voice, max(counts))
        url = f"ws://127.0.0.1:{port}/tts"
        try:
            asyncio.run(round_of(url, 1))  # warm-up
            for n in counts:
                results, wall = [], 0.0
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    results += asyncio.run(round_of(url, n))
                    wall += time.perf_counter() - t
                firsts = sorted(r[0] for r in results)
                p90 = firsts[min(len(firsts) - 1, int(0.9 * len(firsts)))]
                audio = sum(r[2] for r in results)
                print(f"{name:12} {n:7d} {1000 * statistics.median(firsts):13.0f} ms {1000 * p90:5.0f} ms "
                      f"{statistics.median(r[1] for r in results):8.3f} {audio / wall:10.1f}", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
