"""The flow's attention K/V, contiguous per slot, and one chunk's access to it.

Each attention stack (the encoder over tokens, the up-encoder and the estimator over mel frames) keeps its keys and
values in two preallocated tensors `[layers, slots, pair, heads, rows, head_dim]` (`pair` = 2 for the estimator's
CFG halves, 1 otherwise), written in place: a stream's keys so far are the view `k[layer, slot, :, :, :T]`, read by
the attention as it is (no gather, no copy that grows with the utterance).

Chunk-causal attention needs no mask: a new position in chunk c sees every stored position before the end of c
(and, with a bounded left context of L chunks, none before chunk c - L), so the new positions of one chunk share
one contiguous key range.  `ChunkKV` cuts each stream's new positions at chunk boundaries (a 100-token chunk is 4
encoder chunks, a 200-frame one 4 estimator chunks) and each piece attends, unmasked, to its key range.

Layouts (per stream, chosen at open):
* full left context (CosyVoice 2's `num_decoding_left_chunks: -1`, the default): position p at row p; a stream
  holds at most `rows` positions;
* bounded left context (`left_chunks` = L >= 0): a ring of `cap = rows // 2` rows written twice (row p mod cap and
  its mirror p mod cap + cap), so any `cap` consecutive positions are contiguous rows; a stream's state is at most
  (L + 1) chunks + the current one, whatever its length.

All offsets are host integers known before the step (positions come from the stream's own counters): nothing is
read back from the device per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


class SlotKV:
    """One attention stack's K/V for every slot: `k`, `v` `[layers, slots, pair, heads, rows, head_dim]`."""

    def __init__(self, name: str, *, layers: int, slots: int, pair: int, heads: int, head_dim: int, rows: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.name, self.rows, self.pair = name, rows, pair
        self.k = torch.zeros(layers, slots, pair, heads, rows, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def ring(self) -> int:
        """Ring capacity of a bounded stream (positions that are contiguous rows)."""
        return self.rows // 2


def visible_from(pos: int, chunk: int, left: int | None) -> int:
    """The first position a query at `pos` sees: 0, or the start of chunk `pos // chunk - left` (wenet's
    `subsequent_chunk_mask` with `num_left_chunks`)."""
    return 0 if left is None else max(0, (pos // chunk - left) * chunk)


@dataclass(frozen=True)
class Piece:
    """New positions [a, e) of one stream (rows qa:qe of its batch entry) and the key range [lo, e) they see, at
    rows ra:re of its K/V."""

    qa: int
    qe: int
    a: int
    e: int
    lo: int
    ra: int
    re: int


# torch's CPU flash attention, which also returns each query's log-sum-exp: with it a chunk's queries attend to the
# stream's cached keys in one unmasked call and to their own chunk's keys in a second, masked call, and the two are
# merged exactly (one large call is cheaper than one call per 50-frame piece, each reading every cached key)
_FLASH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class ChunkKV:
    """One step's access to a `SlotKV` for a batch of streams: where each stream's new K/V rows go and which
    contiguous key range each piece of its new positions attends to; shared by every layer and ODE step."""

    def __init__(self, kv: SlotKV, slots: list[int], starts: list[int], counts: list[int], chunk: int,
                 lefts: list[int | None]):
        self.kv, self.slots, self.counts = kv, slots, counts
        self.pieces: list[list[Piece]] = []
        self.writes: list[list[tuple[int, int, int]]] = []  # (qa, qe, row) runs of the new K/V, per stream
        self.max_keys = 0
        self.splits: list[tuple[int, int, Tensor | None] | None] = []  # full left context: (t0, n, new-key mask)
        cap = kv.ring()
        for t0, n, left in zip(starts, counts, lefts):
            end = t0 + n
            ring = left is not None
            if ring:
                keep = visible_from(t0, chunk, left)
                if end - keep > cap:
                    raise ValueError(f"{kv.name}: a left context of {left} chunks and a chunk of {n} new positions "
                                     f"need {end - keep} rows; a bounded stream holds {cap}")
            elif end > kv.rows:
                raise ValueError(f"{kv.name}: a stream would pass {kv.rows} positions (this engine's limit)")
            row = (lambda p: p % cap) if ring else (lambda p: p)  # noqa: E731
            writes = []
            p = t0
            while p < end:  # runs of new positions that are contiguous rows (a ring wraps at most once)
                stop = min(end, p - row(p) + cap) if ring else end
                writes.append((p - t0, stop - t0, row(p)))
                if ring:
                    writes.append((p - t0, stop - t0, row(p) + cap))  # the mirror
                p = stop
            pieces = []
            a = t0
            while a < end:
                e = min(end, (a // chunk + 1) * chunk)
                lo = visible_from(a, chunk, left)
                ra = row(lo)
                pieces.append(Piece(a - t0, e - t0, a, e, lo, ra, ra + e - lo))
                self.max_keys = max(self.max_keys, e - lo)
                a = e
            self.pieces.append(pieces)
            self.writes.append(writes)
            split = None
            if len(pieces) > 1 and all(c.lo == 0 for c in pieces):
                # every new query sees all cached keys (rows = positions: a ring has not wrapped while it sees all)
                # and its own chunk's new ones: a mask only over the new keys
                pos = torch.arange(t0, end)
                seen = pos[None, :] < ((pos // chunk + 1) * chunk)[:, None]
                split = (t0, n, torch.zeros(n, n).masked_fill_(~seen, float("-inf")))
            self.splits.append(split)

    def layer(self, layer: int) -> "LayerKV":
        return LayerKV(self, layer)


@dataclass
class LayerKV:
    """One attention layer of a `ChunkKV`.  Batch entries are stream-major: stream b's `pair` entries are rows
    b * pair ... b * pair + pair - 1 (the estimator's CFG halves side by side)."""

    step: ChunkKV
    layer: int

    def write(self, k: Tensor, v: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Store the new K/V `[B * pair, heads, W, head_dim]`; each stream's K/V buffers `[pair, heads, rows, d]`."""
        st, p = self.step, self.step.kv.pair
        ks, vs = [], []
        for b, slot in enumerate(st.slots):
            kb, vb = st.kv.k[self.layer, slot], st.kv.v[self.layer, slot]
            for qa, qe, row in st.writes[b]:
                kb[:, :, row:row + qe - qa].copy_(k[b * p:(b + 1) * p, :, qa:qe])
                vb[:, :, row:row + qe - qa].copy_(v[b * p:(b + 1) * p, :, qa:qe])
            ks.append(kb)
            vs.append(vb)
        return ks, vs

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Scaled dot-product attention of the new queries `[B * pair, heads, W, d]` over each stream's keys so far;
        `[B * pair, W, heads, d]`, zeros past each stream's new positions."""
        st, p = self.step, self.step.kv.pair
        ks, vs = self.write(k, v)
        out = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
        for b, pieces in enumerate(st.pieces):
            qb = q[b * p:(b + 1) * p]
            split = st.splits[b]
            if split is not None and _FLASH_LSE is not None and q.device.type == "cpu":
                t0, n, mask = split
                kn, vn = ks[b][:, :, t0:t0 + n], vs[b][:, :, t0:t0 + n]
                mask = mask.to(q.device, q.dtype)
                if t0 == 0:
                    o = F.scaled_dot_product_attention(qb[:, :, :n], kn, vn, attn_mask=mask)
                else:
                    o1, l1 = _FLASH_LSE(qb[:, :, :n], ks[b][:, :, :t0], vs[b][:, :, :t0])
                    o2, l2 = _FLASH_LSE(qb[:, :, :n], kn, vn, attn_mask=mask)
                    lse = torch.logaddexp(l1, l2)
                    o = o1 * (l1 - lse).exp_()[..., None] + o2 * (l2 - lse).exp_()[..., None]
                out[b * p:(b + 1) * p, :n] = o.transpose(1, 2)
                continue
            for c in pieces:
                o = F.scaled_dot_product_attention(qb[:, :, c.qa:c.qe], ks[b][:, :, c.ra:c.re], vs[b][:, :, c.ra:c.re])
                out[b * p:(b + 1) * p, c.qa:c.qe] = o.transpose(1, 2)
        return out


def rel_shift_view(bd: Tensor, keys: int) -> Tensor:
    """bd `[H, W, R]` (R = W + keys - 1): query i against relative-position rows ordered from the largest
    (i = W - 1, key 0) down; returns the `[H, W, keys]` view whose [h, i, j] is row W - 1 - i + j (i - j's row)."""
    h, w, r = bd.shape
    assert r == w + keys - 1 and bd.is_contiguous()
    return bd.as_strided((h, w, keys), (w * r, r - 1, 1), bd.storage_offset() + w - 1)


def scale_of(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
