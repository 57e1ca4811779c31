"""CosyVoice's own recompute schedule over chorus's flow: the reference the cached streamer is tested against.

`recompute_stream` is the flow half of CosyVoice2Model.tts(stream=True) and token2wav, call for call: each
non-final chunk runs `flow.inference` over the prompt and every token so far plus the lookahead
(streaming=True, finalize=False: chunk-causal masks) and keeps the mel from `token_offset`; the final call runs
with streaming=False (full attention over everything).  `final="flat"` instead runs the final call with
streaming=True, finalize=True (chunk-causal to the end), which is what the cached flat mode must equal.  `left_chunks`
runs every streaming call with that bounded left context (wenet's `num_left_chunks` masks; CosyVoice's own masks
ignore it): what the cached streamer's bounded option must equal.  Each chunk's cost grows with the utterance: this is the schedule chorus avoids, kept for tests and benches.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .flow import CosyVoiceFlow
from .streaming import FINAL_EXACT, FINAL_FLAT, FINAL_MODES, HopSchedule


@torch.inference_mode()
def recompute_stream(flow: CosyVoiceFlow, tokens: list[int], embedding: Tensor, prompt_token=(),
                     prompt_feat: Tensor | None = None, final: str = FINAL_EXACT,
                     left_chunks: int | None = None) -> list[Tensor]:
    if final not in FINAL_MODES:
        raise ValueError(f"final must be one of {FINAL_MODES}")
    look = flow.cfg.pre_lookahead_len
    ratio = flow.cfg.token_mel_ratio
    feat = (torch.zeros(0, flow.cfg.output_size) if prompt_feat is None else prompt_feat)[None].float()
    ptok = torch.tensor([list(prompt_token)], dtype=torch.long).reshape(1, -1)
    emb = embedding.reshape(1, -1).float()
    hops = HopSchedule(len(prompt_token), look)
    mels = []
    while hops.ready(len(tokens)):
        offset = hops.offset
        _, end = hops.advance()
        mel = flow.inference(torch.tensor([list(tokens[:end + look])]), ptok, feat, emb, streaming=True,
                             finalize=False, left_chunks=left_chunks)
        mels.append(mel[:, :, offset * ratio:])
    mel = flow.inference(torch.tensor([list(tokens)]), ptok, feat, emb, streaming=final == FINAL_FLAT,
                         finalize=True, left_chunks=left_chunks)
    mels.append(mel[:, :, hops.offset * ratio:])
    return mels


@torch.inference_mode()
def non_streaming(flow: CosyVoiceFlow, tokens: list[int], embedding: Tensor, prompt_token=(),
                  prompt_feat: Tensor | None = None) -> Tensor:
    """CosyVoice2Model.tts(stream=False)'s flow: one finalize call with full attention."""
    feat = (torch.zeros(0, flow.cfg.output_size) if prompt_feat is None else prompt_feat)[None].float()
    return flow.inference(torch.tensor([list(tokens)]), torch.tensor([list(prompt_token)], dtype=torch.long).reshape(1, -1),
                          feat, embedding.reshape(1, -1).float(), streaming=False, finalize=True)
