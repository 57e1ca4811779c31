#!/usr/bin/env python3
"""Stream the microphone (or an audio file) to a chorus server and print what it hears.

    python demos/mic.py                                  # microphone -> ws://127.0.0.1:8765/asr
    python demos/mic.py --url ws://host:8765/asr --token T --lookahead-ms 480 --decoder rnnt
    python demos/mic.py --option mode=window --option commit=agreement   # a model's own settings (see /models)
    python demos/mic.py --file talk.flac                 # a file, sent at real-time pace
    python demos/mic.py --file talk.flac --speed 4       # ... four times faster (0 = as fast as possible)
    python demos/mic.py --list-devices

The utterance in progress is shown in place on one terminal line (when stdout is a terminal); each
finished utterance is printed on its own line as "[start - end] text" (seconds since the first sample),
or "[start - end] (no speech)" when its final is empty (the last one, at Ctrl+C or the end of a file, often is).
Connection details and errors go to stderr.  Ctrl+C stops: the server sends the last result, then closes.
Exit status: 0 after a normal end, 1 when the server reports an error or the connection fails, 2 for
problems on this side (no such file, no audio library).

The microphone needs the optional `sounddevice` package (`pip install 'chorus[mic]'`) and the PortAudio
library (Debian/Ubuntu: `apt-get install libportaudio2`).  The protocol is docs/protocol.md (chorus.asr.v1);
this client uses only the `websockets` asyncio client.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidHandshake, InvalidStatus

EXIT_OK, EXIT_SERVER, EXIT_LOCAL = 0, 1, 2
NO_SPEECH = "(no speech)"  # shown for a final with empty text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Stream the microphone or a file to a chorus ASR server.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="ws://127.0.0.1:8765/asr", help="the server's WebSocket URL")
    p.add_argument("--token", default=os.environ.get("CHORUS_TOKEN"),
                   help="bearer token, if the server wants one (default: $CHORUS_TOKEN)")
    p.add_argument("--model", help="a model name from the server's /models (default: the server's default)")
    p.add_argument("--lookahead-ms", type=int, help="encoder lookahead, e.g. 0, 80, 480, 1040 (default: the model's)")
    p.add_argument("--decoder", help="decoder, one of the model's /models `decoders`: rnnt or ctc for a FastConformer, "
                                     "greedy for Whisper (default: the model's)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a model's own stream setting, sent in start.options (VALUE is JSON, else a string), e.g. "
                        "--option mode=window for Whisper; /models lists them")
    p.add_argument("--beam-size", type=int, help="rnnt: 1 = greedy, 2-16 = beam search (default: the model's)")
    p.add_argument("--no-endpointing", action="store_true",
                   help="no utterance ends on silence: the whole audio comes back as one final at the end")
    p.add_argument("--file", help="send this audio file (anything libsndfile reads) instead of the microphone")
    p.add_argument("--speed", type=float, default=1.0,
                   help="with --file: send this many times faster than real time (0 = no pacing)")
    p.add_argument("--frame-ms", type=int, default=20, help="audio per WebSocket frame, in milliseconds")
    p.add_argument("--device", help="microphone: input device (number or name substring; see --list-devices)")
    p.add_argument("--rate", type=int, help="microphone: sample rate to capture at (default: the device's)")
    p.add_argument("--list-devices", action="store_true", help="list the audio devices and exit")
    args = p.parse_args(argv)
    try:
        args.options = parse_options(args.option)
    except ValueError as exc:
        p.error(str(exc))
    if args.speed < 0:
        p.error("--speed must be >= 0")
    if not 5 <= args.frame_ms <= 1000:
        p.error("--frame-ms must be between 5 and 1000")
    if args.device is not None and args.device.isdigit():
        args.device = int(args.device)
    return args


# ------------------------------------------------------------------------------------------- output
class Display:
    """Partial text rewritten in place on one line; finals on their own lines."""

    def __init__(self, out=sys.stdout, err=sys.stderr):
        self.out, self.err = out, err
        self.live = out.isatty()  # in-place partials only make sense on a terminal
        self.dirty = False        # a partial is on the current line

    def _clear(self) -> None:
        if self.dirty:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.dirty = False

    def partial(self, text: str) -> None:
        if not self.live:
            return
        width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
        if len(text) > width:  # a wrapped line could not be rewritten with \r: show its tail
            text = "…" + text[-(width - 1):]
        self.out.write("\r" + text + "\x1b[K")
        self.out.flush()
        self.dirty = bool(text)

    def final(self, msg: dict) -> None:
        self._clear()
        text = msg.get("text") or NO_SPEECH  # finalize/stop finals may be empty: say so, not nothing
        self.out.write(f"[{_fmt_time(msg.get('start'))} - {_fmt_time(msg.get('end'))}] {text}\n")
        self.out.flush()

    def info(self, line: str) -> None:
        self._clear()
        self.err.write(line + "\n")
        self.err.flush()


def _fmt_time(t) -> str:
    return f"{t:7.2f}" if isinstance(t, (int, float)) else "      ?"


# -------------------------------------------------------------------------------------------- audio
async def file_frames(path: str, frame_ms: int, speed: float):
    """(sample_rate, async iterator of pcm_s16le frames) for an audio file, paced at `speed` x real time."""
    try:
        from chorus.codecs import encode, read_audio
    except ImportError:  # run from a checkout without installing: use the repository next to this file
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from chorus.codecs import encode, read_audio
    audio, rate = read_audio(path)
    data = encode(audio, "pcm_s16le")
    samples = max(1, rate * frame_ms // 1000)  # per frame
    step = 2 * samples  # bytes per frame

    async def frames():
        t0 = time.monotonic()
        for n, i in enumerate(range(0, len(data), step), start=1):
            yield data[i:i + step]
            if speed > 0:  # sleep until this frame's end, measured from the start (no drift)
                delay = t0 + n * samples / rate / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)

    return rate, frames()


def import_sounddevice():
    """The optional microphone library, or None after saying what is missing."""
    try:
        import sounddevice
    except ImportError:
        print("The microphone needs the 'sounddevice' package: pip install 'chorus[mic]' "
              "(or pip install sounddevice). To send a file instead, use --file AUDIO.", file=sys.stderr)
        return None
    except OSError as exc:  # sounddevice is there but libportaudio is not
        print(f"sounddevice could not load the PortAudio library ({exc}). Install it "
              "(Debian/Ubuntu: apt-get install libportaudio2; macOS: brew install portaudio), "
              "or use --file AUDIO.", file=sys.stderr)
        return None
    return sounddevice


async def mic_frames(sd, device, rate: int | None, frame_ms: int, stopping: asyncio.Event):
    """(sample_rate, async iterator of pcm_s16le frames) from the microphone, until `stopping` is set."""
    if rate is None:
        rate = int(sd.query_devices(device, "input")["default_samplerate"])
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    overflows = 0

    def callback(indata, frames, time_info, status):  # on PortAudio's thread
        nonlocal overflows
        if status.input_overflow:
            overflows += 1
        loop.call_soon_threadsafe(queue.put_nowait, bytes(indata))

    stream = sd.RawInputStream(samplerate=rate, channels=1, dtype="int16", device=device,
                               blocksize=max(1, rate * frame_ms // 1000), callback=callback)

    async def frames():
        with stream:
            waiter = asyncio.ensure_future(stopping.wait())
            try:
                while not stopping.is_set():
                    getter = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        yield getter.result()
                    else:
                        getter.cancel()
            finally:
                waiter.cancel()
        while not queue.empty():  # what was captured before the stream closed
            yield queue.get_nowait()
        if overflows:
            print(f"warning: the microphone overflowed {overflows} times (audio was lost)", file=sys.stderr)

    return rate, frames()


# ----------------------------------------------------------------------------------------- protocol
def start_message(args: argparse.Namespace, rate: int) -> dict:
    msg = {"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "interim_results": True}
    if args.model:
        msg["model"] = args.model
    if args.lookahead_ms is not None:
        msg["lookahead_ms"] = args.lookahead_ms
    if args.decoder:
        msg["decoder"] = args.decoder
    if args.beam_size:
        msg["beam_size"] = args.beam_size
    if args.no_endpointing:
        msg["endpointing"] = False
    if args.options:
        msg["options"] = args.options
    return msg


def parse_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--option {item!r}: write NAME=VALUE")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


async def stream(args: argparse.Namespace, rate: int, frames, display: Display, hint: str = "") -> int:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    try:
        ws = await connect(args.url, additional_headers=headers, compression=None, open_timeout=20,
                           max_size=None)
    except InvalidStatus as exc:
        status = exc.response.status_code
        why = {401: "missing or wrong token (--token)", 403: "origin not allowed",
               503: "too many connections, try again later"}.get(status, "")
        display.info(f"error: the server refused the connection: HTTP {status} {why}".rstrip())
        return EXIT_SERVER
    except (OSError, InvalidHandshake, asyncio.TimeoutError, ValueError) as exc:
        display.info(f"error: could not connect to {args.url}: {exc}")
        return EXIT_SERVER

    error: dict | None = None

    async def send_audio():
        try:
            await ws.send(json.dumps(start_message(args, rate)))
            async for frame in frames:  # audio may follow `start` at once: the server keeps it in order
                await ws.send(frame)
            await ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:
            pass  # the receiver reports why

    sender = asyncio.create_task(send_audio())
    try:
        async for raw in ws:
            if not isinstance(raw, str):
                continue
            msg = json.loads(raw)
            kind = msg.get("type")
            if kind == "ready":
                display.info(f"connected: model {msg['model']}, {msg['decoder']} beam {msg.get('beam_size', 1)}"
                             f"{' + lm' if msg.get('lm') else ''}, lookahead {msg['lookahead_ms']} ms "
                             f"(chunk {msg['chunk_ms']} ms)"
                             + "".join(f", {k} {v}" for k, v in (msg.get("options") or {}).items())
                             + f", sending {rate} Hz pcm_s16le; stream {msg['stream_id']}")
                if hint:
                    display.info(hint)
            elif kind == "partial":
                display.partial(msg.get("text", ""))
            elif kind == "final":
                display.final(msg)
            elif kind == "error":
                error = msg
                display.info(f"error: {msg.get('code')}: {msg.get('message')}")
                break  # the stream is over; the close follows
            # other types: newer protocol additions, ignored
    except ConnectionClosedError:
        pass
    finally:
        sender.cancel()
        try:
            await sender
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the receiver reports what went wrong
            pass
        if error is None:
            await ws.close()
        else:
            # The server closes right after an `error`, but when audio it did not read is still queued it
            # may not read our reply to its close frame and holds the TCP connection open for its close
            # timeout (10 s): do not wait for that.
            try:
                await asyncio.wait_for(ws.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                ws.transport.abort()
                await ws.wait_closed()
    code = ws.close_code
    if error is not None:
        display.info(f"closed by the server: {code} {ws.close_reason or ''}".rstrip())
        return EXIT_SERVER
    if code != 1000:
        display.info(f"error: the connection closed with code {code} {ws.close_reason or ''}".rstrip())
        return EXIT_SERVER
    return EXIT_OK


async def main_async(args: argparse.Namespace) -> int:
    display = Display()
    if args.file:
        try:
            rate, frames = await file_frames(args.file, args.frame_ms, args.speed)
        except (OSError, ValueError) as exc:
            display.info(f"error: {exc}")
            return EXIT_LOCAL
        return await stream(args, rate, frames, display)

    sd = import_sounddevice()
    if sd is None:
        return EXIT_LOCAL
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_interrupt():
        if stopping.is_set():  # a second Ctrl+C: give up at once
            raise SystemExit(130)
        display.info("stopping (Ctrl+C again to quit at once)…")
        stopping.set()

    try:
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    except (NotImplementedError, RuntimeError):  # e.g. Windows: Ctrl+C ends the program
        pass
    try:
        rate, frames = await mic_frames(sd, args.device, args.rate, args.frame_ms, stopping)
    except Exception as exc:  # noqa: BLE001 - PortAudio errors are plain exceptions
        display.info(f"error: could not open the microphone: {exc} (is there one? see --list-devices)")
        return EXIT_LOCAL
    return await stream(args, rate, frames, display, hint="listening: speak, then press Ctrl+C to stop")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_devices:
        sd = import_sounddevice()
        if sd is None:
            return EXIT_LOCAL
        devices = sd.query_devices()
        print(devices if len(devices) else "no audio devices found")
        return EXIT_OK
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
