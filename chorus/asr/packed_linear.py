"""Inference products with the weight reordered once into oneDNN's blocked layout.

`F.linear` on CPU hands the weight to the GEMM as it is stored.  A streaming step has few rows (7 frames per
stream), and for few rows that kernel runs well below the memory bound; oneDNN's kernel over a weight reordered
once into its blocked layout ran the real-size FastConformer's encoder products x1.3-1.4 faster at 7 rows (one
stream) in fp32 and x1.2-1.3 at 7-224 rows in bf16 (bench/README.md, "Packed weights"), and the RNNT label
loop x1.25 at 16-64 streams.  Below `PACKED_MIN_ROWS` rows MKL's matrix-vector kernel is as fast, so it is
kept there.  Above `PACKED_BLOCK_ROWS` rows (37+ streams) one packed call ran no faster than the plain path,
but blocks of at most that many rows did (a 64-stream step x1.02 fp32, x1.04 bf16, which also saves the plain
path's copy of the bias into its output), so larger products go through in blocks.

The packed copy is a second copy of each weight (the module keeps its parameters for training, state_dict and
large batches): at the real size that is +461 MB in fp32, +230 MB in bf16.  Results equal F.linear's up to
the order of the sums (~1e-6 relative in fp32).

Products of few rows go through chorus' own kernels instead (`rows_kernel`, when they are built): they stream
their own packed copy of the weight once, at 9-13 GB/s in fp32 where oneDNN's kernel reached ~5.5 on one core.
fp32: every product when torch runs one thread (as fast as oneDNN up to 448 rows there), else products of at
most `FP32_ROWS_MAX_ROWS` rows (beyond that, oneDNN's two-thread kernel was faster).  bf16: products of at most
`BF16_ROWS_MAX_ROWS` rows on a CPU with AMX (beyond that, oneDNN's AMX kernel wins), `BF16_ROWS_MAX_ROWS_NO_AMX`
without (there both run on the same AVX512-BF16 dot products, and the kernel was x1.09-1.46 faster at 14-56 rows
on an AMD EPYC, even at 70).  A process that sees both ranges keeps both packed copies of a weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import rows_kernel

PACKED_MIN_ROWS = 4  # below, F.linear's matrix-vector path is faster (fp32, measured: bench/packed_linear.py)
PACKED_BLOCK_ROWS = 256  # larger products run in balanced blocks of at most this many rows
_ROWS_HINT = 16  # oneDNN picks the blocked layout for about this many rows; measured best for 7-224 rows
FP32_ROWS_MAX_ROWS = 32  # with more than one thread, fp32 products up to this many rows use rows_kernel
BF16_ROWS_MAX_ROWS = 8  # with AMX, bf16 products up to this many rows (one stream's step) use rows_kernel
BF16_ROWS_MAX_ROWS_NO_AMX = 56  # without AMX, up to eight streams' steps
_MAX_ENTRIES = 32  # per owner; a weight that is rebuilt (the fused Q/K/V) replaces its entry


class PackedWeights:
    """A module's packed weights, keyed by the weight tensor itself (held, so its id stays its own) and
    rebuilt when that tensor changes in place.  Never copied or pickled: oneDNN's opaque tensors have no
    storage, and a copy of a module must pack its own weights."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[torch.Tensor, tuple, torch.Tensor]] = {}

    def __deepcopy__(self, memo) -> "PackedWeights":
        return PackedWeights()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.entries = {}

    def get(self, weight: torch.Tensor, key: torch.Tensor, kind: str = "onednn") -> torch.Tensor:
        """The packed `weight` for `kind` ("onednn" or "rows"); `key` is the tensor it is a view of (a
        view shares its version counter)."""
        # The version counts in-place writes; `.data =` (what Module.to does) changes the pointer instead.
        stamp = (key._version, key.data_ptr(), key.dtype, weight.data_ptr(), weight.dtype)
        entry = self.entries.get((id(key), kind))
        if entry is None or entry[0] is not key or entry[1] != stamp:
            if len(self.entries) >= _MAX_ENTRIES:
                self.entries.clear()
            w = weight.detach()
            packed = rows_kernel.pack(w) if kind == "rows" else torch.ops.mkldnn._reorder_linear_weight(w, _ROWS_HINT)
            entry = (key, stamp, packed)
            self.entries[(id(key), kind)] = entry
        return entry[2]


def _inference_on_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (not torch.is_grad_enabled() and x.is_cpu and weight.is_cpu
            and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and (bias is None or bias.dtype == x.dtype) and weight.dim() == 2 and weight.layout == torch.strided
            and (bias is None or bias.is_contiguous()) and not torch.is_autocast_enabled("cpu"))


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _packable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (_inference_on_cpu(x, weight, bias) and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and PACKED_MIN_ROWS <= _rows(x))


def _takes_rows_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not _inference_on_cpu(x, weight, bias) or x.numel() == 0:
        return False
    if x.dtype == torch.float32:
        fits = torch.get_num_threads() == 1 or _rows(x) <= FP32_ROWS_MAX_ROWS
    else:
        most = BF16_ROWS_MAX_ROWS if rows_kernel.cpu_has_amx() else BF16_ROWS_MAX_ROWS_NO_AMX
        fits = _rows(x) <= most and x.shape[-1] % 2 == 0
    return fits and rows_kernel.kernel(x.dtype) is not None


_linear_pointwise = torch.ops.mkldnn._linear_pointwise.default if torch.backends.mkldnn.is_available() else None


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, post: str) -> torch.Tensor:
    """x [..., in] through the packed weight, with oneDNN's post-op `post`; in blocks of rows when large."""
    rows = x.numel() // x.shape[-1]
    if rows <= PACKED_BLOCK_ROWS:
        return _linear_pointwise(x.contiguous(), packed, bias, post, [], "")
    flat = x.reshape(rows, x.shape[-1])
    blocks = -(-rows // PACKED_BLOCK_ROWS)
    size = -(-rows // blocks)
    out = torch.cat([_linear_pointwise(flat[s:s + size], packed, bias, post, [], "") for s in range(0, rows, size)])
    return out.view(*x.shape[:-1], out.shape[-1])


def packed_linear(owner: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, key: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); at inference on CPU with few rows, through a packed copy of `weight`
    cached on `owner` (under `key`, the parameter `weight` is a view of, when it is one: a Conv1d's
    squeezed kernel).  Training, autograd, autocast and other devices take F.linear itself."""
    if _takes_rows_kernel(x, weight, bias):
        packed = _cache_of(owner).get(weight, weight if key is None else key, "rows")
        return rows_kernel.linear(x, packed, weight.shape[0], bias)
    if not _packable(x, weight, bias):
        return F.linear(x, weight, bias)
    packed = _cache_of(owner).get(weight, weight if key is None else key)
    return _packed_product(x, packed, bias, "none")


def _cache_of(owner: nn.Module) -> PackedWeights:
    cache = owner.__dict__.get("_packed_weights")
    if cache is None:
        cache = owner.__dict__["_packed_weights"] = PackedWeights()
    return cache


def linear_silu(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """silu(module(x)).  In bf16 on the packed path the activation is fused into the product (oneDNN's swish
    post-op: one pass over the output less); in fp32 it stays separate, since the fused one is an
    approximation (~4e-5 off here) that would move the fp32 path away from NeMo's."""
    if (type(module) is nn.Linear and x.dtype == torch.bfloat16 and _packable(x, module.weight, module.bias)
            and not _takes_rows_kernel(x, module.weight, module.bias)):
        packed = _cache_of(module).get(module.weight, module.weight)
        return _packed_product(x, packed, module.bias, "swish")
    y = linear(module, x)
    return F.silu(y, inplace=not torch.is_grad_enabled())


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for an nn.Linear through `packed_linear`; any other module (the int8 products) is called."""
    if type(module) is nn.Linear:
        return packed_linear(module, x, module.weight, module.bias)
    return module(x)
