"""RNNT beam search with optional n-gram shallow fusion, carried across chunks.

Frame-synchronous ("modified") beam search as in k2/icefall, with up to `symbols_per_frame`
labels per frame: at each encoder frame every hypothesis either ends the frame with blank (scores
of equal label sequences are summed) or extends by one of its best labels; the `beam_size` best
survive.  A label's score is ln P_rnnt + lm_weight x ln P_lm + length_bonus; when the utterance ends,
lm_weight x ln P_lm(end of sentence) is added before the best is chosen.  The search state is
a list of hypotheses that `advance` takes and returns, so a stream can feed it chunk by chunk and
get exactly what one pass over the whole utterance gives (law 1): nothing looks past a frame.

The search runs on the host, outside the model step; streams searched alike advance together
(`advance_many`: one joint and one predictor call per frame and label level for all of them).
Hypotheses grow with the utterance, so the state does not fit a fixed-size slot.  A hypothesis'
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
    pred_proj: torch.Tensor        # joint.project_prediction(pred_out) [J]
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
        return [Hyp(None, EMPTY_KEY, 0.0, pred_out, self.joint.project_prediction(pred_out), state,
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
        return self.advance_many([hyps], [encoded], [first_frame])[0]

    @torch.no_grad()
    def advance_many(self, beams: list[list[Hyp]], encoded: list[torch.Tensor],
                     first_frames: list[int]) -> list[list[Hyp]]:
        """`advance` for several streams' beams at once (streams searched alike: see `batch_key`).

        Their frames go through the joint network and the predictor together, one call per frame
        and label level instead of one per stream (the calls are tiny, so their fixed cost is what
        a server with many streams pays); the selection stays per stream, so each beam comes out
        as its own `advance` makes it."""
        lengths = [e.shape[0] for e in encoded]
        enc_proj = self.joint.project_encoder(torch.cat(list(encoded))).split(lengths)
        beams = list(beams)
        for t in range(max(lengths, default=0)):
            live = [i for i, n in enumerate(lengths) if t < n]
            rows = torch.stack([enc_proj[i][t] for i in live])
            for i, beam in zip(live, self._frame([beams[i] for i in live], rows,
                                                 [first_frames[i] + t for i in live])):
                beams[i] = beam
        return beams

    @property
    def batch_key(self) -> tuple:
        """Searches with equal keys (same networks, settings and LM) can advance their beams together."""
        return id(self.joint), id(self.predictor), self.config, id(self.lm)

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

    def _frame(self, beams: list[list[Hyp]], enc_rows: torch.Tensor, frames: list[int]) -> list[list[Hyp]]:
        """One encoder frame for each beam (its projected encoder row in enc_rows [beams, J])."""
        cfg, lm = self.config, self.lm
        ended: list[dict[int, Hyp]] = [{} for _ in beams]  # per beam: hypotheses closed with blank, by labels
        active = list(beams)
        for level in range(cfg.symbols_per_frame + 1):
            live = [b for b, hyps in enumerate(active) if hyps]
            if not live:
                break
            rows = [h for b in live for h in active[b]]
            owner = torch.tensor([b for b in live for _ in active[b]], device=enc_rows.device)
            logits = self.joint(enc_rows[owner], torch.stack([h.pred_proj for h in rows]))
            logp = torch.log_softmax(logits.float(), dim=-1).double().cpu().numpy()
            lm_logp = (np.stack([lm.log_probs(h.lm_context) for h in rows])
                       if lm is not None and cfg.lm_weight else None)
            choose = level < cfg.symbols_per_frame
            start, chosen = 0, []
            for b in live:
                end = start + len(active[b])
                picks = self._close_and_pick(active[b], logp[start:end],
                                             None if lm_logp is None else lm_logp[start:end], ended[b], choose)
                chosen += [(b, active[b][i], w, score) for score, i, w in picks]
                start = end
            if not chosen:
                break
            active = [[] for _ in beams]
            for (b, _, _, _), hyp in zip(chosen, self._extend(chosen, frames)):
                active[b].append(hyp)
        return [sorted(e.values(), key=lambda h: -h.score)[:cfg.beam_size] for e in ended]

    def _close_and_pick(self, hyps: list[Hyp], logp: np.ndarray, lm_logp: np.ndarray | None,
                        ended: dict[int, Hyp], choose: bool) -> list[tuple[float, int, int]]:
        """Close every hypothesis with blank into `ended` (summing equal label sequences); then, if
        `choose`, return the extensions (score, hypothesis, label) that can still make the beam."""
        cfg, blank, k = self.config, self.predictor.blank, self.config.beam_size
        scores = np.array([h.score for h in hyps])
        for h, closed in zip(hyps, (scores + logp[:, blank]).tolist()):
            same = ended.get(h.key)
            if same is not None:
                closed = float(np.logaddexp(same.score, closed))
            ended[h.key] = Hyp(h.last, h.key, closed, h.pred_out, h.pred_proj, h.state, h.lm_context)
        if not choose:
            return []
        # every (hypothesis, label) extension at once: [hypotheses, labels]
        total = scores[:, None] + logp[:, :blank] + cfg.length_bonus
        if lm_logp is not None:
            total += cfg.lm_weight * lm_logp
        flat = total.ravel()
        best = np.argpartition(-flat, k - 1)[:k] if k < flat.size else np.arange(flat.size)
        best = best[np.lexsort((best, -flat[best]))]  # by score, then hypothesis, then label
        closed_scores = sorted((h.score for h in ended.values()), reverse=True)
        floor = closed_scores[k - 1] if len(closed_scores) >= k else -np.inf
        return [(flat[j], j // blank, j % blank) for j in best.tolist() if flat[j] > floor]

    def _extend(self, chosen: list[tuple[int, Hyp, int, float]], frames: list[int]) -> list[Hyp]:
        """Run the predictor once for every new label of every beam ((beam, parent, label, score) each)."""
        parents = [p for _, p, _, _ in chosen]
        labels = torch.tensor([w for _, _, w, _ in chosen], device=parents[0].pred_out.device)
        h = torch.stack([p.state[0] for p in parents], dim=1)
        c = torch.stack([p.state[1] for p in parents], dim=1)
        out, (h, c) = self.predictor.step(labels, (h, c))
        proj = self.joint.project_prediction(out)
        return [Hyp(Label(w, frames[b], p.last, p.last.depth + 1 if p.last else 1), hash((p.key, w)), score,
                    out[j], proj[j], (h[:, j], c[:, j]), self.lm.extend(p.lm_context, w) if self.lm else ())
                for j, (b, p, w, score) in enumerate(chosen)]


def rnnt_beam_offline(search: RnntBeamSearch, encoded: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Beam-search token ids of whole utterances (for tests and evaluation)."""
    out = []
    for i in range(encoded.shape[0]):
        hyps = search.advance(search.start_fresh(encoded.device), encoded[i, :int(lengths[i])], 0)
        out.append(list(search.best_final(hyps).tokens))
    return out
