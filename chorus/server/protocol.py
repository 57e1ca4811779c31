"""The ASR wire protocol (docs/protocol.md): client messages, server messages, error codes.

Text frames carry JSON objects with a `type`; binary frames carry audio.  Every error a client
can cause has a stable `code` and a WebSocket close code, listed once here.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..codecs import ENCODINGS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from ..stream.endpointing import EndpointConfig

PROTOCOL = "chorus.asr.v1"
MAX_BEAM_SIZE = 16  # beam search runs on the host, its cost grows with the beam: bound it
MAX_ERROR_CHARS = 300  # an error echoes at most this much of what the client sent
MAX_INT_DIGITS = 18    # longer integer literals are refused before Python converts them (its limit raises)

# code -> WebSocket close code
CLOSE_CODES = {
    "bad_json": 1007,             # a text frame that is not a JSON object
    "bad_message": 1008,          # a JSON object that breaks the protocol (missing/invalid field)
    "unknown_type": 1008,         # a `type` the server does not know
    "not_started": 1008,          # audio or a control message before `start`
    "already_started": 1008,      # a second `start`
    "unknown_model": 1008,        # `model` is not in the server's registry
    "unsupported_encoding": 1003,
    "unsupported_sample_rate": 1003,
    "unsupported_option": 1003,   # a lookahead or decoder the model does not offer
    "bad_audio": 1007,            # a frame that is not a whole number of samples, NaN/inf floats
    "frame_too_large": 1009,
    "overloaded": 1013,           # no free stream slot: try again later
    "idle_timeout": 1008,
    "session_limit": 1008,
    "too_slow": 1008,             # the client does not read results
    "internal": 1011,
    # chorus.tts.v1 (/tts, tts_protocol.py)
    "unknown_voice": 1008,        # `voice` is not in the server's voice registry
    "text_too_long": 1009,        # one `text` message longer than the server's limit
    "too_much_text": 1008,        # text queued and not yet spoken above the server's limit
    "unsupported_text": 1003,     # characters the voice cannot speak
    "unsupported_input": 1003,    # text for a token-to-wave voice, speech tokens for a text voice
    "bad_tokens": 1007,           # speech tokens out of the voice's vocabulary, or more than it holds
}


class ProtocolError(Exception):
    """Ends the stream with an `error` message and the close code of `code`."""

    def __init__(self, code: str, message: str):
        if len(message) > MAX_ERROR_CHARS:  # never echo a client's 80 KB back at it
            message = message[:MAX_ERROR_CHARS - 1] + "\u2026"
        super().__init__(message)
        if code not in CLOSE_CODES:
            raise ValueError(f"unknown error code {code}")
        self.code = code
        self.message = message

    @property
    def close_code(self) -> int:
        return CLOSE_CODES[self.code]

    def as_message(self) -> dict:
        return {"type": "error", "code": self.code, "message": self.message}


@dataclass(frozen=True)
class StartRequest:
    model: str | None
    sample_rate: int = 16000
    encoding: str = "pcm_s16le"
    lookahead_ms: int | None = None
    decoder: str | None = None
    beam_size: int | None = None
    interim_results: bool = True
    word_times: bool = False
    endpointing: EndpointConfig = field(default_factory=EndpointConfig)
    options: dict = field(default_factory=dict)  # family-specific settings (see /models), checked by the model


_START_FIELDS = {"type", "model", "sample_rate", "encoding", "lookahead_ms", "decoder", "beam_size",
                 "interim_results", "word_times", "endpointing", "options"}


def _non_finite(literal: str):
    raise ProtocolError("bad_message", f"non-finite number {literal} in message; numbers must be finite")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e999 parses to inf without passing through parse_constant
        _non_finite(literal[:20])
    return value


def _bounded_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise ProtocolError("bad_message", f"integer of {len(literal)} digits in message; too large")
    return int(literal)


def parse_object(text: str) -> dict:
    """One client text frame as a JSON object.  Python's json accepts NaN, Infinity and integers of
    any length; the protocol does not (non-finite values cannot be answered in JSON, and huge
    integers cost CPU to convert), so they end the stream with `bad_message`.  (FunASR's protocol,
    funasr_protocol.py, reads its text frames with this too.)"""
    try:
        msg = json.loads(text, parse_constant=_non_finite, parse_float=_finite_float, parse_int=_bounded_int)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError("bad_json", f"text frame is not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_json", "text frame must be a JSON object")
    return msg


def parse_text(text: str) -> dict:
    """One client text frame of chorus' protocol: a JSON object with a string `type`."""
    msg = parse_object(text)
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "message has no string 'type' field")
    return msg


def parse_start(msg: dict) -> StartRequest:
    unknown = sorted(set(msg) - _START_FIELDS)
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        if len(unknown) > 5:
            shown += f" and {len(unknown) - 5} more"
        raise ProtocolError("bad_message", f"unknown field(s) in start: {shown}")

    def typed(name, kinds, default):
        value = msg.get(name, default)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
            raise ProtocolError("bad_message", f"start.{name} has the wrong type")
        return value

    model = typed("model", (str,), None)
    rate = typed("sample_rate", (int,), 16000)
    if rate is None or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError("unsupported_sample_rate",
                            f"sample_rate {rate} is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    encoding = typed("encoding", (str,), "pcm_s16le")
    if encoding not in ENCODINGS:
        raise ProtocolError("unsupported_encoding",
                            f"encoding {encoding!r} is not supported; use one of {', '.join(ENCODINGS)}")
    decoder = typed("decoder", (str,), None)
    beam_size = typed("beam_size", (int,), None)
    if beam_size is not None and not 1 <= beam_size <= MAX_BEAM_SIZE:
        raise ProtocolError("unsupported_option", f"beam_size {beam_size} is outside 1..{MAX_BEAM_SIZE}")
    try:
        endpointing = EndpointConfig.from_message(msg.get("endpointing"))
    except (ValueError, TypeError) as exc:
        raise ProtocolError("bad_message", f"start.endpointing: {exc}") from None
    options = typed("options", (dict,), {}) or {}
    return StartRequest(
        model=model, sample_rate=rate, encoding=encoding, lookahead_ms=typed("lookahead_ms", (int,), None),
        decoder=decoder, beam_size=beam_size, interim_results=typed("interim_results", (bool,), True),
        word_times=typed("word_times", (bool,), False), endpointing=endpointing, options=options)


def dumps(msg: dict) -> str:
    return json.dumps(msg, separators=(",", ":"), allow_nan=False)


def seconds(x: float) -> float:
    return round(float(x), 3) if math.isfinite(x) else 0.0
