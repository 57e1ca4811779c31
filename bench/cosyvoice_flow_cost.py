#!/usr/bin/env python3
"""Per-chunk cost of CosyVoice 2's flow: chorus's cached streamer against CosyVoice's recompute schedule, and how far
the two final-chunk modes are apart.

    .venv/bin/python bench/cosyvoice_flow_cost.py [--size full|small] [--tokens 600] [--prompt 0] [--threads 1]
    .venv/bin/python bench/cosyvoice_flow_cost.py --cached-only [--chunks 20] [--report 1 5 10 20] [--left-chunks 2]

One random-weight flow (CosyVoice2-0.5B's sizes with --size full: 6 + 4 encoder blocks of 512, a 256-channel
estimator with 1 + 12 + 1 levels of 4 transformer blocks; nothing is downloaded), one utterance on CosyVoice's hop
schedule (25 tokens, then 50, then 100 per chunk).  Both paths run in this process on the same weights:

* recompute: `reference.recompute_stream`, CosyVoice's schedule (each chunk re-encodes every token so far and
  re-solves the ODE over the whole mel; its final call with full attention);
* cached: `streaming.FlowStreamer`, each chunk computing only its new tokens and frames.

Printed per chunk: token offset and count, wall time of each path, time per token of the chunk (what "flat" means:
it should not grow with the offset), the largest |mel difference| between them; then the final chunk in both
modes (exact: CosyVoice's full-attention pass; flat: chunk-causal to the end, from the cache) and the largest
|mel difference| between the modes relative to the mel's range.  With random weights that difference says how
much the mask matters to such a network, not how a trained model sounds.  Figures are medians over --repeat
runs of the same utterance; each chunk is timed both ways back to back (the machine may be shared: only same-run
ratios mean anything).

--cached-only: only chorus's cached flow, over a long stream of --chunks chunks (7 prompt tokens unless --prompt:
43, 50, then 100 tokens a chunk, as bench/tts_cosyvoice.py), thread CPU seconds of each chunk (median of --repeat)
at the --report chunks, and the median over the 100-token chunks 3..N; with --left-chunks L, also the same stream
with a bounded left context of L chunks in a slot just large enough for it (its K/V in a ring), timed the same way,
and the largest |mel difference| of each of its chunks from the full-context chunk (the exact output).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from cosyvoice_factories import TINY_FLOW, random_flow  # noqa: E402

from chorus.tts.cosyvoice.streaming import (FINAL_EXACT, FINAL_FLAT, FlowStreamer, exact_final,  # noqa: E402
                                            plan_utterance)

FULL = {**TINY_FLOW, "vocab_size": 6561, "encoder_dim": 512, "attention_heads": 8, "linear_units": 2048,
        "num_blocks": 6, "estimator_channels": 256, "attention_head_dim": 64, "num_heads": 8, "n_blocks": 4,
        "num_mid_blocks": 12}
SMALL = {**FULL, "num_blocks": 2, "linear_units": 512, "estimator_channels": 64, "n_blocks": 1, "num_mid_blocks": 2,
         "attention_head_dim": 32, "num_heads": 2}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def cached_costs(flow, tokens, ptok, feat, emb, chunks: int, repeat: int, left: int | None):
    """Thread CPU seconds of each of the first `chunks` cached chunks (each a list over `repeat` runs), and the
    mel chunks of the last run.  A bounded stream gets a slot just large enough for its ring."""
    plan = plan_utterance(tokens, ptok, flow.cfg.pre_lookahead_len).chunks[:chunks]
    frames = 2 * (len(tokens) + len(ptok)) + 50
    times = [[] for _ in plan]
    warm = FlowStreamer(flow, slots=1, max_frames=4 * len(plan[0].tokens) + 8)  # first calls' one-off costs
    state = warm.open(emb, feat)
    warm.step([state], plan[:1])
    warm.release(state)
    for _ in range(repeat):
        if left is None:
            streamer = FlowStreamer(flow, slots=1, max_frames=frames)
            state = streamer.open(emb, feat)
        else:
            widest = max(len(ptok) + (-len(ptok)) % 25 + 25, 100) + flow.cfg.pre_lookahead_len - 1
            streamer = FlowStreamer(flow, slots=1, max_frames=4 * (25 * left + widest) + 8)
            state = streamer.open(emb, feat, left)
        mels = []
        try:
            for k, c in enumerate(plan):
                t = time.thread_time()
                mels += streamer.step([state], [c])
                times[k].append(time.thread_time() - t)
        finally:
            streamer.release(state)
    return times, mels, streamer.nbytes


def cached_only(args, flow, sizes) -> int:
    g = torch.Generator().manual_seed(1)
    prompt = args.prompt if args.prompt else 7
    n = 25 + (-prompt) % 25 + 50 + 100 * max(0, args.chunks - 2) + 13
    tokens = torch.randint(0, sizes["vocab_size"], (n,), generator=g).tolist()
    ptok = torch.randint(0, sizes["vocab_size"], (prompt,), generator=g).tolist()
    feat = torch.randn(2 * prompt, 80, generator=g)
    emb = torch.randn(192, generator=g)
    med = statistics.median
    runs = [("full left context", None)] + ([(f"left_chunks {args.left_chunks}", args.left_chunks)]
                                           if args.left_chunks is not None else [])
    print(f"CosyVoice 2 cached flow, {args.size} size (random weights), {args.chunks} chunks of a {n}-token stream, "
          f"prompt {prompt} tokens, {args.threads} thread(s), thread CPU s, median of {args.repeat}")
    results = {}
    for label, left in runs:
        times, mels, nbytes = cached_costs(flow, tokens, ptok, feat, emb, args.chunks, args.repeat, left)
        results[label] = (times, mels)
        print(f"{label}: K/V and state {nbytes / 2**20:.0f} MiB for the slot")
        so_far = 0
        for k, t in enumerate(times):
            so_far += mels[k].shape[2] // 2 + (prompt if k == 0 else 0)
            if k + 1 in args.report:
                extra = ""
                if left is not None:
                    full = results["full left context"][1][k]
                    extra = f", max |mel - full context| {float((mels[k] - full).abs().max()):.4f}"
                per_token = 1e3 * med(t) / (mels[k].shape[2] / 2)
                print(f"  chunk {k + 1:>3} ({so_far:>5} tokens in): {med(t):.3f} s, {per_token:.2f} ms/token{extra}")
        later = [med(t) for t in times[2:]]
        if later:
            print(f"  100-token chunks 3-{len(times)}: median {med(later):.3f} s, min {min(later):.3f}, "
                  f"max {max(later):.3f}; chunk {len(times)} / chunk 3 = {med(times[-1]) / med(times[2]):.2f}")
    if args.left_chunks is not None:
        full, bounded = results["full left context"][1], results[runs[1][0]][1]
        span = max(float(m.max() - m.min()) for m in full)
        diffs = [float((a - b).abs().max()) for a, b in zip(full, bounded)]
        print(f"left_chunks {args.left_chunks} vs full context, max |dmel| per chunk: "
              + " ".join(f"{d:.3f}" for d in diffs) + f" (mel range {span:.2f})")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("full", "small"), default="full")
    ap.add_argument("--tokens", type=int, default=600, help="speech tokens in the utterance (25 per second)")
    ap.add_argument("--prompt", type=int, default=0, help="prompt tokens (with a random prompt mel)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cached-only", action="store_true", help="only the cached flow over a long stream")
    ap.add_argument("--chunks", type=int, default=20, help="--cached-only: chunks of the stream")
    ap.add_argument("--report", type=int, nargs="*", default=[1, 5, 10, 20], help="--cached-only: chunks to print")
    ap.add_argument("--left-chunks", type=int, default=None, help="--cached-only: also a bounded left context")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = FULL if args.size == "full" else SMALL
    flow = random_flow(sizes, seed=0)
    if args.cached_only:
        return cached_only(args, flow, sizes)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, sizes["vocab_size"], (args.tokens,), generator=g).tolist()
    ptok = torch.randint(0, sizes["vocab_size"], (args.prompt,), generator=g).tolist()
    feat = torch.randn(2 * args.prompt, 80, generator=g) if args.prompt else None
    emb = torch.randn(192, generator=g)
    cfg = flow.cfg
    plan = plan_utterance(tokens, ptok, cfg.pre_lookahead_len)
    ratio = cfg.token_mel_ratio
    pfeat = (torch.zeros(0, 80) if feat is None else feat)[None]
    ptok_t = torch.tensor([ptok], dtype=torch.long).reshape(1, -1)

    rec_times = [[] for _ in plan.chunks]
    cache_times = [[] for _ in plan.chunks]
    exact_times, flat_times = [], []
    for _ in range(args.repeat):  # each chunk timed both ways back to back, so load on the machine hits both alike
        streamer = FlowStreamer(flow, slots=1, max_frames=2 * (len(tokens) + len(ptok)) + 50)
        state = streamer.open(emb, feat)
        rec, cached = [], []
        for k, (chunk, offset) in enumerate(zip(plan.chunks, plan.offsets)):
            end = offset + len(chunk.tokens) - (len(ptok) if k == 0 else 0)
            if chunk.final:
                mel, dt = timed(lambda: flow.inference(torch.tensor([tokens]), ptok_t, pfeat, emb[None], False, True))
                rec.append(mel[:, :, offset * ratio:])
                rec_times[k].append(dt)
                exact, dt = timed(lambda: exact_final(flow, tokens, offset, emb, ptok, feat))
                exact_times.append(dt)
                (flat,), dt = timed(lambda: streamer.step([state], [chunk]))
                flat_times.append(dt)
            else:
                mel, dt = timed(lambda: flow.inference(torch.tensor([tokens[:end + cfg.pre_lookahead_len]]), ptok_t,
                                                       pfeat, emb[None], True, False))
                rec.append(mel[:, :, offset * ratio:])
                rec_times[k].append(dt)
                (mel,), dt = timed(lambda: streamer.step([state], [chunk]))
                cached.append(mel)
                cache_times[k].append(dt)
        streamer.release(state)

    med = statistics.median
    print(f"CosyVoice 2 flow, {args.size} size (random weights), {args.tokens} tokens "
          f"({args.tokens / 25:.1f} s), prompt {args.prompt} tokens, {args.threads} thread(s), median of {args.repeat}")
    print(f"{'chunk':>5} {'offset':>6} {'tokens':>6} {'recompute s':>11} {'cached s':>9} {'recomp ms/tok':>13} "
          f"{'cached ms/tok':>13} {'ratio':>6} {'max |dmel|':>10}")
    n_final = len(tokens) - plan.offsets[-1]
    for k, (chunk, offset) in enumerate(zip(plan.chunks, plan.offsets)):
        n = len(chunk.tokens) - (len(ptok) if k == 0 else 0)
        r = med(rec_times[k])
        if chunk.final:
            c, label, diff = med(exact_times), "final exact", float((exact - rec[k]).abs().max())
        else:
            c, label, diff = med(cache_times[k]), str(k), float((cached[k] - rec[k]).abs().max())
        print(f"{label:>5} {offset:>6} {n:>6} {r:>11.3f} {c:>9.3f} {1e3 * r / n:>13.2f} {1e3 * c / n:>13.2f} "
              f"{r / c:>6.2f} {diff:>10.2e}")
    f = med(flat_times)
    print(f"{'final flat':>12} {plan.offsets[-1]:>6} {n_final:>6} {'':>11} {f:>9.3f} {'':>13} {1e3 * f / n_final:>13.2f}"
          f" {med(exact_times) / f:>6.2f}  (exact / flat)")
    span = float(exact.max() - exact.min())
    d = (flat - exact).abs()
    print(f"final chunk, flat vs exact: max |dmel| {float(d.max()):.4f}, mean {float(d.mean()):.4f} "
          f"(mel range {span:.2f}; max/range {float(d.max()) / span:.4f})")
    total_rec = sum(med(t) for t in rec_times)
    total_cached = sum(med(t) for t in cache_times[:-1]) + med(exact_times)
    total_flat = sum(med(t) for t in cache_times[:-1]) + f
    print(f"whole utterance: recompute {total_rec:.2f} s, cached + exact final {total_cached:.2f} s "
          f"({total_rec / total_cached:.2f}x), cached + flat final {total_flat:.2f} s ({total_rec / total_flat:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
