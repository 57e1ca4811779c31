"""Parity of chorus' streaming Paraformer with FunASR's own code, on a random-weight model.

Run with a Python that has FunASR installed (never the project's venv; FunASR is not a chorus
dependency), e.g.:
    python3 -m venv /tmp/funasr-venv
    echo $PWD/.venv/lib/python3.11/site-packages > /tmp/funasr-venv/lib/python3.11/site-packages/zz.pth
    /tmp/funasr-venv/bin/pip install --no-deps funasr omegaconf antlr4-python3-runtime==4.9.3 kaldiio
    PYTHONPATH=.:tests /tmp/funasr-venv/bin/python bench/paraformer_parity.py
(FunASR >= 1.4 computes fbank with kaldi-native-fbank when torchaudio is absent, so no shim is
needed.)  Writes a tiny FunASR directory with chorus' writer, runs FunASR's AutoModel streaming
loop (generate chunk by chunk, is_final on the last) and chorus' streaming on the same audio, and
prints whether the tokens are identical and the largest feature / encoder differences.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from paraformer_factories import speechlike, write_tiny_dir  # noqa: E402

from chorus.asr.paraformer.loader import load_funasr_dir  # noqa: E402
from chorus.asr.paraformer.streaming import ChunkSetting, ParaformerStream, ParaformerStreamer  # noqa: E402


def funasr_stream(model, audio, setting, hooks):
    """FunASR's documented streaming loop; returns tokens, per-chunk features and encoder outputs."""
    c1 = setting.chunk_size[1]
    stride = c1 * 960
    cache, tokens = {}, []
    hooks.clear()
    n = (len(audio) - 1) // stride + 1
    for i in range(n):
        piece = audio[i * stride:(i + 1) * stride].numpy()
        res = model.generate(input=piece, cache=cache, is_final=i == n - 1,
                             chunk_size=list(setting.chunk_size),
                             encoder_chunk_look_back=setting.encoder_look_back,
                             decoder_chunk_look_back=setting.decoder_look_back, disable_pbar=True)
        tokens.append(res[0]["text"])
    return tokens, [h for h in hooks if h[0] == "feats"], [h for h in hooks if h[0] == "enc"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, nargs="*", default=[2.43, 3.0, 3.05, 1.7, 0.5])
    args = ap.parse_args()
    from funasr import AutoModel
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_dir(Path(tmp))
        fun = AutoModel(model=tmp, disable_update=True, device="cpu", disable_log=True)
        ours = load_funasr_dir(tmp)
        inner = fun.model
        hooks: list = []
        enc_fwd = inner.encoder.forward_chunk

        def spy(xs_pad, ilens, cache=None, **kw):
            hooks.append(("feats", xs_pad.detach().clone()))
            out = enc_fwd(xs_pad, ilens, cache=cache, **kw)
            hooks.append(("enc", out[0].detach().clone()))
            return out
        inner.encoder.forward_chunk = spy
        ok_all = True
        for setting in [ChunkSetting((0, 10, 5), 4, 1), ChunkSetting((5, 10, 5), 4, 1), ChunkSetting((0, 10, 5), 1, 0)]:
            streamer = ParaformerStreamer(ours.model, settings=[setting], slots=1)
            for sec in args.seconds:
                audio = speechlike(sec, seed=int(sec * 100))
                texts, f_feats, f_enc = funasr_stream(fun, audio, setting, hooks)
                s = ParaformerStream(ours.frontend, setting)
                s.accept(audio)
                s.finish()
                slot = streamer.open()
                our_tokens, feats, encs = [], [], []
                while s.ready():
                    f, final = s.take()
                    feats.append(f)
                    r = streamer.step([slot], [f], [final], setting)[0]
                    encs.append(r.encoded)
                    our_tokens += r.tokens
                streamer.close(slot)
                fun_tokens = " ".join(t for t in texts if t).split()
                ours_text = ours.ids_to_tokens(our_tokens)
                same = "".join(fun_tokens) == "".join(ours_text)
                # Features: what FunASR's encoder got (cloned before it scales them in place),
                # for the chunks that had new frames (the tail step reuses the cached overlap).
                fd = max([(ff[1][0] - f).abs().max().item() for ff, f in zip(f_feats, feats)
                          if f.shape[0] and ff[1][0].shape == f.shape] or [0.0])
                ed = max((fe[1][0] - e).abs().max().item() for fe, e in zip(f_enc, encs)) \
                    if len(f_enc) == len(encs) else float("nan")
                ok_all &= same and ed <= 1e-4
                print(f"{str(list(setting.chunk_size)):11} lb {setting.encoder_look_back}/{setting.decoder_look_back} "
                      f"{sec:5.2f}s chunks {len(encs)}/{len(f_enc)} tokens {len(ours_text):3d} identical {same} "
                      f"max|feat diff| {fd:.2e} max|enc diff| {ed:.2e}")
                if not same:
                    print("   funasr:", "".join(fun_tokens), "\n   chorus:", "".join(ours_text))
        print("ALL IDENTICAL" if ok_all else "DIFFERENCES FOUND")


if __name__ == "__main__":
    main()
