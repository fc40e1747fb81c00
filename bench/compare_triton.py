"""Prove that a refactor of the Triton CBAM kernels leaves their compiled code unchanged, without a GPU.

Loads triton_kernels/cbam.py twice, as it is at git revision `--base` and as it is in the working tree,
calls each op's launcher on CPU tensors (NCHW and channels_last, float32 and float16, split_ties on and
off) with the kernels replaced by recorders, and compiles every recorded launch for GPUTarget("cuda",
arch, 32) as the JIT would (tests/_gpu_static.py: compile_launch). The two sides are compared launch by
launch: the PTX with source locations and debug labels dropped, and the SASS of the cubin instruction for
instruction. Exit status 1 if any differs.

    python -m bench.compare_triton --base main
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # real JITFunctions: the interpreter's cannot compile (see _gpu_static)

import torch  # noqa: E402

from bench.compare_sass import _functions  # noqa: E402
from tests._gpu_static import compile_launch, nvidia_bin  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "triton_kernels/cbam.py"
SPLIT_TIES_OPS = ("gated_spatial_pool_backward_gate", "cbam_grad_x")


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, self.kernel, args, kwargs))


def _inputs(layout: str, dtype):
    n, c, h, w = 2, 24, 7, 9
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    small = dict(ch=torch.rand(n, c, dtype=dtype), sp=torch.rand(n, h, w, dtype=dtype),
                 gp=torch.randn(n, 2, h, w, dtype=dtype), pooled=torch.randn(n, 2, h, w, dtype=dtype),
                 sp_arg=torch.zeros(n, h, w, dtype=torch.int64), sp_cnt=torch.ones(n, h, w, dtype=torch.int32),
                 g_avg=torch.randn(n, c, dtype=dtype), g_max=torch.randn(n, c, dtype=dtype),
                 ch_max=torch.randn(n, c, dtype=dtype), ch_arg=torch.zeros(n, c, dtype=torch.int64),
                 ch_cnt=torch.ones(n, c, dtype=torch.int32))
    return x, small


def launches(module, dtypes) -> list[tuple[str, object, tuple, dict]]:
    """(label, kernel, args, kwargs) of every launch the CBAM launchers make over the cases below."""
    log = []
    for name in dir(module):
        if name.endswith("_kernel"):
            setattr(module, name, _Recorder(name, getattr(module, name), log))
    labelled = []
    for layout in ("nchw", "channels_last"):
        for dtype in dtypes:
            x, s = _inputs(layout, dtype)
            calls = [
                ("cbam_apply", lambda t: module.cbam_apply(x, s["ch"], s["sp"])),
                ("cbam_apply_backward", lambda t: module.cbam_apply_backward(x, x, s["ch"], s["sp"])),
                ("gated_spatial_pool_backward_gate", lambda t: module.gated_spatial_pool_backward_gate(
                    s["gp"], x, s["ch"], s["pooled"], s["sp_arg"], s["sp_cnt"], t)),
                ("cbam_grad_x", lambda t: module.cbam_grad_x(
                    x, x, s["ch"], s["sp"], s["gp"], s["pooled"], s["sp_arg"], s["sp_cnt"], s["g_avg"], s["g_max"],
                    s["ch_max"], s["ch_arg"], s["ch_cnt"], t)),
            ]
            for op, call in calls:
                for split_ties in ((True, False) if op in SPLIT_TIES_OPS else (True,)):
                    start = len(log)
                    call(split_ties)
                    for kernel_name, kernel, args, kwargs in log[start:]:
                        ties = f" split_ties={split_ties}" if op in SPLIT_TIES_OPS else ""
                        labelled.append((f"{op} -> {kernel_name} {layout} {str(dtype)[6:]}{ties}", kernel, args,
                                         kwargs))
    return labelled


# source locations, comments, and the $L__tmp labels that only the debug line table refers to (they
# mark where an inlined @triton.jit helper begins and ends, so a new helper adds some)
_DROP = re.compile(r"^\s*(\.loc|\.file|//|\$L__tmp\d+:)")


def ptx_lines(ptx: str) -> list[str]:
    """PTX without source locations, comments, debug labels and the debug sections after the code."""
    ptx = ptx.split(".section\t.debug", 1)[0].split(".section .debug", 1)[0]
    return [line.strip() for line in ptx.splitlines() if line.strip() and not _DROP.match(line)]


def compile_code(kernel, args, kwargs, arch: int) -> tuple[list[str], list[str]]:
    """(PTX lines, SASS instructions) of one launch compiled for sm_<arch>."""
    kwargs = dict(kwargs)
    config = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    compiled = compile_launch(kernel, args, kwargs, config, arch)
    scratch = ROOT / "build" / "triton-base"
    cubin = scratch / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    text = subprocess.run([str(nvidia_bin() / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    (sass,) = _functions(text, arch).values()
    return ptx_lines(compiled.asm["ptx"]), sass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="git revision to compare against (default: main)")
    parser.add_argument("--arch", type=int, action="append", help="sm version(s) (default: 90)")
    parser.add_argument("--dtype", action="append", choices=["float16", "bfloat16", "float32"],
                        help="dtype(s) of the inputs (default: float16)")
    args = parser.parse_args()
    scratch = ROOT / "build" / "triton-base"
    scratch.mkdir(parents=True, exist_ok=True)
    base_path = scratch / "cbam_base.py"
    base_path.write_text(subprocess.run(["git", "show", f"{args.base}:{SOURCE}"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout)
    dtypes = [getattr(torch, name) for name in args.dtype or ["float16"]]
    base = launches(load(base_path, "_cbam_base"), dtypes)
    new = launches(load(ROOT / SOURCE, "_cbam_new"), dtypes)
    if [label for label, *_ in base] != [label for label, *_ in new]:
        print("the launchers make different launches:", [b[0] for b in base], [n[0] for n in new])
        return 1
    bad = 0
    for arch in args.arch or [90]:
        for (label, kb, ab, kwb), (_, kn, an, kwn) in zip(base, new):
            (ptx_a, sass_a), (ptx_b, sass_b) = compile_code(kb, ab, kwb, arch), compile_code(kn, an, kwn, arch)
            if ptx_a == ptx_b and sass_a == sass_b:
                print(f"sm_{arch} identical  {len(ptx_a):5d} PTX lines {len(sass_a):5d} SASS instr  {label}")
            elif ptx_a == ptx_b and Counter(i.split()[0] for i in sass_a) == Counter(i.split()[0] for i in sass_b):
                # the $L__tmp labels dropped above still reach ptxas, which may then schedule differently
                bad += 1
                print(f"sm_{arch} REORDERED  {len(ptx_a):5d} PTX lines {len(sass_a):5d} SASS instr  {label}: same PTX, "
                      "same opcodes, SASS in another order or with other register names")
            else:
                bad += 1
                print(f"sm_{arch} DIFFERS    PTX {len(ptx_a)} -> {len(ptx_b)} lines, SASS {len(sass_a)} -> "
                      f"{len(sass_b)} instr  {label}")
                for line in list(difflib.unified_diff(ptx_a, ptx_b, lineterm="", n=1))[:40]:
                    print("    " + line)
            sys.stdout.flush()
    print(f"{bad} launch(es) differ" if bad else "all launches compile to identical PTX")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
