"""The Triton interpreter's float32 tl.dot, made to sum as a GPU does.

On a GPU, Triton lowers a float32 dot with input_precision "ieee" to one chain of FMAs along K per
output element, so q·kᵀ and (k·qᵀ)ᵀ give the same bits: a flash backward that recomputes the forward's
logits in the other orientation gets them back exactly. The interpreter calls numpy's matmul instead,
whose BLAS picks its summation order by CPU and by the operands' shapes (OpenBLAS on an AVX2 CPU gives
other bits for the two orientations), so the tests of a kernel's float32 accuracy would depend on the
machine's BLAS rather than on the kernel. Here float32 x float32 dots run as that chain: the product
of two floats is exact in double, and one rounding to float32 per step stands in for the FMA's."""
import numpy as np


def _fma_chain(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    out = acc.astype(np.float32, copy=True)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    for kk in range(a.shape[-1]):
        out = (a64[..., :, kk, None] * b64[..., None, kk, :] + out).astype(np.float32)
    return out


def install() -> None:
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    numpy_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype == b.data.dtype == d.data.dtype == np.float32:
            return interpreter.TensorHandle(_fma_chain(a.data, b.data, d.data), d.dtype.scalar)
        return numpy_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
