"""The two laws for the cache-aware FastConformer, in fp32.

1. Streaming in chunks equals the offline forward with the same attention mask.
2. Streams stepped together equal each stream stepped alone, whatever their timing.
"""
import numpy as np
import pytest
import torch

from chorus.asr.conformer.streaming import ConformerStreamer
from chorus.stream.scheduler import run_to_end, step_ready
from chorus.stream.chunking import FrameChunker, whole_utterance_chunks
from factories import (MULTI_LOOKAHEAD, conformer_engine, conformer_stream, random_mel, stream_samples, tiny_model,
                       train_tokenizer)

TOL = 1e-4


def stream_alone(engine, mel, context, decoder):
    """Encoder output and tokens of one stream fed its whole feature sequence."""
    setting = engine.setting(context)
    slot = engine.open()
    try:
        encoded, tokens = [], []
        for chunk, consumed in whole_utterance_chunks(setting.plan, mel):
            r = engine.step([slot], [chunk], [consumed], setting, [decoder])[0]
            encoded.append(r.encoded)
            tokens += r.tokens
    finally:
        engine.close(slot)
    return torch.cat(encoded), tokens


def offline(model, mel, context, decoder):
    enc, length, tokens = model.transcribe_offline(mel[None], torch.tensor([mel.shape[1]]), context, decoder)
    return enc[0, :length[0]], tokens[0]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.mark.parametrize("context", MULTI_LOOKAHEAD, ids=lambda c: f"ctx{c[0]}_{c[1]}")
@pytest.mark.parametrize("decoder", ["rnnt", "ctc"])
@pytest.mark.parametrize("frames", [3, 9, 57, 113, 650])
def test_law1_streaming_equals_offline(model, context, decoder, frames):
    engine = ConformerStreamer(model, slots=2)
    mel = random_mel(frames, seed=frames)
    on_enc, on_tok = stream_alone(engine, mel, context, decoder)
    off_enc, off_tok = offline(model, mel, context, decoder)
    assert on_enc.shape == off_enc.shape
    assert (on_enc - off_enc).abs().max().item() <= TOL
    assert on_tok == off_tok
    if frames >= 113:  # the random model must produce a non-trivial mix of blanks and tokens
        assert 0 < len(on_tok) < off_enc.shape[0] * 3


@pytest.mark.parametrize("variant", [
    dict(style="regular", contexts=((16, 1), (8, 0))),
    dict(norm="batch_norm", untie_biases=False),
    dict(subsampling="striding", n_layers=3),
    dict(rnnt=False),
    dict(ctc=False),
], ids=["regular", "batchnorm-tied", "striding", "ctc-only", "rnnt-only"])
def test_law1_model_variants(variant):
    model = tiny_model(seed=2, **variant)
    engine = ConformerStreamer(model, slots=2)
    mel = random_mel(181, seed=7)
    for context in model.spec.encoder.att_context_size:
        for decoder in model.decoders:
            on_enc, on_tok = stream_alone(engine, mel, context, decoder)
            off_enc, off_tok = offline(model, mel, context, decoder)
            assert on_enc.shape == off_enc.shape
            assert (on_enc - off_enc).abs().max().item() <= TOL, (context, decoder)
            assert on_tok == off_tok


def test_offline_mask_differs_between_lookaheads(model):
    """The lookahead settings are really different masks (otherwise law 1 would prove little)."""
    mel = random_mel(200)
    a, _ = offline(model, mel, (70, 13), "ctc")
    b, _ = offline(model, mel, (70, 0), "ctc")
    assert (a - b).abs().max().item() > 1e-2


def test_law2_batched_equals_alone(model):
    """Streams of different lengths, start times, lookaheads and decoders, stepped together."""
    engine = ConformerStreamer(model, slots=8)
    rng = np.random.default_rng(0)
    plan = [  # (frames, start tick, context, decoder)
        (210, 0, (70, 6), "rnnt"), (133, 0, (70, 6), "ctc"), (277, 3, (70, 6), "rnnt"),
        (60, 5, (70, 6), "rnnt"), (150, 1, (70, 0), "ctc"), (128, 2, (70, 0), "rnnt"),
        (34, 9, (70, 13), "ctc"), (250, 4, (70, 13), "rnnt"),
    ]
    mels = [random_mel(n, seed=100 + i) for i, (n, *_rest) in enumerate(plan)]
    expected = [stream_alone(engine, m, ctx, dec) for m, (_, _, ctx, dec) in zip(mels, plan)]

    slots = [None] * len(plan)
    chunkers = [FrameChunker(engine.setting(ctx).plan, 80) for _, _, ctx, _ in plan]
    fed = [0] * len(plan)
    got_enc = [[] for _ in plan]
    got_tok = [[] for _ in plan]
    batch_sizes = []
    tick = 0
    while any(not c.finished or c.pending for c in chunkers):
        for i, (n, start, ctx, dec) in enumerate(plan):
            if tick < start or chunkers[i].finished:
                continue
            if slots[i] is None:
                slots[i] = engine.open()
            k = int(rng.integers(1, 40))  # uneven arrival
            chunkers[i].push(mels[i][:, fed[i]:fed[i] + k])
            fed[i] = min(n, fed[i] + k)
            if fed[i] == n:
                chunkers[i].finish()
        for ctx in {p[2] for p in plan}:
            ready = [i for i, p in enumerate(plan) if p[2] == ctx and slots[i] is not None and chunkers[i].ready()]
            if not ready:
                continue
            taken = [chunkers[i].take() for i in ready]
            results = engine.step([slots[i] for i in ready], [c for c, _ in taken], [m for _, m in taken],
                                  engine.setting(ctx), [plan[i][3] for i in ready])
            batch_sizes.append(len(ready))
            for i, r in zip(ready, results):
                got_enc[i].append(r.encoded)
                got_tok[i] += r.tokens
        tick += 1
    for s in slots:
        engine.close(s)
    assert max(batch_sizes) >= 3, "the schedule never batched streams together"
    for i, (enc, tok) in enumerate(expected):
        together = torch.cat(got_enc[i])
        assert together.shape == enc.shape, i
        assert (together - enc).abs().max().item() <= TOL, i
        assert got_tok[i] == tok, i


def test_batched_offline_forward_masks_padding(model):
    """Padding one utterance in a batch does not change it (NeMo's masked subsampling)."""
    a, b = random_mel(90, 1), random_mel(300, 2)
    batch = torch.zeros(2, 80, 300)
    batch[0, :, :90] = a
    batch[1] = b
    enc, lengths = model.encoder(batch, torch.tensor([90, 300]), (70, 6))
    alone, _ = offline(model, a, (70, 6), "ctc")
    assert lengths[0] == alone.shape[0]
    assert (enc[0, :lengths[0]] - alone).abs().max().item() <= TOL


def test_audio_stream_equals_offline_features_and_model(model):
    """From raw audio at 8 kHz through resampling, online features and chunks, to tokens."""
    engine = conformer_engine(model, train_tokenizer(), slots=2)
    rng = np.random.default_rng(3)
    audio = (rng.standard_normal(8000 * 3) * 0.1).astype(np.float32)
    setting = engine.streamer.setting((70, 6))
    stream = stream_samples(engine, audio, 8000, setting, "rnnt")
    from chorus.codecs.resample import resample
    mel = model.frontend.offline(resample(audio, 8000, 16000))
    _, tokens = offline(model, mel, (70, 6), "rnnt")
    assert stream.hypothesis.ids == tokens
    assert stream.closed and engine.pool.used == 0


def test_many_audio_streams_through_step_ready(model):
    engine = conformer_engine(model, train_tokenizer(), slots=4)
    setting = engine.streamer.setting((70, 1))
    rng = np.random.default_rng(4)
    clips = [(rng.standard_normal(int(16000 * s)) * 0.1).astype(np.float32) for s in (0.9, 1.4, 0.4, 1.9)]
    alone = [stream_samples(engine, c, 16000, setting, "ctc").hypothesis.ids for c in clips]
    streams = [conformer_stream(engine, setting, "ctc", 16000) for _ in clips]
    try:
        for i in range(0, 32000, 320):
            for s, c in zip(streams, clips):
                if i < len(c):
                    s.accept_audio(c[i:i + 320])
                    if i + 320 >= len(c):
                        s.finish()
            step_ready(streams)
        run_to_end(streams)
    finally:
        for s in streams:
            s.close()
    assert [s.hypothesis.ids for s in streams] == alone
    assert all(s.done for s in streams)


def test_encoder_only_step_matches_the_full_step(model):
    engine = ConformerStreamer(model, slots=2)
    setting = engine.setting((70, 6))
    mel = random_mel(200, seed=21)
    outs = []
    for decoders in (None, ["rnnt"]):
        slot = engine.open()
        encoded = []
        for chunk, consumed in whole_utterance_chunks(setting.plan, mel):
            r = engine.step([slot], [chunk], [consumed], setting, decoders)[0]
            encoded.append(r.encoded)
            assert decoders or not r.tokens
        engine.close(slot)
        outs.append(torch.cat(encoded))
    assert torch.equal(outs[0], outs[1])


@pytest.fixture(scope="module")
def bundled():
    """The shipped default model (trained weights) and the log-mel of the bundled sample."""
    from chorus.asr.conformer.checkpoint import load_fastconformer
    from chorus.asr.conformer.family import BUNDLED_MODEL
    from chorus.codecs import read_audio

    loaded = load_fastconformer(BUNDLED_MODEL)
    audio, rate = read_audio(BUNDLED_MODEL.parents[1] / "samples" / "held_out_voice.flac")
    assert rate == loaded.model.frontend.config.sample_rate
    return loaded.model, loaded.model.frontend.offline(audio)


@pytest.mark.parametrize("decoder", ["rnnt", "ctc"])
def test_bundled_model_law1_every_lookahead(bundled, decoder):
    """The laws hold for the trained weights that ship, not only for random test models."""
    model, mel = bundled
    engine = ConformerStreamer(model, slots=2)
    for context in model.spec.encoder.att_context_size:
        on_enc, on_tok = stream_alone(engine, mel, context, decoder)
        off_enc, off_tok = offline(model, mel, context, decoder)
        assert on_enc.shape == off_enc.shape
        assert (on_enc - off_enc).abs().max().item() <= TOL, context
        assert on_tok == off_tok and len(on_tok) > 10, context


def test_bundled_model_law2_batched_equals_alone(bundled):
    """The sample and a later-starting shorter copy, stepped together, equal each alone."""
    model, mel = bundled
    engine = ConformerStreamer(model, slots=2)
    context = (70, 6)
    mels = [mel, mel[:, 37:400].contiguous()]
    expected = [stream_alone(engine, m, context, "rnnt") for m in mels]
    setting = engine.setting(context)
    queues = [whole_utterance_chunks(setting.plan, m) for m in mels]
    queues[1] = [None] * 3 + queues[1]  # the second stream starts three steps later
    slots = [engine.open(), engine.open()]
    got = [([], []), ([], [])]
    together = 0
    for tick in range(max(map(len, queues))):
        ready = [i for i in (0, 1) if tick < len(queues[i]) and queues[i][tick] is not None]
        results = engine.step([slots[i] for i in ready], [queues[i][tick][0] for i in ready],
                              [queues[i][tick][1] for i in ready], setting, ["rnnt"] * len(ready))
        together += len(ready) == 2
        for i, r in zip(ready, results):
            got[i][0].append(r.encoded)
            got[i][1].extend(r.tokens)
    for s in slots:
        engine.close(s)
    assert together >= 3
    for (enc, tok), (encs, toks) in zip(expected, got):
        assert (torch.cat(encs) - enc).abs().max().item() <= TOL
        assert toks == tok


@pytest.mark.parametrize("layers", [1, 2])
def test_predictor_step_equals_the_lstm_it_writes_out(layers):
    """The hand-written LSTM cell of `RNNTPredictor.step` is nn.LSTM: step by step over a label
    sequence it gives the training forward's outputs, and one step from any state gives torch's."""
    from chorus.asr.conformer.heads import RNNTPredictor

    torch.manual_seed(layers)
    pred = RNNTPredictor(vocab_size=20, pred_hidden=24, layers=layers).eval()
    targets = torch.randint(0, 20, (3, 7))
    with torch.no_grad():
        teacher = pred(targets)  # [B, U + 1, H], blank/SOS first
        state = pred.initial_state(3)
        out, state = pred.step(torch.full((3,), pred.blank), state)
        steps = [out]
        for u in range(targets.shape[1]):
            out, state = pred.step(targets[:, u], state)
            steps.append(out)
        torch.testing.assert_close(torch.stack(steps, dim=1), teacher, atol=1e-6, rtol=1e-5)
        h = torch.randn(layers, 3, 24)
        c = torch.randn(layers, 3, 24)
        labels = torch.tensor([4, 20, 11])
        mine, (mh, mc) = pred.step(labels, (h, c))
        ref, (rh, rc) = pred.prediction["dec_rnn"].lstm(pred.embed(labels)[None], (h, c))
        torch.testing.assert_close(mine, ref[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mh, rh, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mc, rc, atol=1e-6, rtol=1e-5)
        # decoding reads layer 0's input gates from a per-label table: a weight changed in place rebuilds it
        pred.prediction["embed"].weight[4] += 1.0
        pred.prediction["dec_rnn"].lstm.bias_ih_l0[0] -= 0.5
        mine, _ = pred.step(labels, (h, c))
        ref, _ = pred.prediction["dec_rnn"].lstm(pred.embed(labels)[None], (h, c))
        torch.testing.assert_close(mine, ref[0], atol=1e-6, rtol=1e-5)
