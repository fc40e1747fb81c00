"""Timing: one clock per device, and round-robin measurement of several providers.

Every provider of a case is timed in the same process, interleaved: repeat r
runs each provider once, in an order rotated by r, so drift on a shared machine
(other jobs, thermal, frequency) hits all of them alike. The figure reported is
the median of the timed runs.
"""
from __future__ import annotations

import math
import time
import traceback
from typing import Callable

import torch


class Clock:
    """Seconds taken by one call. On CUDA: events around the call, L2 flushed before it."""

    def __init__(self, device: torch.device, flush_l2: bool = True):
        self.device = device
        self._flush = None
        if device.type == "cuda" and flush_l2:
            # larger than any L2 today (H100: 50 MB); zeroing it evicts the previous call's data
            self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], before: Callable[[], None] | None = None) -> float:
        if before is not None:
            before()
        if self.device.type == "cuda":
            if self._flush is not None:
                self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return "CUDA events around each call" + (", L2 flushed before each call" if self._flush is not None else "")
        return "time.perf_counter around each call (CPU ops are synchronous)"


def plan_repeats(round_seconds: float, budget_s: float, min_repeats: int, max_repeats: int) -> int:
    """How many rounds fit the case's time budget, clamped to [min_repeats, max_repeats]."""
    if budget_s <= 0:
        return min_repeats
    if round_seconds <= 0:
        return max_repeats
    return max(min_repeats, min(max_repeats, math.floor(budget_s / round_seconds)))


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, clock: Clock,
                before: Callable[[], None] | dict | None = None
                ) -> tuple[dict[str, list[float]], dict[str, BaseException]]:
    """Time each fn `repeats` times, interleaved. -> (seconds per name, exception per name that failed).
    before: called untimed before each call; one callable for all, or one per name (a dict).

    A provider that raises is dropped from the remaining rounds and reported in the second dict.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, BaseException] = {}
    for r in range(repeats):
        alive = [n for n in names if n not in errors]
        if not alive:
            break
        shift = r % len(alive)
        for name in alive[shift:] + alive[:shift]:
            try:
                times[name].append(clock.time(fns[name], before.get(name) if isinstance(before, dict) else before))
            except Exception as exc:  # a provider failing mid-run is a result, not a crash
                # keep the message and the line numbers, free the frames' tensors (after an out-of-memory above all)
                traceback.clear_frames(exc.__traceback__)
                errors[name] = exc
    return {n: t for n, t in times.items() if n not in errors}, errors


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
