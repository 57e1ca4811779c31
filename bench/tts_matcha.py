"""Matcha-TTS + HiFi-GAN on this CPU: time to first audio and real-time factor, one by one vs batched (same run).

Random weights of the published sizes: Matcha's LJSpeech config (configs/model: RoPE encoder 192 channels x 6
layers, U-Net channels [256, 256], 2 mid blocks, SnakeBeta) and HiFi-GAN v1 (512 initial channels, rates
8-8-2-2, resblock 1). Durations are set near 3 frames per input id (blanks included), about what a trained
LJSpeech Matcha gives. The mel is vocoded in streaming chunks (`Generator.stream`), so the first audio is the first
chunk of the first utterance: encoder + all ODE steps for that utterance (its batch, when batched) + one vocoder
chunk with its right context.

For N utterances: "one by one" synthesizes and vocodes each in turn; "batched" runs the N through Matcha as one
padded batch and vocodes the N streams together, chunk by chunk. RTF = wall time / seconds of audio.

    .venv/bin/python bench/tts_matcha.py [--steps 10] [--counts 1 4 16] [--chunk 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SENTENCES = [
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
]
HIFIGAN_V1 = {"resblock": "1", "upsample_rates": [8, 8, 2, 2], "upsample_kernel_sizes": [16, 16, 4, 4],
              "upsample_initial_channel": 512, "resblock_kernel_sizes": [3, 7, 11],
              "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "num_mels": 80, "hop_size": 256,
              "sampling_rate": 22050}


def run(model, voc, seqs, steps, chunk, batched):
    """(seconds to first audio, wall seconds, seconds of audio)."""
    t0 = time.perf_counter()
    first = None
    samples = 0
    groups = [seqs] if batched else [[s] for s in seqs]
    for group in groups:
        x = torch.zeros(len(group), max(map(len, group)), dtype=torch.long)
        for i, s in enumerate(group):
            x[i, :len(s)] = torch.tensor(s)
        out = model.synthesise(x, torch.tensor([len(s) for s in group]), n_timesteps=steps, temperature=0.667)
        lengths = [int(n) for n in out["mel_lengths"]]
        states = [voc.new_state() for _ in group]
        pos = 0
        while any(not st.finished for st in states):
            b = pos + chunk
            mels = [out["mel"][i, :, pos:min(b, n)] for i, n in enumerate(lengths)]
            audio = voc.stream(states, mels, [b >= n for n in lengths])
            if first is None and audio[0].numel():
                first = time.perf_counter() - t0
            samples += sum(a.numel() for a in audio)
            pos = b
    wall = time.perf_counter() - t0
    return first, wall, samples / 22050


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--chunk", type=int, default=32, help="vocoder chunk in mel frames")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from matcha_factories import LJSPEECH, random_matcha

    from chorus.tts.hifigan import Generator, HifiGanConfig
    from chorus.tts.matcha import text_to_ids

    model, _ = random_matcha(LJSPEECH, seed=0)
    torch.manual_seed(0)
    voc = Generator(HifiGanConfig.from_dict(HIFIGAN_V1)).eval()
    n_m = sum(p.numel() for p in model.parameters()) / 1e6
    n_v = sum(p.numel() for p in voc.parameters()) / 1e6
    if shutil.which("espeak-ng"):
        ids = [text_to_ids(s) for s in SENTENCES]
    else:  # no espeak-ng: ids of similar lengths
        ids = [[(7 * i + j) % 177 + 1 for j in range(2 * len(s) + 1)] for i, s in enumerate(SENTENCES)]
    f = voc.receptive_field()
    print(f"Matcha {n_m:.1f} M params, HiFi-GAN v1 {n_v:.1f} M params, {args.steps} Euler steps, "
          f"vocoder chunk {args.chunk} frames (+{f.left}/{f.right} context), {args.threads} threads")
    with torch.inference_mode():
        run(model, voc, ids[:1], 2, args.chunk, False)  # warm-up
    rows = []
    for n in args.counts:
        seqs = (ids * ((n + len(ids) - 1) // len(ids)))[:n]
        for batched in (False, True):
            with torch.inference_mode():
                first, wall, secs = run(model, voc, seqs, args.steps, args.chunk, batched)
            rows.append({"utterances": n, "mode": "batched" if batched else "one by one", "first_audio_s": first,
                         "wall_s": wall, "audio_s": secs, "rtf": wall / secs})
            r = rows[-1]
            print(f"{n:3d} utt {r['mode']:>10}: first audio {first:6.2f} s, {secs:6.1f} s of audio in {wall:6.2f} s,"
                  f" RTF {r['rtf']:.3f}", flush=True)
        one, bat = rows[-2], rows[-1]
        print(f"    batched / one by one: wall x{bat['wall_s'] / one['wall_s']:.2f}, "
              f"first audio x{bat['first_audio_s'] / one['first_audio_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
