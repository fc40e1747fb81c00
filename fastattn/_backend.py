"""Backend choice. Each backend has a `can_run_<backend>` predicate that
returns None when it can run the case and the reason when it cannot;
backend="auto" takes the first that can, in a per-device order (per op where
_AUTO_OP_ORDER has one), and logs why.
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
# On a GPU: CBAM's ops each in their own order (_AUTO_OP_ORDER; the family's order names the backend of
# the module as a whole); Triton first for attention (tensor-core tiles through tl.dot).
_AUTO_ORDER = {
    ("cbam", "cuda"): ("cuda", "triton", "reference"),
    ("attention", "cuda"): ("triton", "cuda", "reference"),
    ("cbam", "cpu"): ("cpu", "reference"),
    ("attention", "cpu"): ("cpu", "reference"),
}
# CBAM on a GPU, op by op: the backend that was faster on an H100 at 32x256x56x56 float16, NCHW and
# channels_last times summed (bench/results/h100/cuda-cbam-ops.bench.log against
# bench/results/h100/triton-cbam-ops.bench.log; both backends passed the GPU tests in that folder).
# Both keep the op contract (maxima, argmax and tie counts equal the reference's), so ops mix.
AUTO_OP_EVIDENCE = "bench/results/h100/{cuda,triton}-cbam-ops.bench.log"
_AUTO_OP_ORDER = {
    ("cbam", "cuda"): {
        "channel_pool": ("cuda", "triton", "reference"),
        "gated_spatial_pool": ("cuda", "triton", "reference"),
        "cbam_apply": ("triton", "cuda", "reference"),
        "cbam_apply_backward": ("triton", "cuda", "reference"),
        "gated_spatial_pool_backward_gate": ("triton", "cuda", "reference"),
        "cbam_grad_x": ("triton", "cuda", "reference"),
    },
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
# loaded once), so a module call does not pay for the predicates again
_CHOSEN: dict[tuple, tuple[str, str]] = {}


def choose(family: str, device: torch.device, dtype: torch.dtype, backend: str = "auto",
           op: str | None = None) -> tuple[str, str]:
    """Returns (backend, reason). A named backend that cannot run the case raises.

    op: one op of the family (e.g. "cbam_apply"); under "auto" its own order where _AUTO_OP_ORDER has one.
    """
    if torch.compiler.is_compiling():  # traced once; a constant of the graph
        return _choose(family, device, dtype, backend, op)
    key = (family, device.type, dtype, backend, triton_interpreted(), op)
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _CHOSEN[key] = _choose(family, device, dtype, backend, op)
    return chosen


def fused_or_fallback(x: torch.Tensor, backend: str, fused, fallback, problem: str | None = None,
                      device: torch.device | None = None):
    """The one rule of every fused attention layer (fastattn.nn's blocks, convert's twins, the
    diffusers processor): fused(chosen backend) when nothing is against the call (`problem` is None)
    and choose() picks a kernel backend for x; else fallback(), the layer's eager code, which also
    raises the layer's own errors for bad input. device: x.device when the caller already has it."""
    if problem is None:
        chosen, _ = choose("attention", x.device if device is None else device, x.dtype, backend)
        if chosen != "reference":
            return fused(chosen)
    return fallback()


def _auto_order(family: str, device: torch.device, dtype: torch.dtype, op: str | None) -> tuple[tuple[str, ...], str]:
    """-> (order, what it rests on)."""
    per_op = _AUTO_OP_ORDER.get((family, device.type), {})
    if op in per_op:
        return per_op[op], f"first available for {op} on {device.type} {dtype}, in the order of the H100 " \
                           f"per-op timings ({AUTO_OP_EVIDENCE})"
    return _AUTO_ORDER.get((family, device.type), ("reference",)), f"first available for {device.type} {dtype}"


def op_backends(family: str, device: torch.device, dtype: torch.dtype) -> tuple[tuple[str, str], ...]:
    """((op, backend), ...): auto's choice for each op that has its own order on this device; () if none."""
    return tuple((op, choose(family, device, dtype, "auto", op)[0])
                 for op in _AUTO_OP_ORDER.get((family, device.type), {}))


def _choose(family: str, device: torch.device, dtype: torch.dtype, backend: str,
            op: str | None = None) -> tuple[str, str]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = _PREDICATES[backend](family, device, dtype)
        if reason:
            raise BackendUnavailable(f"backend={backend!r} cannot run this {family} call ({dtype} on {device}): {reason}")
        return backend, "named explicitly"
    order, basis = _auto_order(family, device, dtype, op)
    refusals = []
    for name in order:
        reason = _PREDICATES[name](family, device, dtype)
        if reason is None:
            why = basis + (f" ({'; '.join(refusals)})" if refusals else "")
            if not torch.compiler.is_compiling():  # a logger call would break torch.compile's graph
                log.debug("fastattn %s: backend %s: %s", family, name, why)
            return name, why
        refusals.append(f"{name}: {reason}")
    raise AssertionError("the reference backend always runs")


def explain(family: str, tensor: torch.Tensor, backend: str = "auto") -> str:
    """Which backend a call on `tensor` would take and why. family: "cbam" or "attention".

    Where auto picks op by op (CBAM on a GPU), each op's backend follows on a line of its own."""
    name, why = choose(family, tensor.device, tensor.dtype, backend)
    text = f"{family} on {tensor.device.type} {tensor.dtype}: backend {name!r}: {why}"
    if backend != "auto" or name == "reference":
        return text
    per_op = [f"  {op}: backend {op_name!r}: {choose(family, tensor.device, tensor.dtype, 'auto', op)[1]}"
              for op, op_name in op_backends(family, tensor.device, tensor.dtype)]
    return "\n".join([text + ("; per op:" if per_op else "")] + per_op)
