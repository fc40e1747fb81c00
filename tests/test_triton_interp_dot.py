"""The interpreter's float32 tl.dot (tests/_triton_interp_dot.py) sums as a GPU's FMA chain: the same
bits in both orientations, and the same bits as that chain written out here."""
import numpy as np
import pytest
import torch

from _triton_interp_dot import _fma_chain

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

INTERPRETED = not torch.cuda.is_available()


def _chain(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            acc = np.float32(0)
            for kk in range(a.shape[1]):
                acc = np.float32(np.float64(a[i, kk]) * np.float64(b[kk, j]) + np.float64(acc))
            out[i, j] = acc
    return out


def test_chain_is_orientation_free_and_sequential():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((16, 32)) * 60).astype(np.float32)
    b = (rng.standard_normal((32, 16)) * 60).astype(np.float32)
    zero = np.zeros((16, 16), np.float32)
    got = _fma_chain(a, b, zero)
    assert np.array_equal(got, _fma_chain(b.T.copy(), a.T.copy(), zero).T)
    assert np.array_equal(got, _chain(a, b))


@triton.jit
def _dot_both_ways(a_ptr, b_ptr, ab_ptr, ba_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(ab_ptr + m[:, None] * N + n[None, :], tl.dot(a, b, input_precision="ieee"))
    tl.store(ba_ptr + n[:, None] * M + m[None, :], tl.dot(tl.trans(b), tl.trans(a), input_precision="ieee"))


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's dot; a GPU runs its own")
def test_interpreter_dot_uses_the_chain():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=gen) * 60
    b = torch.randn(32, 16, generator=gen) * 60
    ab, ba = torch.empty(16, 16), torch.empty(16, 16)
    _dot_both_ways[(1,)](a, b, ab, ba, 16, 32, 16)
    assert torch.equal(ab, ba.T)
    assert np.array_equal(ab.numpy(), _chain(a.numpy(), b.numpy()))
