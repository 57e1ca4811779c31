"""The default-model recipe's data loader: repeated real-speech copies are augmented, the rest is not."""
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default_asr"
sys.path.insert(0, str(RECIPE))

import data  # noqa: E402

from chorus.stream.features import MelConfig, MelFrontend  # noqa: E402


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
