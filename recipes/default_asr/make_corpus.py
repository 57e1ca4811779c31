"""Build the synthetic English ASR corpus: 16 kHz mono FLAC clips and NeMo-style JSON-lines manifests.

    python recipes/default_asr/make_corpus.py --hours 40 --workers 2          # full build (hours of train audio)
    python recipes/default_asr/make_corpus.py --smoke                          # a few clips per split, seconds
    python recipes/default_asr/make_corpus.py --test-only                      # the held-out test sets only

Output (default ``recipes/default_asr/work/corpus``, git-ignored; ``--smoke`` defaults to ``work/corpus_smoke``):

    train.json               training voices x training sentences, plus synthetic spoken digits (isolated and in
                             short strings, --digit-clips) and FSDD george / jackson / lucas
    dev.json                 training voices x ~300 held-out sentences, plus a few FSDD takes of the same speakers
    test_mb-us2.json         held-out voice espeak-ng mb-us2 x ~300 held-out test sentences
    test_awb.json            held-out voice flite awb x the same test sentences
    test_fsdd_nicolas.json   FSDD speaker nicolas (real speech, never in train or dev)
    <split>/NNN/NNNNNNN.flac clips; fsdd/<speaker>/*.flac
    sentences.tsv            the sentence list (cache), failures.jsonl, voices.json, summary.json

Each manifest line is ``{"audio_filepath", "duration", "text", "voice", ...}``; ``audio_filepath`` is relative to
the manifest's directory (NeMo resolves relative paths that way) and ``text`` is
:func:`chorus.asr.textnorm.normalize_text` output. Sentences of dev and test never occur in train; the held-out
voices (``voices.HELD_OUT``) never occur in train or dev.

The build is deterministic under ``--seed`` (each clip's voice, rate and pitch come from a generator seeded by
(seed, split, index)) and resumable: clips already on disk are kept and the manifests are rebuilt from what
exists. Train clips are made in sentence order until their total duration reaches ``--hours``; the train
manifest is that prefix. Synthesis failures are recorded in failures.jsonl and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import text_sources  # noqa: E402
import voices as voicelib  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

SR = voicelib.SAMPLE_RATE
SPLIT_CODES = {"train": 1, "dev": 2, "test_mb-us2": 3, "test_awb": 4, "train_digits": 5}
TEST_VOICE_SPLITS = {"mb-us2": "test_mb-us2", "awb": "test_awb"}  # voices.HELD_OUT key -> split
FSDD_TRAIN_SPEAKERS = ("george", "jackson", "lucas")
FSDD_TEST_SPEAKER = "nicolas"
FSDD_DEV_TAKES = (0, 1)  # takes 0 and 1 of every digit of the training speakers go to dev
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# per-utterance prosody (log-uniform): training and dev voices, and the held-out test voices (milder)
RATE_RANGE = (0.8, 1.3)
PITCH_RANGE = (0.82, 1.22)
TEST_RATE_RANGE = (0.9, 1.15)
TEST_PITCH_RANGE = (0.9, 1.1)
# a clip is rejected when its length per word is outside this range (seconds per word) or it is this quiet
SEC_PER_WORD = (0.12, 1.6)
MIN_RMS = 0.003
BATCH = 64


def log(msg: str) -> None:
    print(msg, flush=True)


def progress(total: float, desc: str, unit: str = "clip"):
    if tqdm is None:
        return None
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5 if interactive else 60,
                file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# sentences


def load_or_build_sentences(out: Path, seed: int, max_words: int, smoke: bool) -> list[text_sources.Sentence]:
    cache = out / "sentences.tsv"
    key = f"# seed={seed} max_words={max_words} smoke={int(smoke)} v=1"
    if cache.exists():
        with open(cache, encoding="utf-8") as f:
            head = f.readline().rstrip("\n")
            if head == key:
                sents = []
                for line in f:
                    source, text, tts = line.rstrip("\n").split("\t")
                    sents.append(text_sources.Sentence(text=text, tts=tts, source=source))
                log(f"sentences: {len(sents)} from cache {cache}")
                return sents
    sents, stats = text_sources.build_sentences(seed=seed, max_words=max_words, smoke=smoke)
    log(f"{'source':<18}{'candidates':>12}{'kept':>10}")
    for k, v in stats.items():
        log(f"{k:<18}{v['candidates']:>12}{v['kept']:>10}")
    log(f"{'total':<18}{sum(v['candidates'] for v in stats.values()):>12}{len(sents):>10}")
    tmp = cache.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(key + "\n")
        for s in sents:
            f.write(f"{s.source}\t{s.text}\t{s.tts}\n")
    os.replace(tmp, cache)
    with open(out / "sentence_sources.json", "w") as f:
        json.dump(stats, f, indent=1)
    return sents


# ----------------------------------------------------------------------------------------------------------------
# workers

_VOICES: dict[str, voicelib.Voice] = {}


def _worker_init() -> None:
    global _VOICES
    _VOICES = {v.name: v for v in voicelib.all_voices()}
    try:
        os.nice(0)
    except OSError:
        pass


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def clip_relpath(split: str, index: int) -> str:
    return f"{split}/{index // 1000:03d}/{index:07d}.flac"


def synth_job(job: dict) -> dict:
    """Make (or find) one clip. Returns the manifest record, or a record with "error"."""
    out = Path(job["out"])
    path = out / job["audio_filepath"]
    rec = {k: job[k] for k in ("audio_filepath", "text", "voice", "rate", "pitch", "source", "split", "index")}
    try:
        if path.exists():
            rec["duration"] = round(sf.info(str(path)).frames / SR, 3)
            return rec
        voice = _VOICES[job["voice"]]
        assert not voice.held_out or job["split"].startswith("test_"), "held-out voice outside a test split"
        audio, sr = voice.synthesize(job["tts"], job["rate"], job["pitch"])
        assert sr == SR
        dur = audio.size / SR
        n_words = len(job["text"].split())
        rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
        if not (SEC_PER_WORD[0] * n_words <= dur <= SEC_PER_WORD[1] * n_words + 1.0):
            raise RuntimeError(f"implausible duration {dur:.2f} s for {n_words} words")
        if rms < MIN_RMS:
            raise RuntimeError(f"nearly silent clip (rms {rms:.4f})")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.flac")
        sf.write(str(tmp), audio, SR, format="FLAC", subtype="PCM_16")
        os.replace(tmp, path)
        rec["duration"] = round(dur, 3)
        return rec
    except Exception as e:  # noqa: BLE001 - record and move on
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
        return rec


def make_job(out: Path, split: str, index: int, sentence: text_sources.Sentence, voice_names: list[str],
             weights: np.ndarray | None, seed: int) -> dict:
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    if len(voice_names) == 1:
        voice = voice_names[0]
    else:
        voice = voice_names[int(rng.choice(len(voice_names), p=weights))]
    test = split.startswith("test_")
    rate = _log_uniform(rng, *(TEST_RATE_RANGE if test else RATE_RANGE))
    pitch = _log_uniform(rng, *(TEST_PITCH_RANGE if test else PITCH_RANGE))
    return {"out": str(out), "split": split, "index": index, "audio_filepath": clip_relpath(split, index),
            "text": sentence.text, "tts": sentence.tts, "source": sentence.source, "voice": voice,
            "rate": round(rate, 3), "pitch": round(pitch, 3)}


class Runner:
    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.pool = None
        if self.workers > 1:
            self.pool = get_context("fork").Pool(self.workers, initializer=_worker_init)
        else:
            _worker_init()

    def map(self, jobs: list[dict]):
        if self.pool is None:
            return map(synth_job, jobs)
        return self.pool.imap(synth_job, jobs, chunksize=1)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def digit_sentences(n: int, seed: int) -> list[text_sources.Sentence]:
    """n spoken-digit utterances: two thirds a single digit word (each digit equally often), the rest strings
    of 2-5 digits as in PINs and phone numbers. The sentence sources have digit words only inside sentences;
    these teach the short, isolated words that FSDD has from three speakers only."""
    rng = random.Random(seed * 7919 + 5)
    n_single = 2 * n // 3
    texts = [DIGIT_WORDS[i % 10] for i in range(n_single)]
    texts += [" ".join(rng.choice(DIGIT_WORDS) for _ in range(rng.randint(2, 5))) for _ in range(n - n_single)]
    return [text_sources.Sentence(text=t, tts=t, source="digits") for t in texts]


def run_fixed_split(runner: Runner, jobs: list[dict], desc: str, failures: list[dict]) -> list[dict]:
    recs = []
    bar = progress(len(jobs), desc)
    for rec in runner.map(jobs):
        if "error" in rec:
            failures.append(rec)
        else:
            recs.append(rec)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return recs


def run_train(runner: Runner, out: Path, sentences: list[text_sources.Sentence], voice_names: list[str],
              weights: np.ndarray, seed: int, target_s: float, max_clips: int | None,
              failures: list[dict]) -> list[dict]:
    """Clips in sentence order until their total duration reaches target_s (or max_clips)."""
    recs: list[dict] = []
    total = 0.0
    bar = progress(round(target_s / 3600, 2) if max_clips is None else max_clips, "train",
                   unit="h" if max_clips is None else "clip")
    t0 = time.time()
    made = 0
    index = 0
    done = False
    last_log = t0
    while not done and index < len(sentences):
        n = BATCH if max_clips is None else min(BATCH, max_clips - len(recs))
        jobs = [make_job(out, "train", i, sentences[i], voice_names, weights, seed)
                for i in range(index, min(index + n, len(sentences)))]
        index += len(jobs)
        for rec in runner.map(jobs):
            if done:
                continue  # the rest of the batch is on disk for a later, longer build; not in this manifest
            if "error" in rec:
                failures.append(rec)
                continue
            recs.append(rec)
            total += rec["duration"]
            made += 1
            if bar is not None:
                bar.update(rec["duration"] / 3600 if max_clips is None else 1)
            if (max_clips is None and total >= target_s) or (max_clips is not None and len(recs) >= max_clips):
                done = True
        now = time.time()
        if now - last_log > 300:
            rate = total / max(now - t0, 1e-9)
            eta = (target_s - total) / rate if rate > 0 and max_clips is None else float("nan")
            log(f"train: {len(recs)} clips, {total / 3600:.2f} h, {rate:.1f} s of audio per s, "
                f"eta {eta / 60:.0f} min, {len(failures)} failures")
            last_log = now
    if bar is not None:
        bar.close()
    if not done and max_clips is None:
        log(f"note: ran out of sentences at {total / 3600:.2f} h of train audio")
    return recs


# ----------------------------------------------------------------------------------------------------------------
# FSDD


def default_fsdd_dir() -> Path:
    return REPO.parent / "shared" / "data" / "fsdd"


def build_fsdd(fsdd_dir: Path, out: Path, smoke: bool, test_only: bool = False) -> dict[str, list[dict]]:
    """FSDD recordings, 8 kHz -> 16 kHz FLAC: {"train": [...], "dev": [...], "test_fsdd_nicolas": [...]}
    (the test speaker's only with `test_only`)."""
    result: dict[str, list[dict]] = {"train": [], "dev": [], f"test_fsdd_{FSDD_TEST_SPEAKER}": []}
    if not fsdd_dir.is_dir():
        log(f"note: FSDD not found at {fsdd_dir}; skipping the FSDD splits")
        return result
    files = sorted(fsdd_dir.glob("*.wav"))
    if test_only:
        files = [f for f in files if f"_{FSDD_TEST_SPEAKER}_" in f.name]
    if smoke:
        files = [f for f in files if int(f.stem.split("_")[2]) in (0, 5) and int(f.stem.split("_")[0]) < 2]
    bar = progress(len(files), "fsdd")
    for f in files:
        try:
            digit, speaker, take = f.stem.split("_")
            digit_i, take_i = int(digit), int(take)
        except ValueError:
            continue
        if speaker == FSDD_TEST_SPEAKER:
            split = f"test_fsdd_{FSDD_TEST_SPEAKER}"
        elif speaker in FSDD_TRAIN_SPEAKERS:
            split = "dev" if take_i in FSDD_DEV_TAKES else "train"
        else:
            continue
        rel = f"fsdd/{speaker}/{f.stem}.flac"
        dst = out / rel
        if dst.exists():
            dur = sf.info(str(dst)).frames / SR
        else:
            audio, sr = sf.read(str(f), dtype="float32", always_2d=True)
            audio = audio.mean(axis=1)
            if sr != SR:
                audio = soxr.resample(audio, sr, SR, quality="HQ").astype(np.float32)
            audio = np.clip(audio, -1.0, 1.0)
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.stem + ".tmp.flac")
            sf.write(str(tmp), audio, SR, format="FLAC", subtype="PCM_16")
            os.replace(tmp, dst)
            dur = audio.size / SR
        result[split].append({"audio_filepath": rel, "duration": round(dur, 3), "text": DIGIT_WORDS[digit_i],
                              "voice": f"fsdd:{speaker}", "source": "fsdd"})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return result


# ----------------------------------------------------------------------------------------------------------------
# manifests, summary, checks

MANIFEST_KEYS = ("audio_filepath", "duration", "text", "voice", "source", "rate", "pitch")


def write_manifest(path: Path, recs: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps({k: r[k] for k in MANIFEST_KEYS if k in r}) + "\n")
    os.replace(tmp, path)


def voice_group(name: str) -> str:
    """espeak formant voices grouped by accent for the printed table (summary.json has every voice)."""
    if name.startswith("espeak:") and "+" in name:
        return name.split("+", 1)[0] + "+*"
    return name


def summarize(splits: dict[str, list[dict]]) -> dict:
    summary = {}
    for split, recs in splits.items():
        per_voice: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for r in recs:
            per_voice[r["voice"]][0] += 1
            per_voice[r["voice"]][1] += r["duration"]
        summary[split] = {"utterances": len(recs), "hours": round(sum(r["duration"] for r in recs) / 3600, 3),
                          "voices": {v: {"utterances": c, "hours": round(s / 3600, 4)}
                                     for v, (c, s) in sorted(per_voice.items())}}
    return summary


def print_summary(summary: dict) -> None:
    log("")
    log(f"{'split':<22}{'utterances':>12}{'hours':>10}{'voices':>8}")
    for split, s in summary.items():
        log(f"{split:<22}{s['utterances']:>12}{s['hours']:>10.2f}{len(s['voices']):>8}")
    for split, s in summary.items():
        groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
        for v, vs in s["voices"].items():
            g = groups[voice_group(v)]
            g[0] += vs["utterances"]
            g[1] += vs["hours"]
            g[2] += 1
        log(f"\n{split}: per voice (espeak formant voices per accent; n = number of voice variants)")
        for g, (c, h, n) in sorted(groups.items()):
            log(f"  {g:<38}{c:>8} utt {h:>8.3f} h" + (f"   n={n}" if n > 1 else ""))


def sanity_check(out: Path, recs: list[dict], split: str, n: int = 200, seed: int = 0) -> dict:
    """Read back a sample of clips: duration per word, peak, RMS, silence-only clips."""
    if not recs:
        return {}
    sample = random.Random(seed).sample(recs, min(n, len(recs)))
    spw, peaks, rmss, silent = [], [], [], 0
    for r in sample:
        audio, sr = sf.read(str(out / r["audio_filepath"]), dtype="float32")
        assert sr == SR and audio.ndim == 1
        words = max(1, len(r["text"].split()))
        spw.append(audio.size / SR / words)
        peaks.append(float(np.max(np.abs(audio))))
        rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
        rmss.append(rms)
        # silence-only: no 25 ms frame above -40 dBFS
        hop = 400
        fr = audio[: audio.size // hop * hop].reshape(-1, hop)
        if fr.size == 0 or np.max(np.sqrt((fr.astype(np.float64) ** 2).mean(axis=1))) < 0.01:
            silent += 1
    res = {"checked": len(sample), "sec_per_word_p5_50_95": np.percentile(spw, [5, 50, 95]).round(3).tolist(),
           "peak_min_median_max": [round(min(peaks), 3), round(float(np.median(peaks)), 3), round(max(peaks), 3)],
           "rms_dbfs_p5_50_95": (20 * np.log10(np.percentile(rmss, [5, 50, 95]) + 1e-12)).round(1).tolist(),
           "silent_clips": silent}
    log(f"check {split:<20} {json.dumps(res)}")
    return res


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build the synthetic English ASR corpus (see the module docstring).")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default recipes/default_asr/work/corpus, or work/corpus_smoke)")
    ap.add_argument("--hours", type=float, default=40.0, help="target hours of synthetic train audio")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a handful of utterances per split, for CI")
    ap.add_argument("--test-only", action="store_true",
                    help="only the test splits (the held-out voices' sentences and FSDD nicolas), the same clips a "
                         "full build makes: for measuring a model without building its training corpus")
    ap.add_argument("--max-sentence-words", type=int, default=text_sources.MAX_WORDS)
    ap.add_argument("--dev-sentences", type=int, default=300)
    ap.add_argument("--test-sentences", type=int, default=300)
    ap.add_argument("--digit-clips", type=int, default=3000,
                    help="synthetic spoken-digit clips added to train (training voices)")
    ap.add_argument("--fsdd-dir", type=Path, default=None,
                    help="Free Spoken Digit Dataset recordings (default <repo>/../shared/data/fsdd)")
    args = ap.parse_args(argv)

    t_start = time.time()
    out = args.out or (HERE / "work" / ("corpus_smoke" if args.smoke else "corpus"))
    out.mkdir(parents=True, exist_ok=True)
    fsdd_dir = args.fsdd_dir or default_fsdd_dir()
    n_dev = 4 if args.smoke else args.dev_sentences
    n_test = 4 if args.smoke else args.test_sentences
    log(f"corpus -> {out}  (hours={args.hours} workers={args.workers} seed={args.seed} smoke={args.smoke})")

    # voices: check every voice, keep those that work
    catalogue = voicelib.all_voices()
    if args.test_only:  # the training voices are neither checked nor used
        catalogue = [v for v in catalogue if v.held_out]
    ok, failed_voices = voicelib.check_voices(catalogue, workers=max(1, args.workers))
    train_voices = voicelib.training_voices(ok)
    tests = voicelib.test_voices(ok)
    assert not set(v.name for v in train_voices) & set(v.name for v in tests.values())
    for name, why in failed_voices.items():
        log(f"voice {name} does not work, dropped: {why}")
    for key, pair in voicelib.HELD_OUT.items():
        if key not in tests:
            log(f"WARNING: held-out test voice {pair} does not work; its test split is skipped")
    weights = voicelib.voice_weights(train_voices) if train_voices else np.zeros(0)
    log(f"voices: {len(ok)}/{len(catalogue)} work; {len(train_voices)} for train/dev; "
        f"held out for test: {', '.join(v.name for v in tests.values())}")
    with open(out / "voices.json", "w") as f:
        json.dump({"working": [v.name for v in ok], "failed": failed_voices,
                   "train": {v.name: round(float(w), 6) for v, w in zip(train_voices, weights)},
                   "held_out": {k: v.name for k, v in tests.items()}}, f, indent=1)

    # sentences: test first, then dev, then train (disjoint by construction: the list has no duplicates)
    sentences = load_or_build_sentences(out, args.seed, args.max_sentence_words, args.smoke)
    test_s = [s for s in sentences[: 4 * n_test] if len(s.text.split()) >= 4][:n_test]
    test_set = {s.text for s in test_s}
    rest = [s for s in sentences if s.text not in test_set]
    dev_s, train_s = rest[:n_dev], rest[n_dev:]
    assert not (test_set & {s.text for s in train_s}) and not ({s.text for s in dev_s} & {s.text for s in train_s})
    log(f"sentences: {len(test_s)} test, {len(dev_s)} dev, {len(train_s)} available for train")

    failures: list[dict] = []
    runner = Runner(args.workers)
    splits: dict[str, list[dict]] = {}
    try:
        names = [v.name for v in train_voices]
        for key, voice in tests.items():
            split = TEST_VOICE_SPLITS[key]
            jobs = [make_job(out, split, i, s, [voice.name], None, args.seed) for i, s in enumerate(test_s)]
            splits[split] = run_fixed_split(runner, jobs, split, failures)
        train_wall = 0.0
        if not args.test_only:
            jobs = [make_job(out, "dev", i, s, names, weights, args.seed) for i, s in enumerate(dev_s)]
            splits["dev"] = run_fixed_split(runner, jobs, "dev", failures)
            t_train = time.time()
            splits["train"] = run_train(runner, out, train_s, names, weights, args.seed, args.hours * 3600,
                                        8 if args.smoke else None, failures)
            train_wall = time.time() - t_train
            digits = digit_sentences(4 if args.smoke else args.digit_clips, args.seed)
            jobs = [make_job(out, "train_digits", i, s, names, weights, args.seed) for i, s in enumerate(digits)]
            splits["train"] += run_fixed_split(runner, jobs, "train digits", failures)
    finally:
        runner.close()

    fsdd = build_fsdd(fsdd_dir, out, args.smoke, args.test_only)
    if not args.test_only:
        splits["train"] += fsdd["train"]
        splits["dev"] += fsdd["dev"]
    for k, v in fsdd.items():
        if k.startswith("test_") and v:
            splits[k] = v

    for rec in (r for recs in splits.values() for r in recs):  # last line of defence against leaks
        if rec["voice"] in {v.name for v in tests.values()}:
            assert rec in splits.get(TEST_VOICE_SPLITS.get(rec["voice"].split(":")[-1], ""), []), rec

    order = ["train", "dev", "test_mb-us2", "test_awb", f"test_fsdd_{FSDD_TEST_SPEAKER}"]
    splits = {k: splits[k] for k in order if k in splits}
    for split, recs in splits.items():
        write_manifest(out / f"{split}.json", recs)
    with open(out / "failures.jsonl", "w") as f:
        for r in failures:
            f.write(json.dumps({k: r.get(k) for k in ("split", "index", "voice", "text", "error")}) + "\n")

    summary = summarize(splits)
    print_summary(summary)
    checks = {split: sanity_check(out, recs, split, n=50 if args.smoke else 300, seed=args.seed)
              for split, recs in splits.items()}
    synth_s = sum(r["duration"] for r in splits.get("train", []) if r.get("source") != "fsdd")
    info = {"args": {k: str(v) for k, v in vars(args).items()}, "splits": summary, "checks": checks,
            "failures": len(failures), "wall_s": round(time.time() - t_start, 1),
            "train_wall_s": round(train_wall, 1), "train_synth_audio_s": round(synth_s, 1)}
    with open(out / "summary.json", "w") as f:
        json.dump(info, f, indent=1)
    log(f"\n{len(failures)} synthesis failures (failures.jsonl); wall time {time.time() - t_start:.0f} s; "
        f"manifests in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
