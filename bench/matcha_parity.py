"""chorus' Matcha-TTS against Matcha's own `MatchaTTS.synthesise`, same checkpoint, same initial noise.

Matcha's code is not part of chorus and is never committed: point --matcha-src at a checkout of
shivammehta25/Matcha-TTS (the folder holding `matcha/`), and --deps at a folder with what its model modules
import (`pip install --target DEPS "diffusers==0.25.0" "huggingface_hub<0.26" einops "conformer==0.3.2"
--no-deps`, plus pillow / importlib_metadata for diffusers). Lightning, Hydra and the Cython monotonic alignment
are stubbed: synthesis does not use them.

The run: a random-weight Matcha of the given size is written as a Lightning `.ckpt` in Matcha's layout
(tests/matcha_factories.py), read by chorus' restricted loader, and its state dict loaded (strict) into Matcha's
MatchaTTS built from the same hyper-parameters. For each sentence, Matcha's synthesise runs with torch.randn_like
recorded; chorus then runs with that noise. Reported: max |mel difference| per sentence alone, and for chorus'
batch of all sentences against Matcha's sentences alone.

    .venv/bin/python bench/matcha_parity.py --matcha-src /tmp/ref --deps /tmp/mdeps [--size ljspeech]
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SENTENCES = ["Hello world.", "The quick brown fox jumps over the lazy dog.",
             "Doctor Smith paid nineteen dollars, twice; really?",
             "Flow matching turns noise into speech in a handful of steps."]


def import_matcha(src: Path, deps: Path | None):
    if deps is not None:
        sys.path.insert(0, str(deps))
    sys.path.insert(0, str(src))

    def stub(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    utils = stub("matcha.utils", get_pylogger=logging.getLogger)
    utils.__path__ = [str(src / "matcha" / "utils")]  # matcha.utils.model is imported from its file
    stub("matcha.utils.pylogger", get_pylogger=logging.getLogger)
    stub("matcha.utils.monotonic_align", maximum_path=None)

    class BaseLightningClass(torch.nn.Module):
        def save_hyperparameters(self, *a, **k):
            pass

        def update_data_statistics(self, data_statistics):
            if data_statistics is None:
                data_statistics = {"mel_mean": 0.0, "mel_std": 1.0}
            self.register_buffer("mel_mean", torch.tensor(data_statistics["mel_mean"]))
            self.register_buffer("mel_std", torch.tensor(data_statistics["mel_std"]))

    stub("matcha.models.baselightningmodule", BaseLightningClass=BaseLightningClass)
    return importlib.import_module("matcha.models.matcha_tts").MatchaTTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matcha-src", type=Path, required=True)
    ap.add_argument("--deps", type=Path)
    ap.add_argument("--size", choices=["tiny", "ljspeech"], default="ljspeech")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.667)
    ap.add_argument("--length-scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from matcha_factories import LJSPEECH, TINY, random_matcha, write_checkpoint

    from chorus.tts.matcha import load_matcha, text_to_ids

    RefMatcha = import_matcha(args.matcha_src, args.deps)
    model, cfg = random_matcha(LJSPEECH if args.size == "ljspeech" else TINY, seed=1)
    with tempfile.TemporaryDirectory() as d:
        ckpt = write_checkpoint(Path(d) / "matcha.ckpt", model, cfg)
        ours, hp = load_matcha(ckpt)
    m = cfg.model
    ref = RefMatcha(n_vocab=m.n_vocab, n_spks=m.n_spks, spk_emb_dim=m.spk_emb_dim, n_feats=m.n_feats,
                    encoder=m.encoder, decoder=m.decoder, cfm=m.cfm, data_statistics=m.data_statistics,
                    out_size=m.out_size)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref.eval()

    ids = [text_to_ids(s) for s in SENTENCES]
    ref_mels, noises = [], []
    real_randn_like = torch.randn_like
    for seq in ids:
        drawn = []

        def recording_randn_like(t, *a, **k):
            z = real_randn_like(t, *a, **k)
            drawn.append(z.clone())
            return z

        torch.randn_like = recording_randn_like
        try:
            x = torch.tensor([seq])
            out = ref.synthesise(x, torch.tensor([len(seq)]), n_timesteps=args.steps, temperature=args.temperature,
                                 length_scale=args.length_scale)
        finally:
            torch.randn_like = real_randn_like
        ref_mels.append(out["mel"][0])
        noises.append(drawn[0][0])

    print(f"size {args.size}, {args.steps} Euler steps, temperature {args.temperature}, "
          f"length_scale {args.length_scale}")
    worst = 0.0
    for seq, ref_mel, z in zip(ids, ref_mels, noises):
        o = ours.synthesise(torch.tensor([seq]), torch.tensor([len(seq)]), n_timesteps=args.steps,
                            temperature=args.temperature, length_scale=args.length_scale, noise=[z])
        diff = (o["mel"][0] - ref_mel).abs().max().item() if o["mel"].shape[-1] == ref_mel.shape[-1] else float("inf")
        worst = max(worst, diff)
        print(f"  alone: {len(seq):3d} ids -> {ref_mel.shape[-1]:4d} frames  max|mel - Matcha| = {diff:.3g}")
    x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, seq in enumerate(ids):
        x[i, :len(seq)] = torch.tensor(seq)
    o = ours.synthesise(x, torch.tensor([len(s) for s in ids]), n_timesteps=args.steps,
                        temperature=args.temperature, length_scale=args.length_scale, noise=noises)
    for i, ref_mel in enumerate(ref_mels):
        n = int(o["mel_lengths"][i])
        diff = (o["mel"][i, :, :n] - ref_mel).abs().max().item() if n == ref_mel.shape[-1] else float("inf")
        worst = max(worst, diff)
        print(f"  batch of {len(ids)}, item {i}: max|mel - Matcha alone| = {diff:.3g}")
    print(f"worst {worst:.3g} ({'within' if worst <= 1e-4 else 'OVER'} 1e-4)")


if __name__ == "__main__":
    main()
