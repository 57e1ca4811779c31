#!/usr/bin/env python3
"""Packed-weight products and the channels-last depthwise convolution against torch's plain calls.

    python bench/packed_linear.py --threads 1

The real-size FastConformer's encoder products (17 layers: Q/K/V 512->1536, output 512->512, two feed-forwards
512->2048->512, pointwise 512->1024 and 512->512), one pass over all of them, at the rows a streaming step
has (7 frames per stream: 1, 16, 32, 64 streams), in fp32 and bf16: `F.linear` against oneDNN's packed weights
(`chorus.asr.packed_linear`) and against chorus' own kernels (`chorus.asr.rows_kernel`; the server uses the bf16
one up to 8 rows only).  Then the depthwise convolution (kernel 9, 512 channels, 7 new frames) as
`F.conv1d` with groups against `depthwise_channels_last`.  Then the greedy RNNT label loop of one 7-frame step
(real-size predictor and joint, random heads, so every frame emits --max-symbols labels) with its products
plain, through oneDNN, and through chorus' fp32 kernel.  Medians of --repeats passes, the sides alternating; prints the
ratios to the plain side.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from chorus.asr import rows_kernel
from chorus.asr import packed_linear as pl
from chorus.asr.conformer.decoding import rnnt_greedy
from chorus.asr.conformer.heads import RNNTJoint, RNNTPredictor
from chorus.asr.depthwise import depthwise_channels_last

LAYER_SHAPES = [(1536, 512), (512, 512), (2048, 512), (512, 2048), (2048, 512), (512, 2048), (1024, 512), (512, 512)]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(sides, repeats: int) -> list[float]:
    """Median seconds of each side, the sides taking turns."""
    for side in sides:
        side()  # warm-up (packs the weights)
    times = [[] for _ in sides]
    for _ in range(repeats):
        for side, t in zip(sides, times):
            t.append(timed(side))
    return [statistics.median(t) for t in times]


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
    print(f"rows kernels: {rows_kernel.status()}")
    print("| dtype | streams | rows | F.linear ms | oneDNN packed ms | rows kernel ms | x oneDNN / x rows kernel | "
          "weight GB/s plain / oneDNN / rows kernel |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        owners = [nn.Linear(i, o).to(dtype).requires_grad_(False) for _ in range(args.layers) for o, i in LAYER_SHAPES]
        rows_side = rows_kernel.kernel(dtype) is not None
        packed = [rows_kernel.pack(m.weight) for m in owners] if rows_side else []
        for n in [int(s) for s in args.streams.split(",")]:
            rows = 7 * n
            xs = {i: torch.randn(n, 7, i, dtype=dtype) for i in (512, 2048)}
            with torch.no_grad():
                def onednn():
                    with rows_kernel.switched_off():
                        return [pl.linear(m, xs[m.in_features]) for m in owners]
                sides = [lambda: [F.linear(xs[m.in_features], m.weight, m.bias) for m in owners], onednn]
                if rows_side:
                    sides.append(lambda: [rows_kernel.linear(xs[m.in_features], p, m.out_features, m.bias)
                                          for m, p in zip(owners, packed)])
                times = alternate(sides, args.repeats)
            name = "fp32" if dtype == torch.float32 else "bf16"
            gbs = sum(m.weight.nbytes for m in owners) / 1e9
            ms = [f"{t * 1e3:.1f}" for t in times] + ["-"] * (3 - len(times))
            ratios = " / ".join(f"x{times[0] / t:.2f}" for t in times[1:])
            rates = " / ".join(f"{gbs / t:.1f}" for t in times)
            print(f"| {name} | {n} | {rows} | {' | '.join(ms)} | {ratios} | {rates} |", flush=True)

    print("\n| depthwise conv, 17 layers | streams | F.conv1d ms | multiply-adds ms | x | max diff |\n"
          "|---|---:|---:|---:|---:|---:|")
    conv = nn.Conv1d(512, 512, 9, groups=512).requires_grad_(False)
    for n in [int(s) for s in args.streams.split(",")]:
        window = torch.randn(n, 15, 512)
        with torch.no_grad():
            ref = conv(window.transpose(1, 2)).transpose(1, 2)
            diff = (depthwise_channels_last(conv, window) - ref).abs().max().item()
            grouped = lambda: [conv(window.transpose(1, 2)).transpose(1, 2) for _ in range(args.layers)]  # noqa: E731
            channels_last = lambda: [depthwise_channels_last(conv, window) for _ in range(args.layers)]  # noqa: E731
            a, b = alternate([grouped, channels_last], args.repeats)
        print(f"| fp32 | {n} | {a * 1e3:.2f} | {b * 1e3:.2f} | x{a / b:.2f} | {diff:.1e} |", flush=True)

    print("\n| greedy RNNT, one step | streams | labels | plain ms | oneDNN ms | rows kernel ms "
          "| x oneDNN / x rows kernel |\n|---|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    predictor, joint = RNNTPredictor(1024, 640), RNNTJoint(512, 640, 640, 1024)
    predictor.eval(), joint.eval()
    rows = pl.PACKED_MIN_ROWS
    for n in [int(s) for s in args.streams.split(",")]:
        enc, lengths = torch.randn(n, 7, 512), torch.full((n,), 7)
        state, g = predictor.initial_state(n), torch.zeros(n, 640)

        def loop(path: str):
            pl.PACKED_MIN_ROWS = 10**9 if path == "plain" else rows
            try:
                if path == "rows kernel":
                    return rnnt_greedy(joint, predictor, enc, lengths, state, g, args.max_symbols)[0]
                with rows_kernel.switched_off():
                    return rnnt_greedy(joint, predictor, enc, lengths, state, g, args.max_symbols)[0]
            finally:
                pl.PACKED_MIN_ROWS = rows

        paths = ["plain", "oneDNN"] + (["rows kernel"] if rows_kernel.kernel() is not None else [])
        with torch.no_grad():
            labels = [loop(p) for p in paths]
            same = all(torch.equal(labels[0], other) for other in labels[1:])
            times = alternate([lambda p=p: loop(p) for p in paths], args.repeats)
        ms = [f"{t * 1e3:.1f}" for t in times] + ["-"] * (3 - len(times))
        print(f"| fp32 | {n} | {int((labels[0] >= 0).sum())} | {' | '.join(ms)} | "
              f"{' / '.join(f'x{times[0] / t:.2f}' for t in times[1:])} |"
              + ("" if same else " (the paths chose different labels)"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
