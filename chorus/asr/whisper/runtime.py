"""Whisper's batched streaming step over the shared state runtime (chorus/cache).

Per stream, in the engine's runtime:
* a `SlotPool` slot (fixed size): the current window's raw log-mel (`mel`, `[n_mels, 3000]`, used by
  `window` mode) and the two mel frames before the next causal block (`mel_tail`);
* three `PagedKVCache`s (state that grows): the causal encoder's per-layer K/V (up to 1500 frames,
  `causal` mode), the decoder's cross-attention K/V (one row per encoder frame of the window:
  extended by each new causal block, rewritten when a window is re-encoded) and the decoder's
  self-attention K/V (the prompt and the window's tokens).

A batch's streams may be at different positions and have different block lengths (the first and
last blocks differ): rows are padded, each stream has its own positions, and masks keep every
stream to its own frames and tokens, so a stream stepped in a batch gets what it gets alone (law 2).

`encode_causal` is `streaming.encode_block` for a batch at any positions; `encode_window` is the
full-attention encoder over each stream's window (not padded to 30 s); `decode_step` runs the
decoder over each stream's prompt and tokens, checks the revisable tail and decodes on greedily,
all streams of the batch together (those that have stopped are masked).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...cache import PagedKVCache, SlotPool, StateSpec, TensorSpec
from ...cache.quantized import QuantizedPagedKVCache
from .frontend import FLOOR, normalise
from .model import N_FRAMES, Whisper


def whisper_state_spec(n_mels: int) -> StateSpec:
    return StateSpec(mel=TensorSpec((n_mels, N_FRAMES), torch.float32, FLOOR),
                     mel_tail=TensorSpec((n_mels, 2), torch.float32, 0.0))


class WhisperRuntime:
    """The slot pool and paged caches of one engine (every stream: one slot, one entry per cache)."""

    def __init__(self, model: Whisper, slots: int, name: str, page_size: int = 16, kv_dtype: str = "auto"):
        """`kv_dtype` "int8": the three K/V caches in int8 (`QuantizedPagedKVCache`: keys per channel per page,
        values per token and head), dequantized to the compute dtype on read; "auto": in the compute dtype."""
        d = model.dims
        p = next(model.parameters())
        self.model, self.device, self.dtype = model, p.device, p.dtype
        self.kv_dtype = kv_dtype
        self.pool = SlotPool(name, whisper_state_spec(d.n_mels), slots=slots, device=self.device)
        enc_hd, dec_hd = d.n_audio_state // d.n_audio_head, d.n_text_state // d.n_text_head
        frames = d.n_audio_ctx
        PagedKV = {"auto": PagedKVCache, "int8": QuantizedPagedKVCache}[kv_dtype]
        self.enc = PagedKV(f"{name}-encoder", layers=d.n_audio_layer, heads=d.n_audio_head, head_dim=enc_hd,
                                page_size=page_size, pages=slots * -(-frames // page_size), max_streams=slots,
                                max_tokens_per_stream=frames, dtype=self.dtype, device=self.device)
        self.cross = PagedKV(f"{name}-cross", layers=d.n_text_layer, heads=d.n_text_head, head_dim=dec_hd,
                                  page_size=page_size, pages=slots * -(-frames // page_size), max_streams=slots,
                                  max_tokens_per_stream=frames, dtype=self.dtype, device=self.device)
        self.self_kv = PagedKV(f"{name}-decoder", layers=d.n_text_layer, heads=d.n_text_head, head_dim=dec_hd,
                                    page_size=page_size, pages=slots * -(-d.n_text_ctx // page_size),
                                    max_streams=slots, max_tokens_per_stream=d.n_text_ctx, dtype=self.dtype,
                                    device=self.device)

    def open(self) -> tuple[int, int, int, int]:
        slot = self.pool.acquire()
        ids = []
        try:
            for cache in (self.enc, self.cross, self.self_kv):
                ids.append(cache.open())
        except Exception:
            for cache, sid in zip((self.enc, self.cross, self.self_kv), ids):
                cache.close(sid)
            self.pool.release(slot)
            raise
        return (slot, *ids)

    def close(self, handles: tuple[int, int, int, int]) -> None:
        slot, e, c, s = handles
        self.enc.close(e)
        self.cross.close(c)
        self.self_kv.close(s)
        self.pool.release(slot)

    def reset_window(self, handles) -> None:
        """A new window: no encoder frames, no cross K/V, a fresh mel window and tail."""
        slot, e, c, _ = handles
        self.enc.truncate(e, 0)
        self.cross.truncate(c, 0)
        self.pool.reset([slot])


def _heads(x: Tensor, h: int) -> Tensor:
    return x.view(x.shape[0], x.shape[1], h, -1)


def _attend(attn, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """`attn.attend` with a `[B, Tq, Tk]` boolean mask (True = may attend)."""
    return attn.attend(q, k.flatten(2), v.flatten(2), mask[:, None])


def _stem(encoder, mel: Tensor, first: Tensor, valid: Tensor, n_out: int) -> Tensor:
    """The conv stem for a batch: `mel` `[B, n_mels, 2 + 2n + 1]` (two frames of left context, then the
    block's), `first[b]`: the block starts the window (conv2's left padding), `valid[b]`: the block's
    real mel frames (later ones are padding: conv1 outputs past them are conv2's zero padding)."""
    h = F.gelu(F.conv1d(mel, encoder.conv1.weight, encoder.conv1.bias))  # conv1 outputs 2t0-1 .. 2t1-1
    pos = torch.arange(h.shape[-1], device=h.device)
    keep = (pos[None] <= valid[:, None]) & ~((pos[None] == 0) & first[:, None])
    h = h * keep[:, None].to(h.dtype)
    h = F.gelu(F.conv1d(h, encoder.conv2.weight, encoder.conv2.bias, stride=2))
    return h.permute(0, 2, 1)[:, :n_out]


@torch.no_grad()
def encode_causal(rt: WhisperRuntime, handles: list, mel: list[Tensor], n_frames: list[int],
                  mel_valid: list[int]) -> list[Tensor]:
    """One causal block per stream (`encode_block` for a batch at any positions): `mel[b]` holds
    mel frames 2t0 .. 2(t0 + n_b) (`2 n_b + 1`, the last `2 n_b + 1 - mel_valid[b]` padding);
    returns each stream's `[n_b, D]` encoder frames and extends its encoder and cross K/V."""
    enc = rt.model.encoder
    b = len(handles)
    nmax = max(n_frames)
    slots = rt.pool.index([h[0] for h in handles])
    esid = torch.tensor([h[1] for h in handles])
    csid = torch.tensor([h[2] for h in handles])
    counts = torch.tensor(n_frames)
    t0 = rt.enc.lengths[esid].clone()
    tail = rt.pool.read(slots, ["mel_tail"])["mel_tail"].to(rt.dtype)
    x = torch.zeros(b, tail.shape[1], 2 * nmax + 1, dtype=rt.dtype, device=rt.device)
    for i, m in enumerate(mel):
        x[i, :, :m.shape[-1]] = m.to(rt.dtype)
        x[i, :, mel_valid[i]:] = 0
    stem_in = torch.cat([tail, x], dim=-1)
    h = _stem(enc, stem_in, t0 == 0, torch.tensor(mel_valid), nmax)
    pos = (t0[:, None] + torch.arange(nmax)).clamp(max=enc.positional_embedding.shape[0] - 1)
    h = (h + enc.positional_embedding[pos]).to(rt.dtype)
    new = torch.arange(nmax)[None] < counts[:, None]          # [B, nmax] real frames of the block
    rows = rt.enc.reserve(esid, counts)
    heads = enc.blocks[0].attn.n_head
    for layer, block in enumerate(enc.blocks):
        hn = block.attn_ln(h)
        k, v = block.attn.kv(hn)
        pk, pv, pmask = rt.enc.gather(layer, esid)
        keys_k = torch.cat([pk, _heads(k, heads)], dim=1)
        keys_v = torch.cat([pv, _heads(v, heads)], dim=1)
        kmask = torch.cat([pmask, new], dim=1)[:, None, :] | ~new[:, :, None]  # padded rows see all (no NaN)
        h = h + _attend(block.attn, block.attn.query(hn), keys_k, keys_v, kmask)
        h = h + block.mlp(block.mlp_ln(h))
        rt.enc.write(layer, rows, _heads(k, heads), _heads(v, heads))
    rt.enc.commit(esid, counts)
    out = enc.ln_post(h)
    _extend_cross(rt, csid, out, counts)
    new_tail = torch.stack([x[i, :, 2 * n - 2:2 * n] if n > 0 else tail[i] for i, n in enumerate(n_frames)])
    rt.pool.write(slots, {"mel_tail": new_tail})
    return [out[i, :n] for i, n in enumerate(n_frames)]


def _extend_cross(rt: WhisperRuntime, csid: Tensor, frames: Tensor, counts: Tensor) -> None:
    """Append the decoder's cross-attention K/V of new encoder frames (the projections are per frame,
    so extending equals recomputing over the window)."""
    rows = rt.cross.reserve(csid, counts)
    dec = rt.model.decoder
    heads = dec.blocks[0].cross_attn.n_head
    for layer, block in enumerate(dec.blocks):
        k, v = block.cross_attn.kv(frames)
        rt.cross.write(layer, rows, _heads(k, heads), _heads(v, heads))
    rt.cross.commit(csid, counts)


@torch.no_grad()
def encode_window(rt: WhisperRuntime, handles: list, n_mel: list[int], maxima: list[float],
                  pad_to_30s: bool = False) -> list[int]:
    """Re-encode each stream's window (`n_mel[b]` raw mel frames from its slot, floored with `maxima[b]`,
    full attention) and rewrite its cross K/V; returns each stream's encoder frames.  Not padded: the
    window's own frames only.  `pad_to_30s`: the window followed by silence to 30 s, exactly what
    offline Whisper encodes (all 1500 frames, padding included, are the decoder's cross-attention)."""
    enc = rt.model.encoder
    slots = rt.pool.index([h[0] for h in handles])
    csid = torch.tensor([h[2] for h in handles])
    if pad_to_30s:
        raw = rt.pool.read(slots, ["mel"])["mel"].clone()
        past = torch.arange(raw.shape[-1])[None, :] >= torch.tensor(n_mel)[:, None]
        raw.masked_fill_(past[:, None, :], FLOOR)  # the log-mel of Whisper's zero padding
        out = enc(normalise(raw, torch.tensor(maxima)).to(rt.dtype))
        counts = torch.full((len(handles),), out.shape[1])
        for c in csid.tolist():
            rt.cross.truncate(c, 0)
        _extend_cross(rt, csid, out, counts)
        return counts.tolist()
    mmax = max(n_mel)
    nmax = (mmax + 1) // 2
    mel = normalise(rt.pool.read(slots, ["mel"])["mel"][..., :mmax], torch.tensor(maxima)).to(rt.dtype)
    valid = torch.tensor(n_mel)
    mel = mel * (torch.arange(mmax)[None] < valid[:, None])[:, None].to(rt.dtype)
    # conv1's left padding is a zero mel frame; conv2's is a zero conv1 output (`first`)
    stem_in = F.pad(mel, (2, 2 * nmax + 1 - mmax))
    h = _stem(enc, stem_in, torch.ones(len(handles), dtype=torch.bool), valid, nmax)
    h = (h + enc.positional_embedding[:nmax]).to(rt.dtype)
    counts = (valid + 1) // 2
    real = torch.arange(nmax)[None] < counts[:, None]
    mask = real[:, None, :] | ~real[:, :, None]
    for block in enc.blocks:
        hn = block.attn_ln(h)
        k, v = block.attn.kv(hn)
        h = h + block.attn.attend(block.attn.query(hn), k, v, mask[:, None])
        h = h + block.mlp(block.mlp_ln(h))
    out = enc.ln_post(h)
    for c in csid.tolist():
        rt.cross.truncate(c, 0)
    _extend_cross(rt, csid, out, counts)
    return counts.tolist()


# -- decoding ----------------------------------------------------------------------------------------

@dataclass
class DecodeJob:
    """One stream's decoding this step (host side)."""

    context: list[int]               # <|startofprev|> prompt, then the sot sequence
    tokens: list[int]                # the window's tokens: committed, then the revisable tail
    committed: int                   # tokens[:committed] are final
    tail_logprobs: list[float]       # log P of tokens[committed:] at the last step
    max_tokens: int                  # the tokens-per-second bound for this window
    final: bool                      # the stream's (or window's) last step: decode to <|endoftext|>, commit all
    look_back: int = 2
    rule: str = "carelesswhisper"    # or "agreement": LocalAgreement-2 (whisper_streaming): the tail is decoded
                                     # afresh each step and its prefix shared with the last step's tail committed
    stopped_by: str = ""             # "", "eot", "repeat", "rate", "ctx" (why decoding stopped)
    cropped_at: int | None = None    # where the tail check cut the tokens
    kept: int = 0                    # tokens there before this step that the check kept
    previous_tail: list[int] = field(default_factory=list)  # "agreement": the tail before this step
    silent: bool = False             # the window holds no speech (family.py): nothing is decoded
    sot_index: int = -1              # where <|startoftranscript|> is in `context` (-1: no no-speech check)
    no_speech_prob: float | None = None  # P(<|nospeech|>) after it, while the window has nothing committed
    logprobs: list[float] = field(default_factory=list)


def repeated_tail(tokens: list[int], start: int, max_n: int = 32) -> int:
    """Length to cut when tokens[start:] ends in a loop: an n-gram three times in a row (n < 4) or twice
    in a row (4 <= n <= max_n; read speech rarely says four tokens twice over); all copies but the first
    are cut.  0 when there is no loop."""
    for n in range(1, max_n + 1):
        copies = 3 if n < 4 else 2
        if len(tokens) - start < n * copies:
            break
        last = tokens[-n:]
        if all(tokens[-(c + 1) * n:len(tokens) - c * n] == last for c in range(1, copies)):
            return n * (copies - 1)
    return 0


# openai/whisper's thresholds for a silent segment: no-speech probability above 0.6 and an average token
# log-probability below -1 (its `transcribe` skips such a segment).  Before a window's last step a drop only
# means "wait for more audio"; at the last step it throws the window's words away, so it needs more: a window
# of silence scored 0.91 (tiny.en), while three real digit strings (bench/whisper_streaming.py) that 0.6 threw
# away scored 0.61-0.67.
NO_SPEECH_THRESHOLD = 0.6
NO_SPEECH_THRESHOLD_LAST = 0.8
LOGPROB_THRESHOLD = -1.0


@torch.no_grad()
def decode_step(rt: WhisperRuntime, handles: list, jobs: list[DecodeJob], suppress: list[int], blank: list[int],
                eot: int, no_speech: int | None = None) -> None:
    """Run the decoder for every job together: the prompt and tokens in one forward (self K/V to the paged
    cache), CarelessWhisper's check of the tail (from the end of the committed tokens on, a token is kept
    while its log-probability does not fall or it stays the argmax; the first that fails is cut with
    everything after it), then greedy tokens for all streams together until each one stops."""
    dec = rt.model.decoder
    b = len(jobs)
    ssid = torch.tensor([h[3] for h in handles])
    csid = torch.tensor([h[2] for h in handles])
    heads = dec.blocks[0].attn.n_head
    for s in ssid.tolist():
        rt.self_kv.truncate(s, 0)
    cross = [rt.cross.gather(layer, csid) for layer in range(len(dec.blocks))]
    has_audio = cross[0][2].any(dim=1).tolist()
    seqs = [j.context + j.tokens for j in jobs]
    lengths = torch.tensor([len(s) for s in seqs])
    lmax = int(lengths.max())
    ids = torch.zeros(b, lmax, dtype=torch.long, device=rt.device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    # logits only where they are read: from the last committed token's position on (row p - first is
    # position p); log-probabilities and argmax only of the rows the tail check reads, row by row
    for j in jobs:  # Whisper's no-speech check, while the window has nothing committed
        if j.committed or j.sot_index < 0:
            j.sot_index = -1
    first = max(0, min(j.sot_index if j.sot_index >= 0 else len(j.context) + j.committed - 1 for j in jobs))
    logits = _forward(rt, ids, torch.zeros(b, dtype=torch.long), lengths, ssid, cross, heads, first)
    for i, j in enumerate(jobs):  # read before the suppression, as openai/whisper reads it
        if j.sot_index >= 0 and no_speech is not None:
            j.no_speech_prob = float(torch.softmax(logits[i, j.sot_index - first].float(), -1)[no_speech])
    suppress_t = torch.tensor(suppress, device=rt.device)
    logits[..., suppress_t] = -np.inf
    active, lengths_now = [], lengths.clone()
    for i, j in enumerate(jobs):
        j.logprobs = []
        j.kept = len(j.tokens)
        if not has_audio[i] or j.silent:
            active.append(False)
            continue
        c = len(j.context)
        keep = len(j.tokens)
        if j.rule == "agreement":  # decode the tail afresh; it is compared with this one after decoding
            j.previous_tail = j.tokens[j.committed:]
            keep = j.committed
        for t in range(j.committed, keep):
            tok, row = j.tokens[t], logits[i, c + t - 1 - first]
            lp = float(torch.log_softmax(row, dim=-1)[tok])
            old = j.tail_logprobs[t - j.committed] if t - j.committed < len(j.tail_logprobs) else -np.inf
            if int(row.argmax()) == tok or lp >= old:
                j.logprobs.append(lp)
                continue
            keep = t
            break
        if keep < len(j.tokens):
            j.cropped_at = j.kept = keep
            del j.tokens[keep:]
            rt.self_kv.truncate(int(ssid[i]), c + keep)
            lengths_now[i] = c + keep
        active.append(True)
    # the next token of each stream from the last kept position
    last = logits[torch.arange(b), lengths_now - 1 - first]
    del logits
    # the greedy steps feed only the streams still decoding (a batch's stopped streams cost nothing);
    # their cross K/V rows are picked again only when a stream stops
    rows, cross_rows = None, cross
    for step in range(dec.positional_embedding.shape[0]):
        if not any(active):
            break
        nxt = []
        for i, j in enumerate(jobs):
            if active[i] and len(j.tokens) >= j.max_tokens:
                j.stopped_by, active[i] = "rate", False
            if not active[i]:
                nxt.append(eot)
                continue
            row = last[i]
            if not j.tokens:
                row = row.clone()
                row[blank] = -np.inf  # SuppressBlank at the window's first token
            t = int(row.argmax())
            if t == eot:
                j.stopped_by, active[i] = "eot", False
                nxt.append(eot)
                continue
            j.tokens.append(t)
            j.logprobs.append(float(torch.log_softmax(row.float(), -1)[t]))
            # a loop whose first copy is already committed is a loop too: look at the whole window, cut only the tail
            cut = min(repeated_tail(j.tokens, 0), len(j.tokens) - j.committed)
            if cut:
                del j.tokens[-cut:]
                del j.logprobs[-cut:]
                j.stopped_by, active[i] = "repeat", False
            elif len(j.context) + len(j.tokens) >= dec.positional_embedding.shape[0] - 1:
                j.stopped_by, active[i] = "ctx", False
            nxt.append(t if active[i] else eot)
        if not any(active):
            break
        now = [i for i in range(b) if active[i]]
        if now != rows:
            rows = now
            idx = torch.tensor(rows)
            cross_rows = cross if len(rows) == b else [tuple(t[idx] for t in layer) for layer in cross]
        feed = torch.tensor([nxt[i] for i in rows], device=rt.device)[:, None]
        ones = torch.ones(len(rows), dtype=torch.long)
        out = _forward(rt, feed, lengths_now[idx], ones, ssid[idx], cross_rows, heads)
        out[..., suppress_t] = -np.inf
        last = torch.empty(b, out.shape[-1], dtype=out.dtype)
        last[idx] = out[:, 0]
        lengths_now[idx] += 1
    for j in jobs:
        # a window that has committed nothing and that Whisper takes for silence keeps nothing: stock Whisper
        # says "You" or "Thank you." to a block of silence (what an endpoint leaves at the start of a window)
        threshold = NO_SPEECH_THRESHOLD_LAST if j.final else NO_SPEECH_THRESHOLD
        if (j.no_speech_prob is not None and j.no_speech_prob > threshold and j.tokens and j.logprobs
                and sum(j.logprobs) / len(j.logprobs) < LOGPROB_THRESHOLD):
            del j.tokens[:]
            j.logprobs, j.stopped_by = [], "no_speech"
        if j.final:
            j.committed = len(j.tokens)
        elif j.rule == "agreement":
            # LocalAgreement-2: what two consecutive steps agree on is committed
            tail, agreed = j.tokens[j.committed:], 0
            while agreed < min(len(tail), len(j.previous_tail)) and tail[agreed] == j.previous_tail[agreed]:
                agreed += 1
            j.committed += agreed
        else:
            # older than the look-back, and already there (and kept) before this step's new audio
            j.committed = max(j.committed, min(j.kept, len(j.tokens) - j.look_back))
        j.tail_logprobs = j.logprobs[len(j.logprobs) - (len(j.tokens) - j.committed):] if len(j.tokens) > j.committed else []


def _forward(rt: WhisperRuntime, ids: Tensor, offsets: Tensor, counts: Tensor, ssid: Tensor, cross, heads: int,
             logits_from: int = 0) -> Tensor:
    """Decoder over `ids` `[B, W]` at positions offsets[b] + 0..W-1, of which the first counts[b] are real;
    each stream attends to its cached tokens, its own new ones before each, and its window's frames.
    Returns logits `[B, W - logits_from, n_vocab]` (of the positions from `logits_from` on)."""
    dec = rt.model.decoder
    b, w = ids.shape
    pos = (offsets[:, None] + torch.arange(w)).clamp(max=dec.positional_embedding.shape[0] - 1)
    x = (dec.token_embedding(ids) + dec.positional_embedding[pos]).to(rt.dtype)
    rows = rt.self_kv.reserve(ssid, counts)
    real = torch.arange(w)[None] < counts[:, None]
    for layer, block in enumerate(dec.blocks):
        hn = block.attn_ln(x)
        k, v = block.attn.kv(hn)
        rt.self_kv.write(layer, rows, _heads(k, heads), _heads(v, heads))
        pk, pv, pmask = rt.self_kv.gather(layer, ssid, extra=counts)
        # key j (a position) is visible to query i when it is cached and at or before the query's position
        kpos = torch.arange(pk.shape[1])[None, None]
        mask = pmask[:, None, :] & (kpos <= (offsets[:, None] + torch.arange(w))[:, :, None])
        mask = mask | ~real[:, :, None]
        x = x + _attend(block.attn, block.attn.query(hn), pk, pv, mask)
        ck, cv, cmask = cross[layer]
        cm = cmask[:, None, :].expand(b, w, -1) | ~cmask.any(1)[:, None, None]
        x = x + _attend(block.cross_attn, block.cross_attn.query(block.cross_attn_ln(x)), ck, cv, cm)
        x = x + block.mlp(block.mlp_ln(x))
    rt.self_kv.commit(ssid, counts)
    x = dec.ln(x[:, logits_from:])
    return (x @ dec.token_embedding.weight.to(x.dtype).t()).float()
