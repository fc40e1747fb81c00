"""Prove that a refactor of CUDA sources leaves the compiled kernels unchanged, without a GPU.

Compiles each given .cu file twice with the build's nvcc flags (setup.py: -O3 --use_fast_math -lineinfo
--expt-relaxed-constexpr, torch's extension defines, sm_80 and sm_90): once from the git revision `--base`
(its csrc/ extracted under build/sass/base) and once from the working tree. Dumps each object's SASS with
cuobjdump, drops what moves with the source text but not with the code (instruction addresses and
encodings, the hash nvcc gives an anonymous namespace), and compares the instruction streams kernel by
kernel. Exit status 1 if any kernel differs or exists on one side only.

    python -m bench.compare_sass --base main csrc/cuda/attention.cu csrc/cuda/cbam.cu
"""
from __future__ import annotations

import argparse
import difflib
import glob
import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

from tests._gpu_static import _demangle, nvidia_bin

ROOT = Path(__file__).resolve().parent.parent
ARCHS = (80, 90)


def nvcc_command(source: Path, csrc: Path, output: Path) -> list[str]:
    """The nvcc line of setup.py's build for one source file, compiling to an object."""
    flags = ["-O3", "--use_fast_math", "-lineinfo", *COMMON_NVCC_FLAGS, "-std=c++20",
             "--compiler-options", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    for arch in ARCHS:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    includes = [str(csrc), *include_paths("cuda")]
    for site in sys.path:  # as setup.py: CUDA headers shipped in the torch wheel's nvidia/ packages
        includes += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        includes += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return ["nvcc", *flags, *(f"-I{d}" for d in includes), "-c", str(source), "-o", str(output)]


_FUNC = re.compile(r"^\s*Function : (\S+)", re.M)
_ARCH = re.compile(r"^\s*arch = sm_(\d+)", re.M)
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")


def _functions(text: str, arch: int) -> dict[tuple[int, str], list[str]]:
    parts = _FUNC.split(text)[1:]
    names = _demangle(parts[::2])  # c++filt names an anonymous namespace without its hash
    return {(arch, name): [" ".join(i.split()) for i in _INSTR.findall(body)]
            for name, body in zip(names, parts[1::2])}


def kernels_of(obj: Path) -> dict[tuple[int, str], list[str]]:
    """(arch, demangled kernel name) -> its SASS instructions, addresses and encodings dropped."""
    text = subprocess.run([str(nvidia_bin() / "cuobjdump"), "-sass", str(obj)],
                          capture_output=True, text=True, check=True).stdout
    result = {}
    # cuobjdump prints one ELF section per arch ("arch = sm_80"), then its functions
    for section in re.split(r"(?=^\s*Fatbin elf code:)", text, flags=re.M):
        arch = _ARCH.search(section)
        if arch is not None:
            result.update(_functions(section, int(arch[1])))
    return result


def kernels_of_library(library: Path, stem: str, scratch: Path) -> dict[tuple[int, str], list[str]]:
    """As kernels_of, for the cubins `<stem>.sm_<arch>.cubin` a built library holds (setup.py's build)."""
    cuobjdump = str(nvidia_bin() / "cuobjdump")
    scratch.mkdir(parents=True, exist_ok=True)
    result = {}
    for arch in ARCHS:
        cubin = f"{stem}.sm_{arch}.cubin"
        subprocess.run([cuobjdump, "-xelf", cubin, str(Path(library).resolve())], cwd=scratch,
                       capture_output=True, check=True)
        text = subprocess.run([cuobjdump, "-sass", cubin], cwd=scratch, capture_output=True, text=True,
                              check=True).stdout
        result.update(_functions(text, arch))
    return result


def cubin_command(source: Path, csrc: Path, output: Path, arch: int) -> list[str]:
    """nvcc_command for one arch, device code only (-cubin): the same cicc and ptxas work, no host compile."""
    cmd = [c for c in nvcc_command(source, csrc, output) if not c.startswith("-gencode")]
    cmd[cmd.index("-c")] = "-cubin"
    return [cmd[0], f"-gencode=arch=compute_{arch},code=sm_{arch}", *cmd[1:]]


def compile_tree(csrc: Path, sources: list[str], out: Path, reuse: bool = False,
                 device_only: bool = False) -> dict[str, list[Path]]:
    """source -> its object (or, device_only, its cubins, one per arch, compiled side by side)."""
    out.mkdir(parents=True, exist_ok=True)
    objects = {}
    for source in sources:
        stem = Path(source).stem
        if device_only:
            outputs = [out / f"{stem}.sm_{arch}.cubin" for arch in ARCHS]
            cmds = [cubin_command(csrc.parent / source, csrc, o, arch) for o, arch in zip(outputs, ARCHS)]
        else:
            outputs = [out / f"{stem}.o"]
            cmds = [nvcc_command(csrc.parent / source, csrc, outputs[0])]
        objects[source] = outputs
        if reuse and all(o.exists() for o in outputs):
            continue
        for proc in [subprocess.Popen(cmd) for cmd in cmds]:
            if proc.wait() != 0:
                raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return objects


def kernels_of_outputs(outputs: list[Path]) -> dict[tuple[int, str], list[str]]:
    """kernels_of an object, or of the cubins `<stem>.sm_<arch>.cubin` of a device-only compile."""
    result = {}
    for path in outputs:
        if path.suffix == ".cubin":
            text = subprocess.run([str(nvidia_bin() / "cuobjdump"), "-sass", str(path)], capture_output=True,
                                  text=True, check=True).stdout
            result.update(_functions(text, int(path.stem.rsplit("sm_", 1)[1])))
        else:
            result.update(kernels_of(path))
    return result


def extract_base(rev: str, dest: Path) -> Path:
    """csrc/ of git revision `rev`, written under dest."""
    archive = subprocess.run(["git", "archive", rev, "csrc"], cwd=ROOT, capture_output=True, check=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "csrc"


def compare(base: dict, new: dict, out=sys.stdout) -> int:
    """Print one line per kernel (and a diff where it differs); the number of kernels not identical."""
    bad = 0
    for key in sorted(set(base) | set(new)):
        arch, name = key
        short = re.sub(r"\(.*", "", name.replace("(anonymous namespace)::", ""))
        if key not in base or key not in new:
            bad += 1
            print(f"sm_{arch} ONLY IN {'NEW' if key in new else 'BASE'}  {short}", file=out)
            continue
        a, b = base[key], new[key]
        if a == b:
            print(f"sm_{arch} identical  {len(a):6d} instr  {short}", file=out)
        else:
            bad += 1
            print(f"sm_{arch} DIFFERS    {len(a):6d} -> {len(b)} instr  {short}", file=out)
            for line in list(difflib.unified_diff(a, b, lineterm="", n=1))[:60]:
                print("    " + line, file=out)
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="git revision to compare against (default: main)")
    parser.add_argument("--work", default=str(ROOT / "build" / "sass"), help="scratch folder")
    parser.add_argument("--reuse-base", action="store_true",
                        help="keep the base objects of an earlier run with the same --base and --work")
    parser.add_argument("--base-only", action="store_true", help="compile the base and stop")
    parser.add_argument("--device-only", action="store_true",
                        help="compile the working tree's files to cubins only (-cubin per arch, in parallel): "
                        "the same SASS, without the host compile")
    parser.add_argument("--new-library", help="read the working tree's kernels from this built library "
                        "(fastattn/_C*.so of a full build) instead of compiling them")
    parser.add_argument("sources", nargs="+", help="files under csrc/ (paths relative to the repository)")
    args = parser.parse_args()
    work = Path(args.work)
    base_csrc = extract_base(args.base, work / "base")
    base_objs = compile_tree(base_csrc, args.sources, work / "base-obj", reuse=args.reuse_base)
    if args.base_only:
        return 0
    if args.new_library:
        new = {source: kernels_of_library(Path(args.new_library), Path(source).stem, work / "new-lib")
               for source in args.sources}
    else:
        new_objs = compile_tree(ROOT / "csrc", args.sources, work / "new-obj", device_only=args.device_only)
        new = {source: kernels_of_outputs(new_objs[source]) for source in args.sources}
    bad = 0
    for source in args.sources:
        print(f"== {source} (base {args.base} vs {args.new_library or 'working tree'})")
        bad += compare(kernels_of_outputs(base_objs[source]), new[source])
    print(f"{bad} kernel(s) differ" if bad else "all kernels identical, instruction for instruction")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
