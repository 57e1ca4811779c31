"""Tiny random-weight streaming Paraformers written as FunASR model directories (nothing downloaded)."""
from __future__ import annotations

import math

import torch

from chorus.asr.paraformer.frontend import FrontendConfig
from chorus.asr.paraformer.loader import save_funasr_dir
from chorus.asr.paraformer.model import ParaformerConfig, ParaformerStreamingModel

TINY = dict(d_model=16, enc_heads=2, enc_units=32, enc_blocks=3, dec_heads=2, dec_units=32, dec_blocks=2,
            enc_kernel=11, dec_kernel=11, dec_sanm_shfit=5, tail_threshold=0.45)


def tiny_tokens(n: int = 12) -> list[str]:
    return ["<blank>", "<s>", "</s>"] + [chr(0x4e00 + i) for i in range(n - 4)] + ["<unk>"]


def tiny_paraformer(seed: int = 0, **overrides) -> ParaformerStreamingModel:
    cfg = ParaformerConfig(vocab_size=overrides.pop("vocab_size", 12), **{**TINY, **overrides})
    g = torch.Generator().manual_seed(seed)
    model = ParaformerStreamingModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm3.weight") \
                    or name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        # CIF weights near 0.3-0.6 per frame, so tokens fire every two or three frames.
        model.predictor.cif_output.bias.fill_(-0.5)
        # Keep blank/sos/eos from winning every argmax, so the tests compare real token ids.
        model.decoder.output_layer.bias[:3] -= 3.0
    return model.eval()


def tiny_cmvn(dim: int = 560, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    return -(12 + 2 * torch.rand(dim, generator=g)), 0.2 + 0.1 * torch.rand(dim, generator=g)


def write_tiny_dir(path, seed: int = 0, wrap: str | None = None, **overrides):
    model = tiny_paraformer(seed, **overrides)
    save_funasr_dir(path, model, tiny_tokens(model.cfg.vocab_size), tiny_cmvn(), FrontendConfig(), wrap=wrap)
    return path


def speechlike(seconds: float, seed: int = 0, rate: int = 16000) -> torch.Tensor:
    """Noise shaped by a few moving tones, float in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * rate)
    t = torch.arange(n) / rate
    x = 0.05 * torch.randn(n, generator=g)
    for k in range(4):
        f0 = 150 + 700 * torch.rand(1, generator=g).item()
        am = 0.5 + 0.5 * torch.sin(2 * math.pi * (0.5 + 3 * torch.rand(1, generator=g).item()) * t)
        x += 0.15 * am * torch.sin(2 * math.pi * f0 * t + 20 * torch.sin(2 * math.pi * 0.7 * t))
    return x.clamp(-1, 1)
