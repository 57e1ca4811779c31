"""The streaming Paraformer's compute dtypes (`--dtype`: fp32, bf16, int8) at the real size, random weights.

    python bench/paraformer_dtypes.py [--streams 1,16] [--chunks 6] [--rounds 5] [--threads 1]

FunASR's paraformer-zh-streaming sizes (encoder 50 SANM blocks, decoder 16, d_model 512, 2048 units, 8404
tokens; ParaformerConfig's defaults), random weights (tests/paraformer_factories.py, CIF firing every few
frames), the default setting [0, 10, 5] (600 ms chunks).  B streams step --chunks chunks of random feature
frames together; the dtypes take turns in each round (the order reversed every other round).  Prints the
median seconds per step per dtype, the audio seconds per second, the ratio against fp32 in the same run, the
state bytes per slot and the encoder output's RMS distance from fp32's.  No trained Paraformer weights are
on these machines, so accuracy is not measured here.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from paraformer_factories import tiny_paraformer  # noqa: E402

from chorus.asr.paraformer.precision import apply_dtype  # noqa: E402
from chorus.asr.paraformer.streaming import DEFAULT_SETTING, ParaformerStreamer  # noqa: E402

REAL = dict(d_model=512, enc_heads=4, enc_units=2048, enc_blocks=50, dec_heads=4, dec_units=2048, dec_blocks=16,
            vocab_size=8404)


def run(streamer, feats, setting):
    """Each stream's chunks stepped together; returns seconds per step and the encoder outputs."""
    slots = [streamer.open() for _ in feats]
    times, outs = [], []
    try:
        for c in range(len(feats[0])):
            t = time.perf_counter()
            res = streamer.step(slots, [f[c] for f in feats], [False] * len(feats), setting)
            times.append(time.perf_counter() - t)
            outs.append(torch.stack([r.encoded for r in res]))
    finally:
        for s in slots:
            streamer.close(s)
    return times, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", default="fp32,bf16,int8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.dtypes.split(",")
    base = tiny_paraformer(seed=0, **REAL)
    models = {d: apply_dtype(copy.deepcopy(base), d) for d in names}
    setting = DEFAULT_SETTING
    c1 = setting.chunk_size[1]
    chunk_s = c1 * 0.06
    print(f"paraformer-zh-streaming sizes, random weights, {setting}; torch threads {torch.get_num_threads()}; "
          f"{args.chunks} chunks of {chunk_s:.1f} s per stream; {args.rounds} rounds")
    for b in [int(x) for x in args.streams.split(",")]:
        g = torch.Generator().manual_seed(b)
        feats = [[torch.randn(c1, base.cfg.input_size, generator=g) for _ in range(args.chunks)] for _ in range(b)]
        streamers = {d: ParaformerStreamer(m, settings=[setting], slots=b) for d, m in models.items()}
        med, outs = {d: [] for d in names}, {}
        for r in range(args.rounds + 1):   # round 0 warms up (kernels, allocations), not counted
            for d in (names if r % 2 == 0 else names[::-1]):
                times, outs[d] = run(streamers[d], feats, setting)
                if r:
                    med[d].append(float(np.median(times)))
        ref = torch.cat(outs[names[0]])
        for d in names:
            step = float(np.median(med[d]))
            got = torch.cat(outs[d])
            err = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
            ratio = float(np.median(med[names[0]])) / step
            slot_mib = streamers[d].spec.bytes_per_slot / 2**20
            print(f"B={b:3d} {d:5} median step {1000 * step:8.1f} ms  {b * chunk_s / step:7.1f} audio-s/s  "
                  f"x{ratio:.2f} of {names[0]}  state {slot_mib:.2f} MiB/slot  "
                  f"encoder RMS vs {names[0]} {100 * err:.2f} %", flush=True)


if __name__ == "__main__":
    main()
