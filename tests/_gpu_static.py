"""Compile fastattn's GPU kernels for a GPU target without a GPU, and read what the compiled code does.

Triton: the launchers' own launch plans (triton_kernels/attention.py `_forward_launches`,
`_backward_launches`) are built from CPU tensors of the chosen dtype, layout and shape; each kernel's
JIT specializes the arguments as it would at a launch (pointer alignment, integers divisible by 16 or
equal to 1), the autotuner's pruner and heuristics give the configs, and `triton.compile` builds the cubin
for GPUTarget("cuda", arch, 32). CUDA: the kernels of the built library, read with `cuobjdump`.
SASS and resource usage come from cuobjdump (Triton's bundled copy in backends/nvidia/bin).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def nvidia_bin() -> Path:
    """Triton's bundled CUDA tools, found without importing triton (see compile_cases)."""
    (package,) = importlib.util.find_spec("triton").submodule_search_locations
    return Path(package) / "backends" / "nvidia" / "bin"


# --------------------------------------------------------------------------
# Reading SASS
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SassStats:
    """What one kernel's SASS does, counted per instruction kind."""
    name: str
    registers: int
    stack_bytes: int  # local memory frame: spills (or a stack array)
    shared_bytes: int
    hmma: int  # mma.sync (sm_80+)
    hgmma: int  # wgmma (sm_90)
    ffma: int
    ldsm: int  # ldmatrix
    ldgsts: Counter  # cp.async, by bytes a copy
    ldg: Counter  # plain global loads, by bytes a load
    tma_loads: int  # UTMALDG
    spill_stores: int  # STL
    spill_loads: int  # LDL

    @property
    def mma(self) -> int:
        return self.hmma + self.hgmma

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def widest_load(self) -> int:
        return max([*self.ldg, *self.ldgsts], default=0)


_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _width(opcode: str) -> int:
    """Bytes a load moves, from its SASS opcode (LDG.E.128, LDGSTS.E.BYPASS.128, LDG.E.U16, ...)."""
    for part in reversed(opcode.split(".")):
        if part in _WIDTH:
            return _WIDTH[part]
    return 4


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_FUNC = re.compile(r"^\s*Function : (\S+)", re.M)
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def parse_sass(text: str) -> dict[str, SassStats]:
    """`cuobjdump -sass -res-usage` output -> stats per function name."""
    resources = {m[1]: tuple(int(x) for x in m.groups()[1:]) for m in _RES.finditer(text)}
    stats = {}
    bodies = _FUNC.split(text)[1:]
    for name, body in zip(bodies[::2], bodies[1::2]):
        ops = _OPCODE.findall(body)
        regs, stack, shared, local = resources.get(name, (0, 0, 0, 0))
        count = Counter(op.split(".")[0] for op in ops)
        stats[name] = SassStats(
            name=name, registers=regs, stack_bytes=max(stack, local), shared_bytes=shared,
            hmma=count["HMMA"], hgmma=count["HGMMA"], ffma=count["FFMA"], ldsm=count["LDSM"],
            ldgsts=Counter(_width(op) for op in ops if op.startswith("LDGSTS")),
            ldg=Counter(_width(op) for op in ops if op.split(".")[0] == "LDG"),
            tma_loads=count["UTMALDG"], spill_stores=count["STL"], spill_loads=count["LDL"])
    return stats


def _scratch() -> Path:
    """build/ of the checkout, for temporary files (not /tmp)."""
    path = ROOT / "build"
    path.mkdir(exist_ok=True)
    return path


def sass_of(binary: Path) -> dict[str, SassStats]:
    out = subprocess.run([str(nvidia_bin() / "cuobjdump"), "-sass", "-res-usage", str(binary)],
                         capture_output=True, text=True, check=True).stdout
    return parse_sass(out)


def sass_of_cubin(cubin: bytes) -> SassStats:
    with tempfile.TemporaryDirectory(dir=_scratch()) as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        (stats,) = sass_of(path).values()
    return stats


# --------------------------------------------------------------------------
# Compiling the Triton attention kernels
# --------------------------------------------------------------------------
def _compiling_process() -> None:
    """Set up a process that compiles: Triton imported with its interpreter on (as the CPU test session
    imports it) generates broken code, so the compiles run in processes of their own that import it off."""
    os.environ["TRITON_INTERPRET"] = "0"


@functools.cache
def compiling_attention():
    """A copy of triton_kernels/attention.py whose kernels are real JITFunctions (see _compiling_process)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile in a process set up by _compiling_process (TRITON_INTERPRET is on here)")
    spec = importlib.util.spec_from_file_location("_fastattn_attention_compiled",
                                                  ROOT / "triton_kernels" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KERNEL_INDEX = {"delta": 0, "dkdv": 1, "dq": 2}  # position in _backward_launches
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str  # fwd, delta, dkdv, dq
    dtype: str  # fp16, bf16, fp32
    layout: str  # nchw, channels_last
    d: int  # head dim (d_qk == d_v)
    length: int  # Lq == Lk
    v2: bool
    arch: int = 90
    heads: int = 8

    @property
    def label(self) -> str:
        return (f"{'v2' if self.v2 else 'v1'} {self.kernel} {self.dtype} {self.layout} d={self.d} "
                f"L={self.length} sm_{self.arch}")


def _tensor(c: int, length: int, dtype, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return torch.empty(1, c, length, dtype=dtype)
    return torch.empty(1, length, c, dtype=dtype).transpose(1, 2)


def launch_of(case: Case):
    """(kernel, args by name) of the launch the launcher would make for `case`."""
    mod = compiling_attention()
    dtype = DTYPES[case.dtype]
    c = case.heads * case.d
    q, k, v, out, grad_out = (_tensor(c, case.length, dtype, case.layout) for _ in range(5))
    lse = torch.empty(1, case.heads, case.length)
    if case.kernel == "fwd":
        launches = mod._forward_launches(q, k, v, out, lse, case.heads, case.d, case.d, case.d ** -0.5, case.v2)
        kernel, _, args, kwargs = launches[0]
    else:
        grads = [torch.empty_like(t) for t in (q, k, v)]
        launches = mod._backward_launches(grad_out, q, k, v, out, lse, lse.clone(), *grads, case.heads, case.d,
                                          case.d, case.d ** -0.5, case.v2)
        kernel, _, args, kwargs = launches[KERNEL_INDEX[case.kernel]]
    return kernel, args, kwargs


def configs_of(kernel, args, kwargs) -> list[dict]:
    """The configs the autotuner keeps for these arguments, preferred first, as constexpr dicts with
    num_warps and num_stages (one entry, no tuning, for a kernel that is not autotuned)."""
    import triton

    named = dict(zip(kernel.arg_names, args)) | kwargs
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [{"num_warps": 4, "num_stages": 3}]
    kept = kernel.early_config_prune(kernel.configs, named)
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kept]


@functools.cache
def _target_backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    return target, make_backend(target)


def _specialize(kernel, args, kwargs, config: dict, arch: int):
    """(JITFunction, signature, constexprs, attrs, options) of one launch, as the JIT specializes it."""
    import triton
    from triton.runtime.jit import create_function_from_signature

    _, backend = _target_backend(arch)
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    named = dict(zip(kernel.arg_names, args)) | kwargs | config
    heuristics = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    if isinstance(heuristics, triton.runtime.Heuristics):
        named |= {name: rule(named) for name, rule in heuristics.values.items()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    options_in = {k: named.pop(k) for k in ("num_warps", "num_stages")}
    bound, specialization, options = binder(**named, **options_in)
    options, signature, constexprs, attrs = fn._pack_args(backend, options_in, bound, specialization, options)
    return fn, signature, constexprs, attrs, options


def compile_launch(kernel, args, kwargs, config: dict, arch: int):
    """The CompiledKernel of one launch under one config, for sm_<arch>, as the JIT would build it."""
    import triton
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, options = _specialize(kernel, args, kwargs, config, arch)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=_target_backend(arch)[0],
                          options=options.__dict__)


def compile_key(case: "Case", which: int = 0) -> str:
    """What the compiled binary of `case` depends on: cases with one key compile to the same kernel."""
    kernel, args, kwargs = launch_of(case)
    config = configs_of(kernel, args, kwargs)[which]
    fn, signature, constexprs, attrs, options = _specialize(kernel, args, kwargs, config, case.arch)
    return repr((fn.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()), options, case.arch))


@dataclasses.dataclass(frozen=True)
class Compiled:
    case: Case
    config: tuple  # (BLOCK_M, BLOCK_N, num_warps, num_stages), or (BLOCK_M,) for delta
    num_warps: int
    shared_bytes: int  # static + dynamic shared memory a program needs
    stats: SassStats
    cpu_seconds: float  # to compile it, ptxas included


@functools.cache
def compile_case(case: Case, which: int = 0) -> Compiled:
    """Compile the `which`-th config the autotuner keeps for `case` (0: the preferred one)."""
    cpu_start = _cpu_seconds()
    kernel, args, kwargs = launch_of(case)
    config = configs_of(kernel, args, kwargs)[which]
    compiled = compile_launch(kernel, args, kwargs, config, case.arch)
    shape = tuple(config[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if k in config)
    if case.kernel == "delta":
        shape = (kwargs["BLOCK_M"],)
    stats = sass_of_cubin(compiled.asm["cubin"])
    return Compiled(case, shape, compiled.metadata.num_warps, compiled.metadata.shared, stats,
                    _cpu_seconds() - cpu_start)


def _cpu_seconds() -> float:
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _compile_keys(cases) -> list[str]:
    return [compile_key(case) for case in cases]


def compile_cases(cases, workers: int, extra=None):
    """({case: compile_case(case)}, extra()) with the compiles in `workers` processes (each compile is one
    core's work) and `extra` (a picklable callable, or None) run beside them; cases that compile to the
    same kernel (compile_key) are compiled once."""
    import concurrent.futures
    import multiprocessing

    cases = list(dict.fromkeys(cases))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=context,
                                                initializer=_compiling_process) as pool:
        extra_future = pool.submit(extra) if extra else None
        key_of = dict(zip(cases, pool.submit(_compile_keys, cases).result()))
        first_of = {}
        for case in cases:
            first_of.setdefault(key_of[case], case)
        unique = list(first_of.values())
        done = dict(zip(unique, pool.map(compile_case, unique)))
        extra_result = extra_future.result() if extra else None
    results = {}
    for case in cases:
        same = done[first_of[key_of[case]]]
        results[case] = dataclasses.replace(same, case=case)
    return results, extra_result


# --------------------------------------------------------------------------
# The CUDA kernels of the built library
# --------------------------------------------------------------------------
def cuda_attention_kernels(library: Path) -> dict[str, dict[int, SassStats]]:
    """Demangled kernel name -> {arch: stats} for the kernels of the library's attention cubins
    (empty if it has none)."""
    cuobjdump = str(nvidia_bin() / "cuobjdump")
    library = Path(library).resolve()
    listing = subprocess.run([cuobjdump, "-lelf", str(library)], capture_output=True, text=True).stdout
    # attention.cu's cubins and those of csrc/cuda/attention_mma/ (api, forward_*, backward_*): all but cbam's
    cubins = [(name, arch) for name, arch in re.findall(r"ELF file\s+\d+: (\S+\.sm_(\d+)\.cubin)", listing)
              if not name.startswith("cbam.")]
    kernels: dict[str, dict[int, SassStats]] = {}
    with tempfile.TemporaryDirectory(dir=_scratch()) as tmp:
        for cubin, arch in cubins:
            subprocess.run([cuobjdump, "-xelf", cubin, str(library)], cwd=tmp, capture_output=True, check=True)
            found = sass_of(Path(tmp) / cubin)
            for demangled, stats in zip(_demangle(list(found)), found.values()):
                kernels.setdefault(demangled, {})[int(arch)] = stats
    return kernels


def _demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return names
    return out.splitlines()


def kernel_base_name(demangled: str) -> str:
    """'void fastattn::(anonymous namespace)::attention_mma_fwd<c10::Half, 64>(...)' -> 'attention_mma_fwd'."""
    head = re.split(r"[<(]", demangled.replace("(anonymous namespace)::", ""))[0]
    return head.split("::")[-1].split()[-1]

