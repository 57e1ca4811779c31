"""When does an utterance end?  sherpa-onnx's three rules over decoder output and energy.

Silence is measured in trailing frames with no emitted token (decoder blanks), optionally also
requiring low audio energy so that a long word the decoder has not finished is not cut:
  1. trailing silence >= `silence_no_speech_ms` and nothing was decoded (drops long noise);
  2. trailing silence >= `silence_after_speech_ms` after something was decoded;
  3. the utterance reached `max_utterance_ms`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EndpointConfig:
    enabled: bool = True
    silence_after_speech_ms: int = 800
    silence_no_speech_ms: int = 2400
    max_utterance_ms: int = 20000
    energy_threshold_db: float | None = None  # also require audio below this level (dBFS) to count as silence

    @classmethod
    def from_message(cls, value) -> "EndpointConfig":
        """From the `endpointing` field of a start message: false/true or an object of overrides."""
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(enabled=False)
        if not isinstance(value, dict):
            raise ValueError("endpointing must be true, false or an object")
        known = {"enabled", "silence_after_speech_ms", "silence_no_speech_ms", "max_utterance_ms",
                 "energy_threshold_db"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown endpointing field(s): {', '.join(sorted(unknown))}")
        cfg = cls(**{k: v for k, v in value.items()})
        for name in ("silence_after_speech_ms", "silence_no_speech_ms", "max_utterance_ms"):
            v = getattr(cfg, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 3_600_000:
                raise ValueError(f"endpointing.{name} must be an integer number of milliseconds in 1..3600000")
        if not isinstance(cfg.enabled, bool):
            raise ValueError("endpointing.enabled must be true or false")
        if cfg.energy_threshold_db is not None and not isinstance(cfg.energy_threshold_db, (int, float)):
            raise ValueError("endpointing.energy_threshold_db must be a number (dBFS) or null")
        return cfg

    def as_json(self) -> dict:
        return {"enabled": self.enabled, "silence_after_speech_ms": self.silence_after_speech_ms,
                "silence_no_speech_ms": self.silence_no_speech_ms, "max_utterance_ms": self.max_utterance_ms,
                "energy_threshold_db": self.energy_threshold_db}


class Endpointer:
    """Tracks the current utterance of one stream in encoder frames."""

    def __init__(self, config: EndpointConfig, frame_ms: float):
        self.config = config
        self.frame_ms = frame_ms
        self.utterance_start = 0   # first frame of the current utterance
        self.last_token_end = None  # frame after the last token of the current utterance
        self.loud_until = 0        # frame after the last frame whose audio was above the energy threshold

    def note_token(self, frame: int) -> None:
        self.last_token_end = frame + 1

    def note_energy(self, frames_done: int, loud: bool) -> None:
        if loud:
            self.loud_until = frames_done

    def should_end(self, frames_done: int) -> bool:
        if not self.config.enabled:
            return False
        quiet_from = self.utterance_start if self.last_token_end is None else self.last_token_end
        if self.config.energy_threshold_db is not None:
            quiet_from = max(quiet_from, self.loud_until)
        silence_ms = (frames_done - quiet_from) * self.frame_ms
        length_ms = (frames_done - self.utterance_start) * self.frame_ms
        if self.last_token_end is None:
            return silence_ms >= self.config.silence_no_speech_ms
        return silence_ms >= self.config.silence_after_speech_ms or length_ms >= self.config.max_utterance_ms

    def start_next(self, frames_done: int) -> None:
        self.utterance_start = frames_done
        self.last_token_end = None
