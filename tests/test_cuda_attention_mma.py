"""Parity of the tensor-core CUDA attention (csrc/cuda/attention_mma/) with fastattn.reference.

The variant `cuda_attention_mma` has not yet passed on a GPU, so it runs only where
FASTATTN_UNVERIFIED_KERNELS names it (csrc/cuda/variants.cuh reads the variable at every op call);
every test here sets it for its own duration. Same ops, cases and error rule as
tests/test_cuda_attention_ops.py (whose helpers run them), for float16 and bfloat16, plus checks that
the tensor-core kernels are the ones that ran and that they stay off without the switch.
"""
from __future__ import annotations

import pytest
import torch

from test_cuda_attention_ops import DEVICE, _case_id, _load_ops, _make, _run_case, check_deterministic, run_listed_case

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="the tensor-core attention kernels need a CUDA GPU of sm_80 or newer")

SWITCH = "FASTATTN_UNVERIFIED_KERNELS"
DTYPES = [torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channel_last", "strided"]


@pytest.fixture(scope="module")
def ops():
    return _load_ops()


@pytest.fixture(autouse=True)
def mma_switched_on(monkeypatch):
    monkeypatch.setenv(SWITCH, "cuda_attention_mma")


# (N, heads, d_qk, d_v, Lq, Lk, scale); scale None means d_qk ** -0.5. Head-dim blocks: 64 (d <= 64),
# 128, 256 (forward only: the backward of d > 128 stays on the FFMA kernels, a mixed pair the
# cases with d = 256 check). L of 1, 49, 196, 1023, 4096 and 4097: edges on either side of a tile.
CASES = [
    (2, 1, 16, 16, 1, 1, None),
    (2, 2, 16, 16, 49, 49, 1.0),
    (1, 8, 40, 40, 196, 49, None),       # U-Net head dim, 4:1 pooled keys
    (1, 2, 40, 40, 1023, 1023, None),
    (2, 1, 64, 64, 196, 196, None),
    (1, 1, 64, 64, 4096, 4096, None),
    (1, 1, 64, 64, 4097, 1023, None),
    (1, 2, 80, 80, 1023, 196, 1.0),
    (1, 1, 96, 48, 49, 1023, None),     # d_v != d_qk, more keys than queries
    (1, 1, 32, 128, 196, 196, None),    # d_v > d_qk
    (1, 2, 128, 128, 1023, 1023, None),
    (1, 1, 128, 128, 4096, 4096, None),
    (1, 1, 256, 256, 196, 1023, None),
    (1, 1, 256, 64, 1023, 49, None),
    (1, 1, 160, 200, 49, 196, 1.0),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_backward_parity(ops, case, dtype, layout):
    run_listed_case(ops, case, dtype, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.125, -0.5])
def test_scales(ops, dtype, scale):
    _run_case(ops, 2, 2, 64, 32, 196, 196, dtype, "contiguous", scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_logits_stay_finite(ops, dtype):
    _run_case(ops, 1, 2, 64, 64, 196, 196, dtype, "channel_last", 1.0, magnitude=300.0)


def test_long_keys(ops):
    _run_case(ops, 1, 1, 64, 64, 256, 65537, torch.float16, "channel_last", 0.125)


def test_batch_heads_past_grid_limit(ops):
    _run_case(ops, 4100, 16, 16, 16, 3, 5, torch.bfloat16, "contiguous", 0.5)


def _kernels_run(ops, dtype, layout):
    """Names of the CUDA kernels one forward and backward launch."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    q, k, v, grad = (_make(2, 128, 196, dtype, layout, gen) for _ in range(4))
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(ops, dtype):
    check_deterministic(ops, dtype)
