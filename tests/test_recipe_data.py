"""The default-model recipe's data loader: batching, SpecAugment masks, and repeated real-speech copies."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from chorus.stream.features import MelConfig, MelFrontend

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default_asr"


def _load_recipe_data():
    """recipes/default_asr/data.py as a module (it imports its sibling `augment` as the recipe does)."""
    sys.path.insert(0, str(RECIPE))
    try:
        spec = importlib.util.spec_from_file_location("default_asr_data", RECIPE / "data.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(RECIPE))
    return module


data = _load_recipe_data()


class LetterTokenizer:
    """Token ids for the test: one per letter."""

    def encode(self, text):
        return [ord(c) - 96 for c in text if c.isalpha()]


def _rows(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for name, source in (("synth", "espeak"), ("real", "fsdd")):
        path = tmp_path / f"{name}.flac"
        sf.write(path, (0.3 * rng.standard_normal(8000)).astype(np.float32), 16000, subtype="PCM_16")
        rows.append({"audio_filepath": str(path), "duration": 0.5, "text": "zero", "source": source})
    return rows


def test_repeat_source_adds_augmented_copies_of_that_source_only(tmp_path):
    rows = _rows(tmp_path)
    repeated = data.repeat_source(rows, "fsdd", 4)
    assert len(repeated) == 5
    assert repeated[:2] == rows  # the originals first, unchanged
    assert all(r["source"] == "fsdd" and r["augment"] for r in repeated[2:])
    assert data.repeat_source(rows, "fsdd", 1) == rows


def test_augmented_copies_differ_and_plain_rows_do_not(tmp_path):
    rows = data.repeat_source(_rows(tmp_path), "fsdd", 3)
    frontend = MelFrontend(MelConfig())
    ds = data.UtteranceDataset(rows, LetterTokenizer(), frontend, train=False)
    plain = [ds[i][0] for i in range(2)]
    for i, row in enumerate(rows[:2]):  # without augmentation: exactly the clip's features
        audio, _ = sf.read(row["audio_filepath"], dtype="float32")
        assert torch.equal(plain[i], frontend.offline(audio))
    copies = [ds[i][0] for i in (2, 3)]
    # Each copy draws its own augmentation (most draws change the audio; these seeds do).
    assert not (copies[0].shape == plain[1].shape and torch.allclose(copies[0], plain[1]))
    assert not (copies[0].shape == copies[1].shape and torch.allclose(copies[0], copies[1]))
    assert ds[2][1].tolist() == ds[1][1].tolist() == [26, 5, 18, 15]  # same transcript


def test_spec_augment_masks_with_the_utterance_mean_not_zero():
    """The default model's log-mel is unnormalized: 0.0 would be a loud band, the mean is neutral."""
    mel = torch.randn(80, 400) * 4 - 10
    before = mel.clone()
    out = data.spec_augment(mel, np.random.default_rng(3), freq_masks=2, freq_width=15, time_masks=5,
                            time_fraction=0.05)
    changed = out != mel
    assert changed.any() and torch.equal(mel, before)  # masked something, input untouched
    assert torch.allclose(out[changed], torch.full_like(out[changed], float(mel.mean())))
    assert not (out == 0).any()


def test_vtlp_warp_maps_the_band_onto_itself_and_scales_low_frequencies():
    freqs = np.linspace(0, 8000, 257)
    assert np.allclose(data.vtlp_warp(freqs, 1.0, 8000), freqs)
    for alpha in (0.88, 1.12):
        warped = data.vtlp_warp(freqs, alpha, 8000)
        assert warped[0] == 0 and np.isclose(warped[-1], 8000)
        assert np.all(np.diff(warped) > 0)  # monotonic: no frequency folds onto another
        low = freqs < 3000
        assert np.allclose(warped[low], alpha * freqs[low])


def _sine(freq, seconds=0.5, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_vtlp_filterbank_moves_a_formant_by_alpha():
    """A 1000 Hz tone through the filterbank warped by 1.1 peaks in the mel band where 1100 Hz does
    through the plain one; alpha 1 leaves the filterbank as it is."""
    frontend = MelFrontend(MelConfig())
    assert torch.allclose(data.vtlp_filterbank(frontend.filterbank, 1.0, 16000), frontend.filterbank)
    warped = MelFrontend(MelConfig(), frontend.window, data.vtlp_filterbank(frontend.filterbank, 1.1, 16000))

    def peak(front, freq):
        return int(front.offline(_sine(freq)).mean(dim=1).argmax())

    assert peak(warped, 1000) == peak(frontend, 1100) != peak(frontend, 1000)
    assert peak(warped, 2000) == peak(frontend, 2200) != peak(frontend, 2000)


@pytest.mark.parametrize("option", ["vtlp", "tilt"])
def test_speaker_augmentation_changes_training_items_only(tmp_path, option):
    rows = _rows(tmp_path)[:1]
    frontend = MelFrontend(MelConfig())
    base = data.UtteranceDataset(rows, LetterTokenizer(), frontend, train=True, seed=1)
    augmented = data.UtteranceDataset(rows, LetterTokenizer(), frontend, train=True, seed=1, **{option: 1.0})
    assert not torch.equal(base[0][0], augmented[0][0])
    if option == "vtlp":
        assert len(augmented._warped) == 1  # a filterbank built for the factor drawn
    evaluation = data.UtteranceDataset(rows, LetterTokenizer(), frontend, train=False, **{option: 1.0})
    audio, _ = sf.read(rows[0]["audio_filepath"], dtype="float32")
    assert torch.equal(evaluation[0][0], frontend.offline(audio))


def test_spectral_tilt_matches_filtering_the_audio():
    """A +6 dB/octave tilt: the 2 kHz tone's band gains 6 dB (x2 in amplitude) against 1 kHz's."""
    frontend = MelFrontend(MelConfig())
    centres = data.band_centres(frontend.filterbank, 16000)
    assert np.all(np.diff(centres) > 0) and 0 < centres[0] < 100 and 7000 < centres[-1] < 8000
    for freq, octaves in ((2000, 1.0), (500, -1.0)):
        mel = frontend.offline(_sine(freq))
        band = int(mel.mean(dim=1).argmax())
        tilted = data.spectral_tilt(mel, 6.0, centres, 2.0)
        expected = 6.0 * np.log2(centres[band] / 1000.0)  # dB at the band's centre
        assert abs(expected - 6.0 * octaves) < 1.0
        gain = float((tilted - mel)[band].mean())
        assert abs(gain - expected * np.log(10) / 10) < 1e-4  # power: 10 dB per ln(10) nats


def _batching_rows(n_sentences=400, n_digits=300, seed=1):
    rng = np.random.default_rng(seed)
    rows = [{"duration": float(d), "source": "fortunes"} for d in rng.uniform(0.8, 12.0, n_sentences)]
    rows += [{"duration": float(d), "source": rng.choice(["digits", "fsdd"])} for d in rng.uniform(0.3, 0.9, n_digits)]
    rng.shuffle(rows)
    return rows


@pytest.mark.parametrize("shortest_first", [False, True])
def test_duration_batches_cover_every_row_once_within_the_limits(shortest_first):
    rows = _batching_rows()
    batches = data.duration_batches(rows, 40.0, 16, np.random.default_rng(0), shortest_first=shortest_first)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    for b in batches:
        assert len(b) <= 16
        assert len(b) == 1 or max(rows[i]["duration"] for i in b) * len(b) <= 40.0


def test_shortest_first_orders_sentences_and_spreads_the_isolated_words():
    """Sorted by duration alone, the digit clips would fill the start of the epoch; here the sentence
    batches rise in length and the digit batches lie scattered among them."""
    rows = _batching_rows()
    batches = data.duration_batches(rows, 40.0, 16, np.random.default_rng(0), jitter=0.0, shortest_first=True)
    isolated = [all(rows[i]["source"] in ("digits", "fsdd") for i in b) for b in batches]
    mixed = [b for b, iso in zip(batches, isolated) if not iso and any(rows[i]["source"] != "fortunes" for i in b)]
    assert not mixed  # a batch is all sentences or all isolated words
    sentence_longest = [max(rows[i]["duration"] for i in b) for b, iso in zip(batches, isolated) if not iso]
    assert sentence_longest == sorted(sentence_longest)
    positions = np.flatnonzero(isolated) / len(batches)
    assert len(positions) >= 10
    assert positions.min() < 0.25 and positions.max() > 0.75  # spread over the epoch, not bunched up front
    assert not all(isolated[:len(positions)])


def test_shortest_first_batches_are_the_same_for_the_same_seed():
    """A resumed run skips the batches it has done, so the epoch's order must be reproducible."""
    rows = _batching_rows()
    first, again = (data.duration_batches(rows, 40.0, 16, np.random.default_rng((0, 0)), shortest_first=True)
                    for _ in range(2))
    assert first == again
