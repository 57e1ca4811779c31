"""chorus command line: `chorus transcribe`, `chorus serve`, `chorus eval`."""
from __future__ import annotations

import argparse
import json
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="path to a NeMo cache-aware FastConformer .nemo (default: the bundled model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def cmd_transcribe(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .asr.conformer.streaming import ConformerStreamer
    from .asr.transcribe import load_model, transcribe_files

    loaded = load_model(args.model, args.device)
    engine = ConformerStreamer(loaded.model, slots=args.concurrency, device=loaded.model.device)
    if args.lookahead_ms is not None:
        engine.setting_for_lookahead(args.lookahead_ms)  # fail early with the choices
    if args.decoder and args.decoder not in loaded.model.decoders:
        print(f"error: decoder {args.decoder!r} is not in this model (has {list(loaded.model.decoders)})",
              file=sys.stderr)
        return 2
    show_bar = len(args.files) > 1 and not args.chunk_stream and sys.stderr.isatty()
    bar = tqdm(total=len(args.files), unit="file", disable=not show_bar, file=sys.stderr)

    def on_chunk(name, stream):
        print(f"\r[{name}] {stream.seconds_decoded:6.2f}s {stream.text}", file=sys.stderr, flush=True)

    failures = 0
    for result in transcribe_files(loaded, engine, args.files, lookahead_ms=args.lookahead_ms,
                                   decoder=args.decoder, concurrency=args.concurrency,
                                   on_chunk=on_chunk if args.chunk_stream else None):
        bar.update(1)
        failures += result.error is not None
        if args.json:
            print(json.dumps(result.as_json()), flush=True)
        elif result.error:
            print(f"{result.file}: error: {result.error}", file=sys.stderr)
        elif len(args.files) > 1:
            bar.write(f"{result.file}: {result.text}")
        else:
            print(result.text, flush=True)
    bar.close()
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus", description="real-time streaming speech recognition")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", help="transcribe audio files through the live streaming path")
    t.add_argument("files", nargs="+", metavar="FILE", help="WAV, FLAC, OGG (any rate, mono or multi-channel)")
    _add_model_args(t)
    t.add_argument("--lookahead-ms", type=int, default=None, metavar="MS",
                   help="attention lookahead; NeMo multi-lookahead models offer 0, 80, 480 and 1040 "
                        "(default: the model's first setting)")
    t.add_argument("--decoder", choices=["rnnt", "ctc"], default=None,
                   help="which head of a hybrid model to decode with (default: rnnt when present)")
    t.add_argument("--chunk-stream", action="store_true",
                   help="show the hypothesis after every chunk, as a live caption (on stderr)")
    t.add_argument("--json", action="store_true", help="print one JSON object per file")
    t.add_argument("--concurrency", type=int, default=8, help="files streamed (and batched) at once")
    t.set_defaults(func=cmd_transcribe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # bad paths, bad checkpoints: one clear line
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
