"""A tiny model in Piper's ONNX I/O layout, exported from torch, with a small .onnx.json (for tests/test_piper.py).

Like VITS it respects `input_lengths` (padding is masked), turns each id into a number of frames from
length_scale (`Ceil`, so the graph's durations can be exposed as Piper's are), and upsamples frames to audio by a
hop length; audio depends only on an item's own ids, so batched and one-by-one synthesis can be compared.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

HOP = 16
ID_MAP = {"_": [0], "^": [1], "$": [2], " ": [3], ".": [4], ",": [5], "a": [6], "b": [7], "h": [8], "ə": [9],
          "l": [10], "ˈ": [11], "o": [12], "ʊ": [13], "ð": [14], "ɛ": [15], "ɹ": [16], "?": [17], "̃": [18]}
MAX_FRAMES = 3


class TinyPiper(torch.nn.Module):
    def __init__(self, num_symbols: int = 32, speakers: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(num_symbols, HOP, generator=g) * 0.3)
        self.dur = torch.nn.Parameter(torch.rand(num_symbols, generator=g) + 0.5)
        self.spk = torch.nn.Parameter(torch.randn(max(speakers, 1), HOP, generator=g) * 0.1)
        self.speakers = speakers

    def forward(self, input, input_lengths, scales, sid=None):  # noqa: A002 (Piper's input name)
        b, t = input.shape
        mask = (torch.arange(t).unsqueeze(0) < input_lengths.unsqueeze(1)).float()  # [b, t]
        w = self.dur[input] * mask * scales[1]
        w_ceil = torch.ceil(torch.clamp(w, max=float(MAX_FRAMES))).unsqueeze(1)  # [b, 1, t]
        frames = w_ceil.squeeze(1).long()  # frames per id
        y_len = torch.clamp_min(frames.sum(1), 1)
        max_len = t * MAX_FRAMES
        # frame j of item i plays the id whose cumulative span holds j
        ends = torch.cumsum(frames, 1)  # [b, t]
        j = torch.arange(max_len).view(1, max_len, 1)
        which = (j >= ends.unsqueeze(1)).sum(2).clamp(max=t - 1)  # [b, max_len]
        ids = torch.gather(input, 1, which)
        x = self.emb[ids]  # [b, max_len, HOP]
        if sid is not None:
            x = x + self.spk[sid].unsqueeze(1)
        x = torch.tanh(x + 0.0 * scales[0] + 0.0 * scales[2])
        fmask = (torch.arange(max_len).unsqueeze(0) < y_len.unsqueeze(1)).float().unsqueeze(2)
        audio = (x * fmask).reshape(b, 1, 1, max_len * HOP)
        return audio, w_ceil


def config(sample_rate: int = 16000, speakers: int = 1, **extra) -> dict:
    out = {"audio": {"sample_rate": sample_rate, "quality": "x_low"}, "espeak": {"voice": "en-us"},
           "inference": {"noise_scale": 0.667, "length_scale": 1.0, "noise_w": 0.8}, "phoneme_type": "espeak",
           "num_symbols": 32, "num_speakers": speakers, "speaker_id_map": {}, "phoneme_id_map": ID_MAP,
           "hop_length": HOP, "piper_version": "1.0.0"}
    out.update(extra)
    return out


def make_voice(folder: Path, name: str = "tiny", speakers: int = 1, cfg: dict | None = None) -> Path:
    """Write folder/name.onnx (only the `output` is kept as a graph output, as in Piper's voices) and its json."""
    folder.mkdir(parents=True, exist_ok=True)
    model = TinyPiper(speakers=speakers).eval()
    onnx_path = folder / f"{name}.onnx"
    args = (torch.tensor([[1, 0, 6, 0, 2]]), torch.tensor([5]), torch.tensor([0.667, 1.0, 0.8]))
    names = ["input", "input_lengths", "scales"]
    axes = {"input": {0: "batch_size", 1: "phonemes"}, "input_lengths": {0: "batch_size"},
            "output": {0: "batch_size", 3: "time"}}
    if speakers > 1:
        args += (torch.tensor([0]),)
        names.append("sid")
        axes["sid"] = {0: "batch_size"}

    class OutputOnly(torch.nn.Module):  # Piper's export returns the audio only
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a):
            return self.inner(*a)[0]

    torch.onnx.export(OutputOnly(model), args, str(onnx_path), input_names=names, output_names=["output"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    (folder / f"{name}.onnx.json").write_text(json.dumps(cfg if cfg is not None else config(speakers=speakers)),
                                               encoding="utf-8")
    return onnx_path
