"""Matcha-TTS: the restricted checkpoint loader, synthesis with explicit noise, batched == alone, the front end."""
from __future__ import annotations

import pickle
import shutil
import sys

import pytest
import torch

from chorus.tts.matcha import (SYMBOLS, NotAMatchaCheckpoint, english_cleaners2, fix_len, load_lightning_checkpoint,
                               load_matcha, text_to_ids)
from chorus.tts.matcha.checkpoint import Stub, read_bytes_pickle
pytest.importorskip("omegaconf")
from matcha_factories import random_matcha, write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("matcha")
    model, cfg = random_matcha()
    path = write_checkpoint(d / "tiny.ckpt", model, cfg, booby_marker=d / "pwned")
    return model, cfg, path, d


def ids_batch(seqs):
    x = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    return x, torch.tensor([len(s) for s in seqs])


def test_weights_only_load_refuses_matcha_layout(tiny):
    _, _, path, _ = tiny
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_loader_reads_weights_and_hyperparameters_without_running_code(tiny):
    model, cfg, path, d = tiny
    loaded, hp = load_matcha(path)
    assert not (d / "pwned").exists()  # the booby-trapped __reduce__ (os.system) did not run
    raw = load_lightning_checkpoint(path)
    trap = raw["callbacks"]["Booby"]
    assert isinstance(trap, Stub) and trap.qualname in ("posix.system", "os.system", "nt.system")
    assert isinstance(raw["hyper_parameters"]["encoder"], Stub)  # a DictConfig, recorded, not built
    assert hp["n_vocab"] == len(SYMBOLS) == 178
    assert hp["encoder"]["encoder_params"]["n_feats"] == 20  # ${model.n_feats}, resolved
    assert hp["encoder"]["duration_predictor_params"]["filter_channels_dp"] == 32
    assert hp["decoder"]["channels"] == [32, 32] and hp["decoder"]["act_fn"] == "snakebeta"
    assert hp["cfm"] == {"name": "CFM", "solver": "euler", "sigma_min": 1e-4}
    assert hp["data_statistics"] == {"mel_mean": pytest.approx(-5.536622), "mel_std": pytest.approx(2.116101)}
    assert hp["optimizer"]["_partial_"] == "torch.optim.adam.Adam" and hp["optimizer"]["lr"] == 1e-4
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_handcrafted_pickle_never_imports_or_calls(tmp_path):
    marker = tmp_path / "ran"
    name = "chorus_test_module_that_does_not_exist"
    data = (b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR"  # os.system("touch ...")
            b"c" + name.encode() + b"\nthing\n)R" b"\x86.")
    got = read_bytes_pickle(data)
    assert not marker.exists() and name not in sys.modules
    assert isinstance(got[0], Stub) and got[0].args == (f"touch {marker}",)
    assert got[1].qualname == f"{name}.thing"


def test_refusals(tmp_path, tiny):
    model, cfg, _, _ = tiny
    bad = tmp_path / "plain.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(NotAMatchaCheckpoint, match="zip"):
        load_matcha(bad)
    cfg2 = cfg.copy()
    cfg2.model.decoder.down_block_type = "conformer"
    p = write_checkpoint(tmp_path / "conformer.ckpt", model, cfg2)
    with pytest.raises(NotAMatchaCheckpoint, match="conformer"):
        load_matcha(p)
    p = write_checkpoint(tmp_path / "extra.ckpt", model, cfg, extra_state={"decoder.unknown": torch.zeros(2)})
    with pytest.raises(NotAMatchaCheckpoint, match="unexpected"):
        load_matcha(p)


def test_noise_decides_the_mel_and_temperature_scales_it(tiny):
    model, *_ = tiny
    x, n = ids_batch([[0, 20, 0, 45, 0, 60, 0, 3, 0]])
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, model.cfg.n_feats, 200, generator=g)
    a = model.synthesise(x, n, n_timesteps=3, temperature=0.667, noise=z)
    b = model.synthesise(x, n, n_timesteps=3, temperature=0.667, noise=[z[0, :, :int(a["mel_lengths"][0])]])
    assert torch.equal(a["mel"], b["mel"])  # only the item's own frames of noise matter
    c = model.synthesise(x, n, n_timesteps=3, temperature=0.0, noise=z)
    d = model.synthesise(x, n, n_timesteps=3, temperature=0.0, noise=torch.randn_like(z))
    assert torch.equal(c["mel"], d["mel"]) and not torch.equal(a["mel"], c["mel"])
    assert a["mel"].shape == (1, model.cfg.n_feats, int(a["mel_lengths"][0]))
    torch.testing.assert_close(a["mel"], a["decoder_outputs"] * 2.116101 - 5.536622)
    with pytest.raises(ValueError, match="noise"):
        model.synthesise(x, n, n_timesteps=2, noise=z[:, :, :3])


def test_durations_and_length_scale(tiny):
    model, *_ = tiny
    x, n = ids_batch([[0, 20, 0, 45, 0, 60, 0]])
    a = model.synthesise(x, n, n_timesteps=1, noise=torch.zeros(1, model.cfg.n_feats, 400))
    b = model.synthesise(x, n, n_timesteps=1, length_scale=2.0, noise=torch.zeros(1, model.cfg.n_feats, 400))
    assert int(a["mel_lengths"][0]) == int(a["durations"].sum())
    assert int(b["mel_lengths"][0]) == 2 * int(a["mel_lengths"][0])
    assert fix_len(99) == 100 and fix_len(100) == 100


@pytest.mark.parametrize("n_spks", [1, 3])
def test_batched_equals_alone(n_spks):
    model, _ = random_matcha(n_spks=n_spks, seed=2)
    seqs = [[0, 12, 0, 40, 0], list(range(1, 60, 2)), [0, 70, 0, 71, 0, 72, 0, 73, 0, 74, 0, 3, 0]]
    x, n = ids_batch(seqs)
    spks = torch.tensor([0, 2, 1]) if n_spks > 1 else None
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn(model.cfg.n_feats, 500, generator=g) for _ in seqs]
    batch = model.synthesise(x, n, n_timesteps=4, temperature=0.8, spks=spks, noise=noise)
    lengths = batch["mel_lengths"]
    assert len(set(fix_len(int(v)) for v in lengths)) > 1  # padding differs between items
    for i, s in enumerate(seqs):
        alone = model.synthesise(torch.tensor([s]), torch.tensor([len(s)]), n_timesteps=4, temperature=0.8,
                                 spks=None if spks is None else spks[i:i + 1], noise=[noise[i]])
        m = int(lengths[i])
        assert alone["mel"].shape[-1] == m
        torch.testing.assert_close(batch["mel"][i, :, :m], alone["mel"][0], atol=2e-5, rtol=0)


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


@needs_espeak
def test_front_end_matches_phonemizer_output():
    # what Matcha's english_cleaners2 (phonemizer 3.x, espeak-ng 1.5x) gives for these sentences
    assert english_cleaners2("Hello, my world!") == "həlˈoʊ, maɪ wˈɜːld!"
    assert english_cleaners2("Mr. and Mrs. Jones went to St. Louis") == "mˈɪstɚɹ ænd mɪsˈɛs dʒˈoʊnz wɛnt tə sˈeɪnt lˈuːi"
    assert english_cleaners2('"Quoted" (bracketed) text... and more: yes!') == \
        '"kwˈoʊɾᵻd" bɹˈækɪɾᵻd tˈɛkst... ænd mˈoːɹ: jˈɛs!'
    ids = text_to_ids("Hello, my world!")
    assert ids[0::2] == [0] * (len(ids) // 2 + 1)
    assert "".join(SYMBOLS[i] for i in ids[1::2]) == "həlˈoʊ, maɪ wˈɜːld!"
