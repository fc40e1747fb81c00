"""python -m bench: the command line and the run of every case."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, replace

from bench import allocator
from bench.allocator_columns import OUT_OF_PROCESS

SCHEMA = "fastattn-bench/1"
RSS_CHOICES = ("all", "main", "none")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Settings:
    warmup: int            # untimed calls per provider after the first (compiling) call
    min_repeats: int
    max_repeats: int
    budget_s: float        # time for the timed rounds of one case, all providers together
    cold_repeats: int      # CPU CBAM forward, allocator cold
    memory: bool           # peak memory of the fwd+bwd / train cases
    rss: str               # which of them also get a resident-set reading on the CPU: "all", "main", "none"
    compile_backend: str
    deadline_s: float | None = None  # for all cases; behind schedule, cases run with fewer repeats
    hurried: bool = False
    preload: str = "main"  # which cases get the LD_PRELOAD allocator columns (CPU): "all", "main", "none"

    @classmethod
    def for_mode(cls, mode: str, compile_backend: str) -> "Settings":
        if mode == "quick":
            return cls(0, 2, 2, 0.0, 1, True, "all", compile_backend)
        if mode == "full":
            return cls(2, 5, 30, 6.0, 7, True, "all", compile_backend, preload="all")
        # make bench: a resident-set reading takes two calls with every page faulted in afresh (slow on a model
        # step), so only the main shapes get one; so for the preloaded allocators' columns. On the CPU every case
        # is timed twice (in process, and in a process per provider for the default allocator): the deadline
        # grew from 240 s with that second timing
        return cls(1, 3, 15, 2.5, 5, True, "main", compile_backend, deadline_s=360.0)

    def for_case(self, elapsed_s: float, cases_left: int, timings: int = 1) -> "Settings":
        """These settings, or fewer repeats when the run is behind its deadline (never fewer cases).

        timings: how many times the case is timed (the allocator columns); the share of each is what is
        left of the deadline / cases left / timings."""
        if self.deadline_s is None:
            return self
        share = (self.deadline_s - elapsed_s) / cases_left / timings
        if share >= 4 * self.budget_s:
            return self
        # the first call warms up; one timed round is still a median of one run per provider, interleaved
        return replace(self, warmup=self.warmup if share >= self.budget_s else 0, min_repeats=1,
                       budget_s=max(0.0, share / 4), cold_repeats=1, hurried=True)


def _families(values: list[str] | None) -> list[str]:
    from bench.cases import FAMILIES
    if not values:
        return list(FAMILIES)
    chosen = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in FAMILIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"--only takes {', '.join(FAMILIES)}; got {', '.join(unknown)}")
    return [f for f in FAMILIES if f in chosen]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="fastattn's benchmarks: every fastattn backend of the device against timm, eager, SDPA and "
                    "torch.compile, side by side, with the machine's bandwidth and matmul rooflines. "
                    "Method, outputs and JSON schema: bench/README.md.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the long sweep: batch 1/32, L and d sweeps, "
                      "resnet50-cbam, inference throughput")
    size.add_argument("--quick", action="store_true", help="tiny shapes, 2 timed runs (the harness's own test)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", action="append", metavar="FAMILY",
                        help="cbam, attention or models; repeatable or a comma list")
    parser.add_argument("--dtype", action="append", metavar="DTYPE",
                        help="dtypes of the cbam and attention cases (default float32; on cuda float32,bfloat16)")
    parser.add_argument("--providers", help="comma list: run only these providers (names as in the table, or one "
                                            "run only when named: sdpa-nchw-views, sdpa-<kernel> on the CPU)")
    parser.add_argument("--cases", help="comma list: run only the cases whose id contains one of these "
                                        "(ids: family/group/label/pass/dtype, e.g. gpu-targets or 8x256x56x56)")
    parser.add_argument("--unverified", action="store_true",
                        help="also fastattn-<backend>-unverified: the GPU kernel variants not yet verified on a GPU, "
                             "under FASTATTN_UNVERIFIED_KERNELS=1, beside the verified ones")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default bench/results)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compile provider (default inductor)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory readings")
    parser.add_argument("--rss", choices=RSS_CHOICES, default=None,
                        help="which fwd+bwd/train cases also get a resident-set reading on the CPU, in a process per "
                             "provider: all, main (the main shapes), none (default: main; all with --full, --quick)")
    parser.add_argument("--allocators", default=",".join(OUT_OF_PROCESS), metavar="LIST",
                        help="CPU allocator columns besides warm (the bench's own process), each timed in processes "
                             "of their own: a comma list of " + ", ".join(OUT_OF_PROCESS) + ", or none (default: all; "
                             "jemalloc and tcmalloc where installed). The headline is default where it runs")
    parser.add_argument("--allocator-cases", choices=("all", "main", "none"), default=None,
                        help="which cases get the jemalloc and tcmalloc columns: all, main (the main shapes; the "
                             "default), none; all with --full")
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="time for all cases: behind it, cases run with fewer repeats, never fewer cases "
                             "(default: 360 s; none with --full, --quick)")
    parser.add_argument("--no-plots", action="store_true", help=argparse.SUPPRESS)
    # the harness's self-test: a provider that always fails, to check failures are reported, not dropped
    parser.add_argument("--inject-failure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.families = _families(args.only)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    args.mode = "quick" if args.quick else "full" if args.full else "default"
    args.allocators = [c.strip() for c in args.allocators.split(",") if c.strip() and c.strip() != "none"]
    unknown = [c for c in args.allocators if c not in OUT_OF_PROCESS]
    if unknown:
        parser.error(f"--allocators takes a comma list of {', '.join(OUT_OF_PROCESS)}, or none; "
                     f"got {', '.join(unknown)}")
    return args


def failure(stage: str, exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"status": "failed", "stage": stage, "error": f"{type(exc).__name__}: {exc}".strip(),
            "traceback": "".join(tb[-4:])}


def _release_cuda(device) -> None:
    """After a failure (an out-of-memory above all), hand cached blocks back so the next provider has them."""
    import torch
    if device.type == "cuda":
        torch.cuda.empty_cache()


def wants_rss(case, settings: Settings, device) -> bool:
    from bench.cases import is_main
    return device.type == "cpu" and settings.memory and case.pass_ in ("fwd+bwd", "train") and \
        (settings.rss == "all" or settings.rss == "main" and is_main(case))


def headline_from_columns(results: dict, measured: dict, in_process: str) -> None:
    """Every provider's figures per allocator column under "allocators"; its headline (median_ms and the rest)
    from allocator_columns.HEADLINE where that column ran, else the in-process figures stay. A provider whose
    headline column failed is a failure record (stage "allocator"), its other columns kept."""
    from bench.allocator_columns import HEADLINE
    timing_keys = ("median_ms", "min_ms", "times_ms", "repeats")
    for name, res in list(results.items()):
        if res.get("status") != "ok" or "median_ms" not in res:
            continue
        columns = {in_process: {"status": "ok", **{k: res[k] for k in timing_keys}}}
        columns.update((column, per[name]) for column, per in measured.items() if name in per)
        res["allocators"] = columns
        if HEADLINE not in columns:
            res["allocator"] = in_process
            continue
        headline = columns[HEADLINE]
        if headline.get("status") == "ok":
            res.update({k: headline[k] for k in timing_keys}, allocator=HEADLINE)
        else:
            results[name] = {"status": "failed", "stage": "allocator",
                             "error": f"{HEADLINE} allocator column: {headline.get('error')}",
                             "traceback": headline.get("traceback", ""), "allocators": columns,
                             "first_call_s": res["first_call_s"], "info": res["info"]}


def run_case(case, provider_names: list[str], device, clock, settings: Settings, progress=lambda text: None,
             rss_probe=None, columns=None) -> dict:
    """Measure every provider of one case. -> the case's JSON record (bench/README.md, "cases").

    rss_probe: a memory.RSSProbe, for the resident-set readings (CPU; see wants_rss).
    columns: an allocator_columns.Columns, for the figures under other allocators, each in processes of their own
    (CPU); its headline column then gives the case's headline figures.
    """
    import torch
    from bench import cases as cases_mod
    from bench import memory, providers
    from bench.timing import median, plan_repeats, round_robin

    record = {"id": case.id, "family": case.family, "group": case.group, "label": case.label, "pass": case.pass_,
              "dtype": case.dtype, "params": case.params, "sweep": list(case.sweep) if case.sweep else None,
              "work": cases_mod.work(case), "providers": list(provider_names), "results": {},
              "hurried": settings.hurried, "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    results = record["results"]
    started = time.perf_counter()
    if "compile" in provider_names:
        torch._dynamo.reset()  # each case compiles afresh, with static shapes
    try:
        inputs = providers.make_inputs(case, device)
    except Exception as exc:
        for name in provider_names:
            results[name] = failure("inputs", exc)
        record["wall_s"] = time.perf_counter() - started
        return record

    prepared = {}
    for name in provider_names:
        progress(f"{name}: first call" + (" (compiling)" if name == "compile" else ""))
        start = time.perf_counter()
        try:
            prep = providers.prepare(name, case, inputs, settings.compile_backend)
            prep.run()  # the first call compiles (torch.compile) or loads kernels: not timed
            clock.sync()
            prepared[name] = prep
            results[name] = {"status": "ok", "first_call_s": time.perf_counter() - start, "info": prep.info}
        except Exception as exc:
            results[name] = failure("setup", exc)
        prep = None
        if name not in prepared:
            _release_cuda(device)  # outside the except block, whose traceback holds the failed call's tensors

    # a training step takes seconds: its first call is warm-up enough
    warmup = 0 if case.family == "models" else settings.warmup
    # the time of one round, to plan the repeats: from the warm-up, else (an over-estimate) from the first calls
    round_s = 0.0 if warmup else sum(results[name]["first_call_s"] for name in prepared)
    for name, prep in list(prepared.items()):
        try:
            for _ in range(warmup):
                round_s += clock.time(prep.run, prep.refill) / warmup
        except Exception as exc:
            results[name] = failure("warmup", exc)
            del prepared[name]
        if name not in prepared:
            _release_cuda(device)
    repeats = plan_repeats(round_s, settings.budget_s, settings.min_repeats, settings.max_repeats)
    progress(f"{repeats} timed rounds of {len(prepared)} providers")
    times, errors = round_robin({n: p.run for n, p in prepared.items()}, repeats, clock,
                                before={n: p.refill for n, p in prepared.items() if p.refill})
    for name, exc in errors.items():
        results[name] = failure("timing", exc)
        del prepared[name]
    if errors:
        errors = None
        _release_cuda(device)
    for name, seconds in times.items():
        results[name].update(median_ms=1e3 * median(seconds), min_ms=1e3 * min(seconds),
                             times_ms=[1e3 * s for s in seconds], repeats=len(seconds))

    if device.type == "cpu" and case.family == "cbam" and case.pass_ == "fwd" and allocator.available():
        progress("cold allocator")
        with allocator.using("cold"):
            cold, cold_errors = round_robin({n: p.run for n, p in prepared.items()},
                                            min(repeats, settings.cold_repeats), clock,
                                            before={n: _then(p.refill, allocator.trim) for n, p in prepared.items()})
        for name, seconds in cold.items():
            results[name].update(cold_median_ms=1e3 * median(seconds), cold_times_ms=[1e3 * s for s in seconds])
        for name, exc in cold_errors.items():
            results[name]["cold_error"] = failure("cold", exc)["error"]

    if settings.memory and case.pass_ in ("fwd+bwd", "train"):
        progress("peak memory")
        for name, prep in prepared.items():
            try:
                results[name]["peak_mem_mib"] = memory.peak_bytes(prep, device) / 2**20
            except Exception as exc:
                results[name]["peak_mem_error"] = failure("memory", exc)["error"]
    if rss_probe is not None and wants_rss(case, settings, device):
        # the warm allocator keeps what the timed calls freed (GBs for eager attention at large L):
        # hand it back first, so that the probe's own process has room
        allocator.trim()
        for name in prepared:
            progress(f"resident set: {name}, in a process of its own")
            reading = rss_probe.measure(case, name)
            if reading["status"] == "ok":
                results[name].update(peak_rss_mib=reading["peak_rss_mib"], rss_base_mib=reading["base_rss_mib"])
            else:
                results[name]["peak_rss_error"] = reading["error"]
    if columns is not None and device.type == "cpu":
        allocator.trim()  # what the timed calls freed here, back to the OS for the columns' processes
        progress("allocator columns, in processes of their own")
        measured = columns.measure(case, list(prepared), warmup, repeats)
        headline_from_columns(results, measured, allocator.mode())
    for prep in prepared.values():
        prep.clear()
    del prepared, inputs
    gc.collect()
    _release_cuda(device)
    record["wall_s"] = time.perf_counter() - started
    return record


def _then(first, second):
    """first (if any), then second: the untimed steps before a call."""
    if first is None:
        return second

    def both():
        first()
        second()
    return both


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    warm = allocator.set_mode("warm")  # before the run's large allocations

    import torch
    from tqdm import tqdm

    from bench import cases as cases_mod
    from bench import env as env_mod
    from bench import allocator_columns, memory, providers, report, roofline
    from bench.timing import Clock

    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    dtypes, dtype_note = [d.strip() for value in (args.dtype or []) for d in value.split(",") if d.strip()], None
    if not dtypes:
        # bfloat16 on the CPU where it has bfloat16 arithmetic, and in --quick (tiny shapes: seconds anyway)
        native, why = env_mod.native_bfloat16() if device.type == "cpu" else (True, "")
        dtypes = ["float32", "bfloat16"] if native or args.mode == "quick" else ["float32"]
        if "bfloat16" not in dtypes:
            dtype_note = f"bfloat16 cases left out by default: {why}; --dtype float32,bfloat16 runs them"
    bad = [d for d in dtypes if d not in ("float32", "float16", "bfloat16")]
    if bad:
        print(f"python -m bench: --dtype takes float32, float16, bfloat16; got {', '.join(bad)}", file=sys.stderr)
        return 2

    settings = Settings.for_mode(args.mode, args.compile_backend)
    settings.memory = not args.no_memory
    if args.deadline is not None:
        if args.deadline <= 0:
            print(f"python -m bench: --deadline must be positive seconds, got {args.deadline}", file=sys.stderr)
            return 2
        settings.deadline_s = args.deadline
    if args.rss:
        settings.rss = args.rss
    if args.allocator_cases:
        settings.preload = args.allocator_cases
    rss_on = device.type == "cpu" and settings.memory and settings.rss != "none"
    rss_cases = "every fwd+bwd and train case" if settings.rss == "all" else "the fwd+bwd and train cases of " + \
        ", ".join(f"{family} {label}" for family, label in cases_mod.MAIN_SHAPES.items())
    clock = Clock(device)
    env = env_mod.environment(device, threads)
    env["allocator"]["managed"] = warm
    planned = allocator_columns.plan([allocator_columns.IN_PROCESS] + args.allocators, warm) if device.type == "cpu" else {}

    def column_applies(column: str, case) -> bool:
        return column == allocator_columns.HEADLINE or settings.preload == "all" or \
            settings.preload == "main" and cases_mod.is_main(case)
    device_name = env_mod.device_name(device, threads)
    stem = device_name + {"default": "", "full": "-full", "quick": "-quick"}[args.mode]
    if args.families != list(cases_mod.FAMILIES):
        stem += "-only-" + "+".join(args.families)

    cases = cases_mod.build(args.mode, args.families, dtypes, device.type)
    if args.cases:
        picked = [p.strip() for p in args.cases.split(",") if p.strip()]
        cases = [c for c in cases if any(p in c.id for p in picked)]
        if not cases:
            print(f"python -m bench: no case id contains any of {', '.join(picked)}", file=sys.stderr)
            return 2
    wanted = set(args.providers.split(",")) if args.providers else None

    def provider_names(family: str) -> list[str]:
        if wanted is None:
            return providers.names(family, device.type, args.inject_failure, args.unverified)
        injected = [providers.INJECTED_FAILURE] if args.inject_failure else []
        return [n for n in providers.known(family, device.type, args.unverified) if n in wanted] + injected

    started = time.perf_counter()
    result = {
        "schema": SCHEMA,
        "device": device_name,
        "mode": args.mode,
        "families": args.families,
        "dtypes": dtypes,
        "dtype_note": dtype_note,
        "complete": False,
        "environment": env,
        "memory": {"statistic": "peak_mem_mib: extra tensor memory of one call at its peak, MiB",
                   "method": memory.METHODS[device.type],
                   "rss": dict(memory.RSS_DESCRIPTION, cases=rss_cases) if rss_on else None}
        if settings.memory else None,
        "timing": {"statistic": "median", "interleaved": "round-robin over providers, order rotated each repeat",
                   "clock": clock.description, "warmup_calls": settings.warmup + 1,
                   "repeats": [settings.min_repeats, settings.max_repeats], "budget_s_per_case": settings.budget_s,
                   "cold_repeats": settings.cold_repeats, "compile_backend": settings.compile_backend,
                   "deadline_s": settings.deadline_s, "startup_s": started - t_start, "wall_s": None},
        "allocators": {"headline": allocator_columns.HEADLINE if allocator_columns.HEADLINE in planned
                       else allocator.mode(), "in_process": allocator.mode(), "columns": planned,
                       "preloaded_cases": {"all": "every case", "main": "the main shapes", "none": "none"}[
                           settings.preload],
                       "method": allocator_columns.METHOD} if planned else None,
        "roofline": None,
        "cases": [],
    }
    os.makedirs(args.out, exist_ok=True)
    # what is done so far, rewritten after every case: a crash (a kernel's segfault) still leaves the data
    partial = os.path.join(args.out, stem + ".partial.json")
    # the server of the resident-set readings starts at the first one and ends with the run
    # and so do the servers of the allocator columns
    with tqdm(total=len(cases) + 1, desc="roofline", unit="case", dynamic_ncols=True, file=sys.stderr) as bar, \
            memory.RSSProbe(settings.compile_backend, threads) as rss_probe, \
            allocator_columns.Columns(planned, settings.compile_backend, threads, column_applies) as columns:
        result["roofline"] = roofline.measure(device, clock, args.mode == "quick", dtypes)
        bar.update()
        for index, case in enumerate(cases):
            bar.set_description(f"{case.family} {case.label} {case.pass_}")
            timings = 1 + sum(column_applies(c, case) for c in columns.clients)
            case_settings = settings.for_case(time.perf_counter() - started, len(cases) - index, timings)
            result["cases"].append(run_case(case, provider_names(case.family), device, clock, case_settings,
                                            progress=bar.set_postfix_str, rss_probe=rss_probe if rss_on else None,
                                            columns=columns))
            with open(partial, "w") as f:
                json.dump(result, f, default=str)
            allocator.trim()  # the case's freed memory back to the OS (the next case's warm-up faults its own in)
            bar.update()

    env["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["complete"] = True
    result["timing"]["wall_s"] = time.perf_counter() - started
    report.annotate(result)
    paths = report.write(result, args.out, stem, plots=not args.no_plots)
    os.remove(partial)
    print(report.table(result))
    print("\nwrote " + ", ".join(os.path.relpath(p) for p in paths))
    return 0
