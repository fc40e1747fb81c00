"""bench/gpu_sanitize.sh and its driver, tested without a GPU: the driver runs its cases on the cpu
backend and fails a planted wrong result; the script, with a stand-in for compute-sanitizer and for
the driver, runs each tool with and without FASTATTN_UNVERIFIED_KERNELS, hands the right backends to
each, reports errors and keeps to its time budget. The real run is on a GPU machine."""
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from _util import compiled_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_sanitize.sh")
DRIVER = os.path.join(ROOT, "bench", "gpu_sanitize_driver.py")

# a compute-sanitizer that takes the real one's options (each with one value), runs the command, and
# reports FAKE_ERRORS errors the way the real one ends its output
FAKE_SANITIZER = r"""#!/usr/bin/env bash
case "$1" in
  --version) echo "Compute Sanitizer stand-in version 0"; exit 0 ;;
  --help) echo "  --kernel-name <filter>   kernels to check"; exit 0 ;;
esac
while [[ "$1" == --* ]]; do echo "$1 $2" >> "$FAKE_RECORD"; shift 2; done
"$@"; rc=$?
echo "========= ERROR SUMMARY: ${FAKE_ERRORS:-0} errors"
[ "${FAKE_ERRORS:-0}" = 0 ] && exit $rc || exit 99
"""
FAKE_DRIVER = r"""#!/usr/bin/env bash
echo "driver args: $* unverified=${FASTATTN_UNVERIFIED_KERNELS:-unset} autotune=$FASTATTN_TRITON_AUTOTUNE" >> "$FAKE_RECORD"
echo "driver: 3 cases, 0 failed, 0.1 s"
"""


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def _run_script(work, **env):
    for name, text in (("compute-sanitizer", FAKE_SANITIZER), ("driver.sh", FAKE_DRIVER)):
        path = os.path.join(work, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
    record = os.path.join(work, "record.txt")
    out = os.path.join(work, "out")
    full_env = dict(os.environ, OUT=out, COMPUTE_SANITIZER=os.path.join(work, "compute-sanitizer"),
                    DRIVER=f"bash {os.path.join(work, 'driver.sh')}", FAKE_RECORD=record, **env)
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)
    with open(os.path.join(out, "sanitize.txt")) as f:
        summary = f.read()
    record_text = open(record).read() if os.path.exists(record) else ""
    assert sorted(os.listdir(out)) == ["sanitize.log", "sanitize.txt"], os.listdir(out)
    return proc, summary, record_text


def _build_dir():
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    return tempfile.TemporaryDirectory(dir=os.path.join(ROOT, "build"))


def test_script_runs_every_tool_with_and_without_unverified_kernels():
    with _build_dir() as work:
        proc, summary, record = _run_script(work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [line for line in summary.splitlines() if " | rc " in line]
    assert len(runs) == 8, summary
    assert all("| rc 0 | 0 errors | driver: 3 cases, 0 failed" in line for line in runs), summary
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        assert sum(line.startswith(f"{tool} | FASTATTN_UNVERIFIED_KERNELS=1") for line in runs) == 1, summary
        assert sum(line.startswith(f"{tool} | verified kernels") for line in runs) == 1, summary
    drivers = [line for line in record.splitlines() if line.startswith("driver args")]
    assert [line.split(" unverified=")[1].split()[0] for line in drivers] == ["unset", "1"] * 4, record
    assert all("--backends cuda,triton" in line for line in drivers[:2]), record       # memcheck: both
    assert all(line.split("--backends ")[1].startswith("cuda ") for line in drivers[2:]), record
    assert all("autotune=0" in line for line in drivers), record
    tools = [line.split()[1] for line in record.splitlines() if line.startswith("--tool")]
    assert tools == [t for t in ("memcheck", "racecheck", "synccheck", "initcheck") for _ in range(2)], record
    assert record.count("--kernel-name kns=fastattn") == 4, record  # racecheck and synccheck only
    assert "sanitize:" in summary and "clean" in summary.splitlines()[-1]


def test_script_reports_errors_and_fails():
    with _build_dir() as work:
        proc, summary, _ = _run_script(work, FAKE_ERRORS="2", TOOLS="memcheck")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert summary.count("| rc 99 | 2 errors |") == 2, summary
    assert "NOT clean" in summary.splitlines()[-1], summary


def test_script_skips_runs_it_has_no_time_for():
    with _build_dir() as work:
        proc, summary, record = _run_script(work, SANITIZE_TIME="10")
    assert proc.returncode == 1
    assert summary.count("skipped: out of time") == 8 and "driver args" not in record, summary


@pytest.mark.skipif("cpu" not in compiled_backends("cpu"), reason="the cpu backend is not built")
def test_driver_runs_every_case_on_the_cpu():
    proc = subprocess.run([sys.executable, DRIVER, "--device", "cpu", "--backends", "cpu", "--dtypes", "float32,bfloat16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert " 0 failed" in last, last
    count = int(last.split("driver: ")[1].split()[0])
    assert count >= 100 and proc.stdout.count("\nok   ") == count, last


def test_driver_fails_a_wrong_result():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import gpu_sanitize_driver as driver
    finally:
        sys.path.pop(0)
    run = driver.Runner("cpu")
    x = torch.randn(2, 3, 4, 4)

    def planted(a, which):
        y = a * 2
        return y + 1e-2 if which == "fused" else y  # what a race or a stray read would do
    run.case("planted", planted, [x])
    run.case("right", lambda a, which: a * 2, [x])
    assert run.failed == ["planted"] and run.count == 2
