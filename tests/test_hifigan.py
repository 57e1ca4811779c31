"""HiFi-GAN: official generator files (weight norm) + config.json, batched == alone, chunked == one-shot."""
from __future__ import annotations

import json

import pytest
import torch

from chorus.tts.hifigan import Generator, HifiGanConfig, NotAHifiGan, load_hifigan

V1_SMALL = {"resblock": "1", "upsample_rates": [8, 8, 2, 2], "upsample_kernel_sizes": [16, 16, 4, 4],
            "upsample_initial_channel": 32, "resblock_kernel_sizes": [3, 7, 11],
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "num_mels": 80, "hop_size": 256,
            "sampling_rate": 22050}
V3_SMALL = {"resblock": "2", "upsample_rates": [8, 8, 4], "upsample_kernel_sizes": [16, 16, 8],
            "upsample_initial_channel": 32, "resblock_kernel_sizes": [3, 5, 7],
            "resblock_dilation_sizes": [[1, 2], [2, 6], [3, 12]], "num_mels": 80, "hop_size": 256,
            "sampling_rate": 22050}


def weight_normed(cfg: dict, seed: int = 0) -> Generator:
    """A generator with torch's weight norm on every conv, as jik876/hifi-gan trains and saves it."""
    torch.manual_seed(seed)
    g = Generator(HifiGanConfig.from_dict(cfg))
    for module in g.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            module.weight.data.normal_(0, 0.05)
            module.bias.data.normal_(0, 0.02)
            torch.nn.utils.weight_norm(module)
            module.weight_g.data.uniform_(0.5, 1.5)
    return g.eval()


@pytest.fixture(scope="module", params=["v1", "v3"])
def vocoder(request, tmp_path_factory):
    cfg = V1_SMALL if request.param == "v1" else V3_SMALL
    d = tmp_path_factory.mktemp(request.param)
    ref = weight_normed(cfg)
    state = ref.state_dict()
    assert any(k.endswith(".weight_g") for k in state)
    torch.save({"generator": state}, d / "generator")
    (d / "config.json").write_text(json.dumps(cfg))
    return ref, load_hifigan(d / "generator")


def test_loads_official_layout_with_weight_norm_folded(vocoder):
    ref, g = vocoder
    mel = torch.randn(1, 80, 23)
    with torch.no_grad():
        expect = ref(mel)
    got = g(mel)
    assert got.shape == (1, 1, 23 * 256)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)


def test_batched_equals_alone(vocoder):
    _, g = vocoder
    mels = [torch.randn(80, n) for n in (9, 31, 17)]
    batch = torch.zeros(3, 80, 31)
    for i, m in enumerate(mels):
        batch[i, :, :m.shape[-1]] = m
    with torch.no_grad():
        out = g(batch, torch.tensor([9, 31, 17]))
        for i, m in enumerate(mels):
            alone = g(m[None])
            torch.testing.assert_close(out[i, :, :m.shape[-1] * 256], alone[0], atol=1e-5, rtol=0)
            assert out[i, :, m.shape[-1] * 256:].abs().max() == 0 if m.shape[-1] < 31 else True


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_stream_equals_one_shot(vocoder, chunk):
    _, g = vocoder
    mel = torch.randn(80, 70)
    with torch.no_grad():
        whole = g(mel[None])[0, 0]
    st = g.new_state()
    pieces, first_audio_at = [], None
    for a in range(0, 70, chunk):
        b = min(a + chunk, 70)
        out = g.stream([st], [mel[:, a:b]], [b == 70])[0]
        if out.numel() and first_audio_at is None:
            first_audio_at = b
        pieces.append(out)
        assert st.mel.shape[-1] <= g.receptive_field().left + g.receptive_field().right + chunk
    audio = torch.cat(pieces)
    assert audio.shape == whole.shape
    assert (audio - whole).abs().max() < 1e-5
    assert first_audio_at < 70  # audio starts before the whole mel is there
    assert first_audio_at <= g.receptive_field().right + chunk


def test_streams_batched_in_one_call_equal_each_alone(vocoder):
    _, g = vocoder
    mels = [torch.randn(80, 40), torch.randn(80, 25)]
    states = [g.new_state(), g.new_state()]
    got = [[], []]
    for a, b in [(0, 7), (7, 19), (19, 40)]:
        outs = g.stream(states, [m[:, a:b] for m in mels], [b >= m.shape[-1] for m in mels])
        for i, o in enumerate(outs):
            got[i].append(o)
    with torch.no_grad():
        for i, m in enumerate(mels):
            assert (torch.cat(got[i]) - g(m[None])[0, 0]).abs().max() < 1e-5


def test_receptive_field_is_needed():
    g = load_free(V1_SMALL)
    f = g.receptive_field()
    assert f.left > 0 and f.right > 0 and f.left < 40 and f.right < 40
    mel = torch.randn(80, 60)
    with torch.no_grad():
        whole = g(mel[None])[0, 0]
        # without the context, the chunk's edges differ from the one-shot audio
        a, b = 20, 30
        bare = g(mel[None, :, a:b])[0, 0]
        assert (bare - whole[a * 256:b * 256]).abs().max() > 1e-3
        full = g(mel[None, :, a - f.left:b + f.right])[0, 0][f.left * 256:(f.left + b - a) * 256]
        assert (full - whole[a * 256:b * 256]).abs().max() < 1e-5


def load_free(cfg: dict) -> Generator:
    g = weight_normed(cfg, seed=3)
    for module in g.modules():
        if hasattr(module, "weight_g"):
            torch.nn.utils.remove_weight_norm(module)
    return g


def test_config_refusals(tmp_path):
    with pytest.raises(NotAHifiGan, match="upsample_rates"):
        HifiGanConfig.from_dict({"resblock": "1"})
    with pytest.raises(NotAHifiGan, match="resblock"):
        HifiGanConfig.from_dict({**V1_SMALL, "resblock": "3"})
    with pytest.raises(NotAHifiGan, match="hop_size"):
        HifiGanConfig.from_dict({**V1_SMALL, "hop_size": 300})
    torch.save({"generator": {"conv_pre.weight": torch.zeros(1)}}, tmp_path / "g")
    with pytest.raises(NotAHifiGan, match="do not match"):
        load_hifigan(tmp_path / "g", V1_SMALL)
