"""Which GPU kernel variants have passed the GPU test suite on a real GPU.

A GPU kernel is written and checked here (compiled for sm_80/sm_90, its SASS
inspected, Triton kernels run through the interpreter), but only a run of the
GPU tests on a real GPU proves it. Until that run is on record under
bench/results/, a new variant is never taken by default: the kernel it
replaces stays the one that `backend="auto"` (and a named backend) runs.

`FASTATTN_UNVERIFIED_KERNELS` turns unverified variants on, for testing them on
a GPU: `1` or `all` for every one, or a comma-separated list of names.
bench/gpu_session.sh runs the GPU tests with it set. The C++ side reads the
same variable for the variants it selects (csrc/cuda/variants.cuh).

To promote a variant once it has passed: set its `verified` to the log that
shows it, and flip the default on the C++ side where it has one
(csrc/cuda/variants.cuh: kCudaAttentionMmaVerified; tests/test_build.py checks
that the two agree).
"""
from __future__ import annotations

import dataclasses
import os

ENV = "FASTATTN_UNVERIFIED_KERNELS"


@dataclasses.dataclass(frozen=True)
class Variant:
    what: str
    verified: str | None = None  # the committed GPU test log that shows it passed, or None


VARIANTS: dict[str, Variant] = {
    "cuda_attention_mma": Variant(
        "CUDA attention forward and backward on tensor cores (mma.sync m16n8k16 + ldmatrix, "
        "cp.async pipeline), float16 and bfloat16, sm_80 and newer"),
    "triton_attention_v2": Variant(
        "Triton attention with head dims and the divisibility of L as compile-time facts "
        "(unmasked full tiles, 16-byte loads at any layout), >= 64-row tiles at d >= 256"),
}


def _switch() -> set[str]:
    raw = os.environ.get(ENV, "").strip()
    if raw in ("", "0"):
        return set()
    if raw in ("1", "all"):
        return set(VARIANTS)
    return {name.strip() for name in raw.split(",") if name.strip()}


def enabled(name: str) -> bool:
    """Whether variant `name` runs: it has passed on a GPU, or the switch names it."""
    if name not in VARIANTS:
        raise KeyError(f"unknown kernel variant {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name].verified is not None or name in _switch()


def describe() -> str:
    lines = []
    for name, variant in VARIANTS.items():
        state = f"verified ({variant.verified})" if variant.verified else "unverified"
        lines.append(f"{name}: {'on' if enabled(name) else 'off'}, {state}: {variant.what}")
    return "\n".join(lines)
