"""`chorus transcribe`: bad input paths are refused at once, before the model (and LM) is loaded."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from chorus import cli
from chorus.asr import families
from chorus.asr.conformer import family


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is an error: whatever reaches it did not fail fast."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(families, "load_model", refuse)
    monkeypatch.setattr(family, "load_fastconformer", refuse)


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, np.zeros(1600, np.float32), 16000)
    return path


def test_transcribe_missing_file_fails_before_loading_the_model(tmp_path, clip, no_model, capsys):
    missing = tmp_path / "missing.wav"
    folder = tmp_path / "a_folder.wav"
    folder.mkdir()
    assert cli.main(["transcribe", str(clip), str(missing), str(folder)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {missing} does not exist", f"error: {folder} is not a file (a directory)"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: cannot make one unreadable")
def test_transcribe_unreadable_file_fails_before_loading_the_model(tmp_path, clip, no_model, capsys):
    clip.chmod(0)
    assert cli.main(["transcribe", str(clip)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {clip} cannot be read")


def test_transcribe_missing_file_is_one_line_before_the_model(tmp_path):
    """The real command line, end to end: the file is reported, not the (missing) model, so the paths were
    checked first; one line, no traceback, exit 2."""
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "transcribe", str(tmp_path / "missing.wav"),
                          "--model", str(tmp_path / "no_such_model.nemo")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr == f"error: {tmp_path / 'missing.wav'} does not exist\n"
    assert out.stdout == ""


def test_a_corrupt_file_among_good_ones_is_that_files_error_only(tmp_path, model_path, clip):
    """Only paths are checked up front: a file that is there but not audio still gets its own error result."""
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "transcribe", str(clip), str(bad), "--json",
                          "--model", str(model_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["file"] for r in results] == [str(clip), str(bad)]
    assert "error" not in results[0] and results[1]["error"]
