"""Builds fastattn._C: the C++ CPU kernels always, the CUDA kernels when the
toolchain can (nvcc found and torch built with CUDA). Whether a GPU is present
does not matter.

Environment knobs:
  FASTATTN_FORCE_CUDA=1     build the CUDA kernels or fail trying
  FASTATTN_SKIP_CUDA=1      build the CPU kernels only
  FASTATTN_CUDA_ARCH_LIST   default "8.0;9.0"
  MAX_JOBS                  parallel compile jobs (honoured by ninja)
  FASTATTN_SANITIZE=1       build with -fsanitize=address,undefined (CPU only)
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "False")


def _find_cuda_home():
    """The toolkit root. The nvcc on PATH may be a wrapper script that execs the
    real one; the root is the folder above the real nvcc's bin/."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            match = re.search(rb"(/\S+)/bin/nvcc", head)
            if match:
                return match.group(1).decode()
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(nvcc))


cuda_home = _find_cuda_home()
if cuda_home and not _env_flag("FASTATTN_SKIP_CUDA"):
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
if "FASTATTN_CUDA_ARCH_LIST" in os.environ or "TORCH_CUDA_ARCH_LIST" not in os.environ:
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("FASTATTN_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cu_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*/*.cu"))

want_cuda = _env_flag("FASTATTN_FORCE_CUDA") or (
    not _env_flag("FASTATTN_SKIP_CUDA") and cuda_home is not None and torch.version.cuda is not None)
if _env_flag("FASTATTN_FORCE_CUDA") and (cuda_home is None or torch.version.cuda is None):
    sys.exit("FASTATTN_FORCE_CUDA=1 but no nvcc or no CUDA build of torch was found")

opt = ["-O3"]
cxx_flags = opt + ["-fopenmp"]
link_flags = ["-fopenmp"]
if _env_flag("FASTATTN_SANITIZE"):
    cxx_flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fopenmp"]
    link_flags += ["-fsanitize=address,undefined"]
    want_cuda = False
if not _env_flag("FASTATTN_SANITIZE"):
    # AVX2 + FMA: every x86-64 server of the last decade; at::vec picks its 256-bit path from these macros
    cxx_flags += ["-march=x86-64-v3", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]

include_dirs = [os.path.join(here, "csrc")]
if want_cuda:
    # some CUDA headers (cuBLAS, ...) ship inside the torch wheel's nvidia/ packages
    for site in sys.path:
        include_dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        include_dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    ext = CUDAExtension(
        "fastattn._C",
        cpp_sources + cu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": opt + ["--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("fastattn._C", cpp_sources, include_dirs=include_dirs,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """One object tree, build/temp, for every build of this checkout: `make build` (pip install -e ., which
    would compile in a temporary folder and throw the objects away), `setup.py build_ext --inplace` and
    `pip wheel .` (tests/test_install.py). ninja then recompiles only what changed: a source, a header, or the
    flags (a CPU-only build after a CUDA one recompiles the files whose command differs). An explicit
    --build-temp (make sanitize) wins."""

    def finalize_options(self):
        if self.build_temp is None:
            self.build_temp = os.path.join(here, "build", "temp")
        super().finalize_options()


setup(
    name="fastattn",
    version="0.1.0",
    description="Fused spatial attention and CBAM kernels for vision CNNs (CPU, CUDA, Triton)",
    packages=["fastattn", "fastattn.triton_kernels"],
    package_dir={"fastattn": "fastattn", "fastattn.triton_kernels": "triton_kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],
)
