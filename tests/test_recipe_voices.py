"""The default-model recipe's voice catalogue: held-out speakers stay out of training under every front end."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default_asr"
# loaded under its own name (as test_recipe_data.py loads data.py), not as a top-level `voices` module;
# registered before it runs because its dataclasses look their module up there
_spec = importlib.util.spec_from_file_location("default_asr_voices", RECIPE / "voices.py")
voices = sys.modules["default_asr_voices"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(voices)


def test_training_voices_exclude_the_held_out_speakers_and_their_aliases():
    catalogue = voices.all_voices()
    training = voices.training_voices(catalogue)
    assert {(v.engine, v.model) for v in voices.test_voices(catalogue).values()} == set(voices.HELD_OUT.values())
    assert not {(v.engine, v.model) for v in training} & (set(voices.HELD_OUT.values()) | voices.HELD_OUT_ALIASES)
    # the same speaker read by another front end, or as an espeak variant, is held out too
    for engine, model in [("festival", "us2_mbrola"), ("espeak", "mb-us2+f1"), ("flite", "awb_time")]:
        assert voices.is_held_out(engine, model)
    # the accented MBROLA voices use other databases than us2: not held out
    assert not voices.is_held_out("espeak", "mb-de4-en")
    assert len(training) == len(catalogue) - 2


@pytest.mark.parametrize("family", sorted(voices.FAMILY_WEIGHTS))
def test_each_family_gets_its_share_of_the_draws(family):
    training = voices.training_voices()
    weights = voices.voice_weights(training)
    assert np.isclose(weights.sum(), 1.0)
    share = sum(w for v, w in zip(training, weights) if v.family == family)
    assert share == pytest.approx(voices.FAMILY_WEIGHTS[family] / sum(voices.FAMILY_WEIGHTS.values()))
