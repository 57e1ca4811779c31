"""CosyVoice 2's HiFT vocoder: hift.pt in CosyVoice's layout, the yaml's sizes, and the streamed hift half of
CosyVoice2Model.token2wav (mel cache, source cache, Hamming cross-fade, held-back samples)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chorus.tts.cosyvoice.config import read_cosyvoice_yaml
from chorus.tts.cosyvoice.hift import HiftConfig, HiftGenerator, HiftStreamer, NotAHift, load_hift
from cosyvoice_factories import TINY_HIFT, hift_official_state, hift_yaml, random_hift, write_hift

torch.set_num_threads(1)


def mel(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weight_norm,prefix", [("parametrizations", ""), ("weight_g", ""),
                                                 ("parametrizations", "generator.")])
def test_loads_cosyvoice_layout_with_weight_norm_folded(tmp_path, weight_norm, prefix):
    path = tmp_path / "hift.pt"
    ref = write_hift(path, weight_norm=weight_norm, prefix=prefix)
    stored = torch.load(path, weights_only=True)
    assert any(k.endswith(".original1" if weight_norm == "parametrizations" else ".weight_v") for k in stored)
    got = load_hift(path, TINY_HIFT)
    m = mel(12)
    a, s = got.inference(m, generator=torch.Generator().manual_seed(3))
    b, t = ref.inference(m, generator=torch.Generator().manual_seed(3))
    assert a.shape == (1, 12 * 480) and s.shape == (1, 1, 12 * 480)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the source signal integrates the predicted f0 over 5,760 samples: folding the weight norm's rounding
    # reaches it as ~1e-6 (1.7e-6 on an AMD EPYC); a misread layout would be off by the signal's own size
    torch.testing.assert_close(s, t, atol=1e-5, rtol=1e-4)
    assert a.abs().max() > 1e-3 and a.abs().max() <= 0.99


def test_loader_refusals(tmp_path):
    ref = random_hift()
    state = hift_official_state(ref)

    def refused(st, match, config=TINY_HIFT):
        path = tmp_path / "bad.pt"
        torch.save(st, path)
        with pytest.raises(NotAHift, match=match):
            load_hift(path, config)

    refused({k: v for k, v in state.items() if k != "conv_post.bias"}, "missing conv_post.bias")
    refused({**state, "m_source.extra.weight": torch.zeros(1)}, "unexpected m_source.extra.weight")
    refused({k: v for k, v in state.items() if k != "conv_pre.parametrizations.weight.original0"},
            "conv_pre.parametrizations.weight.original1 has no conv_pre.parametrizations.weight.original0")
    refused(state, "shapes do not match.*f0_predictor", {**TINY_HIFT, "f0_predictor": {"cond_channels": 32}})
    refused(state, "missing resblocks.1[0-9]", {**TINY_HIFT, "upsample_rates": [8, 5, 3, 1],
                                           "upsample_kernel_sizes": [16, 11, 7, 1],
                                           "source_resblock_kernel_sizes": [7, 7, 11, 3],
                                           "source_resblock_dilation_sizes": [[1]] * 4, "base_channels": 32})
    refused({"hift": state}, "not a plain state dict")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(NotAHift, match="cannot read"):
        load_hift(tmp_path / "junk.pt")


def test_config_refusals():
    with pytest.raises(NotAHift, match="unknown HiFT argument.*nb_harmonic"):
        HiftConfig.from_mapping({"nb_harmonic": 8})
    with pytest.raises(NotAHift, match="22050 is CosyVoice 1"):
        HiftConfig.from_mapping({"sampling_rate": 22050})
    with pytest.raises(NotAHift, match="CausalHiFTGenerator"):
        HiftConfig.from_mapping({"conv_pre_look_right": 4})
    with pytest.raises(NotAHift, match="sampling_rate: expected a number"):
        HiftConfig.from_mapping({"sampling_rate": "<sample_rate>"})
    with pytest.raises(NotAHift, match="upsample_rates: expected a list of integers"):
        HiftConfig.from_mapping({"upsample_rates": [8, 2.5, 3]})


def test_config_from_the_yaml_section(tmp_path):
    (tmp_path / "cosyvoice2.yaml").write_text("sample_rate: 24000\n" + hift_yaml())
    section = read_cosyvoice_yaml(tmp_path / "cosyvoice2.yaml")["hift"]  # tags kept as data, !ref resolved
    cfg = HiftConfig.from_mapping(section)
    assert cfg.base_channels == 16 and cfg.f0_predictor.cond_channels == 16 and cfg.sampling_rate == 24000
    assert cfg.upsample_rates == (8, 5, 3) and cfg.upsample_scale == 480
    assert cfg.source_resblock_dilation_sizes == ((1, 3, 5),) * 3
    default = HiftConfig()  # CosyVoice 2's shipped hift: section
    assert (default.base_channels, default.sampling_rate, default.upsample_kernel_sizes) == (512, 24000, (16, 11, 7))
    assert sum(p.numel() for p in HiftGenerator(default).parameters()) == 20_806_557
    with pytest.raises(NotAHift, match="CausalHiFTGenerator is not CosyVoice 2's HiFTGenerator"):
        HiftConfig.from_mapping({**section, "!": "!new:cosyvoice.hifigan.generator.CausalHiFTGenerator"})
    with pytest.raises(NotAHift, match="f0_predictor: .*CausalConvRNNF0Predictor is not"):
        HiftConfig.from_mapping({**section, "f0_predictor": {
            **section["f0_predictor"], "!": "!new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor"}})


def token2wav_hift_port(hift, chunks, finalize_last=True):
    """The hift half of CosyVoice2Model.token2wav, line for line, with its per-stream dict and the global RNG."""
    mel_cache_len, source_cache_len = 8, 8 * 480
    speech_window = np.hamming(2 * source_cache_len)

    def fade_in_out(fade_in_mel, fade_out_mel, window):
        fade_in_mel = fade_in_mel.clone()
        n = int(window.shape[0] / 2)
        fade_in_mel[..., :n] = fade_in_mel[..., :n] * window[:n] + fade_out_mel[..., -n:] * window[n:]
        return fade_in_mel

    cache, out = None, []
    for i, tts_mel in enumerate(chunks):
        finalize = finalize_last and i == len(chunks) - 1
        if cache is not None:
            tts_mel = torch.concat([cache["mel"], tts_mel], dim=2)
            hift_cache_source = cache["source"]
        else:
            hift_cache_source = torch.zeros(1, 1, 0)
        tts_speech, tts_source = hift.inference(tts_mel, hift_cache_source)
        if cache is not None:
            tts_speech = fade_in_out(tts_speech, cache["speech"], speech_window)
        if not finalize:
            cache = {"mel": tts_mel[:, :, -mel_cache_len:], "source": tts_source[:, :, -source_cache_len:],
                     "speech": tts_speech[:, -source_cache_len:]}
            tts_speech = tts_speech[:, :-source_cache_len]
        out.append(tts_speech)
    return out


@pytest.mark.filterwarnings("ignore:__array_wrap__")  # the port multiplies a tensor by numpy arrays, as CosyVoice does
def test_streamer_equals_token2wav_hift_half():
    hift = random_hift()
    m = mel(94, seed=1)
    cuts = [0, 50, 58, 74, 94]  # CosyVoice's hops: 25 tokens (+3 lookahead) then growing, 2 mel frames a token
    chunks = [m[:, :, a:b] for a, b in zip(cuts, cuts[1:])]
    torch.manual_seed(11)
    want = token2wav_hift_port(hift, chunks)
    streamer = HiftStreamer(hift, generator=11)
    got = [streamer.push(c, finalize=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    assert [g.shape[1] for g in got] == [w.shape[1] for w in want] == [50 * 480 - 3840, 8 * 480, 16 * 480,
                                                                       20 * 480 + 3840]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
    assert sum(g.shape[1] for g in got) == 94 * 480
    with pytest.raises(RuntimeError, match="finalized"):
        streamer.push(chunks[0])
    # the cross-fade and the cached source are what make chunks differ from vocoding each chunk alone
    torch.manual_seed(11)
    alone = [hift.inference(c)[0] for c in chunks]
    assert (got[1] - alone[1][:, 8 * 480 - 3840:][:, :got[1].shape[1]]).abs().max() > 1e-4


def test_noise_comes_from_the_stream_generator():
    hift = random_hift()
    m = mel(20, seed=2)
    a = HiftStreamer(hift, generator=5).push(m, finalize=True)
    b = HiftStreamer(hift, generator=torch.Generator().manual_seed(5)).push(m, finalize=True)
    c = HiftStreamer(hift, generator=6).push(m, finalize=True)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4


def test_streams_pushed_together_equal_each_alone(monkeypatch):
    hift = random_hift()
    plans = [[30, 16, 20], [30, 16, 20], [30, 16, 12], [22, 16]]  # three in step, one not
    mels = [mel(sum(p), seed=10 + i) for i, p in enumerate(plans)]

    def chunks(i):
        cuts = np.cumsum([0] + plans[i])
        return [mels[i][:, :, a:b] for a, b in zip(cuts, cuts[1:])]

    alone = []
    for i, plan in enumerate(plans):
        st = HiftStreamer(hift, generator=100 + i)
        alone.append([st.push(c, finalize=j == len(plan) - 1) for j, c in enumerate(chunks(i))])

    calls = []
    real = hift.inference
    monkeypatch.setattr(hift, "inference", lambda m, c=None, g=None: calls.append(m.shape[0]) or real(m, c, g))
    streams = [HiftStreamer(hift, generator=100 + i) for i in range(len(plans))]
    together = [[] for _ in plans]
    for step in range(3):
        live = [i for i, p in enumerate(plans) if step < len(p)]
        outs = HiftStreamer.push_many([streams[i] for i in live], [chunks(i)[step] for i in live],
                                      [step == len(plans[i]) - 1 for i in live])
        for i, o in zip(live, outs):
            together[i].append(o)
    assert calls == [3, 1, 4, 2, 1]  # equal windows share a call: 30 frames x3 and 22; 8 + 16 x4; 8 + 20 x2, 8 + 12
    # not bit-equal: a batched convolution sums in another order, and F0 differences of 1e-5 Hz move the phase
    # accumulated over thousands of samples; the audio peaks near 0.2
    for i in range(len(plans)):
        for g, w in zip(together[i], alone[i]):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_source_draws_as_cosyvoice():
    """SourceModuleHnNSF(SineGen2) written the way CosyVoice computes it, its noise from the global RNG with
    randn_like (whose values follow the sines' transposed memory layout): the same excitation, float for float."""
    hift = random_hift()
    f0 = hift.f0_predictor(mel(9, seed=4)).detach().repeat_interleave(480, dim=1)[:, :, None]  # [1, L, 1]
    src = hift.m_source

    torch.manual_seed(8)
    fn = f0 * torch.arange(1, 10, dtype=torch.float32)
    rad = (fn / 24000) % 1
    rand_ini = torch.rand(1, 9)
    rand_ini[:, 0] = 0
    rad[:, 0, :] = rad[:, 0, :] + rand_ini
    rad = torch.nn.functional.interpolate(rad.transpose(1, 2), scale_factor=1 / 480, mode="linear").transpose(1, 2)
    phase = torch.cumsum(rad, dim=1) * 2 * np.pi
    phase = torch.nn.functional.interpolate(phase.transpose(1, 2) * 480, scale_factor=480,
                                            mode="linear").transpose(1, 2)
    sines = torch.sin(phase) * 0.1
    uv = (f0 > 10).type(torch.float32)
    noise = (uv * 0.003 + (1 - uv) * 0.1 / 3) * torch.randn_like(sines)
    want = torch.tanh(src.l_linear(sines * uv + noise))
    torch.randn_like(uv)  # the noise branch inference does not use
    after = torch.rand(3)

    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        got = src(f0, g)
    assert torch.equal(got, want)
    assert torch.equal(torch.rand(3, generator=g), after)  # as many numbers drawn as CosyVoice draws
    assert 0 < float(uv.mean()) < 1  # voiced and unvoiced samples both present
