"""NeMo log-mel features: incremental == whole utterance == NeMo's formula."""
from pathlib import Path

import kaldi_native_fbank as knf
import librosa
import numpy as np
import pytest
import torch

from chorus.codecs import read_audio, resample
from chorus.stream.features import FeatureConfigError, MelConfig, MelFrontend, OnlineMel

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def nemo_formula(x: np.ndarray) -> torch.Tensor:
    """NeMo FilterbankFeatures.forward for one utterance, written out directly (eval mode)."""
    t = torch.from_numpy(x)[None]
    seq_len = t.shape[1] // 160  # get_seq_len: (len + 2*256 - 512) // 160
    t = torch.cat((t[:, :1], t[:, 1:] - 0.97 * t[:, :-1]), dim=1)
    spec = torch.stft(t, n_fft=512, hop_length=160, win_length=400, center=True,
                      window=torch.hann_window(400, periodic=False), return_complex=True, pad_mode="constant")
    spec = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1)).pow(2.0)
    fb = torch.tensor(librosa.filters.mel(sr=16000, n_fft=512, n_mels=80, fmin=0, fmax=8000, norm="slaney"),
                      dtype=torch.float).unsqueeze(0)
    mel = torch.log(torch.matmul(fb, spec) + 2 ** -24)
    return mel[0, :, :seq_len]


def online(frontend, x, chunk):
    on = OnlineMel(frontend)
    parts = [on.accept(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    parts.append(on.finish())
    return torch.cat(parts, dim=1)


@pytest.fixture(scope="module")
def frontend():
    return MelFrontend(MelConfig())


@pytest.mark.parametrize("length", [0, 150, 199, 200, 361, 16000, 32077])
def test_offline_matches_nemo_formula(frontend, length):
    x = (np.random.default_rng(length).standard_normal(length) * 0.1).astype(np.float32)
    ours = frontend.offline(x)
    ref = nemo_formula(x)
    assert ours.shape == ref.shape == (80, length // 160)
    if length >= 160:
        assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("chunk", [1, 37, 160, 1234, 100000])
def test_incremental_equals_whole_utterance(frontend, chunk):
    x = (np.random.default_rng(chunk).standard_normal(32077) * 0.1).astype(np.float32)
    whole = frontend.offline(x)
    inc = online(frontend, x, chunk)
    assert inc.shape == whole.shape
    assert (inc - whole).abs().max().item() < 1e-5


def test_frames_are_released_as_soon_as_their_window_is_complete(frontend):
    on = OnlineMel(frontend)
    assert on.accept(np.zeros(199, np.float32)).shape[1] == 0
    assert on.accept(np.zeros(1, np.float32)).shape[1] == 1  # frame 0 spans samples [-200, 200)
    assert on.accept(np.zeros(159, np.float32)).shape[1] == 0
    assert on.accept(np.zeros(1, np.float32)).shape[1] == 1


def test_kaldi_native_fbank_online_nemo_agrees(frontend):
    """kaldi-native-fbank's OnlineNemoFbank is an independent implementation of the same formula.

    We do not use it at run time because it cannot take the checkpoint's own filterbank and
    window; it agrees with ours to about 1e-4 (float32 FFT and filterbank rounding).
    """
    x = (np.random.default_rng(5).standard_normal(16000 * 2 + 77) * 0.1).astype(np.float32)
    fb = knf.OnlineNemoFbank(knf.NemoFbankOptions())
    for i in range(0, len(x), 1000):
        fb.accept_waveform(16000, x[i:i + 1000].tolist())
    fb.input_finished()
    n = fb.num_frames_ready
    theirs = torch.tensor(np.array(fb.get_frames(0, n, True)[0]).reshape(n, -1).T)
    ours = frontend.offline(x)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 2e-4


def test_checkpoint_filterbank_and_window_are_used():
    cfg = MelConfig()
    x = (np.random.default_rng(1).standard_normal(4000) * 0.3).astype(np.float32)
    base = MelFrontend(cfg).offline(x)
    doubled_fb = MelFrontend(cfg, filterbank=cfg.default_filterbank() * 2.0).offline(x)
    assert torch.allclose(doubled_fb - base, torch.full_like(base, np.log(2.0)), atol=5e-3)
    halved_window = MelFrontend(cfg, window=cfg.default_window() * 0.5).offline(x)
    assert torch.allclose(base - halved_window, torch.full_like(base, np.log(4.0)), atol=5e-3)


def test_config_from_nemo_and_refusals():
    cfg = MelConfig.from_nemo({"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
                               "sample_rate": 16000, "normalize": "NA", "window_size": 0.025,
                               "window_stride": 0.01, "features": 80, "n_fft": 512})
    assert (cfg.win_length, cfg.hop_length, cfg.n_mels, cfg.n_fft) == (400, 160, 80, 512)
    with pytest.raises(FeatureConfigError, match="whole utterance"):
        MelConfig.from_nemo({"normalize": "per_feature"})
    with pytest.raises(FeatureConfigError, match="frame_splicing"):
        MelConfig.from_nemo({"normalize": "NA", "frame_splicing": 3})


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is absent (only present on the team's machines)")
def test_real_speech_44k_stereo(frontend):
    audio, rate = read_audio(SHARED / "samples" / "jfk.flac")
    x = resample(audio, rate, 16000)
    whole = frontend.offline(x)
    inc = online(frontend, x, 320)
    assert whole.shape[1] == len(x) // 160
    assert (inc - whole).abs().max().item() < 1e-5
    assert (whole - nemo_formula(x)).abs().max().item() < 1e-4
