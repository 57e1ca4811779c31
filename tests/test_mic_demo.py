"""demos/mic.py --file against a live server: what it prints is what the streaming path transcribes."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from chorus.asr.conformer.checkpoint import load_fastconformer
from chorus.asr.conformer.family import ConformerModel, make_search
from chorus.asr.transcribe import transcribe_files
from chorus.stream.contract import StreamRequest
from chorus.server.app import ServerConfig
from chorus.server.registry import ModelRegistry
from test_server import ServerThread

MIC = Path(__file__).resolve().parents[1] / "demos" / "mic.py"
TOKEN = "mic-demo-token"
FINAL_LINE = re.compile(r"^\[\s*(\d+\.\d\d) -\s*(\d+\.\d\d)\] (.+)$")


@pytest.fixture(scope="module")
def server(model_path):
    registry = ModelRegistry()
    registry.add("default", ConformerModel(load_fastconformer(model_path)), slots=4)
    srv = ServerThread(registry, ServerConfig(port=0, auth_tokens=(TOKEN,), batch_wait_ms=5))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """2.5 s of noise at 22.05 kHz (the server resamples): the tiny random model hears words in it."""
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    rng = np.random.default_rng(3)
    rate = 22050
    sf.write(path, (rng.standard_normal(int(2.5 * rate)) * 0.15).clip(-1, 1), rate, subtype="PCM_16")
    return path


def run_mic(server, *args, timeout=60):
    return subprocess.run([sys.executable, str(MIC), "--url", server.url, *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("decoder, lookahead, beam", [("ctc", 80, None), ("rnnt", 480, None), ("rnnt", 480, 4)])
def test_mic_file_prints_what_the_server_transcribes(server, model_path, clip, decoder, lookahead, beam):
    loaded = load_fastconformer(model_path)
    engine = ConformerModel(loaded, make_search(loaded, beam_size=beam)).make_engine(slots=1)
    [expected] = transcribe_files(engine, [str(clip)], StreamRequest(lookahead_ms=lookahead, decoder=decoder))
    assert expected.text.strip(), "the tiny model should hear something in the noise"

    proc = run_mic(server, "--token", TOKEN, "--file", str(clip), "--speed", "4", "--decoder", decoder,
                   "--lookahead-ms", str(lookahead), "--no-endpointing", *(["--beam-size", str(beam)] if beam else []))
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout  # not a terminal: no in-place partials, only final lines
    finals = [FINAL_LINE.match(line) for line in proc.stdout.splitlines()]
    assert finals and all(finals), proc.stdout
    assert " ".join(m.group(3) for m in finals) == expected.text.strip()
    assert float(finals[-1].group(2)) == pytest.approx(2.5, abs=0.09)  # times: the whole clip
    assert f"lookahead {lookahead} ms" in proc.stderr and decoder in proc.stderr
    assert f"beam {beam or 1}" in proc.stderr
    server.wait_idle()


def test_mic_reports_server_errors(server, clip):
    proc = run_mic(server, "--token", TOKEN, "--file", str(clip), "--speed", "4", "--lookahead-ms", "300")
    assert proc.returncode == 1
    assert "unsupported_option" in proc.stderr and "1003" in proc.stderr

    proc = run_mic(server, "--token", "wrong", "--file", str(clip))
    assert proc.returncode == 1 and "HTTP 401" in proc.stderr

    proc = run_mic(server, "--token", TOKEN, "--file", str(clip.with_name("missing.wav")))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    server.wait_idle(timeout=20)


@pytest.mark.parametrize("fake, message", [
    ("raise ImportError('No module named sounddevice')", "pip install 'chorus[mic]'"),
    ("raise OSError('PortAudio library not found')", "apt-get install libportaudio2"),
])
def test_mic_without_sounddevice_says_what_is_missing(server, tmp_path, fake, message):
    """Microphone mode imports sounddevice lazily and explains a missing package or PortAudio library."""
    (tmp_path / "sounddevice.py").write_text(fake + "\n")  # shadows any installed one
    proc = subprocess.run([sys.executable, str(MIC), "--url", server.url], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


FAKE_SOUNDDEVICE = """
import os, threading, time
import soundfile as sf

_WAV = os.environ["FAKE_MIC_WAV"]


def query_devices(device=None, kind=None):
    info = {"name": "fake microphone", "max_input_channels": 1,
            "default_samplerate": float(sf.info(_WAV).samplerate)}
    return info if kind else [info]


class _Status:
    input_overflow = False


class RawInputStream:
    \"\"\"Plays the WAV (looped) into the callback in real time, like a microphone.\"\"\"

    def __init__(self, samplerate, channels, dtype, device=None, blocksize=0, callback=None):
        assert channels == 1 and dtype == "int16" and blocksize > 0
        self.data = sf.read(_WAV, dtype="int16")[0].tobytes()
        self.block, self.rate, self.callback = blocksize, samplerate, callback
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        step, pos, n, t0 = 2 * self.block, 0, 0, time.monotonic()
        while not self.stopped.is_set():
            chunk = (self.data[pos:] + self.data)[:step]
            pos = (pos + step) % len(self.data)
            self.callback(chunk, self.block, None, _Status())
            n += 1
            time.sleep(max(0.0, t0 + n * self.block / self.rate - time.monotonic()))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()
"""


def test_mic_streams_the_microphone_until_ctrl_c(server, clip, tmp_path):
    """Microphone mode (with a stand-in for sounddevice that plays a file in real time): Ctrl+C sends
    `stop`, the last final is printed and the client exits 0."""
    (tmp_path / "sounddevice.py").write_text(FAKE_SOUNDDEVICE)
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(MIC), "--url", server.url, "--token", TOKEN,
                                 "--lookahead-ms", "80"], stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONPATH": str(tmp_path), "FAKE_MIC_WAV": str(clip)})
        try:
            deadline = time.time() + 30
            while "listening" not in err_path.read_text():
                assert proc.poll() is None and time.time() < deadline, err_path.read_text()
                time.sleep(0.05)
            time.sleep(1.5)  # speak...
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err_path.read_text()
    assert proc.returncode == 0, stderr
    assert "sending 22050 Hz" in stderr and "stopping" in stderr
    lines = out.splitlines()
    assert lines and all(FINAL_LINE.match(line) for line in lines), out
    assert 1.2 < float(FINAL_LINE.match(lines[-1]).group(2)) < 4.0  # about the 1.5 s it listened
    server.wait_idle()


def load_mic_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("chorus_mic_demo", MIC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_empty_final_is_printed_visibly():
    """A `finalize`/`stop` final may have empty text: it is printed as "(no speech)", so the output does not
    look cut short, and keeps the "[start - end] text" form."""
    import io

    mic = load_mic_module()
    out, err = io.StringIO(), io.StringIO()
    display = mic.Display(out, err)
    display.final({"type": "final", "utterance": 0, "text": "seven", "start": 0.0, "end": 1.6, "reason": "endpoint"})
    display.final({"type": "final", "utterance": 1, "text": "", "start": 1.6, "end": 1.9, "reason": "stop"})
    lines = out.getvalue().splitlines()
    assert [FINAL_LINE.match(line).groups() for line in lines] == [("0.00", "1.60", "seven"),
                                                                   ("1.60", "1.90", "(no speech)")]
    assert err.getvalue() == ""
