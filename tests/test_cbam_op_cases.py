"""The CBAM op cases every backend shares, through one tester (tests/_op_cases.py).

Ops: channel_pool, gated_spatial_pool, cbam_apply, cbam_apply_backward, gated_spatial_pool_backward_gate,
cbam_grad_x of each backend that can run here: cpu always; triton in Triton's interpreter on CPU tensors
without a GPU, compiled with one; cuda with a GPU, skipped with the reason otherwise. Here: the NaN/inf
argmax rules on hand-made rows, an empty batch, inputs of other strides, determinism, and bad input.
The parity sweeps over shapes, dtypes and layouts are still per backend, with each backend's own input
kinds and accuracy row (test_{cpu,triton,cuda}_cbam_ops.py).
"""
from __future__ import annotations

import pytest
import torch

from _contract import ATOL, CUDA_CBAM_ATOL, TRITON_CBAM_UNITS, assert_equal_values, eps_atol
from _op_cases import (CBAM_BACKENDS, CBAM_LAYOUTS, CBAM_REFERENCE, all_cbam_op_args, backend_param,  # noqa: F401
                       call_all, cbam_backend_params, cbam_generator, cbam_x, ops, to_cbam_layout)

from fastattn.reference import ref_gated_spatial_pool

F32, F16 = torch.float32, torch.float16


def _shape_id(shape):
    return "x".join(map(str, shape))


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("backend", cbam_backend_params())
def test_argmax_first_nan_and_all_ties(backend, ops):
    """Hand-made rows: the first NaN wins with count 0; all-equal rows give index 0 and count = length."""
    x = torch.zeros(1, 20, 3, 3)
    x[0, 1, 2, 1] = float("nan")   # channel 1: NaN at position 7
    x[0, 1, 0, 2] = float("nan")   # ... and an earlier NaN at position 2
    x[0, 2] = float("-inf")        # channel 2: all -inf
    x[0, 3, 1, 1] = float("inf")   # channel 3: one +inf
    x = x.to(backend.device)
    gate = torch.ones(1, 20, device=backend.device)
    for layout in ["contiguous", "channels_last"]:
        xl = to_cbam_layout(x, layout)
        avg, mx, arg, cnt = ops.channel_pool(xl, False)
        assert arg[0, :4].tolist() == [0, 2, 0, 4] and cnt[0, :4].tolist() == [9, 0, 9, 1]
        assert mx[0, 1].isnan() and mx[0, 2] == float("-inf")
        pooled, arg, cnt = ops.gated_spatial_pool(xl, gate, True)
        r_pooled, r_arg, r_cnt = ref_gated_spatial_pool(xl, gate)
        assert_equal_values("pooled", pooled, r_pooled)
        assert_equal_values("argmax", arg, r_arg)
        assert_equal_values("count", cnt, r_cnt)


@pytest.mark.parametrize("backend", cbam_backend_params())
def test_empty_batch(backend, ops):
    x = torch.randn(0, 5, 3, 3, device=backend.device)
    gate, sp = torch.rand(0, 5, device=backend.device), torch.rand(0, 3, 3, device=backend.device)
    assert [t.shape for t in ops.channel_pool(x, True)] == [(0, 5)] * 4
    assert [t.shape for t in ops.gated_spatial_pool(x, gate, True)] == [(0, 2, 3, 3), (0, 3, 3), (0, 3, 3)]
    assert ops.cbam_apply(x, gate, sp).shape == x.shape
    assert [t.shape for t in ops.cbam_apply_backward(x, x, gate, sp)] == [(0, 5), (0, 3, 3)]


def _strided_atol(backend, dtype, ref):
    """The backend's row of tests/_contract.py at the reference's magnitude."""
    magnitude = max(1.0, ref.abs().nan_to_num(0, 0, 0).max().item()) if ref.numel() else 1.0
    if backend.name == "triton":
        return eps_atol(dtype, TRITON_CBAM_UNITS, magnitude)
    return (CUDA_CBAM_ATOL if backend.name == "cuda" else ATOL)[dtype] * magnitude


@pytest.mark.parametrize("x_layout", ["strided", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 17, 13, 17), (1, 3, 7, 7), (2, 40, 9, 1)], ids=_shape_id)
@pytest.mark.parametrize("dtype", [F32, F16], ids=_dtype_id)
@pytest.mark.parametrize("backend", cbam_backend_params())
def test_other_strides(backend, ops, shape, dtype, x_layout):
    """x with other strides, and grad_y in another layout than x, read right: every op against the
    same-dtype reference (ties-kind x: every value is a short sum of exact products, so this is tight)."""
    x = cbam_x(shape, dtype, x_layout, "ties", cbam_generator("strided", shape, dtype, x_layout), backend.device)
    all_args = all_cbam_op_args(x, cbam_generator("strided-ops", shape, dtype, x_layout), grad_layout="contiguous")
    out, refs = call_all(ops, all_args), call_all(CBAM_REFERENCE, all_args)
    for name in out:
        for i, (o, r) in enumerate(zip(out[name], refs[name])):
            if o.is_floating_point():
                torch.testing.assert_close(o, r, atol=_strided_atol(backend, dtype, r), rtol=0, equal_nan=True,
                                           msg=lambda m: f"{name}[{i}]: {m}")
            else:
                assert_equal_values(f"{name}[{i}]", o, r)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]) if t.is_floating_point() else t


# the GPU kernels at the ResNet stage shapes; the CPU kernels (threads over fixed blocks) at the last stage
DETERMINISM = ([backend_param("cuda", shape, dtype, layout, family="cbam",
                              id=f"cuda-{_shape_id(shape)}-{_dtype_id(dtype)}-{layout}")
                for shape in [(4, 256, 56, 56), (8, 2048, 7, 7)] for dtype in [F32, F16] for layout in CBAM_LAYOUTS]
               + [backend_param("cpu", (8, 2048, 7, 7), F32, layout, family="cbam", id=f"cpu-8x2048x7x7-float32-{layout}")
                  for layout in ["contiguous", "channels_last"]])


@pytest.mark.parametrize("backend,shape,dtype,layout", DETERMINISM)
def test_deterministic(backend, ops, shape, dtype, layout):
    """The same call twice gives bitwise the same outputs (no atomics, fixed reduction order)."""
    x = cbam_x(shape, dtype, layout, "nan", cbam_generator("determinism", shape, dtype, layout), backend.device)
    all_args = all_cbam_op_args(x, cbam_generator("determinism-ops", shape, dtype, layout), grad_layout=layout)
    first, second = call_all(ops, all_args), call_all(ops, all_args)
    for name in first:
        for i, (a, b) in enumerate(zip(first[name], second[name])):
            assert torch.equal(_bits(a), _bits(b)), f"{name}[{i}]: two identical calls differ bitwise"


# --------------------------------------------------------------------------
# Bad input: clear errors from the compiled ops (the Triton launchers run after fastattn._validate)
# --------------------------------------------------------------------------
def _cpu_bad_inputs():
    x = torch.randn(2, 3, 4, 4)
    return [(lambda o: o.channel_pool(torch.randn(2, 3, 4), True), "4-D"),
            (lambda o: o.gated_spatial_pool(x, torch.ones(2, 3, dtype=torch.float64), True), "dtype"),
            (lambda o: o.cbam_apply(x, torch.ones(2, 4), torch.ones(2, 4, 4)), "shape"),
            (lambda o: o.channel_pool(x.int(), True), "float32")]


@pytest.mark.parametrize("backend", cbam_backend_params(["cpu"]))
def test_bad_inputs_raise(backend, ops):
    for call, match in _cpu_bad_inputs():
        with pytest.raises(RuntimeError, match=match):
            call(ops)


@pytest.mark.parametrize("layout", CBAM_LAYOUTS)
@pytest.mark.parametrize("backend", cbam_backend_params(["cuda"]))
def test_float64_refused(backend, ops, layout):
    """The CUDA kernels are not compiled for float64 (auto runs float64 CUDA tensors on the reference
    backend, csrc/cuda/dispatch.cuh): every op refuses it, naming the dtypes it takes."""
    shape = (2, 5, 7, 7)
    x = cbam_x(shape, torch.float64, layout, "nan", cbam_generator("float64", shape, layout), backend.device)
    for name, args in all_cbam_op_args(x, cbam_generator("float64-ops", shape, layout), grad_layout=layout).items():
        with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
            getattr(ops, name)(*args)
