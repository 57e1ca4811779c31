"""A FunASR streaming Paraformer through the family contract: the one scheduler, `chorus transcribe`,
`chorus eval` and `chorus serve`, next to a FastConformer, with nothing outside its folder knowing it."""
import asyncio
import json
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chorus.asr.conformer.checkpoint import load_fastconformer
from chorus.asr.conformer.family import ConformerModel
from chorus.asr.families import load_model
from chorus.asr.paraformer.family import ParaformerModel
from chorus.asr.paraformer.streaming import ChunkSetting, ParaformerStream
from chorus.asr.transcribe import transcribe_files
from chorus.codecs import encode
from chorus.server.app import ServerConfig
from chorus.server.registry import ModelRegistry
from chorus.stream.contract import StreamRequest, UnsupportedOption
from chorus.stream.scheduler import Scheduler
from paraformer_factories import speechlike, write_tiny_dir
from test_server import ServerThread, finals_text, run, stream_file

RATE = 16000


@pytest.fixture(scope="module")
def para_dir(tmp_path_factory):
    return write_tiny_dir(tmp_path_factory.mktemp("paraformer") / "model", seed=3)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    paths = []
    for i, seconds in enumerate((1.3, 2.45, 0.7, 3.1)):
        path = folder / f"clip{i}.wav"
        sf.write(path, speechlike(seconds, seed=20 + i).numpy(), RATE, subtype="PCM_16")  # as clients send it
        paths.append(path)
    return paths


def direct_tokens(model: ParaformerModel, audio: np.ndarray, setting: ChunkSetting) -> list[int]:
    """The family's own streamer, one stream, no contract, no scheduler: what everything else must give."""
    streamer = model.make_engine(slots=1).streamer
    stream = ParaformerStream(model.bundle.frontend, setting)
    slot = streamer.open()
    tokens = []
    try:
        for i in range(0, len(audio), 1600):
            stream.accept(audio[i:i + 1600])
        stream.finish()
        while stream.ready():
            feats, final = stream.take()
            tokens += streamer.step([slot], [feats], [final], setting)[0].tokens
    finally:
        streamer.close(slot)
    return tokens


def test_the_loader_table_picks_the_family_by_format(para_dir, model_path, tmp_path):
    assert load_model(para_dir).family == "paraformer"
    assert load_model(model_path).family == "fastconformer"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model chorus can load"):
        load_model(tmp_path / "empty")


def test_transcribe_files_equals_the_family_alone(para_dir, clips):
    model = load_model(para_dir)
    setting = ChunkSetting((5, 10, 5), 2, 0)
    request = StreamRequest(options={"chunk_size": [5, 10, 5], "encoder_chunk_look_back": 2,
                                     "decoder_chunk_look_back": 0})
    results = list(transcribe_files(model.make_engine(slots=4), [str(c) for c in clips], request, concurrency=4))
    for clip, result in zip(clips, results):
        expected = direct_tokens(model, sf.read(clip, dtype="float32")[0], setting)
        assert result.tokens == expected and expected, clip
        assert result.text == "".join(model.tokens[t] for t in expected)
        assert result.decoder == "paraformer" and result.lookahead_ms == 300


def test_two_families_in_one_scheduler_batched_equal_alone(para_dir, model_path, clips):
    """Law 2 through the one scheduler: Paraformer streams of two settings and FastConformer streams,
    started at different times, each equal its stream alone."""
    para = load_model(para_dir)
    conf = ConformerModel(load_fastconformer(model_path))
    engines = {"p": para.make_engine(slots=4), "c": conf.make_engine(slots=2)}
    plan = [("p", {}), ("p", {"chunk_size": [5, 10, 5]}), ("c", {}), ("p", {}), ("c", {})]
    audio = [sf.read(clips[i % len(clips)], dtype="float32")[0] for i in range(len(plan))]
    alone = [list(transcribe_files(engines[f], [str(clips[i % len(clips)])], StreamRequest(options=o)))[0].tokens
             for i, (f, o) in enumerate(plan)]

    class Feeder:
        def __init__(self, stream, samples, start):
            self.stream, self.samples, self.start, self.pos, self.error = stream, samples, start, 0, None

        def feed(self):
            if self.start > 0:
                self.start -= 1
                return 0.0
            if not self.stream.finished:
                self.stream.accept_audio(self.samples[self.pos:self.pos + 800])
                self.pos += 800
                if self.pos >= len(self.samples):
                    self.stream.finish()
            return 0.05

        def on_result(self, tokens):
            pass

        def after_round(self):
            pass

        def fail(self, error):
            self.error = error

    scheduler = Scheduler()
    starts = [0, 5, 0, 12, 3]  # rounds of 50 ms; the two default-setting Paraformers are one chunk apart
    jobs = [Feeder(engines[f].open(StreamRequest(options=o)), a, start)
            for (f, o), a, start in zip(plan, audio, starts)]
    batch_sizes = []
    for job in jobs:
        scheduler.add(job)
    scheduler.on_step = lambda model, size, seconds: batch_sizes.append((model, size))
    try:
        while not all(j.stream.done for j in jobs):
            scheduler.run_round()
            assert not any(j.error for j in jobs)
    finally:
        for j in jobs:
            j.stream.close()
    assert [j.stream.hypothesis.ids for j in jobs] == alone
    assert max(size for model, size in batch_sizes if model == "paraformer") >= 2
    assert {model for model, _ in batch_sizes} == {"paraformer", "conformer"}


def test_options_the_model_does_not_offer_are_refused(para_dir):
    engine = load_model(para_dir).make_engine(slots=1)
    for request, message in [(StreamRequest(options={"chunk_size": [0, 8, 4]}), "chunk_size"),
                             (StreamRequest(options={"encoder_chunk_look_back": 9}), "0..4"),
                             (StreamRequest(options={"colour": 1}), "unknown option"),
                             (StreamRequest(lookahead_ms=480), "300 ms"),
                             (StreamRequest(beam_size=4), "greedily"),
                             (StreamRequest(decoder="ctc"), "decoder")]:
        with pytest.raises(UnsupportedOption, match=message):
            engine.open(request)
    assert engine.pool.used == 0


def test_chorus_transcribe_and_eval_run_a_paraformer_directory(para_dir, clips, tmp_path):
    model = load_model(para_dir)
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "transcribe", str(clips[1]), "--model", str(para_dir),
                          "--json", "--option", "chunk_size=[5,10,5]"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    expected = direct_tokens(model, sf.read(clips[1], dtype="float32")[0], ChunkSetting((5, 10, 5), 4, 1))
    assert result["tokens"] == expected and result["decoder"] == "paraformer"
    manifest = tmp_path / "test.json"
    text = "".join(model.tokens[t] for t in expected)
    manifest.write_text(json.dumps({"audio_filepath": str(clips[1]), "text": text}) + "\n"
                        + json.dumps({"audio_filepath": str(clips[2]), "text": text[:3] + "x"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "chorus.cli", "eval", str(manifest), "--model", str(para_dir), "--json",
                          "--option", "chunk_size=[5,10,5]"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    score = json.loads(out.stdout)
    assert score["utterances"] == 2 and score["exact"] == 0.5 and 0 < score["wer"] < 1  # per character
    assert [w["ref"] for w in score["worst"]] == [" ".join(text[:3]) + " x"]


@pytest.fixture(scope="module")
def server(para_dir, model_path):
    registry = ModelRegistry()
    registry.add("conformer", ConformerModel(load_fastconformer(model_path)), slots=2)
    registry.add("paraformer", load_model(para_dir), slots=4)
    srv = ServerThread(registry, ServerConfig(port=0, batch_wait_ms=5))
    yield srv
    srv.stop()


def test_the_server_streams_a_paraformer_as_it_streams_a_conformer(server, para_dir, clips):
    models = json.loads(urllib.request.urlopen(server.http + "/models").read())
    para = next(m for m in models if m["name"] == "paraformer")
    assert para["family"] == "paraformer" and para["options"]["chunk_size"] == [[0, 10, 5], [5, 10, 5]]
    assert next(m for m in models if m["name"] == "conformer")["family"] == "fastconformer"
    model = load_model(para_dir)
    options = {"chunk_size": [5, 10, 5], "encoder_chunk_look_back": 4, "decoder_chunk_look_back": 1}
    expected = [list(transcribe_files(model.make_engine(slots=1), [str(c)], StreamRequest(options=options)))[0].text
                for c in clips]

    async def clients():
        return await asyncio.gather(*[
            stream_file(server.url, encode(sf.read(c, dtype="float32")[0], "pcm_s16le"),
                        {"model": "paraformer", "endpointing": False, "options": options, "word_times": True},
                        piece=1280, pace=0.002)
            for c in clips])

    results = run(clients())
    for msgs, text in zip(results, expected):
        ready = msgs[0]
        assert ready["family"] == "paraformer" and ready["options"] == options and ready["chunk_ms"] == 600
        assert msgs[-1] == {"closed": 1000}
        assert finals_text(msgs) == text and text
        words = [m for m in msgs if m.get("type") == "final"][-1]["words"]
        assert "".join(w["word"] for w in words) == text and all(w["start"] <= w["end"] for w in words)
    server.wait_idle()


def test_the_server_answers_bad_paraformer_options(server):
    async def client():
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "start", "model": "paraformer", "options": {"chunk_size": [1, 2, 3]}}))
            reply = json.loads(await ws.recv())
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return reply, ws.close_code

    reply, code = run(client())
    assert reply["code"] == "unsupported_option" and "chunk_size" in reply["message"] and code == 1003
    server.wait_idle()
