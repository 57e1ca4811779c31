"""The browser page's "speak" panel end to end in headless Chromium (driven over CDP, as test_web_demo.py drives
the microphone page): the voice picker is filled from /models, the text goes to /tts, and the page receives the
audio at its AudioContext's rate and schedules every chunk back to back on Web Audio.  The tiny Piper-layout
voice has its noise scales at 0, so the samples the page received are compared with offline synthesis."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .)")
pytest.importorskip("onnx", reason="exporting the tiny test voice needs the onnx package (pip install -e .[test])")

sys.path.insert(0, str(Path(__file__).parent))
from piper_factories import config, make_voice  # noqa: E402
from test_tts_server import VoiceServer, offline  # noqa: E402
from test_web_demo import CHROMIUM, Browser  # noqa: E402

from chorus.server.app import ServerConfig  # noqa: E402
from chorus.server.registry import ModelRegistry  # noqa: E402
from chorus.tts.families import load_voice  # noqa: E402

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install chromium)"),
              pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")]
TEXT = "Hello there. How are you? Bob is here."


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    cfg = config()
    cfg["inference"] = {"noise_scale": 0.0, "length_scale": 1.0, "noise_w": 0.0}
    return load_voice(make_voice(tmp_path_factory.mktemp("voice"), cfg=cfg))


@pytest.fixture(scope="module")
def server(voice):
    voices = ModelRegistry()
    voices.add("tiny", voice, slots=2)
    srv = VoiceServer(ModelRegistry(), ServerConfig(port=0, batch_wait_ms=5), voices)
    yield srv
    srv.stop()


def test_page_speaks_text_through_web_audio(server, voice, tmp_path):
    browser = Browser(Path("/dev/null"), tmp_path / "profile")
    try:
        page = browser.open(f"{server.http}/")
        state = lambda: page.js("""(() => { const s = window.chorusSpeak; if (!s) return {state: 'loading'};
            return {state: s.state, voices: s.voices.map(v => v.name), ready: s.ready, done: s.done, error: s.error,
                    closeCode: s.closeCode, chunks: s.chunks, samples: s.samples, scheduled: s.scheduled,
                    scheduledSeconds: s.scheduledSeconds, late: s.late, marks: s.marks.map(m => m.text),
                    contextRate: s.contextRate, picked: document.querySelector('#voice').value,
                    status: document.querySelector('#speak-status').innerText,
                    spoken: [...document.querySelectorAll('#spoken .spoken')].map(e => e.textContent)}; })()""")
        import time
        deadline = time.time() + 60
        while state()["state"] != "idle" or not state()["voices"]:
            assert time.time() < deadline, state()
            time.sleep(0.2)
        assert state()["voices"] == ["tiny"] and state()["picked"] == "tiny"
        # the ASR panel's model picker lists no voices
        assert page.js("[...document.querySelectorAll('#model option')].map(o => o.value)") == []
        page.js(f"document.querySelector('#speak-text').value = {TEXT!r}; document.querySelector('#speak').click()")
        deadline = time.time() + 60
        while (s := state())["state"] not in ("done", "error"):
            assert time.time() < deadline, s
            time.sleep(0.2)
        assert s["state"] == "done" and s["closeCode"] == 1000 and s["error"] is None, s
        rate = s["contextRate"]
        assert s["ready"]["sample_rate"] == rate and s["ready"]["encoding"] == "pcm_f32le"
        want = offline(voice, TEXT, rate, "pcm_f32le")
        assert s["marks"] == s["spoken"] == ["Hello there.", "How are you?", "Bob is here."]
        assert s["chunks"] == s["scheduled"] == len(want)
        assert s["samples"] == sum(len(a) for a in want)
        assert abs(s["scheduledSeconds"] - s["samples"] / rate) < 1e-3  # back to back: no gap, no overlap
        assert s["done"]["segments"] == 3 and "done" in s["status"]
        page.close()
        server.wait_idle()
    finally:
        browser.close()
