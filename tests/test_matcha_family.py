"""Matcha-TTS + HiFi-GAN as a voice family: how a voice is named, streams equal offline synthesis with the same seed,
chunked vocoding equals one-shot, several streams in one step equal each alone, `chorus speak`, `/tts`."""
from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("omegaconf")
pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng is not installed (apt-get install espeak-ng)")
sys.path.insert(0, str(Path(__file__).parent))
from matcha_factories import random_matcha, write_checkpoint  # noqa: E402
from test_hifigan import V1_SMALL, weight_normed  # noqa: E402

from chorus.stream.tts_contract import SpeechRequest, UnsupportedOption  # noqa: E402
from chorus.tts.families import load_voice  # noqa: E402
from chorus.tts.hifigan import load_hifigan  # noqa: E402
from chorus.tts.matcha import load_matcha, text_to_ids  # noqa: E402
from chorus.tts.matcha.family import NotAMatchaVoice  # noqa: E402

TEXT = "Hello there. How are you today? A ball, a bell."
VOCODER = dict(V1_SMALL, num_mels=20, upsample_initial_channel=16)
TOL = 1e-4


def write_vocoder(d: Path, cfg: dict = VOCODER, name: str = "generator_v1") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": weight_normed(cfg, seed=4).state_dict()}, d / name)
    (d / "config.json").write_text(json.dumps(cfg))
    return d / name


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("matcha_voice")
    model, cfg = random_matcha(seed=5, frames_per_symbol=2.0)
    voice_dir = root / "ljs"
    voice_dir.mkdir()
    ckpt = write_checkpoint(voice_dir / "matcha_ljs.ckpt", model, cfg)
    write_vocoder(voice_dir)
    apart = root / "apart"
    apart.mkdir()
    ckpt2 = write_checkpoint(apart / "model.ckpt", model, cfg)
    generator = write_vocoder(root / "hifigan", name="g_02500000")
    model3, cfg3 = random_matcha(n_spks=3, seed=6, frames_per_symbol=2.0)
    ckpt3 = write_checkpoint(root / "multi.ckpt", model3, cfg3)
    return {"dir": voice_dir, "ckpt": ckpt, "apart": ckpt2, "generator": generator, "multi": ckpt3}


@pytest.fixture(scope="module")
def voice(files):
    return load_voice(files["dir"])


def stream_all(engine, texts_and_requests, max_rounds=10_000):
    """Open a stream per (text, request), push each whole and finish; step all ready streams together (one
    engine step per round) until done.  Per stream: [(mark, [chunk audio...])], and the batch sizes seen."""
    streams = [engine.open(req) for _, req in texts_and_requests]
    for s, (text, _) in zip(streams, texts_and_requests):
        s.push_text(text)
        s.finish()
    out = [[] for _ in streams]
    sizes = []
    for _ in range(max_rounds):
        ready = [k for k, s in enumerate(streams) if s.ready()]
        if not ready:
            break
        sizes.append(len(ready))
        for k, chunk in zip(ready, engine.step([streams[k] for k in ready])):
            if not out[k] or out[k][-1][0] != chunk.mark or out[k][-1][2]:
                out[k].append([chunk.mark, [], False])
            out[k][-1][1].append(chunk.audio)
            out[k][-1][2] = chunk.last
    assert all(s.done for s in streams)
    for s in streams:
        s.close()
    return [[(m, chunks) for m, chunks, last in segs] for segs in out], sizes


def test_a_voice_is_named_three_ways(files, voice):
    assert voice.describe()["family"] == "matcha" and voice.describe()["voice"] == "ljs"
    assert voice.describe()["vocoder"] == "generator_v1" and voice.sample_rate == 22050
    assert voice.describe()["seed"] is True and set(voice.describe()["options"]) == {"n_timesteps", "temperature",
                                                                                    "chunk_frames"}
    beside = load_voice(files["ckpt"])  # the .ckpt alone, generator and config.json beside it
    apart = load_voice(files["apart"], files["generator"])  # --vocoder
    dir_vocoder = load_voice(files["apart"], files["generator"].parent)  # --vocoder DIR
    assert beside.describe()["voice"] == "matcha_ljs" and apart.describe()["vocoder"] == "g_02500000"
    req = SpeechRequest(seed=3, options={"n_timesteps": 2})
    a, b, c = (v.synthesize("Hello.", req)[0] for v in (voice, beside, dir_vocoder))
    assert np.array_equal(a, b) and np.array_equal(b, c)  # the same Matcha and vocoder weights, named three ways
    with pytest.raises(NotAMatchaVoice, match="exactly one HiFi-GAN generator"):
        load_voice(files["apart"])  # no generator beside it
    with pytest.raises(ValueError, match="not a voice chorus can load"):
        load_voice(files["generator"].parent / "config.json", files["generator"])  # not a voice at all
    bad = write_vocoder(files["generator"].parent.parent / "mels80", dict(VOCODER, num_mels=80))
    with pytest.raises(NotAMatchaVoice, match="20-channel"):
        load_voice(files["apart"], bad)


def test_offline_synthesis_is_matcha_then_the_vocoder(files, voice):
    model, _ = load_matcha(files["ckpt"])
    vocoder = load_hifigan(files["dir"] / "generator_v1")
    req = SpeechRequest(seed=11, speed=0.8, options={"n_timesteps": 3, "temperature": 0.5})
    got = voice.synthesize(TEXT, req)
    gen = torch.Generator().manual_seed(11)
    sentences = ["Hello there.", "How are you today?", "A ball, a bell."]
    assert len(got) == 3
    for audio, sentence in zip(got, sentences):
        ids = text_to_ids(sentence)
        enc = model.encode(torch.tensor([ids]), torch.tensor([len(ids)]), None, 1 / 0.8)
        noise = torch.randn(20, int(enc.lengths[0]), generator=gen)
        mel = model.synthesise(torch.tensor([ids]), torch.tensor([len(ids)]), n_timesteps=3, temperature=0.5,
                               length_scale=1 / 0.8, noise=[noise])["mel"]
        with torch.no_grad():
            want = vocoder(mel.clone())[0, 0].numpy()
        assert audio.shape == want.shape and np.max(np.abs(audio - want)) < 1e-5


@pytest.mark.parametrize("chunk_frames", [1, 7, 32, 1024])
def test_stream_in_chunks_equals_offline_with_the_same_seed(voice, chunk_frames):
    req = SpeechRequest(seed=5, options={"n_timesteps": 3, "chunk_frames": chunk_frames})
    want = voice.synthesize(TEXT, req)
    (got,), _ = stream_all(voice.make_engine(slots=2), [(TEXT, req)])
    assert [m.text for m, _ in got] == ["Hello there.", "How are you today?", "A ball, a bell."]
    for (mark, chunks), w in zip(got, want):
        audio = np.concatenate(chunks)
        assert audio.shape == w.shape and np.max(np.abs(audio - w)) < TOL, mark
        frames = len(w) // 256
        right = voice.vocoder.receptive_field().right
        if frames > chunk_frames + right:  # audio starts before the whole sentence's audio exists
            assert len(chunks) > 1 and len(chunks[0]) == chunk_frames * 256


def test_several_streams_in_one_step_equal_each_alone(files, voice):
    multi = load_voice(files["multi"], files["generator"])
    cases = [(TEXT, SpeechRequest(seed=1, options={"n_timesteps": 3})),
             ("Bob is here! Is he?", SpeechRequest(seed=2, speed=1.3, options={"n_timesteps": 3})),
             ("Oh. A much longer sentence than the others, with a comma; and more words.",
              SpeechRequest(seed=3, options={"n_timesteps": 2, "temperature": 0.9, "chunk_frames": 5})),
             (TEXT, SpeechRequest(seed=1, options={"n_timesteps": 3})),  # the same seed: the same audio
             ("Short.", SpeechRequest(seed=4, sample_rate=16000, options={"n_timesteps": 3}))]
    for v, speakers in ((voice, [None] * 5), (multi, [0, 2, 1, 0, 2])):
        cases_v = [(t, SpeechRequest(**{**r.__dict__, "speaker": sp})) for (t, r), sp in zip(cases, speakers)]
        together, sizes = stream_all(v.make_engine(slots=8), cases_v)
        assert max(sizes) == len(cases_v)
        for (text, req), got in zip(cases_v, together):
            (alone,), _ = stream_all(v.make_engine(slots=1), [(text, req)])
            assert [m for m, _ in got] == [m for m, _ in alone]
            for (_, a), (_, b) in zip(got, alone):
                a, b = np.concatenate(a), np.concatenate(b)
                assert a.shape == b.shape and np.max(np.abs(a - b)) < TOL
        assert np.array_equal(np.concatenate(together[0][0][1]), np.concatenate(together[3][0][1]))


def test_seed_options_and_refusals(voice, files):
    a = voice.synthesize("Hello.", SpeechRequest(seed=1, options={"n_timesteps": 2}))[0]
    b = voice.synthesize("Hello.", SpeechRequest(seed=2, options={"n_timesteps": 2}))[0]
    c = voice.synthesize("Hello.", SpeechRequest(seed=2, options={"n_timesteps": 2, "temperature": 0.0}))[0]
    d = voice.synthesize("Hello.", SpeechRequest(seed=3, options={"n_timesteps": 2, "temperature": 0.0}))[0]
    assert not np.array_equal(a, b) and np.array_equal(c, d)
    engine = voice.make_engine(slots=1)
    s = engine.open(SpeechRequest())
    assert isinstance(s.settings["seed"], int)  # drawn, and reported so that it can be repeated
    s.close()
    for bad in (SpeechRequest(speed=9.0), SpeechRequest(options={"steps": 3}),
                SpeechRequest(options={"n_timesteps": 0}), SpeechRequest(options={"temperature": -1}),
                SpeechRequest(options={"chunk_frames": 2.5}), SpeechRequest(speaker=1), SpeechRequest(seed=-1)):
        with pytest.raises(UnsupportedOption):
            engine.open(bad)
    assert engine.pool.used == 0
    multi = load_voice(files["multi"], files["generator"])
    with pytest.raises(UnsupportedOption, match="0..2"):
        multi.make_engine(slots=1).open(SpeechRequest(speaker=3))


def test_cancel_drops_the_sentence_being_vocoded(voice):
    engine = voice.make_engine(slots=1)
    s = engine.open(SpeechRequest(seed=1, options={"n_timesteps": 2, "chunk_frames": 1}))
    s.push_text(TEXT)
    s.finish()
    chunk = engine.step([s])[0]
    assert not chunk.last and s.ready() and not s.done
    assert s.cancel() == 3  # the sentence in progress and the two queued
    assert not s.ready() and s.done and s.idle
    s.close()


def test_chorus_speak_writes_what_offline_synthesis_makes(files, voice, tmp_path):
    from chorus.cli import main
    out = tmp_path / "out.wav"
    assert main(["speak", TEXT, "-o", str(out), "--voice", str(files["apart"]), "--vocoder",
                 str(files["generator"]), "--seed", "7", "--option", "n_timesteps=3"]) == 0
    audio, rate = sf.read(out, dtype="float32")
    apart = load_voice(files["apart"], files["generator"])
    want = np.concatenate(apart.synthesize(TEXT, SpeechRequest(seed=7, options={"n_timesteps": 3})))
    assert rate == 22050 and audio.shape == want.shape
    assert np.max(np.abs(audio - want)) <= 1.5 / 32768  # PCM_16
    out2 = tmp_path / "dir.wav"
    assert main(["speak", TEXT, "-o", str(out2), "--voice", str(files["dir"]), "--seed", "7",
                 "--option", "n_timesteps=3"]) == 0
    want2 = np.concatenate(voice.synthesize(TEXT, SpeechRequest(seed=7, options={"n_timesteps": 3})))
    assert np.max(np.abs(sf.read(out2, dtype="float32")[0] - want2)) <= 1.5 / 32768


def test_tts_server_streams_matcha_voices(files, voice, model_path):
    from test_tts_server import VoiceServer, audio_of, speak

    from chorus.asr.conformer.checkpoint import load_fastconformer
    from chorus.asr.conformer.family import ConformerModel
    from chorus.server.app import ServerConfig
    from chorus.server.registry import ModelRegistry

    registry = ModelRegistry()
    registry.add("default", ConformerModel(load_fastconformer(model_path)), slots=2)
    voices = ModelRegistry()
    voices.add("matcha", voice, slots=8)
    srv = VoiceServer(registry, ServerConfig(port=0, idle_timeout=5.0, batch_wait_ms=5, tts_max_batch=8), voices)
    try:
        cases = [(TEXT, 1, 32), ("Bob is here! Is he?", 2, 4), ("Oh. A longer one, with a comma; and more words.",
                                                                 3, 9), (TEXT, 4, 1024)]

        async def clients():
            return await asyncio.gather(*(speak(srv.url, {"voice": "matcha", "encoding": "pcm_f32le", "seed": seed,
                                                          "options": {"n_timesteps": 3, "chunk_frames": cf}},
                                                [text]) for text, seed, cf in cases))

        results = asyncio.run(asyncio.wait_for(clients(), 120))
        for (text, seed, cf), (messages, code) in zip(cases, results):
            assert code == 1000, messages[-2:]
            assert messages[0]["type"] == "ready" and messages[0]["family"] == "matcha" and messages[0]["seed"] == seed
            want = voice.synthesize(text, SpeechRequest(seed=seed, options={"n_timesteps": 3}))
            got = audio_of(messages, "pcm_f32le")
            per_segment = {}
            for header, a in got:
                per_segment.setdefault(header["segment"], []).append(a)
            assert sorted(per_segment) == list(range(len(want)))
            for k, w in enumerate(want):
                a = np.concatenate(per_segment[k])
                assert a.shape == w.shape and np.max(np.abs(a - w)) < TOL
            assert messages[-1]["type"] == "done" and messages[-1]["segments"] == len(want)
        models = json.loads(__import__("urllib.request").request.urlopen(srv.http + "/models").read())
        assert any(m.get("family") == "matcha" and m.get("kind") == "tts" for m in models)
        m = srv.server.metrics
        steps = m.value("chorus_step_batch_size_count", model="matcha")
        singles = m.value("chorus_step_batch_size_bucket", model="matcha", le="1.0")
        assert steps > singles, "no step vocoded more than one stream"
    finally:
        srv.stop()


def test_serve_names_a_matcha_voice_and_its_vocoder(files):
    from chorus.cli import _load_voices, build_parser
    args = build_parser().parse_args(["serve", "--no-default-voice", "--voice",
                                      f"lj={files['apart']},vocoder={files['generator']}",
                                      "--voice", str(files["dir"])])
    voices = _load_voices(args)
    assert voices.names() == ["lj", "ljs"]
    assert voices.get("lj").model.describe()["vocoder"] == "g_02500000"
    bad = build_parser().parse_args(["serve", "--no-default-voice", "--voice",
                                     f"{files['apart']},vocoder=/nonexistent"])
    with pytest.raises(ValueError, match="no such file"):
        _load_voices(bad)
