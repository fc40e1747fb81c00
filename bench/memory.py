"""Peak memory of one call, two ways, over what was live before it (inputs,
weights, optimizer state).

Tensor memory (``peak_mem_mib``): the most bytes of tensor memory live at once
during the call.

* CUDA: torch.cuda.max_memory_allocated - memory_allocated before.
* CPU: the same quantity from PyTorch's CPU allocator, replayed from the
  allocation trace of torch.profiler (profile_memory=True): every allocation
  and free of the call, in order; the peak of their running sum. Blind to
  memory taken outside PyTorch's allocator (oneDNN/MKL scratch, OpenMP threads).

Resident set (``peak_rss_mib``, CPU only): what the OS had to hand the process,
whoever asked for it. In the bench's own process this reading is worthless:
glibc keeps freed heap chunks resident, so whether a call's temporaries show up
depends on the heap's history (two providers running identical code can read
hundreds of MiB apart). So each provider gets a process of its own, with the
heap's behaviour fixed:

* the process: forked, per provider and case, from a server
  (``python -m bench.memory --serve``, started once per run) that imported
  torch, timm and fastattn and ran nothing; every reading starts from the same
  heap. (A fresh interpreter per reading would pay the imports once per
  reading.)
* in it: build the case's inputs and the provider as the bench does
  (bench.providers), one warm-up call (compiles, loads kernels, starts the
  thread pool, creates optimizer state), drop the grads it left, read VmRSS;
  reset the high-water mark (write 5 to /proc/self/clear_refs); one call; the
  reading is VmHWM - that VmRSS.
* the heap (MALLOC_ENV, set in the server's environment at exec):
  MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=128 KiB, MALLOC_TOP_PAD_=0.
  Every block of 128 KiB or more is its own mmap, unmapped when freed; the heap
  top is given back past 128 KiB; fixed values switch off glibc's dynamic mmap
  threshold. A tensor then leaves the resident set when it is freed, so the
  high-water mark sees the call's live memory and not what earlier calls left.
  At glibc's defaults the warm-up's freed blocks stay in the heap and the
  readings drift from the tensor peak both ways; the readings that show it, and
  that identical code reads alike with these settings, are in bench/README.md
  ("Peak memory").
* cost: every block over 128 KiB is faulted in afresh in both calls (slow on a
  model's training step), so the default run takes these
  readings on the main shapes only (bench.cases.MAIN_SHAPES); --full and
  --quick on every fwd+bwd and train case.
* resolution: pages, and blocks under 128 KiB come from a heap the warm-up
  already grew, so tensors of a few KiB (the --quick shapes) read about 0.
"""
from __future__ import annotations

import contextlib
import os
import sys

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


# ---------------------------------------------------------------------------
# Resident set on the CPU: one process per provider, forked from a server
# ---------------------------------------------------------------------------
# Every block of 128 KiB or more is its own mmap, unmapped when freed, and the heap top is trimmed past
# 128 KiB: freed tensors leave the resident set at once, whatever ran before. Fixed values also switch
# off glibc's dynamic mmap threshold (it climbs to 32 MiB after the first large free).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_TOP_PAD_": "0"}
# speed only: inductor compiles in the measuring process instead of starting a pool of workers in each
SERVER_ENV = dict(MALLOC_ENV, TORCHINDUCTOR_COMPILE_THREADS="1")
RSS_DESCRIPTION = {
    "statistic": "peak_rss_mib: resident-set high-water mark of one call over the resident set before it, MiB; "
                 "rss_base_mib: that resident set",
    "method": "VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before the call, in a process "
              "of its own per provider and case, forked from a server that imported torch, timm and fastattn and "
              "ran nothing; one warm-up call first",
    "malloc_env": MALLOC_ENV}
RSS_TIMEOUT_S = 600.0


def _proc_status_bytes(*keys: str) -> list[int]:
    """Fields of /proc/self/status given in kB (VmRSS, VmHWM), in bytes."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                found[name] = int(value.split()[0]) * 1024
    return [found[k] for k in keys]


def _reset_high_water() -> int:
    """Set VmHWM to the current resident set (Linux >= 4.0); -> that resident set, bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_bytes("VmRSS")[0]


def rss_here(case, provider: str, compile_backend: str, threads: int) -> dict:
    """Resident-set peak of one call of `provider` on `case`, in this process (the server's fork of it)."""
    import gc
    import time

    from bench import providers
    started = time.perf_counter()
    torch.set_num_threads(threads)
    prepared = providers.prepare(provider, case, providers.make_inputs(case, torch.device("cpu")), compile_backend)
    prepared.run()  # warm-up: compiles, loads kernels, starts the thread pool, creates optimizer state
    prepared.clear()  # the grads it left: freed, as before the trace's call
    gc.collect()
    before = _reset_high_water()
    prepared.run()
    high_water, = _proc_status_bytes("VmHWM")
    return {"status": "ok", "peak_rss_mib": (high_water - before) / 2**20, "base_rss_mib": before / 2**20,
            "wall_s": time.perf_counter() - started}


def case_to_json(case) -> dict:
    return {"family": case.family, "group": case.group, "label": case.label, "pass_": case.pass_,
            "dtype": case.dtype, "params": case.params, "sweep": case.sweep}


def case_from_json(data: dict):
    from bench.cases import Case
    return Case(**dict(data, sweep=tuple(data["sweep"]) if data["sweep"] else None))


def serve() -> None:
    """python -m bench.memory --serve: for each request line on stdin, fork, measure, answer one JSON line.

    Requests: {"case": {...}, "provider", "compile_backend", "threads"}. Each measurement runs in a
    fork of this process, which has imported the libraries but allocated nothing for any case: the
    heap each one starts from is the same.
    """
    import fastattn  # noqa: F401  # imported once here, not in every measuring process
    import timm  # noqa: F401

    from bench import forkserver
    from bench import providers  # noqa: F401
    forkserver.serve(lambda r: rss_here(case_from_json(r["case"]), r["provider"], r["compile_backend"], r["threads"]),
                     "rss")


class RSSProbe:
    """The bench's end of the server: started on first use, restarted after a crash or a time-out.

    probe.measure(case, provider) -> {"status": "ok", "peak_rss_mib", "base_rss_mib", "wall_s"} or a failure
    record {"status": "failed", "stage": "rss", "error", "traceback"}.
    """

    def __init__(self, compile_backend: str, threads: int, timeout_s: float = RSS_TIMEOUT_S):
        from bench import forkserver
        self.compile_backend, self.threads = compile_backend, threads
        self._client = forkserver.Client("bench.memory", dict(os.environ, **SERVER_ENV), "rss", timeout_s)

    @property
    def timeout_s(self) -> float:
        return self._client.timeout_s

    @timeout_s.setter
    def timeout_s(self, seconds: float) -> None:
        self._client.timeout_s = seconds

    def measure(self, case, provider: str) -> dict:
        return self._client.request({"case": case_to_json(case), "provider": provider,
                                     "compile_backend": self.compile_backend, "threads": self.threads})

    def close(self, kill: bool = False) -> None:
        self._client.close(kill)

    def __enter__(self) -> "RSSProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """python -m bench.memory CASE_ID PROVIDER...: resident-set peak of providers on one case, as the bench reads it."""
    import argparse
    import json
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=main.__doc__)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("case", nargs="?", help="a case id, e.g. 'cbam/resnet50-stages/8x256x56x56/fwd+bwd/float32'")
    parser.add_argument("providers", nargs="*", help="provider names (default: the family's on the CPU)")
    parser.add_argument("--mode", choices=("default", "full", "quick"), default="default",
                        help="the run whose case list holds the case (default: default)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="measure each provider this many times")
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    from bench import cases, providers
    found = [c for c in cases.build(args.mode, list(cases.FAMILIES), [args.case.split("/")[-1]], "cpu")
             if c.id == args.case] if args.case else []
    if not found:
        parser.error(f"no case {args.case!r} in the {args.mode} run; ids look like "
                     "'cbam/resnet50-stages/8x256x56x56/fwd+bwd/float32'")
    case = found[0]
    with RSSProbe(args.compile_backend, args.threads or torch.get_num_threads()) as probe:
        for name in args.providers or providers.names(case.family, "cpu"):
            for _ in range(args.repeat):
                print(name, json.dumps(probe.measure(case, name)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
