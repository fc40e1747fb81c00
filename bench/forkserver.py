"""A server process that forks one process per request, and the bench's end of it.

The resident-set readings (bench.memory) and the allocator columns (bench.allocator_columns) each need
measurements in processes of their own that start from the same state: a server imports torch, timm and
fastattn once and runs nothing; each request runs in a fork of it, so every measurement starts from the
same heap without paying the imports again. The server is exec'd with the environment its measurements
need (MALLOC_* settings, LD_PRELOAD of another allocator).

Protocol: one JSON request per line on the server's stdin, one JSON answer per line on its stdout.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def failure(stage: str, error: str, detail: str = "") -> dict:
    return {"status": "failed", "stage": stage, "error": error, "traceback": detail}


def exception_failure(stage: str, exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return failure(stage, f"{type(exc).__name__}: {exc}".strip(), "".join(tb[-4:]))


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        import signal
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name}" + (" (out of memory?)" if sig == signal.SIGKILL else "")
    return f"exit status {os.WEXITSTATUS(status)} without a result"


def in_fork(handle: Callable[[], dict], stage: str) -> dict:
    """handle() in a forked process; -> its answer, or a failure record if it raised or died."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            answer = handle()
        except BaseException as exc:
            answer = exception_failure(stage, exc)
        with os.fdopen(write_end, "w") as f:
            json.dump(answer, f)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    return json.loads(text) if text else failure(stage, f"the measuring process died: {describe_exit(status)}")


def serve(handle: Callable[[dict], dict], stage: str) -> None:
    """For each request line on stdin: fork, run handle(request) in the fork, answer one JSON line."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything printed by a library goes to stderr, not into the answers
    for line in sys.stdin:
        request = json.loads(line)
        answers.write(json.dumps(in_fork(lambda: handle(request), stage)) + "\n")
        answers.flush()


class Client:
    """The bench's end of a server (`python -m <module> --serve`): started on first use, restarted after a
    crash or a time-out. client.request(dict) -> the answer, or a failure record of `stage`."""

    def __init__(self, module: str, env: dict, stage: str, timeout_s: float):
        self.module, self.env, self.stage, self.timeout_s = module, env, stage, timeout_s
        self._proc = None
        self._stderr = None

    def _start(self) -> None:
        import subprocess
        import tempfile
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
        self._stderr = tempfile.TemporaryFile()
        # its own session: a time-out kills the server and whatever it forked, nothing else
        self._proc = subprocess.Popen([sys.executable, "-m", self.module, "--serve"], cwd=ROOT, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      start_new_session=True)

    def _stderr_tail(self, chars: int = 2000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-chars:]

    def request(self, request: dict) -> dict:
        import select
        import subprocess
        if self._proc is None:
            self._start()
        try:
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
            ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout_s)
            line = self._proc.stdout.readline() if ready else None
        except BrokenPipeError:
            line = b""
        if line:
            return json.loads(line)
        if line is None:
            error = f"no result after {self.timeout_s:g} s"
        else:
            try:
                error = f"the measuring server died (exit status {self._proc.wait(timeout=5)})"
            except subprocess.TimeoutExpired:
                error = "the measuring server closed its output"
        tail = self._stderr_tail()
        self.close(kill=True)
        return failure(self.stage, error, tail)

    def close(self, kill: bool = False) -> None:
        """End the server: at the end of its input, or at once (kill) with whatever it forked."""
        if self._proc is None:
            return
        import signal
        import subprocess
        if self._proc.poll() is None and not kill:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill = True
        if self._proc.poll() is None and kill:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
            stream.close()
        self._proc = self._stderr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
