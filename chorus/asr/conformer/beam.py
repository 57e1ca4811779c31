"""RNNT beam search with optional n-gram shallow fusion, carried across chunks.

Frame-synchronous ("modified") beam search as in k2/icefall, with up to `symbols_per_frame`
labels per frame: at each encoder frame every hypothesis either ends the frame with blank (scores
of equal label sequences are summed) or extends by one of its best labels; the `beam_size` best
survive.  A label's score is ln P_rnnt + lm_weight x ln P_lm + length_bonus; when the utterance ends,
lm_weight x ln P_lm(end of sentence) is added before the best is chosen.  The search state is
a list of hypotheses that `advance` takes and returns, so a stream can feed it chunk by chunk and
get exactly what one pass over the whole utterance gives (law 1): nothing looks past a frame.

Each stream searches on its own on the host (the encoder step is still batched across streams);
hypotheses grow with the utterance, so the state does not fit a fixed-size slot.  A hypothesis'
labels are a chain of `Label` nodes shared with the hypotheses it came from, and equal label
sequences are found by a key built label by label: extending or merging costs the same after an
hour of audio as after a second (copying and hashing whole token tuples grew with the utterance).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..ngram import NgramLM
from .heads import RNNTJoint, RNNTPredictor


@dataclass(frozen=True)
class BeamConfig:
    beam_size: int = 8
    lm_weight: float = 0.3        # weight of the n-gram's ln probability
    length_bonus: float = 1.0     # added per label: offsets the bias of both models to short outputs
    symbols_per_frame: int = 2

    def __post_init__(self):
        if not 1 <= self.beam_size <= 64:
            raise ValueError(f"beam size {self.beam_size} is outside 1..64")
        if not 1 <= self.symbols_per_frame <= 10:
            raise ValueError(f"symbols per frame {self.symbols_per_frame} is outside 1..10")
        if not (np.isfinite(self.lm_weight) and np.isfinite(self.length_bonus)) or self.lm_weight < 0:
            raise ValueError("lm weight must be >= 0 and the length bonus finite")


@dataclass(frozen=True)
class Label:
    """One label of a hypothesis, linked to the labels before it (shared between hypotheses)."""
    token: int
    frame: int                     # encoder frame it was emitted at
    parent: "Label | None"
    depth: int                     # labels up to and including this one


def labels_of(last: Label | None) -> list[Label]:
    """The chain ending at `last`, first label first."""
    out = []
    while last is not None:
        out.append(last)
        last = last.parent
    return out[::-1]


EMPTY_KEY = 0


@dataclass
class Hyp:
    last: Label | None             # the newest label (None: no label yet)
    key: int                       # equal for equal label sequences: hash of (parent key, token)
    score: float
    pred_out: torch.Tensor         # predictor output after the last label [H]
    pred_proj: torch.Tensor        # joint.pred(pred_out) [J]
    state: tuple[torch.Tensor, torch.Tensor]  # LSTM (h, c), each [layers, H]
    lm_context: tuple[int, ...]

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(n.token for n in labels_of(self.last))

    @property
    def frames(self) -> tuple[int, ...]:
        return tuple(n.frame for n in labels_of(self.last))


class RnntBeamSearch:
    def __init__(self, joint: RNNTJoint, predictor: RNNTPredictor, config: BeamConfig = BeamConfig(),
                 lm: NgramLM | None = None):
        if lm is not None and lm.vocab_size != predictor.blank:
            raise ValueError(f"the language model has {lm.vocab_size} tokens, the model {predictor.blank}")
        self.joint, self.predictor, self.config, self.lm = joint, predictor, config, lm

    @torch.no_grad()
    def start(self, pred_out: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> list[Hyp]:
        """One empty hypothesis from the predictor's output and state after the start symbol."""
        return [Hyp(None, EMPTY_KEY, 0.0, pred_out, self.joint.pred(pred_out), state,
                    self.lm.start() if self.lm else ())]

    @torch.no_grad()
    def start_fresh(self, device=None) -> list[Hyp]:
        pred = self.predictor
        sos = torch.full((1,), pred.blank, dtype=torch.long, device=device)
        out, (h, c) = pred.step(sos, pred.initial_state(1, device))
        return self.start(out[0], (h[:, 0], c[:, 0]))

    @torch.no_grad()
    def advance(self, hyps: list[Hyp], encoded: torch.Tensor, first_frame: int) -> list[Hyp]:
        """Search over encoder frames [T, d] (frame indices first_frame...); returns the new beam, best first."""
        enc_proj = self.joint.enc(encoded)
        for t in range(enc_proj.shape[0]):
            hyps = self._frame(hyps, enc_proj[t], first_frame + t)
        return hyps

    @staticmethod
    def best(hyps: list[Hyp]) -> Hyp:
        """The best hypothesis so far (for partial results)."""
        return hyps[0]

    def best_final(self, hyps: list[Hyp]) -> Hyp:
        """The best hypothesis of a finished utterance, counting the LM's end-of-sentence probability."""
        return max(hyps, key=self._final_score)  # max keeps the first of equal scores

    def _final_score(self, h: Hyp) -> float:
        score = h.score
        if self.lm is not None and self.config.lm_weight:
            score += self.config.lm_weight * self.lm.end_log_prob(h.lm_context)
        return score

    def commit(self, hyps: list[Hyp]) -> list[Hyp]:
        """Keep the final best hypothesis alone, with its label history dropped (after an utterance's
        final): the predictor state goes on, as greedy decoding's does; the LM starts a new sentence."""
        return [replace(self.best_final(hyps), last=None, key=EMPTY_KEY, score=0.0,
                        lm_context=self.lm.start() if self.lm else ())]

    def _frame(self, hyps: list[Hyp], enc_t: torch.Tensor, frame: int) -> list[Hyp]:
        cfg, lm, blank = self.config, self.lm, self.predictor.blank
        k = cfg.beam_size
        ended: dict[int, Hyp] = {}  # hypotheses that closed this frame with blank, by label sequence
        active = hyps
        for level in range(cfg.symbols_per_frame + 1):
            pred_proj = torch.stack([h.pred_proj for h in active])
            logp = torch.log_softmax(self.joint(enc_t[None], pred_proj).float(), dim=-1).double().cpu().numpy()
            scores = np.array([h.score for h in active])
            for h, closed in zip(active, (scores + logp[:, blank]).tolist()):
                same = ended.get(h.key)
                if same is not None:
                    closed = float(np.logaddexp(same.score, closed))
                ended[h.key] = Hyp(h.last, h.key, closed, h.pred_out, h.pred_proj, h.state, h.lm_context)
            if level == cfg.symbols_per_frame:
                break
            # every (hypothesis, label) extension at once: [hypotheses, labels]
            total = scores[:, None] + logp[:, :blank] + cfg.length_bonus
            if lm is not None and cfg.lm_weight:
                total += cfg.lm_weight * np.stack([lm.log_probs(h.lm_context) for h in active])
            flat = total.ravel()
            best = np.argpartition(-flat, k - 1)[:k] if k < flat.size else np.arange(flat.size)
            best = best[np.lexsort((best, -flat[best]))]  # by score, then hypothesis, then label
            closed_scores = sorted((h.score for h in ended.values()), reverse=True)
            floor = closed_scores[k - 1] if len(closed_scores) >= k else -np.inf
            candidates = [(flat[j], j // blank, j % blank) for j in best.tolist() if flat[j] > floor]
            if not candidates:
                break
            active = self._extend(active, candidates, frame)
        return sorted(ended.values(), key=lambda h: -h.score)[:k]

    def _extend(self, hyps: list[Hyp], candidates: list[tuple[float, int, int]], frame: int) -> list[Hyp]:
        """Run the predictor once for all new labels."""
        parents = [hyps[i] for _, i, _ in candidates]
        labels = torch.tensor([w for _, _, w in candidates], device=parents[0].pred_out.device)
        h = torch.stack([p.state[0] for p in parents], dim=1)
        c = torch.stack([p.state[1] for p in parents], dim=1)
        out, (h, c) = self.predictor.step(labels, (h, c))
        proj = self.joint.pred(out)
        return [Hyp(Label(w, frame, p.last, p.last.depth + 1 if p.last else 1), hash((p.key, w)), score,
                    out[j], proj[j], (h[:, j], c[:, j]), self.lm.extend(p.lm_context, w) if self.lm else ())
                for j, ((score, _, w), p) in enumerate(zip(candidates, parents))]


def rnnt_beam_offline(search: RnntBeamSearch, encoded: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Beam-search token ids of whole utterances (for tests and evaluation)."""
    out = []
    for i in range(encoded.shape[0]):
        hyps = search.advance(search.start_fresh(encoded.device), encoded[i, :int(lengths[i])], 0)
        out.append(list(search.best_final(hyps).tokens))
    return out
