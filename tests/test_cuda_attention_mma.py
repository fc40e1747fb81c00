"""The tensor-core CUDA attention (csrc/cuda/attention_mma/): what only it has.

The variant `cuda_attention_mma` has not yet passed on a GPU, so it runs only where
FASTATTN_UNVERIFIED_KERNELS names it (csrc/cuda/variants.cuh reads the variable at every op call);
every test here sets it for its own duration. Its parity tables (backend "cuda-mma": float16 and
bfloat16, the same rule as the SIMT kernels) and the shared op cases are in
tests/test_attention_op_cases.py; here the long and wide launches, checks that the tensor-core kernels
are the ones that ran, and that they stay off without the switch.
"""
from __future__ import annotations

import pytest
import torch

from _op_cases import ATTENTION_BACKENDS, VERIFIED_ENV, backend_ops, make, run_attention_case

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="the tensor-core attention kernels need a CUDA GPU of sm_80 or newer")

SWITCH = VERIFIED_ENV
MMA = ATTENTION_BACKENDS["cuda-mma"]
DTYPES = list(MMA.dtypes)


@pytest.fixture
def ops(monkeypatch):
    """The CUDA ops with cuda_attention_mma switched on for the test."""
    return backend_ops(MMA, monkeypatch)


def test_long_keys(ops):
    run_attention_case(MMA, ops, (1, 1, 64, 64, 256, 65537, 0.125), torch.float16, "channel_last")


def test_batch_heads_past_grid_limit(ops):
    run_attention_case(MMA, ops, (4100, 16, 16, 16, 3, 5, 0.5), torch.bfloat16, "contiguous")


def _kernels_run(ops, dtype, layout):
    """Names of the CUDA kernels one forward and backward launch."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, grad = (make(2, 128, 196, dtype, layout, gen, MMA.device) for _ in range(4))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out, lse = ops.spatial_attention_forward(q, k, v, 2, 0.125)
        ops.spatial_attention_backward(grad, q, k, v, out, lse, 2, 0.125)
        torch.cuda.synchronize()
    return {event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA}


@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_core_kernels_run_when_switched_on(ops, dtype, layout):
    names = _kernels_run(ops, dtype, layout)
    for kernel in ("attention_mma_forward_kernel", "attention_mma_backward_dkdv_kernel",
                   "attention_mma_backward_dq_kernel"):
        assert any(kernel in name for name in names), f"{kernel} did not run; kernels: {sorted(names)}"


@pytest.mark.parametrize("value, on", [
    (None, False), ("", False), ("0", False), ("triton_attention_v2", False), ("cuda_attention", False),
    ("1", True), ("all", True), (" triton_attention_v2 , cuda_attention_mma ", True),
])
def test_switch_values(ops, monkeypatch, value, on):
    """The C++ side reads FASTATTN_UNVERIFIED_KERNELS as fastattn/_verified.py does."""
    if value is None:
        monkeypatch.delenv(SWITCH)
    else:
        monkeypatch.setenv(SWITCH, value)
    names = _kernels_run(ops, torch.float16, "contiguous")
    ran = any("attention_mma_" in name for name in names)
    assert ran == on, f"{SWITCH}={value!r}: tensor-core kernels {'ran' if ran else 'did not run'}; {sorted(names)}"
    if not on:
        assert any("spatial_attention_forward_kernel" in name for name in names), sorted(names)
