"""Intelligibility of a voice by round trip: synthesize held-out English sentences, transcribe them back, score WER.

The sentences below were written for this benchmark (not taken from any ASR model's training text; the bundled
FastConformer's corpus comes from fortunes, WordNet and GCIDE, see recipes/default_asr). Each is synthesized with
the voice (default: the installed default voice, Piper en_US-joe-medium) as `chorus speak` would (every segment
of the text, back to back, at the voice's rate), written to a WAV file, and transcribed by each ASR model exactly
as `chorus transcribe` runs it (`load_model`, `make_engine`, `transcribe_files`: the live streaming path with
the model's default decoding). Reference and hypothesis both go through `chorus.asr.textnorm.normalize_text`.
WER is the corpus WER (errors over reference words, jiwer), with the worst sentences printed for reading.

    .venv/bin/python bench/tts_roundtrip.py          # the default voice; the default ASR and the fastconformer
    .venv/bin/python bench/tts_roundtrip.py --asr default --asr whisper-tiny.en --voice X.onnx --keep /tmp/rt
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

SENTENCES = [
    "The train to the airport leaves every twenty minutes.",
    "Please close the window before you go to bed.",
    "My sister bought a red bicycle last summer.",
    "How many people are coming to dinner tonight?",
    "The library opens at nine in the morning.",
    "We walked along the river until the sun went down.",
    "Could you send me the report by Friday afternoon?",
    "The weather was cold, but the sky was clear.",
    "He forgot his keys in the kitchen again.",
    "A small dog was sleeping under the table.",
    "The meeting has been moved to the second floor.",
    "She plays the piano better than anyone I know.",
    "Turn left at the bank and walk two blocks.",
    "The children built a castle out of sand.",
    "I would like a cup of tea with milk, please.",
    "Our flight was delayed because of the storm.",
    "The museum is closed on Mondays.",
    "Why did the lights go out in the hall?",
    "He has lived in the same house for thirty years.",
    "The teacher asked the students to read the first chapter.",
    "There are seven days in a week and twelve months in a year.",
    "Fresh bread smells wonderful in the morning.",
    "The doctor told him to drink more water.",
    "We need three eggs, some flour and a little sugar.",
    "The phone rang while I was taking a shower.",
    "Somebody left the front door open all night.",
    "The new bridge will be finished next spring.",
    "Can you help me carry these boxes upstairs?",
    "The garden is full of roses and tall green grass.",
    "It took us four hours to drive to the coast.",
]


def synthesize(voice_path: str | None, out: Path) -> tuple[list[Path], float, str]:
    from chorus.tts.families import load_voice

    voice = load_voice(voice_path)
    files, seconds = [], 0.0
    for k, text in enumerate(SENTENCES):
        audio = np.concatenate(voice.synthesize(text))
        path = out / f"s{k:02d}.wav"
        sf.write(path, audio, voice.sample_rate, subtype="PCM_16")
        files.append(path)
        seconds += len(audio) / voice.sample_rate
    return files, seconds, voice.describe().get("voice", str(voice_path))


def transcribe(asr: str | None, files: list[Path]) -> tuple[str, list[str]]:
    from chorus.asr.families import load_model, resolve_model_path
    from chorus.asr.transcribe import transcribe_files

    model = load_model(asr)
    engine = model.make_engine(slots=8)
    texts = [r.text for r in transcribe_files(engine, [str(f) for f in files])]
    return str(resolve_model_path(asr)), texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voice", default=None, help="voice path (default: the installed default voice)")
    ap.add_argument("--asr", action="append", default=None,
                    help="ASR model: a path, a bundled name, or 'default' (repeatable; default: default, "
                         "fastconformer)")
    ap.add_argument("--worst", type=int, default=5)
    ap.add_argument("--keep", default=None, help="write the WAV files here (default: a temporary folder)")
    args = ap.parse_args()

    import jiwer

    from chorus.asr.textnorm import normalize_text

    tmp = None
    if args.keep:
        out = Path(args.keep)
        out.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory()
        out = Path(tmp.name)
    t = time.perf_counter()
    files, seconds, voice_name = synthesize(args.voice, out)
    print(f"voice {voice_name}: {len(files)} sentences, {seconds:.1f} s of audio, synthesized in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    refs = [normalize_text(s) for s in SENTENCES]
    for asr in args.asr or ["default", "fastconformer"]:
        t = time.perf_counter()
        name, hyps = transcribe(None if asr == "default" else asr, files)
        hyps = [normalize_text(h) for h in hyps]
        wer = jiwer.wer(refs, hyps)
        per = sorted(((jiwer.wer(r, h), r, h) for r, h in zip(refs, hyps)), reverse=True)
        exact = sum(r == h for r, h in zip(refs, hyps))
        print(f"\nASR {asr} ({name}): WER {100 * wer:.1f} % over {sum(len(r.split()) for r in refs)} words, "
              f"{exact}/{len(refs)} sentences exact, transcribed in {time.perf_counter() - t:.1f} s", flush=True)
        for w, r, h in per[:args.worst]:
            if w == 0:
                break
            print(f"  {100 * w:5.1f} %  ref: {r}\n          hyp: {h}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
