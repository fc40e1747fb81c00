"""glibc malloc modes for CPU timings and CPU memory readings.

glibc hands large freed blocks back to the OS (mmap'd blocks at once, the top of
the heap past M_TRIM_THRESHOLD), so the next tensor of that size pays a page
fault per 4 KiB page. For an op that writes tens of MB that can cost more than
the op. Every provider is therefore timed under one stated mode:

* ``warm`` (default): mmap disabled (M_MMAP_MAX=0) and trimming off
  (M_TRIM_THRESHOLD=2^31-1): freed memory stays in the heap, resident, and is
  reused. What a long-running training or inference loop sees in steady state.
* ``cold``: glibc's initial defaults pinned (M_MMAP_THRESHOLD=M_TRIM_THRESHOLD=
  128 KiB, which also switches off glibc's dynamic threshold) and
  ``malloc_trim(0)`` before each timed call: every block over 128 KiB comes back
  as fresh pages. A process left at glibc's defaults lies between the two,
  depending on its history (the dynamic threshold climbs to 32 MiB after frees).

None of this applies when another allocator is preloaded (jemalloc, tcmalloc) or
the C library is not glibc; ``describe()`` then says so and timings run as is.
"""
from __future__ import annotations

import contextlib
import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
_INT_MAX = 2**31 - 1
_DEFAULT_MMAP_MAX = 65536

_SETTINGS = {
    "warm": ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX)),
    "cold": ((M_MMAP_MAX, _DEFAULT_MMAP_MAX), (M_MMAP_THRESHOLD, 128 * 1024), (M_TRIM_THRESHOLD, 128 * 1024)),
}
DESCRIPTIONS = {
    "warm": "glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1: freed memory stays resident and is reused",
    "cold": "glibc mallopt M_MMAP_THRESHOLD=M_TRIM_THRESHOLD=128 KiB, malloc_trim(0) before each timed call: "
            "every block over 128 KiB is faulted in afresh",
    "unmanaged": "allocator left as is",
}

_mode = "unmanaged"


def _load_glibc():
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # musl and others lack it
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):
        return None


_glibc = _load_glibc()


def available() -> bool:
    return _glibc is not None


def set_mode(mode: str) -> bool:
    """Switch malloc to `mode` ("warm", "cold"); False when the allocator is not glibc's."""
    global _mode
    if mode not in _SETTINGS:
        raise ValueError(f"allocator mode must be one of {tuple(_SETTINGS)}, got {mode!r}")
    if _glibc is None:
        return False
    ok = all(_glibc.mallopt(param, value) == 1 for param, value in _SETTINGS[mode])
    if mode == "cold":
        trim()
    _mode = mode if ok else "unmanaged"
    return ok


def mode() -> str:
    return _mode


@contextlib.contextmanager
def using(mode_name: str):
    """Run a block in `mode_name`, then go back to the mode before it. Yields whether the mode is in force."""
    previous = _mode
    in_force = set_mode(mode_name)
    try:
        yield in_force
    finally:
        if in_force and previous in _SETTINGS:
            set_mode(previous)


def trim() -> None:
    """Give free heap memory back to the OS (malloc_trim(0)), so reusing it faults pages in again."""
    if _glibc is not None:
        _glibc.malloc_trim(0)


def describe(mode_name: str | None = None) -> str:
    mode_name = mode_name or _mode
    if _glibc is None:
        preload = os.environ.get("LD_PRELOAD", "")
        return f"not glibc malloc{' (LD_PRELOAD=' + preload + ')' if preload else ''}: allocator left as is"
    return DESCRIPTIONS[mode_name]
