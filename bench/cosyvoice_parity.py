#!/usr/bin/env python3
"""chorus vs CosyVoice's own code on one random-weight CosyVoice 2 checkpoint: mel and audio of every streamed chunk.

    .venv/bin/python bench/cosyvoice_parity.py [--cosy-python /work/cosy-venv/bin/python] [--tokens 260]

Runs in chorus's venv; CosyVoice runs in its own venv through bench/cosyvoice_reference.py (subprocesses).

1. The checkpoint: cosyvoice2.yaml is written here (tests/cosyvoice_factories.py: CosyVoice 2's yaml with smaller
   numbers: 2 encoder blocks, a 64-channel estimator with 2 mid blocks, a 32-channel HiFT); CosyVoice builds its own
   flow and HiFTGenerator from it with HyperPyYAML, gives them random weights and saves flow.pt and hift.pt
   (`reference make`), so the state-dict layout (weight norm as parametrizations included) is CosyVoice's.
   The encoder keeps 512 channels: CosyVoice's UpsampleConformerEncoder hard-codes its pre-lookahead and
   upsampling layers to 512, so its code runs no other width.
2. CosyVoice: CosyVoice2Model.tts(stream=True) as is, its LLM replaced by the given speech tokens
   (`reference stream`): its hop schedule, token2wav re-running the flow over every token so far, the HiFT caches.
3. chorus: load_flow / load_hift from the same files and yaml; the flow's cached streamer on the same hop schedule
   (streaming.stream_utterance, final chunk exact) and HiftStreamer with the same seed as CosyVoice's global RNG.

Reported per chunk: the largest |mel difference| (the new frames token2wav vocodes), the largest |audio difference|
of chorus end to end, and of chorus's HiftStreamer fed CosyVoice's own mel (the HiFT half alone). Exit status 1 if
a mel differs by more than --mel-tol (1e-4) or the HiFT half by more than --audio-tol (1e-4); the end-to-end audio
inherits the mel's differences through the source's phase, so it is reported, not gated.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from cosyvoice_factories import TINY_FLOW, TINY_HIFT, flow_yaml, hift_yaml  # noqa: E402

from chorus.tts.cosyvoice.checkpoint import flow_config, load_flow, read_model_yaml  # noqa: E402
from chorus.tts.cosyvoice.hift import HiftStreamer, load_hift  # noqa: E402
from chorus.tts.cosyvoice.streaming import FlowStreamer, stream_utterance  # noqa: E402

# CosyVoice's encoder width (its PreLookaheadLayer and Upsample1D are built with 512 channels whatever the yaml says)
BENCH_FLOW = {**TINY_FLOW, "vocab_size": 6561, "encoder_dim": 512, "attention_heads": 8, "linear_units": 512,
              "num_blocks": 2, "estimator_channels": 64, "attention_head_dim": 32, "num_heads": 2, "n_blocks": 1,
              "num_mid_blocks": 2}
BENCH_HIFT = {**TINY_HIFT, "base_channels": 32, "f0_predictor": {**TINY_HIFT["f0_predictor"], "cond_channels": 32}}
COSY_PYTHON = "/work/cosy-venv/bin/python"


def reference(cosy_python: str, *args: str) -> None:
    cmd = [cosy_python, str(REPO / "bench" / "cosyvoice_reference.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")


def write_checkpoint(model_dir: Path, cosy_python: str, seed: int = 0) -> None:
    """cosyvoice2.yaml (bench sizes) and CosyVoice's own flow.pt / hift.pt with random weights."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "cosyvoice2.yaml").write_text(flow_yaml(BENCH_FLOW) + hift_yaml(BENCH_HIFT))
    reference(cosy_python, "make", str(model_dir), "--seed", str(seed))


def stream_inputs(n_tokens: int, prompt_tokens: int, seed: int, vocab: int = 6561) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, vocab, (1, n_tokens), generator=g, dtype=torch.int32),
            "prompt_token": torch.randint(0, vocab, (1, prompt_tokens), generator=g, dtype=torch.int32),
            "prompt_feat": torch.randn(1, 2 * prompt_tokens, 80, generator=g),
            "embedding": torch.randn(1, 192, generator=g), "seed": torch.tensor(seed)}


def load_chorus(model_dir: Path):
    doc = read_model_yaml(model_dir)
    return load_flow(model_dir / "flow.pt", flow_config(doc)), load_hift(model_dir / "hift.pt", doc["hift"])


def chorus_stream(flow, hift, inputs: dict, max_frames: int) -> tuple[list, list]:
    streamer = FlowStreamer(flow, slots=1, max_frames=max_frames)
    mels = stream_utterance(streamer, inputs["tokens"][0].tolist(), inputs["embedding"][0],
                            inputs["prompt_token"][0].tolist(), inputs["prompt_feat"][0], final="exact")
    voc = HiftStreamer(hift, generator=int(inputs["seed"]))
    return mels, [voc.push(m, finalize=i == len(mels) - 1) for i, m in enumerate(mels)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cosy-python", default=COSY_PYTHON)
    ap.add_argument("--tokens", type=int, default=260)
    ap.add_argument("--prompt-tokens", type=int, default=7)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--mel-tol", type=float, default=1e-4)
    ap.add_argument("--audio-tol", type=float, default=1e-4)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model_dir = work / "model"
        write_checkpoint(model_dir, args.cosy_python)
        inputs = stream_inputs(args.tokens, args.prompt_tokens, args.seed)
        torch.save(inputs, work / "inputs.pt")
        reference(args.cosy_python, "stream", str(model_dir), str(work / "inputs.pt"), str(work / "ref.pt"))
        ref = torch.load(work / "ref.pt", weights_only=True)["chunks"]
        flow, hift = load_chorus(model_dir)
        mels, audio = chorus_stream(flow, hift, inputs, max_frames=2 * (args.tokens + args.prompt_tokens) + 50)
        voc = HiftStreamer(hift, generator=args.seed)
        hift_only = [voc.push(c["mel"], finalize=i == len(ref) - 1) for i, c in enumerate(ref)]

    print(f"CosyVoice 2 parity: {args.tokens} speech tokens, {args.prompt_tokens} prompt tokens, seed {args.seed}; "
          f"flow {BENCH_FLOW}, HiFT base_channels {BENCH_HIFT['base_channels']}")
    if len(mels) != len(ref):
        sys.exit(f"chunk count differs: chorus {len(mels)}, CosyVoice {len(ref)}")
    print("| chunk | token offset | mel frames | max abs mel diff | audio samples | max abs audio diff (end to end) "
          "| max abs audio diff (HiFT half on CosyVoice's mel) | CosyVoice audio peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    worst_mel = worst_hift = 0.0
    for i, (c, m, a, h) in enumerate(zip(ref, mels, audio, hift_only)):
        if m.shape != c["mel"].shape or a.shape != c["audio"].shape or h.shape != c["audio"].shape:
            sys.exit(f"chunk {i + 1}: shapes differ: mel {tuple(m.shape)} vs {tuple(c['mel'].shape)}, audio "
                     f"{tuple(a.shape)} / {tuple(h.shape)} vs {tuple(c['audio'].shape)}")
        dm = (m - c["mel"]).abs().max().item()
        da = (a - c["audio"]).abs().max().item()
        dh = (h - c["audio"]).abs().max().item()
        worst_mel, worst_hift = max(worst_mel, dm), max(worst_hift, dh)
        print(f"| {i + 1}{' (final)' if c['finalize'] else ''} | {c['token_offset']} | {m.shape[2]} | {dm:.2e} | "
              f"{a.shape[1]} | {da:.2e} | {dh:.2e} | {c['audio'].abs().max().item():.3f} |")
    ok = worst_mel <= args.mel_tol and worst_hift <= args.audio_tol
    print(f"worst mel {worst_mel:.2e} (tolerance {args.mel_tol:g}), worst HiFT-half audio {worst_hift:.2e} "
          f"(tolerance {args.audio_tol:g}): {'OK' if ok else 'DIFFERENT'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
