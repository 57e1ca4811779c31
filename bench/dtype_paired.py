"""Per-utterance comparison of a FastConformer's fp32 and another compute dtype on a manifest.

    python bench/dtype_paired.py MANIFEST [--dtype bf16] [--model fastconformer] [--lookahead-ms 480]

Streams every file of the manifest through fp32 and through --dtype (the live path, as `chorus eval`), with
greedy RNNT, greedy CTC and beam 8 (+ the model's LM), and counts the utterances only one of the two got right.
A two-sided sign test on those discordant utterances says whether the WER difference could be chance: on a set
of short utterances a WER change of a few utterances is often not distinguishable from zero.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chorus.asr.evaluate import normalize_for_scoring, read_manifest  # noqa: E402
from chorus.asr.families import load_model  # noqa: E402
from chorus.asr.transcribe import transcribe_files  # noqa: E402
from chorus.stream.contract import StreamRequest  # noqa: E402

DECODINGS = (("rnnt", 1), ("ctc", 1), ("rnnt", 8))


def sign_test(a: int, b: int) -> float:
    """Two-sided p of a and b discordant counts under equal chances."""
    n, k = a + b, min(a, b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "int8"])
    ap.add_argument("--model", default="fastconformer")
    ap.add_argument("--lookahead-ms", type=int, default=480)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = read_manifest(args.manifest)
    files = [r["audio_filepath"] for r in rows]
    refs = [normalize_for_scoring(r["text"]) for r in rows]
    hyps = {}
    for dtype in ("fp32", args.dtype):
        engine = load_model(args.model, "cpu", dtype=dtype).make_engine(slots=8)
        for decoder, beam in DECODINGS:
            request = StreamRequest(lookahead_ms=args.lookahead_ms, decoder=decoder, beam_size=beam)
            hyps[dtype, decoder, beam] = [normalize_for_scoring(r.text)
                                          for r in transcribe_files(engine, files, request, concurrency=8)]
    print(f"{args.manifest}: {len(rows)} utterances, {args.lookahead_ms} ms, fp32 against {args.dtype}")
    for decoder, beam in DECODINGS:
        right = {d: [h == r for h, r in zip(hyps[d, decoder, beam], refs)] for d in ("fp32", args.dtype)}
        only_fp32 = sum(x and not y for x, y in zip(right["fp32"], right[args.dtype]))
        only_other = sum(y and not x for x, y in zip(right["fp32"], right[args.dtype]))
        print(f"{decoder} beam {beam}: right fp32 {sum(right['fp32'])}, {args.dtype} {sum(right[args.dtype])}; "
              f"only fp32 right {only_fp32}, only {args.dtype} right {only_other}; "
              f"sign test p = {sign_test(only_fp32, only_other):.2f}", flush=True)


if __name__ == "__main__":
    main()
