#!/usr/bin/env python3
"""Packed-weight products and the channels-last depthwise convolution against torch's plain calls.

    python bench/packed_linear.py --threads 1

The real-size FastConformer's encoder products (17 layers: Q/K/V 512->1536, output 512->512, two feed-forwards
512->2048->512, pointwise 512->1024 and 512->512), one pass over all of them, at the rows a streaming step
has (7 frames per stream: 1, 16, 32, 64 streams), in fp32 and bf16: `F.linear` against
`chorus.asr.packed_linear.packed_linear` (weights reordered once into oneDNN's blocked layout).  Then the
depthwise convolution (kernel 9, 512 channels, 7 new frames) as `F.conv1d` with groups against
`_depthwise_channels_last`.  Then the greedy RNNT label loop of one 7-frame step (real-size predictor and
joint, random heads, so every frame emits --max-symbols labels) with the products plain and packed.  Medians of
--repeats passes, alternating the two sides; prints the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from chorus.asr import packed_linear as pl
from chorus.asr.conformer.decoding import rnnt_greedy
from chorus.asr.conformer.heads import RNNTJoint, RNNTPredictor
from chorus.asr.conformer.model import _depthwise_channels_last

LAYER_SHAPES = [(1536, 512), (512, 512), (2048, 512), (512, 2048), (2048, 512), (512, 2048), (1024, 512), (512, 512)]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(a, b, repeats: int) -> tuple[float, float]:
    a(), b()  # warm-up (packs the weights)
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--layers", type=int, default=17)
    p.add_argument("--streams", default="1,16,32,64")
    p.add_argument("--max-symbols", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} thread(s); packed from {pl.PACKED_MIN_ROWS} rows, in blocks of at most "
          f"{pl.PACKED_BLOCK_ROWS} rows")
    big = torch.ones(128 * 2**20)  # 512 MB: a plain read of as many bytes as the fp32 weights, for the bound
    read = statistics.median(timed(big.sum) for _ in range(args.repeats))
    print(f"a plain read (torch.sum over 512 MB fp32): {big.nbytes / 1e9 / read:.1f} GB/s")
    del big
    print("| dtype | streams | rows | F.linear ms | packed ms | x | weight GB/s plain / packed |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        owners = [nn.Linear(i, o).to(dtype).requires_grad_(False) for _ in range(args.layers) for o, i in LAYER_SHAPES]
        for n in [int(s) for s in args.streams.split(",")]:
            rows = 7 * n
            xs = {i: torch.randn(n, 7, i, dtype=dtype) for i in (512, 2048)}
            with torch.no_grad():
                plain = lambda: [F.linear(xs[m.in_features], m.weight, m.bias) for m in owners]  # noqa: E731
                packed = lambda: [pl.linear(m, xs[m.in_features]) for m in owners]  # noqa: E731
                a, b = alternate(plain, packed, args.repeats)
            name = "fp32" if dtype == torch.float32 else "bf16"
            gbs = sum(m.weight.nbytes for m in owners) / 1e9
            print(f"| {name} | {n} | {rows} | {a * 1e3:.1f} | {b * 1e3:.1f} | x{a / b:.2f} | "
                  f"{gbs / a:.1f} / {gbs / b:.1f} |", flush=True)

    print("\n| depthwise conv, 17 layers | streams | F.conv1d ms | multiply-adds ms | x | max diff |\n"
          "|---|---:|---:|---:|---:|---:|")
    conv = nn.Conv1d(512, 512, 9, groups=512).requires_grad_(False)
    for n in [int(s) for s in args.streams.split(",")]:
        window = torch.randn(n, 15, 512)
        with torch.no_grad():
            ref = conv(window.transpose(1, 2)).transpose(1, 2)
            diff = (_depthwise_channels_last(conv, window) - ref).abs().max().item()
            a, b = alternate(lambda: [conv(window.transpose(1, 2)).transpose(1, 2) for _ in range(args.layers)],
                             lambda: [_depthwise_channels_last(conv, window) for _ in range(args.layers)], args.repeats)
        print(f"| fp32 | {n} | {a * 1e3:.2f} | {b * 1e3:.2f} | x{a / b:.2f} | {diff:.1e} |", flush=True)

    print("\n| greedy RNNT, one step | streams | labels | plain ms | packed ms | x |\n|---|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    predictor, joint = RNNTPredictor(1024, 640), RNNTJoint(512, 640, 640, 1024)
    predictor.eval(), joint.eval()
    rows = pl.PACKED_MIN_ROWS
    for n in [int(s) for s in args.streams.split(",")]:
        enc, lengths = torch.randn(n, 7, 512), torch.full((n,), 7)
        state, g = predictor.initial_state(n), torch.zeros(n, 640)

        def loop(packed: bool):
            pl.PACKED_MIN_ROWS = rows if packed else 10**9
            return rnnt_greedy(joint, predictor, enc, lengths, state, g, args.max_symbols)[0]

        with torch.no_grad():
            labels = int((loop(True) >= 0).sum())
            a, b = alternate(lambda: loop(False), lambda: loop(True), args.repeats)
        pl.PACKED_MIN_ROWS = rows
        print(f"| fp32 | {n} | {labels} | {a * 1e3:.1f} | {b * 1e3:.1f} | x{a / b:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
