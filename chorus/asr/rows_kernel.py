"""Products of few rows through chorus' own kernels (rows_kernel.c): fp32 on AVX-512, bf16 on AVX512-BF16.

A streaming step multiplies few rows (7 frames per stream) by every weight of the model, so its products are
bound by how fast the weights stream from memory.  On one core of this project's machines oneDNN's kernel read
fp32 weights at ~5.5 GB/s at 7 rows, while a plain read runs at 8-10 GB/s; the kernels here walk weights packed
as [column block][k][16] once, sequentially, at 9-13 GB/s in fp32 (bench/packed_linear.py).  Each output is its
dot product summed in k order, so a row's result never depends on the other rows of the call: batched equals
alone bit for bit.

The C source is compiled once per machine with the system's C compiler (`$CC`, else `cc`) into
`$CHORUS_KERNEL_DIR` (default `~/.cache/chorus/kernels`), named by a hash of the source and flags, and loaded
with ctypes.  Without a compiler, without AVX-512 (torch's CPU capability), when the build fails, or with
`CHORUS_ROWS_KERNEL=0`, `kernel()` is None and the products go through oneDNN; the bf16 kernel also needs the
CPU's AVX512-BF16 (`avx512_bf16` in /proc/cpuinfo).  `status()` says which are on and why not.

The same library holds per-row kernels of the FastConformer's bf16 path (`fused(key)`, on where the bf16 kernel is):
the residual add + layer norm ("add_layer_norm", used by residual_norm.py), the subsampling's first convolution with
its bias and ReLU, in bf16 or fp32 ("conv_taps_relu"), the same with the depthwise convolution after it, fp32
("subsample_first_two"), the convolution module's depthwise convolution with its layer norm and Swish
("depthwise_norm_silu", used by depthwise.py), the attention over a ring of keys with its positional term
("ring_attention"), and the RNNT predictor's LSTM cell for the streams that emitted a label ("lstm_cell", used by
heads.py); and the read of an int8 K/V or conv ring's history, dequantized in one pass ("int8_rows_dequant", used by
chorus/cache/quantized.py through conformer/streaming.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ("-O3", "-mavx512f", "-mfma", "-shared", "-fPIC")  # the bf16 functions name their own target
BLOCK = 16  # output columns per packed block (one AVX-512 register of fp32 sums)
# Split a product over torch's threads only when each part still streams enough weight to hide the handoff
# (~20-40 us through a Python thread pool).
SPLIT_MIN_WEIGHT_BYTES = 256 * 1024

_INT, _PTR, _FLOAT = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
# The bf16 path's per-row kernels in rows_kernel.c: key -> (C function, its argument types).
_FUSED = {
    "add_layer_norm": ("bf16_add_layer_norm", [_INT, _INT, _PTR, _PTR, _FLOAT, _PTR, _PTR, _PTR, _FLOAT, _PTR, _INT]),
    "conv_taps_relu": ("bf16_conv_taps_relu", [_INT] * 3 + [_PTR] * 4 + [_INT]),
    "subsample_first_two": ("subsample_first_two", [_INT] * 3 + [_PTR] * 2 + [_INT] * 2 + [_PTR] * 4 + [_INT] * 2
                            + [_PTR]),
    "int8_rows_dequant": ("int8_rows_dequant", [_INT] * 3 + [_PTR] * 4 + [_INT, _PTR] + [ctypes.c_int64] * 2
                          + [_INT]),
    "depthwise_norm_silu": ("bf16_depthwise_norm_silu", [_INT] * 4 + [_PTR] * 5 + [_FLOAT, _PTR]),
    "lstm_cell": ("lstm_cell_emitting", [_INT] * 3 + [_PTR] * 7),
    "ring_attention": ("bf16_ring_attention", [_INT] * 6 + [_PTR] * 4 + [ctypes.c_int64] * 2 + [_PTR] * 3
                       + [_FLOAT, _PTR]),
}

_lock = threading.Lock()
_state: dict = {}
log = logging.getLogger(__name__)


def _disabled_reason() -> str | None:
    if os.environ.get("CHORUS_ROWS_KERNEL", "1").lower() in ("0", "off", "false", "no"):
        return "disabled by CHORUS_ROWS_KERNEL"
    capability = torch.backends.cpu.get_cpu_capability()
    if not (capability.startswith("AVX512") or capability.startswith("AMX")):
        return f"the CPU (torch capability {capability}) has no AVX-512"
    return None


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    if "flags" not in _state:
        try:
            with open("/proc/cpuinfo") as f:
                line = next((line for line in f if line.startswith("flags")), "")
        except OSError:
            line = ""
        _state["flags"] = frozenset(line.partition(":")[2].split())
    return _state["flags"]


def _cpu_has_avx512_bf16() -> bool:
    return "avx512_bf16" in _cpu_flags()


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX's bf16 tiles, which oneDNN's bf16 products use (a few times faster there)."""
    return "amx_bf16" in _cpu_flags()


def _cache_dir() -> Path:
    configured = os.environ.get("CHORUS_KERNEL_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chorus" / "kernels"


def _build() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError("no C compiler (set CC, or install gcc)")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode() + compiler.encode()).hexdigest()[:16]
    directory = _cache_dir()
    library = directory / f"rows_kernel-{digest}.so"
    if not library.exists():
        directory.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: processes that build at once never load a partial file.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCE)], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(partial, library)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    lib = ctypes.CDLL(str(library))
    for name in ("fp32_rows_linear", "bf16_rows_linear"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 2
    for name, argtypes in _FUSED.values():
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = argtypes
    return lib


def _decide() -> None:
    reason, lib = _disabled_reason(), None
    if reason is None:
        try:
            lib = _build()
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            reason = f"build failed: {e}"
    _state["reason"] = reason
    _state[torch.float32] = lib.fp32_rows_linear if lib else None
    bf16 = lib is not None and _cpu_has_avx512_bf16()
    _state[torch.bfloat16] = lib.bf16_rows_linear if bf16 else None
    for key, (name, _) in _FUSED.items():
        _state[("fused", key)] = getattr(lib, name) if bf16 else None
    _state["bf16_reason"] = reason or (None if bf16 else "the CPU has no AVX512-BF16")
    _state["decided"] = True


def kernel(dtype: torch.dtype = torch.float32):
    """The compiled kernel for `dtype` (fp32 or bf16), or None (see `status`)."""
    if _state.get("off"):
        return None
    if "decided" not in _state:
        with _lock:
            if "decided" not in _state:
                _decide()
    return _state.get(dtype)


def fused(key: str):
    """The compiled per-row kernel `key` of the bf16 path (one of `_FUSED`), or None where the bf16 kernel is off
    (see `status`); the callers then take torch's ops."""
    return _state.get(("fused", key)) if kernel(torch.bfloat16) is not None else None


def status() -> str:
    """Which kernels are on, and why the others are not."""
    if _state.get("off"):
        return "off (switched off by rows_kernel.switched_off)"
    if kernel() is None:
        return f"off ({_state['reason']})"
    bf16 = "on" if kernel(torch.bfloat16) is not None else f"off ({_state['bf16_reason']})"
    return f"fp32 on, bf16 {bf16}"


def prepare(device: torch.device | str) -> None:
    """For a model about to serve on `device`: on CPU, build the kernels now (not inside a first request's
    step, which would hold up the event loop) and log which are on."""
    if torch.device(device).type == "cpu":
        log.info("few-row products through chorus' kernels: %s", status())


@contextmanager
def switched_off():
    """Inside, `kernel()` is None and products take oneDNN: benches compare both in one process."""
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = False


def reset() -> None:
    """Forget the kernels (tests and benches switch CHORUS_ROWS_KERNEL); the next call decides again."""
    with _lock:
        if "pool" in _state:
            _state["pool"].shutdown(wait=False)
        _state.clear()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> fp32 [ceil(N/16), K, 16], or bf16 [ceil(N/16), K/2, 16, 2] (K even): each block of 16 output
    columns with its weights side by side, zero past N."""
    n, k = weight.shape
    blocks = -(-n // BLOCK)
    padded = weight.new_zeros(blocks * BLOCK, k)
    padded[:n] = weight
    if weight.dtype == torch.bfloat16:
        return padded.view(blocks, BLOCK, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return padded.view(blocks, BLOCK, k).transpose(1, 2).contiguous()


def _pool(workers: int) -> ThreadPoolExecutor:
    if _state.get("pool_workers") != workers:
        with _lock:
            if _state.get("pool_workers") != workers:
                if "pool" in _state:
                    _state["pool"].shutdown(wait=False)
                _state["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="chorus-rows-kernel")
                _state["pool_workers"] = workers
    return _state["pool"]


def over_streams(streams: int, call) -> bool:
    """Run `call(start, stop)`, a kernel call over streams [start, stop) that lets the GIL go and returns nonzero
    on failure, split over torch's threads (streams are independent, so the split changes no result); True if any
    part failed."""
    threads = min(torch.get_num_threads(), streams)
    if threads <= 1:
        return bool(call(0, streams))
    bounds = [streams * i // threads for i in range(threads + 1)]
    parts = [_pool(threads - 1).submit(call, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    failed = bool(call(bounds[0], bounds[1]))
    return any([p.result() for p in parts]) or failed


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] times the weight `pack` made (its first `out_features` columns), plus `bias`, in x's dtype
    (the packed weight's).  The caller has checked that `kernel(x.dtype)` is not None.  ctypes lets the GIL go
    during the call, so the column blocks can be split over torch's threads."""
    fn = kernel(packed.dtype)
    k = packed.shape[1] * (2 if packed.dtype == torch.bfloat16 else 1)
    flat = x if x.dim() == 2 else x.reshape(-1, k)  # (reshape and view cost ~1 us each: a label step is small)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    rows = flat.shape[0]
    out = torch.empty(rows, out_features, dtype=packed.dtype)
    args = (rows, out_features, k, flat.data_ptr(), packed.data_ptr(),
            None if bias is None else bias.data_ptr(), out.data_ptr())
    blocks = packed.shape[0]
    if packed.nbytes >= 2 * SPLIT_MIN_WEIGHT_BYTES and torch.get_num_threads() > 1:
        threads = min(torch.get_num_threads(), blocks // 2, packed.nbytes // SPLIT_MIN_WEIGHT_BYTES)
        bounds = [2 * ((blocks // 2) * i // threads) for i in range(threads)] + [blocks]
        pool = _pool(threads - 1)
        parts = [pool.submit(fn, *args, bounds[i], bounds[i + 1]) for i in range(1, threads)]
        failed = fn(*args, bounds[0], bounds[1]) | any(p.result() for p in parts)
    else:
        failed = fn(*args, 0, blocks)
    if failed:
        raise ValueError(f"rows kernel rejected {packed.dtype} rows={rows} N={out_features} K={k}")
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out_features)
