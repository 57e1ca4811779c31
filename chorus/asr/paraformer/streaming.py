"""Streaming Paraformer over the shared slot pool, exactly as FunASR's ParaformerStreaming streams.

FunASR's chunk loop (ParaformerStreaming.inference), per stream, with chunk_size [c0, c1, c2]:
  * audio is cut into strides of c1 * 960 samples (600 ms at [*, 10, *]); each stride gives c1
    new LFR feature frames;
  * the encoder input of a chunk is the last c0 + c2 embedded frames of the previous chunk's input
    (zeros before the first chunk, unembedded) followed by the new frames, which are scaled by
    sqrt(d_model) and given sinusoidal positions that continue across chunks;
  * each layer attends to its chunk plus a look-back cache: the keys/values of every chunk but its
    last c2 frames, concatenated and cut to the last encoder_look_back * c1 (not cut after the
    first chunk); the FSMN sees the chunk alone, zero-padded;
  * CIF integrates the frames c0 .. c0 + c1 of the chunk (all from c0 on in the final chunk),
    carrying the unfired remainder (stored as hidden/alpha, i.e. divided by its weight);
  * the decoder runs only on chunks where CIF fired: its FSMN caches hold the last k-1 inputs, its
    cross-attention sees the chunk's whole encoder output plus the last decoder_look_back * c1
    frames of earlier decoded chunks' outputs; tokens are the greedy argmax, minus blank/sos/eos.
How a stream ends (is_final), FunASR's rules kept here:
  * the remaining audio r (< one stride) is encoded as a last, shorter chunk if r >= 960 samples,
    with the front end flushed (right-padded LFR windows) and CIF counting the look-ahead too;
  * if r < 960 FunASR DROPS those samples (up to 60 ms, and the LFR frames still pending) and runs
    a "tail" step on the cached overlap frames alone, which it scales by sqrt(d_model) a SECOND time
    (its encoder multiplies the cache tensor in place); the tail step's input is that twice-scaled
    overlap;
  * either way CIF appends one zero frame with weight tail_threshold, which can fire a last token.
Also FunASR's: the first chunk's c0 + c2 zero frames are encoded as frames and CIF counts c2 of
them ([0,10,5]) or c0 ([5,10,5]), which may give a token at the very start.

`ParaformerStreamer.step` advances a batch of streams that share one ChunkSetting (the group key):
one index_select per state tensor, the forward, one index_copy_ back.  `ParaformerStreamer.offline`
computes a whole stream at once with the equivalent masks, for the tests (law 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from ...cache import SlotPool, StateSpec, TensorSpec
from .frontend import OnlineFeatures, ParaformerFrontend
from .model import ParaformerStreamingModel, cif_fire, left_valid, right_valid, tail_gather


@dataclass(frozen=True)
class ChunkSetting:
    """One FunASR streaming setting; hashable, it is the group key of a batched step."""

    chunk_size: tuple[int, int, int] = (0, 10, 5)
    encoder_look_back: int = 4
    decoder_look_back: int = 1

    def __post_init__(self):
        object.__setattr__(self, "chunk_size", tuple(int(c) for c in self.chunk_size))
        c0, c1, c2 = self.chunk_size
        if len(self.chunk_size) != 3 or c0 < 0 or c1 < 1 or c2 < 0 or c0 + c2 > c1:
            raise ValueError(f"chunk_size {list(self.chunk_size)}: need [c0, c1, c2] with c1 >= 1 and "
                             f"c0 + c2 <= c1 (FunASR's examples: [0, 10, 5], [5, 10, 5])")
        if self.encoder_look_back < 0 or self.decoder_look_back < 0:
            # -1 means "everything" to FunASR's encoder: an unbounded cache cannot live in a slot.
            raise ValueError("look-backs must be >= 0 (FunASR's -1, unbounded, is not supported)")

    @property
    def overlap(self) -> int:
        return self.chunk_size[0] + self.chunk_size[2]

    @property
    def stride_samples(self) -> int:
        return self.chunk_size[1] * 960

    @property
    def encoder_cache(self) -> int:
        """Frames of encoder look-back a slot must hold (the first chunk's is not cut)."""
        if not self.encoder_look_back:
            return 0
        return max(self.encoder_look_back * self.chunk_size[1], self.chunk_size[0] + self.chunk_size[1])

    @property
    def decoder_cache(self) -> int:
        return self.decoder_look_back * self.chunk_size[1]


DEFAULT_SETTING = ChunkSetting()


def paraformer_state_spec(model: ParaformerStreamingModel, settings=(DEFAULT_SETTING,)) -> StateSpec:
    """Per-stream state, sized for the largest of the settings the pool will serve.  The layers' caches
    are kept in the compute dtype (bf16 halves them); the input overlap and CIF's carry stay fp32."""
    cfg = model.cfg
    dt = model.encoder.compute_dtype
    d, dk_e, dk_d = cfg.d_model, cfg.d_model // cfg.enc_heads, cfg.d_model // cfg.dec_heads
    ov = max(s.overlap for s in settings)
    ec = max(s.encoder_cache for s in settings)
    dc = max(s.decoder_cache for s in settings)
    return StateSpec(
        feats=TensorSpec((ov, cfg.input_size)),       # overlap: last c0+c2 embedded input frames
        pos=TensorSpec((), torch.long),               # LFR frames embedded so far (positions)
        chunks=TensorSpec((), torch.long),            # chunks stepped so far
        enc_k=TensorSpec((cfg.enc_blocks, cfg.enc_heads, ec, dk_e), dt),
        enc_v=TensorSpec((cfg.enc_blocks, cfg.enc_heads, ec, dk_e), dt),
        enc_len=TensorSpec((), torch.long),           # valid (right-aligned) look-back frames
        cif_hidden=TensorSpec((d,)),
        cif_alpha=TensorSpec(()),
        dec_fsmn=TensorSpec((cfg.dec_blocks, d, cfg.dec_kernel - 1), dt),
        dec_k=TensorSpec((cfg.dec_blocks, cfg.dec_heads, dc, dk_d), dt),
        dec_v=TensorSpec((cfg.dec_blocks, cfg.dec_heads, dc, dk_d), dt),
        dec_len=TensorSpec((), torch.long),
    )


@dataclass
class StepResult:
    """What one stream got from a step."""

    tokens: list[int]         # new token ids (blank, sos and eos removed)
    token_frames: list[int]   # LFR frame (60 ms) where CIF fired each new token, from the stream start
    frames_done: int          # LFR frames consumed so far
    encoded: torch.Tensor     # [T, d] encoder output of this chunk (overlap + new frames)
    final: bool


class ParaformerStreamer:
    """Owns a model's slot pool and steps batches of its streams."""

    def __init__(self, model: ParaformerStreamingModel, *, settings=(DEFAULT_SETTING,), slots: int | None = None,
                 memory_budget: int | None = None, device: str | torch.device = "cpu", name: str = "paraformer"):
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = torch.device(device)
        self.settings = tuple(settings)
        self.spec = paraformer_state_spec(model, self.settings)
        if slots is None and memory_budget is None:
            slots = 16
        self.pool = SlotPool(name, self.spec, slots=slots, memory_budget=memory_budget, device=self.device)
        self._drop = {self.cfg.blank_id, self.cfg.sos, self.cfg.eos}

    def check(self, setting: ChunkSetting) -> ChunkSetting:
        s = self.spec
        if (setting.overlap > s["feats"].shape[0] or setting.encoder_cache > s["enc_k"].shape[2]
                or setting.decoder_cache > s["dec_k"].shape[2]):
            raise ValueError(f"{setting} needs more state than this pool's slots were sized for "
                             f"(pass it in `settings` when making the streamer)")
        return setting

    # -- stream lifetime -------------------------------------------------------------------
    def open(self) -> int:
        return self.pool.acquire()

    def close(self, slot: int) -> None:
        self.pool.release(slot)

    # -- the batched step ------------------------------------------------------------------
    @torch.no_grad()
    def step(self, slots: list[int], chunks: list[torch.Tensor], finals: list[bool],
             setting: ChunkSetting = DEFAULT_SETTING) -> list[StepResult]:
        """Advance streams by one chunk each.

        chunks[b]: the chunk's new feature frames [n, 560] (n == c1 unless final; a final chunk
        with n == 0 is FunASR's tail step); finals[b]: this is the stream's last chunk.
        """
        self.check(setting)
        model, cfg, dev = self.model, self.cfg, self.device
        c0, c1, c2 = setting.chunk_size
        ov = setting.overlap
        idx = self.pool.index(slots)
        st = self.pool.read(idx)
        b = len(slots)
        n_new = torch.tensor([c.shape[0] for c in chunks], device=dev)
        final = torch.tensor(list(finals), dtype=torch.bool, device=dev)
        if bool(((n_new != c1) & ~final).any()):
            raise ValueError(f"a chunk that is not final must have exactly {c1} frames")
        tail = final & (n_new == 0)
        new = pad_sequence([c.to(dev, torch.float32) for c in chunks], batch_first=True) \
            if int(n_new.max()) else torch.zeros(b, 0, cfg.input_size, device=dev)

        # Encoder input: overlap frames, then the new frames embedded.
        emb = model.encoder.embed(new, st["pos"])
        cap_ov = st["feats"].shape[1]
        overlap = st["feats"][:, cap_ov - ov:]
        # FunASR's tail step multiplies the cached (already scaled) overlap by sqrt(d) again.
        scale = torch.where(tail, torch.tensor(cfg.d_model ** 0.5, device=dev), torch.tensor(1.0, device=dev))
        x = torch.cat([overlap * scale[:, None, None], emb], dim=1)
        t_len = ov + n_new
        valid = left_valid(t_len, x.shape[1])
        # The cache takes every frame but the last c2 (FunASR slices k[:, :, :-c2], empty when c2 == 0).
        keep = (t_len - c2).clamp(min=0) if c2 else torch.zeros_like(t_len)
        enc_cap = st["enc_k"].shape[3]
        kc, vc = st["enc_k"].transpose(0, 1), st["enc_v"].transpose(0, 1)   # [L, B, h, C, dk]
        key_valid = torch.cat([right_valid(st["enc_len"], enc_cap), valid], 1)[:, None, :]
        attn_fns = [self._cache_attn(model.encoder.layers[i].self_attn, kc[i], vc[i], key_valid)
                    for i in range(cfg.enc_blocks)]
        enc, ks, vs = model.encoder(x, valid, attn_fns)
        enc = enc * valid[:, :, None].to(enc.dtype)
        L = setting.encoder_look_back * c1
        if L:
            first = st["chunks"] == 0
            enc_len = torch.where(first, keep, (st["enc_len"] + keep).clamp(max=L))
        else:
            enc_len = torch.zeros_like(st["enc_len"])
        new_state = {
            "feats": tail_gather(st["feats"], emb, n_new, dim=1),
            "pos": st["pos"] + n_new,
            "chunks": st["chunks"] + 1,
            "enc_k": torch.stack([tail_gather(kc[i], ks[i], keep, dim=2) for i in range(cfg.enc_blocks)], 1)
            if enc_cap else st["enc_k"],
            "enc_v": torch.stack([tail_gather(vc[i], vs[i], keep, dim=2) for i in range(cfg.enc_blocks)], 1)
            if enc_cap else st["enc_v"],
            "enc_len": enc_len,
        }

        # Predictor: CIF over the counted frames, after the carried remainder, before the tail frame.
        t_idx = torch.arange(x.shape[1], device=dev)[None, :]
        alphas = model.predictor.alphas(enc, valid)
        drop = (t_idx < c0) | ((t_idx >= c0 + c1) & ~final[:, None])
        alphas = alphas.masked_fill(drop, 0.0)
        t_full = x.shape[1] + 2
        hidden = torch.cat([st["cif_hidden"][:, None], enc, enc.new_zeros(b, 1, cfg.d_model)], 1)
        alph = torch.cat([st["cif_alpha"][:, None], alphas, alphas.new_zeros(b, 1)], 1)
        pos_tail = 1 + t_len                                   # right after the stream's own frames
        at_tail = torch.arange(t_full, device=dev)[None, :] == pos_tail[:, None]
        hidden = hidden.masked_fill(at_tail[:, :, None], 0.0)
        alph = torch.where(at_tail & final[:, None], torch.full_like(alph, cfg.tail_threshold), alph)
        cif_valid = torch.arange(t_full, device=dev)[None, :] <= torch.where(final, pos_tail, pos_tail - 1)[:, None]
        embeds, counts, fire_pos, integrate, frames = cif_fire(
            hidden, alph, st["cif_alpha"].new_zeros(b), hidden.new_zeros(b, cfg.d_model),
            cfg.cif_threshold, cif_valid)
        new_state["cif_alpha"] = integrate
        new_state["cif_hidden"] = torch.where((integrate > 0)[:, None], frames / integrate[:, None], frames)

        # Decoder: only the streams where CIF fired (FunASR skips the decoder, and so its caches).
        tokens = torch.zeros(b, embeds.shape[1], dtype=torch.long, device=dev)
        dec_fsmn = st["dec_fsmn"].clone()
        dec_k, dec_v, dec_len = st["dec_k"].clone(), st["dec_v"].clone(), st["dec_len"].clone()
        run = (counts > 0).nonzero()[:, 0]
        if run.numel():
            dcap = dec_k.shape[3]
            mem_len = t_len[run]
            mem_valid = valid[run]
            kv_valid = torch.cat([right_valid(st["dec_len"][run], dcap), mem_valid], 1)[:, None, :]
            logp, fsmn, mk, mv = model.decoder(
                embeds[run], counts[run], st["dec_fsmn"][run].transpose(0, 1), enc[run], kv_valid,
                st["dec_k"][run].transpose(0, 1), st["dec_v"][run].transpose(0, 1))
            tokens[run] = logp.argmax(-1)
            dec_fsmn[run] = fsmn.transpose(0, 1)
            if dcap:
                kc_d = st["dec_k"][run].transpose(0, 1)
                vc_d = st["dec_v"][run].transpose(0, 1)
                dec_k[run] = torch.stack([tail_gather(kc_d[i], mk[i], mem_len, 2) for i in range(cfg.dec_blocks)], 1)
                dec_v[run] = torch.stack([tail_gather(vc_d[i], mv[i], mem_len, 2) for i in range(cfg.dec_blocks)], 1)
            Ld = setting.decoder_look_back * c1
            dec_len[run] = (st["dec_len"][run] + mem_len).clamp(max=Ld)
        new_state.update(dec_fsmn=dec_fsmn, dec_k=dec_k, dec_v=dec_v, dec_len=dec_len)
        self.pool.write(idx, new_state)

        # Token times: hidden position p (after the carried frame) is chunk frame p - 1, whose
        # stream frame is pos - ov + (p - 1).
        frame_of = (st["pos"][:, None] - ov + fire_pos - 1).clamp(min=0)
        results = []
        tok, frm, cnt = tokens.tolist(), frame_of.tolist(), counts.tolist()
        for i in range(b):
            keep_i = [(t, f) for t, f in zip(tok[i][:cnt[i]], frm[i][:cnt[i]]) if t not in self._drop]
            results.append(StepResult([t for t, _ in keep_i], [f for _, f in keep_i],
                                      int(new_state["pos"][i]), enc[i, :int(t_len[i])], bool(final[i])))
        return results

    @staticmethod
    def _cache_attn(attn, k_cache, v_cache, key_valid):
        def fn(q_h, k_h, v_h):
            return attn.attend(q_h, torch.cat([k_cache, k_h], 2), torch.cat([v_cache, v_h], 2), key_valid)
        return fn

    # -- the same computation for a whole stream at once (tests) ----------------------------
    @torch.no_grad()
    def offline(self, feats: torch.Tensor, tail: bool, setting: ChunkSetting = DEFAULT_SETTING):
        """One stream's chunks all at once, with masks in place of caches.

        feats: every feature frame the stream's steps got, [N, 560]; tail: the stream ended with
        a tail step (then N is a multiple of c1).  Returns (tokens, per-chunk encoder outputs).
        """
        model, cfg, dev = self.model, self.cfg, self.device
        c0, c1, c2 = setting.chunk_size
        ov = setting.overlap
        n = feats.shape[0]
        if tail and n % c1:
            raise ValueError("a stream that ends with a tail step has a multiple of c1 frames")
        emb = model.encoder.embed(feats[None].to(dev, torch.float32), torch.zeros(1, dtype=torch.long, device=dev))[0]
        z = torch.cat([emb.new_zeros(ov, cfg.input_size), emb])
        n_full = n // c1 if tail else -(-n // c1)
        wins, lens = [], []
        for c in range(n_full):
            w = z[c * c1: c * c1 + ov + min(c1, n - c * c1)]
            wins.append(w)
            lens.append(w.shape[0])
        if tail:
            wins.append(z[n_full * c1: n_full * c1 + ov] * cfg.d_model ** 0.5)
            lens.append(ov)
        w_count = len(wins)
        x = pad_sequence(wins, batch_first=True)
        lens_t = torch.tensor(lens, device=dev)
        valid = left_valid(lens_t, x.shape[1])
        # Window i sees its own frames and, from windows j < i, the first S = c0 + c1 frames of
        # each, concatenated: all of window 0's at i == 1, the last look_back * c1 after that.
        s = (c0 + c1) if c2 else 0
        L = setting.encoder_look_back * c1
        j = torch.arange(w_count * s, device=dev)[None, :]
        i = torch.arange(w_count, device=dev)[:, None]
        lo = torch.where(i == 1, torch.zeros_like(i), i * s - L)
        flat_valid = (j < i * s) & (j >= lo) & (L > 0)
        key_valid = torch.cat([flat_valid, valid], 1)[:, None, :]

        def flat_attn(attn):
            def fn(q_h, k_h, v_h):
                fk = k_h[:, :, :s].transpose(0, 1).reshape(1, attn.h, w_count * s, -1).expand(w_count, -1, -1, -1)
                fv = v_h[:, :, :s].transpose(0, 1).reshape(1, attn.h, w_count * s, -1).expand(w_count, -1, -1, -1)
                return attn.attend(q_h, torch.cat([fk, k_h], 2), torch.cat([fv, v_h], 2), key_valid)
            return fn
        enc, _, _ = model.encoder(x, valid, [flat_attn(layer.self_attn) for layer in model.encoder.layers])
        enc = enc * valid[:, :, None].to(enc.dtype)

        # CIF over the counted frames of all windows in order, then the tail frame.
        t_idx = torch.arange(x.shape[1], device=dev)[None, :]
        last = torch.arange(w_count, device=dev)[:, None] == w_count - 1
        alphas = model.predictor.alphas(enc, valid)
        alphas = alphas.masked_fill((t_idx < c0) | ((t_idx >= c0 + c1) & ~last), 0.0)
        hid = torch.cat([enc[valid], enc.new_zeros(1, cfg.d_model)])[None]
        alp = torch.cat([alphas[valid], alphas.new_full((1,), cfg.tail_threshold)])[None]
        window_of = torch.cat([torch.full((l,), w, device=dev) for w, l in enumerate(lens)]
                              + [torch.full((1,), w_count - 1, device=dev)])
        embeds, counts, fire_pos, _, _ = cif_fire(hid, alp, alp.new_zeros(1), hid.new_zeros(1, cfg.d_model),
                                                  cfg.cif_threshold)
        k = int(counts[0])
        if k == 0:
            return [], [enc[w, :lens[w]] for w in range(w_count)]
        tok_win = window_of[fire_pos[0, :k]]
        # Decoder: token in window c sees window c's output and the last decoder_look_back * c1
        # frames of the windows before c where CIF fired (the decoder ran only on those).
        memory = enc[valid][None]
        offs = [0]
        for l in lens:
            offs.append(offs[-1] + l)
        ld = setting.decoder_look_back * c1
        fired = set(tok_win.tolist())
        mask = torch.zeros(k, offs[-1], dtype=torch.bool, device=dev)
        for t, c in enumerate(tok_win.tolist()):
            mask[t, offs[c]:offs[c + 1]] = True
            before = [p for w in sorted(fired) if w < c for p in range(offs[w], offs[w + 1])]
            if ld and before:
                mask[t, before[-ld:]] = True
        fsmn0 = torch.zeros(cfg.dec_blocks, 1, cfg.d_model, cfg.dec_kernel - 1, device=dev)
        logp, _, _, _ = model.decoder(embeds[:, :k], counts, fsmn0, memory, mask[None])
        ids = [t for t in logp[0].argmax(-1).tolist() if t not in self._drop]
        return ids, [enc[w, :lens[w]] for w in range(w_count)]


# -- one stream's audio, cut as FunASR's chunk loop cuts it ---------------------------------------

@dataclass
class ParaformerStream:
    """Host side of one stream: audio in, chunks out (feature frames + final flag), FunASR's cuts.

    Audio is turned into features as it arrives; a chunk is ready once c1 * 960 samples beyond the
    previous chunk have arrived (then exactly c1 new LFR frames exist).  `finish()` applies FunASR's
    ending: a last chunk with the flushed features if >= 960 samples remain, else a tail chunk
    (no frames: those samples and their pending features are dropped, as FunASR drops them).
    """

    frontend: ParaformerFrontend
    setting: ChunkSetting = DEFAULT_SETTING
    features: OnlineFeatures = field(init=False)
    pending: list = field(default_factory=list)
    chunks_out: int = 0
    finished: bool = False
    _frames: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.features = self.frontend.online()
        self._frames = torch.zeros(0, self.frontend.cfg.dim)

    def accept(self, samples) -> None:
        self._frames = torch.cat([self._frames, self.features.accept(samples)])
        c1 = self.setting.chunk_size[1]
        while (self.features.samples >= (self.chunks_out + 1) * self.setting.stride_samples
               and self._frames.shape[0] >= c1):
            self.pending.append((self._frames[:c1], False))
            self._frames = self._frames[c1:]
            self.chunks_out += 1

    def finish(self) -> None:
        rest = self.features.samples - self.chunks_out * self.setting.stride_samples
        if rest >= 960:
            frames = torch.cat([self._frames, self.features.finish()])
        else:
            frames = torch.zeros(0, self.frontend.cfg.dim)
        self.pending.append((frames, True))
        self.chunks_out += 1
        self.finished = True

    def ready(self) -> bool:
        return bool(self.pending)

    def take(self) -> tuple[torch.Tensor, bool]:
        return self.pending.pop(0)
