"""`chorus eval`: WER/CER/exact over a manifest through the streaming path, per lookahead and decoder."""
import json
import subprocess
import sys

import jiwer
import numpy as np
import pytest
import soundfile as sf

from chorus import cli

from chorus.asr.conformer.checkpoint import load_fastconformer, save_fastconformer
from chorus.asr.conformer.family import ConformerModel
from chorus.asr.textnorm import normalize_text
from chorus.asr.transcribe import transcribe_files
from chorus.stream.contract import StreamRequest
from factories import tiny_model, train_tokenizer


def test_eval_scores_what_transcribe_produces(tmp_path):
    model_path = tmp_path / "tiny.nemo"
    save_fastconformer(model_path, tiny_model(seed=5), train_tokenizer(32))
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        path = tmp_path / "clips" / f"{i}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, (rng.standard_normal(16000 + 4000 * i) * 0.1).astype(np.float32), 16000)
        files.append(path)
    loaded = load_fastconformer(model_path)
    engine = ConformerModel(loaded).make_engine(slots=4)
    hyps = {la: [normalize_text(r.text) for r in transcribe_files(engine, [str(f) for f in files],
                                                                   StreamRequest(lookahead_ms=la, decoder="ctc"))]
            for la in (0, 480)}
    assert all(hyps[0]) and all(hyps[480])
    # refs: the 480 ms hypothesis for clips 0 and 1 (exact), something else for clip 2
    refs = [hyps[480][0], hyps[480][1], "zz " + hyps[480][2]]
    with open(tmp_path / "clips" / "test.json", "w") as f:  # relative paths, as NeMo manifests have
        for path, ref in zip(files, refs):
            f.write(json.dumps({"audio_filepath": path.name, "duration": 1.0, "text": ref}) + "\n")
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "eval", str(tmp_path / "clips" / "test.json"),
                          "--model", str(model_path), "--lookahead-ms", "0,480", "--decoder", "ctc", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    scores = {s["lookahead_ms"]: s for s in map(json.loads, out.stdout.splitlines())}
    assert set(scores) == {0, 480}
    for la, s in scores.items():
        assert s["utterances"] == 3 and s["decoder"] == "ctc"
        assert abs(s["wer"] - jiwer.wer(refs, hyps[la])) < 1e-3
        assert abs(s["cer"] - jiwer.cer(refs, hyps[la])) < 1e-3
    assert abs(scores[480]["exact"] - 2 / 3) < 1e-3
    assert [w["ref"] for w in scores[480]["worst"]] == [refs[2]]


def test_transcribe_and_eval_with_beam_search_and_an_lm(tmp_path):
    """`--beam/--lm` reach the streaming path; a bad LM file is one clear error line."""
    from chorus.asr.ngram import estimate_kneser_ney, write_arpa
    from chorus.asr.conformer.family import make_search
    from factories import TEXT

    tokenizer = train_tokenizer(32)
    model_path = tmp_path / "tiny.nemo"
    save_fastconformer(model_path, tiny_model(seed=5), tokenizer)
    arpa = tmp_path / "lm.arpa.gz"
    write_arpa(estimate_kneser_ney([tokenizer.encode_as_pieces(t) for t in TEXT], 3), arpa)
    clip = tmp_path / "clip.wav"
    sf.write(clip, (np.random.default_rng(3).standard_normal(24000) * 0.1).astype(np.float32), 16000)
    loaded = load_fastconformer(model_path)
    search = make_search(loaded, beam_size=4, lm=str(arpa), length_bonus=4.0)
    expected, = transcribe_files(ConformerModel(loaded, search).make_engine(slots=1), [str(clip)],
                                 StreamRequest(lookahead_ms=480, decoder="rnnt"))
    assert expected.decoder == "rnnt beam 4 + lm" and expected.text

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "chorus.cli", *args, "--model", str(model_path)],
                              capture_output=True, text=True, timeout=300)

    out = cli("transcribe", str(clip), "--lookahead-ms", "480", "--beam", "4", "--lm", str(arpa),
              "--length-bonus", "4", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["tokens"] == expected.tokens and got["text"] == expected.text and got["decoder"] == "rnnt beam 4 + lm"

    with open(tmp_path / "test.json", "w") as f:
        f.write(json.dumps({"audio_filepath": clip.name, "duration": 1.5, "text": expected.text}) + "\n")
    out = cli("eval", str(tmp_path / "test.json"), "--lookahead-ms", "480", "--decoder", "rnnt", "--beam", "4",
              "--lm", str(arpa), "--length-bonus", "4", "--json")
    assert out.returncode == 0, out.stderr
    score = json.loads(out.stdout)
    assert score["decoder"] == "rnnt beam 4 + lm" and score["wer"] == 0.0

    (tmp_path / "bad.arpa").write_text("not an lm\n")
    for args, message in [(["--lm", str(tmp_path / "bad.arpa")], "unexpected line"),
                          (["--lm", str(arpa), "--beam", "1"], "needs beam search"),
                          (["--beam", "0"], "at least 1")]:
        out = cli("transcribe", str(clip), *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_the_same_file_twice_gives_two_results(tmp_path):
    """Results are kept by position, not by name: a repeated file is transcribed each time."""
    model_path = tmp_path / "tiny.nemo"
    save_fastconformer(model_path, tiny_model(seed=5), train_tokenizer(32))
    clip = tmp_path / "clip.wav"
    sf.write(clip, (np.random.default_rng(4).standard_normal(20000) * 0.1).astype(np.float32), 16000)
    loaded = load_fastconformer(model_path)
    engine = ConformerModel(loaded).make_engine(slots=3)
    files = [str(clip), str(tmp_path / "missing.wav"), str(clip), str(clip)]
    results = list(transcribe_files(engine, files, StreamRequest(lookahead_ms=480, decoder="rnnt"), concurrency=3))
    assert [r.file for r in results] == files
    assert results[1].error and not results[0].error
    assert results[0].text == results[2].text == results[3].text and results[0].tokens


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is an error: whatever reaches it was not refused before the model was loaded."""
    from chorus.asr import families
    from chorus.asr.conformer import family

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(families, "load_model", refuse)
    monkeypatch.setattr(family, "load_fastconformer", refuse)


@pytest.mark.parametrize("line, message", [
    ('{"audio_filepath": "clips/gone.wav", "text": "hello"}',
     "line 2: audio file {folder}/clips/gone.wav does not exist (relative paths are read from the manifest's folder)"),
    ('{"audio_filepath": "{folder}/gone.wav", "text": "hello"}', "line 2: audio file {folder}/gone.wav does not exist"),
    ('{"audio_filepath": "clips", "text": "hello"}', "line 2: audio file {folder}/clips is not a file (a directory)"),
    ('{"audio_filepath": "clips/ok.wav", "text": "hello"', "line 2: not a JSON object"),
    ('["clips/ok.wav", "hello"]', "line 2: not a JSON object"),
    ('{"text": "hello"}', "line 2: has no 'audio_filepath'"),
    ('{"audio_filepath": "clips/ok.wav"}', "line 2: has no 'text'"),
    ('{"audio_filepath": "clips/ok.wav", "text": 7}', "line 2: has a non-string 'text'"),
])
def test_a_bad_manifest_line_is_one_error_line_before_the_model_loads(tmp_path, no_model, capsys, line, message):
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "ok.wav", np.zeros(1600, np.float32), 16000)
    manifest = tmp_path / "test.json"
    manifest.write_text('{"audio_filepath": "clips/ok.wav", "text": "hello"}\n'
                        + line.replace("{folder}", str(tmp_path)) + "\n\n")
    assert cli.main(["eval", str(manifest)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {manifest} " + message.replace("{folder}", str(tmp_path))), err


def test_a_missing_manifest_is_one_error_line(tmp_path, no_model, capsys):
    assert cli.main(["eval", str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: manifest {tmp_path / 'nope.json'} does not exist"]


def test_an_undecodable_audio_file_names_the_manifest_line(tmp_path):
    """A file that is there but is not audio is found when it is read: still one line with the manifest's line."""
    model_path = tmp_path / "tiny.nemo"
    save_fastconformer(model_path, tiny_model(seed=5), train_tokenizer(32))
    sf.write(tmp_path / "ok.wav", np.zeros(8000, np.float32), 16000)
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    manifest = tmp_path / "test.json"
    manifest.write_text('{"audio_filepath": "ok.wav", "text": "a"}\n{"audio_filepath": "bad.wav", "text": "b"}\n')
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "eval", str(manifest), "--model", str(model_path),
                          "--lookahead-ms", "480", "--decoder", "ctc"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {manifest} line 2: audio file {tmp_path / 'bad.wav'}: ")
