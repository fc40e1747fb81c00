"""Peak memory of one call: the most bytes of tensor memory live at once during
the call, over what was live before it (inputs, weights, optimizer state).

* CUDA: torch.cuda.max_memory_allocated - memory_allocated before.
* CPU: the same quantity from PyTorch's CPU allocator, replayed from the
  allocation trace of torch.profiler (profile_memory=True): every allocation
  and free of the call, in order; the peak of their running sum.

Why not the resident set (RSS high-water mark, getrusage): glibc keeps freed
heap chunks resident, so whether a call's temporaries show up depends on the
heap's history. Two providers running identical code read 1094 and 1606 MiB
that way; the allocation trace reads the same for both, to the byte.
"""
from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def _stderr_to_devnull():
    """Kineto prints a line at every profiler start and stop, straight to fd 2, over the progress bar."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(run) -> int:
    from torch.profiler import ProfilerActivity, profile
    with _stderr_to_devnull(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    cpu = torch.autograd.DeviceType.CPU
    deltas = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == cpu), key=lambda t: t[0])
    live = peak = 0
    for _, nbytes in deltas:  # frees of tensors from before the call count too: they make room
        live += nbytes
        peak = max(peak, live)
    return peak


METHODS = {"cuda": "torch.cuda.max_memory_allocated - memory_allocated before the call",
           "cpu": "peak of the running sum of PyTorch CPU allocations and frees during the call (torch.profiler "
                  "allocation trace)"}


def peak_bytes(prepared, device: torch.device) -> int:
    """Extra tensor memory one call of `prepared.run` takes at its peak; what the last call left is dropped first."""
    prepared.clear()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        prepared.run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _cpu_peak_bytes(prepared.run)
