"""CosyVoice 2's flow streamed with cached state: each chunk computes only its new tokens and mel frames.

CosyVoice (`CosyVoice2Model.tts`, stream=True) re-encodes every token so far and re-solves the ODE over the whole
mel for each chunk.  Its non-final chunks use the chunk-causal masks (25 tokens in the encoder, 50 frames in the
up-encoder and the estimator) and the chunks always end on those boundaries (the first hop is padded so that
prompt + hop is a multiple of 25, later hops are 50 and 100), so what an earlier chunk computed never changes.
`FlowStreamer` therefore keeps, per stream:

* in its `SlotPool` slot: the projected speaker embedding, the pre-lookahead layer's last two conv1 outputs, the
  upsampler's last four rows, and for each of the 10 Euler steps and both halves of the CFG pair the left
  context (2 frames) of every causal convolution of the estimator;
* in three `SlotKV`s (`kv.py`), contiguous per slot and written in place: the encoder's per-layer K/V over tokens,
  the up-encoder's over mel frames, and the estimator's per (ODE step, layer) over mel frames for both CFG halves.
  Attention reads a stream's keys as a view of its slot; nothing is gathered per layer and no mask covers the cached
  keys (every new position sees all of them; only the chunk's own keys need one, made once per step), so what a
  chunk costs beyond its own positions is only the attention dot products over the keys it sees.

Left context: CosyVoice 2 attends to every earlier chunk (`num_decoding_left_chunks: -1`), so those dot products
grow with the utterance.  `open(..., left_chunks=L)` bounds them (wenet's `num_left_chunks` arithmetic: a chunk
sees the L chunks before it; CosyVoice's own masks ignore that setting): the stream's K/V live in a ring of half
the slot's rows, its cost per chunk and its state stay flat, and it may run to CosyVoice's 300 s of noise.  The
model was trained with the full left context, so this is not CosyVoice's output: off by default.

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
    # left_chunks=2: a bounded left context
    # mels: the mel chunks [1, 80, T_i] on CosyVoice's hop schedule, the last one per `final`

`reference.py` has CosyVoice's own recompute schedule over the same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...cache import SlotPool
from ...cache.spec import StateSpec, TensorSpec
from .flow import CosyVoiceFlow, ConvStates
from .kv import ChunkKV, SlotKV

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
    """One stream's handle on the streamer's state: its slot, its left context and its position."""

    def __init__(self, slot: int, prompt_feat: Tensor, left_chunks: int | None):
        self.slot = slot
        self.prompt_feat = prompt_feat  # [F, 80]: the cond of the first F frames
        self.left_chunks = left_chunks  # None: every earlier chunk (CosyVoice 2's); L: only the L chunks before
        self.tokens_done = 0             # tokens encoded, the prompt's included
        self.released = False


class FlowStreamer:
    """The flow's cached streaming runtime for up to `slots` streams of at most `max_frames` mel frames each (a
    stream with a bounded left context holds at most half of that, however long it runs)."""

    def __init__(self, flow: CosyVoiceFlow, slots: int = 4, max_frames: int = 1500,
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
        tok_rows, frame_rows = self.rows(flow, max_frames)
        heads = enc.attention_heads
        self.enc_kv = SlotKV(f"{name}-encoder", layers=enc.num_blocks, slots=slots, pair=1, heads=heads,
                             head_dim=d // heads, rows=tok_rows, device=self.device)
        self.up_kv = SlotKV(f"{name}-up-encoder", layers=enc.num_up_blocks, slots=slots, pair=1, heads=heads,
                            head_dim=d // heads, rows=frame_rows, device=self.device)
        ecfg = est.cfg
        self.est_kv = SlotKV(f"{name}-estimator", layers=steps * self.attn_layers, slots=slots, pair=2,
                             heads=ecfg.num_heads, head_dim=ecfg.attention_head_dim, rows=frame_rows,
                             device=self.device)
        self.max_keys: dict[str, int] = {}  # the most keys one query attended to in the last step, per stack

    @staticmethod
    def rows(flow: CosyVoiceFlow, max_frames: int) -> tuple[int, int]:
        """K/V rows per slot: tokens and mel frames for `max_frames`, rounded up to whole chunks."""
        enc = flow.cfg.encoder
        tok, frame = enc.static_chunk_size, enc.static_chunk_size * flow.cfg.token_mel_ratio
        tokens = -(-max_frames // flow.cfg.token_mel_ratio)
        return -(-tokens // tok) * tok, -(-max_frames // frame) * frame

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes + self.enc_kv.nbytes + self.up_kv.nbytes + self.est_kv.nbytes

    @staticmethod
    def bytes_per_slot(flow: CosyVoiceFlow, max_frames: int) -> int:
        """What one slot holds (fp32): dominated by the estimator's K/V, 10 steps x 2 (CFG) x 56 layers x
        (K + V) per mel frame at CosyVoice 2's size (4.6 MB a frame, 230 MB a second)."""
        cfg, est = flow.cfg, flow.decoder.estimator
        enc, e = cfg.encoder, est.cfg
        tokens, frames = FlowStreamer.rows(flow, max_frames)
        kv = 2 * 4 * (enc.num_blocks * tokens * enc.output_size + enc.num_up_blocks * frames * enc.output_size
                      + 2 * cfg.n_timesteps * est.attention_layers * frames * e.num_heads * e.attention_head_dim)
        convs = sum(cfg.n_timesteps * 2 * c * 2 for c in est.conv_channels())
        return kv + 4 * (cfg.output_size + 6 * enc.output_size + convs)

    def max_left_chunks(self, prompt_len: int = 0) -> int:
        """The largest bounded left context (in chunks of 25 tokens) a stream with this prompt can have here: the
        chunks it sees and its widest chunk (the first: prompt + padding + 25 tokens, or 100, and the lookahead of
        a final one) must fit in half the slot's rows; -1 when none fits."""
        look = self.cfg.pre_lookahead_len
        pad = -(-prompt_len // self.chunk) * self.chunk - prompt_len
        widest = max(prompt_len + pad + TOKEN_HOP_LEN, TOKEN_MAX_HOP_LEN) + look - 1
        ratio = self.cfg.token_mel_ratio
        by_tokens = (self.enc_kv.ring() - widest) // self.chunk
        by_frames = (self.up_kv.ring() - ratio * widest) // (ratio * self.chunk)
        return max(-1, min(by_tokens, by_frames))

    def max_stream_frames(self, state: FlowState) -> int:
        """How many mel frames a stream may reach: the slot's rows, or CosyVoice's noise when its context is bounded."""
        return self.max_frames if state.left_chunks is None else self.cfg.noise_frames

    # -- lifetime --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def open(self, embedding: Tensor, prompt_feat: Tensor | None = None, left_chunks: int | None = None) -> FlowState:
        """embedding `[spk_embed_dim]` (CosyVoice's flow_embedding); prompt_feat `[F, 80]` or None; left_chunks:
        None (every earlier chunk, CosyVoice 2's) or how many chunks before its own each chunk attends to."""
        if left_chunks is not None and not 0 <= left_chunks:
            raise ValueError(f"left_chunks must be None or >= 0, got {left_chunks}")
        slot = self.pool.acquire()
        spks = self.flow.speaker(embedding.reshape(1, -1).to(self.device, torch.float32))
        self.pool.write(self.pool.index([slot]), {"spks": spks})
        feat = torch.zeros(0, self.cfg.output_size) if prompt_feat is None else prompt_feat
        return FlowState(slot, feat.to(self.device, torch.float32), left_chunks)

    def release(self, state: FlowState) -> None:
        if state.released:
            return
        state.released = True
        self.pool.release(state.slot)

    # -- the batched step ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, states: list[FlowState], chunks: list[FlowChunk]) -> list[Tensor]:
        """Advance each stream by its chunk, all in one batch; returns each stream's new mel `[1, 80, frames]`
        (frames under the prompt's mel left out), by index."""
        flow, cfg, dev = self.flow, self.cfg, self.device
        ratio, look = cfg.token_mel_ratio, cfg.pre_lookahead_len
        n_b = len(states)
        if n_b == 0:
            return []
        counts_l = [len(c.tokens) for c in chunks]
        t0_l = [s.tokens_done for s in states]
        if min(counts_l) < 1:
            raise ValueError("a flow chunk needs at least one token")
        for s, t, n in zip(states, t0_l, counts_l):
            if (t + n) * ratio > self.max_stream_frames(s):
                raise ValueError(f"a stream would pass {self.max_stream_frames(s)} mel frames (this engine's limit "
                                 f"per stream)")
        width = max(counts_l)
        tok = torch.zeros(n_b, width + look, dtype=torch.long)
        valid = torch.zeros(n_b, width + look, dtype=torch.bool)
        for b, c in enumerate(chunks):
            seq = c.tokens + ([] if c.final else c.lookahead)
            if not c.final and len(c.lookahead) != look:
                raise ValueError(f"a non-final chunk needs {look} lookahead tokens")
            tok[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            valid[b, :len(seq)] = True
        tok, valid = tok.to(dev), valid.to(dev)
        slots, lefts = [s.slot for s in states], [s.left_chunks for s in states]
        f0_l, fcounts_l = [t * ratio for t in t0_l], [n * ratio for n in counts_l]
        est = flow.decoder.estimator
        # where every stack's new K/V go and what each chunk of new positions attends to (checked before any write)
        enc_kv = ChunkKV(self.enc_kv, slots, t0_l, counts_l, self.chunk, lefts)
        up_kv = ChunkKV(self.up_kv, slots, f0_l, fcounts_l, self.chunk * ratio, lefts)
        est_kv = ChunkKV(self.est_kv, slots, f0_l, fcounts_l, est.cfg.static_chunk_size, lefts)
        self.max_keys = {"encoder": enc_kv.max_keys, "up-encoder": up_kv.max_keys, "estimator": est_kv.max_keys}
        counts = torch.tensor(counts_l, dtype=torch.long, device=dev)
        idx = self.pool.index(slots)
        state = self.pool.read(idx)
        enc = flow.encoder

        # encoder over the new tokens (the lookahead only feeds the pre-lookahead convolution)
        x = enc.embed(flow.input_embedding(tok.clamp(min=0))) * valid[..., None]
        h, state["look_tail"] = enc.pre_lookahead_layer.stream(x, counts, state["look_tail"])
        for i, layer in enumerate(enc.encoders):
            h = layer.stream(h, enc_kv.layer(i))
        u, state["up_tail"] = enc.up_layer.stream(h, counts, state["up_tail"])
        u = enc.up_embed(u)
        for i, layer in enumerate(enc.up_encoders):
            u = layer.stream(u, up_kv.layer(i))
        mu = flow.encoder_proj(enc.after_norm(u)).transpose(1, 2)  # [B, 80, W']

        # the ODE over the new frames, the CFG pair as one batch of 2B, each stream's halves side by side
        frames = width * ratio
        cond = torch.zeros_like(mu)
        noise = torch.zeros_like(mu)
        for b, s in enumerate(states):
            start = f0_l[b]
            have = max(0, min(frames, cfg.noise_frames - start))
            noise[b, :, :have] = flow.rand_noise[0, :, start:start + have]
            p = s.prompt_feat
            if start < p.shape[0]:
                n = min(p.shape[0] - start, frames)
                cond[b, :, :n] = p[start:start + n].T

        def pair(a: Tensor, b: Tensor) -> Tensor:
            return torch.stack([a, b], dim=1).flatten(0, 1)

        zeros = torch.zeros_like(mu)
        mu2, cond2 = pair(mu, zeros), pair(cond, zeros)
        spks2 = pair(state["spks"], torch.zeros_like(state["spks"]))
        counts2 = (counts * ratio).repeat_interleave(2)
        r = cfg.inference_cfg_rate
        xt = noise
        convs = [state[f"conv{i}"] for i in range(len(self.conv_channels))]  # [B, steps, 2, C, 2]
        for k, (t, dt) in enumerate(flow.schedule):
            st = ConvStates([c[:, k].reshape(2 * n_b, *c.shape[3:]) for c in convs], counts2)
            layers = (est_kv.layer(k * self.attn_layers + j) for j in range(self.attn_layers))
            v = est.stream(xt.repeat_interleave(2, dim=0), mu2, t.to(mu).expand(2 * n_b), spks2, cond2, layers, st)
            for c, new in zip(convs, st.states):
                c[:, k] = new.view(n_b, 2, *new.shape[1:])
            v = v.view(n_b, 2, *v.shape[1:])
            xt = xt + dt.to(mu) * ((1.0 + r) * v[:, 0] - r * v[:, 1])  # CosyVoice's CFG: cond and uncond halves
        self.pool.write(idx, state)

        out = []
        for b, s in enumerate(states):
            start = max(0, s.prompt_feat.shape[0] - f0_l[b])
            out.append(xt[b:b + 1, :, start:fcounts_l[b]].float())
            s.tokens_done += counts_l[b]
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
                     prompt_feat: Tensor | None = None, final: str = FINAL_EXACT,
                     left_chunks: int | None = None) -> list[Tensor]:
    """One utterance through the cached streamer on CosyVoice's hop schedule; the mel chunks in order."""
    if final not in FINAL_MODES:
        raise ValueError(f"final must be one of {FINAL_MODES}")
    plan = plan_utterance(list(tokens), list(prompt_token), streamer.cfg.pre_lookahead_len)
    state = streamer.open(embedding, prompt_feat, left_chunks)
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
