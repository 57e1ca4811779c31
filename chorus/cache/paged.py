"""Paged K/V for state that grows with the stream (decoder self-attention, TTS K/V).

Keys and values live in one preallocated tensor per layer of `pages * page_size` token rows.
Each stream owns a row of the page table (`[streams, max_pages]`, -1 = unused) and a length.
`reserve` maps the next tokens of a batch of streams to rows (taking pages from the free list),
each layer `write`s its new K/V to those rows with one `index_copy_`, `commit` advances the
lengths, and `gather` reads a batch's K/V back as dense `[B, T, heads, head_dim]` plus a mask.
"""
from __future__ import annotations

import threading

import torch

from .pool import PoolExhausted, _register


class PagedKVCache:
    def __init__(self, name: str, *, layers: int, heads: int, head_dim: int, page_size: int = 16,
                 pages: int | None = None, memory_budget: int | None = None, max_streams: int = 64,
                 max_tokens_per_stream: int = 4096, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        bytes_per_page = self.page_bytes(layers, page_size, heads, head_dim, dtype)
        if pages is None:
            if memory_budget is None:
                raise ValueError("give either pages or memory_budget")
            pages = memory_budget // bytes_per_page
        if pages < 1:
            raise ValueError(f"paged cache {name!r}: the budget does not fit one page of {bytes_per_page} bytes")
        self.name = name
        self.page_size = page_size
        self.num_pages = int(pages)
        self.bytes_per_page = bytes_per_page
        self.device = torch.device(device)
        self.max_pages_per_stream = -(-max_tokens_per_stream // page_size)
        self._allocate(layers, self.num_pages * page_size, heads, head_dim, dtype)
        self.page_table = torch.full((max_streams, self.max_pages_per_stream), -1, dtype=torch.long,
                                     device=self.device)
        self.lengths = torch.zeros(max_streams, dtype=torch.long, device=self.device)
        self._pages_of: dict[int, list[int]] = {}
        self._free_pages = list(range(self.num_pages - 1, -1, -1))
        self._free_streams = list(range(max_streams - 1, -1, -1))
        self._lock = threading.Lock()
        _register(self)

    @staticmethod
    def page_bytes(layers: int, page_size: int, heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """What one page costs (K and V of every layer); a subclass storing more says so here."""
        return 2 * layers * page_size * heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def _allocate(self, layers: int, rows: int, heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.k = torch.zeros(layers, rows, heads, head_dim, dtype=dtype, device=self.device)
        self.v = torch.zeros_like(self.k)

    # -- occupancy -------------------------------------------------------------------------
    @property
    def pages_used(self) -> int:
        return self.num_pages - len(self._free_pages)

    @property
    def streams_open(self) -> int:
        return len(self._pages_of)

    @property
    def nbytes(self) -> int:
        return self.num_pages * self.bytes_per_page

    @property
    def used(self) -> int:
        """Open streams (what leak checks count)."""
        return self.streams_open

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, streams={self.streams_open}, "
                f"pages={self.pages_used}/{self.num_pages}, {self.nbytes / 2**20:.1f} MiB)")

    # -- lifetime --------------------------------------------------------------------------
    def open(self) -> int:
        with self._lock:
            if not self._free_streams:
                raise PoolExhausted(f"paged cache {self.name!r} has no free stream entry")
            sid = self._free_streams.pop()
            self._pages_of[sid] = []
        self.lengths[sid] = 0
        self.page_table[sid].fill_(-1)
        return sid

    def close(self, sid: int) -> None:
        with self._lock:
            pages = self._pages_of.pop(sid)
            self._free_pages.extend(reversed(pages))
            self._free_streams.append(sid)
        self.page_table[sid].fill_(-1)
        self.lengths[sid] = 0

    def truncate(self, sid: int, length: int) -> None:
        """Forget tokens from `length` on (e.g. unstable decoder tokens) and free their pages."""
        if not 0 <= length <= int(self.lengths[sid]):
            raise ValueError(f"cannot truncate stream {sid} of length {int(self.lengths[sid])} to {length}")
        keep = -(-length // self.page_size)
        with self._lock:
            pages = self._pages_of[sid]
            dropped = pages[keep:]
            del pages[keep:]
            self._free_pages.extend(reversed(dropped))
        self.page_table[sid, keep:].fill_(-1)
        self.lengths[sid] = length

    # -- batched access --------------------------------------------------------------------
    def reserve(self, sids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows for the next `counts[b]` tokens of each stream: `[B, max(counts)]`, -1 past counts.

        Pages are allocated all-or-nothing: on PoolExhausted no stream has gained a page.
        """
        sids = sids.to(self.device, torch.long)
        counts = counts.to(self.device, torch.long)
        need_tokens = self.lengths[sids] + counts
        need_pages = (need_tokens + self.page_size - 1) // self.page_size
        with self._lock:
            plan = []
            for sid, n in zip(sids.tolist(), need_pages.tolist()):
                missing = n - len(self._pages_of[sid])
                if n > self.max_pages_per_stream:
                    raise PoolExhausted(f"stream {sid} would exceed {self.max_pages_per_stream} pages")
                if missing > 0:
                    plan.append((sid, missing))
            total = sum(m for _, m in plan)
            if total > len(self._free_pages):
                raise PoolExhausted(f"paged cache {self.name!r} needs {total} pages, {len(self._free_pages)} free")
            for sid, missing in plan:
                new = [self._free_pages.pop() for _ in range(missing)]
                start = len(self._pages_of[sid])
                self._pages_of[sid].extend(new)
                self.page_table[sid, start:start + missing] = torch.tensor(new, device=self.device)
        width = int(counts.max()) if counts.numel() else 0
        offs = torch.arange(width, device=self.device)
        pos = self.lengths[sids, None] + offs
        rows = self._rows(sids, pos)
        return torch.where(offs < counts[:, None], rows, torch.full_like(rows, -1))

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new K/V `[B, W, heads, head_dim]` at `rows` from `reserve` (rows of -1 are skipped)."""
        valid = rows.reshape(-1) >= 0
        flat_rows = rows.reshape(-1)[valid]
        self.k[layer].index_copy_(0, flat_rows, k.reshape(-1, *k.shape[2:])[valid].to(self.k.dtype))
        self.v[layer].index_copy_(0, flat_rows, v.reshape(-1, *v.shape[2:])[valid].to(self.v.dtype))

    def commit(self, sids: torch.Tensor, counts: torch.Tensor) -> None:
        self.lengths.index_add_(0, sids.to(self.device, torch.long), counts.to(self.device, torch.long))

    def gather(self, layer: int, sids: torch.Tensor, extra: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense K, V `[B, T, heads, head_dim]` and a validity mask `[B, T]` for a batch.

        `extra[b]` tokens beyond the committed length are included too (tokens written this
        step but not yet committed).
        """
        rows, mask = self.gather_rows(sids, extra)
        k, v = self.take(layer, rows)
        return k, v, mask

    def gather_rows(self, sids: torch.Tensor, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows `gather` reads for a batch (`[B, T]`, 0 where masked) and its mask: computed once, they serve
        every layer of a step (`take`) as long as no stream is reserved or committed in between."""
        sids = sids.to(self.device, torch.long)
        lengths = self.lengths[sids] + (0 if extra is None else extra.to(self.device, torch.long))
        width = int(lengths.max()) if lengths.numel() else 0
        pos = torch.arange(width, device=self.device).expand(len(sids), width)
        mask = pos < lengths[:, None]
        rows = torch.where(mask, self._rows(sids, pos.clamp(max=max(width - 1, 0))), torch.zeros_like(pos))
        return rows, mask

    def take(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense K, V `[B, T, heads, head_dim]` of `layer` at `rows` from `gather_rows`."""
        shape = (*rows.shape, *self.k.shape[2:])
        k = self.k[layer].index_select(0, rows.reshape(-1)).view(shape)
        v = self.v[layer].index_select(0, rows.reshape(-1)).view(shape)
        return k, v

    def _rows(self, sids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        page_idx = (pos // self.page_size).clamp(max=self.max_pages_per_stream - 1)
        pages = self.page_table[sids[:, None], page_idx]
        return pages * self.page_size + pos % self.page_size
