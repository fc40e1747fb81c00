"""Backend choice. Each backend has a `can_run_<backend>` predicate that
returns None when it can run the case and the reason when it cannot;
backend="auto" takes the first that can, in a per-device order, and logs why.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from fastattn import _ext

log = logging.getLogger("fastattn")

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
# On a GPU: the CUDA C++ kernels first for CBAM (memory-bound, hand-vectorised);
# Triton first for attention (tensor-core tiles through tl.dot).
_AUTO_ORDER = {
    ("cbam", "cuda"): ("cuda", "triton", "reference"),
    ("attention", "cuda"): ("triton", "cuda", "reference"),
    ("cbam", "cpu"): ("cpu", "reference"),
    ("attention", "cpu"): ("cpu", "reference"),
}
_COMPILED_OP = {"cbam": "channel_pool", "attention": "spatial_attention_forward"}


class BackendUnavailable(RuntimeError):
    pass


@functools.lru_cache(None)
def triton_available() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run_reference(family: str, device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _can_run_compiled(family: str, device: torch.device, backend: str) -> str | None:
    """Shared by the cpu and cuda backends: a tensor of their device and a kernel in fastattn._C."""
    if device.type != backend:
        return f"the {backend} backend runs {backend.upper()} tensors, got a {device.type} tensor"
    if _ext._C is None:
        return f"fastattn._C is not built ({_ext.LOAD_ERROR}); {_ext.BUILD_HINT}"
    if not _ext.has_kernel(_COMPILED_OP[family], backend.upper()):
        why = " (no nvcc or a CPU build of torch at build time)" if backend == "cuda" else ""
        return f"fastattn._C was built without {backend.upper()} kernels for {family}{why}"
    return None


def can_run_cpu(family: str, device: torch.device, dtype: torch.dtype) -> str | None:
    return _can_run_compiled(family, device, "cpu")


def can_run_cuda(family: str, device: torch.device, dtype: torch.dtype) -> str | None:
    reason = _can_run_compiled(family, device, "cuda")
    # the CUDA kernels are compiled without float64 (csrc/cuda/dispatch.cuh): float64 runs on the reference backend
    if reason is None and dtype == torch.float64:
        return "the cuda backend supports float32, float16 and bfloat16, not float64"
    return reason


def can_run_triton(family: str, device: torch.device, dtype: torch.dtype) -> str | None:
    reason = triton_available()
    if reason:
        return reason
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        return f"the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type}"
    if dtype == torch.float64:
        return "the triton backend supports float32, float16 and bfloat16, not float64"
    return None


_PREDICATES = {"reference": can_run_reference, "cpu": can_run_cpu, "cuda": can_run_cuda, "triton": can_run_triton}


# choose()'s answers: what can run depends only on the key (the compiled library and Triton are
# loaded once), and a module call should not pay for the predicates again (~50 us in total when
# the interpreter's data has just been evicted by the previous op)
_CHOSEN: dict[tuple, tuple[str, str]] = {}


def choose(family: str, device: torch.device, dtype: torch.dtype, backend: str = "auto") -> tuple[str, str]:
    """Returns (backend, reason). A named backend that cannot run the case raises."""
    if torch.compiler.is_compiling():  # traced once; a constant of the graph
        return _choose(family, device, dtype, backend)
    key = (family, device.type, dtype, backend, triton_interpreted())
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _CHOSEN[key] = _choose(family, device, dtype, backend)
    return chosen


def _choose(family: str, device: torch.device, dtype: torch.dtype, backend: str) -> tuple[str, str]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = _PREDICATES[backend](family, device, dtype)
        if reason:
            raise BackendUnavailable(f"backend={backend!r} cannot run this {family} call ({dtype} on {device}): {reason}")
        return backend, "named explicitly"
    order = _AUTO_ORDER.get((family, device.type), ("reference",))
    refusals = []
    for name in order:
        reason = _PREDICATES[name](family, device, dtype)
        if reason is None:
            why = f"first available for {device.type} {dtype}" + (f" ({'; '.join(refusals)})" if refusals else "")
            if not torch.compiler.is_compiling():  # a logger call would break torch.compile's graph
                log.debug("fastattn %s: backend %s: %s", family, name, why)
            return name, why
        refusals.append(f"{name}: {reason}")
    raise AssertionError("the reference backend always runs")


def explain(family: str, tensor: torch.Tensor, backend: str = "auto") -> str:
    """Which backend a call on `tensor` would take and why. family: "cbam" or "attention"."""
    name, why = choose(family, tensor.device, tensor.dtype, backend)
    return f"{family} on {tensor.device.type} {tensor.dtype}: backend {name!r}: {why}"
