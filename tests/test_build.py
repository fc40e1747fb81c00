"""The build: what fastattn._C holds, and import without it."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastattn import _ext

CBAM_OPS = ["channel_pool", "gated_spatial_pool", "cbam_apply", "cbam_apply_backward",
            "gated_spatial_pool_backward_gate", "cbam_grad_x"]
ATTENTION_OPS = ["spatial_attention_forward", "spatial_attention_backward"]
# on CUDA the block calls cuDNN for its conv, and runs inference through the training path's kernels
CPU_ONLY_OPS = ["cbam_spatial_conv", "cbam_spatial_conv_weight_grad", "cbam_forward_eval", "cbam_forward_eval_"]


def test_compiled_library_loads():
    assert _ext.LOAD_ERROR is None, f"fastattn._C failed to import: {_ext.LOAD_ERROR}"


@pytest.mark.parametrize("op", CBAM_OPS + ATTENTION_OPS + CPU_ONLY_OPS)
def test_cpu_kernels_registered(op):
    assert _ext.has_kernel(op, "CPU")


@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None or
                    os.environ.get("FASTATTN_SKIP_CUDA") == "1",
                    reason="no CUDA toolchain here: the build skips the CUDA kernels")
@pytest.mark.parametrize("op", CBAM_OPS + ATTENTION_OPS)
def test_cuda_kernels_compiled_when_toolchain_present(op):
    assert _ext.has_kernel(op, "CUDA"), f"nvcc and a CUDA torch are present but fastattn._C has no CUDA {op}"


def test_import_without_compiled_library_says_how_to_build(tmp_path):
    """A stub that makes `import fastattn._C` fail stands in for a missing build."""
    code = (
        "import sys, builtins, torch\n"
        "real_import = builtins.__import__\n"
        "def no_ext(name, globals=None, locals=None, fromlist=(), level=0):\n"
        "    if name == 'fastattn' and fromlist and '_C' in fromlist: raise ImportError('simulated: not built')\n"
        "    return real_import(name, globals, locals, fromlist, level)\n"
        "builtins.__import__ = no_ext\n"
        "import fastattn\n"
        "x = torch.randn(1, 2, 3, 3)\n"
        "assert fastattn.channel_pool(x)[0].shape == (1, 2)  # auto falls back to the reference\n"
        "try:\n"
        "    fastattn.channel_pool(x, backend='cpu')\n"
        "except fastattn.BackendUnavailable as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "make build" in out.stdout, out.stdout


def test_cuda_variant_flags_mirror_verified_py():
    """csrc/cuda/variants.cuh records, per CUDA kernel variant, whether it passed on a GPU; it must say
    what fastattn/_verified.py says (the C++ side decides what runs, the Python side reports it)."""
    import re
    from pathlib import Path

    from fastattn import _verified

    header = (Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "variants.cuh").read_text()
    flags = {"cuda_attention_mma": "kCudaAttentionMmaVerified"}
    for name, constant in flags.items():
        match = re.search(rf"constexpr bool {constant} = (true|false);", header)
        assert match, f"variants.cuh declares no constexpr bool {constant}"
        assert (match.group(1) == "true") == (_verified.VARIANTS[name].verified is not None), (
            f"{constant} = {match.group(1)} in variants.cuh, but _verified.py has verified="
            f"{_verified.VARIANTS[name].verified!r} for {name}")
        assert f'"{name}"' in header, f"variants.cuh never reads the switch for {name}"
