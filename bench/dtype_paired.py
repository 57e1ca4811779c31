"""Per-utterance comparison of a FastConformer's fp32 and another compute dtype on a manifest.

    python bench/dtype_paired.py MANIFEST [--dtype bf16] [--kv-dtype int8] [--model fastconformer] [--lookahead-ms 480]
    python bench/dtype_paired.py flite-awb [--dtype bf16]
    python bench/dtype_paired.py flite-awb-docs [--sentences 200] [--dtype bf16]

`flite-awb` instead of a manifest: the 50 English sentences of bench/tts_roundtrip.py and
bench/whisper_streaming.py spoken by flite's awb voice (one of the bundled FastConformer's held-out voices),
synthesized into a temporary directory (needs the `flite` program).  `flite-awb-docs`: more sentences for the
same voice, from the English prose of Python's own documentation (`pydoc_data.topics`, shipped with CPython):
plain sentences of 6-20 words, de-duplicated, shuffled with a fixed seed, the first --sentences of them.  Their
words are mostly outside what the bundled model learned, so its WER there is high; what matters here is the
paired difference between two dtypes on the same audio, and 200 sentences make it four times as precise as 50.

Streams every file of the manifest through fp32 and through --dtype (the live path, as `chorus eval`), with
greedy RNNT, greedy CTC and beam 8 (+ the model's LM), and prints each WER, then per utterance: how many had
more word errors in --dtype than in fp32 and how many fewer.  A two-sided sign test on those says whether the
WER difference could be chance: on a set of short utterances a change of a few words is often not
distinguishable from zero.  `--kv-dtype int8` compares the K/V state in int8 instead (with `--dtype fp32`, fp32
compute against fp32 compute); `--show-changes` lists the utterances whose errors changed.

The bundled model's own held-out test sets (the recipe's 300 sentences in the voices mb-us2 and awb, and FSDD
nicolas) are made by `recipes/default_asr/make_corpus.py --test-only` (~3 minutes; needs espeak-ng, the mbrola-us2
voice and flite, and the recipe's Debian text packages); their manifests go straight in here.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jiwer
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chorus.asr.evaluate import normalize_for_scoring, read_manifest  # noqa: E402
from chorus.asr.families import load_model  # noqa: E402
from chorus.asr.transcribe import transcribe_files  # noqa: E402
from chorus.stream.contract import StreamRequest  # noqa: E402

DECODINGS = (("rnnt", 1), ("ctc", 1), ("rnnt", 8))


def word_errors(ref: str, hyp: str) -> int:
    """Substitutions, deletions and insertions (jiwer's alignment, as `chorus eval` scores)."""
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions


def sign_test(a: int, b: int) -> float:
    """Two-sided p of a and b discordant counts under equal chances."""
    n, k = a + b, min(a, b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def bench_sentences() -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tts_roundtrip import SENTENCES as ROUNDTRIP
    from whisper_streaming import SENTENCES as STREAMING
    return list(ROUNDTRIP) + list(STREAMING)


def docs_sentences(count: int) -> list[str]:
    """`count` plain English sentences of Python's documentation (letters, spaces, commas, apostrophes)."""
    from pydoc_data.topics import topics
    text = re.sub(r"\s+", " ", " ".join(topics[k] for k in sorted(topics)))
    plain = [s for s in re.split(r"(?<=[.!?])\s+", text)
             if re.fullmatch(r"[A-Z][a-z][A-Za-z ,']*[a-z]\.", s) and 6 <= len(s.split()) <= 20]
    plain = list(dict.fromkeys(plain))
    random.Random(0).shuffle(plain)
    return plain[:count]


def flite_awb_manifest(directory: Path, sentences: list[str]) -> Path:
    manifest = directory / "flite_awb.json"
    with open(manifest, "w") as f:
        for i, text in enumerate(sentences):
            path = directory / f"{i:03d}.wav"
            subprocess.run(["flite", "-voice", "awb", "-t", text, "-o", str(path)], check=True)
            f.write(json.dumps({"audio_filepath": str(path), "text": text}) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest", help="a chorus eval manifest, or flite-awb, or flite-awb-docs")
    ap.add_argument("--sentences", type=int, default=200, help="flite-awb-docs: how many sentences")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "int8"])
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "int8"],
                    help="the compared run's K/V state (int8: KIVI's layout, `--kv-dtype int8`)")
    ap.add_argument("--model", default="fastconformer")
    ap.add_argument("--lookahead-ms", type=int, default=480)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--show-changes", action="store_true",
                    help="print the reference and both hypotheses of each utterance whose errors changed")
    args = ap.parse_args()
    variant = args.dtype + ("" if args.kv_dtype == "auto" else f"+kv-{args.kv_dtype}")
    if variant == "fp32":
        ap.error("compare fp32 with another --dtype or with --kv-dtype int8")
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    if args.manifest in ("flite-awb", "flite-awb-docs"):
        sentences = bench_sentences() if args.manifest == "flite-awb" else docs_sentences(args.sentences)
        manifest = flite_awb_manifest(Path(tmp.name), sentences)
    else:
        manifest = args.manifest
    rows = read_manifest(manifest)
    files = [r["audio_filepath"] for r in rows]
    refs = [normalize_for_scoring(r["text"]) for r in rows]
    hyps = {}
    for name, dtype, kv_dtype in (("fp32", "fp32", "auto"), (variant, args.dtype, args.kv_dtype)):
        engine = load_model(args.model, "cpu", dtype=dtype, kv_dtype=kv_dtype).make_engine(slots=8)
        for decoder, beam in DECODINGS:
            request = StreamRequest(lookahead_ms=args.lookahead_ms, decoder=decoder, beam_size=beam)
            hyps[name, decoder, beam] = [normalize_for_scoring(r.text)
                                         for r in transcribe_files(engine, files, request, concurrency=8)]
    print(f"{args.manifest}: {len(rows)} utterances, {args.lookahead_ms} ms, fp32 against {variant}")
    words = sum(len(r.split()) for r in refs)
    for decoder, beam in DECODINGS:
        errors = {d: [word_errors(r, h) for r, h in zip(refs, hyps[d, decoder, beam])] for d in ("fp32", variant)}
        wer = {d: 100 * sum(e) / words for d, e in errors.items()}
        worse = sum(b > a for a, b in zip(errors["fp32"], errors[variant]))
        better = sum(b < a for a, b in zip(errors["fp32"], errors[variant]))
        print(f"{decoder} beam {beam}: WER fp32 {wer['fp32']:.2f} %, {variant} {wer[variant]:.2f} % "
              f"({wer[variant] - wer['fp32']:+.2f} points); utterances with more errors in {variant} {worse}, "
              f"fewer {better}; sign test p = {sign_test(worse, better):.2f}", flush=True)
        if args.show_changes:
            for i, (a, b) in enumerate(zip(errors["fp32"], errors[variant])):
                if a != b:
                    print(f"  {files[i]}: {a} -> {b} errors\n    ref:  {refs[i]}\n    fp32: "
                          f"{hyps['fp32', decoder, beam][i]}\n    {variant}: {hyps[variant, decoder, beam][i]}")


if __name__ == "__main__":
    main()
