"""Training losses for the hybrid model: RNNT (plain PyTorch) and CTC, as NeMo combines them.

The RNNT forward variable is computed one encoder frame at a time; within a frame the label
axis is a prefix sum, so each row is one `logcumsumexp`:
    alpha[t, u] = C[t, u] + logcumsumexp_{u' <= u}(alpha[t-1, u'] + blank[t-1, u'] - C[t, u'])
where C[t, u] is the log-probability of emitting labels 1..u at frame t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rnnt_loss(log_probs: torch.Tensor, targets: torch.Tensor, frame_lengths: torch.Tensor,
              target_lengths: torch.Tensor, blank: int) -> torch.Tensor:
    """Negative log-likelihood per utterance.

    log_probs [B, T, U+1, V+1] (log-softmax of the joint), targets [B, U] (padded anyhow),
    frame_lengths [B], target_lengths [B].  Returns [B].
    """
    b, t_max, u1, _ = log_probs.shape
    blank_lp = log_probs[..., blank]                                        # [B, T, U+1]
    tgt = targets[:, :u1 - 1].clamp(min=0)
    emit_lp = log_probs[:, :, :-1, :].gather(3, tgt[:, None, :, None].expand(b, t_max, u1 - 1, 1))[..., 0]
    u_idx = torch.arange(u1, device=log_probs.device)
    emit_lp = emit_lp.masked_fill(u_idx[None, None, :-1] >= target_lengths[:, None, None], 0.0)
    cum = F.pad(torch.cumsum(emit_lp, dim=2), (1, 0))                       # C[t, u], [B, T, U+1]
    neg_inf = torch.finfo(log_probs.dtype).min / 4
    alpha = cum[:, 0]                                                       # frame 0: emit only
    final = torch.zeros(b, dtype=log_probs.dtype, device=log_probs.device)
    last_u = target_lengths.clamp(max=u1 - 1)
    for t in range(t_max):
        if t > 0:
            prev = alpha + blank_lp[:, t - 1]
            alpha = cum[:, t] + torch.logcumsumexp(prev - cum[:, t], dim=1)
        # keep the terminal score of utterances whose last frame is t
        ends = frame_lengths - 1 == t
        if bool(ends.any()):
            term = alpha.gather(1, last_u[:, None])[:, 0] + blank_lp[:, t].gather(1, last_u[:, None])[:, 0]
            final = torch.where(ends, term, final)
        alpha = alpha.masked_fill(u_idx[None, :] > target_lengths[:, None], neg_inf)
    return -final


def ctc_loss(logits: torch.Tensor, targets: torch.Tensor, frame_lengths: torch.Tensor,
             target_lengths: torch.Tensor, blank: int) -> torch.Tensor:
    """Per-utterance CTC loss from logits [B, T, V+1]."""
    log_probs = logits.log_softmax(-1).transpose(0, 1)
    return F.ctc_loss(log_probs, targets, frame_lengths, target_lengths, blank=blank,
                      reduction="none", zero_infinity=True)


def hybrid_loss(model, mel: torch.Tensor, mel_lengths: torch.Tensor, targets: torch.Tensor,
                target_lengths: torch.Tensor, context: tuple[int, int], ctc_weight: float = 0.3
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """NeMo's hybrid objective: (1 - w) * RNNT + w * CTC, each averaged per target token.

    `model` is a FastConformerModel in training mode; `context` is the attention context drawn
    for this batch (NeMo draws one per forward for multi-lookahead training).  With ctc_weight 1
    the RNNT loss is not computed at all (a CTC-only phase costs no transducer lattice).
    """
    encoded, enc_lengths = model.encoder(mel, mel_lengths, context)
    blank = model.blank
    tokens = target_lengths.clamp(min=1).to(encoded.dtype)
    parts: dict[str, torch.Tensor] = {}
    if model.joint is not None and not (ctc_weight >= 1.0 and model.ctc_decoder is not None):
        pred = model.decoder(targets)
        logits = model.joint(model.joint.enc(encoded)[:, :, None], model.joint.pred(pred)[:, None])
        parts["rnnt"] = (rnnt_loss(logits.float().log_softmax(-1), targets, enc_lengths, target_lengths, blank)
                         / tokens).mean()
    if model.ctc_decoder is not None:
        parts["ctc"] = (ctc_loss(model.ctc_decoder(encoded).float(), targets, enc_lengths, target_lengths, blank)
                        / tokens).mean()
    if ctc_weight >= 1.0 and "ctc" in parts:
        loss = parts["ctc"]
    elif len(parts) == 2:
        loss = (1 - ctc_weight) * parts["rnnt"] + ctc_weight * parts["ctc"]
    else:
        loss = next(iter(parts.values()))
    return loss, {k: float(v.detach()) for k, v in parts.items()}
