"""Endpoint rules, and a long stream that stays bounded in memory."""
import numpy as np
import pytest

from chorus.asr.conformer.checkpoint import LoadedModel
from chorus.asr.conformer.family import ConformerModel
from chorus.stream.scheduler import step_ready
from chorus.server.asr_session import AsrSession
from chorus.server.protocol import StartRequest
from chorus.server.registry import ModelRegistry
from chorus.codecs import encode
from chorus.stream.endpointing import EndpointConfig, Endpointer
from factories import tiny_model, train_tokenizer

FRAME_MS = 80


def test_silence_after_speech_ends_the_utterance():
    ep = Endpointer(EndpointConfig(silence_after_speech_ms=800), FRAME_MS)
    ep.note_token(4)                      # a token at frame 4: speech until frame 5
    assert not ep.should_end(5 + 9)       # 720 ms of silence
    assert ep.should_end(5 + 10)          # 800 ms
    ep.start_next(15)
    assert ep.utterance_start == 15 and ep.last_token_end is None


def test_long_silence_without_speech_and_max_length():
    ep = Endpointer(EndpointConfig(silence_no_speech_ms=2400, max_utterance_ms=4000), FRAME_MS)
    assert not ep.should_end(29) and ep.should_end(30)      # 2.4 s of nothing
    ep.start_next(30)
    for f in range(30, 80):                                  # talking without pause
        ep.note_token(f)
    assert ep.should_end(30 + 50)                            # 4 s reached


def test_energy_threshold_delays_the_end():
    ep = Endpointer(EndpointConfig(silence_after_speech_ms=800, energy_threshold_db=-40), FRAME_MS)
    ep.note_token(4)
    ep.note_energy(12, loud=True)         # audio still loud until frame 12
    assert not ep.should_end(15) and ep.should_end(22)


def test_disabled_never_ends():
    ep = Endpointer(EndpointConfig(enabled=False), FRAME_MS)
    assert not ep.should_end(10 ** 6)


@pytest.mark.parametrize("value, error", [
    ("yes", "must be true, false or an object"),
    ({"silence_after_speech_ms": 0}, "1..3600000"),
    ({"max_utterance_ms": 1.5}, "integer"),
    ({"colour": 1}, "unknown endpointing field"),
])
def test_bad_endpoint_settings(value, error):
    with pytest.raises(ValueError, match=error):
        EndpointConfig.from_message(value)


def test_hours_long_stream_is_bounded():
    """Twenty minutes of audio through one session: buffers and hypothesis stay bounded."""
    registry = ModelRegistry()
    entry = registry.add("m", ConformerModel(LoadedModel(tiny_model(seed=7), train_tokenizer(), {}, "")), slots=1)
    messages = []
    request = StartRequest(model=None, sample_rate=8000, encoding="pcm_s16le", lookahead_ms=1040,
                           decoder="ctc", endpointing=EndpointConfig(max_utterance_ms=5000))
    session = AsrSession("s", request, entry, messages.append)
    session.open()
    rng = np.random.default_rng(0)
    sizes = []
    try:
        for minute in range(20):
            audio = encode((rng.standard_normal(8000 * 60) * 0.1).astype(np.float32), "pcm_s16le")
            for i in range(0, len(audio), 16000):
                session.push_audio(audio[i:i + 16000])
                session.pull_audio()
                while session.stream.ready():
                    for _, tokens in step_ready([session.stream]):
                        session.after_step(tokens)
            st = session.stream
            sizes.append((len(st.hypothesis.tokens), st.features._buffer.numel(), st.chunker.pending))
    finally:
        session.close()
    finals = [m for m in messages if m["type"] == "final"]
    assert len(finals) >= 20 * 60 // 6  # an utterance every <= 5 s (plus a chunk)
    assert finals[-1]["end"] > 19 * 60
    tokens, samples, pending = zip(*sizes)
    assert max(tokens) <= 5 * 13 * 10       # one utterance's tokens at most
    assert max(samples) <= 2 * 512 and max(pending) <= 112
    assert entry.engine.pool.used == 0
