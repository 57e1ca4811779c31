"""int8 K/V state (`--kv-dtype int8`) against the compute dtype's state: bytes per slot, streams per memory
budget, and (with --speed) the encoder step time of FastConformer at NeMo's real size, same run.

    python bench/kv_int8.py [--budget-gib 1] [--speed --streams 1,16 --seconds 4 --dtypes fp32,bf16]

Bytes come from the state specs (what the pools allocate), at the real size of NeMo's streaming FastConformer
(17 layers, d_model 512; all four lookaheads and [70, 6] only) and of Whisper tiny.en (its dimensions; no
weights are read).  Accuracy on trained weights is measured with `chorus eval --kv-dtype` and
`bench/whisper_streaming.py accuracy --kv-dtype` (bench/README.md, "Quantized K/V state").
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from chorus.asr.conformer.asr_model import FastConformerModel  # noqa: E402
from chorus.asr.conformer.precision import apply_dtype  # noqa: E402
from chorus.asr.conformer.streaming import ConformerStreamer, apply_kv_dtype, conformer_state_spec  # noqa: E402
from chorus.asr.whisper.family import WhisperModel  # noqa: E402
from chorus.asr.whisper.model import SIZES, Whisper  # noqa: E402
from conformer_streaming import CONTEXTS, real_spec  # noqa: E402

MIB = 2**20


def conformer_rows(budget: int) -> None:
    print(f"FastConformer, NeMo's real size: bytes per slot and streams in {budget / 2**30:g} GiB of state")
    print(f"{'lookaheads':14} {'state':16} {'bytes/slot':>11} {'MiB':>7} {'streams':>8}  tensors")
    for name, contexts in (("all four", CONTEXTS), ("[70, 6] only", ((70, 6),))):
        spec = real_spec(1024)
        spec = replace(spec, encoder=replace(spec.encoder, att_context_size=contexts))
        with torch.device("meta"):
            model = FastConformerModel(spec)
        rows = []
        for compute in ("fp32", "bf16"):
            if compute == "bf16":
                model.encoder.to(torch.bfloat16)
            for kv in ("auto", "int8"):
                s = conformer_state_spec(apply_kv_dtype(model, kv))
                label = f"{compute} compute, " + ("same" if kv == "auto" else "int8")
                big = ", ".join(f"{k} {t.nbytes / MIB:.3f}" for k, t in s.items() if t.nbytes > 10_000)
                rows.append((label, s.bytes_per_slot, big))
        for label, b, big in rows:
            print(f"{name:14} {label:16} {b:11,d} {b / MIB:7.3f} {budget // b:8d}  {big}")
    print(f"(before the projected K/V rings: 2.600 MiB, {int(budget // (2.6 * MIB))} streams)\n")


def whisper_rows(budget: int) -> None:
    class Dims(WhisperModel):  # tiny.en's dimensions without its weights
        def __init__(self, kv: str):
            with torch.device("meta"):
                self.model = Whisper(SIZES["tiny.en"])
            self.kv_dtype = kv

    print(f"Whisper tiny.en, a stream with a full window (K/V caches in 16-token pages, mel window fp32)")
    print(f"{'K/V':6} {'encoder':>9} {'cross':>9} {'self':>9} {'stream MiB':>11} {'streams':>8}")
    for kv in ("auto", "int8"):
        m = Dims(kv)
        c = m.kv_bytes_per_stream()
        total = m.bytes_per_stream()
        print(f"{'fp32' if kv == 'auto' else kv:6} {c['encoder'] / MIB:9.3f} {c['cross'] / MIB:9.3f} "
              f"{c['self'] / MIB:9.3f} {total / MIB:11.3f} {budget // total:8d}")
    print("(padded mode, the default, never fills the encoder cache: it is the causal mode's)\n")


@torch.no_grad()
def speed(streams: list[int], seconds: float, threads: int, dtypes: list[str]) -> None:
    """Median encoder step with the compute dtype's state and with int8 state, the two engines stepping in turn
    (same process, same chunks), for each compute dtype."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = FastConformerModel(real_spec(1024)).eval()
    print(f"FastConformer real size, encoder steps at [70, 6] (7 frames a chunk), {threads} thread(s), "
          f"{seconds:g} s of random mel per stream, the two states stepping in turn; median step")
    for dtype in dtypes:
        model = apply_dtype(copy.deepcopy(base), dtype)
        for n in streams:
            engines = {kv: ConformerStreamer(apply_kv_dtype(model, kv), slots=n) for kv in ("auto", "int8")}
            setting = engines["auto"].setting((70, 6))
            slots = {kv: [e.open() for _ in range(n)] for kv, e in engines.items()}
            steps = max(int(seconds / (setting.chunk_ms / 1000)), 4)
            mel = torch.randn(n, setting.plan.first_size, 80), torch.randn(n, setting.plan.size, 80)
            times = {kv: [] for kv in engines}
            for i in range(steps):
                chunk = mel[0] if i == 0 else mel[1]
                consumed = setting.plan.first_shift if i == 0 else setting.plan.shift
                for kv, eng in engines.items():
                    t0 = time.perf_counter()
                    eng.step(slots[kv], list(chunk), [consumed] * n, setting, None)
                    times[kv].append(time.perf_counter() - t0)
            for kv, eng in engines.items():
                for slot in slots[kv]:
                    eng.close(slot)
            med = {kv: statistics.median(t[2:]) for kv, t in times.items()}
            print(f"  {dtype} compute, {n:3d} streams: {dtype} state {1000 * med['auto']:7.1f} ms, int8 state "
                  f"{1000 * med['int8']:7.1f} ms  (x{med['int8'] / med['auto']:.2f})")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget-gib", type=float, default=1.0)
    p.add_argument("--speed", action="store_true")
    p.add_argument("--streams", default="1,16")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtypes", default="fp32,bf16", help="compute dtypes of the --speed runs")
    args = p.parse_args()
    budget = int(args.budget_gib * 2**30)
    conformer_rows(budget)
    whisper_rows(budget)
    if args.speed:
        speed([int(s) for s in args.streams.split(",")], args.seconds, args.threads, args.dtypes.split(","))


if __name__ == "__main__":
    main()
