"""Time to first audio and real-time factor of a Piper voice (default: en_US-joe-medium) on this machine.

One stream, a 3-sentence paragraph, text to float audio (espeak-ng front end included). Modes, in the same run:
one sentence per onnxruntime call (what `chorus speak` does by default and what --stream always does) and all
sentences in one padded batch. Each mode runs --repeats times after one warm-up; medians are printed.

    .venv/bin/python bench/tts_piper.py [--voice X.onnx] [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

from chorus.tts.piper import PiperVoice, normalize

PARAGRAPH = ("The quick brown fox jumps over the lazy dog. Streaming speech servers answer while the user is "
             "still talking, so every millisecond counts. This paragraph has three sentences of different lengths.")


def run(voice: PiperVoice, batch_size: int) -> tuple[float, float, float]:
    start = time.perf_counter()
    first = None
    seconds = 0.0
    for audio in voice.synthesize_ids(voice.sentence_ids(PARAGRAPH), batch_size=batch_size):
        audio = normalize(audio)
        if first is None:
            first = time.perf_counter() - start
        seconds += audio.size / voice.sample_rate
    took = time.perf_counter() - start
    return first, took / seconds, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voice", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    args = ap.parse_args()
    t = time.perf_counter()
    voice = PiperVoice(args.voice, threads=args.threads)
    print(f"voice {voice.model_path.name}: loaded in {time.perf_counter() - t:.2f} s, batching "
          f"{'possible' if voice.can_batch else 'not possible'}")
    t = time.perf_counter()
    n = len(voice.sentence_ids(PARAGRAPH))
    print(f"front end (espeak-ng + ids) for {n} sentences: {1000 * (time.perf_counter() - t):.0f} ms")
    for name, batch in (("one by one", 1), (f"batched ({n} in one call)", n)):
        run(voice, batch)  # warm-up
        results = [run(voice, batch) for _ in range(args.repeats)]
        ttfa = statistics.median(r[0] for r in results)
        rtf = statistics.median(r[1] for r in results)
        print(f"{name:28} first audio {1000 * ttfa:6.0f} ms   RTF {rtf:.3f}   ({results[0][2]:.2f} s of audio, "
              f"median of {args.repeats})")


if __name__ == "__main__":
    main()
