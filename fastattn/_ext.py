"""Loads the compiled library fastattn._C, if it was built.

`import fastattn` works without it: the reference and Triton backends need no
compilation, and the compiled backends raise `CompiledLibraryMissing` saying
how to build.
"""
from __future__ import annotations

import torch

try:
    from fastattn import _C  # noqa: F401  (registers torch.ops.fastattn.*)
    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = exc

BUILD_HINT = ("build it with `make build` (or `pip install --no-build-isolation -e .` in the repository); "
              "set FASTATTN_SKIP_CUDA=1 to build the CPU kernels only")


class CompiledLibraryMissing(RuntimeError):
    pass


# a constant to torch.compile/export: the dispatcher query would otherwise break the graph of every
# module that picks its backend in forward
@torch.compiler.assume_constant_result
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.fastattn.<op> has a kernel for the dispatch key ("CPU", "CUDA")."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", dispatch_key)


def require_compiled(backend: str) -> None:
    if _C is None:
        raise CompiledLibraryMissing(
            f"backend={backend!r} needs the compiled library fastattn._C, which failed to import "
            f"({LOAD_ERROR}); {BUILD_HINT}")


def cpu_tuning() -> dict:
    """The cache sizes the CPU kernels use and the tile sizes derived from them (docs/cpu-tuning.md).

    Returns {"l1", "l2", "l3": bytes (L1 data and L2 per core, L3 shared), "source": {level: where
    the size came from: "FASTATTN_CPU_CACHE", "sysfs", "sysconf" or "default"}, "tiles": {name: size}}.
    The sizes are read once per process; FASTATTN_CPU_CACHE="l1=32K,l2=1M,l3=32M" (any subset) set
    before the first CPU kernel runs overrides them. A malformed value raises ValueError.
    """
    require_compiled("cpu")
    return _C.cpu_tuning()
