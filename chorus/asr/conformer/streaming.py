"""Cache-aware streaming of a FastConformer over the shared slot pool.

Per stream, the pool slot holds everything the next chunk needs (docs/architecture.md, the state runtime):
the last 9 mel frames for the causal subsampling, per layer the projected keys and values of the
attention's left context and the depthwise convolution's inputs (frame rings, `cache/ring.py`),
counters, the RNNT predictor state and the last CTC label.  `ConformerStreamer.step` advances
a batch of streams of one attention-context setting by one chunk: the small state is read with
one `index_select` per tensor and written back with one `index_copy_`; the rings are written in
place, layer by layer, with only the chunk's new frames, so every frame's K and V are projected
once (NeMo caches the attention *input* and projects all 70 cached frames again every step).

Streaming equals the offline forward with the same mask (law 1).  Where NeMo's own streaming
buffer deviates from its offline forward we follow the offline maths:
  * with fewer than 9 mel frames of history (the 2nd chunk at lookahead 0) NeMo pads the
    subsampling cache with zero *features*; we run the subsampler from the stream start;
  * NeMo drops a final tail shorter than 8 mel frames; we encode it, as offline does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...cache import SlotPool, StateSpec, TensorSpec
from ...cache.quantized import (CHANNEL_SCALE_DTYPE, TOKEN_SCALE_DTYPE, Int8FrameWindow, Int8KVWindow,
                                key_group_size, key_scale_groups)
from ...cache.ring import FrameRingWindow, ring_rows
from ...stream.chunking import ChunkPlan
from .. import rows_kernel
from .asr_model import FastConformerModel
from .decoding import ctc_greedy, rnnt_greedy

FRAME_MS = 10  # mel hop; NeMo streaming models use 10 ms


@dataclass(frozen=True)
class StreamSetting:
    """One attention-context setting and the chunk geometry it implies (NeMo streaming_cfg)."""

    context: tuple[int, int]
    plan: ChunkPlan
    out_frames: int | None  # encoder frames committed per step; None = all the chunk produced
    lookahead_ms: int
    chunk_ms: int


def stream_setting(model: FastConformerModel, context: tuple[int, int]) -> StreamSetting:
    cfg = model.spec.encoder
    factor = cfg.subsampling_factor
    left, right = context
    if cfg.att_context_style == "chunked_limited":
        lookahead = right
        plan = ChunkPlan(1 + factor * lookahead, factor + factor * lookahead,
                         1 + factor * lookahead, factor + factor * lookahead)
        out_frames = None
    else:  # regular: the receptive field grows by `right` frames per layer; advance one frame
        lookahead = right * cfg.n_layers
        plan = ChunkPlan(1 + factor * lookahead, factor + factor * lookahead, 1, factor)
        out_frames = 1
    frame_ms = FRAME_MS * factor
    return StreamSetting(context, plan, out_frames, lookahead_ms=frame_ms * lookahead,
                         chunk_ms=frame_ms * (right + 1) if out_frames is None else frame_ms)


def longest_chunk(model: FastConformerModel) -> int:
    """Most encoder frames one step of any of the model's settings produces (a chunk's width)."""
    cfg = model.spec.encoder
    widths = [right + 1 if cfg.att_context_style == "chunked_limited" else 1 + right * cfg.n_layers
              for _, right in cfg.att_context_size]
    return max(widths)


# written in place by the layers, never read or written whole
RING_STATE = ("kv_ring", "conv_ring", "k_ring", "k_scale", "v_ring", "v_scale", "conv_scale")
KV_DTYPES = ("auto", "int8")  # `--kv-dtype`: the K/V and conv state in the compute dtype, or int8


def apply_kv_dtype(model: FastConformerModel, kv_dtype: str) -> FastConformerModel:
    """Keep `model`'s streaming K/V and conv state in `kv_dtype` ("auto": the compute dtype; "int8": KIVI's
    layout, cache/quantized.py).  Any compute dtype; chunked_limited attention only (a regular-style step
    rewrites look-ahead frames it has stored, which the history-only int8 rings do not hold)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype {kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}")
    enc = model.spec.encoder
    if kv_dtype == "int8":
        if enc.att_context_style != "chunked_limited":
            raise ValueError("int8 K/V state needs chunked_limited attention (this model's is "
                             f"{enc.att_context_style})")
        key_group_size(enc.max_left_context, longest_chunk(model))  # raises if the history cannot hold a chunk
    model.kv_dtype_name = kv_dtype
    return model


def conformer_state_spec(model: FastConformerModel) -> StateSpec:
    """One stream's state.  With int8 K/V (`apply_kv_dtype`) the rings hold only the history rows:
    k_ring/v_ring [layers, left context, d] int8, k_scale [layers, groups, d] float16 (per channel per
    group of frames), v_scale [layers, left context] float32 (per frame), conv_ring [layers, kernel - 1, d]
    int8 and conv_scale [layers, kernel - 1] float32."""
    enc = model.spec.encoder
    d = model.encoder.cfg.d_model
    cache_frames = enc.subsampling_factor + 1
    widest = longest_chunk(model)
    ring_dtype = model.encoder.compute_dtype
    tensors = dict(
        mel_cache=TensorSpec((cache_frames, enc.feat_in)),
        mel_seen=TensorSpec((), torch.long),
        frames_done=TensorSpec((), torch.long),
    )
    if getattr(model, "kv_dtype_name", "auto") == "int8":
        left, conv = enc.max_left_context, enc.conv_kernel_size - 1
        groups = key_scale_groups(left, key_group_size(left, widest))
        tensors.update(
            k_ring=TensorSpec((enc.n_layers, left, d), torch.int8),
            k_scale=TensorSpec((enc.n_layers, groups, d), CHANNEL_SCALE_DTYPE),
            v_ring=TensorSpec((enc.n_layers, left, d), torch.int8),
            v_scale=TensorSpec((enc.n_layers, left), TOKEN_SCALE_DTYPE),
            conv_ring=TensorSpec((enc.n_layers, conv, d), torch.int8),
            conv_scale=TensorSpec((enc.n_layers, conv), TOKEN_SCALE_DTYPE),
        )
    else:
        tensors.update(
            # per layer, ring rows of [projected K | projected V] and of depthwise conv inputs (+1 trash row)
            kv_ring=TensorSpec((enc.n_layers, ring_rows(enc.max_left_context, widest) + 1, 2 * d), ring_dtype),
            conv_ring=TensorSpec((enc.n_layers, ring_rows(enc.conv_kernel_size - 1, widest) + 1, d), ring_dtype),
        )
    if model.joint is not None:
        r = model.spec.rnnt
        tensors.update(
            pred_h=TensorSpec((r.pred_rnn_layers, r.pred_hidden)),
            pred_c=TensorSpec((r.pred_rnn_layers, r.pred_hidden)),
            pred_out=TensorSpec((r.pred_hidden,)),
        )
    if model.ctc_decoder is not None:
        tensors["ctc_last"] = TensorSpec((), torch.long, fill=model.blank)
    return StateSpec(**tensors)


@dataclass
class StepResult:
    """What one stream got from a step."""

    tokens: list[int]        # new token ids
    token_frames: list[int]  # encoder frame index of each new token
    frames_done: int         # encoder frames committed so far
    encoded: torch.Tensor    # [emitted frames, d] encoder output of this step


class ConformerStreamer:
    """Owns a model's slot pool and steps batches of its streams."""

    def __init__(self, model: FastConformerModel, *, slots: int | None = None,
                 memory_budget: int | None = None, device: str | torch.device = "cpu", name: str = "conformer"):
        self.model = model.eval()
        self.device = torch.device(device)
        self.spec = conformer_state_spec(model)
        if slots is None and memory_budget is None:
            slots = 64
        self.pool = SlotPool(name, self.spec, slots=slots, memory_budget=memory_budget, device=self.device)
        self.small_state = [k for k in self.spec if k not in RING_STATE]
        self.kv_int8 = "k_ring" in self.spec
        self.key_group = (key_group_size(model.spec.encoder.max_left_context, longest_chunk(model))
                          if self.kv_int8 else None)
        self.longest_chunk = longest_chunk(model)
        self.settings = self.settings_of(model)
        self._sos = self._sos_state() if model.joint is not None else None

    @staticmethod
    def settings_of(model: FastConformerModel) -> dict[tuple[int, int], StreamSetting]:
        """The model's streaming settings, by attention context, in the model's order."""
        return {tuple(c): stream_setting(model, tuple(c)) for c in model.spec.encoder.att_context_size}

    def setting(self, context: tuple[int, int]) -> StreamSetting:
        if tuple(context) not in self.settings:
            raise ValueError(f"attention context {list(context)} is not one of the model's "
                             f"{[list(c) for c in self.settings]}")
        return self.settings[tuple(context)]

    def setting_for_lookahead(self, lookahead_ms: int | None) -> StreamSetting:
        if lookahead_ms is None:
            return self.settings[tuple(self.model.spec.encoder.att_context_size[0])]
        for s in self.settings.values():
            if s.lookahead_ms == lookahead_ms:
                return s
        raise ValueError(f"lookahead {lookahead_ms} ms is not offered by this model; "
                         f"choose one of {sorted(s.lookahead_ms for s in self.settings.values())}")

    # -- stream lifetime -------------------------------------------------------------------
    def open(self) -> int:
        slot = self.pool.acquire()
        if self._sos is not None:
            idx = self.pool.index([slot])
            self.pool.write(idx, {k: v.unsqueeze(0) for k, v in self._sos.items()})
        return slot

    def close(self, slot: int) -> None:
        self.pool.release(slot)

    @torch.no_grad()
    def _sos_state(self) -> dict[str, torch.Tensor]:
        """Predictor state after the start symbol: the same for every fresh stream."""
        pred = self.model.decoder
        sos = torch.full((1,), pred.blank, dtype=torch.long, device=self.device)
        out, (h, c) = pred.step(sos, pred.initial_state(1, self.device))
        return {"pred_h": h[:, 0], "pred_c": c[:, 0], "pred_out": out[0]}

    # -- the batched step ------------------------------------------------------------------
    @torch.no_grad()
    def step(self, slots: list[int], chunks: list[torch.Tensor], consumed: list[int],
             setting: StreamSetting, decoders: list[str] | None) -> list[StepResult]:
        """Advance streams by one chunk each.

        chunks[b] is [frames, n_mels] (at most the plan's size), consumed[b] how many of those
        frames this step consumes; all streams share `setting`; decoders[b] is "rnnt" or "ctc",
        or None for a stream whose tokens are found elsewhere (beam search on the host), or
        `decoders` is None to run the encoder alone (no tokens; for benchmarks and features).
        """
        model, enc_cfg = self.model, self.model.spec.encoder
        dev = self.device
        idx = self.pool.index(slots)
        state = self.pool.read(idx, self.small_state)
        b = len(slots)
        chunk_len = torch.tensor([c.shape[0] for c in chunks], device=dev)
        padded = torch.nn.utils.rnn.pad_sequence([c.to(dev) for c in chunks], batch_first=True)
        consumed_t = torch.tensor(consumed, device=dev)

        # Subsampling input: the valid cached history frames, then the chunk, left-aligned.
        mel_cache = state["mel_cache"]
        cache_frames = mel_cache.shape[1]
        history = state["mel_seen"].clamp(max=cache_frames)
        full = torch.cat([mel_cache, padded], dim=1)
        pos = torch.arange(full.shape[1], device=dev)[None, :] + (cache_frames - history)[:, None]
        x = full.gather(1, pos.clamp(max=full.shape[1] - 1)[:, :, None].expand(-1, -1, full.shape[2]))
        sub, sub_len = model.encoder.pre_encode(x, history + chunk_len)
        sub = sub.to(model.encoder.compute_dtype)

        # Outputs before `drop` were emitted by earlier steps (NeMo drops 2 with a full cache).
        drop_full = 1 + (cache_frames - 1) // enc_cfg.subsampling_factor
        drop = torch.where(history == cache_frames, torch.full_like(history, drop_full), state["frames_done"])
        produced = (sub_len - drop).clamp(min=0)
        t_out = max(int(produced.max()), 1)  # the step's one read back before the results: a shape
        rows = (drop[:, None] + torch.arange(t_out, device=dev)[None, :]).clamp(max=sub.shape[1] - 1)
        chunk_in = sub.gather(1, rows[:, :, None].expand(-1, -1, sub.shape[2]))

        if t_out > self.longest_chunk:
            raise ValueError(f"a chunk of {t_out} encoder frames is longer than the model's settings allow "
                             f"({self.longest_chunk})")
        # Every real new frame enters the rings (a regular-style step's look-ahead frames too: the next
        # step rewrites them before it reads them); padded frames go to the trash row.
        left, pool = enc_cfg.max_left_context, self.pool.tensors
        if self.kv_int8:  # history-only int8 rings; the chunk's own K/V and conv inputs stay unquantized
            dequant = rows_kernel.fused("int8_rows_dequant") if dev.type == "cpu" else None  # one pass a read
            kv = Int8KVWindow(pool["k_ring"], pool["k_scale"], pool["v_ring"], pool["v_scale"], idx,
                              state["frames_done"], t_out, produced, self.key_group, dequant)
            conv = Int8FrameWindow(pool["conv_ring"], pool["conv_scale"], idx, state["frames_done"], t_out, produced,
                                   dequant)
        else:
            # Attention reads the K/V ring as it lies: no copy when the slots are one ascending run.
            ids = [int(s) for s in slots]
            run = ids[0] if ids == list(range(ids[0], ids[0] + b)) else None
            kv = FrameRingWindow(pool["kv_ring"], idx, state["frames_done"], t_out, produced, left,
                                 in_ring_order=True, first_slot=run)
            conv = FrameRingWindow(pool["conv_ring"], idx, state["frames_done"], t_out, produced,
                                   enc_cfg.conv_kernel_size - 1)
        encoded = model.encoder.stream(chunk_in, produced, state["frames_done"], left, kv, conv, setting.context)
        emitted = produced if setting.out_frames is None else produced.clamp(max=setting.out_frames)

        keep_pos = consumed_t[:, None] + torch.arange(cache_frames, device=dev)[None, :]
        new_state = {
            "mel_cache": full.gather(1, keep_pos[:, :, None].expand(-1, -1, full.shape[2])),
            "mel_seen": state["mel_seen"] + consumed_t,
            "frames_done": state["frames_done"] + emitted,
        }
        tokens = torch.full((b, t_out, 1), -1, dtype=torch.long, device=dev)
        if decoders is None:
            self.pool.write(idx, new_state)
            return self._results(tokens, state["frames_done"], new_state["frames_done"], encoded, emitted)
        ctc_rows = [i for i, d in enumerate(decoders) if d == "ctc"]  # chosen on the host: no sync
        if ctc_rows:
            sel = torch.tensor(ctc_rows, device=dev)
            labels, keep, last = ctc_greedy(model.ctc_decoder(encoded[sel]), emitted[sel], state["ctc_last"][sel])
            tokens[sel, :, 0] = labels.masked_fill(~keep, -1)
            new_state["ctc_last"] = state["ctc_last"].index_copy(0, sel, last)
        rnnt_rows = [i for i, d in enumerate(decoders) if d == "rnnt"]
        if rnnt_rows:
            sel = torch.tensor(rnnt_rows, device=dev)
            h = state["pred_h"][sel].transpose(0, 1).contiguous()
            c = state["pred_c"][sel].transpose(0, 1).contiguous()
            rnnt_tokens, (h, c), out = rnnt_greedy(model.joint, model.decoder, encoded[sel], emitted[sel],
                                                  (h, c), state["pred_out"][sel], model.spec.rnnt.max_symbols)
            if rnnt_tokens.shape[2] > tokens.shape[2]:
                tokens = torch.cat([tokens, tokens.new_full((b, t_out, rnnt_tokens.shape[2] - 1), -1)], dim=2)
            tokens[sel] = rnnt_tokens
            new_state["pred_h"] = state["pred_h"].index_copy(0, sel, h.transpose(0, 1))
            new_state["pred_c"] = state["pred_c"].index_copy(0, sel, c.transpose(0, 1))
            new_state["pred_out"] = state["pred_out"].index_copy(0, sel, out)
        self.pool.write(idx, new_state)
        return self._results(tokens, state["frames_done"], new_state["frames_done"], encoded, emitted)

    @staticmethod
    def _results(tokens, frames_before, frames_after, encoded, emitted) -> list[StepResult]:
        b, t_out, s = tokens.shape
        frame_idx = (frames_before[:, None] + torch.arange(t_out, device=tokens.device)[None, :])
        frame_idx = frame_idx[:, :, None].expand(b, t_out, s)
        found = tokens >= 0
        results = []
        for i in range(b):  # handing each stream its own results
            results.append(StepResult(tokens[i][found[i]].tolist(), frame_idx[i][found[i]].tolist(),
                                      int(frames_after[i]), encoded[i, :int(emitted[i])]))
        return results
