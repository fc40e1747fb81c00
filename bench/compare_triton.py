"""Prove that a refactor of the Triton kernels leaves their compiled code unchanged, without a GPU.

Loads each family's source (triton_kernels/cbam.py, triton_kernels/attention.py) twice, as it is at git
revision `--base` and as it is in the working tree, makes the launches its launchers would make on CPU
tensors, and compiles every launch for GPUTarget("cuda", arch, 32) as the JIT would (tests/_gpu_static.py:
compile_launch). The two sides are compared launch by launch: the PTX with source locations and debug
labels dropped, and the SASS of the cubin instruction for instruction. Exit status 1 if any differs.

* cbam: each op's launcher is called with the kernels replaced by recorders, NCHW and channels_last,
  split_ties on and off, the dtypes of --dtype (default float16).
* attention: the launch plans of `_forward_launches` and `_backward_launches` (every kernel of the
  forward and the backward) over _attention_cases: v1 and v2, float32 (v1 only) / float16 / bfloat16,
  every padded head-dim block 16..512, NCHW and channels_last, lengths a multiple of 16 and not, head
  dims a multiple of 16 and not, d_qk != d_v, and float32 with few queries (RENORM and its norm kernel),
  as _attention_cases lists them (--full: the cross product of blocks, layouts and dtypes);
  each launch under the config the autotuner prefers (the one FASTATTN_TRITON_AUTOTUNE=0 runs), or every
  config it keeps with --all-configs. Launches that compile to the same kernel are compiled once.

    python -m bench.compare_triton --base main                      # both families
    python -m bench.compare_triton --base main --family attention --match "v2 "
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # real JITFunctions: the interpreter's cannot compile (see _gpu_static)
# a cache of this checkout's own: a rerun compiles only what changed (the cache key is the kernel's source)
os.environ.setdefault("TRITON_CACHE_DIR", str(Path(__file__).resolve().parent.parent / "build" / "triton-cache"))

import torch  # noqa: E402
import triton  # noqa: E402

from bench.compare_sass import _functions  # noqa: E402
from tests._gpu_static import _specialize, _tensor, compile_launch, configs_of, nvidia_bin  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "build" / "triton-base"


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass(frozen=True)
class Launch:
    label: str
    kernel: object
    args: tuple
    kwargs: dict  # constexprs the launcher passes
    config: dict  # num_warps, num_stages and the autotuner's constexprs


# --------------------------------------------------------------------------
# CBAM: the launchers called with recording kernels
# --------------------------------------------------------------------------
SPLIT_TIES_OPS = ("gated_spatial_pool_backward_gate", "cbam_grad_x")


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, self.kernel, args, kwargs))


def _cbam_inputs(layout: str, dtype):
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


def cbam_launches(module, dtypes, **_) -> list[Launch]:
    """Every launch the CBAM launchers make over the cases below (their kernels are not autotuned)."""
    log = []
    for name in dir(module):
        if name.endswith("_kernel"):
            setattr(module, name, _Recorder(name, getattr(module, name), log))
    labelled = []
    for layout in ("nchw", "channels_last"):
        for dtype in dtypes:
            x, s = _cbam_inputs(layout, dtype)
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
                        kwargs = dict(kwargs)
                        config = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
                        labelled.append(Launch(f"{op} -> {kernel_name} {layout} {str(dtype)[6:]}{ties}", kernel,
                                               args, kwargs, config))
    return labelled


# --------------------------------------------------------------------------
# Attention: the launch plans of the forward and the backward
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionCase:
    v2: bool
    dtype: torch.dtype
    layout: str  # nchw, channels_last
    d_qk: int
    d_v: int
    length: int  # Lq == Lk
    heads: int = 4

    @property
    def label(self) -> str:
        return (f"{'v2' if self.v2 else 'v1'} {str(self.dtype)[6:]} {self.layout} d_qk={self.d_qk} d_v={self.d_v} "
                f"L={self.length}")


_BLOCK_DS = (16, 32, 64, 128, 256, 512)  # every padded head-dim block (_block_d)
_LAYOUTS = ("nchw", "channels_last")


def _attention_cases(full: bool) -> list[AttentionCase]:
    """The kernel x constexpr variants the launchers choose.

    Default: every kernel of v1 and v2 (float16) at every padded head-dim block (layouts alternating, d = 64
    at both), a head dim and a length that are not multiples of 16 (v2: MASK_DQK, MASK_DV, EVEN_M and EVEN_N
    False; NCHW copies to a padded pitch), d = 320, d_qk != d_v, d_v = 512 (v2 forward: DV_CHUNKS 2);
    float32 (v1) and bfloat16 (v1, v2) at d = 64 and float32 at d = 512; float32 with Lq <= 16 (RENORM, the
    norm kernel). `full`: every block at both layouts for each dtype, and RENORM at every block."""
    cases = []
    for v2 in (False, True):
        cases += [AttentionCase(v2, torch.float16, _LAYOUTS[i % 2], d, d, 1024) for i, d in enumerate(_BLOCK_DS)]
        cases += [AttentionCase(v2, torch.float16, "channels_last", 64, 64, 1024),
                  AttentionCase(v2, torch.float16, "channels_last", 40, 40, 196),
                  AttentionCase(v2, torch.float16, "channels_last", 16, 128, 196),
                  AttentionCase(v2, torch.float16, "channels_last", 320, 320, 1024)]
    cases += [AttentionCase(True, torch.float16, "nchw", 40, 40, 196),
              AttentionCase(True, torch.float16, "nchw", 64, 512, 1024)]
    cases += [AttentionCase(False, torch.float32, layout, 64, 64, 1024) for layout in _LAYOUTS]
    cases += [AttentionCase(False, torch.float32, "nchw", 512, 512, 1024)]
    cases += [AttentionCase(v2, torch.bfloat16, "channels_last", 64, 64, 1024) for v2 in (False, True)]
    cases += [AttentionCase(False, torch.float32, "nchw", d, d, 16) for d in (16, 64)]
    cases += [AttentionCase(False, torch.float32, "channels_last", 512, 512, 9)]
    if full:
        for v2, dtype in [(False, torch.float32), (False, torch.float16), (False, torch.bfloat16),
                          (True, torch.float16), (True, torch.bfloat16)]:
            cases += [AttentionCase(v2, dtype, layout, d, d, 1024) for d in _BLOCK_DS for layout in _LAYOUTS]
            cases += [AttentionCase(v2, dtype, layout, 40, 40, 196) for layout in _LAYOUTS]
        cases += [AttentionCase(False, torch.float32, "nchw", d, d, 16) for d in _BLOCK_DS]
    return list(dict.fromkeys(cases))


def _jit_function(kernel) -> triton.runtime.JITFunction:
    """The JITFunction under a kernel's autotuner and heuristics."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def attention_plan(module, case: AttentionCase) -> list[tuple]:
    """(kernel, grid, args, kwargs) of every launch of the forward and then the backward for `case`."""
    cq, cv = case.heads * case.d_qk, case.heads * case.d_v
    q, k = (_tensor(cq, case.length, case.dtype, case.layout) for _ in range(2))
    v, out, grad_out = (_tensor(cv, case.length, case.dtype, case.layout) for _ in range(3))
    lse, delta = torch.empty(1, case.heads, case.length), torch.empty(1, case.heads, case.length)
    scale = case.d_qk ** -0.5
    forward = module._forward_launches(q, k, v, out, lse, case.heads, case.d_qk, case.d_v, scale, case.v2)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    backward = module._backward_launches(grad_out, q, k, v, out, lse, delta, *grads, case.heads, case.d_qk, case.d_v,
                                         scale, case.v2)
    return forward + backward


def attention_launches(module, dtypes, all_configs: bool = False, full: bool = False) -> list[Launch]:
    """Every launch of attention_plan over _attention_cases(full), under the autotuner's preferred config
    (all_configs: every config it keeps)."""
    labelled = []
    for case in _attention_cases(full):
        if case.dtype not in dtypes:
            continue
        for kernel, _, args, kwargs in attention_plan(module, case):
            configs = configs_of(kernel, args, kwargs)
            for config in configs if all_configs else configs[:1]:
                tiles = "".join(f" {k}={config[k]}" for k in ("BLOCK_M", "BLOCK_N") if k in config)
                renorm = " RENORM" if kwargs.get("RENORM") else ""
                labelled.append(Launch(
                    f"{case.label} -> {_jit_function(kernel).fn.__name__}{renorm}{tiles} "
                    f"w{config['num_warps']}s{config['num_stages']}", kernel, args, kwargs, config))
    return labelled


@dataclasses.dataclass(frozen=True)
class Family:
    source: str
    launches: object  # (module, dtypes, all_configs=, full=) -> list[Launch]
    dtypes: tuple[str, ...]  # default of --dtype


FAMILIES = {
    "cbam": Family("triton_kernels/cbam.py", cbam_launches, ("float16",)),
    "attention": Family("triton_kernels/attention.py", attention_launches, ("float32", "float16", "bfloat16")),
}


# --------------------------------------------------------------------------
# Compiling and comparing
# --------------------------------------------------------------------------
# source locations, comments, and the $L__tmp labels that only the debug line table refers to (they
# mark where an inlined @triton.jit helper begins and ends, so a new helper adds some)
_DROP = re.compile(r"^\s*(\.loc|\.file|//|\$L__tmp\d+:)")


def ptx_lines(ptx: str) -> list[str]:
    """PTX without source locations, comments, debug labels and the debug sections after the code."""
    ptx = ptx.split(".section\t.debug", 1)[0].split(".section .debug", 1)[0]
    return [line.strip() for line in ptx.splitlines() if line.strip() and not _DROP.match(line)]


def compile_key(launch: Launch, arch: int) -> str:
    """What the compiled kernel depends on: launches with one key compile to the same code."""
    fn, signature, constexprs, attrs, options = _specialize(launch.kernel, launch.args, launch.kwargs,
                                                            launch.config, arch)
    return repr((fn.fn.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()), options))


_RESOURCES = re.compile(r"REG:(\d+) (STACK:\d+ SHARED:\d+ LOCAL:\d+)")
_REGISTER_UNIT = 8  # registers a thread is allocated in (256 a warp on sm_80 and sm_90)


def compile_code(launch: Launch, arch: int) -> tuple[list[str], list[str], re.Match]:
    """(PTX lines, SASS instructions, resource usage) of one launch compiled for sm_<arch>."""
    compiled = compile_launch(launch.kernel, launch.args, launch.kwargs, launch.config, arch)
    cubin = SCRATCH / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    text = subprocess.run([str(nvidia_bin() / "cuobjdump"), "-sass", "-res-usage", str(cubin)], capture_output=True,
                          text=True, check=True).stdout
    (sass,) = _functions(text, arch).values()
    return ptx_lines(compiled.asm["ptx"]), sass, _RESOURCES.search(text)


_REGISTER = re.compile(r"\b(U?R|U?P|B)\d+\b")  # general, uniform, predicate and barrier registers
_TARGET = re.compile(r"^((?:@!?U?P\w+ )?(?:BRA|BSSY|CALL|JMP)\S*) .*?0x[0-9a-f]+")  # branch targets: addresses


def _anonymous(instruction: str) -> str:
    """An instruction without its register numbers, register-reuse hints (they follow the schedule) and
    branch-target address."""
    return _REGISTER.sub(r"\1", _TARGET.sub(r"\1 <target>", instruction)).replace(".reuse", "")


def reordered_only(sass_a: list[str], sass_b: list[str], res_a: re.Match, res_b: re.Match) -> bool:
    """Whether two SASS listings hold the same instructions, operands and modifiers included, once register
    numbers and branch addresses are dropped, and launch with the same resources (stack, shared memory, and
    registers as allocated, in units of _REGISTER_UNIT): the same code scheduled in another order."""
    allocated = [-(-int(res[1]) // _REGISTER_UNIT) * _REGISTER_UNIT for res in (res_a, res_b)]
    return (Counter(map(_anonymous, sass_a)) == Counter(map(_anonymous, sass_b)) and res_a[2] == res_b[2]
            and allocated[0] == allocated[1])


def compare(base: list[Launch], new: list[Launch], arch: int) -> Counter:
    """Compile each pair of launches (once per compile key) and print a line each; how many are identical,
    REORDERED and DIFFERS."""
    verdicts, seen = Counter(), set()
    for a, b in zip(base, new):
        key = compile_key(a, arch)
        if key in seen:
            continue
        seen.add(key)
        (ptx_a, sass_a, res_a), (ptx_b, sass_b, res_b) = compile_code(a, arch), compile_code(b, arch)
        if ptx_a == ptx_b and sass_a == sass_b:
            verdicts["identical"] += 1
            print(f"sm_{arch} identical  {len(ptx_a):5d} PTX lines {len(sass_a):5d} SASS instr  {a.label}")
        elif ptx_a == ptx_b and reordered_only(sass_a, sass_b, res_a, res_b):
            # the $L__tmp labels dropped above still reach ptxas, which may then schedule differently
            verdicts["reordered"] += 1
            moved = sum(x != y for x, y in zip(sass_a, sass_b))
            print(f"sm_{arch} REORDERED  {len(ptx_a):5d} PTX lines {len(sass_a):5d} SASS instr  {a.label}: same PTX; "
                  f"the same instructions but for register numbers, {moved} of them in other places; REG "
                  f"{res_a[1]} -> {res_b[1]}, same {res_a[2]}")
        else:
            verdicts["differ"] += 1
            print(f"sm_{arch} DIFFERS    PTX {len(ptx_a)} -> {len(ptx_b)} lines, SASS {len(sass_a)} -> "
                  f"{len(sass_b)} instr, {res_a[0]} -> {res_b[0]}  {a.label}")
            for line in list(difflib.unified_diff(ptx_a, ptx_b, lineterm="", n=1))[:40]:
                print("    " + line)
        sys.stdout.flush()
    print(f"sm_{arch}: {len(seen)} distinct compiles of {len(base)} launches")
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="git revision to compare against (default: main)")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="kernel families (default: all)")
    parser.add_argument("--arch", type=int, action="append", help="sm version(s) (default: 90)")
    parser.add_argument("--dtype", action="append", choices=["float16", "bfloat16", "float32"],
                        help="dtype(s) of the inputs (default: cbam float16, attention all three)")
    parser.add_argument("--all-configs", action="store_true",
                        help="attention: every config the autotuner keeps, not only the preferred one")
    parser.add_argument("--full", action="store_true",
                        help="attention: every head-dim block at both layouts for every dtype (about 280 compiles)")
    parser.add_argument("--match", help="only launches whose label contains this text")
    args = parser.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    verdicts = Counter()
    for name in args.family or list(FAMILIES):
        family = FAMILIES[name]
        base_path = SCRATCH / f"{name}_base.py"
        base_path.write_text(subprocess.run(["git", "show", f"{args.base}:{family.source}"], cwd=ROOT,
                                            capture_output=True, text=True, check=True).stdout)
        dtypes = [getattr(torch, d) for d in args.dtype or family.dtypes]
        sides = [family.launches(load(path, f"_{name}_{side}"), dtypes, all_configs=args.all_configs, full=args.full)
                 for path, side in ((base_path, "base"), (ROOT / family.source, "new"))]
        if [a.label for a in sides[0]] != [b.label for b in sides[1]]:
            print(f"{name}: the launchers make different launches:", [a.label for a in sides[0]],
                  [b.label for b in sides[1]])
            return 1
        base, new = ([x for x in side if args.match is None or args.match in x.label] for side in sides)
        print(f"== {family.source} (base {args.base} vs working tree)")
        for arch in args.arch or [90]:
            verdicts += compare(base, new, arch)
    print(f"{verdicts['identical']} identical, {verdicts['reordered']} reordered only (same PTX, same SASS "
          f"instructions in another order), {verdicts['differ']} differ")
    return 1 if verdicts["reordered"] or verdicts["differ"] else 0


if __name__ == "__main__":
    sys.exit(main())
