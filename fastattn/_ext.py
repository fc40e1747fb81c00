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
