"""One live recognition stream: audio in, growing hypothesis out.

An `AsrStream` holds a slot in the model's pool and the stream's plumbing: resampling to the
model rate, incremental features and chunking.  It never steps the model itself; whoever runs
the model (the CLI loop, the server's scheduler) collects ready streams and steps them together
with `step_streams`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..codecs.resample import StreamingResampler
from ..stream.chunking import FrameChunker
from ..stream.features import OnlineMel
from .conformer.beam import Hyp, Label, RnntBeamSearch
from .conformer.streaming import ConformerStreamer, StepResult, StreamSetting
from .tokenizer import SentencePieceTokenizer


@dataclass
class Token:
    id: int
    frame: int  # encoder frame index


@dataclass
class Hypothesis:
    tokens: list[Token] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]


class AsrStream:
    def __init__(self, engine: ConformerStreamer, tokenizer: SentencePieceTokenizer,
                 setting: StreamSetting, decoder: str, sample_rate: int, search: RnntBeamSearch | None = None):
        model = engine.model
        if decoder not in model.decoders:
            raise ValueError(f"decoder {decoder!r} is not available; this model has {list(model.decoders)}")
        if search is not None and decoder != "rnnt":
            raise ValueError("beam search is built for the rnnt decoder only; use beam size 1 with ctc")
        self.engine = engine
        self.tokenizer = tokenizer
        self.setting = setting
        self.decoder = decoder
        self.model_rate = model.spec.mel.sample_rate
        self.frame_seconds = model.spec.mel.hop_length / self.model_rate * model.spec.encoder.subsampling_factor
        self.resampler = StreamingResampler(sample_rate, self.model_rate)
        self.features = OnlineMel(model.frontend)
        self.chunker = FrameChunker(setting.plan, model.spec.mel.n_mels)
        self.hypothesis = Hypothesis()
        # With beam search the model step only encodes; the search runs after it (step_streams
        # advances the beams of streams that search alike together).
        self.search = search
        self._beam = search.start_fresh(engine.device) if search is not None else None
        self._shown: Label | None = None  # the last label of the beam hypothesis in `hypothesis`
        self.frames_done = 0
        self.samples_in = 0
        self.sample_rate = sample_rate
        self.slot: int | None = engine.open()

    # -- input -----------------------------------------------------------------------------
    def accept_audio(self, samples: np.ndarray) -> None:
        """Audio at the stream's sample rate, float32 mono."""
        if self.chunker.finished:
            raise RuntimeError("audio after the end of the stream")
        self.samples_in += len(samples)
        self.chunker.push(self.features.accept(self.resampler.process(samples)))

    def finish(self) -> None:
        """No more audio: flush the resampler and the feature front end."""
        if self.chunker.finished:
            return
        tail = self.resampler.flush()
        self.chunker.push(self.features.accept(tail))
        self.chunker.push(self.features.finish())
        self.chunker.finish()

    # -- stepping --------------------------------------------------------------------------
    def ready(self) -> bool:
        return self.slot is not None and self.chunker.ready()

    @property
    def done(self) -> bool:
        """All audio received and encoded."""
        return self.chunker.finished and self.chunker.pending == 0

    @property
    def step_decoder(self) -> str | None:
        """What the batched model step decodes for this stream (None: the beam search does it here)."""
        return None if self.search is not None else self.decoder

    def apply(self, result: StepResult, beam: list[Hyp] | None = None) -> list[Token]:
        """Take a step's result; returns the tokens that are new in the hypothesis.

        Greedy hypotheses only grow.  The best beam hypothesis may revise its recent tokens: the
        new ones are those after the part it shares with the previous best.  `beam`: this stream's
        beam already advanced over the result's frames (`step_streams` advances streams together)."""
        self.frames_done = result.frames_done
        if self.search is None:
            new = [Token(i, f) for i, f in zip(result.tokens, result.token_frames)]
            self.hypothesis.tokens.extend(new)
            return new
        if beam is None:
            beam = self.search.advance(*self.beam_input(result))
        self._beam = beam
        return self._take_best(final=self.done)

    def beam_input(self, result: StepResult) -> tuple[list[Hyp], torch.Tensor, int]:
        """What the beam search advances over for this result: (beam, encoder frames, first frame)."""
        return self._beam, result.encoded, result.frames_done - result.encoded.shape[0]

    def _take_best(self, final: bool) -> list[Token]:
        """Make the best hypothesis the shown one, touching only the labels after the part it shares
        with the previous one (walking both label chains back to their common node)."""
        best = (self.search.best_final(self._beam) if final else self.search.best(self._beam)).last
        old, new, changed = self._shown, best, []
        while (old.depth if old else 0) > (new.depth if new else 0):
            old = old.parent
        while old is not new:
            if old is not None and old.depth == new.depth:
                old = old.parent
            changed.append(new)
            new = new.parent
        del self.hypothesis.tokens[new.depth if new else 0:]
        tokens = [Token(n.token, n.frame) for n in reversed(changed)]
        self.hypothesis.tokens.extend(tokens)
        self._shown = best
        return tokens

    def settle_utterance(self) -> list[Token]:
        """An utterance ends here (endpoint): with beam search, pick its final best hypothesis
        (the LM's end-of-sentence score counted); returns the tokens that changed."""
        return self._take_best(final=True) if self.search is not None else []

    def start_next_utterance(self) -> None:
        """Drop the finished utterance's tokens (bounded memory); the model state goes on."""
        self.hypothesis.tokens.clear()
        if self.search is not None:
            self._beam = self.search.commit(self._beam)
            self._shown = None

    # -- output ----------------------------------------------------------------------------
    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.hypothesis.ids)

    def words(self, offset: float = 0.0) -> list[dict]:
        """Words of the hypothesis with start/end seconds (from their tokens' encoder frames)."""
        groups: list[dict] = []
        for t in self.hypothesis.tokens:
            if not groups or self.tokenizer.starts_word(t.id):
                groups.append({"ids": [], "start": t.frame})
            groups[-1]["ids"].append(t.id)
            groups[-1]["end"] = t.frame + 1
        out = []
        for g in groups:
            text = self.tokenizer.decode(g["ids"]).strip()
            if text:
                start, end = (self.audio_time(g[k]) for k in ("start", "end"))
                out.append({"word": text, "start": round(offset + start, 3), "end": round(offset + end, 3)})
        return out

    @property
    def audio_seconds(self) -> float:
        return self.samples_in / self.sample_rate

    def audio_time(self, frame: int) -> float:
        """Seconds at an encoder frame boundary, never past the audio received (the last frames
        of an utterance cover the zero padding of the features)."""
        return min(frame * self.frame_seconds, self.audio_seconds)

    @property
    def seconds_decoded(self) -> float:
        return self.frames_done * self.frame_seconds

    def close(self) -> None:
        """Return the slot; safe to call more than once."""
        if self.slot is not None:
            self.engine.close(self.slot)
            self.slot = None


def step_streams(streams: list[AsrStream]) -> list[tuple[AsrStream, list[Token]]]:
    """Step every ready stream once, batching those that share an engine and setting."""
    groups: dict[tuple, list[AsrStream]] = {}
    for s in streams:
        if s.ready():
            groups.setdefault((id(s.engine), s.setting.context), []).append(s)
    out = []
    for group in groups.values():
        taken = [s.chunker.take() for s in group]
        results = group[0].engine.step([s.slot for s in group], [c for c, _ in taken], [n for _, n in taken],
                                       group[0].setting, [s.step_decoder for s in group])
        beams = _advance_beams(group, results)
        out += [(s, s.apply(r, beams.get(id(s)))) for s, r in zip(group, results)]
    return out


def _advance_beams(streams: list[AsrStream], results: list[StepResult]) -> dict[int, list[Hyp]]:
    """Advance the beams of the streams that search alike together; their new beams by id(stream)."""
    alike: dict[tuple, list[tuple[AsrStream, StepResult]]] = {}
    for s, r in zip(streams, results):
        if s.search is not None:
            alike.setdefault(s.search.batch_key, []).append((s, r))
    beams = {}
    for pairs in alike.values():
        inputs = [s.beam_input(r) for s, r in pairs]
        advanced = pairs[0][0].search.advance_many(*(list(column) for column in zip(*inputs)))
        beams.update((id(s), beam) for (s, _), beam in zip(pairs, advanced))
    return beams


def run_to_end(streams: list[AsrStream]) -> None:
    """Step until every stream (already finished with input) is fully decoded."""
    while any(s.ready() for s in streams):
        step_streams(streams)


@torch.no_grad()
def transcribe_samples(engine: ConformerStreamer, tokenizer: SentencePieceTokenizer, samples: np.ndarray,
                       sample_rate: int, setting: StreamSetting, decoder: str, piece_seconds: float = 0.02,
                       search: RnntBeamSearch | None = None) -> AsrStream:
    """Stream one recording through the live path in `piece_seconds` pieces; returns the closed stream."""
    stream = AsrStream(engine, tokenizer, setting, decoder, sample_rate, search)
    try:
        piece = max(1, int(piece_seconds * sample_rate))
        for i in range(0, len(samples), piece):
            stream.accept_audio(samples[i:i + piece])
            while stream.ready():
                step_streams([stream])
        stream.finish()
        run_to_end([stream])
    finally:
        stream.close()
    return stream
