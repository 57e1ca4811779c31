"""OpenAI Whisper as a streaming chorus family (the contract in chorus/stream/contract.py).

Checkpoints: an OpenAI `.pt`, a CarelessWhisper `.pt` (block-causal, LoRA merged), a Hugging Face
directory or a CTranslate2 directory (loader.py).  A stream has two settings (`StreamRequest.options`,
or `--option` on the command line; `lookahead_ms` is taken as the block length):

* `mode`: `causal` encodes each block once with the block-causal encoder (a frame sees its own block
  and the ones before; CarelessWhisper's training mask, `streaming.py`) and extends the decoder's
  cross-attention K/V with the block's frames; `window` re-encodes the current window (at most 30 s,
  reset at endpoints) with Whisper's full attention every block; `padded` does the same with the window
  followed by silence to 30 s, exactly the input Whisper was trained on (a full 30 s encoder pass per
  block, whatever the window's length).  A stock checkpoint was not trained with the causal mask:
  `causal` runs it anyway (measured in the README); `window` is its own maths over a window shorter
  than the 30 s it was trained on; `padded` is stock Whisper's own input and the default for stock
  checkpoints (the most accurate measured; a CarelessWhisper checkpoint defaults to `causal`).
* `block_ms`: the block length (a multiple of 20 ms): 200, 500, 1000 or 2000 for stock checkpoints; a
  CarelessWhisper checkpoint's own `gran` (its first block `(extra_gran_blocks + 1) * gran`).

Decoding is greedy, as CarelessWhisper streams it: each block, the decoder re-reads the prompt and the
window's tokens with the new audio; tokens older than the last `look_back` (2) are committed (final);
each of the others is kept while its log-probability does not fall or it stays the argmax, and the
first that fails is cut with everything after it; then greedy tokens follow until <|endoftext|>,
which means "wait for more audio".  A block's decoding also stops at a loop (an n-gram of up to 10
tokens three times in a row: the copies are dropped) or when the window holds more tokens than its
audio can (`MAX_TOKENS_PER_SECOND`).  The committed tokens are the final-safe text, the rest the
revisable partial; at the end of the stream, of a window (30 s) or at an endpoint everything is
committed and the next window starts with the last committed tokens as its prompt (<|startofprev|>),
so a stream runs for hours in bounded memory.

`commit` picks how the tail becomes final: `carelesswhisper` (the rule above, the default) or `agreement`,
LocalAgreement-2 as whisper_streaming runs it: each block the tail is decoded afresh from the committed tokens,
and the prefix it shares with the previous block's tail is committed (`look_back` is not used).

Token times are emission times (the end of the block in which a token appeared), not alignments.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ...stream.contract import (DecodingDefaults, Engine, Family, SpeechModel, Stream, StreamRequest, Token,
                                UnsupportedOption)
from .decoding import suppress_tokens
from .frontend import FLOOR, IncrementalLogMel, normalise
from .loader import CausalConfig, WhisperBundle, WhisperCheckpointError, detect_format, load_whisper
from .model import ENCODER_FRAME_SECONDS, N_FRAMES, SAMPLE_RATE, LayerNorm
from ...cache.quantized import paged_bytes_per_token
from ..dtypes import DTYPES, cast_to_bf16, needs_switch
from ..int8_linear import quantize_linears
from .runtime import DecodeJob, WhisperRuntime, decode_step, encode_causal, encode_window

MODES = ("causal", "window", "padded")
BLOCK_MS = (200, 500, 1000, 2000)
DEFAULT_MODE = "padded"        # the best measured on stock tiny.en (README: Whisper; bench/whisper_streaming.py)
# each mode's default block (README: Whisper): padded 2000 ms (1000 ms is more accurate on digit strings, at twice
# the encoder cost: a 30 s pass per block)
DEFAULT_BLOCK_MS = {"causal": 2000, "window": 2000, "padded": 2000}
LOOK_BACK = 2                  # CarelessWhisper's n_tokens_look_back
PROMPT_TOKENS = 64             # committed tokens carried into the next window
# The most tokens a window may hold per second of its audio.  Read English runs at 2-4 Whisper tokens a
# second (jfk.flac: 2.2; the espeak-ng sentences of bench/whisper_streaming.py at most 4.4); a window
# with 4 + 8/s tokens is looping, not transcribing.
MAX_TOKENS_PER_SECOND = 8.0
COMMIT_RULES = ("carelesswhisper", "agreement")  # how the revisable tail becomes final (see the docstring)
DEFAULT_COMMIT = "carelesswhisper"
OPTION_NAMES = ("mode", "block_ms", "look_back", "commit")
# A window whose loudest mel bin stays this far below the loudest of the stream so far (log10 units: 4 = 40 dB)
# holds no speech and is not decoded: stock Whisper says "You" to the silence an endpoint leaves behind, and
# its no-speech probability does not always catch a short one (measured on the page's stop after jfk.flac:
# 0.50 for a 0.19 s window).  The first window of a stream is left to that no-speech check (runtime.py).
SILENCE_BELOW_MAX = 4.0
DEFAULT_MEMORY_BUDGET = 1 << 30  # what an engine preallocates at most (slots beyond it are not offered)


class WhisperModel(SpeechModel):
    family = "whisper"

    def __init__(self, bundle: WhisperBundle, path: str, device: torch.device):
        self.bundle = bundle
        self.model = bundle.model
        self.tokenizer = bundle.require_tokenizer()
        self.path = path
        self.sample_rate = SAMPLE_RATE
        self.device = device
        self.kv_dtype = "auto"   # the K/V caches in the compute dtype, or "int8" (with_kv_dtype)
        self.dtype_name = "fp32"  # or "bf16" (with_dtype)
        self.causal: CausalConfig | None = bundle.causal
        self.suppress = suppress_tokens(self.tokenizer)
        self.blank = self.tokenizer.encode(" ") + [self.tokenizer.eot]
        try:  # <|nospeech|> (<|nocaptions|> in the oldest vocabularies): what the silence check reads
            self.no_speech: int | None = self.tokenizer.no_speech
        except Exception:
            self.no_speech = None

    # -- settings ----------------------------------------------------------------------------
    def blocks_ms(self, mode: str) -> list[int]:
        if self.causal is not None and mode == "causal":
            return [round(self.causal.gran * ENCODER_FRAME_SECONDS * 1000)]
        return list(BLOCK_MS)

    def default_mode(self) -> str:
        return "causal" if self.causal is not None else DEFAULT_MODE

    def default_block_ms(self, mode: str) -> int:
        blocks = self.blocks_ms(mode)
        return DEFAULT_BLOCK_MS[mode] if DEFAULT_BLOCK_MS[mode] in blocks else blocks[0]

    def setting(self, request: StreamRequest) -> tuple[str, int, int, str]:
        """(mode, block_ms, look_back, commit) of a request, checked."""
        options = dict(request.options)
        unknown = set(options) - set(OPTION_NAMES)
        if unknown:
            raise UnsupportedOption(f"unknown option(s) {', '.join(sorted(unknown))}; this model takes "
                                    f"{', '.join(OPTION_NAMES)}")
        mode = options.get("mode", self.default_mode())
        if mode not in MODES:
            raise UnsupportedOption(f"mode {mode!r} is not offered; use one of {list(MODES)}")
        block = options.get("block_ms", request.lookahead_ms)
        if block is None:
            block = self.default_block_ms(mode)
        if block not in self.blocks_ms(mode) or isinstance(block, bool):
            raise UnsupportedOption(f"block_ms {block!r} is not offered in {mode} mode; use one of "
                                    f"{self.blocks_ms(mode)}")
        if request.lookahead_ms is not None and request.lookahead_ms != block:
            raise UnsupportedOption(f"lookahead {request.lookahead_ms} ms is not offered; a Whisper stream looks "
                                    f"one block ahead ({block} ms)")
        look_back = options.get("look_back", LOOK_BACK)
        if not isinstance(look_back, int) or isinstance(look_back, bool) or not 0 <= look_back <= 8:
            raise UnsupportedOption(f"look_back {look_back!r} is not offered; use an integer in 0..8")
        commit = options.get("commit", DEFAULT_COMMIT)
        if commit not in COMMIT_RULES:
            raise UnsupportedOption(f"commit {commit!r} is not offered; use one of {list(COMMIT_RULES)}")
        return mode, int(block), look_back, commit

    def with_dtype(self, dtype: str) -> "WhisperModel":
        """fp32; bf16: every weight and activation in bfloat16 but the layer norms, which compute in fp32
        as openai/whisper's do (model.LayerNorm casts), and the logits, read as fp32; int8: every linear
        layer of the encoder and decoder blocks (attention projections, MLPs) as int8 x int8 -> int32
        (`Int8Linear`: weights per output channel, activations per token), the convolution stem, the norms,
        attention and the logits (the tied token embedding) in fp32.  The K/V caches follow the compute
        dtype (fp32 for int8) unless `with_kv_dtype("int8")`."""
        if not needs_switch(self.dtype_name, dtype, self.family):
            return self
        if dtype == "bf16":
            cast_to_bf16(self.model, [m for m in self.model.modules() if isinstance(m, LayerNorm)])
        else:
            quantize_linears(self.model)
        self.dtype_name = dtype
        return self

    def with_kv_dtype(self, kv_dtype: str) -> "WhisperModel":
        """The encoder, cross- and self-attention K/V caches in the compute dtype ("auto") or int8 (keys per
        channel per 16-token page, values per token and head: cache/quantized.py)."""
        if kv_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_dtype {kv_dtype!r}: choose auto or int8")
        self.kv_dtype = kv_dtype
        return self

    def kv_bytes_per_stream(self) -> dict[str, int]:
        """Each K/V cache's share of a stream with a full window (scales included): the encoder's
        (causal mode) and the decoder's cross-attention K/V for 1500 frames, the self-attention K/V for
        448 tokens, whole 16-token pages."""
        d, dtype = self.model.dims, next(self.model.parameters()).dtype

        def cache(layers, heads, state, tokens, page=16):
            per = paged_bytes_per_token(layers, heads, state // heads, page, self.kv_dtype, dtype)
            return round(per * page * -(-tokens // page))

        return {"encoder": cache(d.n_audio_layer, d.n_audio_head, d.n_audio_state, d.n_audio_ctx),
                "cross": cache(d.n_text_layer, d.n_text_head, d.n_text_state, d.n_audio_ctx),
                "self": cache(d.n_text_layer, d.n_text_head, d.n_text_state, d.n_text_ctx)}

    def bytes_per_stream(self) -> int:
        """A stream's share of the runtime when its window is full: the mel window and tail and the three
        K/V caches (`kv_bytes_per_stream`; fp32 on CPU: about 44 MB for tiny.en, int8 about 12 MB).  The
        pages are preallocated, as the slots are."""
        return sum(self.kv_bytes_per_stream().values()) + 4 * self.model.dims.n_mels * (N_FRAMES + 2)

    def make_engine(self, *, slots=None, memory_budget=None, name=None) -> "WhisperEngine":
        """At most `slots` streams (16 by default), and no more than fit `memory_budget` (default
        DEFAULT_MEMORY_BUDGET) with full windows."""
        budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
        fit = max(1, budget // self.bytes_per_stream())
        return WhisperEngine(self, slots=min(slots or 16, fit), name=name or "whisper")

    def describe(self) -> dict:
        default = self.default_mode()
        blocks = sorted(set().union(*(self.blocks_ms(m) for m in MODES)))
        return {"family": self.family, "format": self.bundle.format, "decoders": ["greedy"],
                "default_decoder": "greedy", "lookahead_ms": blocks, "chunk_ms": {str(b): b for b in blocks},
                "default_lookahead_ms": self.default_block_ms(default), "default_beam_size": 1, "lm": False,
                "sample_rate": self.sample_rate, "dtype": self.dtype_name, "dtypes": list(DTYPES),
                "kv_dtype": self.kv_dtype, "kv_dtypes": ["auto", "int8"],
                "options": {"mode": list(MODES), "block_ms": {m: self.blocks_ms(m) for m in MODES},
                            "look_back": list(range(9)), "commit": list(COMMIT_RULES),
                            "default": {"mode": default, "block_ms": self.default_block_ms(default),
                                        "look_back": LOOK_BACK, "commit": DEFAULT_COMMIT}}}


class WhisperEngine(Engine):
    def __init__(self, model: WhisperModel, *, slots: int, name: str):
        self.model = model
        self.name = name
        self.runtime = WhisperRuntime(model.model, slots, name, kv_dtype=model.kv_dtype)
        self.pool = self.runtime.pool
        self.device = self.runtime.device

    def open(self, request: StreamRequest) -> "WhisperStream":
        if request.decoder not in (None, "greedy"):
            raise UnsupportedOption(f"decoder {request.decoder!r} not offered; use ['greedy']")
        if request.beam_size not in (None, 1):
            raise UnsupportedOption("this model decodes greedily (beam_size 1)")
        mode, block_ms, look_back, commit = self.model.setting(request)
        return WhisperStream(self, mode, block_ms, look_back, commit, request.sample_rate)

    def release(self, stream: "WhisperStream") -> None:
        self.runtime.close(stream.handles)

    @torch.no_grad()
    def step(self, streams: list["WhisperStream"]) -> list[list[Token]]:
        plans = [s.plan_step() for s in streams]
        for s, p in zip(streams, plans):
            if p["reset"]:
                s.reset_window()
        mode = streams[0].mode
        idx = [i for i, p in enumerate(plans) if p["n"] > 0]
        if idx:
            handles = [streams[i].handles for i in idx]
            if mode == "causal":
                encode_causal(self.runtime, handles, [plans[i]["mel"] for i in idx], [plans[i]["n"] for i in idx],
                              [plans[i]["valid"] for i in idx])
            else:
                for i in idx:
                    streams[i].write_window_mel(plans[i]["mel"])
                encode_window(self.runtime, handles, [streams[i].window_mel for i in idx],
                              [streams[i].maximum for i in idx], pad_to_30s=mode == "padded")
            for i in idx:
                streams[i].advance(plans[i])
        jobs = [s.decode_job(p) for s, p in zip(streams, plans)]
        m = self.model
        decode_step(self.runtime, [s.handles for s in streams], jobs, m.suppress, m.blank, m.tokenizer.eot,
                    m.no_speech)
        return [s.apply(j, p) for s, j, p in zip(streams, jobs, plans)]


class WhisperStream(Stream):
    def __init__(self, engine: WhisperEngine, mode: str, block_ms: int, look_back: int, commit: str,
                 sample_rate: int):
        super().__init__(engine, sample_rate, SAMPLE_RATE)
        model = engine.model
        self.mode, self.block_ms, self.look_back = mode, block_ms, look_back
        self.rule = commit
        self.block = round(block_ms / 1000 / ENCODER_FRAME_SECONDS)       # encoder frames per block
        causal = model.causal if mode == "causal" else None
        self.first_block = causal.first_block if causal is not None else self.block
        self.group_key = (engine, mode, self.block)
        self.frame_seconds = ENCODER_FRAME_SECONDS
        self.tokenizer = model.tokenizer
        self.capacity = model.model.dims.n_audio_ctx                       # encoder frames in a window
        self.features = IncrementalLogMel(model.model.dims.n_mels)
        self.maximum = -math.inf                                          # running max of the raw log-mel
        self.window_peak = -math.inf                                      # the same over the current window
        self.pending = torch.zeros(model.model.dims.n_mels, 0)            # raw mel not yet in a block
        self.window_frames = 0        # encoder frames of the current window
        self.window_mel = 0           # mel frames of the current window (window mode)
        self.prompt: list[int] = []   # the last committed tokens of the windows before
        self.tokens: list[int] = []   # the window's tokens
        self.committed = 0
        self.tail_logprobs: list[float] = []
        self.base = 0                 # hypothesis.tokens[base:] are the window's tokens
        self._reset = False
        self._final_done = False
        self.settings = {"decoder": "greedy", "beam_size": 1, "lm": False, "lookahead_ms": block_ms,
                         "chunk_ms": block_ms, "options": {"mode": mode, "block_ms": block_ms, "look_back": look_back,
                                                       "commit": commit}}
        self.handles = engine.runtime.open()

    @property
    def decoding(self) -> str:
        return f"whisper {self.mode} {self.block_ms}ms"

    # -- front end ---------------------------------------------------------------------------
    def accept_model_audio(self, samples: np.ndarray) -> None:
        if len(samples):
            self._take_mel(self.features.accept(samples))

    def finish_input(self) -> None:
        self._take_mel(self.features.finish())

    def _take_mel(self, raw: torch.Tensor) -> None:
        if raw.shape[1]:
            self.maximum = max(self.maximum, float(raw.max()))
            self.pending = torch.cat([self.pending, raw], dim=1)

    @property
    def finished(self) -> bool:
        return self.features.finished

    def _next_n(self) -> int:
        return self.first_block if self.window_frames == 0 else self.block

    def _needed(self) -> int:
        """Mel frames the next block needs (one more in causal mode: the stem reads a frame past the block)."""
        return 2 * self._next_n() + (1 if self.mode == "causal" else 0)

    def ready(self) -> bool:
        if self.closed or self._final_done:
            return False
        return self.pending.shape[1] >= self._needed() or self.finished

    def seconds_to_ready(self) -> float | None:
        if self.finished:
            return None
        return max(0, self._needed() - self.pending.shape[1]) * 0.01

    @property
    def done(self) -> bool:
        return self._final_done

    # -- a step ------------------------------------------------------------------------------
    def plan_step(self) -> dict:
        """What this step encodes: a window reset first?, `n` encoder frames from `mel` (`valid` of them
        real), and whether it is the stream's last step."""
        reset = self._reset or self.window_frames + self._next_n() > self.capacity
        if reset:
            frames, first = 0, self.first_block
        else:
            frames, first = self.window_frames, self._next_n()
        k = self.pending.shape[1]
        need = 2 * first + (1 if self.mode == "causal" else 0)
        if k >= need:
            n, take = first, 2 * first
            mel = self.pending[:, :need]
            valid = need
        else:  # the end of the stream: what is left
            n = (k + 1) // 2
            n = min(n, self.capacity - frames)
            take = min(k, 2 * n)
            # past the end: silence (Whisper pads audio with zeros, whose log-mel is the floor), not 0, which
            # is a loud frame in log10 units and made the model hear words in the padding
            mel = self.pending[:, :take] if self.mode != "causal" else torch.nn.functional.pad(
                self.pending[:, :take], (0, 2 * n + 1 - take), value=FLOOR)
            valid = take
        last = self.finished and self.pending.shape[1] - take <= 0
        after = frames + n
        window_end = not last and after + self.block > self.capacity
        peak = float(self.pending[:, :take].max()) if take else -math.inf
        if self.mode == "causal":  # floored once, with the maximum heard so far
            mel = normalise(mel, self.maximum)
        return {"reset": reset, "peak": peak, "n": n, "mel": mel, "valid": valid, "take": take, "last": last,
                "final": last or window_end}

    def reset_window(self) -> None:
        """A new window: the committed tokens so far become its prompt; the runtime's window state goes."""
        self.prompt = (self.prompt + self.tokens)[-PROMPT_TOKENS:]
        self.base = len(self.hypothesis.tokens)
        self.tokens, self.committed, self.tail_logprobs = [], 0, []
        self.window_frames = self.window_mel = 0
        self.window_peak = -math.inf
        self._reset = False
        self.engine.runtime.reset_window(self.handles)

    def write_window_mel(self, raw: torch.Tensor) -> None:
        """Append a block's raw mel to the window in the slot (window mode re-encodes the whole window,
        floored with the running maximum at that step)."""
        mel = self.engine.runtime.pool.tensors["mel"]
        mel[self.handles[0], :, self.window_mel:self.window_mel + raw.shape[1]] = raw
        self.window_mel += raw.shape[1]

    def advance(self, plan: dict) -> None:
        self.pending = self.pending[:, plan["take"]:]
        self.window_frames += plan["n"]
        self.window_peak = max(self.window_peak, plan["peak"])
        self.frames_done += plan["n"]

    def decode_job(self, plan: dict) -> DecodeJob:
        tok = self.tokenizer
        context = ([tok.sot_prev, *self.prompt] if self.prompt else []) + list(tok.sot_sequence_including_notimestamps)
        seconds = self.window_frames * ENCODER_FRAME_SECONDS
        return DecodeJob(context, list(self.tokens), self.committed, list(self.tail_logprobs),
                         max_tokens=4 + math.ceil(MAX_TOKENS_PER_SECOND * seconds), final=plan["final"],
                         look_back=self.look_back, rule=self.rule,
                         sot_index=context.index(tok.sot) if self.committed == 0 else -1,
                         silent=self.window_peak < self.maximum - SILENCE_BELOW_MAX)

    def apply(self, job: DecodeJob, plan: dict) -> list[Token]:
        """The window's new tokens into the hypothesis; returns the tokens that changed."""
        old = self.tokens
        same = 0
        while same < min(len(old), len(job.tokens)) and old[same] == job.tokens[same]:
            same += 1
        del self.hypothesis.tokens[self.base + same:]
        new = [Token(t, max(0, self.frames_done - 1)) for t in job.tokens[same:]]
        self.hypothesis.tokens.extend(new)
        self.tokens, self.committed, self.tail_logprobs = job.tokens, job.committed, job.tail_logprobs
        self.last_stop = job.stopped_by
        if plan["last"]:
            self._final_done = True
        return new

    # -- utterances --------------------------------------------------------------------------
    def settle_utterance(self) -> list[Token]:
        """An endpoint or finalize: the tail becomes final as it stands."""
        self.committed = len(self.tokens)
        self.tail_logprobs = []
        return []

    def start_next_utterance(self) -> None:
        """The utterance's tokens go; the next step starts a new window prompted with them."""
        super().start_next_utterance()
        self.base = 0
        if self.tokens or self.window_frames:
            self._reset = True
            self.prompt = (self.prompt + self.tokens)[-PROMPT_TOKENS:]
            self.tokens, self.committed, self.tail_logprobs = [], 0, []

    @property
    def committed_text(self) -> str:
        """The final-safe text of the utterance (the hypothesis without its revisable tail)."""
        return self.decode(self.hypothesis.ids[:self.base + self.committed])

    # -- text --------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def starts_word(self, token_id: int) -> bool:
        return self.tokenizer.starts_word(token_id)


def _is_whisper(path: Path) -> bool:
    try:
        fmt = detect_format(path)
    except WhisperCheckpointError:
        return False
    if fmt == "huggingface":
        import json

        try:
            return json.loads((path / "config.json").read_text()).get("model_type") == "whisper"
        except (OSError, ValueError):
            return False
    return True


def load_whisper_model(path: Path, device: torch.device, decoding: DecodingDefaults) -> WhisperModel:
    if decoding.beam_size not in (None, 1):
        raise ValueError(f"{path}: Whisper streams decode greedily; --beam is for FastConformer RNNT heads")
    if decoding.lm not in (None, "auto", "none"):
        raise ValueError(f"{path}: a Whisper model takes no n-gram language model")
    return WhisperModel(load_whisper(path, device=device), str(path), device)


FAMILY = Family("whisper", "a Whisper checkpoint (an OpenAI or CarelessWhisper .pt file, a Hugging Face or a "
                "CTranslate2 directory)", _is_whisper, load_whisper_model)
