"""RNNT beam search with n-gram fusion: the two laws, the LM's effect, and how it is chosen."""
import numpy as np
import pytest
import torch

from chorus.asr.conformer.beam import BeamConfig, RnntBeamSearch, rnnt_beam_offline
from chorus.asr.conformer.checkpoint import load_fastconformer
from chorus.asr.conformer.streaming import ConformerStreamer
from chorus.asr.ngram import NgramLM, estimate_kneser_ney
from chorus.asr.conformer.family import BUNDLED_LM, make_search
from chorus.asr.conformer.family import BUNDLED_MODEL
from chorus.stream.contract import UnsupportedOption
from chorus.stream.scheduler import run_to_end, step_ready
from chorus.stream.chunking import whole_utterance_chunks
from factories import (MULTI_LOOKAHEAD, TEXT, conformer_engine, conformer_stream, random_mel, stream_samples,
                       tiny_model, train_tokenizer)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def lm(tokenizer):
    grams = estimate_kneser_ney([tokenizer.encode_as_pieces(t) for t in TEXT], order=3, min_count=1)
    return NgramLM(3, grams, tokenizer.pieces)


def searches(model, lm):
    # The random test model makes beam search favour short outputs (blank paths add up), so a
    # length bonus keeps the hypotheses long enough to test something.
    return {"beam4": RnntBeamSearch(model.joint, model.decoder, BeamConfig(4, length_bonus=2.0)),
            "beam4+lm": RnntBeamSearch(model.joint, model.decoder, BeamConfig(4, lm_weight=0.3, length_bonus=3.0),
                                       lm)}


def stream_alone(engine, search, mel, context):
    """Beam tokens and frames of one stream fed chunk by chunk (the encoder step decodes nothing)."""
    setting = engine.setting(context)
    slot = engine.open()
    hyps = search.start_fresh()
    try:
        for chunk, consumed in whole_utterance_chunks(setting.plan, mel):
            r = engine.step([slot], [chunk], [consumed], setting, [None])[0]
            assert not r.tokens
            hyps = search.advance(hyps, r.encoded, r.frames_done - r.encoded.shape[0])
    finally:
        engine.close(slot)
    return search.best_final(hyps)


@pytest.mark.parametrize("context", MULTI_LOOKAHEAD, ids=lambda c: f"ctx{c[0]}_{c[1]}")
@pytest.mark.parametrize("kind", ["beam4", "beam4+lm"])
@pytest.mark.parametrize("frames", [9, 113, 650])
def test_law1_streaming_beam_equals_offline_beam(model, lm, context, kind, frames):
    search = searches(model, lm)[kind]
    engine = ConformerStreamer(model, slots=1)
    mel = random_mel(frames, seed=frames)
    best = stream_alone(engine, search, mel, context)
    encoded, length = model.encoder(mel[None], torch.tensor([frames]), context)
    assert list(best.tokens) == rnnt_beam_offline(search, encoded, length)[0]
    assert list(best.frames) == sorted(best.frames) and all(0 <= f < int(length[0]) for f in best.frames)
    if frames >= 113:
        assert 0 < len(best.tokens) < int(length[0]) * 2


def test_law2_beam_streams_batched_equal_alone(model, tokenizer, lm):
    """Audio streams with beam search (with and without LM) and a greedy one, stepped together."""
    engine = conformer_engine(model, tokenizer, slots=4)
    by_kind = searches(model, lm)
    kinds = ["beam4", "beam4+lm", None, "beam4+lm"]
    rng = np.random.default_rng(7)
    clips = [(rng.standard_normal(int(16000 * s)) * 0.1).astype(np.float32) for s in (1.3, 0.8, 1.6, 2.1)]
    setting = engine.streamer.setting((70, 6))
    alone = [stream_samples(engine, c, 16000, setting, "rnnt", search=by_kind.get(k)).hypothesis.ids
             for c, k in zip(clips, kinds)]
    streams = [conformer_stream(engine, setting, "rnnt", 16000, by_kind.get(k)) for k in kinds]
    sizes = []
    try:
        for i in range(0, 40000, 480):
            for j, (s, c) in enumerate(zip(streams, clips)):
                start = 1440 * j  # later starts (whole pieces: every sample is fed)
                if start <= i < start + len(c):
                    s.accept_audio(c[i - start:i - start + 480])
                    if i - start + 480 >= len(c):
                        s.finish()
            if i % 4800 == 0:  # step every 0.3 s, so that streams queue up chunks and batch
                sizes.append(len(step_ready(streams)))
        run_to_end(streams)
    finally:
        for s in streams:
            s.close()
    assert max(sizes) >= 3
    assert [s.hypothesis.ids for s in streams] == alone
    assert all(alone) and sum(map(len, alone)) > 15


@pytest.mark.parametrize("kind", ["beam4", "beam4+lm"])
def test_beams_advanced_together_equal_each_alone(model, lm, kind):
    """advance_many over beams at different points, with different frame counts (0 included),
    gives each beam what its own advance gives: labels, frames and (to fp32 precision) scores."""
    search = searches(model, lm)[kind]
    encoded = [model.encoder(random_mel(n, seed=n)[None], torch.tensor([n]), (70, 6))[0][0]
               for n in (96, 40, 200, 9)]
    beams = [search.start_fresh() for _ in encoded]
    beams[1] = search.advance(beams[1], encoded[2][:11], 0)  # one beam already under way
    chunks = [encoded[0][:13], encoded[1], encoded[2][11:24], encoded[3][:0]]
    firsts = [0, 11, 11, 0]
    together = search.advance_many(beams, chunks, firsts)
    for beam, chunk, first, got in zip(beams, chunks, firsts, together):
        alone = search.advance(beam, chunk, first)
        assert [(h.tokens, h.frames) for h in got] == [(h.tokens, h.frames) for h in alone]
        # fp32 joint rows computed in a larger batch may differ in the last bit
        np.testing.assert_allclose([h.score for h in got], [h.score for h in alone], rtol=1e-6)
    assert together[3] == beams[3] and all(len(b) == 4 for b in together[:3])


def test_streams_that_search_alike_advance_in_one_call(model, tokenizer, lm, monkeypatch):
    """Equal searches made apart (as the server makes one per requested beam size) share a batch key
    and advance together; a different beam size advances on its own."""
    make = lambda k: RnntBeamSearch(model.joint, model.decoder, BeamConfig(k, lm_weight=0.3), lm)  # noqa: E731
    kinds = [make(4), make(4), make(6), None, make(4)]
    assert kinds[0].batch_key == kinds[1].batch_key != kinds[2].batch_key
    calls = []
    original = RnntBeamSearch.advance_many
    monkeypatch.setattr(RnntBeamSearch, "advance_many",
                        lambda self, beams, *rest: calls.append(len(beams)) or original(self, beams, *rest))
    engine = conformer_engine(model, tokenizer, slots=len(kinds))
    setting = engine.streamer.setting((70, 6))
    streams = [conformer_stream(engine, setting, "rnnt", 16000, k) for k in kinds]
    try:
        audio = (np.random.default_rng(4).standard_normal(16000) * 0.1).astype(np.float32)
        for s in streams:
            s.accept_audio(audio)
        step_ready(streams)
    finally:
        for s in streams:
            s.close()
    assert sorted(calls) == [1, 3]


def test_the_language_model_steers_the_search(model, tokenizer, lm):
    """With a heavy LM weight the output follows the LM's text; without it, the acoustic model."""
    mel = random_mel(400, seed=5)
    encoded, length = model.encoder(mel[None], torch.tensor([400]), (70, 6))

    def lm_logprob(ids):
        context, total = lm.start(), 0.0
        for i in ids:
            total += lm.log_probs(context)[i]
            context = lm.extend(context, i)
        return total / max(1, len(ids))

    plain = rnnt_beam_offline(searches(model, lm)["beam4"], encoded, length)[0]
    heavy = RnntBeamSearch(model.joint, model.decoder, BeamConfig(8, lm_weight=5.0, length_bonus=10.0), lm)
    steered = rnnt_beam_offline(heavy, encoded, length)[0]
    assert steered != plain and len(steered) > 5
    assert lm_logprob(steered) > lm_logprob(plain) + 1.0
    words = tokenizer.decode(steered).split()
    known = {w for t in TEXT for w in t.split()}
    assert sum(w in known for w in words) >= 0.8 * len(words), words


def test_beam_hypotheses_are_sorted_and_distinct(model, lm):
    search = RnntBeamSearch(model.joint, model.decoder, BeamConfig(6, lm_weight=0.3), lm)
    encoded, _ = model.encoder(random_mel(200, seed=9)[None], torch.tensor([200]), (70, 1))
    hyps = search.advance(search.start_fresh(), encoded[0], 0)
    assert len(hyps) == 6
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert len({h.tokens for h in hyps}) == 6
    final = search.best_final(hyps)
    assert final is max(hyps, key=lambda h: h.score + 0.3 * lm.end_log_prob(h.lm_context))
    kept = search.commit(hyps)
    assert len(kept) == 1 and kept[0].tokens == () and kept[0].state is final.state
    assert kept[0].lm_context == lm.start()


def test_a_wider_beam_finds_a_better_scoring_hypothesis(model):
    """The search keeps what it should: width 8's best scores at least width 1's, on several inputs."""
    wins = 0
    for seed in range(5):
        encoded, _ = model.encoder(random_mel(150, seed=30 + seed)[None], torch.tensor([150]), (70, 6))
        scores = []
        for k in (1, 8):
            s = RnntBeamSearch(model.joint, model.decoder, BeamConfig(k, length_bonus=0.0))
            scores.append(s.best(s.advance(s.start_fresh(), encoded[0], 0)).score)
        assert scores[1] >= scores[0] - 1e-9
        wins += scores[1] > scores[0] + 1e-6
    assert wins >= 1


def test_stream_revisions_and_next_utterance(model, tokenizer, lm):
    """The tokens `apply` reports as new are exactly the change from the previous best hypothesis."""
    engine = conformer_engine(model, tokenizer, slots=1)
    search = searches(model, lm)["beam4+lm"]
    stream = conformer_stream(engine, engine.streamer.setting((70, 0)), "rnnt", 16000, search)
    audio = (np.random.default_rng(2).standard_normal(16000 * 2) * 0.1).astype(np.float32)
    try:
        stream.accept_audio(audio)
        stream.finish()
        previous = []
        while stream.ready():
            (_, new), = step_ready([stream])
            now = stream.hypothesis.tokens
            assert now[len(now) - len(new):] == new and now[:len(now) - len(new)] == previous[:len(now) - len(new)]
            previous = list(now)
        assert previous
        stream.start_next_utterance()
        assert stream.hypothesis.tokens == [] and len(stream._beam) == 1
    finally:
        stream.close()


def test_beam_config_and_decoder_checks(model, tokenizer):
    engine = conformer_engine(model, tokenizer, slots=1)
    search = RnntBeamSearch(model.joint, model.decoder)
    with pytest.raises(UnsupportedOption, match="rnnt decoder only"):
        conformer_stream(engine, engine.streamer.setting((70, 6)), "ctc", 16000, search)
    for bad in (dict(beam_size=0), dict(beam_size=65), dict(lm_weight=-1.0), dict(length_bonus=float("nan"))):
        with pytest.raises(ValueError):
            BeamConfig(**bad)
    other = NgramLM(2, estimate_kneser_ney([["▁x", "▁y"]] * 3 + [[p] for p in tokenizer.pieces[:20]], 2),
                    tokenizer.pieces[:20])
    with pytest.raises(ValueError, match="20 tokens"):
        RnntBeamSearch(model.joint, model.decoder, BeamConfig(), other)


def test_make_search_defaults(model_path, tmp_path, tokenizer):
    loaded = load_fastconformer(model_path)
    assert make_search(loaded) is None  # another model: greedy unless asked
    beam = make_search(loaded, beam_size=4)
    assert beam.config.beam_size == 4 and beam.lm is None and beam.config.length_bonus == 0.0
    arpa = tmp_path / "lm.arpa"
    from chorus.asr.ngram import write_arpa
    write_arpa(estimate_kneser_ney([tokenizer.encode_as_pieces(t) for t in TEXT], 3), arpa)
    with_lm = make_search(loaded, lm=str(arpa))
    assert with_lm.config.beam_size == 8 and with_lm.lm is not None and with_lm.config.length_bonus == 1.0
    with pytest.raises(ValueError, match="needs beam search"):
        make_search(loaded, beam_size=1, lm=str(arpa))
    assert make_search(loaded, beam_size=1) is None


@pytest.fixture(scope="module")
def bundled():
    """The shipped model with its default decoding (beam 8 + bundled LM), and the bundled sample."""
    if not BUNDLED_LM.exists():
        pytest.skip("the bundled LM is not in this checkout")
    from chorus.codecs import read_audio

    loaded = load_fastconformer(BUNDLED_MODEL)
    audio, rate = read_audio(BUNDLED_MODEL.parents[1] / "samples" / "held_out_voice.flac")
    return loaded, make_search(loaded), audio, rate


def test_the_bundled_model_decodes_with_its_bundled_lm(bundled):
    loaded, search, _, _ = bundled
    assert search.config.beam_size == 8 and search.lm is not None and search.lm.order == 5
    assert search.lm.vocab_size == loaded.tokenizer.vocab_size
    assert make_search(loaded, lm="none") is None
    # `--beam 1` (greedy, as the README and the server docs offer) leaves the bundled LM out instead of failing
    assert make_search(loaded, beam_size=1) is None
    with pytest.raises(ValueError, match="needs beam search"):
        make_search(loaded, beam_size=1, lm=str(BUNDLED_LM))


def test_bundled_model_beam_law1_every_lookahead(bundled):
    """Trained weights and the real LM: the sample streamed in 20 ms pieces equals one offline pass."""
    loaded, search, audio, rate = bundled
    model = loaded.model
    engine = conformer_engine(loaded, slots=1)
    mel = model.frontend.offline(audio)
    for context in model.spec.encoder.att_context_size:
        streamed = stream_samples(engine, audio, rate, engine.streamer.setting(context), "rnnt", search=search)
        encoded, length = model.encoder(mel[None], torch.tensor([mel.shape[1]]), context)
        assert streamed.hypothesis.ids == rnnt_beam_offline(search, encoded, length)[0], context
        assert len(streamed.hypothesis.ids) > 10


def test_bundled_model_beam_law2_batched_equals_alone(bundled):
    """The sample and a shorter copy starting 0.7 s later, stepped together, equal each stepped alone."""
    loaded, search, audio, rate = bundled
    engine = conformer_engine(loaded, slots=2)
    setting = engine.streamer.setting((70, 6))
    clips = [audio, audio[rate // 3: 3 * rate]]
    alone = [stream_samples(engine, c, rate, setting, "rnnt", search=search).hypothesis.ids
             for c in clips]
    streams = [conformer_stream(engine, setting, "rnnt", rate, search) for _ in clips]
    piece, delay, together = rate // 50, int(0.7 * rate), 0
    try:
        for i in range(0, len(audio) + delay, piece):
            for s, c, start in zip(streams, clips, (0, delay)):
                if start <= i < start + len(c):
                    s.accept_audio(c[i - start:i - start + piece])
                    if i - start + piece >= len(c):
                        s.finish()
            if (i // piece) % 15 == 0:  # step every 0.3 s, so both streams have chunks waiting
                together += len(step_ready(streams)) == 2
        run_to_end(streams)
    finally:
        for s in streams:
            s.close()
    assert together > 0
    assert [s.hypothesis.ids for s in streams] == alone
