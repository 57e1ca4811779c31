"""FunASR's WebSocket protocol, online mode, as an adapter onto chorus' own sessions.

FunASR's clients (runtime/python/websocket/funasr_wss_client.py, its HTML5 client, and others that
follow runtime/docs/websocket_protocol.md) connect to `ws://host:port/` (often with the `binary`
subprotocol), send one JSON configuration message (`mode`, `chunk_size`, `chunk_interval`, the
look-backs, `audio_fs`, `wav_name`, `wav_format`, `is_speaking`, `hotwords`, `itn`), then PCM16
audio in binary frames, then `{"is_speaking": false}`; they read JSON results
`{"mode", "text", "wav_name", "is_final"}` in which `text` is the text that is new since the
previous message (the clients concatenate them).

This module only translates; the connection handler in app.py runs the same session machinery for
both protocols (AsrSession, the scheduler, limits, backpressure, metrics, shutdown):

  * `FunAsrAdapter.incoming(text)` turns a FunASR text frame into chorus messages: the first one
    into a `start` (mode `online` only; `audio_fs` -> `sample_rate`; `chunk_size` and the look-backs
    -> the model's `options` where it offers them), `{"is_speaking": false}` into a `finalize`;
  * `FunAsrAdapter.audio(frame)` passes PCM16 through (an odd byte waits for the next frame);
  * `FunAsrAdapter.translate(msg)` turns chorus' `partial`/`final`/`error` into FunASR's results
    (the outbox calls it as it sends, so partials it merged still give the right new text).

See docs/protocol.md, "FunASR's protocol", for what is honoured and what is ignored.
"""
from __future__ import annotations

import os
from typing import Callable

from .protocol import ProtocolError, parse_object

PATHS = ("/", "/funasr")   # a WebSocket upgrade on these paths speaks FunASR's protocol
SUBPROTOCOL = "binary"     # what FunASR's clients offer; chosen when offered
MODE = "online"
DEFAULT_WAV_NAME = "microphone"  # FunASR's Python server's default
MAX_WAV_NAME = 256               # echoed in every result: bounded
LFR_MS = 60                      # one unit of FunASR's chunk_size
# Fields of FunASR's configuration message.  Unknown fields are ignored, as FunASR's servers do.
FIELDS = {"mode", "chunk_size", "chunk_interval", "encoder_chunk_look_back", "decoder_chunk_look_back",
          "audio_fs", "wav_name", "wav_format", "is_speaking", "hotwords", "itn", "is_end", "svs_lang",
          "svs_itn"}
FUNASR_OPTIONS = ("chunk_size", "encoder_chunk_look_back", "decoder_chunk_look_back")


def is_funasr_path(path: str) -> bool:
    return path in PATHS


class FunAsrAdapter:
    """One FunASR connection's translation state (used on the event loop only)."""

    def __init__(self, describe: Callable[[str | None], dict | None], model: str | None = None):
        self.describe = describe   # model name -> its /models description (None: unknown model)
        self.model = model         # from `?model=` in the URL; None: the server's default
        self.configured = False
        self.mode = MODE
        self.wav_name = DEFAULT_WAV_NAME
        self.sent = ""             # text of the current segment already sent
        self.acks = 0              # `is_end` acknowledgements owed, one per `is_speaking: false` that asked
        self._odd = b""            # a byte of a sample split across frames

    # -- client -> server ----------------------------------------------------------------------
    def incoming(self, text: str) -> list[dict]:
        """A FunASR text frame as chorus messages (`start`, `finalize`) for the connection handler."""
        msg = parse_object(text)
        if not self.configured:
            out = [self._start(msg)]
            self.configured = True
        else:
            out = []
            self._note_wav_name(msg)  # FunASR's servers take a new wav_name at any message
        if "is_speaking" in msg and not isinstance(msg["is_speaking"], bool):
            raise ProtocolError("bad_message", "is_speaking must be true or false")
        if msg.get("is_speaking") is False:
            if msg.get("is_end") is True:
                self.acks += 1
            out.append({"type": "finalize"})
        return out  # anything else after the first message changes nothing (settings are fixed)

    def audio(self, frame: bytes) -> bytes:
        """PCM16 as FunASR's clients send it; FunASR's servers join frames, so a sample may straddle two."""
        if self._odd:
            frame = self._odd + frame
        cut = len(frame) - len(frame) % 2
        self._odd = frame[cut:]
        return frame[:cut]

    def _start(self, msg: dict) -> dict:
        if "type" in msg and not (FIELDS & set(msg)):
            raise ProtocolError("bad_message", "this path speaks FunASR's protocol (first message {\"mode\": "
                                               "\"online\", ...}); chorus' own protocol is at /asr")
        if not (FIELDS & set(msg)):
            raise ProtocolError("bad_message", "the first message must be FunASR's configuration, e.g. "
                                               "{\"mode\": \"online\", \"chunk_size\": [5, 10, 5], ...}")
        mode = msg.get("mode")
        if isinstance(mode, str):
            self.mode = mode[:20]
        self._note_wav_name(msg)
        if mode is None:
            raise ProtocolError("bad_message", "the first message has no mode (FunASR's default is 2pass); "
                                               "this server offers mode \"online\"")
        if not isinstance(mode, str):
            raise ProtocolError("bad_message", "mode must be a string")
        if mode in ("2pass", "offline"):
            raise ProtocolError("unsupported_option", f"mode {mode!r} needs an offline model, which this server "
                                                      "does not have; use mode \"online\"")
        if mode != MODE:
            raise ProtocolError("unsupported_option", f"unknown mode {mode[:40]!r}; this server offers \"online\"")
        fmt = msg.get("wav_format", "pcm")
        if not isinstance(fmt, str):
            raise ProtocolError("bad_message", "wav_format must be a string")
        if fmt.lower() != "pcm":
            raise ProtocolError("unsupported_encoding", f"wav_format {fmt[:40]!r}: online mode takes PCM "
                                                        "(16-bit little-endian mono) only")
        rate = _integer(msg, "audio_fs", 16000)
        _integer(msg, "chunk_interval", 10, low=1)  # how the client cuts its frames: nothing to do here
        chunk = _chunk_size(msg.get("chunk_size", [5, 10, 5]))
        look_backs = {k: _integer(msg, k, None) for k in FUNASR_OPTIONS[1:] if k in msg}
        start = {"type": "start", "model": self.model, "sample_rate": rate, "encoding": "pcm_s16le",
                 "interim_results": True, "endpointing": False, "beam_size": 1}
        described = self.describe(self.model)
        if described is not None:  # an unknown model is answered by the handler (unknown_model)
            offered = described.get("options") or {}
            if "chunk_size" in offered:  # a FunASR Paraformer: its settings, checked by the model
                options = {"chunk_size": chunk, **look_backs}
                start["options"] = {k: v for k, v in options.items() if k in offered}
            else:  # another family: the lookahead whose chunk is nearest FunASR's chunk length
                start["lookahead_ms"] = _nearest_lookahead(described, chunk[1] * LFR_MS)
        if start["model"] is None:
            del start["model"]
        return start

    def _note_wav_name(self, msg: dict) -> None:
        name = msg.get("wav_name")
        if name is None:
            return
        if not isinstance(name, str):
            raise ProtocolError("bad_message", "wav_name must be a string")
        if len(name) > MAX_WAV_NAME:
            raise ProtocolError("bad_message", f"wav_name longer than {MAX_WAV_NAME} characters")
        self.wav_name = name or self.wav_name

    # -- server -> client ----------------------------------------------------------------------
    def translate(self, msg: dict) -> list[dict]:
        """A chorus message as FunASR's results (possibly none)."""
        kind = msg.get("type")
        if kind == "partial":
            text = msg["text"]
            if not text.startswith(self.sent) or text == self.sent:
                return []  # nothing new (or a revision: the new text waits for the final)
            new, self.sent = text[len(self.sent):], text
            return [self._result(new, False)]
        if kind == "final":  # is_speaking false (finalize), or the server shutting down
            text = msg["text"]
            new = text[len(os.path.commonprefix([text, self.sent])):]
            self.sent = ""
            out = [self._result(new, True)]
            if self.acks and msg.get("reason") == "finalize":
                self.acks -= 1
                out.append({"mode": self.mode, "wav_name": self.wav_name, "is_final": True, "is_end": True})
            return out
        if kind == "error":
            return [{"mode": self.mode, "wav_name": self.wav_name, "text": "", "is_final": False, "is_end": True,
                     "error": msg["message"], "code": msg["code"]}]
        return []  # ready: FunASR has no such message

    def _result(self, text: str, final: bool) -> dict:
        return {"mode": self.mode, "text": text, "wav_name": self.wav_name, "is_final": final}


def _integer(msg: dict, name: str, default, low: int = 0):
    """An integer field; FunASR's servers also take digit strings."""
    value = msg.get(name, default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ProtocolError("bad_message", f"{name} must be an integer")
    if value is not None and value < low:
        raise ProtocolError("unsupported_option", f"{name} {value} is below {low}")
    return value


def _chunk_size(value) -> list[int]:
    """FunASR's [left, chunk, right] in 60 ms units; its Python server also takes "5,10,5"."""
    if isinstance(value, str):
        try:
            value = [int(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise ProtocolError("bad_message", "chunk_size must be three integers, e.g. [5, 10, 5]") from None
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)):
        raise ProtocolError("bad_message", "chunk_size must be three integers, e.g. [5, 10, 5]")
    if value[1] <= 0 or min(value) < 0:
        raise ProtocolError("unsupported_option", f"chunk_size {value} is not offered: the chunk (the middle "
                                                  "number) must be positive")
    return value


def _nearest_lookahead(described: dict, chunk_ms: int) -> int | None:
    chunks = {int(k): v for k, v in (described.get("chunk_ms") or {}).items()}
    if not chunks:
        return None
    return min(chunks, key=lambda lookahead: (abs(chunks[lookahead] - chunk_ms), chunks[lookahead]))
