"""RNNT beam search (with and without the n-gram LM) against greedy decoding, on the live streaming path.

    python bench/beam_search.py                                   # the bundled model and sample, 8 streams
    python bench/beam_search.py --manifest recipes/default_asr/work/corpus/test_mb-us2.json --limit 100

Every configuration streams the same files through `transcribe_files` (20 ms pieces, `--streams` at
once, so encoder steps are batched) and is timed `--repeats` times, interleaved; the figure is the
median CPU-seconds per audio second (real-time factor) and its ratio to greedy measured in the same
run.  With a manifest, WER (jiwer, normalised text) is printed too.  The encoder's share is the same
in every configuration; the difference is the search, which runs on the host.  Streams searched alike
advance together (one joint and one predictor call per frame for all of them); the `one by one` row is
the widest LM configuration with every stream advanced on its own, as before that batching.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chorus.asr.conformer.beam import RnntBeamSearch  # noqa: E402
from chorus.asr.evaluate import read_manifest  # noqa: E402
from chorus.asr.textnorm import normalize_text  # noqa: E402
from chorus.asr.conformer.checkpoint import load_fastconformer  # noqa: E402
from chorus.asr.conformer.family import ConformerModel, make_search  # noqa: E402
from chorus.asr.families import resolve_model_path  # noqa: E402
from chorus.asr.transcribe import transcribe_files  # noqa: E402
from chorus.stream.contract import StreamRequest  # noqa: E402


class OneByOne(RnntBeamSearch):
    """The same search with no two streams batched together (a new key each time): the baseline."""

    @property
    def batch_key(self) -> tuple:
        return (object(),)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the bundled model (with its bundled LM)")
    p.add_argument("--lm", default="auto", help="ARPA for the '+ lm' rows (default: the bundled one)")
    p.add_argument("--manifest", help="NeMo JSON-lines manifest (default: the bundled sample, --streams copies)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--streams", type=int, default=8, help="files streamed at once")
    p.add_argument("--beams", default="4,8,16")
    p.add_argument("--lookahead-ms", type=int, default=480)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_fastconformer(resolve_model_path(args.model), "cpu")
    if args.manifest:
        rows = read_manifest(args.manifest, args.limit)
        files, refs = [r["audio_filepath"] for r in rows], [normalize_text(r["text"]) for r in rows]
    else:
        files, refs = [str(ROOT / "chorus" / "samples" / "held_out_voice.flac")] * args.streams, None
    configs = {"greedy": None}
    for k in map(int, args.beams.split(",")):
        configs[f"beam {k}"] = make_search(loaded, beam_size=k, lm="none")
        with_lm = make_search(loaded, beam_size=k, lm=args.lm)
        if with_lm is not None and with_lm.lm is not None:
            configs[f"beam {k} + lm"] = with_lm
    last = list(configs)[-1]
    widest = configs[last]
    if widest is not None:
        configs[f"{last}, one by one"] = OneByOne(widest.joint, widest.predictor, widest.config, widest.lm)
    times: dict[str, list[float]] = {name: [] for name in configs}
    texts: dict[str, list[str]] = {}
    audio_seconds = 0.0
    for _ in range(args.repeats):
        for name, search in configs.items():  # interleaved, so drifts of the machine hit all alike
            start = time.process_time()
            engine = ConformerModel(loaded, search).make_engine(slots=args.streams)
            request = StreamRequest(lookahead_ms=args.lookahead_ms, decoder="rnnt")
            results = list(transcribe_files(engine, files, request, concurrency=args.streams))
            times[name].append(time.process_time() - start)
            texts[name] = [normalize_text(r.text) for r in results]
            audio_seconds = sum(r.duration for r in results)
    base = statistics.median(times["greedy"])
    print(f"{len(files)} files, {audio_seconds:.1f} s of audio, {args.streams} streams at once, "
          f"lookahead {args.lookahead_ms} ms, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'decoding':>26} {'CPU s':>8} {'RTF':>7} {'x greedy':>9}" + (f" {'WER':>7}" if refs else ""))
    for name in configs:
        t = statistics.median(times[name])
        line = f"{name:>26} {t:8.2f} {t / audio_seconds:7.4f} {t / base:9.2f}"
        if refs:
            import jiwer
            line += f" {100 * jiwer.wer(refs, texts[name]):6.2f}%"
        print(line)


if __name__ == "__main__":
    main()
