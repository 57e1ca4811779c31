"""The TTS wire protocol, `chorus.tts.v1` on `/tts` (docs/protocol.md): the client's messages, checked.

Text frames carry JSON objects with a `type` (read by `protocol.parse_text`: finite numbers, bounded integers);
the server answers with JSON messages and binary audio frames, each preceded by its `audio` header.  Error
codes and close codes are the ASR protocol's table (`protocol.CLOSE_CODES`), with the TTS codes added there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..codecs import ENCODINGS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from .protocol import ProtocolError

PROTOCOL = "chorus.tts.v1"
MAX_WAIT_MS = 10_000  # the longest a client may let an unfinished sentence wait for more text

_START_FIELDS = {"type", "voice", "sample_rate", "encoding", "speed", "speaker", "seed", "options", "max_wait_ms"}
_TEXT_FIELDS = {"type", "text", "flush"}
_TOKENS_FIELDS = {"type", "tokens", "flush"}


@dataclass(frozen=True)
class TtsStart:
    voice: str | None
    sample_rate: int | None = None   # None: the voice's own rate
    encoding: str = "pcm_s16le"
    speed: float = 1.0
    speaker: int | str | None = None
    seed: int | None = None
    options: dict = field(default_factory=dict)
    max_wait_ms: int = 1000


def _unknown(msg: dict, allowed: set, what: str) -> None:
    unknown = sorted(set(msg) - allowed)
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        if len(unknown) > 5:
            shown += f" and {len(unknown) - 5} more"
        raise ProtocolError("bad_message", f"unknown field(s) in {what}: {shown}")


def parse_tts_start(msg: dict, default_wait_ms: int = 1000) -> TtsStart:
    _unknown(msg, _START_FIELDS, "start")

    def typed(name, kinds, default):
        value = msg.get(name, default)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise ProtocolError("bad_message", f"start.{name} has the wrong type")
        return value

    voice = typed("voice", (str,), None)
    rate = typed("sample_rate", (int,), None)
    if rate is not None and not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError("unsupported_sample_rate",
                            f"sample_rate {rate} is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    encoding = typed("encoding", (str,), "pcm_s16le")
    if encoding not in ENCODINGS:
        raise ProtocolError("unsupported_encoding",
                            f"encoding {encoding!r} is not supported; use one of {', '.join(ENCODINGS)}")
    speed = typed("speed", (int, float), 1.0)
    if speed is None or not math.isfinite(speed) or speed <= 0:
        raise ProtocolError("unsupported_option", f"speed {speed} must be a positive number")
    wait = typed("max_wait_ms", (int,), default_wait_ms)
    if wait is None or not 0 <= wait <= MAX_WAIT_MS:
        raise ProtocolError("unsupported_option", f"max_wait_ms {wait} is outside 0..{MAX_WAIT_MS}")
    return TtsStart(voice=voice, sample_rate=rate, encoding=encoding, speed=float(speed),
                    speaker=typed("speaker", (int, str), None), seed=typed("seed", (int,), None),
                    options=typed("options", (dict,), {}) or {}, max_wait_ms=wait)


def parse_tts_text(msg: dict, max_chars: int) -> tuple[str, bool]:
    """A `text` message: its text (at most `max_chars` characters) and whether it asks for a flush."""
    _unknown(msg, _TEXT_FIELDS, "text")
    text, flush = msg.get("text"), msg.get("flush", False)
    if not isinstance(text, str):
        raise ProtocolError("bad_message", "text.text must be a string")
    if not isinstance(flush, bool):
        raise ProtocolError("bad_message", "text.flush must be a boolean")
    if len(text) > max_chars:
        raise ProtocolError("text_too_long", f"text of {len(text)} characters exceeds the limit of {max_chars} "
                                             f"per message; send it in pieces")
    return text, flush


def parse_tts_tokens(msg: dict, max_tokens: int) -> tuple[list[int], bool]:
    """A `tokens` message (a token-to-wave voice: CosyVoice 2): its speech tokens (a list of at most `max_tokens`
    non-negative integers; the voice checks its vocabulary) and whether it ends the utterance (`flush`)."""
    _unknown(msg, _TOKENS_FIELDS, "tokens")
    tokens, flush = msg.get("tokens"), msg.get("flush", False)
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ProtocolError("bad_message", "tokens.tokens must be a list of integers")
    if not isinstance(flush, bool):
        raise ProtocolError("bad_message", "tokens.flush must be a boolean")
    if len(tokens) > max_tokens:
        raise ProtocolError("text_too_long", f"{len(tokens)} tokens exceed the limit of {max_tokens} per message; "
                                             f"send them in pieces")
    return tokens, flush
