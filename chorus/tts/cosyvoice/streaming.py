"""CosyVoice 2's flow streamed with cached state: each chunk computes only its new tokens and mel frames.

CosyVoice (`CosyVoice2Model.tts`, stream=True) re-encodes every token so far and re-solves the ODE over the whole
mel for each chunk.  Its non-final chunks use the chunk-causal masks (25 tokens in the encoder, 50 frames in the
up-encoder and the estimator) and the chunks always end on those boundaries (the first hop is padded so that
prompt + hop is a multiple of 25, later hops are 50 and 100), so what an earlier chunk computed never changes.
`FlowStreamer` therefore keeps, per stream:

* in its `SlotPool` slot: the projected speaker embedding, the pre-lookahead layer's last two conv1 outputs, the
  upsampler's last four rows, and for each of the 10 Euler steps and both halves of the CFG pair the left
  context (2 frames) of every causal convolution of the estimator;
* in three `PagedKVCache`s: the encoder's per-layer K/V over tokens, the up-encoder's over mel frames, and the
  estimator's per (ODE step, layer) over mel frames, two page-table entries per stream (the CFG pair).

A step batches any number of streams (each its own number of new tokens, positions and lookahead; a final chunk
has zeros after its end, as CosyVoice's `finalize`), the CFG pair included, and writes the state back in place.

Final chunk: CosyVoice's last call runs the flow with `streaming=False`, full attention over everything, and so
changes the whole mel (only its new frames are used).  `FINAL_EXACT` does that pass (`CosyVoiceFlow.inference`,
one utterance at a time: its cost grows with the utterance, as CosyVoice's); `FINAL_FLAT` keeps the chunk-causal
masks to the end and computes only the last chunk from the cache.

A simple API for benches (what `bench/cosyvoice_*.py` drive):

    flow = load_flow(dir / "flow.pt", config)
    streamer = FlowStreamer(flow, slots=1, max_frames=3000)
    mels = stream_utterance(streamer, tokens, embedding, prompt_token, prompt_feat, final="exact")
    # mels: the mel chunks [1, 80, T_i] on CosyVoice's hop schedule, the last one per `final`

`reference.py` has CosyVoice's own recompute schedule over the same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...cache import PagedKVCache, SlotPool
from ...cache.spec import StateSpec, TensorSpec
from .flow import CosyVoiceFlow, ConvStates, EstimatorKV, StepKV

FINAL_EXACT = "exact"
FINAL_FLAT = "flat"
FINAL_MODES = (FINAL_EXACT, FINAL_FLAT)

TOKEN_HOP_LEN = 25        # CosyVoice2Model.token_hop_len ("must match training static_chunk_size")
TOKEN_MAX_HOP_LEN = 100   # 4 x token_hop_len
STREAM_SCALE_FACTOR = 2


class HopSchedule:
    """One stream's hop schedule (CosyVoice2Model.tts with stream=True): the first hop is `hop + prompt_token_pad`
    tokens, then the hop doubles up to 100.  CosyVoice keeps the hop on the model object, shared by every session
    and never reset (a second utterance starts at 100); here each stream starts at 25."""

    def __init__(self, prompt_len: int, lookahead: int, hop: int = TOKEN_HOP_LEN, max_hop: int = TOKEN_MAX_HOP_LEN,
                 scale: int = STREAM_SCALE_FACTOR):
        self.lookahead = lookahead
        self.hop, self.max_hop, self.scale = hop, max_hop, scale
        self.prompt_pad = int(math.ceil(prompt_len / hop) * hop - prompt_len)
        self.offset = 0  # speech tokens already turned into mel

    def this_hop(self) -> int:
        return self.hop + self.prompt_pad if self.offset == 0 else self.hop

    def ready(self, available: int) -> bool:
        """Whether a non-final chunk can be made from `available` speech tokens."""
        return available - self.offset >= self.this_hop() + self.lookahead

    def advance(self) -> tuple[int, int]:
        """The next non-final chunk's token span [start, end) (its lookahead follows it); the hop grows."""
        start, end = self.offset, self.offset + self.this_hop()
        self.offset = end
        self.hop = min(self.max_hop, self.hop * self.scale)
        return start, end


@dataclass
class FlowChunk:
    """One stream's work for a step: `tokens` to encode (the prompt's in front on the first chunk), the
    `lookahead` tokens after them (empty on the final chunk: zeros, as CosyVoice's finalize)."""

    tokens: list[int]
    lookahead: list[int] = field(default_factory=list)
    final: bool = False


class FlowState:
    """One stream's handle on the streamer's state: its slot, page-table entries and positions."""

    def __init__(self, slot: int, enc_sid: int, up_sid: int, est_sids: tuple[int, int], prompt_feat: Tensor):
        self.slot, self.enc_sid, self.up_sid, self.est_sids = slot, enc_sid, up_sid, est_sids
        self.prompt_feat = prompt_feat  # [F, 80]: the cond of the first F frames
        self.tokens_done = 0             # tokens encoded, the prompt's included
        self.released = False


class FlowStreamer:
    """The flow's cached streaming runtime for up to `slots` streams of at most `max_frames` mel frames each."""

    def __init__(self, flow: CosyVoiceFlow, slots: int = 4, max_frames: int = 1500, page_frames: int = 50,
                 device: str | torch.device = "cpu", name: str = "cosyvoice"):
        cfg = flow.cfg
        if max_frames > cfg.noise_frames:
            raise ValueError(f"max_frames {max_frames}: CosyVoice's fixed noise covers {cfg.noise_frames} frames")
        self.flow, self.cfg = flow, cfg
        self.device = torch.device(device)
        enc, est = cfg.encoder, flow.decoder.estimator
        self.chunk = enc.static_chunk_size
        self.max_frames = max_frames
        self.conv_channels = est.conv_channels()
        self.attn_layers = est.attention_layers
        d, steps = enc.output_size, cfg.n_timesteps
        spec = {"spks": TensorSpec((cfg.output_size,)), "look_tail": TensorSpec((2, d)), "up_tail": TensorSpec((4, d))}
        for i, c in enumerate(self.conv_channels):
            spec[f"conv{i}"] = TensorSpec((steps, 2, c, 2))
        self.pool = SlotPool(f"{name}-flow", StateSpec(**spec), slots=slots, device=self.device)
        max_tokens = -(-max_frames // cfg.token_mel_ratio)
        tok_page = enc.static_chunk_size
        self.enc_kv = PagedKVCache(f"{name}-encoder", layers=enc.num_blocks, heads=enc.attention_heads,
                                   head_dim=d // enc.attention_heads, page_size=tok_page,
                                   pages=slots * -(-max_tokens // tok_page), max_streams=slots,
                                   max_tokens_per_stream=max_tokens, device=self.device)
        self.up_kv = PagedKVCache(f"{name}-up-encoder", layers=enc.num_up_blocks, heads=enc.attention_heads,
                                  head_dim=d // enc.attention_heads, page_size=page_frames,
                                  pages=slots * -(-max_frames // page_frames), max_streams=slots,
                                  max_tokens_per_stream=max_frames, device=self.device)
        ecfg = est.cfg
        self.est_kv = PagedKVCache(f"{name}-estimator", layers=steps * self.attn_layers, heads=ecfg.num_heads,
                                   head_dim=ecfg.attention_head_dim, page_size=page_frames,
                                   pages=2 * slots * -(-max_frames // page_frames), max_streams=2 * slots,
                                   max_tokens_per_stream=max_frames, device=self.device)

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes + self.enc_kv.nbytes + self.up_kv.nbytes + self.est_kv.nbytes

    @staticmethod
    def bytes_per_slot(flow: CosyVoiceFlow, max_frames: int, page_frames: int = 50) -> int:
        """What one slot holds at most (fp32): dominated by the estimator's K/V, 10 steps x 2 (CFG) x 56 layers x
        (K + V) per mel frame at CosyVoice 2's size (4.6 MB a frame, 230 MB a second)."""
        cfg, est = flow.cfg, flow.decoder.estimator
        enc, e = cfg.encoder, est.cfg
        frames = -(-max_frames // page_frames) * page_frames
        tokens = -(-(-(-max_frames // cfg.token_mel_ratio)) // enc.static_chunk_size) * enc.static_chunk_size
        kv = 2 * 4 * (enc.num_blocks * tokens * enc.output_size + enc.num_up_blocks * frames * enc.output_size
                      + 2 * cfg.n_timesteps * est.attention_layers * frames * e.num_heads * e.attention_head_dim)
        convs = sum(cfg.n_timesteps * 2 * c * 2 for c in est.conv_channels())
        return kv + 4 * (cfg.output_size + 6 * enc.output_size + convs)

    # -- lifetime --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def open(self, embedding: Tensor, prompt_feat: Tensor | None = None) -> FlowState:
        """embedding `[spk_embed_dim]` (CosyVoice's flow_embedding); prompt_feat `[F, 80]` or None."""
        slot = self.pool.acquire()
        opened = []
        try:
            enc_sid = self.enc_kv.open(); opened.append((self.enc_kv, enc_sid))
            up_sid = self.up_kv.open(); opened.append((self.up_kv, up_sid))
            a = self.est_kv.open(); opened.append((self.est_kv, a))
            b = self.est_kv.open(); opened.append((self.est_kv, b))
        except Exception:
            for cache, sid in opened:
                cache.close(sid)
            self.pool.release(slot)
            raise
        spks = self.flow.speaker(embedding.reshape(1, -1).to(self.device, torch.float32))
        self.pool.write(self.pool.index([slot]), {"spks": spks})
        feat = torch.zeros(0, self.cfg.output_size) if prompt_feat is None else prompt_feat
        return FlowState(slot, enc_sid, up_sid, (a, b), feat.to(self.device, torch.float32))

    def release(self, state: FlowState) -> None:
        if state.released:
            return
        state.released = True
        self.enc_kv.close(state.enc_sid)
        self.up_kv.close(state.up_sid)
        for sid in state.est_sids:
            self.est_kv.close(sid)
        self.pool.release(state.slot)

    # -- the batched step ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, states: list[FlowState], chunks: list[FlowChunk]) -> list[Tensor]:
        """Advance each stream by its chunk, all in one batch; returns each stream's new mel `[1, 80, frames]`
        (frames under the prompt's mel left out), by index."""
        flow, cfg, dev = self.flow, self.cfg, self.device
        ratio, look = cfg.token_mel_ratio, cfg.pre_lookahead_len
        n_b = len(states)
        counts = torch.tensor([len(c.tokens) for c in chunks], dtype=torch.long, device=dev)
        if n_b == 0:
            return []
        if int(counts.min()) < 1:
            raise ValueError("a flow chunk needs at least one token")
        t0 = torch.tensor([s.tokens_done for s in states], dtype=torch.long, device=dev)
        ends = (t0 + counts) * ratio
        if int(ends.max()) > self.max_frames:
            raise ValueError(f"a stream would pass {self.max_frames} mel frames (this engine's limit per stream)")
        width = int(counts.max())
        tok = torch.zeros(n_b, width + look, dtype=torch.long, device=dev)
        valid = torch.zeros(n_b, width + look, dtype=torch.bool, device=dev)
        for b, c in enumerate(chunks):
            seq = c.tokens + ([] if c.final else c.lookahead)
            if not c.final and len(c.lookahead) != look:
                raise ValueError(f"a non-final chunk needs {look} lookahead tokens")
            tok[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            valid[b, :len(seq)] = True
        idx = self.pool.index([s.slot for s in states])
        state = self.pool.read(idx)
        enc = flow.encoder

        # encoder over the new tokens (the lookahead only feeds the pre-lookahead convolution)
        x = enc.embed(flow.input_embedding(tok.clamp(min=0))) * valid[..., None]
        h, state["look_tail"] = enc.pre_lookahead_layer.stream(x, counts, state["look_tail"])
        pos = t0[:, None] + torch.arange(width, device=dev)
        kv = StepKV(self.enc_kv, torch.tensor([s.enc_sid for s in states], device=dev), counts, pos, self.chunk)
        for i, layer in enumerate(enc.encoders):
            h = layer.stream(h, pos, kv.layer(i))
        kv.commit()

        u, state["up_tail"] = enc.up_layer.stream(h, counts, state["up_tail"])
        u = enc.up_embed(u)
        fcounts, f0 = counts * ratio, t0 * ratio
        fpos = f0[:, None] + torch.arange(width * ratio, device=dev)
        kv = StepKV(self.up_kv, torch.tensor([s.up_sid for s in states], device=dev), fcounts, fpos,
                    self.chunk * ratio)
        for i, layer in enumerate(enc.up_encoders):
            u = layer.stream(u, fpos, kv.layer(i))
        kv.commit()
        mu = flow.encoder_proj(enc.after_norm(u)).transpose(1, 2)  # [B, 80, W']

        # the ODE over the new frames, the CFG pair as one batch of 2B
        frames = width * ratio
        cond = torch.zeros_like(mu)
        noise = torch.zeros_like(mu)
        for b, s in enumerate(states):
            start = int(f0[b])
            have = min(frames, cfg.noise_frames - start)
            noise[b, :, :have] = flow.rand_noise[0, :, start:start + have]
            p = s.prompt_feat
            if start < p.shape[0]:
                n = min(p.shape[0] - start, frames)
                cond[b, :, :n] = p[start:start + n].T
        est = flow.decoder.estimator
        sids2 = torch.tensor([s.est_sids[0] for s in states] + [s.est_sids[1] for s in states], device=dev)
        counts2 = torch.cat([fcounts, fcounts])
        pos2 = torch.cat([fpos, fpos])
        est_kv = StepKV(self.est_kv, sids2, counts2, pos2, est.cfg.static_chunk_size)
        zeros = torch.zeros_like(mu)
        mu2, cond2 = torch.cat([mu, zeros]), torch.cat([cond, zeros])
        spks2 = torch.cat([state["spks"], torch.zeros_like(state["spks"])])
        xt = noise
        convs = [state[f"conv{i}"] for i in range(len(self.conv_channels))]
        for k, (t, dt) in enumerate(flow.schedule):
            st = ConvStates([torch.cat([c[:, k, 0], c[:, k, 1]]) for c in convs], counts2)
            kv = EstimatorKV(est_kv, k * self.attn_layers)
            v = est.stream(torch.cat([xt, xt]), mu2, t.to(mu).expand(2 * n_b), spks2, cond2, pos2, kv, st)
            for c, new in zip(convs, st.states):
                c[:, k, 0], c[:, k, 1] = new[:n_b], new[n_b:]
            xt = xt + dt.to(mu) * flow.cfg_velocity(v)
        est_kv.commit()
        self.pool.write(idx, state)

        out = []
        for b, s in enumerate(states):
            start = max(0, s.prompt_feat.shape[0] - int(f0[b]))
            out.append(xt[b:b + 1, :, start:int(fcounts[b])].float())
            s.tokens_done += len(chunks[b].tokens)
        return out


@dataclass
class UtteranceChunks:
    """A whole utterance's chunks on the hop schedule: (chunk, is_final) pairs, for tests and benches."""

    chunks: list[FlowChunk]
    offsets: list[int]  # speech-token offset of each chunk


def plan_utterance(tokens: list[int], prompt_token: list[int], lookahead: int) -> UtteranceChunks:
    """CosyVoice's chunks for an utterance whose tokens are all known: non-final chunks while the hop and its
    lookahead fit, then the final chunk with the rest."""
    hops = HopSchedule(len(prompt_token), lookahead)
    chunks, offsets = [], []
    while hops.ready(len(tokens)):
        start, end = hops.advance()
        head = list(prompt_token) if start == 0 else []
        chunks.append(FlowChunk(head + tokens[start:end], tokens[end:end + lookahead]))
        offsets.append(start)
    head = list(prompt_token) if hops.offset == 0 else []
    chunks.append(FlowChunk(head + tokens[hops.offset:], [], final=True))
    offsets.append(hops.offset)
    return UtteranceChunks(chunks, offsets)


@torch.inference_mode()
def exact_final(flow: CosyVoiceFlow, tokens: list[int], offset: int, embedding: Tensor,
                prompt_token: list[int], prompt_feat: Tensor | None) -> Tensor:
    """CosyVoice's final call: the whole utterance with full attention, its frames from `offset` tokens on."""
    feat = torch.zeros(0, flow.cfg.output_size) if prompt_feat is None else prompt_feat
    mel = flow.inference(torch.tensor([tokens]), torch.tensor([list(prompt_token)], dtype=torch.long).reshape(1, -1),
                         feat[None].float(), embedding.reshape(1, -1).float(), streaming=False, finalize=True)
    return mel[:, :, offset * flow.cfg.token_mel_ratio:]


def stream_utterance(streamer: FlowStreamer, tokens: list[int], embedding: Tensor, prompt_token=(),
                     prompt_feat: Tensor | None = None, final: str = FINAL_EXACT) -> list[Tensor]:
    """One utterance through the cached streamer on CosyVoice's hop schedule; the mel chunks in order."""
    if final not in FINAL_MODES:
        raise ValueError(f"final must be one of {FINAL_MODES}")
    plan = plan_utterance(list(tokens), list(prompt_token), streamer.cfg.pre_lookahead_len)
    state = streamer.open(embedding, prompt_feat)
    try:
        mels = [streamer.step([state], [c])[0] for c in plan.chunks[:-1]]
        if final == FINAL_FLAT:
            mels += streamer.step([state], [plan.chunks[-1]])
        else:
            mels.append(exact_final(streamer.flow, list(tokens), plan.offsets[-1], embedding, prompt_token,
                                    prompt_feat))
    finally:
        streamer.release(state)
    return mels
