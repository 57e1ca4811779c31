"""CosyVoice 2 token-to-wave as a TTS family: speech tokens (from the user's own CosyVoice LLM) in, audio out.

A voice is a CosyVoice 2 model directory (`cosyvoice2.yaml`, `flow.pt`, `hift.pt`; the LLM's files may be there too
and are not read). A stream takes speech tokens (`push_tokens`, as an LLM emits them) instead of text; its
`SpeechRequest.options` carry the speaker embedding (`embedding`: CosyVoice's flow_embedding, spk_embed_dim floats,
required), an optional prompt (`prompt_tokens` and `prompt_mel`, [2 x len(prompt_tokens)] rows of 80 floats:
CosyVoice's flow_prompt_speech_token and prompt_speech_feat), the final-chunk mode (`final`: `exact`, the default,
or `flat`) and the left context (`left_chunks`: -1, the default, attends to every earlier chunk as CosyVoice 2 does;
L >= 0 to only the L chunks of 25 tokens before each chunk, which makes a chunk's cost and a stream's state bounded,
and with `final: flat` its utterances limited only by CosyVoice's 300 s of noise, not by the engine's `max_seconds`;
the model was not trained that way, so its mel is not CosyVoice's). `flush` ends an utterance (tokens after it start
the next one, with the same speaker and prompt); `finish` ends the stream.

Each utterance goes out on CosyVoice's hop schedule (`HopSchedule`, per stream), its mel computed by the cached
`FlowStreamer` (all streams of the engine in one batch, the CFG pair included; an exact final is CosyVoice's
full-attention pass, one stream at a time) and vocoded by HiFT with CosyVoice's mel and source caches and
cross-fade (`HiftStreamer.push_many`).  A chunk's `Mark` has segment = the utterance's number, text "" and the
chunk's token span [start, end) in place of characters.
"""
from __future__ import annotations

import logging
import math
import secrets
from pathlib import Path

import numpy as np
import torch

from ...codecs.resample import StreamingResampler
from ...stream.tts_contract import (AudioChunk, BadTokens, Mark, SpeechRequest, TtsEngine, TtsStream,
                                    UnsupportedInput, UnsupportedOption, Voice, VoiceFamily)
from .checkpoint import NotACosyVoiceModel, flow_config, is_cosyvoice2_dir, load_flow, read_model_yaml
from .hift import HiftConfig, HiftStreamer, load_hift
from .reference import non_streaming
from .streaming import FINAL_EXACT, FINAL_FLAT, FINAL_MODES, FlowChunk, FlowStreamer, HopSchedule, exact_final

log = logging.getLogger("chorus.tts.cosyvoice")

DEFAULT_FINAL = FINAL_EXACT
DEFAULT_MAX_SECONDS = 30.0   # per utterance, prompt included: sizes the paged K/V of each slot
DEFAULT_MEMORY_BUDGET = 16 << 30  # state of all slots; CosyVoice 2's full size holds 6.9 GB a slot at 30 s
MEL_FRAME_RATE = 50          # CosyVoice 2's mel: 24 kHz, hop 480
OPTIONS = ("embedding", "prompt_tokens", "prompt_mel", "final", "left_chunks")
FULL_LEFT = -1               # left_chunks: every earlier chunk (CosyVoice 2's num_decoding_left_chunks: -1)


class CosyVoice2Voice(Voice):
    family = "cosyvoice2"

    def __init__(self, path: Path, flow, hift):
        self.path = str(path)
        self.name = Path(path).name
        self.flow = flow
        self.hift = hift
        self.sample_rate = hift.sampling_rate
        self.cfg = flow.cfg

    def describe(self) -> dict:
        return {"family": self.family, "voice": self.name, "sample_rate": self.sample_rate, "input": "speech_tokens",
                "vocab_size": self.cfg.vocab_size, "speakers": 0, "speed": {"min": 1.0, "max": 1.0, "default": 1.0},
                "seed": True, "batching": True,
                "options": {"embedding": {"floats": self.cfg.spk_embed_dim, "required": True},
                            "prompt_tokens": {"max": self.cfg.vocab_size - 1, "default": []},
                            "prompt_mel": {"rows": "2 x len(prompt_tokens)", "columns": self.cfg.output_size},
                            "final": {"values": list(FINAL_MODES), "default": DEFAULT_FINAL},
                            "left_chunks": {"default": FULL_LEFT, "min": FULL_LEFT,
                                            "chunk_tokens": self.cfg.encoder.static_chunk_size,
                                            "note": "-1: every earlier chunk (CosyVoice 2's); L: only L chunks before "
                                                    "each (bounded cost and state, not CosyVoice's output)"}}}

    def make_engine(self, *, slots: int | None = None, memory_budget: int | None = None,
                    name: str | None = None, max_seconds: float = DEFAULT_MAX_SECONDS) -> "CosyVoiceEngine":
        return CosyVoiceEngine(self, slots or 4, name or self.name, max_seconds, memory_budget)

    def check(self, request: SpeechRequest) -> dict:
        """The stream's settings from a request; `UnsupportedOption` naming what is wrong."""
        if request.speed != 1.0:
            raise UnsupportedOption("speed: CosyVoice 2 streams at speed 1.0 only (it changes speed only offline)")
        if request.speaker is not None:
            raise UnsupportedOption("speaker: a CosyVoice 2 voice takes a speaker embedding (options.embedding)")
        seed = request.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
            raise UnsupportedOption("seed must be a whole number in 0..2**63-1")
        opts = dict(request.options)
        unknown = sorted(set(opts) - set(OPTIONS))
        if unknown:
            raise UnsupportedOption(f"unknown option(s) {', '.join(map(repr, unknown[:5]))}; a CosyVoice 2 voice "
                                    f"takes {', '.join(OPTIONS)}")
        dim = self.cfg.spk_embed_dim
        emb = opts.get("embedding")
        if emb is None:
            raise UnsupportedOption(f"options.embedding (the speaker embedding, {dim} floats) is required")
        emb = _floats(emb, "options.embedding")
        if emb.ndim != 1 or emb.shape[0] != dim:
            raise UnsupportedOption(f"options.embedding must be {dim} floats, got shape {tuple(emb.shape)}")
        ptok = opts.get("prompt_tokens", [])
        if not isinstance(ptok, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in ptok):
            raise UnsupportedOption("options.prompt_tokens must be a list of integers")
        bad = [t for t in ptok if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise UnsupportedOption(f"options.prompt_tokens: {bad[0]} is outside the vocabulary 0..{self.cfg.vocab_size - 1}")
        pmel = opts.get("prompt_mel")
        if pmel is None:
            if ptok:
                raise UnsupportedOption("options.prompt_mel is required with prompt_tokens")
            feat = None
        else:
            feat = _floats(pmel, "options.prompt_mel")
            want = (2 * len(ptok), self.cfg.output_size)
            if tuple(feat.shape) != want:
                raise UnsupportedOption(f"options.prompt_mel must be {want[0]} rows (2 per prompt token) of "
                                        f"{want[1]} floats, got shape {tuple(feat.shape)}")
        final = opts.get("final", DEFAULT_FINAL)
        if final not in FINAL_MODES:
            raise UnsupportedOption(f"options.final must be one of {', '.join(FINAL_MODES)}")
        left = opts.get("left_chunks", FULL_LEFT)
        if isinstance(left, bool) or not isinstance(left, int) or left < FULL_LEFT:
            raise UnsupportedOption("options.left_chunks must be -1 (every earlier chunk) or a whole number >= 0")
        return {"embedding": emb, "prompt_tokens": list(ptok), "prompt_feat": feat, "final": final,
                "left_chunks": None if left == FULL_LEFT else left,
                "seed": secrets.randbits(63) if seed is None else seed}

    def synthesize(self, text: str, request: SpeechRequest = SpeechRequest()) -> list[np.ndarray]:
        raise UnsupportedInput("a CosyVoice 2 voice takes speech tokens, not text (synthesize_tokens)")

    @torch.inference_mode()
    def synthesize_tokens(self, tokens: list[int], request: SpeechRequest) -> np.ndarray:
        """Offline, CosyVoice2Model.tts(stream=False): the whole utterance's flow with full attention, then HiFT."""
        s = self.check(request)
        mel = non_streaming(self.flow, list(tokens), s["embedding"], s["prompt_tokens"], s["prompt_feat"])
        audio = HiftStreamer(self.hift, generator=s["seed"]).push(mel, finalize=True)
        return audio[0].numpy().astype(np.float32)


def _floats(value, what: str) -> torch.Tensor:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise UnsupportedOption(f"{what} must be numbers") from None
    if arr.dtype == object or not np.isfinite(arr).all():
        raise UnsupportedOption(f"{what} must be finite numbers")
    return torch.from_numpy(arr.astype(np.float32))


class CosyVoiceStream(TtsStream):
    def __init__(self, engine: "CosyVoiceEngine", request: SpeechRequest, settings: dict):
        super().__init__(engine, engine.voice.sample_rate, request)
        self.voice = engine.voice
        self.opts = settings
        self.mode = settings["final"]
        self.group_key = engine  # every stream of the engine shares the flow step
        left = settings["left_chunks"]
        self.settings = {"input": "speech_tokens", "seed": settings["seed"],
                         "options": {"final": self.mode, "prompt_tokens": len(settings["prompt_tokens"]),
                                     "left_chunks": FULL_LEFT if left is None else left}}
        # a bounded stream's state is bounded too, but an exact final is a whole full-attention pass: max_seconds
        bounded = left is not None and self.mode == FINAL_FLAT
        frames = self.voice.cfg.noise_frames if bounded else engine.max_frames
        self.max_tokens = frames // self.voice.cfg.token_mel_ratio - len(settings["prompt_tokens"])
        self.generator = torch.Generator().manual_seed(settings["seed"])
        self.flow = None                       # FlowState of the utterance in progress (opened by the engine)
        self.tokens: list[int] = []            # the utterance in progress
        self.ended = False                     # its end is known (flush)
        self.queued: list[list[int]] = []      # utterances flushed behind it, and the start of the next
        self._next: list[int] = []
        self._new_utterance()

    def _new_utterance(self) -> None:
        self.hops = HopSchedule(len(self.opts["prompt_tokens"]), self.voice.cfg.pre_lookahead_len)
        self.hift = HiftStreamer(self.voice.hift, generator=self.generator)
        self._resampler = (StreamingResampler(self.model_rate, self.sample_rate)
                           if self.sample_rate != self.model_rate else None)

    # -- input ------------------------------------------------------------------------------------------
    def push_text(self, text: str, now: float | None = None) -> None:
        raise UnsupportedInput("a CosyVoice 2 voice takes speech tokens (`tokens` messages), not text")

    def push_tokens(self, tokens: list[int]) -> None:
        if self._finished:
            raise RuntimeError("tokens after the end of the stream")
        vocab = self.voice.cfg.vocab_size
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise BadTokens(f"speech token {t!r} is outside the vocabulary 0..{vocab - 1}")
        target = self._next if self.ended else self.tokens
        if len(target) + len(tokens) > self.max_tokens:
            held = (self.max_tokens + len(self.opts["prompt_tokens"])) * self.voice.cfg.token_mel_ratio
            raise BadTokens(f"an utterance of more than {self.max_tokens} tokens (this stream holds "
                            f"{held / MEL_FRAME_RATE:g} s per utterance, prompt included)")
        target.extend(tokens)
        self.chars_in += len(tokens)

    def flush(self) -> None:
        """No more tokens for this utterance: its final chunk comes next."""
        if not self.ended:
            if self.tokens:
                self.ended = True
                self.segments_made += 1
        elif self._next:
            self.queued.append(self._next)
            self._next = []
            self.segments_made += 1

    def tick(self, now: float | None = None) -> None:
        pass  # tokens have no unfinished sentence to wait for

    def cancel(self, skipped_chars: int = 0) -> int:
        dropped = int(bool(self.tokens)) + len(self.queued) + int(bool(self._next))
        self.tokens, self.queued, self._next, self.ended = [], [], [], False
        self.engine.reset_flow(self)
        self._new_utterance()
        return dropped

    # -- the scheduler's view ---------------------------------------------------------------------------
    def _can_step(self) -> bool:
        return (self.ended and bool(self.tokens)) or self.hops.ready(len(self.tokens))

    def ready(self) -> bool:
        return self._can_step() and not self.paused and not self._closed

    @property
    def pending_chars(self) -> int:
        return len(self.tokens) - self.hops.offset + len(self._next) + sum(map(len, self.queued))

    @property
    def idle(self) -> bool:
        """Nothing to do until more tokens come (tokens short of a hop wait for the client: the idle timeout runs)."""
        return not self._can_step()

    @property
    def done(self) -> bool:
        return self._finished and not self.tokens and not self.queued and not self._next

    # -- the engine's side ------------------------------------------------------------------------------
    def next_chunk(self) -> tuple[FlowChunk, int, int]:
        """The next chunk of the utterance (its prompt in front of the first) and its token span."""
        prompt = self.opts["prompt_tokens"] if self.hops.offset == 0 else []
        look = self.voice.cfg.pre_lookahead_len
        if self.hops.ready(len(self.tokens)):
            start, end = self.hops.advance()
            return FlowChunk(prompt + self.tokens[start:end], self.tokens[end:end + look]), start, end
        start = self.hops.offset
        return FlowChunk(prompt + self.tokens[start:], [], final=True), start, len(self.tokens)

    def emit(self, audio: torch.Tensor, start: int, end: int, last: bool) -> AudioChunk:
        audio = audio[0].numpy().astype(np.float32)
        if self._resampler is not None:
            audio = self._resampler.process(audio)
            if last:
                audio = np.concatenate([audio, self._resampler.flush()])
        mark = Mark(self.segments_done, "", start, end)
        self.samples_out += len(audio)
        if last:
            self.segments_done += 1
            self.tokens, self.ended = [], False
            if self.queued:  # the next utterance, already flushed
                self.tokens, self.ended = self.queued.pop(0), True
            elif self._next:
                self.tokens, self._next = self._next, []
            self.engine.reset_flow(self)
            self._new_utterance()
        return AudioChunk(audio, mark, last)

    def finish(self) -> None:
        self.flush()
        self._finished = True


class CosyVoiceEngine(TtsEngine):
    def __init__(self, voice: CosyVoice2Voice, slots: int, name: str, max_seconds: float,
                 memory_budget: int | None = None):
        self.voice = voice
        self.name = name
        self.max_frames = min(voice.cfg.noise_frames, int(math.ceil(max_seconds * MEL_FRAME_RATE)))
        budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
        per_slot = FlowStreamer.bytes_per_slot(voice.flow, self.max_frames)
        if per_slot > budget:
            raise ValueError(f"one CosyVoice 2 stream of {max_seconds:g} s holds {per_slot / 2**20:.0f} MiB of "
                             f"state, over the memory budget of {budget / 2**20:.0f} MiB")
        if slots * per_slot > budget:  # every slot's K/V is preallocated: fewer slots rather than no memory
            log.warning("voice %s: %d slots of %.0f MiB exceed the memory budget of %.0f MiB; %d slots", name, slots,
                        per_slot / 2**20, budget / 2**20, budget // per_slot)
            slots = int(budget // per_slot)
        self.streamer = FlowStreamer(voice.flow, slots=slots, max_frames=self.max_frames, name=name)
        self.pool = self.streamer.pool

    def open(self, request: SpeechRequest) -> CosyVoiceStream:
        settings = self.voice.check(request)
        left = settings["left_chunks"]
        most = self.streamer.max_left_chunks(len(settings["prompt_tokens"]))
        if left is not None and left > most:
            raise UnsupportedOption(f"options.left_chunks: at most {most} with this engine "
                                    f"({self.max_frames / MEL_FRAME_RATE:g} s per slot) and a prompt of "
                                    f"{len(settings['prompt_tokens'])} tokens; -1 for all")
        stream = CosyVoiceStream(self, request, settings)
        stream.flow = self.streamer.open(settings["embedding"], settings["prompt_feat"], left)
        return stream

    def release(self, stream: CosyVoiceStream) -> None:
        if stream.flow is not None:
            self.streamer.release(stream.flow)
            stream.flow = None

    def reset_flow(self, stream: CosyVoiceStream) -> None:
        """A fresh flow state for the stream's next utterance (the same slot comes back: one thread steps)."""
        if stream.flow is not None and not stream.closed:
            self.streamer.release(stream.flow)
            stream.flow = self.streamer.open(stream.opts["embedding"], stream.opts["prompt_feat"],
                                             stream.opts["left_chunks"])

    def step(self, streams: list[CosyVoiceStream]) -> list[AudioChunk]:
        work = [s.next_chunk() for s in streams]
        exact = [w[0].final and s.mode == FINAL_EXACT for s, w in zip(streams, work)]
        mels: list[torch.Tensor | None] = [None] * len(streams)
        cached = [i for i in range(len(streams)) if not exact[i]]
        if cached:
            out = self.streamer.step([streams[i].flow for i in cached], [work[i][0] for i in cached])
            for i, mel in zip(cached, out):
                mels[i] = mel
        for i in range(len(streams)):
            if exact[i]:  # CosyVoice's final call: full attention over the whole utterance
                s = streams[i]
                mels[i] = exact_final(self.voice.flow, s.tokens, work[i][1], s.opts["embedding"],
                                      s.opts["prompt_tokens"], s.opts["prompt_feat"])
        finals = [w[0].final for w in work]
        audio = HiftStreamer.push_many([s.hift for s in streams], mels, finals)
        return [s.emit(a, w[1], w[2], last) for s, a, w, last in zip(streams, audio, work, finals)]


def _detect(path: Path) -> bool:
    return is_cosyvoice2_dir(path)


def load(path: Path) -> CosyVoice2Voice:
    path = Path(path)
    if not is_cosyvoice2_dir(path):
        raise NotACosyVoiceModel(f"{path}: a CosyVoice 2 model directory holds cosyvoice2.yaml, flow.pt and hift.pt")
    doc = read_model_yaml(path)
    flow = load_flow(path / "flow.pt", flow_config(doc))
    if "hift" not in doc:
        raise NotACosyVoiceModel(f"{path}: cosyvoice2.yaml has no hift: section")
    try:
        hift_cfg = HiftConfig.from_mapping(doc["hift"])
    except ValueError as exc:
        raise NotACosyVoiceModel(f"{path}/cosyvoice2.yaml: {exc}") from None
    hift = load_hift(path / "hift.pt", hift_cfg)
    if hift.cfg.in_channels != flow.cfg.output_size:
        raise NotACosyVoiceModel(f"{path}: the flow makes {flow.cfg.output_size}-bin mels, HiFT takes "
                                 f"{hift.cfg.in_channels}")
    return CosyVoice2Voice(path, flow, hift)


FAMILY = VoiceFamily("cosyvoice2", "a CosyVoice 2 model directory (cosyvoice2.yaml, flow.pt and hift.pt: speech "
                     "tokens to audio)", _detect, load)

__all__ = ["FAMILY", "CosyVoice2Voice", "CosyVoiceEngine", "CosyVoiceStream", "load"]
