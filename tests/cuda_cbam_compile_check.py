"""Compile check of csrc/cuda/cbam.cu on a machine without a GPU (not a pytest test).

    CUDA_HOME=/usr/local/cuda-13.0 MAX_JOBS=1 python tests/cuda_cbam_compile_check.py

Builds ops.cpp + cuda/cbam.cu into a throwaway library for sm_90 (and sm_80 with
--all-archs). Loading needs the CUDA driver, so without a GPU the load may fail
after a successful build: the build is what this checks.
"""
import glob
import os
import sys

from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ["80", "90"] if "--all-archs" in sys.argv else ["90"]


def main() -> None:
    includes = [p for site in sys.path for p in glob.glob(os.path.join(site, "nvidia", "cu*", "include"))]
    try:
        load(name="fa_cuda_cbam",
             sources=[os.path.join(ROOT, "csrc/ops.cpp"), os.path.join(ROOT, "csrc/cuda/cbam.cu")],
             extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
             + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS],
             extra_include_paths=includes, build_directory=_build_dir(), is_python_module=False, verbose=True)
        print("built and loaded")
    except (OSError, ImportError, RuntimeError) as exc:
        so = os.path.join(_build_dir(), "fa_cuda_cbam.so")
        if os.path.exists(so) and os.path.getmtime(so) >= os.path.getmtime(os.path.join(ROOT, "csrc/cuda/cbam.cu")):
            print(f"built {so}; loading failed (expected without a GPU): {exc}")
        else:
            raise


def _build_dir() -> str:
    path = "/tmp/build-cuda-cbam"
    os.makedirs(path, exist_ok=True)
    return path


if __name__ == "__main__":
    main()
