"""int8 K/V state in KIVI's layout: keys per channel (one scale per channel per group of time steps),
values (and other per-frame state) per token.  Dequantized on read, in a few whole-batch tensor ops per
layer, or on CPU in one pass of a kernel the caller hands the rings (`read_rows`; chorus' int8_rows_dequant, the
same result bit for bit); no per-layer host reads (a ring step reads one shape per step: how many key groups its
chunks reach).

KIVI (Liu et al. 2024) observed that keys have outlier *channels* and values do not, so keys are
quantized per channel over a group of tokens and values per token.  Two stores here:

* `Int8TokenRing`, `Int8ChannelRing`: frame rings (cache/ring.py's idea) that hold only the `history`
  frames a chunk attends to before itself, at row `position mod history`.  A step first reads the
  history (dequantized), then writes its chunk's new frames over the oldest ones; the chunk's own new
  frames reach attention unquantized (a transient buffer), so the ring needs no rows for them.  A
  per-frame ring stores each stream's last min(T, H) real frames (a stream shorter than the batch's
  longest chunk rewrites rows it already holds with their own bytes), and a key group is rewritten
  whole, so padded frames never reach the state and there is no trash row either.  Keys' groups
  are aligned to absolute positions (`position // group`); a chunk
  that extends a group already holding frames raises the group's per-channel scale to cover the new
  frames and requantizes the group's earlier frames with it (exact when the scale did not change).
  A group's scale lives in a ring of `ceil(history / group) + 1` entries, so a new group never takes
  the scale of one still in the history.

* `QuantizedPagedKVCache`: `PagedKVCache` (paged.py) with int8 pages: keys with one scale per channel
  per page (the page is the group; a page extended later is requantized as above), values one scale
  per token and head.  Same interface: reserve, write, commit, gather/gather_rows/take, truncate.

Scales: per-channel key scales are stored as float16 (the figure that decides bytes per slot),
clamped to fp16's smallest normal (6.1e-5: a key channel smaller than that keeps an absolute error
below 3.1e-5); per-token scales as float32.  Quantized values are symmetric in [-127, 127].
Everything a stream stores depends only on that stream's frames, so batched equals alone exactly.
"""
from __future__ import annotations

import torch

from .paged import PagedKVCache

QMAX = 127.0
CHANNEL_SCALE_DTYPE = torch.float16
TOKEN_SCALE_DTYPE = torch.float32
MIN_SCALE = 2.0 ** -14  # float16's smallest normal


def _round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale as it will be stored (so that quantizing with it and dequantizing agree)."""
    return scale.clamp(min=MIN_SCALE).to(dtype).float()


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dim: x [..., C] -> (q int8 [..., C], scale float32 [...])."""
    x = x.float()
    scale = _round_scale(x.abs().amax(dim=-1) / QMAX, TOKEN_SCALE_DTYPE)
    q = torch.div(x, scale[..., None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def key_group_size(history: int, longest_chunk: int) -> int:
    """Frames per key-scale group: the largest group (at most half the history) whose touched groups
    fit the ring (a chunk of `longest_chunk` frames touches up to 1 + ceil((T - 1) / G) groups, whose
    rows must be distinct), so the fewest per-channel scales are stored."""
    for g in range(max(1, history // 2), 0, -1):
        if (1 + -(-(longest_chunk - 1) // g)) * g <= history:
            return g
    raise ValueError(f"a ring of {history} history frames cannot take chunks of {longest_chunk} frames in int8")


def key_scale_groups(history: int, group: int) -> int:
    """Entries of the key-scale ring: every group the history spans, and the one a chunk starts."""
    return -(-history // group) + 1


def read_rows(kernel, q: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor, srows: torch.Tensor | None,
              out: torch.Tensor) -> bool:
    """out [B, H, C] = the int8 rows q[rows] (B * H of them, in order) times their scales: per row (scales[rows],
    float32) or, given `srows`, per channel (scales[srows], float16), in one pass of `kernel` (the caller's
    compiled `int8_rows_dequant`, chorus/asr/rows_kernel.c; the same products and rounding as torch's ops). False
    where it does not apply (no kernel, not CPU, an output it cannot write): the caller then uses torch's ops."""
    b, h, c = out.shape
    if kernel is None or not q.is_cpu or c % 16 or out.dtype not in (torch.float32, torch.bfloat16) \
            or out.stride(-1) != 1 or rows.dtype != torch.int64 or rows.numel() != b * h:
        return False
    rows = rows.contiguous()
    srows = None if srows is None else srows.contiguous()
    if kernel(b * h, h, c, q.data_ptr(), rows.data_ptr(), scales.data_ptr(), None if srows is None else srows.data_ptr(),
              srows is not None, out.data_ptr(), out.stride(0), out.stride(1), out.dtype == torch.bfloat16):
        raise ValueError("int8_rows_dequant kernel rejected its arguments")
    return True


class _RingStep:
    """What a step's rings share across layers: rows read and written for a batch of slots."""

    def __init__(self, slots_rows: int, layers: int, idx: torch.Tensor, first_pos: torch.Tensor, new_frames: int,
                 valid: torch.Tensor, history: int):
        self.batch, self.t, self.history, self.layers = idx.shape[0], new_frames, history, layers
        self.base = (idx * layers * slots_rows)[:, None]
        self.rows_per_layer = slots_rows
        dev = idx.device
        read_pos = first_pos[:, None] + torch.arange(-history, 0, device=dev)[None, :]
        self.read_pos = read_pos
        self.read_rows = (self.base + torch.remainder(read_pos, history)).reshape(-1)
        # per-token rings store the last min(T, H) frames up to each stream's last real one; positions
        # before the chunk among them are already in the ring and keep their bytes
        w = min(new_frames, history)
        write_pos = (first_pos + valid)[:, None] - w + torch.arange(w, device=dev)[None, :]
        rel = write_pos - first_pos[:, None]
        self.write_rows = (self.base + torch.remainder(write_pos, history)).reshape(-1)
        self.write_src = (torch.arange(self.batch, device=dev)[:, None] * new_frames + rel.clamp(min=0)).reshape(-1)
        self.write_keep = (rel < 0).reshape(-1)
        self.first_pos, self.valid = first_pos, valid


class Int8TokenRing:
    """A batch's view of an int8 frame ring with one float32 scale per frame (values, conv inputs)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, step: _RingStep, kernel=None):
        """q [slots, L, history, C] int8; scale [slots, L, history] float32; `kernel`: see `read_rows`."""
        slots, layers, rows, width = q.shape
        self.q = q.view(slots * layers * rows, width)
        self.s = scale.view(slots * layers * rows)
        self.step, self.width, self.kernel = step, width, kernel

    def read(self, layer: int, out: torch.Tensor) -> None:
        """The history, dequantized into out [B, H, C] (any float dtype, may be a strided view), in time order."""
        st = self.step
        rows = st.read_rows + layer * st.rows_per_layer
        if read_rows(self.kernel, self.q, rows, self.s, None, out):
            return
        torch.mul(self.q.index_select(0, rows).float().view(st.batch, st.history, self.width),
                  self.s.index_select(0, rows).view(st.batch, st.history, 1), out=out)

    def write(self, layer: int, new: torch.Tensor) -> None:
        """Store new [B, T, C]: each stream's last min(T, H) real frames (padded ones are not stored)."""
        st = self.step
        rows = st.write_rows + layer * st.rows_per_layer
        q, s = quantize_tokens(new.reshape(-1, self.width).index_select(0, st.write_src))
        keep = st.write_keep
        q = torch.where(keep[:, None], self.q.index_select(0, rows), q)
        s = torch.where(keep, self.s.index_select(0, rows), s)
        self.q.index_copy_(0, rows, q)
        self.s.index_copy_(0, rows, s)


class Int8ChannelRing:
    """A batch's view of an int8 frame ring with per-channel float16 scales per group of `group` frames
    (aligned to absolute positions), for keys."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, step: _RingStep, group: int, kernel=None):
        """q [slots, L, history, C] int8; scale [slots, L, groups, C] float16 (a ring of groups); `kernel`: see
        `read_rows`."""
        slots, layers, rows, width = q.shape
        n_groups = scale.shape[2]
        if n_groups < key_scale_groups(rows, group):
            raise ValueError(f"{n_groups} key-scale groups cannot cover {rows} history frames in groups of {group}")
        self.q = q.view(slots * layers * rows, width)
        self.s = scale.view(slots * layers * n_groups, width)
        self.step, self.width, self.group, self.n_groups, self.kernel = step, width, group, n_groups, kernel
        dev = step.first_pos.device
        b, t, g = step.batch, step.t, group
        self.s_base = (step.base // rows) * n_groups                        # [B, 1] first scale row of each slot
        self.s_layer = n_groups
        self.read_srows = (self.s_base + torch.remainder(
            torch.div(step.read_pos, g, rounding_mode="floor"), n_groups)).reshape(-1)
        # the groups this chunk touches: g0 = first_pos // G and the next ones up to the chunk's end; the
        # step's one host read of the ring (a shape): chunks aligned to the groups (a [70, 6] model's 7 frames
        # in groups of 35) touch one group, not the two the longest chunk could
        span = (torch.remainder(step.first_pos, g) + step.valid.clamp(min=1) - 1).max() if b else 0
        touched = min(1 + int(span) // g, 1 + -(-(t - 1) // g)) if t > 0 else 0
        if touched * g > rows:
            raise ValueError(f"groups of {g} frames: a chunk of {t} touches {touched} groups, "
                             f"more than a ring of {rows} rows")
        gid = torch.div(step.first_pos, g, rounding_mode="floor")[:, None] + torch.arange(touched, device=dev)[None]
        gpos = gid[:, :, None] * g + torch.arange(g, device=dev)[None, None]             # [B, NG, G]
        rel = gpos - step.first_pos[:, None, None]                                         # index into the chunk
        self.is_new = (rel >= 0) & (rel < step.valid[:, None, None])
        self.is_old = rel < 0                                                              # earlier frames of g0
        self.active = (gid * g < (step.first_pos + step.valid)[:, None])                   # [B, NG] gets new frames
        self.has_old = (gid * g < step.first_pos[:, None]) & self.active
        self.src = (torch.arange(b, device=dev)[:, None, None] * t + rel.clamp(0, max(t - 1, 0))).reshape(-1)
        self.group_rows = (step.base + torch.remainder(gpos.reshape(b, -1), rows)).reshape(-1)
        self.group_srows = (self.s_base + torch.remainder(gid, n_groups)).reshape(-1)
        self.touched = touched

    def read(self, layer: int, out: torch.Tensor) -> None:
        st = self.step
        rows = st.read_rows + layer * st.rows_per_layer
        srows = self.read_srows + layer * self.s_layer
        if read_rows(self.kernel, self.q, rows, self.s, srows, out):
            return
        shape = (st.batch, st.history, self.width)
        torch.mul(self.q.index_select(0, rows).float().view(shape), self.s.index_select(0, srows).float().view(shape),
                  out=out)

    def write(self, layer: int, new: torch.Tensor) -> None:
        st, ng, g, c = self.step, self.touched, self.group, self.width
        if ng == 0:
            return
        rows = self.group_rows + layer * st.rows_per_layer
        srows = self.group_srows + layer * self.s_layer
        x = new.reshape(-1, c).float().index_select(0, self.src).view(st.batch, ng, g, c)
        q_old = self.q.index_select(0, rows).view(st.batch, ng, g, c)
        s_old = self.s.index_select(0, srows).float().view(st.batch, ng, c)
        amax = torch.where(self.is_new[..., None], x.abs(), 0.0).amax(dim=2) / QMAX
        s_new = torch.maximum(torch.where(self.has_old[..., None], s_old, 0.0), amax)
        s_new = torch.where(self.active[..., None], _round_scale(s_new, CHANNEL_SCALE_DTYPE), s_old)
        inv = s_new.reciprocal()[:, :, None]
        requant = (q_old.float() * (s_old[:, :, None] * inv)).round_()
        quant = (x * inv).round_()
        q = torch.where(self.is_new[..., None], quant, torch.where(self.is_old[..., None], requant, q_old.float()))
        self.q.index_copy_(0, rows, q.clamp_(-QMAX, QMAX).to(torch.int8).view(-1, c))
        self.s.index_copy_(0, srows, s_new.view(-1, c).to(self.s.dtype))


class Int8KVWindow:
    """`update(layer, [k | v] of the chunk)` for int8 K/V rings: returns [B, H + T, 2d] (the history
    dequantized, then the chunk's own K/V as computed) in the chunk's dtype, and stores the chunk."""

    def __init__(self, k_ring, k_scale, v_ring, v_scale, idx, first_pos, new_frames, valid, group: int,
                 kernel=None):
        slots, layers, history, _ = k_ring.shape
        self.step = _RingStep(history, layers, idx, first_pos, new_frames, valid, history)
        self.k = Int8ChannelRing(k_ring, k_scale, self.step, group, kernel)
        self.v = Int8TokenRing(v_ring, v_scale, self.step, kernel)
        self.d = k_ring.shape[-1]
        # The window is in time order (the history, then the chunk); saying so row by row, as a ring read where
        # it lies does, gives attention each key's relative position, which chorus' bf16 attention kernel takes
        # (without it the bf16 path fell back to torch's attention, ~14 % of a 16-stream step).
        self.key_index = torch.arange(history + new_frames, device=idx.device).expand(idx.shape[0], -1)

    def update(self, layer: int, new: torch.Tensor) -> torch.Tensor:
        b, t, _ = new.shape
        h, d = self.step.history, self.d
        out = torch.empty(b, h + t, 2 * d, dtype=new.dtype, device=new.device)
        self.k.read(layer, out[:, :h, :d])
        self.v.read(layer, out[:, :h, d:])
        out[:, h:] = new
        self.k.write(layer, new[..., :d])
        self.v.write(layer, new[..., d:])
        return out


class Int8FrameWindow:
    """`update(layer, new)` for an int8 ring with per-frame scales (depthwise conv inputs)."""

    def __init__(self, ring, scale, idx, first_pos, new_frames, valid, kernel=None):
        slots, layers, history, _ = ring.shape
        self.step = _RingStep(history, layers, idx, first_pos, new_frames, valid, history)
        self.ring = Int8TokenRing(ring, scale, self.step, kernel)

    def update(self, layer: int, new: torch.Tensor) -> torch.Tensor:
        b, t, c = new.shape
        h = self.step.history
        out = torch.empty(b, h + t, c, dtype=new.dtype, device=new.device)
        self.ring.read(layer, out[:, :h])
        out[:, h:] = new
        self.ring.write(layer, new)
        return out


# -- paged --------------------------------------------------------------------------------------------------

class QuantizedPagedKVCache(PagedKVCache):
    """int8 paged K/V: keys per channel per page (float16 scales), values per token and head (float32).

    `take`/`gather` return K and V dequantized to `dtype` (the compute dtype).  One extra page, never
    handed out, takes the writes of batch rows that have nothing to write, so `write` has fixed shapes.
    """

    def __init__(self, name: str, *, layers: int, heads: int, head_dim: int, page_size: int = 16,
                 pages: int | None = None, memory_budget: int | None = None, max_streams: int = 64,
                 max_tokens_per_stream: int = 4096, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.out_dtype = dtype
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        super().__init__(name, layers=layers, heads=heads, head_dim=head_dim, page_size=page_size, pages=pages,
                         memory_budget=memory_budget, max_streams=max_streams,
                         max_tokens_per_stream=max_tokens_per_stream, dtype=torch.int8, device=device)

    @staticmethod
    def page_bytes(layers: int, page_size: int, heads: int, head_dim: int, dtype: torch.dtype) -> int:
        data = 2 * layers * page_size * heads * head_dim                       # int8 K and V
        k_scales = layers * heads * head_dim * torch.empty((), dtype=CHANNEL_SCALE_DTYPE).element_size()
        v_scales = layers * page_size * heads * torch.empty((), dtype=TOKEN_SCALE_DTYPE).element_size()
        return data + k_scales + v_scales

    def _allocate(self, layers: int, rows: int, heads: int, head_dim: int, dtype: torch.dtype) -> None:
        ps = self.page_size
        self.trash_page = self.num_pages
        rows += ps  # the trash page
        self.k = torch.zeros(layers, rows, heads, head_dim, dtype=torch.int8, device=self.device)
        self.v = torch.zeros_like(self.k)
        self.k_scale = torch.zeros(layers, self.num_pages + 1, heads, head_dim, dtype=CHANNEL_SCALE_DTYPE,
                                   device=self.device)
        self.v_scale = torch.zeros(layers, rows, heads, dtype=TOKEN_SCALE_DTYPE, device=self.device)

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new K/V `[B, W, heads, head_dim]` at `rows` from `reserve` (-1: nothing, past a stream's count)."""
        b, w = rows.shape
        if w == 0:
            return
        ps, trash = self.page_size, self.trash_page * self.page_size
        valid = rows >= 0
        # values: per token and head; rows with nothing to write go to the trash page
        flat = torch.where(valid, rows, trash + torch.arange(w, device=rows.device) % ps).reshape(-1)
        qv, sv = quantize_tokens(v.reshape(b * w, self.heads, self.head_dim))
        self.v[layer].index_copy_(0, flat, qv)
        self.v_scale[layer].index_copy_(0, flat, sv)
        # keys: every page the write touches is rewritten with its (possibly raised) per-channel scale
        count = valid.sum(dim=1)
        off0 = torch.where(valid[:, 0], rows[:, 0] % ps, torch.zeros_like(count))
        n_pages = (ps - 1 + w - 1) // ps + 1
        i = torch.arange(n_pages, device=rows.device)[None, :]
        first_j = (i * ps - off0[:, None]).clamp(min=0)                            # [B, NP] a row in page i
        active = first_j < count[:, None]
        page = torch.where(active, rows.gather(1, first_j.clamp(max=w - 1)) // ps, self.trash_page)
        rel = i[:, :, None] * ps + torch.arange(ps, device=rows.device)[None, None] - off0[:, None, None]
        is_new = (rel >= 0) & (rel < count[:, None, None])                        # [B, NP, ps]
        is_old = rel < 0
        has_old = active & (i == 0) & (off0[:, None] > 0)
        hd = self.heads * self.head_dim
        src = (torch.arange(b, device=rows.device)[:, None, None] * w + rel.clamp(0, w - 1)).reshape(-1)
        x = k.reshape(b * w, hd).float().index_select(0, src).view(b, n_pages, ps, hd)
        page_rows = (page[:, :, None] * ps + torch.arange(ps, device=rows.device)[None, None]).reshape(-1)
        kq = self.k[layer].view(-1, hd)
        ks = self.k_scale[layer].view(-1, hd)
        q_old = kq.index_select(0, page_rows).view(b, n_pages, ps, hd)
        s_old = ks.index_select(0, page.reshape(-1)).float().view(b, n_pages, hd)
        amax = torch.where(is_new[..., None], x.abs(), 0.0).amax(dim=2) / QMAX
        s_new = _round_scale(torch.maximum(torch.where(has_old[..., None], s_old, 0.0), amax), CHANNEL_SCALE_DTYPE)
        inv = s_new.reciprocal()[:, :, None]
        q = torch.where(is_new[..., None], (x * inv).round_(),
                        torch.where(is_old[..., None], (q_old.float() * (s_old[:, :, None] * inv)).round_(),
                                    q_old.float()))
        kq.index_copy_(0, page_rows, q.clamp_(-QMAX, QMAX).to(torch.int8).view(-1, hd))
        ks.index_copy_(0, page.reshape(-1), s_new.view(-1, hd).to(ks.dtype))

    def take(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = rows.reshape(-1)
        shape = (*rows.shape, self.heads, self.head_dim)
        k = self.k[layer].index_select(0, flat).float() * \
            self.k_scale[layer].index_select(0, flat // self.page_size).float()
        v = self.v[layer].index_select(0, flat).float() * self.v_scale[layer].index_select(0, flat)[..., None]
        return k.view(shape).to(self.out_dtype), v.view(shape).to(self.out_dtype)


def paged_bytes_per_token(layers: int, heads: int, head_dim: int, page_size: int, kv_dtype: str,
                          dtype: torch.dtype = torch.float32) -> float:
    """Bytes one token of a paged K/V cache costs (scales included), for memory estimates."""
    if kv_dtype == "int8":
        return QuantizedPagedKVCache.page_bytes(layers, page_size, heads, head_dim, dtype) / page_size
    return PagedKVCache.page_bytes(layers, page_size, heads, head_dim, dtype) / page_size


__all__ = ["Int8KVWindow", "Int8FrameWindow", "QuantizedPagedKVCache", "key_group_size", "key_scale_groups",
           "quantize_tokens", "paged_bytes_per_token"]
