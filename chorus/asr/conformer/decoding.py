"""Batched greedy decoding that carries over between chunks (CTC collapse, RNNT label loop)."""
from __future__ import annotations

import torch

from .heads import CTCHead, RNNTJoint, RNNTPredictor


def ctc_greedy(logits: torch.Tensor, lengths: torch.Tensor, last: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy CTC over a chunk, continuing from each stream's previous frame label.

    logits [B, T, V+1], lengths [B], last [B] (label of the frame before the chunk; blank at
    the start).  Returns (labels [B, T], keep mask [B, T] of emitted tokens, new last [B]).
    """
    blank = logits.shape[-1] - 1
    labels = logits.argmax(-1)
    valid = torch.arange(labels.shape[1], device=labels.device)[None, :] < lengths[:, None]
    labels = labels.masked_fill(~valid, blank)
    prev = torch.cat([last[:, None], labels[:, :-1]], dim=1)
    keep = valid & (labels != blank) & (labels != prev)
    last_idx = (lengths - 1).clamp(min=0)
    new_last = torch.where(lengths > 0, labels.gather(1, last_idx[:, None])[:, 0], last)
    return labels, keep, new_last


def rnnt_greedy(joint: RNNTJoint, predictor: RNNTPredictor, encoded: torch.Tensor, lengths: torch.Tensor,
                state: tuple[torch.Tensor, torch.Tensor], pred_out: torch.Tensor, max_symbols: int = 10):
    """Batched greedy RNNT (NeMo's frame loop): at most `max_symbols` labels per frame.

    encoded [B, T, d]; state (h, c) [layers, B, H] and pred_out [B, H] are the predictor's
    state and output after the last emitted label.  Returns (tokens [B, T, max_symbols] with
    -1 where nothing was emitted, new state, new pred_out).
    """
    b, t_len, _ = encoded.shape
    blank = predictor.blank
    f = joint.project_encoder(encoded)
    p = joint.project_prediction(pred_out)
    h, c = state
    in_place = predictor.emitting_kernel(h) is not None  # bf16 on CPU: one kernel call a label step, on copies
    if in_place:
        h, c, pred_out = (x.clone(memory_format=torch.contiguous_format) for x in (h, c, pred_out))
    tokens = torch.full((b, t_len, max_symbols), -1, dtype=torch.long, device=encoded.device)
    for t in range(t_len):
        active = t < lengths
        for s in range(max_symbols):
            if not bool(active.any()):
                break
            label = joint(f[:, t], p).argmax(-1)
            emit = active & (label != blank)
            if not bool(emit.any()):
                break
            tokens[:, t, s] = torch.where(emit, label, -1)
            if in_place:
                predictor.step_emitting(label, emit, h, c, pred_out)
                p = torch.where(emit[:, None], joint.project_prediction(pred_out), p)
            else:
                g_new, (h_new, c_new) = predictor.step(torch.where(emit, label, blank), (h, c))
                h = torch.where(emit[None, :, None], h_new, h)
                c = torch.where(emit[None, :, None], c_new, c)
                pred_out = torch.where(emit[:, None], g_new, pred_out)
                p = torch.where(emit[:, None], joint.project_prediction(g_new), p)
            active = emit
    return tokens, (h, c), pred_out


def ctc_offline(head: CTCHead, encoded: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Greedy CTC token ids of whole utterances (for tests and evaluation)."""
    last = torch.full((encoded.shape[0],), head.blank, dtype=torch.long, device=encoded.device)
    labels, keep, _ = ctc_greedy(head(encoded), lengths, last)
    return [labels[i][keep[i]].tolist() for i in range(labels.shape[0])]


def rnnt_offline(joint: RNNTJoint, predictor: RNNTPredictor, encoded: torch.Tensor, lengths: torch.Tensor,
                 max_symbols: int = 10) -> list[list[int]]:
    """Greedy RNNT token ids of whole utterances (for tests and evaluation)."""
    b = encoded.shape[0]
    state = predictor.initial_state(b, encoded.device, encoded.dtype)
    sos = torch.full((b,), predictor.blank, dtype=torch.long, device=encoded.device)
    pred_out, state = predictor.step(sos, state)
    tokens, _, _ = rnnt_greedy(joint, predictor, encoded, lengths, state, pred_out, max_symbols)
    return [row[row >= 0].tolist() for row in tokens.reshape(b, -1)]
