"""The CUDA spatial-attention kernels (csrc/cuda/attention.cu): what only they have.

Their parity tables (backend "cuda"), and the op cases every backend shares (NaN, -inf keys, huge logits,
empty lengths, determinism, bad input), are in tests/test_attention_op_cases.py, through the tester of
tests/_op_cases.py with CUDA_ATTENTION_ATOL (tests/_contract.py). Here the launches only a GPU can hold:
L = 65 536 on either side or both, and batch * heads past the grid's y limit.
"""
from __future__ import annotations

import pytest
import torch

from _op_cases import ATTENTION_BACKENDS, backend_ops, make, run_attention_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the CUDA attention kernels need a CUDA GPU and none is visible")

CUDA = ATTENTION_BACKENDS["cuda"]


@pytest.fixture
def ops(monkeypatch):
    return backend_ops(CUDA, monkeypatch)


@pytest.mark.parametrize("lq, lk, dtype, layout", [
    (65536, 256, torch.float32, "contiguous"),
    (256, 65536, torch.float16, "channel_last"),
])
def test_long_sequences(ops, lq, lk, dtype, layout):
    run_attention_case(CUDA, ops, (1, 1, 8, 8, lq, lk, None), dtype, layout)


def test_long_square_forward_rows(ops):
    """Lq = Lk = 65536: compare sampled query rows (each row of out depends only on its own query)."""
    gen = torch.Generator().manual_seed(1)
    n, heads, d, length, dtype = 1, 2, 8, 65536, torch.bfloat16
    q, k, v = (make(n, heads * d, length, dtype, "contiguous", gen, CUDA.device) for _ in range(3))
    out, lse = ops.spatial_attention_forward(q, k, v, heads, d ** -0.5)
    rows = torch.cat([torch.arange(64), torch.randint(64, length - 64, (64,), generator=torch.Generator().manual_seed(2)),
                      torch.arange(length - 64, length)]).to(CUDA.device)
    CUDA.rule.check_forward(out[:, :, rows], lse[:, :, rows], q[:, :, rows], k, v, heads, d ** -0.5)


def test_batch_heads_past_grid_limit(ops):
    """N * heads = 65600 > 65535 blocks on grid y: folded into grid z."""
    run_attention_case(CUDA, ops, (4100, 16, 8, 8, 3, 5, 0.5), torch.float32, "contiguous")
