"""Law 1 for CarelessWhisper's causal encoder: streamed block by block (incremental conv stem, per-layer
K/V) it equals the offline block-causal forward on the same mel, however the mel is cut; in fp32 and
with int8 products (`--dtype int8`)."""
from __future__ import annotations

import pytest
import torch

from chorus.asr.int8_linear import quantize_linears
from chorus.asr.whisper.loader import CausalConfig, load_whisper
from chorus.asr.whisper.model import block_causal_mask
from chorus.asr.whisper.streaming import CausalEncoderStream
from whisper_factories import tiny_dims, tiny_whisper, write_carelesswhisper


@pytest.mark.parametrize("n_mel,gran,extra,cuts", [
    (101, 5, 1, [7, 1, 30, 2, 61]),   # odd length: the last block is one frame, past the mel is padding
    (120, 4, 0, [120]),                # one piece, whole blocks
    (64, 6, 2, [1] * 64),              # frame by frame, a shorter last block
])
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@torch.no_grad()
def test_streamed_encoder_equals_block_causal_offline(n_mel, gran, extra, cuts, dtype):
    model = tiny_whisper(tiny_dims(layers=3), seed=7)
    if dtype == "int8":
        assert quantize_linears(model) == 3 * 6 + 3 * 10   # encoder: q, k, v, out, 2 MLP; decoder + cross-attention

    mel = torch.randn(1, 80, n_mel)
    n_enc = (n_mel + 1) // 2
    offline = model.encoder(mel, block_causal_mask(n_enc, gran, extra))
    stream = CausalEncoderStream(model.encoder, CausalConfig(gran, extra))
    blocks, at = [], 0
    for k in cuts:
        blocks += stream.accept(mel[0, :, at:at + k])
        at += k
    assert at == n_mel
    blocks += stream.finish()
    sizes = [b.shape[1] for b in blocks]
    assert sizes[0] == min(gran * (extra + 1), n_enc) and all(s <= gran for s in sizes[1:])
    streamed = torch.cat(blocks, dim=1)
    assert streamed.shape == offline.shape
    assert (streamed - offline).abs().max().item() < 1e-4
    assert stream.state.kv[0][0].shape == (1, n_enc, 32)


@torch.no_grad()
def test_carelesswhisper_checkpoint_streams(tmp_path):
    write_carelesswhisper(tmp_path / "cw.pt", tiny_whisper(tiny_dims(), seed=2), gran=3, extra_gran_blocks=1)
    b = load_whisper(tmp_path / "cw.pt")
    mel = torch.randn(1, 80, 40)
    stream = CausalEncoderStream(b.model.encoder, b.causal)
    first = stream.accept(mel[0, :, :12])        # the first block (6 frames) needs 13 mel frames
    assert first == []
    first = stream.accept(mel[0, :, 12:13])
    assert [x.shape[1] for x in first] == [6]
    rest = stream.accept(mel[0, :, 13:]) + stream.finish()
    offline = b.model.encoder(mel, block_causal_mask(20, 3, 1))
    assert (torch.cat(first + rest, 1) - offline).abs().max().item() < 1e-4
