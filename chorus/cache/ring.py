"""Frame rings: a sliding window of per-frame vectors per stream, written in place in a slot pool.

A cache-aware streaming encoder keeps, per layer, the last few frames of something (projected K
and V for attention, the depthwise convolution's inputs) and each step appends its new frames and
reads the window [history frames before the chunk, the chunk].  Instead of concatenating the cache
with the new frames and slicing the next cache out of the result (a copy of the whole window per
layer, then another to store it), the frames live in a ring of R rows per slot and layer, at row
`position mod R`: a step writes only its new frames (`index_copy_` into the pool tensor) and reads
the window back in time order with one `index_select`.  R must be at least history + the longest
chunk, so that writing a chunk never overwrites a frame the same chunk still attends to.

Row R of each ring is a trash row: the padded frames of a stream shorter than the batch's longest
chunk are written there, so a batch needs no per-stream branching and no host sync.

The pool tensor is `[slots, layers, R + 1, width]` (a `TensorSpec` like any other state; the
pool resets it when a slot is acquired).

A reader that does not care about time order (attention: keys and values are a set, their order
only has to match the mask and the positional term) takes the ring as it lies, `in_ring_order`: all
R rows of each stream, a view into the pool when the batch's slots are one ascending run (no copy
at all), and `key_index` [B, R] says which frame of the window each row holds (>= the window width:
a row outside it, to be hidden).
"""
from __future__ import annotations

import torch


def ring_rows(history: int, longest_chunk: int) -> int:
    """Rows a ring needs (without the trash row)."""
    return history + longest_chunk


class FrameRingWindow:
    """One step's view of a ring for a batch of slots: `update(layer, new)` writes and reads."""

    def __init__(self, ring: torch.Tensor, idx: torch.Tensor, first_pos: torch.Tensor, new_frames: int,
                 valid: torch.Tensor, history: int, *, in_ring_order: bool = False, first_slot: int | None = None):
        """ring [slots, L, R+1, d]; idx [B] slot indices; first_pos [B] absolute position of each
        stream's first new frame; new_frames the chunk width T; valid [B] how many of the T new
        frames are real; history frames before the chunk are read with it.  `in_ring_order`: `update`
        returns the R ring rows as they lie (see the module's notes), as a view when `first_slot` says
        that idx is first_slot, first_slot + 1, ..."""
        slots, layers, rows_plus, width = ring.shape
        rows = rows_plus - 1
        if history + new_frames > rows:
            raise ValueError(f"a ring of {rows} rows cannot hold {history} history + {new_frames} new frames")
        self.ring, self.idx, self.rows, self.first_slot = ring, idx, rows, first_slot
        self.flat = ring.view(slots * layers * rows_plus, width)
        self.layer_stride = rows_plus
        self.batch, self.width, self.window = idx.shape[0], width, history + new_frames
        base = (idx * layers * rows_plus)[:, None]
        j = torch.arange(new_frames, device=idx.device)[None, :]
        new_rows = torch.where(j < valid[:, None], torch.remainder(first_pos[:, None] + j, rows), rows)
        self.write_rows = (base + new_rows).reshape(-1)
        self.key_index = None
        if in_ring_order:  # row r holds the window's frame (r - first row of the window) mod R
            r = torch.arange(rows, device=idx.device)[None, :]
            self.key_index = torch.remainder(r - (first_pos[:, None] - history), rows)
        else:
            read_pos = first_pos[:, None] + torch.arange(-history, new_frames, device=idx.device)[None, :]
            self.read_rows = (base + torch.remainder(read_pos, rows)).reshape(-1)

    def update(self, layer: int, new: torch.Tensor) -> torch.Tensor:
        """Store new [B, T, d] for `layer`; return the window [B, history + T, d] in time order, or in ring
        order all R rows [B, R, d]."""
        off = layer * self.layer_stride
        self.flat.index_copy_(0, self.write_rows + off, new.reshape(-1, self.width).to(self.flat.dtype))
        if self.key_index is not None:
            if self.first_slot is not None:
                return self.ring[self.first_slot:self.first_slot + self.batch, layer, :self.rows]
            return self.ring[:, layer, :self.rows].index_select(0, self.idx)
        return self.flat.index_select(0, self.read_rows + off).view(self.batch, self.window, self.width)
