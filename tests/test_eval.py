"""`chorus eval`: WER/CER/exact over a manifest through the streaming path, per lookahead and decoder."""
import json
import subprocess
import sys

import jiwer
import numpy as np
import soundfile as sf

from chorus.asr.conformer.checkpoint import load_fastconformer, save_fastconformer
from chorus.asr.conformer.streaming import ConformerStreamer
from chorus.asr.textnorm import normalize_text
from chorus.asr.transcribe import transcribe_files
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
    engine = ConformerStreamer(loaded.model, slots=4)
    hyps = {la: [normalize_text(r.text) for r in transcribe_files(loaded, engine, [str(f) for f in files],
                                                                   lookahead_ms=la, decoder="ctc")]
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
