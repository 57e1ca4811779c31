#!/usr/bin/env python3
"""Per-chunk cost of CosyVoice 2's flow: chorus's cached streamer against CosyVoice's recompute schedule, and how far
the two final-chunk modes are apart.

    .venv/bin/python bench/cosyvoice_flow_cost.py [--size full|small] [--tokens 600] [--prompt 0] [--threads 1]

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("full", "small"), default="full")
    ap.add_argument("--tokens", type=int, default=600, help="speech tokens in the utterance (25 per second)")
    ap.add_argument("--prompt", type=int, default=0, help="prompt tokens (with a random prompt mel)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = FULL if args.size == "full" else SMALL
    flow = random_flow(sizes, seed=0)
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
