"""What the numbers were measured on: device name, versions, threads, load."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys

import torch

from bench import allocator


def _sanitize(name: str) -> str:
    name = re.sub(r"\((R|TM|tm|r)\)", "", name)
    name = re.sub(r"\bCPU\b|@.*$", "", name)
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16 and AMX; Arm's BF16 extension


def native_bfloat16(cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether the CPU has bfloat16 arithmetic of its own (/proc/cpuinfo flags), and what says so."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False, "/proc/cpuinfo unreadable"
    flags = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    found = [f for f in NATIVE_BFLOAT16_FLAGS if f in flags]
    if found:
        return True, "CPU flags " + ", ".join(found)
    return False, ("no " + ", ".join(NATIVE_BFLOAT16_FLAGS) + " in the CPU flags: PyTorch's bfloat16 matmul runs "
                   "about a hundred times slower than float32 here")


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache Linux reports (the LLC), or None."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            unit = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
    except (OSError, ValueError):
        return None
    return max(sizes) if sizes else None


def device_name(device: torch.device, threads: int) -> str:
    """'cpu-<model>-<threads>t' or the GPU's name, file-name safe (NVIDIA-H100-80GB-HBM3)."""
    if device.type == "cuda":
        return _sanitize(torch.cuda.get_device_name(device))
    return f"cpu-{_sanitize(cpu_model())}-{threads}t"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken on this machine
        return None


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def fastattn_info() -> dict:
    import fastattn
    from fastattn import _ext
    return {"version": getattr(fastattn, "__version__", None),
            "compiled_library": _ext._C is not None,
            "compiled_library_error": None if _ext.LOAD_ERROR is None else str(_ext.LOAD_ERROR)}


def environment(device: torch.device, threads: int) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "numpy": _version("numpy"),
        "fastattn": fastattn_info(),
        "git_commit": _git_commit(),
        "device_type": device.type,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "llc_bytes": last_level_cache_bytes(),
        "threads": threads,
        "allocator": {"mode": allocator.mode(), "detail": allocator.describe()},
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "argv": sys.argv[1:],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_name"] = props.name
        env["gpu_memory_bytes"] = props.total_memory
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["allocator"] = {"mode": "cuda-caching", "detail": "PyTorch's CUDA caching allocator (host: "
                            + allocator.describe() + ")"}
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return env
