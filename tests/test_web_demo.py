"""The browser demo (demos/web) end to end in headless Chromium.

Chromium's fake microphone plays a WAV file; the page captures it with getUserMedia and an AudioWorklet,
sends 16-bit PCM over the WebSocket to an in-process server, and shows the results.  The test drives the
browser over the Chrome DevTools Protocol with the `websockets` client (no Selenium or Playwright).

The test records the audio the server received and checks the whole path: the clip the microphone played
arrived whole (microphone -> worklet -> WebSocket), and the page shows exactly the text the same model makes of
that audio offline (server -> page).  The clip is the bundled sample with the bundled default model
(chorus/models/default_asr.nemo, chorus/samples/held_out_voice.*; the test warns when the model mis-hears it,
which is issue #4's to measure), else noise with a tiny random model.  Skipped when there is no Chromium
(Debian: apt-get install chromium).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import soundfile as sf
from websockets.sync.client import connect

import chorus
from chorus.asr.conformer.checkpoint import load_fastconformer, save_fastconformer
from chorus.asr.conformer.family import ConformerModel, make_search
from chorus.asr.conformer.family import BUNDLED_MODEL
from chorus.asr.textnorm import normalize_text
from chorus.asr.transcribe import transcribe_files
from chorus.stream.contract import StreamRequest
from chorus.codecs import read_audio, resample
from chorus.server.app import ServerConfig
from chorus.server.asr_session import AsrSession
from chorus.server.registry import ModelRegistry
from factories import tiny_model, train_tokenizer
from test_server import ServerThread

TOKEN = "web-demo-token"
SAMPLES = Path(chorus.__file__).resolve().parent / "samples"
SAMPLE_AUDIO = SAMPLES / "held_out_voice.flac"
SAMPLE_TEXT = SAMPLES / "held_out_voice.txt"


def find_chromium() -> str | None:
    """$CHORUS_CHROMIUM when set (an empty value skips these tests), else a Chromium on this machine."""
    if "CHORUS_CHROMIUM" in os.environ:
        candidates = [os.environ["CHORUS_CHROMIUM"]]
    else:
        candidates = ["/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
                      shutil.which("google-chrome")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary to run the browser demo in "
                                "(Debian: apt-get install chromium; or set $CHORUS_CHROMIUM to its path)")


def use_default_model() -> bool:
    return BUNDLED_MODEL.is_file() and SAMPLE_AUDIO.is_file() and SAMPLE_TEXT.is_file()


# ------------------------------------------------------------------------------------ the browser
class Browser:
    """Headless Chromium with a fake microphone playing `wav` (in a loop), driven over CDP."""

    def __init__(self, wav: Path, profile: Path):
        self.log = open(profile.parent / "chromium.log", "wb")
        args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]
        nice = shutil.which("nice")  # the machine is shared: keep the browser below the server and tests
        self.proc = subprocess.Popen(([nice, "-n", "10"] if nice else []) + args, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._stack = contextlib.ExitStack()
        self.next_id = 0
        try:
            port, path = self._devtools_address(profile / "DevToolsActivePort")
            self.ws = self._stack.enter_context(connect(f"ws://127.0.0.1:{port}{path}", max_size=None,
                                                        open_timeout=30))
        except BaseException:
            self._kill()
            raise

    def _devtools_address(self, port_file: Path) -> tuple[str, str]:
        """Chromium writes its DevTools port and browser path there (with --remote-debugging-port=0)."""
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {self.log_tail()}")
            lines = port_file.read_text().split("\n") if port_file.exists() else []
            if len(lines) >= 2 and lines[0].strip().isdigit() and lines[1].strip():
                return lines[0].strip(), lines[1].strip()
            if time.time() > deadline:
                raise RuntimeError(f"chromium did not open its DevTools port: {self.log_tail()}")
            time.sleep(0.1)

    def _kill(self) -> None:
        """Chromium and any helper process it left: our own process group (start_new_session)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()

    def log_tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_bytes()[-3000:].decode(errors="replace")

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.time() + timeout
        while True:  # events (and replies to nobody) are skipped
            reply = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.time())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> "Page":
        target = self.call("Target.createTarget", url=url)["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        return Page(self, target, session)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        try:
            self._stack.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        self._kill()


class Page:
    def __init__(self, browser: Browser, target: str, session: str):
        self.browser, self.target, self.session = browser, target, session

    def js(self, expression: str):
        result = self.browser.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True,
                                   awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def state(self) -> dict:
        return self.js("""(() => { const d = window.chorusDemo; if (!d) return {state: 'loading'};
            return {state: d.state, ready: d.ready, error: d.error, closeCode: d.closeCode, framesSent: d.framesSent,
                    bytesSent: d.bytesSent, sampleRate: d.sampleRate, nFinals: d.finals.length, partials: d.partials,
                    finals: document.querySelector('#finals').innerText,
                    finalTexts: [...document.querySelectorAll('#finals .text')].map(e => e.textContent),
                    partial: document.querySelector('#partial').innerText,
                    status: document.querySelector('#status').innerText}; })()""")

    def wait_for(self, what: str, predicate, timeout: float = 60.0) -> dict:
        deadline = time.time() + timeout
        while True:
            state = self.state()
            if predicate(state):
                return state
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; page state: {state}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> None:
        import base64
        data = self.browser.call("Page.captureScreenshot", self.session, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.browser.call("Target.closeTarget", targetId=self.target)


# -------------------------------------------------------------------------------------- fixtures
class MicSetup(NamedTuple):
    model: Path
    wav: Path                # what the fake microphone plays, in a loop
    clip: np.ndarray         # the sound in it (the sample, or noise), at `rate`
    rate: int
    reference: str | None    # the clip's transcript (the bundled sample) or None (noise)
    send_seconds: float      # audio the page must have sent before Stop: the clip and an endpoint after it


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> MicSetup:
    tmp = tmp_path_factory.mktemp("web")
    wav = tmp / "mic.wav"
    if use_default_model():
        clip, rate = read_audio(SAMPLE_AUDIO)
        if rate not in (16000, 48000):
            clip, rate = resample(clip, rate, 16000), 16000
        model, reference = BUNDLED_MODEL, SAMPLE_TEXT.read_text()
    else:
        model, reference, rate = tmp / "tiny.nemo", None, 16000
        save_fastconformer(model, tiny_model(seed=11), train_tokenizer())
        rng = np.random.default_rng(7)  # noise: the tiny random model "hears" words in it
        clip = (rng.standard_normal(rate * 3 // 2) * 0.15).clip(-1, 1).astype(np.float32)
    # Quiet before the clip, and a long quiet after it: the page stops well before the loop comes round again,
    # so what the server received holds the clip once.
    lead, tail = 0.5, 6.0
    sf.write(wav, np.concatenate([np.zeros(int(lead * rate), np.float32), clip,
                                  np.zeros(int(tail * rate), np.float32)]), rate, subtype="PCM_16")
    return MicSetup(model, wav, clip, rate, reference, lead + len(clip) / rate + 1.5)


@pytest.fixture(scope="module")
def server(setup):
    registry = ModelRegistry()
    loaded = load_fastconformer(setup.model)
    registry.add("default", ConformerModel(loaded, make_search(loaded)), slots=4)  # the decoding `chorus serve` uses
    srv = ServerThread(registry, ServerConfig(port=0, auth_tokens=(TOKEN,), batch_wait_ms=5))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(setup, tmp_path_factory):
    b = Browser(setup.wav, tmp_path_factory.mktemp("chromium") / "profile")
    yield b
    b.close()


# ------------------------------------------------------------------------------------------ tests
def test_page_transcribes_the_microphone(server, browser, setup, tmp_path, monkeypatch):
    metrics = server.server.metrics
    audio_before = metrics.value("chorus_audio_seconds_total", model="default")
    streams_before = metrics.value("chorus_streams_total", model="default")
    frames: list[bytes] = []  # the audio as the server received it
    receive = AsrSession.push_audio

    def record_and_receive(session: AsrSession, frame: bytes) -> None:
        frames.append(bytes(frame))
        receive(session, frame)

    monkeypatch.setattr(AsrSession, "push_audio", record_and_receive)

    page = browser.open(f"{server.http}/?autostart=1&token={TOKEN}")
    try:
        state = page.wait_for("the stream to start", lambda s: s["state"] == "listening", timeout=60)
        ready = state["ready"]
        assert ready["protocol"] == "chorus.asr.v1" and ready["encoding"] == "pcm_s16le"
        assert ready["sample_rate"] == state["sampleRate"] >= 8000  # the AudioContext's own rate
        # recognised text on the page, and at least the clip (and the quiet to end it) sent
        page.wait_for("recognised text", lambda s: (s["finals"].strip() or s["partial"].strip())
                      and s["bytesSent"] / 2 / s["sampleRate"] >= setup.send_seconds,
                      timeout=60 + 3 * setup.send_seconds)
        page.screenshot(Path(os.environ.get("CHORUS_SCREENSHOTS", tmp_path)) / "web_demo_listening.png")
        page.js("document.querySelector('#stop').click()")
        state = page.wait_for("the stream to stop", lambda s: s["state"] in ("stopped", "error"),
                              timeout=60 + setup.send_seconds)
        assert state["state"] == "stopped" and state["closeCode"] == 1000, state
        assert state["error"] is None and "stopped" in state["status"]
        assert state["partial"] == ""  # the stop final replaced the partial
        assert page.js("document.querySelector('#partial').className") == "provisional"
        server.wait_idle()  # Stop returned the slot
    finally:
        page.close()

    text = " ".join(state["finalTexts"])
    assert text.strip(), state
    assert state["partials"] > 0  # interim results were shown on the way
    assert state["finals"].count("\n") + 1 == len(state["finalTexts"])  # one line per utterance, with times
    assert all("–" in line for line in state["finals"].splitlines())
    assert metrics.value("chorus_audio_seconds_total", model="default") - audio_before >= setup.send_seconds * 0.9
    assert metrics.value("chorus_streams_total", model="default") == streams_before + 1

    # The microphone -> worklet -> WebSocket path delivered the clip whole (no gaps, no rate slip),
    received = np.frombuffer(b"".join(frames), "<i2").astype(np.float32) / 32768
    assert len(received) == state["bytesSent"] // 2
    # (window by window: a loaded 2-core machine can make Chromium's fake microphone drop a buffer, which shifts
    # everything after it and lowers a whole-clip correlation; a rate slip or a lost stretch fails many windows)
    matched = windows_matching(resample(received, state["sampleRate"], setup.rate), setup.clip, setup.rate)
    assert matched >= 0.9, f"the clip arrived altered: {matched:.0%} of its 0.5 s windows found within 100 ms"
    # and the page shows exactly what the model makes of that audio offline (the server's streaming law).
    sent = tmp_path / "received.wav"
    sf.write(sent, received, state["sampleRate"], subtype="PCM_16")
    entry = server.server.registry.get("default")
    offline = next(iter(transcribe_files(entry.model.make_engine(slots=1), [str(sent)],
                                         StreamRequest(lookahead_ms=ready["lookahead_ms"], decoder=ready["decoder"],
                                                       beam_size=ready["beam_size"]))))
    assert normalize_text(text).split() == normalize_text(offline.text).split(), (text, offline.text)
    if setup.reference is not None and word_recall(setup.reference, text) < 0.9:
        # How well the bundled model hears the sample is issue #4's measure (chorus eval), not the page's.
        warnings.warn(f"the bundled model heard the sample as the page sent it ({state['sampleRate']} Hz, after "
                      f"{len(received) / state['sampleRate']:.1f} s of audio) as {text!r}")


def word_recall(reference: str, text: str) -> float:
    ref = normalize_text(reference).split()
    heard = set(normalize_text(text).split())
    return sum(w in heard for w in ref) / len(ref)


def windows_matching(received: np.ndarray, clip: np.ndarray, rate: int, window_s: float = 0.5,
                     slack_s: float = 0.1, threshold: float = 0.95) -> float:
    """The fraction of the clip's `window_s` windows (those with sound) found in `received` with a normalised
    correlation >= `threshold`, within `slack_s` of where the whole clip lines up best."""
    assert len(received) >= len(clip), f"only {len(received)} samples received, the clip has {len(clip)}"
    received, clip = received.astype(np.float64), clip.astype(np.float64)
    size = 1 << (len(received) + len(clip)).bit_length()
    corr = np.fft.irfft(np.fft.rfft(received, size) * np.conj(np.fft.rfft(clip, size)), size)
    lag = int(np.argmax(corr[:len(received) - len(clip) + 1]))
    win, slack = int(window_s * rate), int(slack_s * rate)
    scores = []
    for start in range(0, len(clip) - win + 1, win):
        piece = clip[start:start + win]
        if np.sqrt(np.mean(piece ** 2)) < 1e-3:
            continue  # silence says nothing about alignment
        lo = max(0, lag + start - slack)
        region = received[lo:lag + start + win + slack]
        best = max((float(region[k:k + win] @ piece) / (np.linalg.norm(region[k:k + win]) * np.linalg.norm(piece)
                                                          + 1e-12) for k in range(0, len(region) - win + 1, 4)),
                   default=0.0)
        scores.append(best)
    assert scores, "the clip has no sound"
    return sum(s >= threshold for s in scores) / len(scores)


def test_closing_the_page_returns_the_slot(server, browser):
    page = browser.open(f"{server.http}/?autostart=1&token={TOKEN}&lookahead_ms=80&decoder=ctc")
    state = page.wait_for("audio to flow", lambda s: s["state"] == "listening" and s["framesSent"] > 10)
    assert state["ready"]["lookahead_ms"] == 80 and state["ready"]["decoder"] == "ctc"
    assert server.server.registry.get("default").engine.pool.used == 1
    page.close()  # no stop: the browser drops the connection
    server.wait_idle()


def test_page_shows_server_errors(server, browser):
    page = browser.open(f"{server.http}/?autostart=1&token={TOKEN}&lookahead_ms=300")
    try:
        state = page.wait_for("the error", lambda s: s["state"] == "error" and s["closeCode"] is not None,
                              timeout=60)
        assert state["error"]["code"] == "unsupported_option"
        assert "unsupported_option" in state["status"] and "1003" in state["status"]
    finally:
        page.close()

    page = browser.open(f"{server.http}/?autostart=1&token=wrong")
    try:
        state = page.wait_for("the refusal", lambda s: s["state"] == "error", timeout=60)
        assert "401" in state["status"] and "token" in state["status"], state
    finally:
        page.close()
    server.wait_idle()
