"""CPU timings under each allocator, each in processes of its own: the bench's allocator columns.

glibc malloc, as a fresh process has it, gives a freed block of 128 KiB or more back to the OS and
raises its mmap threshold after such frees (the dynamic threshold, up to 32 MiB), so what a call pays
for fresh pages depends on what the process ran before. The column a user gets is therefore timed the
way a user's loop runs it: one process per provider and case, that has imported the libraries and run
that provider's warm-up calls, nothing else.

Columns (COLUMNS; the headline of the table is "default"):

* ``default``: glibc malloc untouched (LD_PRELOAD and MALLOC_* / GLIBC_TUNABLES taken out of the
  environment).
* ``warm``: the bench's own process, glibc tuned by mallopt (bench.allocator): freed memory stays
  resident and is reused. All providers of a case in one process; the in-process figures (and the only
  ones on a GPU).
* ``jemalloc``, ``tcmalloc``: the allocator loaded with LD_PRELOAD, as PyTorch's CPU performance
  guides recommend, where a library is installed (Debian: libjemalloc2, libtcmalloc-minimal4); the
  column is left out, with the reason, where it is not.

How a column is timed: a server per column (``python -m bench.allocator_columns --serve``, exec'd with
the column's environment) imports torch, timm and fastattn and runs nothing. For each case it forks a
driver, which forks one process per provider, one after the other: each builds the case's inputs and
the provider as the bench does, calls it once (compiling, untimed) and runs the warm-up calls, then
waits. The driver then times them in rounds, every provider once per round in an order rotated each
round, as the bench's own rounds (bench.timing.round_robin): each process times its own call with
perf_counter; between calls the driver pauses PAUSE_S so that the previous process's OpenMP threads
stop spinning before the next call starts.
"""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time

from bench import forkserver

PAUSE_S = 0.01
COLUMNS = ("default", "warm", "jemalloc", "tcmalloc")
HEADLINE = "default"
IN_PROCESS = "warm"
OUT_OF_PROCESS = tuple(c for c in COLUMNS if c != IN_PROCESS)
METHOD = ("default, jemalloc, tcmalloc: a process per provider and case, forked from a server exec'd with the "
          "column's allocator that imported the libraries and ran nothing; each process builds the provider, "
          "calls it once (untimed) and runs the warm-up calls, then the processes are timed in interleaved "
          f"rounds, {PAUSE_S * 1e3:g} ms apart; warm: the bench's own process, every provider in it")
PRELOADED = {"jemalloc": ("libjemalloc.so.2", "libjemalloc.so.1", "libjemalloc.so"),
             "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")}
PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                "/lib/aarch64-linux-gnu", "/usr/lib64", "/lib64", "/usr/lib", "/usr/local/lib")
TIMEOUT_S = 600.0
# what a fresh process's glibc malloc reads from its environment
_MALLOC_ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD")
# speed only: inductor compiles in the measuring process instead of starting a pool of workers in each
_SERVER_ENV = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}


def _ldconfig_text() -> str:
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            return subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
    return ""


def find_library(column: str, ldconfig_text: str | None = None, dirs: tuple = LIBRARY_DIRS) -> str | None:
    """The shared library of a preloadable allocator: from `ldconfig -p`, else a known folder; None if absent."""
    names = PRELOADED[column]
    text = _ldconfig_text() if ldconfig_text is None else ldconfig_text
    found = {}
    for line in text.splitlines():
        name, arrow, path = line.strip().partition(" => ")
        if arrow and name.split()[0] in names:
            found.setdefault(name.split()[0], path.strip())
    for name in names:
        if name in found:
            return found[name]
        for folder in dirs:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                return path
    return None


def column_env(column: str, library: str | None = None, base: dict | None = None) -> dict:
    """The environment a column's server is exec'd with: the caller's, less the malloc settings, plus
    LD_PRELOAD of `library` for jemalloc / tcmalloc."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(_MALLOC_ENV_PREFIXES)}
    env.update(_SERVER_ENV)
    if library:
        env["LD_PRELOAD"] = library
    return env


def plan(wanted: list[str], managed: bool, libraries: dict | None = None) -> dict:
    """-> {column: {"status": "measured" | "absent", "detail" | "reason", "library"}} for the wanted columns.

    managed: whether the bench's own process runs glibc in warm mode (bench.allocator); libraries: column ->
    path or None (default: looked up).
    """
    from bench import allocator
    out = {}
    for column in wanted:
        if column == "default":
            out[column] = {"status": "measured", "detail": "glibc malloc as a fresh process has it (no LD_PRELOAD, "
                           "no MALLOC_* settings), a process per provider and case after its warm-up"}
        elif column == IN_PROCESS:
            out[column] = {"status": "measured", "detail": allocator.describe("warm") + "; every provider in the "
                           "bench's own process"} if managed else \
                {"status": "absent", "reason": "the bench's process does not run glibc malloc: "
                 + allocator.describe()}
        else:
            library = (libraries or {}).get(column) if libraries is not None else find_library(column)
            out[column] = {"status": "measured", "library": library,
                           "detail": f"LD_PRELOAD={library}, a process per provider and case after its warm-up"} \
                if library else {"status": "absent", "reason": f"no {column} library found (ldconfig -p, "
                                 f"{', '.join(LIBRARY_DIRS[:2])}, ...); Debian/Ubuntu: apt-get install "
                                 f"{PACKAGES[column]}"}
    return out


# ---------------------------------------------------------------------------
# The measuring side: the server, its driver per case, a process per provider
# ---------------------------------------------------------------------------
def _send(fd: int, message: dict) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())


class _Reader:
    """JSON lines from a pipe, with a time-out; None at end of file or after the time-out."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, b""

    def read(self, timeout_s: float | None) -> dict | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while b"\n" not in self.buffer:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and (left <= 0 or not select.select([self.fd], [], [], left)[0]):
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def _provider_process(request: dict, name: str, commands: int, replies: int) -> None:
    """In the provider's process: build, first call, warm-up; then one timed call per command."""
    import torch

    from bench import providers
    from bench.memory import case_from_json
    torch.set_num_threads(request["threads"])
    case = case_from_json(request["case"])
    try:
        start = time.perf_counter()
        prepared = providers.prepare(name, case, providers.make_inputs(case, torch.device("cpu")),
                                     request["compile_backend"])
        prepared.run()
        first_call_s = time.perf_counter() - start
        for _ in range(request["warmup"]):
            prepared.run()
    except BaseException as exc:
        _send(replies, forkserver.exception_failure("setup", exc))
        return
    _send(replies, {"status": "ready", "first_call_s": first_call_s})
    reader = _Reader(commands)
    while (command := reader.read(None)) and command.get("do") == "time":
        try:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            prepared.run()
            seconds = time.perf_counter() - start
            _send(replies, {"seconds": seconds, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults})
        except BaseException as exc:
            _send(replies, forkserver.exception_failure("timing", exc))
            return


class _Worker:
    def __init__(self, request: dict, name: str, inherited: list[int]):
        command_read, self.commands = os.pipe()
        reply_read, reply_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            for fd in inherited + [self.commands, reply_read]:
                os.close(fd)
            try:
                _provider_process(request, name, command_read, reply_write)
            finally:
                os._exit(0)
        os.close(command_read)
        os.close(reply_write)
        self.reader = _Reader(reply_read)
        self.fds = [self.commands, reply_read]

    def ask(self, message: dict | None, timeout_s: float) -> dict:
        if message is not None:
            try:
                _send(self.commands, message)
            except BrokenPipeError:
                pass
        answer = self.reader.read(timeout_s)
        if answer is not None:
            return answer
        if self.stop():
            return forkserver.failure("allocator", f"the provider's process gave no answer in {timeout_s:g} s")
        return forkserver.failure("allocator", f"the provider's process died: "
                                  f"{forkserver.describe_exit(self.status)}")

    status = None

    def stop(self) -> bool:
        """Reap the process, killing it if it still runs; -> whether it had to be killed."""
        if self.status is not None:
            return False
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        killed = pid == 0
        if killed:
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
        self.status = status
        return killed

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def loaded_allocator() -> str:
    """Which malloc this process runs: the preloaded library mapped into it, else glibc."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    for column, names in PRELOADED.items():
        if any(name.split(".so")[0] + ".so" in maps for name in names):
            return column
    return "glibc"


def time_case(request: dict) -> dict:
    """In the driver (a fork of the server): every provider of the case in a process of its own, timed in rounds.

    -> {"status": "ok", "allocator": what runs, "results": {provider: {"status": "ok", "first_call_s", "times_ms",
    "median_ms", "min_ms", "repeats", "minor_faults_per_call"} | failure record}}; minor faults (getrusage, the
    whole process): the pages the call touched for the first time, what the allocator costs without the noise of
    a shared machine's clock, or a failure record when the column's allocator is not
    the one loaded (an LD_PRELOAD that did not load: the dynamic loader only warns).
    """
    from bench.timing import median
    expected, running = request["expect"], loaded_allocator()
    if running != expected:
        return forkserver.failure("allocator", f"the column wants {expected}, but this process runs {running} "
                                  f"(LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r})")
    workers, results, times, faults = {}, {}, {}, {}
    try:
        for name in request["providers"]:
            worker = _Worker(request, name, [fd for w in workers.values() for fd in w.fds])
            answer = worker.ask(None, request["timeout_s"])
            if answer.get("status") == "ready":
                workers[name], times[name], faults[name] = worker, [], []
                results[name] = {"status": "ok", "first_call_s": answer["first_call_s"]}
            else:
                worker.stop()
                worker.close()
                results[name] = answer
        for r in range(request["repeats"]):
            alive = [n for n in workers if n in times]
            if not alive:
                break
            shift = r % len(alive)
            for name in alive[shift:] + alive[:shift]:
                time.sleep(PAUSE_S)
                answer = workers[name].ask({"do": "time"}, request["timeout_s"])
                if "seconds" in answer:
                    times[name].append(answer["seconds"])
                    faults[name].append(answer["faults"])
                else:
                    results[name] = answer
                    del times[name]
    finally:
        for worker in workers.values():
            try:
                _send(worker.commands, {"do": "quit"})
            except BrokenPipeError:
                pass
            if worker.status is None:
                os.waitpid(worker.pid, 0)
            worker.close()
    for name, seconds in times.items():
        results[name].update(times_ms=[1e3 * s for s in seconds], median_ms=1e3 * median(seconds),
                             min_ms=1e3 * min(seconds), repeats=len(seconds),
                             minor_faults_per_call=median(faults[name]))
    return {"status": "ok", "allocator": running, "results": results}


def serve() -> None:
    """python -m bench.allocator_columns --serve: one driver (a fork) per case request."""
    import fastattn  # noqa: F401  # imported once here, not in every measuring process
    import timm  # noqa: F401
    import torch  # noqa: F401

    from bench import providers  # noqa: F401
    forkserver.serve(time_case, "allocator")


# ---------------------------------------------------------------------------
# The bench's side
# ---------------------------------------------------------------------------
class Columns:
    """The out-of-process columns of a run: a server per column, started at its first case.

    columns.measure(case, providers, warmup, repeats) -> {column: {provider: result}} for the columns that
    apply to the case; a column that failed as a whole gives its failure record to every provider.
    """

    def __init__(self, planned: dict, compile_backend: str, threads: int, applies=lambda column, case: True,
                 timeout_s: float = TIMEOUT_S):
        self.compile_backend, self.threads, self.applies, self.timeout_s = compile_backend, threads, applies, timeout_s
        self.clients = {column: forkserver.Client("bench.allocator_columns",
                                                  column_env(column, entry.get("library")), "allocator", timeout_s)
                        for column, entry in planned.items()
                        if entry["status"] == "measured" and column != IN_PROCESS}
        self.expect = {column: "glibc" if column == "default" else column for column in self.clients}

    def measure(self, case, names: list[str], warmup: int, repeats: int) -> dict:
        from bench.memory import case_to_json
        out = {}
        for column, client in self.clients.items():
            if not self.applies(column, case) or not names:
                continue
            answer = client.request({"case": case_to_json(case), "providers": names, "warmup": warmup,
                                     "repeats": repeats, "compile_backend": self.compile_backend,
                                     "threads": self.threads, "expect": self.expect[column],
                                     "timeout_s": self.timeout_s})
            out[column] = answer["results"] if answer.get("status") == "ok" else {n: answer for n in names}
        return out

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def __enter__(self) -> "Columns":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        raise SystemExit("python -m bench.allocator_columns --serve: the server of the bench's allocator columns "
                         "(python -m bench runs it)")
