"""A tiny run of the default-model recipe: corpus -> training -> .nemo -> chorus transcribe.

It keeps the recipe working (CI runs it); the real model is trained with the same scripts at
full size (recipes/default_asr/README.md).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chorus.asr.conformer.checkpoint import load_fastconformer, save_fastconformer
from chorus.asr.nemo_archive import read_nemo
from factories import tiny_model

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default_asr"


@pytest.mark.skipif(shutil.which("espeak-ng") is None,
                    reason="espeak-ng is not installed (scripts/test installs it with apt-get where it can)")
def test_recipe_smoke(tmp_path):
    corpus, work = tmp_path / "corpus", tmp_path / "train"
    subprocess.run([sys.executable, str(RECIPE / "make_corpus.py"), "--smoke", "--out", str(corpus),
                    "--workers", "1"], check=True, timeout=600, capture_output=True)
    train = [json.loads(line) for line in open(corpus / "train.json")]
    assert train and all((corpus / r["audio_filepath"]).exists() for r in train)
    digit_words = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    digits = [r for r in train if r["source"] == "digits"]
    assert digits and all(set(r["text"].split()) <= digit_words for r in digits)
    held_out = set(json.loads((corpus / "voices.json").read_text())["held_out"].values())
    assert not held_out & {r["voice"] for r in train}
    # --test-only makes the same test splits and nothing else (for measuring a model without its corpus)
    tests_only = tmp_path / "tests_only"
    subprocess.run([sys.executable, str(RECIPE / "make_corpus.py"), "--smoke", "--test-only", "--out",
                    str(tests_only), "--workers", "1"], check=True, timeout=600, capture_output=True)
    made = sorted(p.name for p in tests_only.glob("*.json") if p.name.startswith(("test_", "train", "dev")))
    assert made == sorted(p.name for p in corpus.glob("test_*.json"))
    for name in made:
        assert (tests_only / name).read_text() == (corpus / name).read_text()
    model_path = work / "model.nemo"
    first = subprocess.run([sys.executable, str(RECIPE / "train.py"), "--smoke", "--corpus", str(corpus),
                            "--work", str(work), "--export", str(model_path)],
                           check=True, timeout=600, capture_output=True, text=True)
    assert "dev WER" in first.stdout + first.stderr and "evaluation failed" not in first.stdout + first.stderr
    loaded = load_fastconformer(model_path)  # the same loader as any NeMo checkpoint
    assert loaded.model.decoders == ("rnnt", "ctc")
    assert [list(c) for c in loaded.config["encoder"]["att_context_size"]] == [[70, 13], [70, 6], [70, 1], [70, 0]]
    # --smoke snapshots every step, writes only the two it averages (and step 1, the CTC-only phase's
    # fallback), and exports their mean
    assert "averaging the weights of steps [3, 4]" in first.stdout
    assert sorted(p.name for p in work.glob("step*.pt")) == ["step1.pt", "step3.pt", "step4.pt"]
    snapshots = [torch.load(work / f"step{s}.pt", weights_only=True)["model"] for s in (3, 4)]
    exported = loaded.model.state_dict()
    weights = [k for k, v in snapshots[1].items() if v.is_floating_point() and k in exported]
    assert len(weights) > 20
    for k in weights:
        torch.testing.assert_close(exported[k], (snapshots[0][k] + snapshots[1][k]) / 2)
    assert any(not torch.equal(snapshots[0][k], snapshots[1][k]) for k in weights)  # they did train
    # resume: a second invocation finds the checkpoint at --max-steps, trains nothing and stops
    out = subprocess.run([sys.executable, str(RECIPE / "train.py"), "--smoke", "--corpus", str(corpus),
                          "--work", str(work)], check=True, timeout=600, capture_output=True, text=True)
    assert "resumed at step 4" in out.stdout
    # fine-tune: the exported model's weights and tokenizer, with VTLP and spectral tilt, into a new work
    # directory; exported with half-precision weights
    tuned_path = tmp_path / "tuned.nemo"
    tuned = subprocess.run([sys.executable, str(RECIPE / "train.py"), "--smoke", "--corpus", str(corpus),
                            "--work", str(tmp_path / "tune"), "--init-from", str(model_path), "--vtlp", "0.5",
                            "--tilt", "0.5", "--export", str(tuned_path), "--export-dtype", "float16"],
                           check=True, timeout=600, capture_output=True, text=True)
    assert f"initialised from {model_path}" in tuned.stdout
    assert (tmp_path / "tune" / "tokenizer.model").read_bytes() == loaded.tokenizer.model_proto
    assert read_nemo(tuned_path).state_dict["joint.joint_net.2.weight"].dtype == torch.float16
    tuned_weights = load_fastconformer(tuned_path).model.state_dict()
    assert any(not torch.equal(tuned_weights[k], exported[k]) for k in weights)
    # a checkpoint of another size is refused with a message that says so
    other = tmp_path / "other_size.nemo"
    save_fastconformer(other, tiny_model(vocab_size=loaded.tokenizer.vocab_size), loaded.tokenizer)
    refused = subprocess.run([sys.executable, str(RECIPE / "train.py"), "--smoke", "--corpus", str(corpus),
                              "--work", str(tmp_path / "refused"), "--init-from", str(other)],
                             timeout=600, capture_output=True, text=True)
    assert refused.returncode != 0 and f"--init-from {other}: not a --size tiny model" in refused.stderr
    audio = corpus / train[0]["audio_filepath"]
    cli = subprocess.run([sys.executable, "-m", "chorus.cli", "transcribe", str(audio), "--model", str(model_path),
                          "--json"], check=True, timeout=300, capture_output=True, text=True)
    result = json.loads(cli.stdout)
    assert result["file"] == str(audio) and "tokens" in result and result["decoder"] == "rnnt"
    # the n-gram LM over the model's pieces, without the dev and test sentences, used in beam search
    lm_path = tmp_path / "lm.arpa.gz"
    made = subprocess.run([sys.executable, str(RECIPE / "make_lm.py"), "--smoke", "--corpus", str(corpus),
                           "--model", str(model_path), "--out", str(lm_path)],
                          check=True, timeout=300, capture_output=True, text=True)
    assert "held-out ones left out" in made.stdout and lm_path.exists()
    cli = subprocess.run([sys.executable, "-m", "chorus.cli", "transcribe", str(audio), "--model", str(model_path),
                          "--lm", str(lm_path), "--json"], check=True, timeout=300, capture_output=True, text=True)
    assert json.loads(cli.stdout)["decoder"] == "rnnt beam 8 + lm"
