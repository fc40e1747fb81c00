"""The accuracy contract of the tests, stated once (docs/DESIGN.md §4).

* ground truth: the oracle (fastattn.reference) in float64;
* the error rule: |fused - truth| <= 2 |eager - truth| + atol * max(1, |truth|), elementwise maximum,
  eager being the oracle (or the eager module) in the kernel's dtype; NaN positions must match;
* ATOL per dtype, and GRAD_ATOL for parameter gradients of whole modules; the op tests of a kernel
  family whose own GPU or CPU runs set a different slack use that family's row below (every table
  of the tests lives in this file);
* values that must not differ at all (max values, argmax indices, tie counts, repeat calls) are
  compared bitwise with assert_equal_values.

tests/_util.py re-exports these names; test files import either.
"""
from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Parameter gradients of whole modules sum a kernel's per-position rounding over every
# position, through convs and BatchNorm, and often cancel to something small: their atol is
# 10 x ATOL (relative to max(1, |truth|)); the op-level tests hold kernels to ATOL. In float16 and
# bfloat16 the eager module's own error on such a sum is a matter of luck: over 1200 random
# nn.CBAM cases (tests/test_fuzz.py) fastattn's errors had the eager module's median and 90th
# percentile in every dtype, yet 0.4-1.4% of the reduced-precision parameter gradients
# exceeded 2 x (a lucky eager error) + ATOL, by up to 5e-2 relative in bfloat16.
GRAD_ATOL = {dtype: 10 * atol for dtype, atol in ATOL.items()}

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# Op-level rows (atol relative to max(1, |truth|)). Each was set by its own kernels' runs; where a
# row is stricter than ATOL it stays so. The GPU rows were not re-checked against one common value:
# no GPU run since, so each keeps its own (issue #15: the stricter where it passes, else both, named).
CPU_ATTENTION_ATOL = {F64: 1e-12, F32: 5e-6, F16: 1e-3, BF16: 8e-3}   # csrc/cpu attention kernels
CUDA_ATTENTION_ATOL = {F32: 2e-5, F16: 2e-4, BF16: 2e-3}             # csrc/cuda attention (SIMT and MMA)
CUDA_CBAM_ATOL = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}                # csrc/cuda cbam kernels
# The Triton kernels' slack is in units of the dtype (torch.finfo(dtype).eps), see eps_atol.
TRITON_CBAM_UNITS = 4
# Logits of magnitude ~1e4 (test_attention_op_cases.py::test_huge_logits_stay_finite) carry an absolute
# float32 rounding error ~1e-3, so out and lse are held to fixed slacks there, per backend and dtype:
# (out atol, lse atol, lse rtol, gradient atol in units of eps |v| d_v max(|q|, |k|), None: finite only).
HUGE_LOGITS_TOLERANCE = {"cpu": {F32: (1e-3, 1e-2, 1e-6, None), F64: (1e-9, 1e-2, 1e-6, None)},
                         "triton": {F32: (2e-2, 0.0, 1e-5, 4), F16: (2e-2, 0.0, 1e-5, 4)}}


def triton_attention_units(dtype: torch.dtype, d_qk: int) -> float:
    """Units of the dtype in the Triton attention atol. float32: sqrt(d_qk), because Triton's ieee
    float32 dot sums each d_qk-long logit in one FMA chain, whose rounding grows like sqrt(d_qk) units;
    on an H100 that left the kernel up to ~4.5x the error of cuBLAS's float32 eager result at d_qk = 512
    (still ~1e-6 relative, where TF32 would give ~1e-3). 16-bit dtypes: one unit; their eager error
    dominates anyway."""
    return max(1.0, d_qk ** 0.5) if dtype == torch.float32 else 1.0


def eps_atol(dtype: torch.dtype, units: float, magnitude: float) -> float:
    """An absolute atol of `units` units of dtype at `magnitude` (at least 1)."""
    return units * torch.finfo(dtype).eps * max(1.0, magnitude)


def abs_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in float64; NaN against NaN and equal infinities count as no error."""
    a, b = a.double(), b.double()
    both_nan = a.isnan() & b.isnan()
    same_inf = (a == b) & a.isinf()
    return (a - b).abs().masked_fill(both_nan | same_inf, 0)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max of abs_err(a, b); 0 for empty tensors."""
    diff = abs_err(a, b)
    return diff.max().item() if diff.numel() else 0.0


def assert_error_rule(name: str, fused: torch.Tensor, truth: torch.Tensor, eager: torch.Tensor,
                      atol: float | None = None, *, absolute: bool = False) -> None:
    """|fused - truth| <= 2 |eager - truth| + atol, elementwise maximum; names the worst entry on failure.

    atol: relative to max(1, |truth|) (default ATOL[fused.dtype]); absolute=True: taken as it is."""
    assert fused.shape == truth.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(truth.shape)}"
    assert torch.equal(fused.isnan(), truth.isnan()), f"{name}: NaN positions differ from the reference"
    atol = ATOL[fused.dtype] if atol is None else atol
    if not absolute:
        atol *= max(1.0, truth.double().abs().nan_to_num(0, 0, 0).max().item()) if truth.numel() else 1.0
    fused_err, eager_err = max_err(fused, truth), max_err(eager, truth)
    if fused_err <= 2 * eager_err + atol:
        return
    diff = abs_err(fused, truth).nan_to_num(float("inf"))
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    raise AssertionError(
        f"{name}: fused error {fused_err:.3e} > 2 x eager error {eager_err:.3e} + atol {atol:.1e}; worst at "
        f"{where}: fused {fused[where].item():.6g}, truth {truth[where].item():.6g}, eager {eager[where].item():.6g}")


def assert_equal_values(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """Same shape, dtype and values: NaN where ref has NaN, -0 == +0; names the first difference."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype}, reference {ref.dtype}"
    same = (out == ref) | (out.isnan() & ref.isnan()) if out.is_floating_point() else out == ref
    bad = (~same).nonzero()
    assert bad.numel() == 0, (
        f"{name}: {bad.shape[0]} of {out.numel()} entries differ, first at {bad[0].tolist()}: "
        f"got {out[tuple(bad[0])].item()!r}, reference {ref[tuple(bad[0])].item()!r}")
