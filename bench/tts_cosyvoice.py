#!/usr/bin/env python3
"""CosyVoice 2 token-to-wave, streamed: chorus's cached chunks against CosyVoice's own recompute, same run.

    .venv/bin/python bench/tts_cosyvoice.py [--cosy-python /work/cosy-venv/bin/python] [--chunks 20]
        [--counts 1 4 16] [--concurrent-chunks 4] [--repeats 3] [--cpus 0] [--json out.json]
    .venv/bin/python bench/tts_cosyvoice.py --chorus-only [--left-chunks 2] ...

The checkpoint is bench/cosyvoice_parity.py's: CosyVoice builds its own flow and HiFTGenerator from a small
cosyvoice2.yaml (encoder 512 wide, 2 + 4 blocks; estimator 64 channels, 2 mid blocks; HiFT 32 channels), gives
them random weights and saves flow.pt / hift.pt; chorus loads the same files. Both run on one CPU core (the
process and CosyVoice's subprocess pinned with sched_setaffinity, --cpus) with one torch thread.

1. Per-chunk cost over a long token stream (all tokens known, a 7-token prompt): CosyVoice2Model.tts(stream=True)
   unchanged (bench/cosyvoice_reference.py: the LLM replaced by the tokens), timing each token2wav call, which
   re-encodes every token so far and re-solves the ODE over the whole mel, then vocodes the new mel; chorus runs
   the same chunks through FlowStreamer.step (only the chunk's new tokens and frames, the rest from its cache) and
   HiftStreamer.push. Thread CPU seconds of chunk 1, 5, 10, 20 (chunks are 25 + the prompt's pad, 50, then 100
   tokens: CosyVoice's hop schedule). Chorus is repeated --repeats times (median); CosyVoice runs once (its later
   chunks are the long ones).
2. Time to first audio: the first chunk's wall time (tokens all there; CosyVoice's tts() also polls every 0.1 s
   before it looks, not counted).
3. N concurrent streams, --concurrent-chunks chunks each: CosyVoice as it serves concurrent requests (one thread per
   tts() session over one model); chorus batched (one FlowStreamer.step and one HiftStreamer.push_many per chunk
   for all N). CPU seconds of the whole process, wall time, first audio (the slowest stream's first chunk), and
   real-time factor (wall / audio seconds made). chorus warms up with one chunk first, as the reference does.

--chorus-only: without CosyVoice's venv: the checkpoint of the same sizes written by chorus's test factories
(random weights of its own), chorus's side of 1-3 only (CosyVoice's columns empty). --left-chunks L: chorus's
streams with a bounded left context of L chunks (the `left_chunks` option; not CosyVoice's output).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cosyvoice_parity import (BENCH_FLOW, BENCH_HIFT, COSY_PYTHON, load_chorus, reference, stream_inputs,  # noqa: E402
                              write_checkpoint)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cosyvoice_factories import write_cosyvoice2_dir  # noqa: E402

from chorus.tts.cosyvoice.hift import HiftStreamer  # noqa: E402
from chorus.tts.cosyvoice.streaming import FlowStreamer, plan_utterance  # noqa: E402

SAMPLE_RATE = 24000


def tokens_for(chunks: int, prompt: int) -> int:
    """Speech tokens for `chunks` non-final chunks on CosyVoice's schedule, plus lookahead and a short tail."""
    pad = -(-prompt // 25) * 25 - prompt
    hops = [25 + pad, 50] + [100] * max(0, chunks - 2)
    return sum(hops[:chunks]) + 3 + 10


def slot_frames(flow, tokens: int, prompt: int, left: int | None) -> int:
    """max_frames of a slot for streams of `tokens` + `prompt` tokens: all of them, or (bounded left context) a ring
    just large enough for L chunks and the widest chunk."""
    if left is None:
        return 2 * (tokens + prompt) + 100
    widest = max(prompt + (-prompt) % 25 + 25, 100) + flow.cfg.pre_lookahead_len - 1
    return 4 * (25 * left + widest) + 8


def chorus_chunks(flow, hift, inputs: dict, chunks: int, left: int | None = None) -> list[dict]:
    tokens = inputs["tokens"][0].tolist()
    prompt = inputs["prompt_token"][0].tolist()
    plan = plan_utterance(tokens, prompt, flow.cfg.pre_lookahead_len).chunks[:chunks]
    streamer = FlowStreamer(flow, slots=1, max_frames=slot_frames(flow, len(tokens), len(prompt), left))
    state = streamer.open(inputs["embedding"][0], inputs["prompt_feat"][0], left)
    voc = HiftStreamer(hift, generator=int(inputs["seed"]))
    out = []
    try:
        for c in plan:
            c0, w0 = time.thread_time(), time.perf_counter()
            mel = streamer.step([state], [c])[0]
            c1 = time.thread_time()
            audio = voc.push(mel)
            c2, w2 = time.thread_time(), time.perf_counter()
            out.append({"cpu_s": c2 - c0, "flow_cpu_s": c1 - c0, "hift_cpu_s": c2 - c1, "wall_s": w2 - w0,
                        "tokens": len(c.tokens), "samples": audio.shape[1]})
    finally:
        streamer.release(state)
    return out


def chorus_concurrent(flow, hift, inputs_list: list[dict], chunks: int, left: int | None = None) -> dict:
    n = len(inputs_list)
    plans = [plan_utterance(i["tokens"][0].tolist(), i["prompt_token"][0].tolist(),
                            flow.cfg.pre_lookahead_len).chunks[:chunks] for i in inputs_list]
    longest = max(len(i["tokens"][0]) + len(i["prompt_token"][0]) for i in inputs_list)
    streamer = FlowStreamer(flow, slots=n, max_frames=max(
        slot_frames(flow, len(i["tokens"][0]), len(i["prompt_token"][0]), left) for i in inputs_list))
    states = [streamer.open(i["embedding"][0], i["prompt_feat"][0], left) for i in inputs_list]
    vocs = [HiftStreamer(hift, generator=int(i["seed"])) for i in inputs_list]
    samples, steps = 0, []
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for k in range(chunks):
            mels = streamer.step(states, [p[k] for p in plans])
            audio = HiftStreamer.push_many(vocs, mels, [False] * n)
            samples += sum(a.shape[1] for a in audio)
            steps.append(time.perf_counter() - t0)
    finally:
        for s in states:
            streamer.release(s)
    total, cpu = steps[-1], time.process_time() - c0
    return {"total_s": total, "cpu_s": cpu, "first_audio_s": steps[0], "audio_s": samples / SAMPLE_RATE,
            "rtf": total / (samples / SAMPLE_RATE)}


def cosy_concurrent(args, model_dir: Path, work: Path, n: int) -> dict:
    out = work / f"conc{n}.pt"
    reference(args.cosy_python, "concurrent", str(model_dir), str(work / "inputs_conc.pt"), str(out),
              "--streams", str(n), "--chunks", str(args.concurrent_chunks))
    r = torch.load(out, weights_only=True)
    samples = sum(c["audio_samples"] for s in r["streams"] for c in s)
    first = max(s[0]["end_wall"] for s in r["streams"])
    return {"total_s": r["total_s"], "cpu_s": r["cpu_s"], "first_audio_s": first, "audio_s": samples / SAMPLE_RATE,
            "rtf": r["total_s"] / (samples / SAMPLE_RATE)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cosy-python", default=COSY_PYTHON)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--report", type=int, nargs="*", default=[1, 5, 10, 20])
    ap.add_argument("--counts", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--concurrent-chunks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=7)
    ap.add_argument("--cpus", type=int, nargs="*", default=[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default=None)
    ap.add_argument("--chorus-only", action="store_true", help="no CosyVoice venv: chorus's side on its own checkpoint")
    ap.add_argument("--left-chunks", type=int, default=None, help="chorus's streams with a bounded left context")
    args = ap.parse_args()
    left = args.left_chunks
    os.sched_setaffinity(0, set(args.cpus))  # inherited by CosyVoice's subprocesses
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = {"started": started, "cpus": args.cpus, "threads": 1, "chorus_only": args.chorus_only,
               "left_chunks": left}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        if args.chorus_only:
            write_cosyvoice2_dir(model_dir, BENCH_FLOW, BENCH_HIFT)
        else:
            write_checkpoint(model_dir, args.cosy_python)
        flow, hift = load_chorus(model_dir)
        n_tokens = tokens_for(args.chunks, args.prompt_tokens)
        inputs = stream_inputs(n_tokens, args.prompt_tokens, args.seed)
        torch.save(inputs, work / "inputs.pt")

        # 1-2: per-chunk cost and first audio, one stream
        nan = {"cpu_s": float("nan"), "wall_s": float("nan"), "audio": torch.zeros(1, 0)}
        if args.chorus_only:
            cosy = [nan] * args.chunks
        else:
            reference(args.cosy_python, "stream", str(model_dir), str(work / "inputs.pt"), str(work / "ref.pt"),
                      "--chunks", str(args.chunks))
            cosy = torch.load(work / "ref.pt", weights_only=True)["chunks"]
        chorus_chunks(flow, hift, inputs, 1, left)  # warm-up, as the reference warms up
        runs = [chorus_chunks(flow, hift, inputs, args.chunks, left) for _ in range(args.repeats)]
        rows = []
        for k in range(args.chunks):
            ours = [r[k] for r in runs]
            rows.append({"chunk": k + 1, "tokens": ours[0]["tokens"] - (args.prompt_tokens if k == 0 else 0),
                         "cosy_cpu_s": cosy[k]["cpu_s"], "cosy_wall_s": cosy[k]["wall_s"],
                         "chorus_cpu_s": statistics.median(o["cpu_s"] for o in ours),
                         "chorus_flow_cpu_s": statistics.median(o["flow_cpu_s"] for o in ours),
                         "chorus_hift_cpu_s": statistics.median(o["hift_cpu_s"] for o in ours),
                         "chorus_wall_s": statistics.median(o["wall_s"] for o in ours),
                         "samples": ours[0]["samples"], "cosy_samples": cosy[k]["audio"].shape[1]})
        results["chunks"] = rows
        print(f"{started}; one core {args.cpus}, one torch thread; machine shared with other jobs"
              + ("; chorus only (its own random checkpoint)" if args.chorus_only else "")
              + (f"; chorus with left_chunks {left}" if left is not None else ""))
        print(f"flow {sum(p.numel() for p in flow.parameters()) / 1e6:.1f} M parameters, HiFT "
              f"{sum(p.numel() for p in hift.parameters()) / 1e6:.2f} M; {n_tokens} speech tokens, "
              f"{args.prompt_tokens} prompt tokens; chorus median of {args.repeats}")
        print("| chunk | new tokens | tokens so far | CosyVoice CPU s | chorus CPU s (flow + HiFT) | CosyVoice / chorus |")
        print("| --- | --- | --- | --- | --- | --- |")
        so_far = 0
        for r in rows:
            so_far += r["tokens"]
            r["tokens_so_far"] = so_far
            if r["chunk"] in args.report:
                print(f"| {r['chunk']} | {r['tokens']} | {so_far} | {r['cosy_cpu_s']:.3f} | {r['chorus_cpu_s']:.3f} "
                      f"({r['chorus_flow_cpu_s']:.3f} + {r['chorus_hift_cpu_s']:.3f}) | "
                      f"{r['cosy_cpu_s'] / r['chorus_cpu_s']:.1f}x |")
        flat = [r["chorus_cpu_s"] for r in rows[2:]]
        if flat:
            print(f"chorus over the 100-token chunks 3-{args.chunks}: median {statistics.median(flat):.3f} s, "
                  f"min {min(flat):.3f}, max {max(flat):.3f}")
        print(f"first audio (chunk 1 wall): CosyVoice {rows[0]['cosy_wall_s']:.3f} s, chorus "
              f"{rows[0]['chorus_wall_s']:.3f} s")

        # 3: concurrent streams
        conc_inputs = stream_inputs(tokens_for(args.concurrent_chunks, args.prompt_tokens), args.prompt_tokens,
                                    args.seed + 1)
        torch.save(conc_inputs, work / "inputs_conc.pt")
        results["concurrent"] = []
        print(f"\n{args.concurrent_chunks} chunks per stream "
              f"({tokens_for(args.concurrent_chunks, args.prompt_tokens)} tokens)")
        print("| streams | CosyVoice CPU s | chorus batched CPU s | ratio | wall s CosyVoice / chorus "
              "| first audio CosyVoice / chorus s | RTF CosyVoice / chorus |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for n in args.counts:
            c = ({k: float("nan") for k in ("cpu_s", "total_s", "first_audio_s", "rtf")} if args.chorus_only
                 else cosy_concurrent(args, model_dir, work, n))
            ours = chorus_concurrent(flow, hift, [{**conc_inputs, "seed": torch.tensor(args.seed + i)}
                                                  for i in range(n)], args.concurrent_chunks, left)
            results["concurrent"].append({"streams": n, "cosy": c, "chorus": ours})
            print(f"| {n} | {c['cpu_s']:.2f} | {ours['cpu_s']:.2f} | {c['cpu_s'] / ours['cpu_s']:.1f}x | "
                  f"{c['total_s']:.2f} / {ours['total_s']:.2f} | {c['first_audio_s']:.2f} / "
                  f"{ours['first_audio_s']:.2f} | {c['rtf']:.3f} / {ours['rtf']:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
