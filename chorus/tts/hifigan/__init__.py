"""HiFi-GAN vocoder (jik876/hifi-gan generators with their config.json): one-shot, batched, and chunked
streaming that equals one-shot (`Generator.stream` with an explicit per-stream `VocoderState`)."""
from .model import (Generator, HifiGanConfig, NotAHifiGan, VocoderState, fold_weight_norm, load_hifigan)

__all__ = ["Generator", "HifiGanConfig", "NotAHifiGan", "VocoderState", "fold_weight_norm", "load_hifigan"]
