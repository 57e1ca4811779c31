#!/usr/bin/env python3
"""chorus' FastConformer in fp32 / bf16 / int8 against NeMo fp32, and against the machine's GEMM peak.

    python bench/roofline.py --nemo-python /work/nemo-venv/bin/python                 # 1, 16, 64 streams
    python bench/roofline.py --streams 1,16 --seconds 3 --repeats 3 --dtypes fp32,int8  # without NeMo

Same model and workload as bench/conformer_streaming.py's comparison with NeMo (its helpers are reused): the
real size (17 layers, d_model 512, ~115 M parameters, random weights with calibrated heads), att_context_size
[70, 6], N streams of --seconds of jfk looped, all starting together, one batched step per chunk; NeMo runs
its own conformer_stream_step on the same .nemo in its venv (a bench/nemo_reference.py bench-serve worker).
The passes are made in rounds: a NeMo pass, then chorus' in each dtype, so that each round's ratio compares
passes seconds apart; "paired rounds" is the median of those ratios, the column to quote on a shared host.

First the bench measures the machine's matrix-product peak on --threads threads (best of a few large
products): fp32 and bf16 `torch.mm`, int8 `torch._int_mm` (int8 x int8 -> int32).  Then each run's
"useful" work is counted analytically: the encoder's products per audio second for the frames a step adds
(every linear once per new frame; attention scores and weighted sums over the 70 + 7 frame window; the
subsampling's output projection), ~2.7 GFLOP per audio second.  NeMo does more (it projects K and V of all
cached frames again every step); that extra work is not counted, so "fraction of peak" says how close each
run gets to the cheapest way of doing the same maths at the dtype's peak.

The box is shared (other processes are counted as in conformer_streaming.py and noisy passes re-run); quote
medians and ratios from one run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import conformer_streaming as cs  # noqa: E402  (the bench's model, workload and pass helpers)

from chorus.asr.conformer.asr_model import FastConformerModel  # noqa: E402
from chorus.asr.conformer.checkpoint import save_fastconformer  # noqa: E402
from chorus.asr.conformer.precision import apply_dtype  # noqa: E402
from chorus.asr.conformer.streaming import ConformerStreamer  # noqa: E402
from chorus.codecs import read_audio, resample  # noqa: E402

CONTEXT = (70, 6)


def measure_peaks(repeats: int = 5) -> dict[str, float]:
    """Best GFLOP/s (GOP/s for int8) of large products on this process' threads."""
    out = {}
    n = 2048
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        if dtype == torch.int8:
            a = torch.randint(-127, 127, (n, n), dtype=torch.int8)
            b = torch.randint(-127, 127, (n, n), dtype=torch.int8)
            mm = torch._int_mm
        else:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            mm = torch.mm
        mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            mm(a, b)
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n ** 3 / best / 1e9
    return out


def useful_gflop_per_audio_second(model: FastConformerModel, context) -> float:
    """The encoder's multiply-adds x 2 per audio second when each frame is projected once."""
    cfg = model.spec.encoder
    d, ff, heads = cfg.d_model, cfg.d_model * cfg.ff_expansion_factor, cfg.n_heads
    left, right = context
    window = left + right + 1                        # keys a query of a chunk sees at most
    linear = 4 * d * ff + 3 * d * d + d * d + d * 2 * d + d * d   # two feed-forwards, qkv, out, pointwise 1 and 2
    attention = heads * (d // heads) * (window + (2 * window - 1) + window)  # q.k, q.p (rel-pos), a.v
    depthwise = d * cfg.conv_kernel_size
    per_frame = cfg.n_layers * (linear + attention + depthwise)
    pre = model.encoder.pre_encode.out
    per_frame += pre.in_features * pre.out_features
    frames_per_second = model.spec.mel.sample_rate / model.spec.mel.hop_length / cfg.subsampling_factor
    return 2 * per_frame * frames_per_second / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="1,16,64")
    p.add_argument("--dtypes", default="fp32,bf16,int8")
    p.add_argument("--modes", default="encoder,rnnt", help="subset of encoder,rnnt")
    p.add_argument("--seconds", type=float, default=4.0, help="audio seconds per stream in one pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--audio", default=str(cs.DEFAULT_AUDIO))
    p.add_argument("--tokens-per-frame", type=float, default=0.25)
    p.add_argument("--max-symbols", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offset-step", type=float, default=0.37)
    p.add_argument("--noise-threshold", type=float, default=0.05)
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--nemo-python", default=None, help="python of the NeMo venv (NeMo fp32 in the same run)")
    p.add_argument("--json", default=None)
    p.add_argument("--table", default=None, metavar="JSON", help="print the table of a saved --json report and exit")
    args = p.parse_args()
    if args.table:
        with open(args.table) as f:
            saved = json.load(f)
        sargs = saved["argv"]
        opt = lambda name, default: sargs[sargs.index(name) + 1] if name in sargs else default  # noqa: E731
        print_table(saved, [int(x) for x in opt("--streams", args.streams).split(",")],
                    [d for d in opt("--dtypes", args.dtypes).split(",") if d], opt("--modes", args.modes).split(","))
        return 0

    streams = [int(s) for s in args.streams.split(",")]
    dtypes = [d for d in args.dtypes.split(",") if d]
    modes = [m for m in args.modes.split(",") if m]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    peaks = measure_peaks()
    print(f"GEMM peak measured here ({torch.get_num_threads()} threads, 2048^3 products, best of 5): "
          f"fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s, int8 {peaks['int8']:.0f} GOP/s",
          flush=True)

    model = FastConformerModel(cs.real_spec(1024, args.max_symbols)).eval()
    raw, rate = read_audio(args.audio)
    audio = resample(raw, rate, cs.SR)
    rng = cs.np.random.default_rng(args.seed + 12345)
    clips = [audio] + [cs.loop_clip(audio, int(rng.integers(len(audio))), int(rng.uniform(2, 10) * cs.SR))
                       for _ in range(8)]
    cs.calibrate_heads(model, clips, CONTEXT, args.tokens_per_frame)
    gflop = useful_gflop_per_audio_second(model, CONTEXT)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; useful encoder work "
          f"{gflop:.2f} GFLOP per audio second (each frame projected once)", flush=True)

    report: dict = dict(argv=sys.argv[1:], threads=torch.get_num_threads(), peaks=peaks,
                        useful_gflop_per_audio_second=gflop, chorus={})
    import soundfile as sf
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "audio16k.wav")
        sf.write(wav, audio, cs.SR, subtype="FLOAT")
        audio32 = sf.read(wav, dtype="float32")[0]
        nemo_path = os.path.join(tmp, "real_size.nemo")
        if args.nemo_python:
            save_fastconformer(nemo_path, model, cs.synthetic_tokenizer(1024, args.seed))
        models = {dtype: apply_dtype(copy.deepcopy(model), dtype) for dtype in dtypes}
        engines = {dtype: ConformerStreamer(m, slots=max(streams)) for dtype, m in models.items()}
        for dtype, eng in engines.items():
            slot_mib = eng.spec.bytes_per_slot / 2**20
            report["chorus"][dtype] = {"slot_mib": slot_mib}
            print(f"[chorus {dtype}] {slot_mib:.3f} MiB per slot", flush=True)
        # NeMo runs in its own venv as a worker that times one pass per request, so each round is a NeMo
        # pass and then chorus' in each dtype, seconds apart: the ratios compare passes made under the
        # same load of a shared machine (whose speed swings by up to 2x over minutes), round by round.
        nemo = NemoWorker(args, nemo_path, wav) if args.nemo_python else None
        try:
            for n in streams:
                runs = {dtype: (models[dtype], eng, eng.setting(CONTEXT)) for dtype, eng in engines.items()}
                work = {dtype: cs.sync_workload(m, setting, cs.sync_audio(audio32, n, args.seconds, args.offset_step))
                        for dtype, (m, _, setting) in runs.items()}
                for mode in modes:
                    passes: dict = {dtype: [] for dtype in runs}
                    tries: dict = {dtype: [] for dtype in runs}
                    nemo_passes, nemo_tries = [], []

                    def chorus_pass(dtype):
                        _, eng, setting = runs[dtype]
                        return cs.run_pass(eng, setting, work[dtype], mode, True, cs.nullcontext())

                    if nemo is not None:
                        nemo.one_pass(n, mode)  # warm-up pass
                    for dtype in runs:
                        chorus_pass(dtype)  # warm-up pass
                    for _ in range(args.repeats):
                        if nemo is not None:
                            nemo_passes.append(cs.clean_pass(lambda: nemo.one_pass(n, mode), args, nemo_tries))
                        for dtype in runs:
                            passes[dtype].append(cs.clean_pass(lambda: chorus_pass(dtype), args, tries[dtype]))
                    if nemo is not None:
                        r = nemo_summary(nemo_passes, nemo_tries)
                        report.setdefault("nemo", {"results": {}})["results"].setdefault(str(n), {})[mode] = r
                        print(f"  NeMo fp32 {n:3d} streams {mode:7s} {r['wall']:7.2f} s  "
                              f"{r['audio_seconds'] / r['wall']:6.2f} audio-s/s  foreign CPU per try {nemo_tries}",
                              flush=True)
                    for dtype in runs:
                        s = cs.summarize(passes[dtype], n, runs[dtype][2].chunk_ms / 1000)
                        s["foreign_tries"] = tries[dtype]
                        s["token_ids"] = passes[dtype][0].tokens
                        if nemo_passes:  # chorus/NeMo throughput of each round, then their median
                            s["round_ratios"] = [(c.audio_seconds / c.wall) / (m.audio_seconds / m.wall)
                                                 for c, m in zip(passes[dtype], nemo_passes)]
                        report["chorus"][dtype].setdefault(str(n), {})[mode] = s
                        print(f"  chorus {dtype} {n:3d} streams {mode:7s} {s['wall']:7.2f} s  "
                              f"{s['throughput']:6.2f} audio-s/s  foreign CPU per try {tries[dtype]}", flush=True)
        finally:
            if nemo is not None:
                nemo.close()

    print_table(report, streams, dtypes, modes)
    if args.json:
        for per in report["chorus"].values():
            for n in streams:
                for mode in modes:
                    per.get(str(n), {}).get(mode, {}).pop("token_ids", None)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


class NemoWorker:
    """bench/nemo_reference.py bench-serve in the NeMo venv: NeMo's own conformer_stream_step on the same
    .nemo and workload, one timed pass per request."""

    def __init__(self, args, nemo_path: str, wav: str):
        cmd = [args.nemo_python, str(HERE / "nemo_reference.py"), "bench-serve", nemo_path, "--audio", wav,
               "--seconds", str(args.seconds), "--threads", str(torch.get_num_threads()),
               "--offset-step", str(args.offset_step), "--att-context-size", *map(str, CONTEXT)]
        print("  $ " + " ".join(cmd), flush=True)
        self.log = tempfile.TemporaryFile(mode="w+")  # NeMo's own logging, shown if the worker fails
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._read("READY")

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        self.log.seek(0)
        raise SystemExit(f"the NeMo worker ended (exit status {self.proc.wait()}):\n{self.log.read()[-6000:]}")

    def one_pass(self, n: int, mode: str) -> cs.Pass:
        self.proc.stdin.write(json.dumps({"streams": n, "mode": mode}) + "\n")
        self.proc.stdin.flush()
        r = json.loads(self._read("PASS_JSON "))
        return cs.Pass(r["wall"], r["steps"], r["audio_seconds"], 0, r["token_ids"], r["foreign"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def nemo_summary(passes: list, tries: list) -> dict:
    walls = [p.wall for p in passes]
    return dict(walls=walls, wall=cs.med(walls), step_median=cs.med([t for p in passes for t in p.step_times]),
                audio_seconds=passes[0].audio_seconds, n_steps=len(passes[0].step_times),
                token_ids=passes[0].tokens, foreign_tries=tries)


def print_table(report, streams, dtypes, modes) -> None:
    peaks, gflop, nemo = report["peaks"], report["useful_gflop_per_audio_second"], report.get("nemo")
    print(f"\n## chorus fp32/bf16/int8 vs NeMo fp32 ({report['threads']} threads; peak fp32 {peaks['fp32']:.0f}, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s, int8 {peaks['int8']:.0f} GOP/s; {gflop:.2f} useful GFLOP per audio s)")
    print("| streams | mode | run | wall s | audio-s/s | x NeMo fp32 | x NeMo, paired rounds | x NeMo, best passes "
          "| useful GFLOP/s | of its dtype's peak | tokens = NeMo |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in streams:
        for mode in modes:
            rows = []
            nemo_tp = nemo_best = None
            if nemo is not None:
                r = nemo["results"][str(n)][mode]
                nemo_tp, nemo_best = r["audio_seconds"] / r["wall"], min(r["walls"])
                rows.append(("NeMo fp32", r["wall"], nemo_tp, min(r["walls"]), "fp32", None, None))
            for dtype in dtypes:
                c = report["chorus"][dtype][str(n)][mode]
                same = c.get("tokens_equal")  # a saved report keeps only this
                if nemo is not None and mode != "encoder" and "token_ids" in c:
                    ids = nemo["results"][str(n)][mode]["token_ids"]
                    same = c["tokens_equal"] = "yes" if c["token_ids"] == ids else \
                        f"{sum(a == b for a, b in zip(c['token_ids'], ids))}/{len(ids)} streams"
                paired = c.get("round_ratios")
                rows.append((f"chorus {dtype}", c["wall"], c["throughput"], min(c["walls"]), dtype, same,
                             cs.med(paired) if paired else None))
            for name, wall, tp, best, dtype, same, paired in rows:
                ratio = f"x{tp / nemo_tp:.2f}" if nemo_tp else "-"
                # Median over rounds of the ratio within a round (a NeMo pass and chorus' seconds apart).
                paired_ratio = f"x{paired:.2f}" if paired else "-"
                # Other tenants of a shared host only ever add time (unseen by the in-machine load count), so
                # the fastest pass of each side is the steadier estimate; both columns are printed.
                best_ratio = f"x{nemo_best / best:.2f}" if nemo_best else "-"
                print(f"| {n} | {mode} | {name} | {wall:.2f} | {tp:.2f} | {ratio} | {paired_ratio} | {best_ratio} "
                      f"| {tp * gflop:.1f} "
                      f"| {tp * gflop / peaks[dtype]:.1%} | {same or '-'} |")


if __name__ == "__main__":
    sys.exit(main())
