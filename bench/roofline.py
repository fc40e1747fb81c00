"""The machine's own limits, measured in the same run as the kernels.

* copy bandwidth: `dst.copy_(src)` of a tensor larger than the last-level
  cache; bytes = read + written = 2 * nbytes; GB/s = 1e9 bytes/s.
* matmul throughput: `a @ b` of square n x n matrices per dtype;
  flop = 2 n^3; GFLOP/s = 1e9 flop/s.
* the device's dense peak (GPU): from its name, in DENSE_PEAK_TFLOPS; no
  figure for a device not in the table.
Each measured figure is the best of repeated runs after a warm-up: the machine's capability,
which a disturbed run (a shared machine) under-states; the kernels' figures
are medians, so their % of roofline is, if anything, low.
"""
from __future__ import annotations

import re

import torch

from bench import allocator
from bench.env import last_level_cache_bytes
from bench.timing import Clock, median

_MiB = 2**20


def copy_buffer_bytes(device: torch.device, quick: bool) -> int:
    if quick:
        return 32 * _MiB
    if device.type == "cuda":
        return 1024 * _MiB
    llc = last_level_cache_bytes() or 0
    # twice the LLC so the copy streams from DRAM, within [256 MiB, 1 GiB]
    return max(256 * _MiB, min(1024 * _MiB, 2 * llc))


def copy_bandwidth(device: torch.device, clock: Clock, quick: bool, repeats: int) -> dict:
    nbytes = copy_buffer_bytes(device, quick)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    clock.sync()
    times = [clock.time(lambda: dst.copy_(src)) for _ in range(repeats)]
    del src, dst
    allocator.trim()
    return {"gbs": 2 * nbytes / min(times) / 1e9, "median_gbs": 2 * nbytes / median(times) / 1e9,
            "buffer_bytes": nbytes, "bytes_moved": 2 * nbytes, "times_s": times,
            "method": "dst.copy_(src), float32, bytes read + written = 2 * nbytes, best of the runs"}


def matmul_size(device: torch.device, quick: bool) -> int:
    if quick:
        return 256
    return 8192 if device.type == "cuda" else 2048


def _cpu_16bit_size(dtype: torch.dtype, clock: Clock, largest: int, call_s: float = 0.1) -> int:
    """A CPU without native 16-bit matmul (AVX2 only) runs it a hundred times slower than float32 (a 2048^2
    bfloat16 a @ b took minutes on one): from 256, double n while a call stays under call_s."""
    n = 256
    while n < largest:
        a = torch.ones(n, n, dtype=dtype)
        if clock.time(lambda: a @ a) * 8 > call_s:
            break
        n *= 2
    return n


def matmul_throughput(device: torch.device, dtype: torch.dtype, clock: Clock, quick: bool, repeats: int) -> dict:
    n = matmul_size(device, quick)
    if device.type == "cpu" and dtype != torch.float32:
        n = _cpu_16bit_size(dtype, clock, n)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    clock.sync()
    times = [clock.time(lambda: a @ b) for _ in range(repeats)]
    return {"gflops": 2 * n**3 / min(times) / 1e9, "median_gflops": 2 * n**3 / median(times) / 1e9, "n": n,
            "times_s": times, "method": f"a @ b, {n}x{n} {str(dtype).replace('torch.', '')}, flop = 2 n^3, "
                                       "best of the runs"}


def matmul_dtypes(device: torch.device, case_dtypes=()) -> list[torch.dtype]:
    """Every dtype on a GPU; float32 and the run's other case dtypes on the CPU."""
    if device.type == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32] + [getattr(torch, d) for d in case_dtypes if d != "float32"]


# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets, by dtype of the inputs: "float32" is the
# FFMA peak, "tf32" the tensor-core float32 peak. (pattern on the device's name, left out if in it, label)
DENSE_PEAK_TFLOPS = (
    (r"\bH100\b.*\b(HBM3|SXM)", "NVL", "H100 SXM",
     {"float16": 989.0, "bfloat16": 989.0, "tf32": 495.0, "float32": 67.0}),
    (r"\bH200\b", "NVL", "H200", {"float16": 989.0, "bfloat16": 989.0, "tf32": 495.0, "float32": 67.0}),
    (r"\bA100\b", None, "A100", {"float16": 312.0, "bfloat16": 312.0, "tf32": 156.0, "float32": 19.5}),
)


def dense_peak(device_name: str | None) -> dict | None:
    """{"device", "tflops": {dtype: TFLOP/s}, "source"} for a GPU in DENSE_PEAK_TFLOPS, else None."""
    for pattern, unless, label, tflops in DENSE_PEAK_TFLOPS:
        if device_name and re.search(pattern, device_name) and not (unless and unless in device_name):
            return {"device": label, "tflops": dict(tflops),
                    "source": f"NVIDIA data sheet, dense, read from the device name {device_name!r}"}
    return None


def measure(device: torch.device, clock: Clock, quick: bool, case_dtypes=()) -> dict:
    repeats = 3 if quick else 7
    out = {"copy": copy_bandwidth(device, clock, quick, repeats), "matmul": {}}
    for dtype in matmul_dtypes(device, case_dtypes):
        out["matmul"][str(dtype).replace("torch.", "")] = matmul_throughput(device, dtype, clock, quick, repeats)
    out["peak"] = dense_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if device.type == "cuda":
        out["matmul_note"] = f"float32 with TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    return out
